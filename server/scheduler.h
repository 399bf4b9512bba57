// Scheduler: where engramd computes. A fixed pool of executor threads takes
// calls (Retrieve, Energy, Sample, SampleStream) from one bounded admission
// queue in arrival order; gRPC's handlers only validate, enqueue and return.
//
//   Scheduler scheduler({.threads = 2, .max_queue = 1024}, hooks);
//   scheduler.Submit(std::make_unique<MyTask>(...));  // never blocks
//
// Admission: a full queue rejects the call at once (RESOURCE_EXHAUSTED); a
// call whose queue deadline (its gRPC deadline, or its queue timeout) passes
// while it waits is dropped with DEADLINE_EXCEEDED without being run, by a
// timer thread, so the answer comes when the deadline passes rather than
// when an executor frees up; a call whose client has gone is dropped
// (CANCELLED). Rejected tasks are answered through Task::Reject.
//
// Batching (Triton's dynamic batcher): tasks with equal non-empty batch keys
// are run together. An executor that takes a keyed task also takes the
// queued tasks of that key (up to max_batch_queries queries, optionally
// waiting max_batch_delay for more), and the running task may pull more of
// them between its steps (Batch::TakeMore: continuous batching).
//
// Threads: `threads` executors and one timer, created by the constructor and
// joined by Shutdown; no thread is ever created per call.
//
// Thread-safety: Submit and the accessors are safe to call concurrently.
#ifndef ENGRAM_SERVER_SCHEDULER_H_
#define ENGRAM_SERVER_SCHEDULER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "engram/core/mutex.h"

namespace engram::server {

struct SchedulerOptions {
  // The pool's name and the flag that sizes it, as rejections quote them.
  std::string name = "compute";
  std::string threads_flag = "--executor_threads";
  // Executor threads; 0 means one per CPU this process may run on.
  int threads = 0;
  // Calls waiting beyond the ones running; more are rejected.
  int64_t max_queue = 1024;
  // Largest number of queries one batch runs at a time.
  int64_t max_batch_queries = 256;
  // How long an executor that took a keyed task waits for company before
  // running a batch that is not full (0: batch only what is queued).
  absl::Duration max_batch_delay = absl::ZeroDuration();
};

// What the scheduler reports (all optional).
struct SchedulerHooks {
  std::function<void(int64_t depth)> queue_depth;
  std::function<void(double seconds)> queue_wait;
  // reason: "queue_full", "deadline", "cancelled", "shutdown".
  std::function<void(const char* reason)> rejected;
  std::function<void(int64_t queries, int64_t calls)> batch;
};

class Scheduler {
 public:
  class Batch;

  class Task {
   public:
    virtual ~Task() = default;
    // Tasks with equal non-empty keys may run as one batch.
    virtual std::string batch_key() const { return {}; }
    // Queries this task brings to a batch.
    virtual int64_t queries() const { return 1; }
    // True once the client has gone; the task is then dropped, not run.
    virtual bool Cancelled() const { return false; }
    // Runs the batch whose first task this is (for an unkeyed task, a batch
    // of one). Every task of the batch must be answered before Run returns,
    // each exactly once.
    virtual void Run(Batch& batch) = 0;
    // Answers the call with `status` without running it.
    virtual void Reject(const absl::Status& status) = 0;

    // The latest time the task may start; InfiniteFuture for none.
    absl::Time queue_deadline = absl::InfiniteFuture();

   private:
    friend class Scheduler;
    absl::Time enqueued_;
  };

  // The tasks an executor runs together. It owns them: Release frees a task
  // that has been answered while the batch runs on (continuous batching keeps
  // only running tasks), the rest are freed when Run returns.
  class Batch {
   public:
    const std::vector<Task*>& tasks() const { return tasks_; }
    // Takes queued tasks with this batch's key, oldest first, whose queries
    // fit in `max_queries`; they join tasks() (empty for unkeyed batches).
    std::vector<Task*> TakeMore(int64_t max_queries);
    // Frees `task` (answered); it leaves tasks(). May free the task whose
    // Run is running: Run must not touch that task's members afterwards.
    void Release(Task* task);
    const std::string& key() const { return key_; }

   private:
    friend class Scheduler;
    Batch(Scheduler* s, std::string key) : scheduler_(s), key_(std::move(key)) {}
    void Add(std::unique_ptr<Task> t);
    Scheduler* scheduler_;
    std::string key_;
    std::vector<Task*> tasks_;
    std::vector<std::unique_ptr<Task>> owned_;
  };

  Scheduler(SchedulerOptions options, SchedulerHooks hooks = {});
  // Shutdown, if not done already.
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues `task`, or rejects it at once (RESOURCE_EXHAUSTED when the queue
  // is full, UNAVAILABLE after Shutdown). Never blocks on a running call.
  void Submit(std::unique_ptr<Task> task);
  // Rejects every queued task (UNAVAILABLE), waits for the running ones and
  // joins the threads.
  void Shutdown();

  int threads() const { return static_cast<int>(executors_.size()); }
  int64_t queued() const;
  const SchedulerOptions& options() const { return options_; }

 private:
  void ExecutorLoop();
  void TimerLoop();
  // Removes and returns the queued tasks with `key` that fit in
  // `max_queries` (oldest first).
  std::vector<std::unique_ptr<Task>> TakeKeyed(const std::string& key, int64_t max_queries)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Dequeued(const Task& t, absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RejectAll(std::vector<std::unique_ptr<Task>> tasks, const absl::Status& status,
                 const char* reason);
  // Answers tasks whose queue deadline passed (DEADLINE_EXCEEDED) and whose
  // client has gone (CANCELLED).
  void RejectDropped(std::vector<std::unique_ptr<Task>> expired,
                     std::vector<std::unique_ptr<Task>> cancelled);

  SchedulerOptions options_;
  SchedulerHooks hooks_;
  mutable core::Mutex mu_;
  core::CondVar work_;   // a task was queued, or shutdown
  core::CondVar timer_;  // the earliest queue deadline may have moved
  std::deque<std::unique_ptr<Task>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> executors_;
  std::thread timer_thread_;
};

// CPUs this process may run on (its affinity set), at least 1.
int AvailableCpus();

}  // namespace engram::server

#endif  // ENGRAM_SERVER_SCHEDULER_H_
