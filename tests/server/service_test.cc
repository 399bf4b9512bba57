// MemoryService through a real grpc::Server (in-process channel): results,
// every bad-input class of SPEC section 6 with its code, state unchanged
// after each rejection, and the RPC metrics.
#include <filesystem>
#include <limits>
#include <random>
#include <regex>
#include <thread>
#include <tuple>

#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <prometheus/text_serializer.h>

#include "engram/v1/engram.grpc.pb.h"
#include "engram/core/dynamics.h"
#include "server/server.h"
#include "testing/random_banks.h"

namespace engram::server {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

class ServiceTest : public ::testing::Test {
 public:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("engram_service_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    ServerConfig config;
    config.listen = "127.0.0.1:0";
    config.data_dir = dir_.string();
    config.metrics_listen = "";
    config.memory_budget_bytes = 8 << 20;
    config.max_message_bytes = 4 << 20;
    config.max_batch = 1000;
    auto s = EngramServer::Start(config);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    stub_ = v1::MemoryService::NewStub(server_->InProcessChannel());
  }
  void TearDown() override {
    server_.reset();
    std::filesystem::remove_all(dir_);
  }

  grpc::Status Create(const std::string& name, int dim, v1::StateKind kind,
                      v1::EnergyFamily family = v1::ENERGY_FAMILY_UNSPECIFIED,
                      double beta = 0) {
    grpc::ClientContext ctx;
    v1::CreateBankRequest req;
    req.set_name(name);
    req.set_dim(dim);
    req.set_kind(kind);
    req.mutable_energy()->set_family(family);
    req.mutable_energy()->set_beta(beta);
    v1::BankInfo info;
    return stub_->CreateBank(&ctx, req, &info);
  }

  grpc::Status Store(const std::string& bank, const std::vector<float>& data,
                     std::vector<uint64_t> ids = {}, std::vector<std::string> payloads = {},
                     v1::StoreResponse* out = nullptr) {
    grpc::ClientContext ctx;
    v1::StoreRequest req;
    req.set_bank(bank);
    req.mutable_patterns()->Add(data.begin(), data.end());
    req.mutable_ids()->Add(ids.begin(), ids.end());
    for (auto& p : payloads) req.add_payloads(p);
    v1::StoreResponse resp;
    auto s = stub_->Store(&ctx, req, &resp);
    if (out) *out = resp;
    return s;
  }

  v1::BankInfo Info(const std::string& name) {
    grpc::ClientContext ctx;
    v1::GetBankRequest req;
    req.set_name(name);
    v1::BankInfo info;
    EXPECT_TRUE(stub_->GetBank(&ctx, req, &info).ok());
    return info;
  }

  // A fingerprint of the bank's content: K and the energy at a fixed probe.
  std::pair<uint64_t, double> Fingerprint(const std::string& name, int dim) {
    grpc::ClientContext ctx;
    v1::EnergyRequest req;
    req.set_bank(name);
    for (int i = 0; i < dim; ++i) req.add_states(0.1f * ((i % 7) - 3));
    v1::EnergyResponse resp;
    EXPECT_TRUE(stub_->Energy(&ctx, req, &resp).ok());
    return {Info(name).patterns(), resp.energies(0)};
  }

  std::filesystem::path dir_;
  std::unique_ptr<EngramServer> server_;
  std::unique_ptr<v1::MemoryService::Stub> stub_;
};

TEST_F(ServiceTest, StoreThenRetrieveRecallsIdAndPayload) {
  const int n = 128, k = 6;
  std::mt19937_64 rng(3);
  auto xi = engram::testing::RandomBipolar(n * k, rng);
  ASSERT_TRUE(Create("bits", n, v1::STATE_KIND_BIPOLAR).ok());
  std::vector<std::string> payloads;
  for (int i = 0; i < k; ++i) payloads.push_back("memory-" + std::to_string(i));
  v1::StoreResponse stored;
  ASSERT_TRUE(Store("bits", xi, {}, payloads, &stored).ok());
  ASSERT_EQ(stored.ids_size(), k);
  EXPECT_EQ(stored.bank_patterns(), static_cast<uint64_t>(k));

  v1::RetrieveRequest req;
  req.set_bank("bits");
  for (int mu = 0; mu < k; ++mu) {
    auto q = engram::testing::FlipBits(xi.data() + mu * n, n, n / 8, rng);
    req.mutable_queries()->Add(q.begin(), q.end());
  }
  req.mutable_options()->set_dynamics(v1::DYNAMICS_ASYNC);
  req.mutable_options()->set_return_trace(true);
  grpc::ClientContext ctx;
  v1::RetrieveResponse resp;
  ASSERT_TRUE(stub_->Retrieve(&ctx, req, &resp).ok());
  ASSERT_EQ(resp.results_size(), k);
  for (int mu = 0; mu < k; ++mu) {
    const auto& r = resp.results(mu);
    EXPECT_EQ(r.nearest().id(), stored.ids(mu));
    EXPECT_EQ(r.nearest().payload(), payloads[mu]);
    EXPECT_EQ(r.nearest().distance(), 0.0);
    EXPECT_TRUE(r.converged());
    EXPECT_EQ(r.stop_reason(), v1::STOP_REASON_CONVERGED);
    EXPECT_LT(r.energy_end(), r.energy_start());
    EXPECT_EQ(r.energy_trace_size(), static_cast<int>(r.steps()) + 1);
    EXPECT_EQ(r.lyapunov_violations(), 0u);
  }
  auto info = Info("bits");
  EXPECT_EQ(info.patterns(), static_cast<uint64_t>(k));
  EXPECT_NEAR(info.load(), double(k) / n, 1e-12);
  EXPECT_NEAR(info.capacity().patterns(), 0.138 * n, 1e-9);
  EXPECT_FALSE(info.capacity().over_capacity());
}

TEST_F(ServiceTest, EnergyAndGradientMatchLseClosedForm) {
  // One stored pattern xi: E = -1/beta log exp(beta xi.x) + |x|^2/2
  // = -xi.x + |x|^2/2, grad = x - xi.
  ASSERT_TRUE(Create("one", 3, v1::STATE_KIND_CONTINUOUS, v1::ENERGY_FAMILY_LSE, 2.0).ok());
  ASSERT_TRUE(Store("one", {1, 2, 3}).ok());
  grpc::ClientContext ctx;
  v1::EnergyRequest req;
  req.set_bank("one");
  for (float v : {0.5f, -1.f, 2.f}) req.add_states(v);
  req.set_return_gradient(true);
  v1::EnergyResponse resp;
  ASSERT_TRUE(stub_->Energy(&ctx, req, &resp).ok());
  const double dot = 0.5 - 2 + 6, sq = 0.25 + 1 + 4;
  EXPECT_NEAR(resp.energies(0), -dot + sq / 2, 1e-5);
  EXPECT_NEAR(resp.gradients(0), 0.5 - 1, 1e-5);
  EXPECT_NEAR(resp.gradients(1), -1 - 2, 1e-5);
  EXPECT_NEAR(resp.gradients(2), 2 - 3, 1e-5);
}

struct BadCase {
  std::string what;
  grpc::StatusCode code;
  std::function<grpc::Status(ServiceTest*, v1::MemoryService::Stub*)> call;
};

TEST_F(ServiceTest, EveryBadInputGetsItsCodeAndChangesNothing) {
  const int n = 8;
  ASSERT_TRUE(Create("cont", n, v1::STATE_KIND_CONTINUOUS).ok());
  ASSERT_TRUE(Create("bip", n, v1::STATE_KIND_BIPOLAR).ok());
  std::mt19937_64 rng(5);
  auto data = engram::testing::RandomGaussian(4 * n, rng);
  ASSERT_TRUE(Store("cont", data, {1, 2, 3, 4}).ok());
  ASSERT_TRUE(Store("bip", engram::testing::RandomBipolar(3 * n, rng)).ok());
  const auto before_cont = Fingerprint("cont", n);
  const auto before_bip = Fingerprint("bip", n);

  using S = v1::MemoryService::Stub;
  auto store = [](std::string bank, std::vector<float> v, std::vector<uint64_t> ids = {}) {
    return [=](ServiceTest* t, S*) { return t->Store(bank, v, ids); };
  };
  auto retrieve = [](std::function<void(v1::RetrieveRequest*)> edit) {
    return [=](ServiceTest*, S* stub) {
      v1::RetrieveRequest req;
      req.set_bank("cont");
      for (int i = 0; i < 8; ++i) req.add_queries(0.5f);
      edit(&req);
      grpc::ClientContext ctx;
      v1::RetrieveResponse resp;
      return stub->Retrieve(&ctx, req, &resp);
    };
  };
  auto create = [](std::function<void(v1::CreateBankRequest*)> edit) {
    return [=](ServiceTest*, S* stub) {
      v1::CreateBankRequest req;
      req.set_name("fresh");
      req.set_dim(4);
      req.set_kind(v1::STATE_KIND_CONTINUOUS);
      edit(&req);
      grpc::ClientContext ctx;
      v1::BankInfo info;
      return stub->CreateBank(&ctx, req, &info);
    };
  };
  const float nan = std::nanf("");
  std::vector<float> with_nan(n, 0.f);
  with_nan[3] = nan;
  std::vector<float> with_inf(n, 0.f);
  with_inf[0] = INFINITY;
  std::vector<BadCase> cases = {
      {"store dimension mismatch", grpc::INVALID_ARGUMENT, store("cont", std::vector<float>(n + 1, 0.f))},
      {"store NaN", grpc::INVALID_ARGUMENT, store("cont", with_nan)},
      {"store Inf", grpc::INVALID_ARGUMENT, store("cont", with_inf)},
      {"store empty", grpc::INVALID_ARGUMENT, store("cont", {})},
      {"store non-bipolar into bipolar", grpc::INVALID_ARGUMENT, store("bip", std::vector<float>(n, 0.5f))},
      {"store bad name", grpc::INVALID_ARGUMENT, store("../etc/passwd", std::vector<float>(n, 0.f))},
      {"store unknown bank", grpc::NOT_FOUND, store("nope", std::vector<float>(n, 0.f))},
      {"store existing id", grpc::ALREADY_EXISTS, store("cont", std::vector<float>(2 * n, 0.f), {9, 2})},
      {"store ids count mismatch", grpc::INVALID_ARGUMENT, store("cont", std::vector<float>(2 * n, 0.f), {9})},
      {"store over batch limit", grpc::INVALID_ARGUMENT, store("cont", std::vector<float>(1001 * n, 0.f))},
      {"store over message size", grpc::RESOURCE_EXHAUSTED,
       store("cont", std::vector<float>(n * 200000, 0.f))},
      {"retrieve dimension mismatch", grpc::INVALID_ARGUMENT,
       retrieve([](auto* r) { r->add_queries(1.f); })},
      {"retrieve NaN", grpc::INVALID_ARGUMENT,
       retrieve([nan](auto* r) { r->set_queries(2, nan); })},
      {"retrieve empty", grpc::INVALID_ARGUMENT, retrieve([](auto* r) { r->clear_queries(); })},
      {"retrieve unknown bank", grpc::NOT_FOUND, retrieve([](auto* r) { r->set_bank("nope"); })},
      {"retrieve bad name", grpc::INVALID_ARGUMENT, retrieve([](auto* r) { r->set_bank("Bad Name"); })},
      {"retrieve unknown dynamics", grpc::INVALID_ARGUMENT,
       retrieve([](auto* r) { r->mutable_options()->set_dynamics(static_cast<v1::Dynamics>(42)); })},
      {"retrieve unknown family", grpc::INVALID_ARGUMENT,
       retrieve([](auto* r) { r->mutable_energy()->set_family(static_cast<v1::EnergyFamily>(77)); })},
      {"retrieve mask out of range", grpc::INVALID_ARGUMENT,
       retrieve([](auto* r) { for (int i = 0; i < 5; ++i) r->add_clamp(true); })},
      {"retrieve negative beta", grpc::INVALID_ARGUMENT,
       retrieve([](auto* r) {
         r->mutable_energy()->set_family(v1::ENERGY_FAMILY_LSE);
         r->mutable_energy()->set_beta(-1);
       })},
      {"retrieve max_steps too large", grpc::INVALID_ARGUMENT,
       retrieve([](auto* r) { r->mutable_options()->set_max_steps(1000000); })},
      {"retrieve async on continuous", grpc::FAILED_PRECONDITION,
       retrieve([](auto* r) { r->mutable_options()->set_dynamics(v1::DYNAMICS_ASYNC); })},
      {"retrieve classical on continuous", grpc::FAILED_PRECONDITION,
       retrieve([](auto* r) { r->mutable_energy()->set_family(v1::ENERGY_FAMILY_CLASSICAL); })},
      {"create duplicate", grpc::ALREADY_EXISTS, create([](auto* r) { r->set_name("cont"); })},
      {"create bad name", grpc::INVALID_ARGUMENT, create([](auto* r) { r->set_name("UPPER"); })},
      {"create zero dim", grpc::INVALID_ARGUMENT, create([](auto* r) { r->set_dim(0); })},
      {"create unspecified kind", grpc::INVALID_ARGUMENT,
       create([](auto* r) { r->set_kind(v1::STATE_KIND_UNSPECIFIED); })},
      {"create unknown kind", grpc::INVALID_ARGUMENT,
       create([](auto* r) { r->set_kind(static_cast<v1::StateKind>(9)); })},
      {"create unknown precision", grpc::INVALID_ARGUMENT,
       create([](auto* r) { r->set_precision(static_cast<v1::Precision>(9)); })},
      {"create polynomial degree 0 of 13", grpc::INVALID_ARGUMENT,
       create([](auto* r) {
         r->set_kind(v1::STATE_KIND_BIPOLAR);
         r->mutable_energy()->set_family(v1::ENERGY_FAMILY_POLYNOMIAL);
         r->mutable_energy()->set_degree(13);
       })},
      {"delete unknown id", grpc::NOT_FOUND,
       [](ServiceTest*, S* stub) {
         v1::DeletePatternsRequest req;
         req.set_bank("cont");
         req.add_ids(1);
         req.add_ids(999);  // absent: nothing is deleted, not even id 1
         grpc::ClientContext ctx;
         v1::DeletePatternsResponse resp;
         return stub->DeletePatterns(&ctx, req, &resp);
       }},
      {"delete unknown bank", grpc::NOT_FOUND,
       [](ServiceTest*, S* stub) {
         v1::DeleteBankRequest req;
         req.set_name("nope");
         grpc::ClientContext ctx;
         v1::DeleteBankResponse resp;
         return stub->DeleteBank(&ctx, req, &resp);
       }},
      {"energy dimension mismatch", grpc::INVALID_ARGUMENT,
       [](ServiceTest*, S* stub) {
         v1::EnergyRequest req;
         req.set_bank("cont");
         req.add_states(1.f);
         grpc::ClientContext ctx;
         v1::EnergyResponse resp;
         return stub->Energy(&ctx, req, &resp);
       }},
  };
  for (const auto& c : cases) {
    grpc::Status s = c.call(this, stub_.get());
    EXPECT_EQ(s.error_code(), c.code) << c.what << ": " << s.error_message();
    EXPECT_FALSE(s.error_message().empty()) << c.what;
    EXPECT_EQ(Fingerprint("cont", n), before_cont) << c.what;
    EXPECT_EQ(Fingerprint("bip", n), before_bip) << c.what;
  }
  // No bank appeared.
  grpc::ClientContext ctx;
  v1::ListBanksResponse list;
  ASSERT_TRUE(stub_->ListBanks(&ctx, v1::ListBanksRequest(), &list).ok());
  EXPECT_EQ(list.banks_size(), 2);
}

TEST_F(ServiceTest, MemoryBudgetIsResourceExhaustedAndChangesNothing) {
  const int n = 100000;  // 400 kB per pattern; the budget is 8 MiB
  ASSERT_TRUE(Create("wide", n, v1::STATE_KIND_CONTINUOUS).ok());
  std::vector<float> batch(8 * n, 0.25f);
  ASSERT_TRUE(Store("wide", batch).ok());
  ASSERT_TRUE(Store("wide", batch).ok());
  const auto before = Fingerprint("wide", n);
  auto s = Store("wide", batch);
  EXPECT_EQ(s.error_code(), grpc::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("memory budget"));
  EXPECT_EQ(Fingerprint("wide", n), before);
}

TEST_F(ServiceTest, DeadlineStopsAHugeRetrievalBetweenSteps) {
  const int n = 512, k = 4000;
  ASSERT_TRUE(Create("big", n, v1::STATE_KIND_CONTINUOUS, v1::ENERGY_FAMILY_LSE, 0.01).ok());
  std::mt19937_64 rng(9);
  for (int chunk = 0; chunk < 4; ++chunk) {
    ASSERT_TRUE(Store("big", engram::testing::RandomGaussian(n * (k / 4), rng)).ok());
  }
  v1::RetrieveRequest req;
  req.set_bank("big");
  auto q = engram::testing::RandomGaussian(n * 50, rng);
  req.mutable_queries()->Add(q.begin(), q.end());
  req.mutable_options()->set_dynamics(v1::DYNAMICS_GRADIENT);
  req.mutable_options()->set_alpha(1e-6);
  req.mutable_options()->set_max_steps(100000);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(50));
  v1::RetrieveResponse resp;
  auto s = stub_->Retrieve(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::DEADLINE_EXCEEDED) << s.error_message();
}

TEST_F(ServiceTest, PartialOnDeadlineReturnsPartialStates) {
  const int n = 256, k = 2000;
  ASSERT_TRUE(Create("big", n, v1::STATE_KIND_CONTINUOUS, v1::ENERGY_FAMILY_LSE, 0.01).ok());
  std::mt19937_64 rng(10);
  ASSERT_TRUE(Store("big", engram::testing::RandomGaussian(n * k / 2, rng)).ok());
  ASSERT_TRUE(Store("big", engram::testing::RandomGaussian(n * k / 2, rng)).ok());
  v1::RetrieveRequest req;
  req.set_bank("big");
  auto q = engram::testing::RandomGaussian(n, rng);
  req.mutable_queries()->Add(q.begin(), q.end());
  req.mutable_options()->set_dynamics(v1::DYNAMICS_GRADIENT);
  req.mutable_options()->set_alpha(1e-6);
  req.mutable_options()->set_max_steps(100000);
  req.mutable_options()->set_partial_on_deadline(true);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
  v1::RetrieveResponse resp;
  auto s = stub_->Retrieve(&ctx, req, &resp);
  // The server answers just before the deadline; the client may still see
  // DEADLINE_EXCEEDED if the reply arrives after it.
  if (s.ok()) {
    ASSERT_EQ(resp.results_size(), 1);
    EXPECT_EQ(resp.results(0).stop_reason(), v1::STOP_REASON_DEADLINE);
    EXPECT_GT(resp.results(0).steps(), 0u);
    EXPECT_LT(resp.results(0).steps(), 100000u);
  } else {
    EXPECT_EQ(s.error_code(), grpc::DEADLINE_EXCEEDED);
  }
}

TEST_F(ServiceTest, SampleReturnsMemoriesWithPayloadsAndCountsClasses) {
  const int n = 8;
  ASSERT_TRUE(Create("mem", n, v1::STATE_KIND_CONTINUOUS, v1::ENERGY_FAMILY_GAUSSIAN).ok());
  std::vector<float> xi(3 * n, 0.f);
  xi[0] = 5;
  xi[n + 1] = 5;
  xi[2 * n + 2] = -5;
  ASSERT_TRUE(Store("mem", xi, {10, 11, 12}, {"a", "b", "c"}).ok());
  v1::SampleRequest req;
  req.set_bank("mem");
  req.set_count(12);
  req.set_seed(4);
  req.mutable_schedule()->set_sigma_max(30);
  req.mutable_schedule()->set_steps(48);
  grpc::ClientContext ctx;
  v1::SampleResponse resp;
  auto s = stub_->Sample(&ctx, req, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(resp.samples_size(), 12);
  EXPECT_EQ(resp.sigmas_size(), 49);  // 48 levels and the final 0
  for (const auto& r : resp.samples()) {
    EXPECT_EQ(r.sample_class(), v1::SAMPLE_CLASS_MEMORIZED);
    const std::string want = r.nearest().id() == 10 ? "a" : r.nearest().id() == 11 ? "b" : "c";
    EXPECT_EQ(r.nearest().payload(), want);
    EXPECT_LT(r.nearest().distance(), 1e-3);
  }
  // Same request, same bytes.
  grpc::ClientContext ctx2;
  v1::SampleResponse again;
  ASSERT_TRUE(stub_->Sample(&ctx2, req, &again).ok());
  EXPECT_EQ(again.SerializeAsString(), resp.SerializeAsString());

  prometheus::TextSerializer ser;
  const std::string text = ser.Serialize(server_->metrics()->registry()->Collect());
  EXPECT_THAT(text, HasSubstr(
      "engram_samples_total{bank=\"mem\",class=\"memorized\",sampler=\"heun\"} 24"));
}

TEST_F(ServiceTest, SampleStreamYieldsFramesThenTheResult) {
  const int n = 4;
  ASSERT_TRUE(Create("st", n, v1::STATE_KIND_CONTINUOUS, v1::ENERGY_FAMILY_GAUSSIAN).ok());
  ASSERT_TRUE(Store("st", {3, 0, 0, 0, 0, 3, 0, 0}).ok());
  v1::SampleRequest req;
  req.set_bank("st");
  req.set_count(2);
  req.set_sampler(v1::SAMPLER_EULER);
  req.mutable_schedule()->set_steps(10);
  req.mutable_schedule()->set_sigma_max(10);
  req.set_trajectory_every(2);
  grpc::ClientContext ctx;
  auto reader = stub_->SampleStream(&ctx, req);
  v1::SampleFrame frame;
  std::vector<v1::SampleFrame> frames;
  while (reader->Read(&frame)) frames.push_back(frame);
  ASSERT_TRUE(reader->Finish().ok());
  ASSERT_EQ(frames.size(), 6u);  // steps 2, 4, 6, 8, 10 and the result
  for (size_t i = 0; i + 1 < frames.size(); ++i) {
    EXPECT_EQ(frames[i].step(), 2 * (i + 1));
    EXPECT_EQ(frames[i].states_size(), 2 * n);
    EXPECT_FALSE(frames[i].has_result());
  }
  ASSERT_TRUE(frames.back().has_result());
  EXPECT_EQ(frames.back().result().samples_size(), 2);
  // The last streamed states are the final samples.
  for (int i = 0; i < n; ++i) {
    EXPECT_EQ(frames[4].states(i), frames.back().result().samples(0).state(i));
  }
  // Trajectory: start plus every 2nd step.
  EXPECT_EQ(frames.back().result().samples(0).trajectory_size(), 6);
}

TEST_F(ServiceTest, SampleRejectsBadInput) {
  ASSERT_TRUE(Create("sb", 4, v1::STATE_KIND_BIPOLAR).ok());
  ASSERT_TRUE(Store("sb", {1, -1, 1, -1}).ok());
  auto call = [&](std::function<void(v1::SampleRequest*)> edit) {
    v1::SampleRequest req;
    req.set_bank("sb");
    edit(&req);
    grpc::ClientContext ctx;
    v1::SampleResponse resp;
    return stub_->Sample(&ctx, req, &resp).error_code();
  };
  EXPECT_EQ(call([](auto*) {}), grpc::OK);  // annealed_am by default on bipolar
  EXPECT_EQ(call([](auto* r) { r->set_sampler(v1::SAMPLER_HEUN); }), grpc::FAILED_PRECONDITION);
  EXPECT_EQ(call([](auto* r) { r->set_sampler(static_cast<v1::Sampler>(99)); }),
            grpc::INVALID_ARGUMENT);
  EXPECT_EQ(call([](auto* r) { r->mutable_schedule()->set_kind(static_cast<v1::ScheduleKind>(9)); }),
            grpc::INVALID_ARGUMENT);
  EXPECT_EQ(call([](auto* r) {
              r->mutable_schedule()->set_sigma_min(5);
              r->mutable_schedule()->set_sigma_max(1);
            }),
            grpc::INVALID_ARGUMENT);
  EXPECT_EQ(call([](auto* r) { r->set_count(5000); }), grpc::INVALID_ARGUMENT);
  EXPECT_EQ(call([](auto* r) { r->add_query(0.5f); }), grpc::INVALID_ARGUMENT);
  EXPECT_EQ(call([](auto* r) { r->add_clamp(true); }), grpc::INVALID_ARGUMENT);
  EXPECT_EQ(call([](auto* r) { r->set_bank("none"); }), grpc::NOT_FOUND);
}

TEST(ServiceAuth, TokenRequiredOnEveryCallAndNothingChangesWithout) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("engram_auth_test_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  ServerConfig config;
  config.listen = "127.0.0.1:0";
  config.data_dir = dir.string();
  config.metrics_listen = "";
  config.auth_token = "s3cret-token";
  auto server = EngramServer::Start(config);
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::MemoryService::NewStub((*server)->InProcessChannel());
  auto create = [&](const std::string& header) {
    grpc::ClientContext ctx;
    if (!header.empty()) ctx.AddMetadata("authorization", header);
    v1::CreateBankRequest req;
    req.set_name("a");
    req.set_dim(2);
    req.set_kind(v1::STATE_KIND_CONTINUOUS);
    v1::BankInfo info;
    return stub->CreateBank(&ctx, req, &info);
  };
  EXPECT_EQ(create("").error_code(), grpc::UNAUTHENTICATED);
  EXPECT_EQ(create("Bearer wrong-token!").error_code(), grpc::UNAUTHENTICATED);
  EXPECT_EQ(create("Bearer s3cret-tokem").error_code(), grpc::UNAUTHENTICATED);
  EXPECT_EQ(create("s3cret-token").error_code(), grpc::UNAUTHENTICATED);
  EXPECT_EQ((*server)->registry()->ListBanks().size(), 0u);
  {
    grpc::ClientContext ctx;
    v1::ListBanksResponse list;
    EXPECT_EQ(stub->ListBanks(&ctx, v1::ListBanksRequest(), &list).error_code(),
              grpc::UNAUTHENTICATED);
    grpc::ClientContext sctx;
    v1::SampleRequest sreq;
    sreq.set_bank("a");
    v1::SampleResponse sresp;
    EXPECT_EQ(stub->Sample(&sctx, sreq, &sresp).error_code(), grpc::UNAUTHENTICATED);
  }
  auto ok = create("Bearer s3cret-token");
  EXPECT_TRUE(ok.ok()) << ok.error_message();
  EXPECT_EQ((*server)->registry()->ListBanks().size(), 1u);
  server->reset();
  std::filesystem::remove_all(dir);
}

TEST_F(ServiceTest, MetricsCountCallsByMethodAndCode) {
  ASSERT_TRUE(Create("m", 2, v1::STATE_KIND_CONTINUOUS).ok());
  EXPECT_EQ(Create("m", 2, v1::STATE_KIND_CONTINUOUS).error_code(), grpc::ALREADY_EXISTS);
  EXPECT_EQ(Create("m", 2, v1::STATE_KIND_CONTINUOUS).error_code(), grpc::ALREADY_EXISTS);
  ASSERT_TRUE(Store("m", {1, 2, 3, 4}).ok());
  prometheus::TextSerializer ser;
  const std::string text = ser.Serialize(server_->metrics()->registry()->Collect());
  EXPECT_THAT(text, HasSubstr(
      "grpc_server_handled_total{grpc_code=\"AlreadyExists\",grpc_method=\"CreateBank\","
      "grpc_service=\"engram.v1.MemoryService\",grpc_type=\"unary\"} 2"));
  EXPECT_THAT(text, HasSubstr(
      "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"CreateBank\","
      "grpc_service=\"engram.v1.MemoryService\",grpc_type=\"unary\"} 1"));
  EXPECT_THAT(text, HasSubstr(
      "grpc_server_started_total{grpc_method=\"CreateBank\","
      "grpc_service=\"engram.v1.MemoryService\",grpc_type=\"unary\"} 3"));
  EXPECT_THAT(text, HasSubstr(
      "grpc_server_handling_seconds_count{grpc_method=\"Store\","
      "grpc_service=\"engram.v1.MemoryService\",grpc_type=\"unary\"} 1"));
  EXPECT_THAT(text, HasSubstr("engram_bank_patterns{bank=\"m\"} 2"));
}

// Paging past the end, up to the top of the 64-bit range, gives an empty
// page that ends at the bank's size: never rows of other memory (a start
// near 2^64 once wrapped the end of the page around and answered with
// whatever lay past the bank). Error messages quote bounded prefixes of
// what the client sent.
TEST_F(ServiceTest, PagingPastTheEndIsEmptyAndMessagesAreBounded) {
  ASSERT_TRUE(Create("pg", 2, v1::STATE_KIND_CONTINUOUS).ok());
  ASSERT_TRUE(Store("pg", {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, {}, {"a", "b", "c", "d", "e"}).ok());
  const uint64_t top = std::numeric_limits<uint64_t>::max();
  for (uint64_t start : {uint64_t{5}, uint64_t{6}, uint64_t{1} << 63, (uint64_t{1} << 63) + 5,
                         top - 2, top - 1, top}) {
    for (uint64_t size : {uint64_t{0}, uint64_t{1}, uint64_t{1000}}) {
      grpc::ClientContext ctx;
      v1::GetPatternsRequest req;
      req.set_bank("pg");
      req.set_page_start(start);
      req.set_page_size(size);
      v1::GetPatternsResponse resp;
      ASSERT_TRUE(stub_->GetPatterns(&ctx, req, &resp).ok()) << start << " " << size;
      EXPECT_EQ(resp.ids_size(), 0) << start;
      EXPECT_EQ(resp.patterns_size(), 0) << start;
      EXPECT_EQ(resp.payloads_size(), 0) << start;
      EXPECT_EQ(resp.next_page_start(), 5u) << start;
    }
  }
  {  // the last page holds exactly the rows left
    grpc::ClientContext ctx;
    v1::GetPatternsRequest req;
    req.set_bank("pg");
    req.set_page_start(3);
    req.set_page_size(1000);
    v1::GetPatternsResponse resp;
    ASSERT_TRUE(stub_->GetPatterns(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.ids_size(), 2);
    EXPECT_EQ(resp.payloads(1), "e");
    EXPECT_EQ(resp.next_page_start(), 5u);
  }
  grpc::ClientContext ctx;
  v1::BackupRequest req;
  req.set_file(std::string(10000, 'X'));
  v1::BackupResponse resp;
  const grpc::Status s = stub_->Backup(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_LT(s.error_message().size(), 200u) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("(10000 bytes)"));
}

// A bank's series (size, retrieval, sampling) leave /metrics with the bank,
// and a bank of the same name starts from zero.
TEST_F(ServiceTest, DeletedBankTakesItsSeriesWithIt) {
  prometheus::TextSerializer ser;
  auto text = [&] { return ser.Serialize(server_->metrics()->registry()->Collect()); };
  ASSERT_TRUE(Create("gone", 2, v1::STATE_KIND_CONTINUOUS).ok());
  ASSERT_TRUE(Store("gone", {1, 0, 0, 1}).ok());
  {
    grpc::ClientContext ctx;
    v1::RetrieveRequest req;
    req.set_bank("gone");
    req.mutable_queries()->Add(0.9f);
    req.mutable_queries()->Add(0.1f);
    v1::RetrieveResponse resp;
    ASSERT_TRUE(stub_->Retrieve(&ctx, req, &resp).ok());
    grpc::ClientContext sctx;
    v1::SampleRequest sreq;
    sreq.set_bank("gone");
    sreq.mutable_schedule()->set_steps(4);
    v1::SampleResponse sresp;
    ASSERT_TRUE(stub_->Sample(&sctx, sreq, &sresp).ok());
  }
  for (const char* family : {"engram_bank_patterns", "engram_retrieve_steps_count",
                             "engram_retrieve_stops_total", "engram_sample_steps_count"}) {
    EXPECT_THAT(text(), HasSubstr(std::string(family) + "{bank=\"gone\""));
  }
  {
    grpc::ClientContext ctx;
    v1::DeleteBankRequest req;
    req.set_name("gone");
    v1::DeleteBankResponse resp;
    ASSERT_TRUE(stub_->DeleteBank(&ctx, req, &resp).ok());
  }
  EXPECT_THAT(text(), Not(HasSubstr("bank=\"gone\"")));
  ASSERT_TRUE(Create("gone", 2, v1::STATE_KIND_CONTINUOUS).ok());
  EXPECT_THAT(text(), HasSubstr("engram_bank_patterns{bank=\"gone\"} 0"));
  EXPECT_THAT(text(), Not(HasSubstr("engram_retrieve_steps_count{bank=\"gone\"")));
}

// Reduced-precision and screened banks through the API: bf16, bit-packed and
// f32-screened banks recall the stored pattern; bit packing needs a bipolar
// bank.
TEST_F(ServiceTest, Bf16AndBitPackedBanksRecallAndBitPackingNeedsBipolar) {
  const int n = 64, k = 6;
  std::mt19937_64 rng(12);
  for (auto [name, precision, kind] :
       {std::tuple{"half", v1::PRECISION_BF16, v1::STATE_KIND_CONTINUOUS},
        std::tuple{"bits", v1::PRECISION_BIT_PACKED, v1::STATE_KIND_BIPOLAR},
        std::tuple{"screened", v1::PRECISION_F32_SCREENED, v1::STATE_KIND_CONTINUOUS}}) {
    grpc::ClientContext ctx;
    v1::CreateBankRequest req;
    req.set_name(name);
    req.set_dim(n);
    req.set_kind(kind);
    req.set_precision(precision);
    req.mutable_energy()->set_family(kind == v1::STATE_KIND_BIPOLAR ? v1::ENERGY_FAMILY_POLYNOMIAL
                                                                    : v1::ENERGY_FAMILY_LSE);
    req.mutable_energy()->set_beta(20);
    req.mutable_energy()->set_degree(3);
    v1::BankInfo info;
    ASSERT_TRUE(stub_->CreateBank(&ctx, req, &info).ok()) << name;
    EXPECT_EQ(info.precision(), precision);
    auto xi = kind == v1::STATE_KIND_BIPOLAR ? testing::RandomBipolar(k * n, rng)
                                             : testing::RandomGaussian(k * n, rng, 0.125f);
    ASSERT_TRUE(Store(name, xi).ok());
    grpc::ClientContext rctx;
    v1::RetrieveRequest r;
    r.set_bank(name);
    std::vector<float> q(xi.begin() + 2 * n, xi.begin() + 3 * n);
    if (kind == v1::STATE_KIND_BIPOLAR) {
      for (int i = 0; i < 8; ++i) q[i] = -q[i];
    } else {
      for (int i = 0; i < n; ++i) q[i] += 0.02f * ((i % 5) - 2);
    }
    r.mutable_queries()->Add(q.begin(), q.end());
    v1::RetrieveResponse resp;
    ASSERT_TRUE(stub_->Retrieve(&rctx, r, &resp).ok()) << name;
    EXPECT_EQ(resp.results(0).nearest().id(), 3u) << name;  // ids start at 1
  }
  grpc::ClientContext ctx;
  v1::CreateBankRequest bad;
  bad.set_name("bad");
  bad.set_dim(8);
  bad.set_kind(v1::STATE_KIND_CONTINUOUS);
  bad.set_precision(v1::PRECISION_BIT_PACKED);
  v1::BankInfo info;
  const grpc::Status st = stub_->CreateBank(&ctx, bad, &info);
  EXPECT_EQ(st.error_code(), grpc::FAILED_PRECONDITION);
  EXPECT_THAT(st.error_message(), HasSubstr("bipolar"));
}

// Concurrent sync Retrieve calls on one bank are merged by the dynamic
// batcher, and every caller still gets exactly its own answer (checked
// against the core dynamics run one query at a time).
TEST(DynamicBatching, MergesConcurrentCallsAndAnswersEachExactly) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("engram_batching_test_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  ServerConfig config;
  config.listen = "127.0.0.1:0";
  config.data_dir = dir.string();
  config.metrics_listen = "";
  config.max_batch_queries = 64;
  // A long window so that the callers below always meet in one batch, and
  // no call small enough to skip the executors.
  config.max_batch_delay = absl::Milliseconds(300);
  config.inline_work = 0;
  auto server = EngramServer::Start(config);
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::MemoryService::NewStub((*server)->InProcessChannel());

  const int n = 48, k = 40, callers = 8;
  std::mt19937_64 rng(3);
  auto xi = testing::RandomGaussian(int64_t{k} * n, rng, 1.f / std::sqrt(float(n)));
  {
    grpc::ClientContext ctx;
    v1::CreateBankRequest req;
    req.set_name("b");
    req.set_dim(n);
    req.set_kind(v1::STATE_KIND_CONTINUOUS);
    req.mutable_energy()->set_family(v1::ENERGY_FAMILY_LSE);
    req.mutable_energy()->set_beta(8.0);
    v1::BankInfo info;
    ASSERT_TRUE(stub->CreateBank(&ctx, req, &info).ok());
    grpc::ClientContext ctx2;
    v1::StoreRequest store;
    store.set_bank("b");
    store.mutable_patterns()->Add(xi.begin(), xi.end());
    v1::StoreResponse resp;
    ASSERT_TRUE(stub->Store(&ctx2, store, &resp).ok());
  }
  std::vector<std::vector<float>> queries;
  for (int c = 0; c < callers; ++c) {
    std::vector<float> q(xi.begin() + int64_t{c * 3} * n, xi.begin() + int64_t{c * 3 + 1} * n);
    auto noise = testing::RandomGaussian(n, rng, 0.4f / std::sqrt(float(n)));
    for (int i = 0; i < n; ++i) q[i] += noise[i];
    queries.push_back(q);
  }
  std::vector<v1::RetrieveResponse> got(callers);
  std::vector<grpc::Status> status(callers);
  std::vector<std::thread> threads;
  for (int c = 0; c < callers; ++c) {
    threads.emplace_back([&, c] {
      grpc::ClientContext ctx;
      v1::RetrieveRequest req;
      req.set_bank("b");
      req.mutable_queries()->Add(queries[c].begin(), queries[c].end());
      req.mutable_options()->set_max_steps(30 + c);  // per-call options
      status[c] = stub->Retrieve(&ctx, req, &got[c]);
    });
  }
  for (auto& t : threads) t.join();

  core::EnergyConfig cfg{.family = core::EnergyFamily::kLse, .beta = 8.0};
  core::Bank bank = testing::MakeBank(n, core::StateKind::kContinuous, xi, cfg);
  core::EnergyFunction energy(cfg, bank.view());
  for (int c = 0; c < callers; ++c) {
    ASSERT_TRUE(status[c].ok()) << status[c].error_message();
    ASSERT_EQ(got[c].results_size(), 1);
    core::RetrieveOptions o;
    o.max_steps = 30 + c;
    auto want = core::RunDynamics(energy, core::StateKind::kContinuous, queries[c], {}, o);
    ASSERT_TRUE(want.ok());
    const auto& r = got[c].results(0);
    EXPECT_EQ(r.steps(), want->steps) << c;
    EXPECT_EQ(r.nearest().id(), bank.id(bank.Nearest(want->state.data()).row)) << c;
    for (int i = 0; i < n; ++i) EXPECT_NEAR(r.state(i), want->state[i], 1e-4) << c;
  }
  prometheus::TextSerializer ser;
  const std::string text = ser.Serialize((*server)->metrics()->registry()->Collect());
  // All eight calls went through the batcher, in fewer than eight batches.
  EXPECT_THAT(text, HasSubstr("engram_batch_calls_sum 8"));
  std::smatch m;
  ASSERT_TRUE(std::regex_search(text, m, std::regex("engram_batch_calls_count (\\d+)")));
  EXPECT_LT(std::stoi(m[1]), callers);
  EXPECT_THAT(text, HasSubstr("engram_process_resident_bytes"));
  EXPECT_THAT(text, HasSubstr("engram_compute_info{simd="));
  server->reset();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace engram::server
