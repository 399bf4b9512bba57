// Store, Retrieve, Sample, GetPatterns and DeleteBank on the same bank from
// many threads through a real server: no crash, only the documented codes,
// and no reader ever sees part of a batch. And the compute scheduler: its
// bounded queue, queue deadlines, fixed threads and keyed batches.
#include <atomic>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "engram/v1/engram.grpc.pb.h"
#include "server/scheduler.h"
#include "server/server.h"

namespace engram::server {
namespace {

constexpr int kDim = 32;
constexpr int kBatch = 7;

TEST(Concurrency, MixedTrafficOnOneBankSeesWholeBatchesOnly) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("engram_concurrency_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  ServerConfig config;
  config.listen = "127.0.0.1:0";
  config.data_dir = dir.string();
  config.metrics_listen = "";
  auto server = EngramServer::Start(config);
  ASSERT_TRUE(server.ok()) << server.status();
  auto channel = (*server)->InProcessChannel();

  auto create = [&] {
    auto stub = v1::MemoryService::NewStub(channel);
    grpc::ClientContext ctx;
    v1::CreateBankRequest req;
    req.set_name("shared");
    req.set_dim(kDim);
    req.set_kind(v1::STATE_KIND_CONTINUOUS);
    req.mutable_energy()->set_family(v1::ENERGY_FAMILY_GAUSSIAN);
    v1::BankInfo info;
    return stub->CreateBank(&ctx, req, &info).error_code();
  };
  ASSERT_EQ(create(), grpc::OK);

  std::atomic<bool> stop{false};
  std::atomic<int> torn{0}, unexpected{0}, stores{0}, reads{0};
  auto expect_code = [&](grpc::StatusCode code) {
    // NOT_FOUND while the bank is deleted; FAILED_PRECONDITION on an empty
    // bank; ALREADY_EXISTS when two threads recreate it.
    if (code != grpc::OK && code != grpc::NOT_FOUND && code != grpc::FAILED_PRECONDITION &&
        code != grpc::ALREADY_EXISTS) {
      ++unexpected;
    }
  };
  std::vector<std::thread> threads;
  for (int w = 0; w < 3; ++w) {
    threads.emplace_back([&, w] {
      auto stub = v1::MemoryService::NewStub(channel);
      std::mt19937_64 rng(w);
      std::normal_distribution<float> g;
      for (uint64_t batch = 0; !stop; ++batch) {
        v1::StoreRequest req;
        req.set_bank("shared");
        for (int i = 0; i < kBatch; ++i) {
          req.add_ids((uint64_t{static_cast<unsigned>(w)} << 40) | (batch << 8) | i);
          for (int d = 0; d < kDim; ++d) req.add_patterns(g(rng));
        }
        grpc::ClientContext ctx;
        v1::StoreResponse resp;
        auto s = stub->Store(&ctx, req, &resp);
        expect_code(s.error_code());
        if (s.ok()) ++stores;
      }
    });
  }
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&] {
      auto stub = v1::MemoryService::NewStub(channel);
      while (!stop) {
        grpc::ClientContext ctx;
        v1::GetPatternsRequest req;
        req.set_bank("shared");
        req.set_page_size(65536);
        v1::GetPatternsResponse resp;
        auto s = stub->GetPatterns(&ctx, req, &resp);
        expect_code(s.error_code());
        if (!s.ok()) continue;
        std::map<uint64_t, int> per_batch;
        for (uint64_t id : resp.ids()) ++per_batch[id >> 8];
        for (auto& [b, n] : per_batch) {
          if (n != kBatch) ++torn;
        }
        if (resp.patterns_size() != resp.ids_size() * kDim) ++torn;
        ++reads;
      }
    });
  }
  threads.emplace_back([&] {
    auto stub = v1::MemoryService::NewStub(channel);
    std::vector<float> q(kDim, 0.1f);
    while (!stop) {
      grpc::ClientContext ctx;
      v1::RetrieveRequest req;
      req.set_bank("shared");
      req.mutable_queries()->Add(q.begin(), q.end());
      v1::RetrieveResponse resp;
      expect_code(stub->Retrieve(&ctx, req, &resp).error_code());
      grpc::ClientContext sctx;
      v1::SampleRequest sreq;
      sreq.set_bank("shared");
      sreq.set_count(2);
      sreq.mutable_schedule()->set_steps(4);
      v1::SampleResponse sresp;
      expect_code(stub->Sample(&sctx, sreq, &sresp).error_code());
    }
  });
  threads.emplace_back([&] {
    auto stub = v1::MemoryService::NewStub(channel);
    for (int i = 0; i < 20 && !stop; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(40));
      grpc::ClientContext ctx;
      v1::DeleteBankRequest req;
      req.set_name("shared");
      v1::DeleteBankResponse resp;
      expect_code(stub->DeleteBank(&ctx, req, &resp).error_code());
      expect_code(create());
    }
  });
  std::this_thread::sleep_for(std::chrono::seconds(2));
  stop = true;
  for (auto& t : threads) t.join();
  EXPECT_EQ(torn.load(), 0);
  EXPECT_EQ(unexpected.load(), 0);
  EXPECT_GT(stores.load(), 10);
  EXPECT_GT(reads.load(), 10);
  server->reset();
  std::filesystem::remove_all(dir);
}

// Threads of this process, from /proc/self/task.
// Threads of this process named `name` or `name`-timer (a scheduler's pool
// and timer). Counted by name: a sanitizer's runtime starts threads of its
// own at times of its choosing.
int PoolThreads(const std::string& name) {
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream comm(e.path() / "comm");
    std::string line;
    std::getline(comm, line);
    n += line == name || line == name + "-timer";
  }
  return n;
}

// PoolThreads once it reaches `want`, waiting up to 5 s: a joined thread's
// /proc entry may outlive the join by a moment.
int PoolThreadsSettled(const std::string& name, int want) {
  int n = PoolThreads(name);
  for (int spin = 0; n != want && spin < 500; ++spin) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    n = PoolThreads(name);
  }
  return n;
}

// A task that records how it ended and, when `gate` is set, blocks its
// executor until the gate opens.
struct Probe {
  core::Mutex mu;
  core::CondVar cv;
  bool open = false;
  std::atomic<int> running{0}, ran{0}, rejected{0};
  std::vector<absl::StatusCode> codes ABSL_GUARDED_BY(mu);
  void Open() {
    core::MutexLock lock(&mu);
    open = true;
    cv.SignalAll();
  }
};
class ProbeTask : public Scheduler::Task {
 public:
  ProbeTask(Probe* p, bool gate) : p_(p), gate_(gate) {}
  void Run(Scheduler::Batch&) override {
    ++p_->running;
    if (gate_) {
      core::MutexLock lock(&p_->mu);
      while (!p_->open) p_->cv.Wait(&p_->mu);
    }
    ++p_->ran;
  }
  void Reject(const absl::Status& s) override {
    core::MutexLock lock(&p_->mu);
    p_->codes.push_back(s.code());
    ++p_->rejected;
  }

 private:
  Probe* p_;
  bool gate_;
};

// With P executors busy and Q calls queued, every further call is rejected
// at once with RESOURCE_EXHAUSTED; the rest run; the scheduler's threads are
// P + 1 (the timer) whatever the load, none per call.
TEST(Scheduler, FullQueueRejectsTheExcessAtOnceWithFixedThreads) {
  constexpr int kPool = 3, kQueue = 5, kExcess = 40;
  EXPECT_EQ(PoolThreads("probe"), 0);
  Probe probe;
  {
    Scheduler scheduler({.name = "probe", .threads = kPool, .max_queue = kQueue});
    EXPECT_EQ(PoolThreads("probe"), kPool + 1);
    for (int i = 0; i < kPool; ++i) scheduler.Submit(std::make_unique<ProbeTask>(&probe, true));
    for (int spin = 0; probe.running.load() < kPool && spin < 20000; ++spin) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ASSERT_EQ(probe.running.load(), kPool);
    for (int i = 0; i < kQueue; ++i) scheduler.Submit(std::make_unique<ProbeTask>(&probe, true));
    EXPECT_EQ(scheduler.queued(), kQueue);
    for (int i = 0; i < kExcess; ++i) scheduler.Submit(std::make_unique<ProbeTask>(&probe, false));
    // Rejected inside Submit: no waiting needed.
    EXPECT_EQ(probe.rejected.load(), kExcess);
    EXPECT_EQ(PoolThreads("probe"), kPool + 1);
    probe.Open();
    for (int spin = 0; probe.ran.load() < kPool + kQueue && spin < 20000; ++spin) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    EXPECT_EQ(probe.ran.load(), kPool + kQueue);
    core::MutexLock lock(&probe.mu);
    for (absl::StatusCode c : probe.codes) EXPECT_EQ(c, absl::StatusCode::kResourceExhausted);
  }
  EXPECT_EQ(PoolThreadsSettled("probe", 0), 0);
}

// A call whose queue deadline passes while every executor is busy is
// answered DEADLINE_EXCEEDED by the timer, without running and without
// waiting for an executor.
TEST(Scheduler, DeadlinePassedInTheQueueIsAnsweredWithoutRunning) {
  Probe probe;
  Scheduler scheduler({.threads = 1, .max_queue = 8});
  scheduler.Submit(std::make_unique<ProbeTask>(&probe, true));
  auto late = std::make_unique<ProbeTask>(&probe, false);
  late->queue_deadline = absl::Now() + absl::Milliseconds(30);
  scheduler.Submit(std::move(late));
  for (int spin = 0; probe.rejected.load() < 1 && spin < 20000; ++spin) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(probe.rejected.load(), 1);
  EXPECT_EQ(probe.ran.load(), 0);  // the executor is still held by the first
  {
    core::MutexLock lock(&probe.mu);
    ASSERT_EQ(probe.codes.size(), 1u);
    EXPECT_EQ(probe.codes[0], absl::StatusCode::kDeadlineExceeded);
  }
  probe.Open();
}

// Many threads submitting keyed tasks over many keys, with a batch delay
// and continuous batching: every task runs exactly once, in a batch of its
// own key, and batches never exceed max_batch_queries.
class KeyedTask : public Scheduler::Task {
 public:
  KeyedTask(std::string key, int queries, std::vector<std::atomic<int>>* runs, int id,
            std::atomic<int>* wrong, int64_t max_queries)
      : key_(std::move(key)), queries_(queries), runs_(runs), id_(id), wrong_(wrong),
        max_(max_queries) {}
  std::string batch_key() const override { return key_; }
  int64_t queries() const override { return queries_; }
  void Run(Scheduler::Batch& batch) override {
    int64_t running = 0;
    auto run = [&](Scheduler::Task* t) {
      auto* k = static_cast<KeyedTask*>(t);
      if (k->key_ != key_ || batch.key() != key_) ++*wrong_;
      ++(*runs_)[k->id_];
      running += k->queries_;
    };
    for (Scheduler::Task* t : batch.tasks()) run(t);
    if (running > max_) ++*wrong_;
    for (int round = 0; round < 3; ++round) {
      // Answer (release) half of what runs, then let queued tasks join.
      // The lead (this) stays: Run still reads its members.
      std::vector<Scheduler::Task*> now(batch.tasks());
      for (size_t i = 1; i < now.size(); i += 2) {
        running -= static_cast<KeyedTask*>(now[i])->queries_;
        batch.Release(now[i]);
      }
      for (Scheduler::Task* t : batch.TakeMore(max_ - running)) run(t);
      if (running > max_) ++*wrong_;
    }
  }
  void Reject(const absl::Status&) override { ++*wrong_; }

 private:
  std::string key_;
  int queries_;
  std::vector<std::atomic<int>>* runs_;
  int id_;
  std::atomic<int>* wrong_;
  int64_t max_;
};

TEST(Scheduler, KeyedTasksRunOnceInBatchesOfTheirKey) {
  constexpr int kThreads = 8, kCalls = 60, kKeys = 40, kMax = 8;
  std::vector<std::atomic<int>> runs(kThreads * kCalls);
  std::atomic<int> wrong{0};
  {
    Scheduler scheduler({.threads = 2, .max_queue = kThreads * kCalls, .max_batch_queries = kMax,
                         .max_batch_delay = absl::Microseconds(300)});
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937 rng(t);
        for (int i = 0; i < kCalls; ++i) {
          scheduler.Submit(std::make_unique<KeyedTask>("k" + std::to_string(rng() % kKeys),
                                                       1 + static_cast<int>(rng() % 3), &runs,
                                                       t * kCalls + i, &wrong, kMax));
        }
      });
    }
    for (auto& th : threads) th.join();
    for (int spin = 0; scheduler.queued() > 0 && spin < 20000; ++spin) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }  // Shutdown waits for the running batches
  EXPECT_EQ(wrong.load(), 0);
  for (int id = 0; id < kThreads * kCalls; ++id) EXPECT_EQ(runs[id].load(), 1) << "call " << id;
}

}  // namespace
}  // namespace engram::server
