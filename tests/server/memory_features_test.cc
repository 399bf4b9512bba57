// Key -> value banks, filters and time to live through a real grpc::Server:
// the readout against attention computed here in double, a filtered call
// against the same call on a bank created from the subset (alone and among
// other clients' calls), expiry with an injected clock, restart, and the
// codes of bad input with nothing changed.
#include <cmath>
#include <filesystem>
#include <random>
#include <thread>

#include <gmock/gmock.h>
#include <google/protobuf/util/message_differencer.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "engram/v1/engram.grpc.pb.h"
#include "server/server.h"
#include "testing/random_banks.h"

namespace engram::server {
namespace {

using ::testing::HasSubstr;

constexpr int kDim = 16;
constexpr int kValueDim = 3;
constexpr int kPatterns = 60;

class MemoryFeaturesTest : public ::testing::Test {
 public:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("engram_features_service_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    Start();
  }
  void TearDown() override {
    server_.reset();
    std::filesystem::remove_all(dir_);
  }

  void Start() {
    ServerConfig config;
    config.listen = "127.0.0.1:0";
    config.data_dir = dir_.string();
    config.metrics_listen = "";
    config.inline_work = 0;  // every compute call goes through the scheduler
    config.expire_interval = absl::ZeroDuration();  // the test sweeps
    config.clock_ms = [this] { return now_ms_.load(); };
    auto s = EngramServer::Start(config);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    stub_ = v1::MemoryService::NewStub(server_->InProcessChannel());
  }

  grpc::Status Create(const std::string& name, uint32_t value_dim, double beta = 4.0,
                      uint64_t ttl = 0, uint64_t half_life = 0) {
    grpc::ClientContext ctx;
    v1::CreateBankRequest req;
    req.set_name(name);
    req.set_dim(kDim);
    req.set_kind(v1::STATE_KIND_CONTINUOUS);
    req.mutable_energy()->set_family(v1::ENERGY_FAMILY_LSE);
    req.mutable_energy()->set_beta(beta);
    req.set_value_dim(value_dim);
    req.set_ttl_seconds(ttl);
    req.set_decay_half_life_seconds(half_life);
    v1::BankInfo info;
    return stub_->CreateBank(&ctx, req, &info);
  }

  grpc::Status Store(const v1::StoreRequest& req, v1::StoreResponse* resp = nullptr) {
    grpc::ClientContext ctx;
    v1::StoreResponse r;
    grpc::Status s = stub_->Store(&ctx, req, &r);
    if (resp != nullptr) *resp = r;
    return s;
  }

  // Pattern r's labels: parity, colour and a year.
  static void Label(int r, v1::Labels* l) {
    (*l->mutable_strings())["parity"] = r % 2 == 0 ? "even" : "odd";
    (*l->mutable_strings())["colour"] = std::vector<std::string>{"red", "green", "blue"}[r % 3];
    (*l->mutable_ints())["year"] = 2000 + r % 11;
  }

  // Stores the test's patterns (ids 1..kPatterns) with values and labels.
  void Fill(const std::string& bank) {
    v1::StoreRequest req;
    req.set_bank(bank);
    req.mutable_patterns()->Add(xi_.begin(), xi_.end());
    req.mutable_values()->Add(v_.begin(), v_.end());
    for (int r = 0; r < kPatterns; ++r) {
      req.add_ids(r + 1);
      req.add_payloads("p" + std::to_string(r));
      Label(r, req.add_labels());
    }
    ASSERT_TRUE(Store(req).ok());
  }

  static bool Passes(int r, const v1::Filter& f) {
    v1::Labels l;
    Label(r, &l);
    for (const v1::Condition& c : f.conditions()) {
      const bool is_string = l.strings().contains(c.key());
      const bool is_int = l.ints().contains(c.key());
      switch (c.test_case()) {
        case v1::Condition::kEquals:
          if (!is_string || l.strings().at(c.key()) != c.equals()) return false;
          break;
        case v1::Condition::kAnyOf: {
          if (!is_string) return false;
          const auto& vals = c.any_of().values();
          if (std::find(vals.begin(), vals.end(), l.strings().at(c.key())) == vals.end()) {
            return false;
          }
          break;
        }
        case v1::Condition::kIntRange:
          if (!is_int || l.ints().at(c.key()) < c.int_range().min() ||
              l.ints().at(c.key()) > c.int_range().max()) {
            return false;
          }
          break;
        default:
          ADD_FAILURE() << "test filter uses an unchecked condition";
      }
    }
    return true;
  }

  // A bank named `name` holding only the patterns that pass `f`.
  void FillSubset(const std::string& name, const v1::Filter& f) {
    ASSERT_TRUE(Create(name, kValueDim).ok());
    v1::StoreRequest req;
    req.set_bank(name);
    for (int r = 0; r < kPatterns; ++r) {
      if (!Passes(r, f)) continue;
      req.mutable_patterns()->Add(xi_.begin() + r * kDim, xi_.begin() + (r + 1) * kDim);
      req.mutable_values()->Add(v_.begin() + r * kValueDim, v_.begin() + (r + 1) * kValueDim);
      req.add_ids(r + 1);
      req.add_payloads("p" + std::to_string(r));
    }
    ASSERT_GT(req.ids_size(), 0);
    ASSERT_TRUE(Store(req).ok());
  }

  v1::RetrieveRequest Query(const std::string& bank, int near, const v1::Filter* f = nullptr) {
    v1::RetrieveRequest req;
    req.set_bank(bank);
    for (int i = 0; i < kDim; ++i) req.add_queries(xi_[near * kDim + i] + 0.15f * ((i % 3) - 1));
    if (f != nullptr) *req.mutable_filter() = *f;
    return req;
  }

  // GetBank of `bank`.
  v1::BankInfo Info(const std::string& bank) {
    grpc::ClientContext ctx;
    v1::GetBankRequest get;
    get.set_name(bank);
    v1::BankInfo info;
    EXPECT_TRUE(stub_->GetBank(&ctx, get, &info).ok());
    return info;
  }

  // Every pattern of `bank` (one page).
  v1::GetPatternsResponse AllPatterns(const std::string& bank) {
    grpc::ClientContext ctx;
    v1::GetPatternsRequest get;
    get.set_bank(bank);
    v1::GetPatternsResponse got;
    EXPECT_TRUE(stub_->GetPatterns(&ctx, get, &got).ok());
    return got;
  }

  grpc::Status Retrieve(const v1::RetrieveRequest& req, v1::RetrieveResponse* resp) {
    grpc::ClientContext ctx;
    return stub_->Retrieve(&ctx, req, resp);
  }

  std::filesystem::path dir_;
  std::atomic<int64_t> now_ms_{1'800'000'000'000};
  std::unique_ptr<EngramServer> server_;
  std::unique_ptr<v1::MemoryService::Stub> stub_;
  std::mt19937_64 rng_{21};
  std::vector<float> xi_ = engram::testing::RandomGaussian(kPatterns * kDim, rng_, 0.5f);
  std::vector<float> v_ = engram::testing::RandomGaussian(kPatterns * kValueDim, rng_);
};

TEST_F(MemoryFeaturesTest, EnergyValuesAreAttentionOverTheStoredValues) {
  const double beta = 4.0;
  ASSERT_TRUE(Create("kv", kValueDim, beta).ok());
  Fill("kv");
  v1::EnergyRequest req;
  req.set_bank("kv");
  std::vector<float> x = engram::testing::RandomGaussian(2 * kDim, rng_, 0.5f);
  req.mutable_states()->Add(x.begin(), x.end());
  v1::EnergyResponse resp;
  grpc::ClientContext ctx;
  ASSERT_TRUE(stub_->Energy(&ctx, req, &resp).ok());
  ASSERT_EQ(resp.values_size(), 2 * kValueDim);
  for (int b = 0; b < 2; ++b) {
    std::vector<double> s(kPatterns);
    double top = -INFINITY;
    for (int r = 0; r < kPatterns; ++r) {
      double dot = 0;
      for (int i = 0; i < kDim; ++i) dot += double{xi_[r * kDim + i]} * x[b * kDim + i];
      s[r] = beta * dot;
      top = std::max(top, s[r]);
    }
    double z = 0;
    for (double& t : s) z += t = std::exp(t - top);
    for (int j = 0; j < kValueDim; ++j) {
      double want = 0;
      for (int r = 0; r < kPatterns; ++r) want += s[r] / z * v_[r * kValueDim + j];
      EXPECT_NEAR(resp.values(b * kValueDim + j), want, 1e-5 * (1 + std::fabs(want)));
    }
  }
}

// LSE energy in double of state x against rows [0, k) of `xi`.
double LseEnergy(const std::vector<float>& xi, int k, const float* x, double beta) {
  double top = -INFINITY, sq = 0;
  std::vector<double> s(k);
  for (int r = 0; r < k; ++r) {
    double dot = 0;
    for (int i = 0; i < kDim; ++i) dot += double{xi[r * kDim + i]} * x[i];
    s[r] = beta * dot;
    top = std::max(top, s[r]);
  }
  double z = 0;
  for (double t : s) z += std::exp(t - top);
  for (int i = 0; i < kDim; ++i) sq += double{x[i]} * x[i];
  return -(top + std::log(z)) / beta + 0.5 * sq;
}

TEST_F(MemoryFeaturesTest, NoveltyRanksAStateAmongTheStoredPatternsEnergies) {
  const double beta = 4.0;
  ASSERT_TRUE(Create("kv", kValueDim, beta).ok());
  Fill("kv");
  auto novelty = [&](const std::vector<float>& states, v1::EnergyResponse* resp) {
    v1::EnergyRequest req;
    req.set_bank("kv");
    req.mutable_states()->Add(states.begin(), states.end());
    req.set_return_novelty(true);
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub_->Energy(&ctx, req, resp).ok());
  };
  // Reference: every stored pattern's energy (K <= 256), in double here.
  auto expect = [&](int k, const std::vector<float>& states, const v1::EnergyResponse& resp) {
    std::vector<double> ref;
    for (int r = 0; r < k; ++r) ref.push_back(LseEnergy(xi_, k, &xi_[r * kDim], beta));
    double mean = 0, var = 0;
    for (double e : ref) mean += e / k;
    for (double e : ref) var += (e - mean) * (e - mean) / k;
    ASSERT_EQ(resp.novelty_size(), static_cast<int>(states.size() / kDim));
    for (int b = 0; b < resp.novelty_size(); ++b) {
      const double e = LseEnergy(xi_, k, &states[b * kDim], beta);
      double below = 0;
      for (double t : ref) below += t < e ? 1.0 : (t == e ? 0.5 : 0.0);
      // Float scores can swap a rank only between energies within rounding.
      EXPECT_NEAR(resp.novelty(b), below / k, 1.0 / k) << "state " << b;
      EXPECT_NEAR(resp.novelty_z(b), (e - mean) / std::sqrt(var), 1e-4) << "state " << b;
    }
  };
  std::vector<float> states(xi_.begin() + 4 * kDim, xi_.begin() + 5 * kDim);
  for (int i = 0; i < kDim; ++i) states.push_back(5.f * ((i % 2) ? 1.f : -1.f));  // far away
  v1::EnergyResponse resp;
  novelty(states, &resp);
  expect(kPatterns, states, resp);
  EXPECT_LT(resp.novelty(0), 1.0);
  EXPECT_EQ(resp.novelty(1), 1.0);
  // A Store changes the reference (no stale cache).
  v1::StoreRequest more;
  more.set_bank("kv");
  std::vector<float> extra = engram::testing::RandomGaussian(20 * kDim, rng_, 0.5f);
  more.mutable_patterns()->Add(extra.begin(), extra.end());
  for (int j = 0; j < 20 * kValueDim; ++j) more.add_values(0.f);
  ASSERT_TRUE(Store(more).ok());
  xi_.insert(xi_.end(), extra.begin(), extra.end());
  novelty(states, &resp);
  expect(kPatterns + 20, states, resp);
}

TEST_F(MemoryFeaturesTest, RetrieveReadsTheValueOfTheMemoryFound) {
  ASSERT_TRUE(Create("kv", kValueDim, 20.0).ok());
  Fill("kv");
  for (int near : {3, 17, 40}) {
    v1::RetrieveResponse resp;
    ASSERT_TRUE(Retrieve(Query("kv", near), &resp).ok());
    const v1::RetrieveResult& r = resp.results(0);
    ASSERT_TRUE(r.converged());
    const uint64_t found = r.nearest().id() - 1;  // ids are rows + 1
    ASSERT_LT(found, static_cast<uint64_t>(kPatterns));
    ASSERT_EQ(r.value_size(), kValueDim);
    for (int j = 0; j < kValueDim; ++j) {
      EXPECT_NEAR(r.value(j), v_[found * kValueDim + j], 1e-3) << "query near " << near;
    }
  }
}

TEST_F(MemoryFeaturesTest, FilteredCallsEqualCallsOnABankOfTheSubset) {
  ASSERT_TRUE(Create("all", kValueDim).ok());
  Fill("all");
  std::vector<v1::Filter> filters(3);
  filters[0].add_conditions()->set_key("parity");
  filters[0].mutable_conditions(0)->set_equals("odd");
  auto* any = filters[1].add_conditions();
  any->set_key("colour");
  any->mutable_any_of()->add_values("red");
  any->mutable_any_of()->add_values("blue");
  auto* range = filters[2].add_conditions();
  range->set_key("year");
  range->mutable_int_range()->set_min(2003);
  range->mutable_int_range()->set_max(2006);
  *filters[2].add_conditions() = filters[0].conditions(0);
  for (size_t f = 0; f < filters.size(); ++f) {
    const std::string sub = "sub" + std::to_string(f);
    FillSubset(sub, filters[f]);
    for (int near : {1, 7, 30}) {
      v1::RetrieveResponse a, b;
      ASSERT_TRUE(Retrieve(Query("all", near, &filters[f]), &a).ok());
      ASSERT_TRUE(Retrieve(Query(sub, near), &b).ok());
      const v1::RetrieveResult &ra = a.results(0), &rb = b.results(0);
      EXPECT_EQ(ra.nearest().id(), rb.nearest().id()) << "filter " << f << " query " << near;
      EXPECT_EQ(ra.nearest().payload(), rb.nearest().payload());
      EXPECT_DOUBLE_EQ(ra.energy_end(), rb.energy_end());
      ASSERT_EQ(ra.state_size(), kDim);
      for (int i = 0; i < kDim; ++i) EXPECT_EQ(ra.state(i), rb.state(i));
      for (int j = 0; j < kValueDim; ++j) EXPECT_EQ(ra.value(j), rb.value(j));
    }
    v1::EnergyRequest ea;
    ea.set_bank("all");
    ea.mutable_states()->Add(xi_.begin(), xi_.begin() + kDim);
    *ea.mutable_filter() = filters[f];
    v1::EnergyRequest eb = ea;
    eb.set_bank(sub);
    eb.clear_filter();
    v1::EnergyResponse ra, rb;
    grpc::ClientContext c1, c2;
    ASSERT_TRUE(stub_->Energy(&c1, ea, &ra).ok());
    ASSERT_TRUE(stub_->Energy(&c2, eb, &rb).ok());
    EXPECT_EQ(ra.energies(0), rb.energies(0));
  }
}

// A repeated filter reuses the filtered bank only while the bank is
// unchanged: a pattern stored afterwards is found by the same filter.
TEST_F(MemoryFeaturesTest, RepeatedFilterSeesPatternsStoredSince) {
  ASSERT_TRUE(Create("all", kValueDim).ok());
  Fill("all");
  v1::Filter odd;
  odd.add_conditions()->set_key("parity");
  odd.mutable_conditions(0)->set_equals("odd");
  // The Gaussian energy recalls the nearest pattern that passes.
  v1::RetrieveRequest near10 = Query("all", 10, &odd);
  near10.mutable_energy()->set_family(v1::ENERGY_FAMILY_GAUSSIAN);
  near10.mutable_energy()->set_beta(20);
  v1::RetrieveResponse first, again;
  ASSERT_TRUE(Retrieve(near10, &first).ok());
  ASSERT_TRUE(Retrieve(near10, &again).ok());
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(first, again));
  EXPECT_NE(first.results(0).nearest().id(), 11u);  // row 10 is even
  v1::StoreRequest req;
  req.set_bank("all");
  req.mutable_patterns()->Add(xi_.begin() + 10 * kDim, xi_.begin() + 11 * kDim);
  for (int j = 0; j < kValueDim; ++j) req.add_values(7.f);
  req.add_ids(500);
  (*req.add_labels()->mutable_strings())["parity"] = "odd";
  ASSERT_TRUE(Store(req).ok());
  v1::RetrieveResponse after;
  ASSERT_TRUE(Retrieve(near10, &after).ok());
  EXPECT_EQ(after.results(0).nearest().id(), 500u);
}

// Filtered and unfiltered calls in flight together (one batching queue)
// answer as they do alone.
TEST_F(MemoryFeaturesTest, FilteredAnswersDoNotDependOnOtherClients) {
  ASSERT_TRUE(Create("all", kValueDim).ok());
  Fill("all");
  v1::Filter odd;
  odd.add_conditions()->set_key("parity");
  odd.mutable_conditions(0)->set_equals("odd");
  std::vector<v1::RetrieveRequest> reqs;
  for (int q = 0; q < 16; ++q) reqs.push_back(Query("all", q * 3, q % 2 == 0 ? &odd : nullptr));
  std::vector<v1::RetrieveResponse> alone(reqs.size()), together(reqs.size());
  for (size_t q = 0; q < reqs.size(); ++q) ASSERT_TRUE(Retrieve(reqs[q], &alone[q]).ok());
  std::vector<std::thread> threads;
  std::vector<grpc::Status> status(reqs.size());
  for (size_t q = 0; q < reqs.size(); ++q) {
    threads.emplace_back([&, q] { status[q] = Retrieve(reqs[q], &together[q]); });
  }
  for (auto& t : threads) t.join();
  for (size_t q = 0; q < reqs.size(); ++q) {
    ASSERT_TRUE(status[q].ok()) << status[q].error_message();
    const auto &a = alone[q].results(0), &b = together[q].results(0);
    EXPECT_EQ(a.nearest().id(), b.nearest().id()) << q;
    if (q % 2 == 0) EXPECT_EQ(a.nearest().id() % 2, 0u) << "odd rows have even ids";
    // Batched steps sum in another order: equal up to float reassociation.
    for (int i = 0; i < kDim; ++i) EXPECT_NEAR(a.state(i), b.state(i), 1e-5) << q;
    for (int j = 0; j < kValueDim; ++j) EXPECT_NEAR(a.value(j), b.value(j), 1e-5) << q;
  }
}

TEST_F(MemoryFeaturesTest, ExpiredPatternsLeaveReadsAtOnceAndTheDiskOnTheSweep) {
  ASSERT_TRUE(Create("t", 0, 4.0, /*ttl=*/60).ok());
  v1::StoreRequest req;
  req.set_bank("t");
  req.mutable_patterns()->Add(xi_.begin(), xi_.begin() + 2 * kDim);
  req.add_ids(1);
  req.add_ids(2);
  ASSERT_TRUE(Store(req).ok());  // expire at now + 60 s
  v1::StoreRequest longer = req;
  longer.clear_ids();
  longer.clear_patterns();
  longer.mutable_patterns()->Add(xi_.begin() + 2 * kDim, xi_.begin() + 3 * kDim);
  longer.add_ids(3);
  longer.set_ttl_seconds(3600);
  ASSERT_TRUE(Store(longer).ok());
  v1::RetrieveResponse resp;
  ASSERT_TRUE(Retrieve(Query("t", 0), &resp).ok());
  EXPECT_EQ(resp.results(0).nearest().id(), 1u);
  {
    grpc::ClientContext ctx;
    v1::GetPatternsRequest get;
    get.set_bank("t");
    v1::GetPatternsResponse got;
    ASSERT_TRUE(stub_->GetPatterns(&ctx, get, &got).ok());
    ASSERT_EQ(got.expires_unix_ms_size(), 3);
    EXPECT_EQ(got.expires_unix_ms(0), now_ms_.load() + 60'000);
    EXPECT_EQ(got.expires_unix_ms(2), now_ms_.load() + 3'600'000);
  }
  now_ms_ += 60'000;
  // The sweep has not run: the read finds the expired patterns, deletes
  // them and answers from what is left.
  ASSERT_TRUE(Retrieve(Query("t", 0), &resp).ok());
  EXPECT_EQ(resp.results(0).nearest().id(), 3u);
  EXPECT_EQ(*server_->ExpireNow(), 0);
  const v1::BankInfo info = Info("t");
  EXPECT_EQ(info.patterns(), 1u);
  EXPECT_EQ(info.ttl_seconds(), 60u);
  now_ms_ += 3'600'000;
  v1::RetrieveResponse none;
  grpc::Status s = Retrieve(Query("t", 0), &none);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("expired"));
}

TEST_F(MemoryFeaturesTest, TheSweepDeletesExpiredPatternsNoReadTouched) {
  ASSERT_TRUE(Create("t", 0, 4.0, /*ttl=*/1).ok());
  ASSERT_TRUE(Create("u", 0, 4.0).ok());
  v1::StoreRequest req;
  req.set_bank("t");
  req.mutable_patterns()->Add(xi_.begin(), xi_.begin() + 3 * kDim);
  ASSERT_TRUE(Store(req).ok());
  req.set_bank("u");
  req.set_ttl_seconds(2);
  ASSERT_TRUE(Store(req).ok());
  now_ms_ += 1'000;
  EXPECT_EQ(*server_->ExpireNow(), 3);  // t's patterns; u's live another second
  now_ms_ += 1'000;
  EXPECT_EQ(*server_->ExpireNow(), 3);
  EXPECT_EQ(*server_->ExpireNow(), 0);
  EXPECT_EQ((*server_->registry()->Snapshot("t"))->size(), 0);
  EXPECT_EQ((*server_->registry()->Snapshot("u"))->size(), 0);
}

TEST_F(MemoryFeaturesTest, RestartKeepsValuesLabelsAndExpiries) {
  ASSERT_TRUE(Create("kv", kValueDim, 4.0, 100).ok());
  Fill("kv");
  v1::GetPatternsResponse before = AllPatterns("kv");
  ASSERT_EQ(before.values_size(), kPatterns * kValueDim);
  for (int i = 0; i < before.values_size(); ++i) EXPECT_EQ(before.values(i), v_[i]);
  server_.reset();
  Start();
  v1::GetPatternsResponse after = AllPatterns("kv");
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(before, after));
  const v1::BankInfo info = Info("kv");
  EXPECT_EQ(info.value_dim(), static_cast<uint32_t>(kValueDim));
  EXPECT_EQ(info.ttl_seconds(), 100u);
}

// A bank whose weights halve every 60 s: two equally good matches stored a
// half-life apart weigh 1 : 2, so the energy at their midpoint is the
// closed form below, measured at the call's time, and retrieval finds the
// newer one. Energies that cannot decay are refused; a restart keeps the
// half-life and every store time.
TEST_F(MemoryFeaturesTest, DecayingBankWeighsPatternsByAge) {
  ASSERT_TRUE(Create("d", 0, 4.0, 0, /*half_life=*/60).ok());
  const int64_t t0 = now_ms_.load();
  for (int r = 0; r < 2; ++r) {
    v1::StoreRequest req;
    req.set_bank("d");
    for (int i = 0; i < kDim; ++i) req.add_patterns(i == r ? 1.f : 0.f);
    req.add_ids(r + 1);
    ASSERT_TRUE(Store(req).ok());
    if (r == 0) now_ms_ += 60'000;
  }
  auto midpoint = [&] {
    grpc::ClientContext ctx;
    v1::EnergyRequest req;
    req.set_bank("d");
    for (int i = 0; i < kDim; ++i) req.add_states(i < 2 ? 0.5f : 0.f);
    req.set_return_novelty(true);
    v1::EnergyResponse resp;
    EXPECT_TRUE(stub_->Energy(&ctx, req, &resp).ok());
    return resp;
  };
  auto energy_at_midpoint = [&] { return midpoint().energies(0); };
  // lse, beta 4: E = -(1/4) log sum_mu 2^(-age_mu / 60 s) e^(4 * 0.5) + |x|^2 / 2.
  const double beta = 4.0;
  auto closed_form = [&](double weights) {
    return -(std::log(weights) + beta * 0.5) / beta + 0.25;
  };
  const v1::EnergyResponse first = midpoint();
  EXPECT_NEAR(first.energies(0), closed_form(0.5 + 1.0), 1e-6);
  // Novelty among the stored patterns' own energies, E(a) and E(b) in closed
  // form: the midpoint lies between them, so half of them are below it.
  const double e_a = -std::log(0.5 * std::exp(beta) + 1.0) / beta + 0.5;
  const double e_b = -std::log(0.5 + std::exp(beta)) / beta + 0.5;
  const double mean = 0.5 * (e_a + e_b), sd = 0.5 * std::fabs(e_a - e_b);
  EXPECT_EQ(first.novelty(0), 0.5);
  EXPECT_NEAR(first.novelty_z(0), (first.energies(0) - mean) / sd, 1e-6);
  now_ms_ += 60'000;
  // A minute later every energy is higher by the same amount: the novelty
  // and its z-score stay.
  const v1::EnergyResponse later = midpoint();
  EXPECT_NEAR(later.energies(0), closed_form(0.25 + 0.5), 1e-6);
  EXPECT_EQ(later.novelty(0), 0.5);
  EXPECT_NEAR(later.novelty_z(0), first.novelty_z(0), 1e-9);
  v1::RetrieveRequest ret;
  ret.set_bank("d");
  for (int i = 0; i < kDim; ++i) ret.add_queries(i < 2 ? 0.5f : 0.f);
  ret.mutable_energy()->set_family(v1::ENERGY_FAMILY_LSE);
  ret.mutable_energy()->set_beta(40.0);
  v1::RetrieveResponse resp;
  ASSERT_TRUE(Retrieve(ret, &resp).ok());
  EXPECT_EQ(resp.results(0).nearest().id(), 2u);
  // Energies and dynamics with no weights to decay.
  v1::RetrieveRequest sparse = ret;
  sparse.mutable_energy()->set_family(v1::ENERGY_FAMILY_GENERAL);
  sparse.mutable_energy()->set_separation(v1::SEPARATION_SPARSEMAX);
  grpc::Status s = Retrieve(sparse, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("decays with age"));
  v1::RetrieveRequest tiny = ret;
  tiny.mutable_options()->set_dynamics(v1::DYNAMICS_TINYBRAIN);
  EXPECT_EQ(Retrieve(tiny, &resp).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  {
    grpc::ClientContext ctx;
    v1::CreateBankRequest req;
    req.set_name("bip");
    req.set_dim(kDim);
    req.set_kind(v1::STATE_KIND_BIPOLAR);
    req.set_decay_half_life_seconds(60);
    v1::BankInfo info;
    EXPECT_EQ(stub_->CreateBank(&ctx, req, &info).error_code(),
              grpc::StatusCode::FAILED_PRECONDITION);
  }
  EXPECT_EQ(Create("far", 0, 4.0, 0, uint64_t{1} << 40).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  const v1::GetPatternsResponse before = AllPatterns("d");
  ASSERT_EQ(before.stored_unix_ms_size(), 2);
  EXPECT_EQ(before.stored_unix_ms(0), t0);
  EXPECT_EQ(before.stored_unix_ms(1), t0 + 60'000);
  server_.reset();
  Start();
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(before, AllPatterns("d")));
  EXPECT_EQ(Info("d").decay_half_life_seconds(), 60u);
  v1::ListBanksResponse banks;
  grpc::ClientContext list_ctx;
  ASSERT_TRUE(stub_->ListBanks(&list_ctx, v1::ListBanksRequest(), &banks).ok());
  EXPECT_EQ(banks.banks_size(), 1);  // the refused banks were not created
  EXPECT_NEAR(energy_at_midpoint(), closed_form(0.25 + 0.5), 1e-6);
}

TEST_F(MemoryFeaturesTest, BadInputGetsItsCodeAndChangesNothing) {
  ASSERT_TRUE(Create("kv", kValueDim).ok());
  ASSERT_TRUE(Create("plain", 0).ok());
  Fill("kv");
  auto count = [&](const std::string& bank) { return Info(bank).patterns(); };
  struct Case {
    const char* what;
    v1::StoreRequest req;
  };
  std::vector<Case> cases;
  v1::StoreRequest base;
  base.set_bank("kv");
  base.mutable_patterns()->Add(xi_.begin(), xi_.begin() + kDim);
  base.add_ids(1000);
  cases.push_back({"values missing", base});
  v1::StoreRequest short_values = base;
  short_values.add_values(1.f);
  cases.push_back({"values too short", short_values});
  v1::StoreRequest nan_values = base;
  for (int j = 0; j < kValueDim; ++j) nan_values.add_values(j == 1 ? NAN : 1.f);
  cases.push_back({"NaN value", nan_values});
  v1::StoreRequest plain = base;
  plain.set_bank("plain");
  for (int j = 0; j < kValueDim; ++j) plain.add_values(1.f);
  cases.push_back({"values on a bank without values", plain});
  v1::StoreRequest labels = nan_values;
  labels.clear_values();
  for (int j = 0; j < kValueDim; ++j) labels.add_values(1.f);
  (*labels.add_labels()->mutable_strings())["k"] = "a";
  (*labels.mutable_labels(0)->mutable_ints())["k"] = 1;
  cases.push_back({"a key both string and integer", labels});
  v1::StoreRequest ttl = labels;
  ttl.clear_labels();
  ttl.set_ttl_seconds(uint64_t{1} << 62);
  cases.push_back({"ttl past 100 years", ttl});
  for (const Case& c : cases) {
    grpc::Status s = Store(c.req);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.what;
  }
  EXPECT_EQ(count("kv"), static_cast<uint64_t>(kPatterns));
  EXPECT_EQ(count("plain"), 0u);

  v1::RetrieveResponse resp;
  v1::Filter no_test;
  no_test.add_conditions()->set_key("parity");
  EXPECT_EQ(Retrieve(Query("kv", 0, &no_test), &resp).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  v1::Filter bad_range;
  bad_range.add_conditions()->set_key("year");
  bad_range.mutable_conditions(0)->mutable_int_range()->set_min(5);
  EXPECT_EQ(Retrieve(Query("kv", 0, &bad_range), &resp).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  v1::Filter none;
  none.add_conditions()->set_key("parity");
  none.mutable_conditions(0)->set_equals("neither");
  grpc::Status s = Retrieve(Query("kv", 0, &none), &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("passes the filter"));
  grpc::ClientContext ctx;
  v1::CreateBankRequest big;
  big.set_name("big");
  big.set_dim(4);
  big.set_kind(v1::STATE_KIND_CONTINUOUS);
  big.set_value_dim((1u << 20) + 1);
  v1::BankInfo info;
  EXPECT_EQ(stub_->CreateBank(&ctx, big, &info).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

}  // namespace
}  // namespace engram::server
