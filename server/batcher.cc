#include "server/batcher.h"

#include <vector>

namespace engram::server {

absl::Status RetrieveBatcher::Run(const std::string& key, Call* call, const Executor& execute) {
  std::vector<Call*> batch;
  {
    core::MutexLock lock(&mu_);
    Queue& q = queues_[key];
    q.pending.push_back(call);
    if (!q.leader_active) {
      q.leader_active = true;
      call->lead = true;
    }
    changed_.SignalAll();  // a leader waiting for company counts again
    // Wait to be run by someone else's batch, or to lead one.
    while (!call->done && !call->lead) changed_.Wait(&mu_);
    if (call->done) return call->status;
    // Leader: give concurrent calls max_delay to join, unless the queue is
    // already full. The queue is looked up again after every wait: other
    // keys inserted meanwhile can move it (flat_hash_map rehash).
    if (options_.max_delay > absl::ZeroDuration()) {
      auto full = [&] {
        int64_t n = 0;
        for (const Call* c : queues_[key].pending) n += c->queries;
        return n >= options_.max_batch;
      };
      const absl::Time deadline = absl::Now() + options_.max_delay;
      while (!full() && changed_.WaitWithDeadline(&mu_, deadline)) {
      }
    }
    // Take the oldest calls, up to max_batch queries (at least our own).
    Queue& qq = queues_[key];
    int64_t queries = 0;
    for (auto it = qq.pending.begin(); it != qq.pending.end();) {
      Call* c = *it;
      if (c != call && queries + c->queries > options_.max_batch) {
        ++it;
        continue;
      }
      queries += c->queries;
      batch.push_back(c);
      it = qq.pending.erase(it);
    }
  }
  if (observer_) {
    int64_t queries = 0;
    for (const Call* c : batch) queries += c->queries;
    observer_(queries, static_cast<int64_t>(batch.size()));
  }
  // Calls answered early leave `open`: their callers may return (and free
  // the Call) at once, so nothing below touches them again.
  std::vector<Call*> open = batch;
  auto complete = [&](Call* c) {
    core::MutexLock lock(&mu_);
    for (Call*& o : open) {
      if (o == c) o = nullptr;
    }
    if (c != call) {  // the leader itself returns after the batch
      c->done = true;
      changed_.SignalAll();
    }
  };
  auto take_more = [&](int64_t max_queries) {
    std::vector<Call*> more;
    int64_t queries = 0;
    {
      core::MutexLock lock(&mu_);
      auto it = queues_.find(key);
      if (it == queues_.end()) return more;
      std::deque<Call*>& pending = it->second.pending;
      while (!pending.empty() && queries + pending.front()->queries <= max_queries) {
        queries += pending.front()->queries;
        more.push_back(pending.front());
        open.push_back(pending.front());
        pending.pop_front();
      }
    }
    if (observer_ && !more.empty()) observer_(queries, static_cast<int64_t>(more.size()));
    return more;
  };
  execute(batch, complete, take_more);
  core::MutexLock lock(&mu_);
  for (Call* c : open) {
    if (c != nullptr) c->done = true;
  }
  Queue& q = queues_[key];
  if (q.pending.empty()) {
    queues_.erase(key);  // no state kept for idle keys
  } else {
    q.pending.front()->lead = true;  // hand over to the oldest waiting call
  }
  changed_.SignalAll();
  return call->status;
}

}  // namespace engram::server
