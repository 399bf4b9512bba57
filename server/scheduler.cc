#include "server/scheduler.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <cstdio>
#include <exception>

#include "absl/strings/str_cat.h"

namespace engram::server {
namespace {

// A queued task with no deadline is still checked this often for a client
// that has gone.
constexpr absl::Duration kCancelPoll = absl::Milliseconds(100);

}  // namespace

int AvailableCpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

void Scheduler::Batch::Add(std::unique_ptr<Task> t) {
  tasks_.push_back(t.get());
  owned_.push_back(std::move(t));
}

std::vector<Scheduler::Task*> Scheduler::Batch::TakeMore(int64_t max_queries) {
  std::vector<Task*> more;
  if (key_.empty() || max_queries <= 0) return more;
  std::vector<std::unique_ptr<Task>> taken;
  {
    core::MutexLock lock(&scheduler_->mu_);
    taken = scheduler_->TakeKeyed(key_, max_queries);
  }
  int64_t queries = 0;
  for (auto& t : taken) {
    queries += t->queries();
    more.push_back(t.get());
    Add(std::move(t));
  }
  if (!more.empty() && scheduler_->hooks_.batch) {
    scheduler_->hooks_.batch(queries, static_cast<int64_t>(more.size()));
  }
  return more;
}

void Scheduler::Batch::Release(Task* task) {
  tasks_.erase(std::remove(tasks_.begin(), tasks_.end(), task), tasks_.end());
  auto it = std::find_if(owned_.begin(), owned_.end(),
                         [&](const std::unique_ptr<Task>& t) { return t.get() == task; });
  if (it != owned_.end()) {
    std::swap(*it, owned_.back());
    owned_.pop_back();
  }
}

Scheduler::Scheduler(SchedulerOptions options, SchedulerHooks hooks)
    : options_(options), hooks_(std::move(hooks)) {
  if (options_.threads <= 0) options_.threads = AvailableCpus();
  options_.max_queue = std::max<int64_t>(options_.max_queue, 0);
  options_.max_batch_queries = std::max<int64_t>(options_.max_batch_queries, 1);
  // Named for ps / top -H (at most 15 characters): the pool's executors by
  // its name, its timer "<name>-timer".
  const std::string timer_name = (options_.name + "-timer").substr(0, 15);
  const std::string executor_name = options_.name.substr(0, 15);
  for (int i = 0; i < options_.threads; ++i) {
    executors_.emplace_back([this] { ExecutorLoop(); });
    pthread_setname_np(executors_.back().native_handle(), executor_name.c_str());
  }
  timer_thread_ = std::thread([this] { TimerLoop(); });
  pthread_setname_np(timer_thread_.native_handle(), timer_name.c_str());
}

Scheduler::~Scheduler() { Shutdown(); }

int64_t Scheduler::queued() const {
  core::MutexLock lock(&mu_);
  return static_cast<int64_t>(queue_.size());
}

void Scheduler::Submit(std::unique_ptr<Task> task) {
  task->enqueued_ = absl::Now();
  absl::Status reject;
  const char* reason = nullptr;
  {
    core::MutexLock lock(&mu_);
    if (stopping_) {
      reject = absl::UnavailableError("engramd is shutting down; retry on another server");
      reason = "shutdown";
    } else if (static_cast<int64_t>(queue_.size()) >= options_.max_queue) {
      reject = absl::ResourceExhaustedError(absl::StrCat(
          "engramd's ", options_.name, " queue is full (", queue_.size(), " calls waiting for ",
          options_.threads, " ", options_.name, " threads); retry with backoff, or raise "
          "--max_queue or ", options_.threads_flag));
      reason = "queue_full";
    } else {
      queue_.push_back(std::move(task));
      if (hooks_.queue_depth) hooks_.queue_depth(static_cast<int64_t>(queue_.size()));
      work_.SignalAll();
      timer_.SignalAll();
      return;
    }
  }
  if (hooks_.rejected) hooks_.rejected(reason);
  task->Reject(reject);
}

void Scheduler::Shutdown() {
  std::vector<std::unique_ptr<Task>> left;
  {
    core::MutexLock lock(&mu_);
    if (stopping_ && executors_.empty()) return;
    stopping_ = true;
    for (auto& t : queue_) left.push_back(std::move(t));
    queue_.clear();
    if (hooks_.queue_depth) hooks_.queue_depth(0);
    work_.SignalAll();
    timer_.SignalAll();
  }
  RejectAll(std::move(left), absl::UnavailableError("engramd is shutting down"), "shutdown");
  for (std::thread& t : executors_) t.join();
  executors_.clear();
  if (timer_thread_.joinable()) timer_thread_.join();
}

void Scheduler::RejectAll(std::vector<std::unique_ptr<Task>> tasks, const absl::Status& status,
                          const char* reason) {
  for (auto& t : tasks) {
    if (hooks_.rejected) hooks_.rejected(reason);
    t->Reject(status);
  }
}

void Scheduler::RejectDropped(std::vector<std::unique_ptr<Task>> expired,
                              std::vector<std::unique_ptr<Task>> cancelled) {
  RejectAll(std::move(expired),
            absl::DeadlineExceededError(absl::StrCat(
                "the call's deadline passed while it waited in engramd's ", options_.name,
                " queue")),
            "deadline");
  RejectAll(std::move(cancelled), absl::CancelledError("the client cancelled the call"),
            "cancelled");
}

void Scheduler::Dequeued(const Task& t, absl::Time now) {
  if (hooks_.queue_wait) hooks_.queue_wait(absl::ToDoubleSeconds(now - t.enqueued_));
  if (hooks_.queue_depth) hooks_.queue_depth(static_cast<int64_t>(queue_.size()));
}

std::vector<std::unique_ptr<Scheduler::Task>> Scheduler::TakeKeyed(const std::string& key,
                                                                  int64_t max_queries) {
  std::vector<std::unique_ptr<Task>> taken;
  const absl::Time now = absl::Now();
  int64_t queries = 0;
  for (auto it = queue_.begin(); it != queue_.end();) {
    Task& t = **it;
    // Expired and abandoned tasks are left to the timer.
    if (t.queue_deadline <= now || queries + t.queries() > max_queries ||
        t.batch_key() != key) {
      ++it;
      continue;
    }
    queries += t.queries();
    Dequeued(t, now);
    taken.push_back(std::move(*it));
    it = queue_.erase(it);
  }
  if (!taken.empty() && hooks_.queue_depth) {
    hooks_.queue_depth(static_cast<int64_t>(queue_.size()));
  }
  return taken;
}

void Scheduler::ExecutorLoop() {
  while (true) {
    std::unique_ptr<Task> first;
    std::vector<std::unique_ptr<Task>> company;
    std::string key;
    std::vector<std::unique_ptr<Task>> expired, cancelled;
    {
      core::MutexLock lock(&mu_);
      while (!stopping_ && queue_.empty()) work_.Wait(&mu_);
      if (queue_.empty()) return;  // stopping
      const absl::Time now = absl::Now();
      first = std::move(queue_.front());
      queue_.pop_front();
      if (first->queue_deadline <= now) {
        expired.push_back(std::move(first));
      } else if (first->Cancelled()) {
        cancelled.push_back(std::move(first));
      } else {
        Dequeued(*first, now);
        key = first->batch_key();
        if (!key.empty()) {
          const int64_t room = options_.max_batch_queries - first->queries();
          company = TakeKeyed(key, room);
          if (options_.max_batch_delay > absl::ZeroDuration()) {
            int64_t have = first->queries();
            for (const auto& t : company) have += t->queries();
            const absl::Time until = now + options_.max_batch_delay;
            while (have < options_.max_batch_queries && !stopping_ &&
                   work_.WaitWithDeadline(&mu_, until)) {
              for (auto& t : TakeKeyed(key, options_.max_batch_queries - have)) {
                have += t->queries();
                company.push_back(std::move(t));
              }
            }
          }
        }
      }
    }
    RejectDropped(std::move(expired), std::move(cancelled));
    if (first == nullptr) continue;
    Batch batch(this, key);
    int64_t queries = first->queries();
    Task* lead = first.get();
    batch.Add(std::move(first));
    for (auto& t : company) {
      queries += t->queries();
      batch.Add(std::move(t));
    }
    if (hooks_.batch && !key.empty()) {
      hooks_.batch(queries, static_cast<int64_t>(batch.tasks().size()));
    }
    try {
      lead->Run(batch);
    } catch (const std::exception& e) {
      // Tasks answer their own errors; this is the last line of defence.
      std::fprintf(stderr, "engramd: a compute task threw: %s\n", e.what());
    } catch (...) {
      std::fprintf(stderr, "engramd: a compute task threw\n");
    }
  }
}

void Scheduler::TimerLoop() {
  while (true) {
    std::vector<std::unique_ptr<Task>> expired, cancelled;
    {
      core::MutexLock lock(&mu_);
      if (stopping_) return;
      const absl::Time now = absl::Now();
      absl::Time next = absl::InfiniteFuture();
      for (auto it = queue_.begin(); it != queue_.end();) {
        Task& t = **it;
        if (t.queue_deadline <= now) {
          expired.push_back(std::move(*it));
          it = queue_.erase(it);
        } else if (t.Cancelled()) {
          cancelled.push_back(std::move(*it));
          it = queue_.erase(it);
        } else {
          next = std::min(next, t.queue_deadline);
          ++it;
        }
      }
      if (expired.empty() && cancelled.empty()) {
        if (!queue_.empty()) next = std::min(next, now + kCancelPoll);
        if (next == absl::InfiniteFuture()) {
          timer_.Wait(&mu_);
        } else {
          timer_.WaitWithDeadline(&mu_, next);
        }
        continue;
      }
      if (hooks_.queue_depth) hooks_.queue_depth(static_cast<int64_t>(queue_.size()));
    }
    RejectDropped(std::move(expired), std::move(cancelled));
  }
}

}  // namespace engram::server
