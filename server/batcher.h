// Dynamic batching of Retrieve calls, in the manner of Triton's dynamic
// batcher: concurrent calls that run the sync dynamics on the same bank with
// the same energy are merged into one batched kernel call (matrix-matrix
// products instead of one pass over the bank per query).
//
//   RetrieveBatcher batcher({.max_batch = 256, .max_delay = absl::Microseconds(200)});
//   RetrieveBatcher::Call call{...queries...};
//   absl::Status s = batcher.Run(key, &call, [&](absl::Span<Call* const> calls) {
//     ... run every call's queries together, fill call->results ...
//   });
//
// The first call for a key becomes the leader: it waits up to max_delay (or
// until max_batch queries are queued), takes the queued calls, runs them
// through the executor on its own thread and wakes their callers. Calls that
// arrive while a batch runs queue up; the executor may pull them into the
// running batch (take_more), and whatever is left when it returns goes to
// the next leader (the oldest of them): under load, batches form without
// any added delay. A call larger than max_batch runs alone.
//
// Thread-safety: thread-safe.
#ifndef ENGRAM_SERVER_BATCHER_H_
#define ENGRAM_SERVER_BATCHER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "engram/core/mutex.h"

namespace engram::server {

class RetrieveBatcher {
 public:
  struct Options {
    int64_t max_batch = 256;                     // queries per batch
    absl::Duration max_delay = absl::ZeroDuration();  // leader's wait for company
  };
  // One caller's share of a batch. `queries` is what the caller brings; the
  // executor writes the rest.
  struct Call {
    int64_t queries = 0;
    void* payload = nullptr;  // the executor's per-call data
    absl::Status status;      // set by the executor
    // Internal.
    bool done = false;
    bool lead = false;
  };
  // Runs `calls`; may call complete(c) (after setting c->status) as soon as
  // call c is answered, which returns c's caller at once. After `complete`
  // the executor must not touch c again; calls not completed are released
  // when the executor returns. take_more(max_queries) hands over calls
  // queued under the same key since the batch started (oldest first, at
  // most max_queries queries in all), which the executor then runs as part
  // of its batch (continuous batching: they join at a step boundary
  // instead of waiting for the batch to end).
  using TakeMore = std::function<std::vector<Call*>(int64_t max_queries)>;
  using Executor = std::function<void(absl::Span<Call* const> calls,
                                      const std::function<void(Call*)>& complete,
                                      const TakeMore& take_more)>;
  // Observes the size (queries) of every executed batch.
  using BatchObserver = std::function<void(int64_t queries, int64_t calls)>;

  explicit RetrieveBatcher(Options options, BatchObserver observer = nullptr)
      : options_(options), observer_(std::move(observer)) {}

  // Queues `call` under `key` and returns once an executor (on this or
  // another caller's thread) has run it; returns call->status.
  absl::Status Run(const std::string& key, Call* call, const Executor& execute);

  const Options& options() const { return options_; }

 private:
  struct Queue {
    std::deque<Call*> pending;
    bool leader_active = false;
  };

  Options options_;
  BatchObserver observer_;
  // POSIX lock and condition variable (engram/core/mutex.h), visible to
  // ThreadSanitizer. changed_ is signalled whenever a call is queued or a
  // batch finishes; waiters re-check their own condition.
  core::Mutex mu_;
  core::CondVar changed_;
  absl::flat_hash_map<std::string, Queue> queues_ ABSL_GUARDED_BY(mu_);
};

}  // namespace engram::server

#endif  // ENGRAM_SERVER_BATCHER_H_
