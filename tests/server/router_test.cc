// A bank held in shards behind a router answers as one node holding the
// whole bank: three shard nodes and a router (engramd --role=router, in
// process, on loopback ports) against a single node with the same patterns
// and ids. Energies, gradients, value readouts and sync retrieval (final
// state, energies, steps, stop reason, nearest memory) agree up to float
// reassociation, for every family with a partial form and every precision,
// with and without a filter. Writes route by id and fail clean; a shard
// that is down fails the call UNAVAILABLE naming it.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <atomic>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include "engram/shard/v1/shard.grpc.pb.h"
#include "engram/v1/engram.grpc.pb.h"
#include "server/router.h"
#include "server/server.h"

namespace engram::server {
namespace {

constexpr int kShards = 3;
constexpr int kDim = 24;
constexpr int kValueDim = 3;
constexpr int kPatterns = 150;

struct Family {
  std::string name;
  v1::StateKind kind;
  v1::Precision precision;
  v1::EnergyConfig energy;
};

v1::EnergyConfig Energy(v1::EnergyFamily family, double beta, v1::Similarity sim = {},
                        v1::Separation sep = {}, uint32_t degree = 0) {
  v1::EnergyConfig e;
  e.set_family(family);
  e.set_beta(beta);
  e.set_similarity(sim);
  e.set_separation(sep);
  e.set_degree(degree);
  return e;
}

std::vector<Family> Families() {
  std::vector<Family> f;
  for (v1::Precision p : {v1::PRECISION_F32, v1::PRECISION_BF16, v1::PRECISION_F32_SCREENED}) {
    const std::string suffix = p == v1::PRECISION_F32 ? "f32" : p == v1::PRECISION_BF16 ? "bf16"
                                                                                      : "screened";
    f.push_back({"lse_" + suffix, v1::STATE_KIND_CONTINUOUS, p,
                 Energy(v1::ENERGY_FAMILY_LSE, 8.0)});
    f.push_back({"gaussian_" + suffix, v1::STATE_KIND_CONTINUOUS, p,
                 Energy(v1::ENERGY_FAMILY_GAUSSIAN, 6.0)});
    f.push_back({"softmax_l2_" + suffix, v1::STATE_KIND_CONTINUOUS, p,
                 Energy(v1::ENERGY_FAMILY_GENERAL, 5.0, v1::SIMILARITY_NEG_HALF_SQ_L2,
                        v1::SEPARATION_SOFTMAX)});
    f.push_back({"poly3_dot_" + suffix, v1::STATE_KIND_CONTINUOUS, p,
                 Energy(v1::ENERGY_FAMILY_GENERAL, 1.0, v1::SIMILARITY_DOT,
                        v1::SEPARATION_POLYNOMIAL, 3)});
    // Weights that depend on every row: max, log-sum-ReLU, and the sparse
    // separations' two rounds (candidates, then the whole bank's threshold).
    f.push_back({"max_l2_" + suffix, v1::STATE_KIND_CONTINUOUS, p,
                 Energy(v1::ENERGY_FAMILY_GENERAL, 1.0, v1::SIMILARITY_NEG_HALF_SQ_L2,
                        v1::SEPARATION_MAX)});
    f.push_back({"sparsemax_dot_" + suffix, v1::STATE_KIND_CONTINUOUS, p,
                 Energy(v1::ENERGY_FAMILY_GENERAL, 8.0, v1::SIMILARITY_DOT,
                        v1::SEPARATION_SPARSEMAX)});
    f.push_back({"entmax15_l2_" + suffix, v1::STATE_KIND_CONTINUOUS, p,
                 Energy(v1::ENERGY_FAMILY_GENERAL, 6.0, v1::SIMILARITY_NEG_HALF_SQ_L2,
                        v1::SEPARATION_ENTMAX15)});
    f.push_back({"lsr_l2_" + suffix, v1::STATE_KIND_CONTINUOUS, p,
                 Energy(v1::ENERGY_FAMILY_GENERAL, 1.5, v1::SIMILARITY_NEG_HALF_SQ_L2,
                        v1::SEPARATION_LOG_SUM_RELU)});
    // The L1 similarity: gradients from the rows' signs.
    f.push_back({"softmax_l1_" + suffix, v1::STATE_KIND_CONTINUOUS, p,
                 Energy(v1::ENERGY_FAMILY_GENERAL, 1.0, v1::SIMILARITY_NEG_L1,
                        v1::SEPARATION_SOFTMAX)});
    f.push_back({"sparsemax_l1_" + suffix, v1::STATE_KIND_CONTINUOUS, p,
                 Energy(v1::ENERGY_FAMILY_GENERAL, 0.5, v1::SIMILARITY_NEG_L1,
                        v1::SEPARATION_SPARSEMAX)});
  }
  for (v1::Precision p : {v1::PRECISION_F32, v1::PRECISION_BIT_PACKED}) {
    const std::string suffix = p == v1::PRECISION_F32 ? "f32" : "bits";
    f.push_back({"bipolar_softmax_" + suffix, v1::STATE_KIND_BIPOLAR, p,
                 Energy(v1::ENERGY_FAMILY_GENERAL, 0.5, v1::SIMILARITY_DOT,
                        v1::SEPARATION_SOFTMAX)});
    f.push_back({"classical_" + suffix, v1::STATE_KIND_BIPOLAR, p,
                 Energy(v1::ENERGY_FAMILY_CLASSICAL, 1.0)});
    // Sync steps on each neuron's Krotov-Hopfield drive.
    f.push_back({"bipolar_poly3_" + suffix, v1::STATE_KIND_BIPOLAR, p,
                 Energy(v1::ENERGY_FAMILY_POLYNOMIAL, 1.0, {}, {}, 3)});
    f.push_back({"bipolar_poly4_" + suffix, v1::STATE_KIND_BIPOLAR, p,
                 Energy(v1::ENERGY_FAMILY_POLYNOMIAL, 1.0, {}, {}, 4)});
    f.push_back({"bipolar_exponential_" + suffix, v1::STATE_KIND_BIPOLAR, p,
                 Energy(v1::ENERGY_FAMILY_EXPONENTIAL, 0.1)});
    f.push_back({"bipolar_lse_" + suffix, v1::STATE_KIND_BIPOLAR, p,
                 Energy(v1::ENERGY_FAMILY_LSE, 0.5)});
    f.push_back({"bipolar_gaussian_" + suffix, v1::STATE_KIND_BIPOLAR, p,
                 Energy(v1::ENERGY_FAMILY_GAUSSIAN, 0.5)});
  }
  return f;
}

class RouterTest : public ::testing::Test {
 public:
  void SetUp() override {
    root_ = std::filesystem::temp_directory_path() /
            ("engram_router_test_" + std::to_string(::getpid()) + "_" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(root_);
    std::vector<std::string> addresses;
    for (int i = 0; i <= kShards; ++i) {
      ServerConfig c;
      c.listen = "127.0.0.1:0";
      c.data_dir = (root_ / ("node" + std::to_string(i))).string();
      c.metrics_listen = "";
      c.expire_interval = absl::ZeroDuration();
      c.clock_ms = [this] { return now_ms_.load(); };
      auto s = EngramServer::Start(c);
      ASSERT_TRUE(s.ok()) << s.status();
      nodes_.push_back(std::move(*s));
      if (i < kShards) addresses.push_back("127.0.0.1:" + std::to_string(nodes_.back()->port()));
    }
    whole_ = v1::MemoryService::NewStub(nodes_[kShards]->InProcessChannel());
    ServerConfig rc;
    rc.role = "router";
    rc.shards = addresses;
    rc.listen = "127.0.0.1:0";
    rc.metrics_listen = "";
    rc.clock_ms = [this] { return now_ms_.load(); };
    auto r = EngramServer::Start(rc);
    ASSERT_TRUE(r.ok()) << r.status();
    router_server_ = std::move(*r);
    router_ = v1::MemoryService::NewStub(grpc::CreateChannel(
        "127.0.0.1:" + std::to_string(router_server_->port()), grpc::InsecureChannelCredentials()));
    shard0_ = v1::MemoryService::NewStub(nodes_[0]->InProcessChannel());
  }
  void TearDown() override {
    router_server_.reset();
    nodes_.clear();
    std::filesystem::remove_all(root_);
  }

  // The same bank on the router and on the whole node, with the same
  // patterns, ids, values and labels (g = row % 3).
  void Fill(const Family& f, std::mt19937_64& rng) {
    v1::CreateBankRequest create;
    create.set_name(f.name);
    create.set_dim(kDim);
    create.set_kind(f.kind);
    create.set_precision(f.precision);
    *create.mutable_energy() = f.energy;
    create.set_value_dim(kValueDim);
    v1::BankInfo info;
    {
      grpc::ClientContext c;
      ASSERT_TRUE(router_->CreateBank(&c, create, &info).ok());
    }
    {
      grpc::ClientContext c;
      ASSERT_TRUE(whole_->CreateBank(&c, create, &info).ok());
    }
    v1::StoreRequest store;
    store.set_bank(f.name);
    std::normal_distribution<float> g(0.f, 1.f / std::sqrt(float{kDim}));
    std::uniform_int_distribution<int> coin(0, 1);
    for (int r = 0; r < kPatterns; ++r) {
      for (int i = 0; i < kDim; ++i) {
        store.add_patterns(f.kind == v1::STATE_KIND_BIPOLAR ? (coin(rng) ? 1.f : -1.f) : g(rng));
      }
      for (int v = 0; v < kValueDim; ++v) store.add_values(g(rng));
      store.add_payloads("p" + std::to_string(r));
      (*store.add_labels()->mutable_ints())["g"] = r % 3;
    }
    v1::StoreResponse stored;
    {
      grpc::ClientContext c;
      grpc::Status s = router_->Store(&c, store, &stored);
      ASSERT_TRUE(s.ok()) << s.error_message();
    }
    ASSERT_EQ(stored.ids_size(), kPatterns);
    EXPECT_EQ(stored.bank_patterns(), uint64_t{kPatterns});
    *store.mutable_ids() = stored.ids();
    {
      grpc::ClientContext c;
      ASSERT_TRUE(whole_->Store(&c, store, &stored).ok());
    }
  }

  // Queries near stored patterns (bipolar: a few flips).
  // The same call on the single node and through the router, both OK.
  template <typename Req, typename Resp>
  void Both(grpc::Status (v1::MemoryService::Stub::*call)(grpc::ClientContext*, const Req&,
                                                         Resp*),
            const Req& req, Resp* one, Resp* sharded) {
    for (auto [stub, out] : {std::pair{whole_.get(), one}, std::pair{router_.get(), sharded}}) {
      grpc::ClientContext c;
      grpc::Status s = (stub->*call)(&c, req, out);
      ASSERT_TRUE(s.ok()) << s.error_message();
    }
  }

  std::vector<float> Queries(const Family& f, int count, std::mt19937_64& rng) {
    v1::GetPatternsRequest get;
    get.set_bank(f.name);
    v1::GetPatternsResponse got;
    grpc::ClientContext c;
    EXPECT_TRUE(whole_->GetPatterns(&c, get, &got).ok());
    std::vector<float> q;
    std::uniform_int_distribution<int> row(0, got.ids_size() - 1), unit(0, kDim - 1);
    std::normal_distribution<float> noise(0.f, 0.25f / std::sqrt(float{kDim}));
    for (int j = 0; j < count; ++j) {
      const int r = row(rng);
      std::vector<float> x(got.patterns().begin() + r * kDim,
                           got.patterns().begin() + (r + 1) * kDim);
      if (f.kind == v1::STATE_KIND_BIPOLAR) {
        for (int k = 0; k < 3; ++k) x[unit(rng)] *= -1.f;
      } else {
        for (float& v : x) v += noise(rng);
      }
      q.insert(q.end(), x.begin(), x.end());
    }
    return q;
  }

  std::filesystem::path root_;
  std::vector<std::unique_ptr<EngramServer>> nodes_;  // shards 0..2, then the whole node
  std::unique_ptr<EngramServer> router_server_;
  std::unique_ptr<v1::MemoryService::Stub> router_, whole_, shard0_;
  std::atomic<int64_t> now_ms_{1'700'000'000'000};  // every node's clock
};

double Tol(double scale) { return 2e-4 * std::max(1.0, std::abs(scale)); }

TEST_F(RouterTest, ShardedBanksAnswerEnergyAndRetrieveAsOneNode) {
  std::mt19937_64 rng(7);
  for (const Family& f : Families()) {
    SCOPED_TRACE(f.name);
    // Float reassociation, relative: 2e-4; the polynomial families' plain
    // sums of d^3 and d^4 terms of both signs cancel, so their rounding
    // is a larger part of the result: 2e-3.
    const double rel = f.energy.family() == v1::ENERGY_FAMILY_POLYNOMIAL ? 2e-3 : 2e-4;
    auto Tol = [rel](double scale) { return rel * std::max(1.0, std::abs(scale)); };
    Fill(f, rng);
    if (HasFailure()) return;
    // The patterns split over every shard.
    for (int i = 0; i < kShards; ++i) {
      v1::GetBankRequest get;
      get.set_name(f.name);
      v1::BankInfo info;
      grpc::ClientContext c;
      auto stub = v1::MemoryService::NewStub(nodes_[i]->InProcessChannel());
      ASSERT_TRUE(stub->GetBank(&c, get, &info).ok());
      EXPECT_GT(info.patterns(), 0u) << "shard " << i;
    }
    const std::vector<float> queries = Queries(f, 6, rng);
    for (bool filtered : {false, true}) {
      SCOPED_TRACE(filtered ? "filter g in {0, 2}" : "no filter");
      v1::Filter filter;
      if (filtered) {
        v1::Condition* cond = filter.add_conditions();
        cond->set_key("g");
        cond->mutable_int_any_of()->add_values(0);
        cond->mutable_int_any_of()->add_values(2);
      }
      v1::EnergyRequest e;
      e.set_bank(f.name);
      e.mutable_states()->Add(queries.begin(), queries.end());
      e.set_return_gradient(true);
      *e.mutable_filter() = filter;
      v1::EnergyResponse one, sharded;
      ASSERT_NO_FATAL_FAILURE(Both(&v1::MemoryService::Stub::Energy, e, &one, &sharded));
      ASSERT_EQ(sharded.energies_size(), one.energies_size());
      for (int j = 0; j < one.energies_size(); ++j) {
        EXPECT_NEAR(sharded.energies(j), one.energies(j), Tol(one.energies(j))) << "state " << j;
      }
      ASSERT_EQ(sharded.gradients_size(), one.gradients_size());
      for (int j = 0; j < one.gradients_size(); ++j) {
        EXPECT_NEAR(sharded.gradients(j), one.gradients(j), Tol(one.gradients(j))) << j;
      }
      ASSERT_EQ(sharded.values_size(), one.values_size());
      for (int j = 0; j < one.values_size(); ++j) {
        EXPECT_NEAR(sharded.values(j), one.values(j), Tol(one.values(j))) << j;
      }

      for (v1::Dynamics dynamics : {v1::DYNAMICS_SYNC, v1::DYNAMICS_GRADIENT,
                                    v1::DYNAMICS_ASYNC, v1::DYNAMICS_TINYBRAIN}) {
      SCOPED_TRACE(v1::Dynamics_Name(dynamics));
      // Gradient steps leave the hypercube: continuous banks only; async
      // flips are for bipolar banks only.
      if (dynamics == v1::DYNAMICS_GRADIENT && f.kind == v1::STATE_KIND_BIPOLAR) continue;
      if (dynamics == v1::DYNAMICS_ASYNC && f.kind != v1::STATE_KIND_BIPOLAR) continue;
      // The L1 gradient is a sum of signs: descent ends stepping across the
      // kinks at pattern coordinates, where a rounding-level difference
      // flips a sign and moves a coordinate by a whole step (on one node as
      // through a router). Its gradients are compared at the states above.
      if (dynamics == v1::DYNAMICS_GRADIENT &&
          f.energy.similarity() == v1::SIMILARITY_NEG_L1) {
        continue;
      }
        v1::RetrieveRequest r;
        r.set_bank(f.name);
        r.mutable_queries()->Add(queries.begin(), queries.end());
        r.mutable_options()->set_dynamics(dynamics);
        r.mutable_options()->set_alpha(0.05);
        // The unnormalised polynomial dynamics grow without bound: one step.
        const bool grows = f.energy.separation() == v1::SEPARATION_POLYNOMIAL;
        r.mutable_options()->set_max_steps(
            grows ? 1 : dynamics == v1::DYNAMICS_GRADIENT || dynamics == v1::DYNAMICS_TINYBRAIN ? 12 : 30);
        r.mutable_options()->set_tol(1e-5);
        r.mutable_options()->set_return_trace(true);
        *r.mutable_filter() = filter;
        v1::RetrieveResponse rone, rsharded;
        grpc::Status sone, ssharded;
        {
          grpc::ClientContext c;
          sone = whole_->Retrieve(&c, r, &rone);
        }
        {
          grpc::ClientContext c;
          ssharded = router_->Retrieve(&c, r, &rsharded);
        }
        ASSERT_TRUE(sone.ok()) << sone.error_message();
        ASSERT_TRUE(ssharded.ok()) << ssharded.error_message();
        ASSERT_EQ(rsharded.results_size(), rone.results_size());
        for (int q = 0; q < rone.results_size(); ++q) {
          const v1::RetrieveResult& a = rone.results(q);
          const v1::RetrieveResult& b = rsharded.results(q);
          SCOPED_TRACE("query " + std::to_string(q));
          EXPECT_EQ(b.stop_reason(), a.stop_reason());
          EXPECT_NEAR(b.steps(), a.steps(), 1);
          ASSERT_EQ(b.state_size(), a.state_size());
          for (int i = 0; i < a.state_size(); ++i) {
            // Relative: the unnormalised polynomial dynamics grow without bound.
            EXPECT_NEAR(b.state(i), a.state(i), 1e-3 * std::max(1.f, std::abs(a.state(i))))
                << "coordinate " << i;
          }
          EXPECT_NEAR(b.energy_start(), a.energy_start(), Tol(a.energy_start()));
          EXPECT_NEAR(b.energy_end(), a.energy_end(), Tol(a.energy_end()));
          EXPECT_NE(a.nearest().id(), 0u);
          EXPECT_NEAR(b.nearest().distance(), a.nearest().distance(),
                      1e-5 * std::max(1.0, a.nearest().distance()));
          if (b.nearest().id() != a.nearest().id()) {
            // Only a tie within float reassociation may resolve either way.
            EXPECT_NEAR(b.nearest().distance(), a.nearest().distance(),
                        1e-6 * std::max(1.0, a.nearest().distance()))
                << "nearest " << b.nearest().id() << " vs " << a.nearest().id();
          } else {
            EXPECT_EQ(b.nearest().payload(), a.nearest().payload());
          }
          ASSERT_EQ(b.value_size(), a.value_size());
          for (int v = 0; v < a.value_size(); ++v) {
            if (!std::isfinite(a.value(v))) {
              // A readout past float range is not finite on either path.
              EXPECT_FALSE(std::isfinite(b.value(v))) << v;
              continue;
            }
            EXPECT_NEAR(b.value(v), a.value(v), Tol(a.value(v)));
          }
          // Parallel sign updates need not descend (a bank this far past
          // its capacity can cycle): the same count as on the node.
          EXPECT_EQ(b.lyapunov_violations(), a.lyapunov_violations());
        }
      }
    }
  }
}

// Sampling through the router runs the same samplers with the same draws
// as a node, every denoiser evaluation merged from the shards: the samples
// end where the node's do, on the same memories, with the same classes.
// Concurrent SYNC Retrieves through the router run in shared batches (one
// stream per shard, one request per step for all their queries), and each
// answers as it does alone: the same steps, stop reasons and nearest
// memories, states equal up to float reassociation (1e-5; bipolar states
// exactly), whatever else is in the batch. A call made after a Store sees
// it, however busy the batches are.
TEST_F(RouterTest, ConcurrentSyncRetrievesShareBatchesAndAnswerAsAlone) {
  std::mt19937_64 rng(23);
  std::vector<Family> families;
  for (const Family& f : Families()) {
    if (f.name == "lse_f32" || f.name == "bipolar_lse_bits" || f.name == "classical_f32") {
      families.push_back(f);
    }
  }
  ASSERT_EQ(families.size(), 3u);
  for (const Family& f : families) {
    Fill(f, rng);
    if (HasFailure()) return;
  }
  // Each call: 1-3 queries of one bank, its own max_steps.
  struct Call {
    const Family* f;
    v1::RetrieveRequest req;
    v1::RetrieveResponse alone;
  };
  std::vector<Call> calls;
  for (int i = 0; i < 48; ++i) {
    Call c;
    c.f = &families[i % families.size()];
    const int count = 1 + i % 3;
    const std::vector<float> q = Queries(*c.f, count, rng);
    c.req.set_bank(c.f->name);
    c.req.mutable_queries()->Add(q.begin(), q.end());
    c.req.mutable_options()->set_dynamics(v1::DYNAMICS_SYNC);
    c.req.mutable_options()->set_max_steps(3 + i % 20);
    c.req.mutable_options()->set_tol(1e-5);
    c.req.mutable_options()->set_return_trace(true);
    grpc::ClientContext ctx;
    grpc::Status s = router_->Retrieve(&ctx, c.req, &c.alone);
    ASSERT_TRUE(s.ok()) << s.error_message();
    calls.push_back(std::move(c));
  }
  auto batch_counts = [&] {
    double batches = 0, in_batches = 0;
    for (const auto& family : router_server_->metrics()->registry()->Collect()) {
      if (family.name != "engram_batch_calls") continue;
      for (const auto& m : family.metric) {
        batches += static_cast<double>(m.histogram.sample_count);
        in_batches += m.histogram.sample_sum;
      }
    }
    return std::make_pair(batches, in_batches);
  };
  // A batch is counted once it ends, which may be just after its last call
  // was answered: wait (bounded) until the calls so far are all counted.
  auto settled = [&](double calls_counted) {
    for (int i = 0; i < 500 && batch_counts().second < calls_counted; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return batch_counts();
  };
  const auto before = settled(static_cast<double>(calls.size()));
  ASSERT_EQ(before.second, static_cast<double>(calls.size()));
  constexpr int kThreads = 8;
  std::vector<std::vector<v1::RetrieveResponse>> got(kThreads);
  std::vector<std::string> errors(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (size_t i = t; i < calls.size(); i += kThreads) {
        v1::RetrieveResponse out;
        grpc::ClientContext ctx;
        grpc::Status s = router_->Retrieve(&ctx, calls[i].req, &out);
        if (!s.ok()) errors[t] += s.error_message() + "; ";
        got[t].push_back(std::move(out));
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (int t = 0; t < kThreads; ++t) {
    ASSERT_EQ(errors[t], "");
    for (size_t j = 0; j < got[t].size(); ++j) {
      const Call& c = calls[t + j * kThreads];
      SCOPED_TRACE(c.f->name + " call " + std::to_string(t + j * kThreads));
      const v1::RetrieveResponse& b = got[t][j];
      ASSERT_EQ(b.results_size(), c.alone.results_size());
      for (int q = 0; q < b.results_size(); ++q) {
        const v1::RetrieveResult& x = c.alone.results(q);
        const v1::RetrieveResult& y = b.results(q);
        EXPECT_EQ(y.steps(), x.steps()) << "query " << q;
        EXPECT_EQ(y.stop_reason(), x.stop_reason()) << "query " << q;
        EXPECT_EQ(y.nearest().id(), x.nearest().id()) << "query " << q;
        ASSERT_EQ(y.state_size(), x.state_size());
        for (int i = 0; i < x.state_size(); ++i) {
          if (c.f->kind == v1::STATE_KIND_BIPOLAR) {
            EXPECT_EQ(y.state(i), x.state(i)) << "query " << q << " neuron " << i;
          } else {
            EXPECT_NEAR(y.state(i), x.state(i), 1e-5) << "query " << q << " coordinate " << i;
          }
        }
        ASSERT_EQ(y.value_size(), x.value_size());
        for (int v = 0; v < x.value_size(); ++v) EXPECT_NEAR(y.value(v), x.value(v), 1e-5);
      }
    }
  }
  const auto after = settled(before.second + static_cast<double>(calls.size()));
  const double batches = after.first - before.first;
  const double in_batches = after.second - before.second;
  EXPECT_EQ(in_batches, static_cast<double>(calls.size()));
  EXPECT_LT(batches, in_batches) << "no two calls shared a batch";

  // Read-your-writes: while other callers keep the batches of this bank
  // busy, a pattern stored just before a Retrieve is what it finds.
  // Three busy callers keep both batches of the key running, so the call
  // after a Store finds them open and asks to join (it may only once the
  // shards say their banks are unchanged since the batch pinned them).
  const Family& lse = families[0];
  std::atomic<bool> stop{false};
  std::vector<std::thread> busy;
  for (int t = 0; t < 3; ++t) {
    busy.emplace_back([&, t] {
      std::mt19937_64 brng(100 + t);
      const std::vector<float> q = Queries(lse, 2, brng);
      while (!stop) {
        v1::RetrieveRequest r;
        r.set_bank(lse.name);
        r.mutable_queries()->Add(q.begin(), q.end());
        r.mutable_options()->set_max_steps(400);
        r.mutable_options()->set_tol(1e-30);
        v1::RetrieveResponse out;
        grpc::ClientContext ctx;
        (void)router_->Retrieve(&ctx, r, &out);
      }
    });
  }
  std::normal_distribution<float> g(0.f, 1.f);
  for (int round = 0; round < 12; ++round) {
    std::vector<float> x(kDim);
    for (float& v : x) v = 3.f * g(rng);  // far from every stored pattern
    v1::StoreRequest store;
    store.set_bank(lse.name);
    store.mutable_patterns()->Add(x.begin(), x.end());
    for (int v = 0; v < kValueDim; ++v) store.add_values(0.f);
    v1::StoreResponse stored;
    {
      grpc::ClientContext ctx;
      ASSERT_TRUE(router_->Store(&ctx, store, &stored).ok());
    }
    v1::RetrieveRequest r;
    r.set_bank(lse.name);
    r.mutable_queries()->Add(x.begin(), x.end());
    r.mutable_options()->set_max_steps(5);
    v1::RetrieveResponse out;
    grpc::ClientContext ctx;
    grpc::Status s = router_->Retrieve(&ctx, r, &out);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(out.results(0).nearest().id(), stored.ids(0)) << "round " << round;
  }
  stop = true;
  for (std::thread& t : busy) t.join();
}

TEST_F(RouterTest, ShardedSamplingEndsWhereANodesDoes) {
  std::mt19937_64 rng(17);
  for (const Family& f : Families()) {
    if (f.kind != v1::STATE_KIND_CONTINUOUS || f.precision != v1::PRECISION_F32) continue;
    // The unnormalised polynomial score overflows a node's sampler too.
    if (f.energy.separation() == v1::SEPARATION_POLYNOMIAL) continue;
    // The L1 score is a weighted sum of signs, discontinuous wherever a
    // coordinate meets a pattern's: near a memory every step moves each
    // coordinate by about dsigma / sigma, so a rounding-level difference
    // parts two trajectories (on one node as through a router). Its
    // energies, gradients and retrievals are compared above.
    if (f.energy.similarity() == v1::SIMILARITY_NEG_L1) continue;
    SCOPED_TRACE(f.name);
    Fill(f, rng);
    if (HasFailure()) return;
    const std::vector<float> q = Queries(f, 1, rng);
    for (v1::Sampler sampler : {v1::SAMPLER_EULER, v1::SAMPLER_HEUN, v1::SAMPLER_STOCHASTIC,
                                v1::SAMPLER_LANGEVIN, v1::SAMPLER_ANNEALED_AM}) {
      SCOPED_TRACE(v1::Sampler_Name(sampler));
      v1::SampleRequest req;
      req.set_bank(f.name);
      req.set_count(6);
      req.set_seed(99);
      req.set_sampler(sampler);
      req.mutable_schedule()->set_steps(24);
      req.mutable_schedule()->set_sigma_min(0.05);
      req.mutable_schedule()->set_sigma_max(1.0);
      if (sampler == v1::SAMPLER_HEUN) {
        // Pattern completion: the first half known, held.
        req.mutable_query()->Add(q.begin(), q.end());
        for (int i = 0; i < kDim; ++i) req.add_clamp(i < kDim / 2);
        req.set_sigma_start(0.5);
      }
      v1::SampleResponse one, sharded;
      ASSERT_NO_FATAL_FAILURE(Both(&v1::MemoryService::Stub::Sample, req, &one, &sharded));
      ASSERT_EQ(sharded.samples_size(), one.samples_size());
      for (int b = 0; b < one.samples_size(); ++b) {
        const v1::SampleResult& a = one.samples(b);
        const v1::SampleResult& r = sharded.samples(b);
        SCOPED_TRACE("sample " + std::to_string(b));
        ASSERT_EQ(r.state_size(), a.state_size());
        for (int i = 0; i < a.state_size(); ++i) {
          EXPECT_NEAR(r.state(i), a.state(i), 2e-3 * std::max(1.f, std::abs(a.state(i)))) << i;
        }
        EXPECT_EQ(r.nearest().id(), a.nearest().id());
        EXPECT_EQ(r.nearest().payload(), a.nearest().payload());
        EXPECT_NEAR(r.relative_distance(), a.relative_distance(), 2e-3);
        EXPECT_NEAR(r.energy(), a.energy(), 1e-3 * std::max(1.0, std::abs(a.energy())));
        EXPECT_EQ(r.sample_class(), a.sample_class());
      }
    }
  }
}

// Sampling a bipolar bank through the router (annealed associative memory:
// Glauber sweeps, then descent to a fixed point) takes every flip's energy
// from the shards, with the node's draws: the same samples, bit for bit, on
// the same memories with the same classes, for families whose energies are
// exact integers (classical) and not (lse, exponential, softmax).
TEST_F(RouterTest, ShardedBipolarSamplingFlipsAsANodeDoes) {
  std::mt19937_64 rng(41);
  for (const Family& f : Families()) {
    if (f.kind != v1::STATE_KIND_BIPOLAR) continue;
    if (f.energy.family() == v1::ENERGY_FAMILY_POLYNOMIAL) continue;  // as classical
    SCOPED_TRACE(f.name);
    Fill(f, rng);
    if (HasFailure()) return;
    const std::vector<float> q = Queries(f, 1, rng);
    for (bool completion : {false, true}) {
      SCOPED_TRACE(completion ? "completion" : "from noise");
      v1::SampleRequest req;
      req.set_bank(f.name);
      req.set_count(3);
      req.set_seed(7);
      req.set_sampler(v1::SAMPLER_ANNEALED_AM);
      req.mutable_schedule()->set_steps(5);
      req.mutable_schedule()->set_sigma_min(0.3);
      req.mutable_schedule()->set_sigma_max(3.0);
      if (completion) {
        // The first half known, held.
        req.mutable_query()->Add(q.begin(), q.end());
        for (int i = 0; i < kDim; ++i) req.add_clamp(i < kDim / 2);
      }
      v1::SampleResponse one, sharded;
      ASSERT_NO_FATAL_FAILURE(Both(&v1::MemoryService::Stub::Sample, req, &one, &sharded));
      ASSERT_EQ(sharded.samples_size(), one.samples_size());
      for (int b = 0; b < one.samples_size(); ++b) {
        const v1::SampleResult& a = one.samples(b);
        const v1::SampleResult& r = sharded.samples(b);
        SCOPED_TRACE("sample " + std::to_string(b));
        ASSERT_EQ(r.state_size(), a.state_size());
        for (int i = 0; i < a.state_size(); ++i) EXPECT_EQ(r.state(i), a.state(i)) << i;
        // Hamming distances tie often: a node takes the first tied row in
        // its order, a router the first shard's; either is at the distance.
        EXPECT_EQ(r.nearest().distance(), a.nearest().distance());
        if (r.nearest().id() == a.nearest().id()) {
          EXPECT_EQ(r.nearest().payload(), a.nearest().payload());
        }
        EXPECT_NEAR(r.energy(), a.energy(), 1e-6 * std::max(1.0, std::abs(a.energy())));
        EXPECT_EQ(r.sample_class(), a.sample_class());
        EXPECT_EQ(r.fixed_point(), a.fixed_point());
      }
    }
  }
}

// SampleStream through the router sends a node's frames: the same steps,
// then the result.
TEST_F(RouterTest, ShardedSampleStreamSendsANodesFrames) {
  std::mt19937_64 rng(19);
  const Family f{"stream", v1::STATE_KIND_CONTINUOUS, v1::PRECISION_F32,
                 Energy(v1::ENERGY_FAMILY_GAUSSIAN, 6.0)};
  Fill(f, rng);
  ASSERT_FALSE(HasFailure());
  v1::SampleRequest req;
  req.set_bank(f.name);
  req.set_count(3);
  req.set_seed(5);
  req.mutable_schedule()->set_steps(12);
  req.set_trajectory_every(4);
  auto frames = [&](v1::MemoryService::Stub* stub) {
    grpc::ClientContext c;
    auto reader = stub->SampleStream(&c, req);
    std::vector<v1::SampleFrame> out;
    v1::SampleFrame frame;
    while (reader->Read(&frame)) out.push_back(frame);
    EXPECT_TRUE(reader->Finish().ok());
    return out;
  };
  const std::vector<v1::SampleFrame> one = frames(whole_.get());
  const std::vector<v1::SampleFrame> sharded = frames(router_.get());
  ASSERT_EQ(sharded.size(), one.size());
  ASSERT_GE(one.size(), 3u);
  for (size_t k = 0; k < one.size(); ++k) {
    EXPECT_EQ(sharded[k].step(), one[k].step()) << k;
    ASSERT_EQ(sharded[k].states_size(), one[k].states_size()) << k;
    for (int i = 0; i < one[k].states_size(); ++i) {
      EXPECT_NEAR(sharded[k].states(i), one[k].states(i), 2e-3) << k << "," << i;
    }
  }
  ASSERT_TRUE(one.back().has_result());
  ASSERT_TRUE(sharded.back().has_result());
  for (int b = 0; b < one.back().result().samples_size(); ++b) {
    EXPECT_EQ(sharded.back().result().samples(b).nearest().id(),
              one.back().result().samples(b).nearest().id());
  }
}

TEST_F(RouterTest, WritesRouteByIdAndFailClean) {
  std::mt19937_64 rng(11);
  const Family f{"writes", v1::STATE_KIND_CONTINUOUS, v1::PRECISION_F32,
                 Energy(v1::ENERGY_FAMILY_LSE, 4.0)};
  Fill(f, rng);
  ASSERT_FALSE(HasFailure());
  // GetPatterns by id returns them in the order asked, with their payloads.
  v1::GetPatternsRequest all;
  all.set_bank(f.name);
  all.set_page_size(1000);
  v1::GetPatternsResponse whole;
  {
    grpc::ClientContext c;
    ASSERT_TRUE(whole_->GetPatterns(&c, all, &whole).ok());
  }
  v1::GetPatternsRequest some;
  some.set_bank(f.name);
  for (int r : {40, 3, 77, 12}) some.add_ids(whole.ids(r));
  v1::GetPatternsResponse got;
  {
    grpc::ClientContext c;
    grpc::Status s = router_->GetPatterns(&c, some, &got);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  ASSERT_EQ(got.ids_size(), 4);
  int k = 0;
  for (int r : {40, 3, 77, 12}) {
    EXPECT_EQ(got.ids(k), whole.ids(r));
    EXPECT_EQ(got.payloads(k), whole.payloads(r));
    for (int i = 0; i < kDim; ++i) EXPECT_EQ(got.patterns(k * kDim + i), whole.patterns(r * kDim + i));
    ++k;
  }
  // Paging through the router visits every pattern once.
  std::vector<uint64_t> paged;
  for (uint64_t start = 0; start < uint64_t{kPatterns};) {
    v1::GetPatternsRequest page;
    page.set_bank(f.name);
    page.set_page_start(start);
    page.set_page_size(40);
    v1::GetPatternsResponse p;
    grpc::ClientContext c;
    ASSERT_TRUE(router_->GetPatterns(&c, page, &p).ok());
    ASSERT_GT(p.next_page_start(), start);
    paged.insert(paged.end(), p.ids().begin(), p.ids().end());
    start = p.next_page_start();
  }
  std::vector<uint64_t> expected(whole.ids().begin(), whole.ids().end());
  std::sort(paged.begin(), paged.end());
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(paged, expected);

  // A Store whose last id already exists (on its owning shard) changes
  // nothing on any shard.
  v1::StoreRequest bad;
  bad.set_bank(f.name);
  for (int r = 0; r < 20; ++r) {
    for (int i = 0; i < kDim; ++i) bad.add_patterns(0.1f * static_cast<float>(r + i % 5));
    bad.add_ids(r < 19 ? 1000000 + r : whole.ids(0));
  }
  v1::StoreResponse unused;
  {
    grpc::ClientContext c;
    grpc::Status s = router_->Store(&c, bad, &unused);
    EXPECT_FALSE(s.ok());
    EXPECT_NE(s.error_message().find("shard"), std::string::npos) << s.error_message();
  }
  v1::GetBankRequest get;
  get.set_name(f.name);
  v1::BankInfo info;
  {
    grpc::ClientContext c;
    ASSERT_TRUE(router_->GetBank(&c, get, &info).ok());
  }
  EXPECT_EQ(info.patterns(), uint64_t{kPatterns});
  // A NaN is refused before any shard sees the call.
  bad.set_patterns(5, NAN);
  {
    grpc::ClientContext c;
    EXPECT_EQ(router_->Store(&c, bad, &unused).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }

  // Deleting ids of which one is absent deletes none.
  v1::DeletePatternsRequest del;
  del.set_bank(f.name);
  del.add_ids(whole.ids(5));
  del.add_ids(whole.ids(6));
  del.add_ids(999999999);
  v1::DeletePatternsResponse deleted;
  {
    grpc::ClientContext c;
    EXPECT_EQ(router_->DeletePatterns(&c, del, &deleted).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }
  del.mutable_ids()->RemoveLast();
  {
    grpc::ClientContext c;
    ASSERT_TRUE(router_->DeletePatterns(&c, del, &deleted).ok());
  }
  EXPECT_EQ(deleted.deleted(), 2u);
  EXPECT_EQ(deleted.bank_patterns(), uint64_t{kPatterns - 2});

  // CreateBank after a partial create converges; DeleteBank after a
  // partial delete too.
  v1::CreateBankRequest create;
  create.set_name("partial");
  create.set_dim(kDim);
  create.set_kind(v1::STATE_KIND_CONTINUOUS);
  {
    grpc::ClientContext c;
    ASSERT_TRUE(shard0_->CreateBank(&c, create, &info).ok());
  }
  {
    grpc::ClientContext c;
    grpc::Status s = router_->CreateBank(&c, create, &info);
    EXPECT_TRUE(s.ok()) << s.error_message();
  }
  {
    grpc::ClientContext c;
    EXPECT_EQ(router_->CreateBank(&c, create, &info).error_code(),
              grpc::StatusCode::ALREADY_EXISTS);
  }
  v1::DeleteBankRequest drop;
  drop.set_name("partial");
  v1::DeleteBankResponse dropped;
  {
    grpc::ClientContext c;
    ASSERT_TRUE(shard0_->DeleteBank(&c, drop, &dropped).ok());
  }
  {
    grpc::ClientContext c;
    EXPECT_TRUE(router_->DeleteBank(&c, drop, &dropped).ok());
  }
  {
    grpc::ClientContext c;
    EXPECT_EQ(router_->DeleteBank(&c, drop, &dropped).error_code(), grpc::StatusCode::NOT_FOUND);
  }

  // A shard holding another bank of the name is never taken for created;
  // the bank shows in ListBanks, and DeleteBank clears every shard.
  v1::CreateBankRequest other = create;
  other.set_name("mismatch");
  other.set_dim(kDim + 1);
  {
    grpc::ClientContext c;
    ASSERT_TRUE(shard0_->CreateBank(&c, other, &info).ok());
  }
  other.set_dim(kDim);
  {
    grpc::ClientContext c;
    grpc::Status s = router_->CreateBank(&c, other, &info);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::ALREADY_EXISTS);
    EXPECT_NE(s.error_message().find("holds another bank"), std::string::npos) << s.error_message();
  }
  v1::ListBanksResponse listed;
  {
    grpc::ClientContext c;
    ASSERT_TRUE(router_->ListBanks(&c, v1::ListBanksRequest(), &listed).ok());
  }
  std::vector<std::string> names;
  for (const auto& b : listed.banks()) names.push_back(b.name());
  EXPECT_EQ(names, (std::vector<std::string>{"mismatch", "writes"}));
  drop.set_name("mismatch");
  {
    grpc::ClientContext c;
    EXPECT_TRUE(router_->DeleteBank(&c, drop, &dropped).ok());
  }
  for (int i = 0; i < kShards; ++i) {
    auto stub = v1::MemoryService::NewStub(nodes_[i]->InProcessChannel());
    v1::GetBankRequest g;
    g.set_name("mismatch");
    grpc::ClientContext c;
    EXPECT_EQ(stub->GetBank(&c, g, &info).error_code(), grpc::StatusCode::NOT_FOUND) << i;
  }
}

// Patterns with a time to live leave every shard's reads as they leave a
// node's: after expiry the router answers as the node does.
TEST_F(RouterTest, ExpiredPatternsLeaveShardedReadsAsOnANode) {
  std::mt19937_64 rng(13);
  const Family f{"ttl", v1::STATE_KIND_CONTINUOUS, v1::PRECISION_F32,
                 Energy(v1::ENERGY_FAMILY_LSE, 8.0)};
  Fill(f, rng);  // no time to live
  ASSERT_FALSE(HasFailure());
  const std::vector<float> q = Queries(f, 5, rng);
  // 40 more patterns that live 60 s, through the router and on the node.
  v1::StoreRequest brief;
  brief.set_bank(f.name);
  brief.set_ttl_seconds(60);
  std::normal_distribution<float> g(0.f, 1.f / std::sqrt(float{kDim}));
  for (int r = 0; r < 40; ++r) {
    for (int i = 0; i < kDim; ++i) brief.add_patterns(q[(r % 5) * kDim + i] + 0.05f * g(rng));
    for (int v = 0; v < kValueDim; ++v) brief.add_values(g(rng));
  }
  v1::StoreResponse stored;
  {
    grpc::ClientContext c;
    ASSERT_TRUE(router_->Store(&c, brief, &stored).ok());
  }
  *brief.mutable_ids() = stored.ids();
  {
    grpc::ClientContext c;
    ASSERT_TRUE(whole_->Store(&c, brief, &stored).ok());
  }
  auto energies = [&](v1::MemoryService::Stub* stub) {
    v1::EnergyRequest e;
    e.set_bank(f.name);
    e.mutable_states()->Add(q.begin(), q.end());
    v1::EnergyResponse out;
    grpc::ClientContext c;
    EXPECT_TRUE(stub->Energy(&c, e, &out).ok());
    return std::vector<double>(out.energies().begin(), out.energies().end());
  };
  const std::vector<double> before = energies(router_.get());
  now_ms_ += 61'000;
  const std::vector<double> after = energies(router_.get());
  const std::vector<double> node = energies(whole_.get());
  ASSERT_EQ(after.size(), node.size());
  for (size_t j = 0; j < node.size(); ++j) {
    EXPECT_NEAR(after[j], node[j], Tol(node[j])) << j;
    // The brief patterns sat near the states: their going raises E.
    EXPECT_GT(after[j], before[j] + 1e-3) << j;
  }
  v1::GetBankRequest get;
  get.set_name(f.name);
  v1::BankInfo info;
  grpc::ClientContext c;
  ASSERT_TRUE(router_->GetBank(&c, get, &info).ok());
  EXPECT_EQ(info.patterns(), uint64_t{kPatterns});
}

// Energy's novelty through the router ranks each state among the same
// stored patterns' energies as a node: the reference sample is chosen by id
// (the smallest NoveltyKey), not by row order, so on a bank of more rows
// than the sample the shards' rows give the node's sample. Novelty agrees to
// one rank of the 256 (energies from differently merged sums agree only to
// float reassociation), the z-score to 1e-4; filtered calls too.
TEST_F(RouterTest, NoveltyRanksAmongTheNodesReferenceSample) {
  std::mt19937_64 rng(31);
  // More rows than the sample on every shard (each holds about a third).
  constexpr int kRows = 1200;
  for (const Family& f :
       {Family{"novel_lse", v1::STATE_KIND_CONTINUOUS, v1::PRECISION_F32,
               Energy(v1::ENERGY_FAMILY_LSE, 8.0)},
        Family{"novel_sparsemax", v1::STATE_KIND_CONTINUOUS, v1::PRECISION_F32,
               Energy(v1::ENERGY_FAMILY_GENERAL, 8.0, v1::SIMILARITY_DOT,
                      v1::SEPARATION_SPARSEMAX)},
        Family{"novel_classical", v1::STATE_KIND_BIPOLAR, v1::PRECISION_BIT_PACKED,
               Energy(v1::ENERGY_FAMILY_CLASSICAL, 1.0)}}) {
    SCOPED_TRACE(f.name);
    v1::CreateBankRequest create;
    create.set_name(f.name);
    create.set_dim(kDim);
    create.set_kind(f.kind);
    create.set_precision(f.precision);
    *create.mutable_energy() = f.energy;
    v1::BankInfo info;
    for (v1::MemoryService::Stub* stub : {router_.get(), whole_.get()}) {
      grpc::ClientContext c;
      ASSERT_TRUE(stub->CreateBank(&c, create, &info).ok());
    }
    v1::StoreRequest store;
    store.set_bank(f.name);
    std::normal_distribution<float> g(0.f, 1.f / std::sqrt(float{kDim}));
    std::uniform_int_distribution<int> coin(0, 1);
    for (int r = 0; r < kRows; ++r) {
      for (int i = 0; i < kDim; ++i) {
        store.add_patterns(f.kind == v1::STATE_KIND_BIPOLAR ? (coin(rng) ? 1.f : -1.f) : g(rng));
      }
      (*store.add_labels()->mutable_ints())["g"] = r % 3;
    }
    v1::StoreResponse stored;
    {
      grpc::ClientContext c;
      ASSERT_TRUE(router_->Store(&c, store, &stored).ok());
    }
    *store.mutable_ids() = stored.ids();
    {
      grpc::ClientContext c;
      ASSERT_TRUE(whole_->Store(&c, store, &stored).ok());
    }
    // Stored patterns, noisy ones and far ones.
    std::vector<float> states = Queries(f, 8, rng);
    states.insert(states.end(), store.patterns().begin(), store.patterns().begin() + 4 * kDim);
    for (int i = 0; i < 2 * kDim; ++i) {
      states.push_back(f.kind == v1::STATE_KIND_BIPOLAR ? (coin(rng) ? 1.f : -1.f) : 3.f * g(rng));
    }
    for (bool filtered : {false, true}) {
      SCOPED_TRACE(filtered ? "filter g = 1" : "no filter");
      v1::EnergyRequest e;
      e.set_bank(f.name);
      e.mutable_states()->Add(states.begin(), states.end());
      e.set_return_novelty(true);
      if (filtered) {
        v1::Condition* cond = e.mutable_filter()->add_conditions();
        cond->set_key("g");
        cond->mutable_int_any_of()->add_values(1);
      }
      v1::EnergyResponse one, sharded;
      ASSERT_NO_FATAL_FAILURE(Both(&v1::MemoryService::Stub::Energy, e, &one, &sharded));
      ASSERT_EQ(sharded.novelty_size(), one.novelty_size());
      ASSERT_EQ(one.novelty_size(), static_cast<int>(states.size() / kDim));
      bool spread = false;
      for (int j = 0; j < one.novelty_size(); ++j) {
        EXPECT_NEAR(sharded.novelty(j), one.novelty(j), 1.0 / 256 + 1e-12) << "state " << j;
        EXPECT_NEAR(sharded.novelty_z(j), one.novelty_z(j),
                    1e-4 * std::max(1.0, std::abs(one.novelty_z(j))))
            << "state " << j;
        spread |= one.novelty(j) > 0.05 && one.novelty(j) < 0.95;
      }
      // The states rank inside the reference, not only at its ends.
      EXPECT_TRUE(spread);
    }
  }
}

// A bank that decays with age: patterns stored at different times weigh
// 2^(-age / half-life) on every shard at the router's time, so Energy, sync
// Retrieve and Sample through the router answer as the node holding them
// all, and aging moves them alike.
TEST_F(RouterTest, DecayingBanksAnswerAsOneNode) {
  std::mt19937_64 rng(29);
  v1::CreateBankRequest create;
  create.set_name("decay");
  create.set_dim(kDim);
  create.set_kind(v1::STATE_KIND_CONTINUOUS);
  *create.mutable_energy() = Energy(v1::ENERGY_FAMILY_LSE, 8.0);
  create.set_decay_half_life_seconds(3600);
  for (auto* stub : {router_.get(), whole_.get()}) {
    v1::BankInfo info;
    grpc::ClientContext c;
    ASSERT_TRUE(stub->CreateBank(&c, create, &info).ok());
  }
  // Four batches an hour apart: the oldest weigh 1/8 of the newest.
  std::normal_distribution<float> g(0.f, 1.f / std::sqrt(float{kDim}));
  std::vector<float> rows;
  for (int batch = 0; batch < 4; ++batch) {
    v1::StoreRequest store;
    store.set_bank("decay");
    for (int r = 0; r < 60; ++r) {
      for (int i = 0; i < kDim; ++i) store.add_patterns(g(rng));
    }
    rows.insert(rows.end(), store.patterns().begin(), store.patterns().end());
    v1::StoreResponse stored;
    {
      grpc::ClientContext c;
      ASSERT_TRUE(router_->Store(&c, store, &stored).ok());
    }
    *store.mutable_ids() = stored.ids();
    {
      grpc::ClientContext c;
      ASSERT_TRUE(whole_->Store(&c, store, &stored).ok());
    }
    now_ms_ += 3'600'000;
  }
  // Queries near rows of each batch.
  std::vector<float> q;
  for (int j = 0; j < 8; ++j) {
    const int r = (j % 4) * 60 + j;
    for (int i = 0; i < kDim; ++i) q.push_back(rows[r * kDim + i] + 0.3f * g(rng));
  }
  auto energies = [&](v1::MemoryService::Stub* stub) {
    v1::EnergyRequest e;
    e.set_bank("decay");
    e.mutable_states()->Add(q.begin(), q.end());
    e.set_return_gradient(true);
    v1::EnergyResponse out;
    grpc::ClientContext c;
    grpc::Status s = stub->Energy(&c, e, &out);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return out;
  };
  auto retrieve = [&](v1::MemoryService::Stub* stub) {
    v1::RetrieveRequest r;
    r.set_bank("decay");
    r.mutable_queries()->Add(q.begin(), q.end());
    v1::RetrieveResponse out;
    grpc::ClientContext c;
    grpc::Status s = stub->Retrieve(&c, r, &out);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return out;
  };
  const v1::EnergyResponse young = energies(router_.get());
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE(round == 0 ? "now" : "two half-lives later");
    const v1::EnergyResponse e_router = energies(router_.get()), e_node = energies(whole_.get());
    ASSERT_EQ(e_router.energies_size(), e_node.energies_size());
    for (int j = 0; j < e_node.energies_size(); ++j) {
      EXPECT_NEAR(e_router.energies(j), e_node.energies(j), Tol(e_node.energies(j))) << j;
    }
    ASSERT_EQ(e_router.gradients_size(), e_node.gradients_size());
    for (int i = 0; i < e_node.gradients_size(); ++i) {
      EXPECT_NEAR(e_router.gradients(i), e_node.gradients(i), 2e-4) << i;
    }
    const v1::RetrieveResponse r_router = retrieve(router_.get()), r_node = retrieve(whole_.get());
    ASSERT_EQ(r_router.results_size(), r_node.results_size());
    for (int j = 0; j < r_node.results_size(); ++j) {
      EXPECT_EQ(r_router.results(j).nearest().id(), r_node.results(j).nearest().id()) << j;
      EXPECT_EQ(r_router.results(j).stop_reason(), r_node.results(j).stop_reason()) << j;
      for (int i = 0; i < kDim; ++i) {
        EXPECT_NEAR(r_router.results(j).state(i), r_node.results(j).state(i), 1e-4) << j;
      }
    }
    if (round == 0) now_ms_ += 2 * 3'600'000;
  }
  // Aging changed the energies (the weights are not a constant factor: the
  // log-sum-exp over rows of different ages moves unevenly).
  const v1::EnergyResponse old = energies(router_.get());
  int moved = 0;
  for (int j = 0; j < old.energies_size(); ++j) {
    moved += std::fabs(old.energies(j) - young.energies(j)) > 1e-3;
  }
  EXPECT_GT(moved, 0);
  // Sampling weighs the rows alike: the same samples for the same seed.
  for (v1::Sampler sampler : {v1::SAMPLER_EULER, v1::SAMPLER_HEUN}) {
    SCOPED_TRACE(v1::Sampler_Name(sampler));
    v1::SampleRequest req;
    req.set_bank("decay");
    req.set_count(4);
    req.set_seed(5);
    req.set_sampler(sampler);
    req.mutable_schedule()->set_steps(16);
    req.mutable_schedule()->set_sigma_min(0.05);
    req.mutable_schedule()->set_sigma_max(1.0);
    v1::SampleResponse one, sharded;
    for (auto [stub, out] : {std::pair{whole_.get(), &one}, std::pair{router_.get(), &sharded}}) {
      grpc::ClientContext c;
      grpc::Status s = stub->Sample(&c, req, out);
      ASSERT_TRUE(s.ok()) << s.error_message();
    }
    ASSERT_EQ(sharded.samples_size(), one.samples_size());
    for (int b = 0; b < one.samples_size(); ++b) {
      const v1::SampleResult& a = one.samples(b);
      const v1::SampleResult& r = sharded.samples(b);
      for (int i = 0; i < a.state_size(); ++i) {
        EXPECT_NEAR(r.state(i), a.state(i), 2e-3 * std::max(1.f, std::abs(a.state(i)))) << i;
      }
      EXPECT_EQ(r.nearest().id(), a.nearest().id());
      EXPECT_NEAR(r.energy(), a.energy(), 1e-3 * std::max(1.0, std::abs(a.energy())));
    }
  }
}

// Backup through a router writes every shard's snapshot on that shard; a
// shard restored from its own snapshot holds what it held.
TEST_F(RouterTest, BackupSnapshotsEveryShard) {
  std::mt19937_64 rng(23);
  const Family f{"backed", v1::STATE_KIND_CONTINUOUS, v1::PRECISION_F32,
                 Energy(v1::ENERGY_FAMILY_LSE, 4.0)};
  Fill(f, rng);
  ASSERT_FALSE(HasFailure());
  v1::BackupRequest req;
  req.set_file("snap1");
  v1::BackupResponse out;
  {
    grpc::ClientContext c;
    grpc::Status s = router_->Backup(&c, req, &out);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  EXPECT_EQ(out.banks(), 1u);
  EXPECT_GT(out.bytes(), 0u);
  for (int i = 0; i < kShards; ++i) {
    EXPECT_NE(out.path().find("shard " + std::to_string(i)), std::string::npos) << out.path();
    EXPECT_TRUE(std::filesystem::exists(root_ / ("node" + std::to_string(i)) / "backups" / "snap1"))
        << i;
  }
  // The same name again: ALREADY_EXISTS, from the shards.
  {
    grpc::ClientContext c;
    EXPECT_EQ(router_->Backup(&c, req, &out).error_code(), grpc::StatusCode::ALREADY_EXISTS);
  }
  // Shard 1 restored from its snapshot into a new node holds shard 1's rows.
  v1::GetBankRequest get;
  get.set_name(f.name);
  v1::BankInfo held;
  {
    auto stub = v1::MemoryService::NewStub(nodes_[1]->InProcessChannel());
    grpc::ClientContext c;
    ASSERT_TRUE(stub->GetBank(&c, get, &held).ok());
  }
  ServerConfig rc;
  rc.listen = "127.0.0.1:0";
  rc.metrics_listen = "";
  rc.data_dir = (root_ / "restored").string();
  rc.restore_from = (root_ / "node1" / "backups" / "snap1").string();
  rc.expire_interval = absl::ZeroDuration();
  auto restored = EngramServer::Start(rc);
  ASSERT_TRUE(restored.ok()) << restored.status();
  auto stub = v1::MemoryService::NewStub((*restored)->InProcessChannel());
  v1::BankInfo back;
  grpc::ClientContext c;
  ASSERT_TRUE(stub->GetBank(&c, get, &back).ok());
  EXPECT_EQ(back.patterns(), held.patterns());
  EXPECT_GT(back.patterns(), 0u);
}

TEST_F(RouterTest, TheCallersDeadlineReachesTheShards) {
  std::mt19937_64 rng(5);
  const Family f{"deadline", v1::STATE_KIND_CONTINUOUS, v1::PRECISION_F32,
                 Energy(v1::ENERGY_FAMILY_LSE, 4.0)};
  Fill(f, rng);
  ASSERT_FALSE(HasFailure());
  // Gradient steps too small to converge in the time given: the deadline
  // ends the call (each step is a round trip to the shards).
  v1::RetrieveRequest r;
  r.set_bank(f.name);
  const std::vector<float> q = Queries(f, 2, rng);
  r.mutable_queries()->Add(q.begin(), q.end());
  r.mutable_options()->set_dynamics(v1::DYNAMICS_GRADIENT);
  r.mutable_options()->set_alpha(1e-7);
  r.mutable_options()->set_tol(1e-30);
  r.mutable_options()->set_max_steps(100000);
  v1::RetrieveResponse out;
  {
    grpc::ClientContext c;
    c.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
    const auto start = std::chrono::steady_clock::now();
    grpc::Status s = router_->Retrieve(&c, r, &out);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << s.error_message();
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
  }
  // With partial_on_deadline, the state the first query reached, stopped
  // by the deadline; the second query never starts (as on a node).
  r.mutable_options()->set_partial_on_deadline(true);
  {
    grpc::ClientContext c;
    c.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
    grpc::Status s = router_->Retrieve(&c, r, &out);
    ASSERT_TRUE(s.ok()) << s.error_message();
    ASSERT_EQ(out.results_size(), 1);
    EXPECT_EQ(out.results(0).stop_reason(), v1::STOP_REASON_DEADLINE);
    EXPECT_GT(out.results(0).steps(), 0u);
    EXPECT_NE(out.results(0).nearest().id(), 0u);
  }
}

TEST_F(RouterTest, BadCallsAndAShardDownAreClearErrors) {
  std::mt19937_64 rng(3);
  const Family f{"faults", v1::STATE_KIND_CONTINUOUS, v1::PRECISION_F32,
                 Energy(v1::ENERGY_FAMILY_LSE, 4.0)};
  Fill(f, rng);
  ASSERT_FALSE(HasFailure());
  v1::EnergyRequest e;
  e.set_bank("no_such_bank");
  for (int i = 0; i < kDim; ++i) e.add_states(0.1f);
  v1::EnergyResponse out;
  {
    grpc::ClientContext c;
    EXPECT_EQ(router_->Energy(&c, e, &out).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  e.set_bank(f.name);
  e.add_states(0.2f);  // not a multiple of the dimension
  {
    grpc::ClientContext c;
    EXPECT_EQ(router_->Energy(&c, e, &out).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  e.mutable_states()->RemoveLast();
  v1::RetrieveRequest r;
  r.set_bank(f.name);
  r.mutable_queries()->Add(e.states().begin(), e.states().end());
  // A shard's TINYBRAIN stream holds one memory layer (a float per row):
  // more states, or a layer continued before it started, are refused.
  {
    auto shard = shard::v1::Shard::NewStub(nodes_[0]->InProcessChannel());
    for (int states : {2, 1}) {
      grpc::ClientContext c;
      auto stream = shard->Steps(&c);
      shard::v1::StepRequest step;
      step.set_bank(f.name);
      for (int i = 0; i < states * kDim; ++i) step.add_states(0.1f);
      step.mutable_tinybrain()->set_start(states == 2);
      step.mutable_tinybrain()->set_rh(0.1);
      ASSERT_TRUE(stream->Write(step));
      shard::v1::StepReply reply;
      EXPECT_FALSE(stream->Read(&reply));
      stream->WritesDone();
      EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT) << states;
    }
  }
  // Async flips need a bipolar bank: FAILED_PRECONDITION, as on a node.
  r.mutable_options()->set_dynamics(v1::DYNAMICS_ASYNC);
  v1::RetrieveResponse rout;
  {
    grpc::ClientContext c;
    EXPECT_EQ(router_->Retrieve(&c, r, &rout).error_code(),
              grpc::StatusCode::FAILED_PRECONDITION);
  }
  // An empty bank: FAILED_PRECONDITION, as on a node, whatever the family.
  for (const Family& empty : {Family{"empty_lse", v1::STATE_KIND_CONTINUOUS, v1::PRECISION_F32,
                                     Energy(v1::ENERGY_FAMILY_LSE, 4.0)},
                              Family{"empty_classical", v1::STATE_KIND_BIPOLAR,
                                     v1::PRECISION_F32, Energy(v1::ENERGY_FAMILY_CLASSICAL, 1.0)}}) {
    v1::CreateBankRequest create;
    create.set_name(empty.name);
    create.set_dim(kDim);
    create.set_kind(empty.kind);
    *create.mutable_energy() = empty.energy;
    v1::BankInfo info;
    {
      grpc::ClientContext c;
      ASSERT_TRUE(router_->CreateBank(&c, create, &info).ok());
    }
    v1::RetrieveRequest er;
    er.set_bank(empty.name);
    for (int i = 0; i < kDim; ++i) er.add_queries(1.f);
    v1::RetrieveResponse eout;
    grpc::ClientContext c;
    grpc::Status s = router_->Retrieve(&c, er, &eout);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << empty.name << ": "
                                                                     << s.error_message();
  }
  // Shard 1 down: every call that needs it is UNAVAILABLE and names it.
  const std::string down = "127.0.0.1:" + std::to_string(nodes_[1]->port());
  nodes_[1]->Shutdown(absl::ZeroDuration());
  nodes_[1]->Wait();
  for (int call = 0; call < 3; ++call) {
    grpc::ClientContext c;
    c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    grpc::Status s;
    if (call == 0) {
      s = router_->Energy(&c, e, &out);
    } else if (call == 1) {
      r.mutable_options()->set_dynamics(v1::DYNAMICS_SYNC);
      s = router_->Retrieve(&c, r, &rout);
    } else {
      v1::GetBankRequest get;
      get.set_name(f.name);
      v1::BankInfo info;
      s = router_->GetBank(&c, get, &info);
    }
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << "call " << call << ": "
                                                             << s.error_message();
    EXPECT_NE(s.error_message().find("shard 1 (" + down + ")"), std::string::npos)
        << s.error_message();
  }
  // The router counts its shard calls by shard and code.
  double unavailable = 0, ok = 0;
  for (const auto& family : router_server_->metrics()->registry()->Collect()) {
    if (family.name != "engram_shard_calls_total") continue;
    for (const auto& m : family.metric) {
      std::map<std::string, std::string> labels;
      for (const auto& l : m.label) labels[l.name] = l.value;
      if (labels["shard"] == down && labels["grpc_code"] == "Unavailable") {
        unavailable += m.counter.value;
      }
      if (labels["grpc_code"] == "OK") ok += m.counter.value;
    }
  }
  EXPECT_GE(unavailable, 3);
  EXPECT_GT(ok, 0);
}

TEST(ShardList, ParsesListsAndStatefulSetNames) {
  auto list = ParseShardList("a:1, b:2,c:3");
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(*list, (std::vector<std::string>{"a:1", "b:2", "c:3"}));
  auto set = ParseShardList("engram-{0..2}.engram.default.svc:50051");
  ASSERT_TRUE(set.ok());
  EXPECT_EQ(*set, (std::vector<std::string>{"engram-0.engram.default.svc:50051",
                                            "engram-1.engram.default.svc:50051",
                                            "engram-2.engram.default.svc:50051"}));
  EXPECT_FALSE(ParseShardList("").ok());
  EXPECT_FALSE(ParseShardList("x-{0..}.y:1").ok());
  // Replica groups: one target naming every replica, or a DNS target kept.
  auto groups = ParseShardList("10.0.0.1:5|10.0.0.2:5,dns:///g1.engram:5");
  ASSERT_TRUE(groups.ok());
  EXPECT_EQ(*groups, (std::vector<std::string>{"ipv4:10.0.0.1:5,10.0.0.2:5",
                                               "dns:///g1.engram:5"}));
}

TEST(ShardOf, SpreadsIdsEvenlyAndNeverMovesThem) {
  std::vector<int> counts(4, 0);
  for (uint64_t id = 1; id <= 40000; ++id) ++counts[ShardOf(id, 4)];
  for (int c : counts) EXPECT_NEAR(c, 10000, 400);  // > 4 sigma of a fair split
  EXPECT_EQ(ShardOf(12345, 4), ShardOf(12345, 4));
}

}  // namespace
}  // namespace engram::server
