// engramd under load, through a real grpc::Server: one behaviour whatever
// the batching and the company, a stalled SampleStream reader that delays
// nobody, a full admission queue that rejects the excess while the
// server's threads stay fixed, and shard streams that hold no thread and
// queue their steps with everything else.
#include <condition_variable>
#include <filesystem>
#include <mutex>
#include <random>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <prometheus/text_serializer.h>

#include "engram/shard/v1/shard.grpc.pb.h"
#include "engram/v1/engram.grpc.pb.h"
#include "server/server.h"
#include "testing/random_banks.h"

namespace engram::server {
namespace {

int ProcessThreads() {
  int n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/task")) ++n;
  return n;
}

class Serving {
 public:
  explicit Serving(ServerConfig config, const std::string& tag) {
    dir_ = std::filesystem::temp_directory_path() /
           ("engram_serving_" + tag + "_" + std::to_string(::getpid()));
    std::filesystem::remove_all(dir_);
    config.listen = "127.0.0.1:0";
    config.data_dir = dir_.string();
    config.metrics_listen = "";
    auto s = EngramServer::Start(config);
    EXPECT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    channel_ = server_->InProcessChannel();
    stub_ = v1::MemoryService::NewStub(channel_);
  }
  ~Serving() {
    stub_.reset();
    server_.reset();
    std::filesystem::remove_all(dir_);
  }
  v1::MemoryService::Stub& stub() { return *stub_; }
  std::shared_ptr<grpc::Channel> channel() { return channel_; }
  EngramServer& server() { return *server_; }

  void CreateAndStore(const std::string& name, int dim, v1::StateKind kind,
                      v1::EnergyFamily family, double beta, const std::vector<float>& data) {
    grpc::ClientContext ctx;
    v1::CreateBankRequest req;
    req.set_name(name);
    req.set_dim(dim);
    req.set_kind(kind);
    req.mutable_energy()->set_family(family);
    req.mutable_energy()->set_beta(beta);
    v1::BankInfo info;
    ASSERT_TRUE(stub_->CreateBank(&ctx, req, &info).ok());
    grpc::ClientContext sctx;
    v1::StoreRequest store;
    store.set_bank(name);
    store.mutable_patterns()->Add(data.begin(), data.end());
    v1::StoreResponse resp;
    ASSERT_TRUE(stub_->Store(&sctx, store, &resp).ok());
  }

 private:
  std::filesystem::path dir_;
  std::unique_ptr<EngramServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::MemoryService::Stub> stub_;
};

struct Answer {
  grpc::Status status;
  v1::RetrieveResponse resp;
};

Answer RetrieveOne(v1::MemoryService::Stub& stub, const std::string& bank,
                   const std::vector<float>& q, int max_steps) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  v1::RetrieveRequest req;
  req.set_bank(bank);
  req.mutable_queries()->Add(q.begin(), q.end());
  req.mutable_options()->set_max_steps(max_steps);
  Answer a;
  a.status = stub.Retrieve(&ctx, req, &a.resp);
  return a;
}

// The same sync queries through the server give the same nearest ids, stop
// reasons and steps, and states equal up to float reassociation (|diff| <=
// 1e-4 on continuous states; bipolar states exactly), whether they run
// alone with batching off or batched among other clients' queries with
// other options. The bipolar bank holds an even number of patterns with the
// classical energy, so many neurons see a drive of exactly 0 (ties): they
// keep their value on both paths.
TEST(OneBehaviour, SameAnswersWithBatchingOnOrOffAloneOrInCompany) {
  const int nc = 48, kc = 300, nb = 63, kb = 6, queries = 24;
  std::mt19937_64 rng(17);
  auto xc = testing::RandomGaussian(int64_t{kc} * nc, rng, 1.f / std::sqrt(float(nc)));
  auto xb = testing::RandomBipolar(int64_t{kb} * nb, rng);
  std::vector<std::vector<float>> qc, qb;
  for (int q = 0; q < queries; ++q) {
    std::vector<float> c(xc.begin() + int64_t{q} * nc, xc.begin() + int64_t{q + 1} * nc);
    auto noise = testing::RandomGaussian(nc, rng, 0.5f / std::sqrt(float(nc)));
    for (int i = 0; i < nc; ++i) c[i] += noise[i];
    qc.push_back(c);
    qb.push_back(testing::RandomBipolar(nb, rng));
  }
  auto run = [&](bool batching, bool company) {
    ServerConfig config;
    config.batching = batching;
    config.inline_work = 0;  // every call through the executors
    config.max_batch_queries = 64;
    config.max_batch_delay = batching ? absl::Milliseconds(20) : absl::ZeroDuration();
    Serving s(config, std::string(batching ? "on" : "off") + (company ? "_company" : ""));
    s.CreateAndStore("c", nc, v1::STATE_KIND_CONTINUOUS, v1::ENERGY_FAMILY_LSE, 8.0, xc);
    s.CreateAndStore("b", nb, v1::STATE_KIND_BIPOLAR, v1::ENERGY_FAMILY_CLASSICAL, 0, xb);
    std::vector<Answer> got(2 * queries);
    std::atomic<bool> stop{false};
    std::vector<std::thread> others;
    if (company) {
      // Other clients: other queries, other max_steps, on the same banks.
      for (int o = 0; o < 3; ++o) {
        others.emplace_back([&, o] {
          auto stub = v1::MemoryService::NewStub(s.channel());
          std::mt19937_64 r(100 + o);
          while (!stop) {
            RetrieveOne(*stub, "c", testing::RandomGaussian(nc, r, 0.2f), 5 + o);
            RetrieveOne(*stub, "b", testing::RandomBipolar(nb, r), 2 + o);
          }
        });
      }
    }
    if (batching) {
      std::vector<std::thread> callers;
      for (int q = 0; q < 2 * queries; ++q) {
        callers.emplace_back([&, q] {
          auto stub = v1::MemoryService::NewStub(s.channel());
          got[q] = q < queries ? RetrieveOne(*stub, "c", qc[q], 40)
                               : RetrieveOne(*stub, "b", qb[q - queries], 40);
        });
      }
      for (auto& t : callers) t.join();
    } else {
      for (int q = 0; q < 2 * queries; ++q) {
        got[q] = q < queries ? RetrieveOne(s.stub(), "c", qc[q], 40)
                             : RetrieveOne(s.stub(), "b", qb[q - queries], 40);
      }
    }
    stop = true;
    for (auto& t : others) t.join();
    return got;
  };
  const std::vector<Answer> alone = run(false, false);
  for (const auto& [batching, company] : {std::pair{true, false}, {true, true}, {false, true}}) {
    const std::vector<Answer> got = run(batching, company);
    for (int q = 0; q < 2 * queries; ++q) {
      const std::string where = "query " + std::to_string(q) + " batching " +
                                std::to_string(batching) + " company " + std::to_string(company);
      ASSERT_TRUE(alone[q].status.ok() && got[q].status.ok()) << where;
      const v1::RetrieveResult& a = alone[q].resp.results(0);
      const v1::RetrieveResult& g = got[q].resp.results(0);
      EXPECT_EQ(g.nearest().id(), a.nearest().id()) << where;
      EXPECT_EQ(g.stop_reason(), a.stop_reason()) << where;
      EXPECT_EQ(g.steps(), a.steps()) << where;
      ASSERT_EQ(g.state_size(), a.state_size()) << where;
      for (int i = 0; i < a.state_size(); ++i) {
        if (q < queries) {
          EXPECT_NEAR(g.state(i), a.state(i), 1e-4) << where << " coordinate " << i;
        } else {
          EXPECT_EQ(g.state(i), a.state(i)) << where << " coordinate " << i;
        }
      }
    }
  }
}

// A SampleStream client that stops reading holds neither a thread nor the
// bank: Store and Retrieve on that bank complete while it is stalled, and
// the stream still delivers every frame once the client reads again.
TEST(StalledStream, DelaysNeitherStoreNorRetrieve) {
  ServerConfig config;
  config.executor_threads = 1;  // the stream's executor is the only one
  config.inline_work = 0;
  Serving s(config, "stalled");
  const int n = 512, k = 64;
  std::mt19937_64 rng(5);
  auto xi = testing::RandomGaussian(int64_t{k} * n, rng, 1.f / std::sqrt(float(n)));
  s.CreateAndStore("g", n, v1::STATE_KIND_CONTINUOUS, v1::ENERGY_FAMILY_GAUSSIAN, 0, xi);

  // 32 frames of 32 states x 512 floats (64 KiB each): far beyond what
  // gRPC's flow-control window lets through to a client that reads nothing.
  auto stream_stub = v1::MemoryService::NewStub(s.channel());
  grpc::ClientContext sctx;
  sctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  v1::SampleRequest sreq;
  sreq.set_bank("g");
  sreq.set_count(32);
  sreq.set_seed(1);
  sreq.mutable_schedule()->set_steps(32);
  sreq.set_trajectory_every(1);
  std::unique_ptr<grpc::ClientReader<v1::SampleFrame>> reader =
      stream_stub->SampleStream(&sctx, sreq);
  // Give the sampler time to run and fill the window.
  std::this_thread::sleep_for(std::chrono::milliseconds(500));

  const auto start = std::chrono::steady_clock::now();
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    v1::StoreRequest store;
    store.set_bank("g");
    auto more = testing::RandomGaussian(n, rng, 1.f / std::sqrt(float(n)));
    store.mutable_patterns()->Add(more.begin(), more.end());
    v1::StoreResponse resp;
    grpc::Status st = s.stub().Store(&ctx, store, &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(resp.bank_patterns(), static_cast<uint64_t>(k + 1));
  }
  {
    std::vector<float> q(xi.begin(), xi.begin() + n);
    Answer a = RetrieveOne(s.stub(), "g", q, 20);
    ASSERT_TRUE(a.status.ok()) << a.status.error_message();
    EXPECT_EQ(a.resp.results_size(), 1);
  }
  // Both completed (within their deadlines) while the stream was stalled:
  // the reader has read nothing yet.
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 60.0);

  v1::SampleFrame frame;
  int frames = 0;
  bool last = false;
  while (reader->Read(&frame)) {
    ++frames;
    last = frame.has_result();
  }
  grpc::Status st = reader->Finish();
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_TRUE(last);
  EXPECT_EQ(frames, 32 + 1);  // every step, then the result
}

// A stream whose client lets more frames pile up than the server buffers
// ends RESOURCE_EXHAUSTED (after the frames it did hold), not with a blocked
// executor.
TEST(StalledStream, OverflowingTheFrameBufferEndsResourceExhausted) {
  ServerConfig config;
  config.executor_threads = 1;
  config.stream_buffer_bytes = 256 << 10;
  Serving s(config, "overflow");
  const int n = 512, k = 16;
  std::mt19937_64 rng(6);
  auto xi = testing::RandomGaussian(int64_t{k} * n, rng, 1.f / std::sqrt(float(n)));
  s.CreateAndStore("g", n, v1::STATE_KIND_CONTINUOUS, v1::ENERGY_FAMILY_GAUSSIAN, 0, xi);
  grpc::ClientContext sctx;
  sctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  v1::SampleRequest sreq;
  sreq.set_bank("g");
  sreq.set_count(32);
  sreq.mutable_schedule()->set_steps(64);
  sreq.set_trajectory_every(1);
  auto reader = s.stub().SampleStream(&sctx, sreq);
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  v1::SampleFrame frame;
  int frames = 0;
  while (reader->Read(&frame)) ++frames;
  grpc::Status st = reader->Finish();
  EXPECT_EQ(st.error_code(), grpc::RESOURCE_EXHAUSTED) << st.error_message();
  EXPECT_LT(frames, 64);
  // The executor is free again.
  std::vector<float> q(xi.begin(), xi.begin() + n);
  EXPECT_TRUE(RetrieveOne(s.stub(), "g", q, 10).status.ok());
}

// With P executors and a queue of Q, P + Q + E concurrent calls: E are
// answered RESOURCE_EXHAUSTED, the rest OK; the server's thread count does
// not move while they are in flight.
TEST(Admission, ExcessCallsGetResourceExhaustedAndThreadsStayFixed) {
  constexpr int kPool = 2, kQueue = 4, kExcess = 6;
  ServerConfig config;
  config.executor_threads = kPool;
  config.max_queue = kQueue;
  Serving s(config, "admission");
  const int n = 64, k = 4000;
  std::mt19937_64 rng(8);
  auto xi = testing::RandomGaussian(int64_t{k} * n, rng, 1.f / std::sqrt(float(n)));
  s.CreateAndStore("g", n, v1::STATE_KIND_CONTINUOUS, v1::ENERGY_FAMILY_GAUSSIAN, 0, xi);

  // Each call is a sample of 16 states x 200 steps over 4000 rows (about
  // 10^9 multiply-adds): long against the microseconds the calls take to
  // arrive.
  auto start_calls = [&](int calls, grpc::CompletionQueue* cq,
                         std::vector<std::unique_ptr<grpc::ClientContext>>* ctxs,
                         std::vector<v1::SampleResponse>* resps, std::vector<grpc::Status>* sts) {
    ctxs->resize(calls);
    resps->resize(calls);
    sts->resize(calls);
    std::vector<std::unique_ptr<grpc::ClientAsyncResponseReader<v1::SampleResponse>>> rpcs;
    for (int c = 0; c < calls; ++c) {
      (*ctxs)[c] = std::make_unique<grpc::ClientContext>();
      (*ctxs)[c]->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(300));
      v1::SampleRequest req;
      req.set_bank("g");
      req.set_count(16);
      req.set_seed(c);
      req.mutable_schedule()->set_steps(200);
      auto rpc = s.stub().AsyncSample((*ctxs)[c].get(), req, cq);
      rpc->Finish(&(*resps)[c], &(*sts)[c], reinterpret_cast<void*>(static_cast<intptr_t>(c)));
    }
  };
  // Warm-up: gRPC starts its own threads lazily on first use.
  {
    grpc::CompletionQueue cq;
    std::vector<std::unique_ptr<grpc::ClientContext>> ctxs;
    std::vector<v1::SampleResponse> resps;
    std::vector<grpc::Status> sts;
    start_calls(kPool, &cq, &ctxs, &resps, &sts);
    void* tag;
    bool ok;
    for (int c = 0; c < kPool; ++c) ASSERT_TRUE(cq.Next(&tag, &ok));
  }
  const int before = ProcessThreads();
  const int total = kPool + kQueue + kExcess;
  grpc::CompletionQueue cq;
  std::vector<std::unique_ptr<grpc::ClientContext>> ctxs;
  std::vector<v1::SampleResponse> resps;
  std::vector<grpc::Status> sts;
  start_calls(total, &cq, &ctxs, &resps, &sts);
  int peak = ProcessThreads();
  int ok_calls = 0, exhausted = 0, other = 0;
  for (int done = 0; done < total; ++done) {
    void* tag;
    bool ok;
    ASSERT_TRUE(cq.Next(&tag, &ok));
    peak = std::max(peak, ProcessThreads());
    const grpc::Status& st = sts[reinterpret_cast<intptr_t>(tag)];
    if (st.ok()) {
      ++ok_calls;
    } else if (st.error_code() == grpc::RESOURCE_EXHAUSTED) {
      ++exhausted;
      EXPECT_NE(st.error_message().find("queue is full"), std::string::npos);
    } else {
      ++other;
      ADD_FAILURE() << st.error_code() << " " << st.error_message();
    }
  }
  // At least the excess is rejected; on a loaded machine the executors may
  // not yet have taken the first calls when the last ones arrive, so up to
  // P more can find the queue full.
  EXPECT_GE(exhausted, kExcess);
  EXPECT_LE(exhausted, kExcess + kPool);
  EXPECT_EQ(ok_calls + exhausted, total);
  EXPECT_EQ(other, 0);
  EXPECT_EQ(peak, before) << "threads before " << before << ", peak " << peak;
  prometheus::TextSerializer ser;
  const std::string text = ser.Serialize(s.server().metrics()->registry()->Collect());
  EXPECT_NE(text.find("engram_scheduler_rejected_total{pool=\"compute\",reason=\"queue_full\"} " +
                      std::to_string(exhausted)),
            std::string::npos);
}

// The value of the sample `series` (name and labels, as exposed) in the
// server's metrics; NaN when absent.
double MetricValue(Serving& s, const std::string& series) {
  prometheus::TextSerializer ser;
  const std::string text = ser.Serialize(s.server().metrics()->registry()->Collect());
  const size_t at = text.find("\n" + series + " ");
  if (at == std::string::npos) return std::nan("");
  return std::stod(text.substr(at + series.size() + 2));
}

// Sample calls long enough to keep an executor busy for the test's length,
// on the callback client API (no completion queue to poll); cancelled and
// waited for by the destructor.
class LongSamples {
 public:
  LongSamples(Serving& s, int calls) : calls_(calls), ctxs_(calls), resps_(calls) {
    for (int c = 0; c < calls; ++c) {
      v1::SampleRequest req;
      req.set_bank("g");
      req.set_count(64);
      req.set_seed(c);
      req.mutable_schedule()->set_steps(4000);
      s.stub().async()->Sample(&ctxs_[c], &req, &resps_[c], [this](grpc::Status) {
        std::lock_guard<std::mutex> lock(mu_);
        ++done_;
        cv_.notify_all();
      });
    }
  }
  ~LongSamples() {
    for (auto& c : ctxs_) c.TryCancel();
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return done_ == calls_; });
  }

 private:
  const int calls_;
  std::vector<grpc::ClientContext> ctxs_;
  std::vector<v1::SampleResponse> resps_;
  std::mutex mu_;
  std::condition_variable cv_;
  int done_ = 0;
};

TEST(ShardStreams, HoldNoThreadAndQueueTheirStepsWithTheNodesCalls) {
  constexpr int kQueue = 3, kStreams = 48;
  ServerConfig config;
  config.executor_threads = 1;
  config.max_queue = kQueue;
  config.inline_work = 0;  // every step queues (small ones are answered inline otherwise)
  Serving s(config, "shard_streams");
  const int n = 64, k = 4000;
  std::mt19937_64 rng(9);
  auto xi = testing::RandomGaussian(int64_t{k} * n, rng, 1.f / std::sqrt(float(n)));
  s.CreateAndStore("g", n, v1::STATE_KIND_CONTINUOUS, v1::ENERGY_FAMILY_GAUSSIAN, 0, xi);
  auto shard = shard::v1::Shard::NewStub(s.channel());
  shard::v1::StepRequest step;
  step.set_bank("g");
  step.set_with_sum(true);
  for (int i = 0; i < n; ++i) step.add_states(xi[i]);  // the first pattern
  const std::string waits = "engram_scheduler_queue_wait_seconds_count{pool=\"compute\"}";

  struct Open {
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::ClientReaderWriter<shard::v1::StepRequest, shard::v1::StepReply>> rw;
  };
  auto open_one = [&](Open* o) {
    o->rw = shard->Steps(&o->ctx);
    shard::v1::StepReply reply;
    ASSERT_TRUE(o->rw->Write(step));
    ASSERT_TRUE(o->rw->Read(&reply));
    ASSERT_EQ(reply.partials_size(), 1);
    EXPECT_EQ(reply.partials(0).rows(), k);
  };
  {
    Open warm;  // gRPC starts its own threads lazily on first use
    open_one(&warm);
    warm.rw->WritesDone();
    EXPECT_TRUE(warm.rw->Finish().ok());
  }
  // Open streams, each having answered a step, take no thread of the
  // server's while they wait for the next (a synchronous handler would hold
  // one each), and every step went through the compute queue.
  const double waits_before = MetricValue(s, waits);
  const int before = ProcessThreads();
  std::vector<std::unique_ptr<Open>> open;
  for (int i = 0; i < kStreams; ++i) {
    open.push_back(std::make_unique<Open>());
    open_one(open.back().get());
    ASSERT_FALSE(HasFailure());
  }
  const int with_streams = ProcessThreads();
  EXPECT_LT(with_streams - before, 8) << "threads before " << before << ", with " << kStreams
                                      << " open streams " << with_streams;
  EXPECT_EQ(MetricValue(s, waits) - waits_before, kStreams);
  for (auto& o : open) {
    o->rw->WritesDone();
    EXPECT_TRUE(o->rw->Finish().ok());
  }

  // With --inline_work at its default, the same small step is answered on
  // the thread that read it (no queue wait recorded), with the same
  // partial, bit for bit, as the queued one.
  {
    shard::v1::StepReply queued;
    {
      Open o;
      o.rw = shard->Steps(&o.ctx);
      ASSERT_TRUE(o.rw->Write(step));
      ASSERT_TRUE(o.rw->Read(&queued));
      o.rw->WritesDone();
      ASSERT_TRUE(o.rw->Finish().ok());
    }
    Serving small(ServerConfig{}, "shard_streams_inline");
    small.CreateAndStore("g", n, v1::STATE_KIND_CONTINUOUS, v1::ENERGY_FAMILY_GAUSSIAN, 0, xi);
    auto inline_shard = shard::v1::Shard::NewStub(small.channel());
    const double small_waits = MetricValue(small, waits);
    for (int i = 0; i < 3; ++i) {
      Open o;
      o.rw = inline_shard->Steps(&o.ctx);
      shard::v1::StepReply reply;
      ASSERT_TRUE(o.rw->Write(step));
      ASSERT_TRUE(o.rw->Read(&reply));
      ASSERT_TRUE(o.rw->Write(step));  // a later step of the open stream
      ASSERT_TRUE(o.rw->Read(&reply));
      o.rw->WritesDone();
      ASSERT_TRUE(o.rw->Finish().ok());
      EXPECT_EQ(reply.partials(0).SerializeAsString(), queued.partials(0).SerializeAsString());
    }
    const double after = MetricValue(small, waits);
    EXPECT_TRUE(after == small_waits || (std::isnan(after) && std::isnan(small_waits)))
        << small_waits << " -> " << after;
  }

  // The executor busy and the queue full of the node's own calls: a step
  // is refused at once, RESOURCE_EXHAUSTED, as any call would be. (One
  // sample first, taken by the executor, then the queue's worth; each runs
  // for seconds, until cancelled.)
  auto wait_for = [&](const std::string& series, double value) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (MetricValue(s, series) < value && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return MetricValue(s, series);
  };
  const double waits_now = MetricValue(s, waits);
  LongSamples running(s, 1);
  ASSERT_EQ(wait_for(waits, waits_now + 1), waits_now + 1);
  const std::string depth = "engram_scheduler_queue_depth{pool=\"compute\"}";
  LongSamples queued(s, kQueue);
  ASSERT_EQ(wait_for(depth, kQueue), kQueue);
  Open refused;
  refused.rw = shard->Steps(&refused.ctx);
  ASSERT_TRUE(refused.rw->Write(step));
  shard::v1::StepReply reply;
  EXPECT_FALSE(refused.rw->Read(&reply));
  const grpc::Status st = refused.rw->Finish();
  EXPECT_EQ(st.error_code(), grpc::RESOURCE_EXHAUSTED) << st.error_message();
  EXPECT_NE(st.error_message().find("queue is full"), std::string::npos) << st.error_message();
}

}  // namespace
}  // namespace engram::server
