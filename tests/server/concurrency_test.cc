// Store, Retrieve, Sample, GetPatterns and DeleteBank on the same bank from
// many threads through a real server: no crash, only the documented codes,
// and no reader ever sees part of a batch. And the Retrieve batcher under
// many threads and keys.
#include <atomic>
#include <filesystem>
#include <random>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "engram/v1/engram.grpc.pb.h"
#include "server/batcher.h"
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

// Many threads batching on many keys with a leader delay: every call runs
// exactly once (whether it was in the first batch or joined a running one),
// in a batch of its own key, and gets its own status. Other
// keys are inserted while a leader waits, which rehashes the queue map (a
// leader that kept a pointer into it across the wait would read freed
// memory under ASan).
TEST(Concurrency, BatcherWithDelayRunsEveryCallOnceAcrossManyKeys) {
  RetrieveBatcher batcher({.max_batch = 8, .max_delay = absl::Microseconds(300)});
  constexpr int kThreads = 8, kCalls = 60, kKeys = 40;
  std::atomic<int> wrong_key{0}, wrong_status{0};
  std::vector<std::atomic<int>> runs(kThreads * kCalls);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < kCalls; ++i) {
        const int id = t * kCalls + i;
        const std::string key = "k" + std::to_string(rng() % kKeys);
        RetrieveBatcher::Call call;
        call.queries = 1 + static_cast<int>(rng() % 3);
        std::pair<int, std::string> mine{id, key};
        call.payload = &mine;
        absl::Status s = batcher.Run(key, &call, [&](absl::Span<RetrieveBatcher::Call* const> calls,
                                                     const auto& complete, const auto& take_more) {
          auto run = [&](RetrieveBatcher::Call* c) {
            auto* p = static_cast<std::pair<int, std::string>*>(c->payload);
            if (p->second != key) ++wrong_key;
            ++runs[p->first];
            c->status = absl::InternalError(std::to_string(p->first));
          };
          for (RetrieveBatcher::Call* c : calls) run(c);
          // Continuous batching: calls queued meanwhile join this batch;
          // some are answered at once, the rest when the batch returns.
          for (int round = 0; round < 3; ++round) {
            for (RetrieveBatcher::Call* c : take_more(8)) {
              run(c);
              if (round == 1) complete(c);
            }
          }
        });
        if (s.message() != std::to_string(id)) ++wrong_status;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(wrong_key.load(), 0);
  EXPECT_EQ(wrong_status.load(), 0);
  for (int id = 0; id < kThreads * kCalls; ++id) EXPECT_EQ(runs[id].load(), 1) << "call " << id;
}

}  // namespace
}  // namespace engram::server
