// SharedMutex: the reader/writer lock of Engram's own shared state (the bank
// registry, the metrics caches); Mutex + CondVar: a plain lock with a
// condition variable (the Retrieve batcher). All carry Abseil's
// thread-safety annotations so clang's -Wthread-safety still checks
// ABSL_GUARDED_BY.
//
//   mutable SharedMutex mu_;
//   int value_ ABSL_GUARDED_BY(mu_);
//   { MutexLock lock(&mu_); value_ = 1; }          // exclusive
//   { ReaderMutexLock lock(&mu_); return value_; }  // shared
//
//   Mutex m_; CondVar cv_;
//   { MutexLock lock(&m_); while (!ready_) cv_.Wait(&m_); }
//   { MutexLock lock(&m_); ready_ = true; cv_.SignalAll(); }
//
// They wrap POSIX locks rather than absl::Mutex so that ThreadSanitizer,
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
#include "absl/time/time.h"

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

class CondVar;

class ABSL_LOCKABLE Mutex {
 public:
  Mutex() {
    if (pthread_mutex_init(&mu_, nullptr) != 0) std::abort();
  }
  ~Mutex() { pthread_mutex_destroy(&mu_); }
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() {
    if (pthread_mutex_lock(&mu_) != 0) std::abort();
  }
  void Unlock() ABSL_UNLOCK_FUNCTION() {
    if (pthread_mutex_unlock(&mu_) != 0) std::abort();
  }

 private:
  friend class CondVar;
  pthread_mutex_t mu_;
};

class CondVar {
 public:
  CondVar() {
    if (pthread_cond_init(&cv_, nullptr) != 0) std::abort();
  }
  ~CondVar() { pthread_cond_destroy(&cv_); }
  CondVar(const CondVar&) = delete;
  CondVar& operator=(const CondVar&) = delete;

  // Releases `mu` (held by the caller), waits for a signal, takes `mu` again.
  // May wake spuriously: wait in a loop on the condition.
  void Wait(Mutex* mu) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (pthread_cond_wait(&cv_, &mu->mu_) != 0) std::abort();
  }
  // As Wait, until `deadline` at the latest; false once the deadline passed.
  bool WaitWithDeadline(Mutex* mu, absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    const timespec ts = absl::ToTimespec(deadline);
    return pthread_cond_timedwait(&cv_, &mu->mu_, &ts) == 0;
  }
  void SignalAll() { pthread_cond_broadcast(&cv_); }

 private:
  pthread_cond_t cv_;
};

// Exclusive lock for a scope.
class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(SharedMutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : shared_(mu) {
    shared_->Lock();
  }
  explicit MutexLock(Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : plain_(mu) { plain_->Lock(); }
  ~MutexLock() ABSL_UNLOCK_FUNCTION() {
    if (shared_ != nullptr) shared_->Unlock();
    if (plain_ != nullptr) plain_->Unlock();
  }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  SharedMutex* const shared_ = nullptr;
  Mutex* const plain_ = nullptr;
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
