// SharedMutex: the reader/writer lock of Engram's own shared state (the bank
// registry, the metrics caches), with Abseil's thread-safety annotations so
// clang's -Wthread-safety still checks ABSL_GUARDED_BY.
//
//   mutable SharedMutex mu_;
//   int value_ ABSL_GUARDED_BY(mu_);
//   { MutexLock lock(&mu_); value_ = 1; }          // exclusive
//   { ReaderMutexLock lock(&mu_); return value_; }  // shared
//
// It wraps a POSIX rwlock rather than absl::Mutex so that ThreadSanitizer,
// which intercepts pthread calls, sees every lock and unlock even though the
// system's Abseil is not built with TSan (absl::Mutex there synchronises
// invisibly and yields false race reports). Writers are preferred: a steady
// stream of readers (Retrieve, Sample) cannot starve a Store.
//
// Thread-safety: the point of the class; not copyable or movable.
#ifndef ENGRAM_CORE_MUTEX_H_
#define ENGRAM_CORE_MUTEX_H_

#include <pthread.h>

#include <cstdlib>

#include "absl/base/thread_annotations.h"

namespace engram::core {

class ABSL_LOCKABLE SharedMutex {
 public:
  SharedMutex() {
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
#ifdef __GLIBC__
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
#endif
    if (pthread_rwlock_init(&rw_, &attr) != 0) std::abort();
    pthread_rwlockattr_destroy(&attr);
  }
  ~SharedMutex() { pthread_rwlock_destroy(&rw_); }
  SharedMutex(const SharedMutex&) = delete;
  SharedMutex& operator=(const SharedMutex&) = delete;

  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { Check(pthread_rwlock_wrlock(&rw_)); }
  void ReaderLock() ABSL_SHARED_LOCK_FUNCTION() { Check(pthread_rwlock_rdlock(&rw_)); }
  void Unlock() ABSL_UNLOCK_FUNCTION() { Check(pthread_rwlock_unlock(&rw_)); }
  void ReaderUnlock() ABSL_UNLOCK_FUNCTION() { Check(pthread_rwlock_unlock(&rw_)); }

 private:
  // A failing rwlock call (EDEADLK, EAGAIN) is a bug, never a condition to run on with.
  static void Check(int rc) {
    if (rc != 0) std::abort();
  }
  pthread_rwlock_t rw_;
};

// Exclusive lock for a scope.
class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(SharedMutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) { mu_->Lock(); }
  ~MutexLock() ABSL_UNLOCK_FUNCTION() { mu_->Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  SharedMutex* const mu_;
};

// Shared lock for a scope.
class ABSL_SCOPED_LOCKABLE ReaderMutexLock {
 public:
  explicit ReaderMutexLock(SharedMutex* mu) ABSL_SHARED_LOCK_FUNCTION(mu) : mu_(mu) {
    mu_->ReaderLock();
  }
  ~ReaderMutexLock() ABSL_UNLOCK_FUNCTION() { mu_->ReaderUnlock(); }
  ReaderMutexLock(const ReaderMutexLock&) = delete;
  ReaderMutexLock& operator=(const ReaderMutexLock&) = delete;

 private:
  SharedMutex* const mu_;
};

}  // namespace engram::core

#endif  // ENGRAM_CORE_MUTEX_H_
