#include "server/metrics.h"

#include <unistd.h>

#include <cstdio>

#include <array>
#include <atomic>
#include <functional>
#include <type_traits>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engram/core/compute.h"
#include "absl/strings/str_split.h"
#include "google/protobuf/descriptor.h"
#include <grpcpp/server_context.h>

namespace engram::server {
namespace {

// 10 us ... 10 s, roughly x2.5 per bucket (gRFC A66 spirit, finer at the
// microsecond end where Engram works).
prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  return {1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
          1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0};
}

const char* CodeName(int code) {
  static const char* kNames[] = {
      "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded",
      "NotFound", "AlreadyExists", "PermissionDenied", "ResourceExhausted",
      "FailedPrecondition", "Aborted", "OutOfRange", "Unimplemented",
      "Internal", "Unavailable", "DataLoss", "Unauthenticated"};
  return (code >= 0 && code <= 16) ? kNames[code] : "Unknown";
}

std::pair<std::string, std::string> SplitMethod(const std::string& full) {
  // "/engram.v1.MemoryService/Retrieve"
  std::vector<std::string> parts = absl::StrSplit(full, '/', absl::SkipEmpty());
  if (parts.size() != 2) return {"unknown", full};
  return {parts[0], parts[1]};
}

// The request type of a method of a service in the generated descriptor
// pool ("/pkg.Service/Method"), or null for a method the server does not
// know.
const google::protobuf::Descriptor* RequestType(const std::string& full_method) {
  auto [service, method] = SplitMethod(full_method);
  const google::protobuf::MethodDescriptor* m =
      google::protobuf::DescriptorPool::generated_pool()->FindMethodByName(
          absl::StrCat(service, ".", method));
  return m == nullptr ? nullptr : m->input_type();
}

// Records every call exactly once, with the code it ended with:
// grpc_server_started_total when its metadata arrives;
// grpc_server_handled_total and grpc_server_handling_seconds when its status
// is sent, or when it closes (POST_RECV_CLOSE) or is torn down if no status
// was counted by then. A call that had ended (its deadline passed or its
// client left) before its status was sent counts as DEADLINE_EXCEEDED when
// its deadline had passed and CANCELLED otherwise, whatever the server sent.
//
// gRPC 1.51's callback handlers answer UNIMPLEMENTED with an empty message
// when the request message cannot be read: when its bytes do not parse, or
// when the call ended before the message arrived. The interceptor replaces
// that status with INVALID_ARGUMENT naming the request type (a client that
// left sees nothing of it; the count then says DEADLINE_EXCEEDED or
// CANCELLED). An unknown method keeps UNIMPLEMENTED.
class MetricsInterceptor : public grpc::experimental::Interceptor {
 public:
  MetricsInterceptor(grpc::experimental::ServerRpcInfo* info,
                     std::shared_ptr<Metrics> metrics)
      : metrics_(std::move(metrics)), info_(info), method_(info->method()) {
    switch (info->type()) {
      case grpc::experimental::ServerRpcInfo::Type::UNARY: type_ = "unary"; break;
      case grpc::experimental::ServerRpcInfo::Type::CLIENT_STREAMING:
        type_ = "client_stream"; break;
      case grpc::experimental::ServerRpcInfo::Type::SERVER_STREAMING:
        type_ = "server_stream"; break;
      case grpc::experimental::ServerRpcInfo::Type::BIDI_STREAMING:
        type_ = "bidi_stream"; break;
    }
  }

  ~MetricsInterceptor() override {
    if (started_.load()) Claim(sent_.load() ? Code(sent_code_.load()) : Ended());
  }

  // The hooks of one call may run on different threads (the status is sent
  // from an executor while gRPC closes the call), so the state they share is
  // atomic and the count is claimed once (Claim).
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    using HP = grpc::experimental::InterceptionHookPoints;
    if (methods->QueryInterceptionHookPoint(HP::POST_RECV_INITIAL_METADATA)) {
      start_ns_.store(std::chrono::steady_clock::now().time_since_epoch().count());
      if (grpc::ServerContextBase* ctx = info_->server_context(); ctx != nullptr) {
        deadline_ns_.store(ctx->deadline().time_since_epoch().count());
      }
      series_ = metrics_->Method(method_, type_);
      metrics_->RpcStarted(series_);
      started_.store(true);
    }
    if (methods->QueryInterceptionHookPoint(HP::PRE_SEND_STATUS)) {
      grpc::Status status = methods->GetSendStatus();
      bool unread = false;
      if (status.error_code() == grpc::StatusCode::UNIMPLEMENTED &&
          status.error_message().empty()) {
        if (const google::protobuf::Descriptor* type = RequestType(method_); type != nullptr) {
          unread = true;
          status = grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                absl::StrCat("the request is not a valid ", type->full_name(),
                                             " message"));
          methods->ModifySendStatus(status);
        }
      }
      sent_code_.store(status.error_code());
      sent_.store(true);
      // An unread request is counted when the call closes: only then does
      // the context know whether the call had ended (no message) or the
      // message did not parse.
      if (!unread && started_.load()) Claim(Cancelled() ? Ended() : status.error_code());
    }
    if (methods->QueryInterceptionHookPoint(HP::POST_RECV_CLOSE) && started_.load()) {
      Claim(Cancelled() || !sent_.load() ? Ended() : Code(sent_code_.load()));
    }
    methods->Proceed();
  }

 private:
  static grpc::StatusCode Code(int code) { return static_cast<grpc::StatusCode>(code); }

  // True once a callback call has ended without its status (a synchronous
  // context is not asked: its IsCancelled would complete the close and run
  // this interceptor's POST_RECV_CLOSE hook from inside a hook).
  bool Cancelled() const {
    auto* ctx = dynamic_cast<grpc::CallbackServerContext*>(info_->server_context());
    return ctx != nullptr && ctx->IsCancelled();
  }

  // The code of a call that ended without delivering its status.
  grpc::StatusCode Ended() const {
    return std::chrono::system_clock::now().time_since_epoch().count() >= deadline_ns_.load()
               ? grpc::StatusCode::DEADLINE_EXCEEDED
               : grpc::StatusCode::CANCELLED;
  }

  // Counts the call with `code` unless a hook has counted it already.
  void Claim(grpc::StatusCode code) {
    if (handled_.exchange(true)) return;
    const auto now = std::chrono::steady_clock::now().time_since_epoch().count();
    const double seconds = static_cast<double>(now - start_ns_.load()) *
                           std::chrono::steady_clock::period::num /
                           std::chrono::steady_clock::period::den;
    metrics_->RpcHandled(series_, code, seconds);
  }

  std::shared_ptr<Metrics> metrics_;
  grpc::experimental::ServerRpcInfo* info_;  // outlives the interceptor's hooks
  std::string method_;
  std::string type_ = "unary";
  Metrics::MethodSeries* series_ = nullptr;  // set before started_
  std::atomic<bool> started_{false};
  std::atomic<bool> handled_{false};
  std::atomic<bool> sent_{false};
  std::atomic<int> sent_code_{grpc::StatusCode::OK};
  // Clock readings in their clocks' ticks.
  std::atomic<int64_t> deadline_ns_{std::chrono::system_clock::time_point::max().time_since_epoch().count()};
  std::atomic<int64_t> start_ns_{std::chrono::steady_clock::now().time_since_epoch().count()};
};

class MetricsInterceptorFactory
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit MetricsInterceptorFactory(std::shared_ptr<Metrics> m) : m_(std::move(m)) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new MetricsInterceptor(info, m_);
  }

 private:
  std::shared_ptr<Metrics> m_;
};

}  // namespace

Metrics::Metrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      started_(prometheus::BuildCounter()
                   .Name("grpc_server_started_total")
                   .Help("RPCs started on the server.")
                   .Register(*registry_)),
      handled_(prometheus::BuildCounter()
                   .Name("grpc_server_handled_total")
                   .Help("RPCs completed on the server, by status code.")
                   .Register(*registry_)),
      handling_seconds_(prometheus::BuildHistogram()
                            .Name("grpc_server_handling_seconds")
                            .Help("Latency of RPCs handled by the server.")
                            .Register(*registry_)),
      steps_(prometheus::BuildHistogram()
                 .Name("engram_retrieve_steps")
                 .Help("Steps taken by one retrieval until it stopped.")
                 .Register(*registry_)),
      stops_(prometheus::BuildCounter()
                 .Name("engram_retrieve_stops_total")
                 .Help("Retrievals by stop reason (converged, max_steps, deadline).")
                 .Register(*registry_)),
      energy_drop_(prometheus::BuildHistogram()
                       .Name("engram_retrieve_energy_drop")
                       .Help("Energy at start minus energy at end of a retrieval.")
                       .Register(*registry_)),
      lyapunov_(prometheus::BuildCounter()
                    .Name("engram_lyapunov_violations_total")
                    .Help("Energy rises under dynamics that guarantee descent. Must stay 0.")
                    .Register(*registry_)),
      samples_(prometheus::BuildCounter()
                   .Name("engram_samples_total")
                   .Help("Samples drawn, by class (memorized, spurious, novel).")
                   .Register(*registry_)),
      sample_steps_(prometheus::BuildHistogram()
                        .Name("engram_sample_steps")
                        .Help("Schedule steps of one Sample call.")
                        .Register(*registry_)),
      sample_seconds_(prometheus::BuildHistogram()
                          .Name("engram_sample_seconds")
                          .Help("Wall time of one Sample call inside the server.")
                          .Register(*registry_)),
      bank_patterns_(prometheus::BuildGauge()
                         .Name("engram_bank_patterns")
                         .Help("Patterns stored in a bank.")
                         .Register(*registry_)),
      bank_bytes_(prometheus::BuildGauge()
                      .Name("engram_bank_bytes")
                      .Help("Bytes held in memory by a bank.")
                      .Register(*registry_)),
      batch_queries_(prometheus::BuildHistogram()
                         .Name("engram_batch_queries")
                         .Help("Queries per batch started by the dynamic Retrieve batcher, or per group of "
                               "calls joining a running batch at a step boundary.")
                         .Register(*registry_)
                         .Add({}, prometheus::Histogram::BucketBoundaries{
                                      1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024})),
      batch_calls_(prometheus::BuildHistogram()
                       .Name("engram_batch_calls")
                       .Help("Retrieve calls per batch started by the dynamic batcher, or per group of "
                             "calls joining a running batch.")
                       .Register(*registry_)
                       .Add({}, prometheus::Histogram::BucketBoundaries{
                                    1, 2, 4, 8, 16, 32, 64, 128, 256})),
      queue_depth_(prometheus::BuildGauge()
                       .Name("engram_scheduler_queue_depth")
                       .Help("Calls waiting in a pool's admission queue (pool=compute: Retrieve, "
                             "Energy, Sample, SampleStream; pool=writer: CreateBank, DeleteBank, "
                             "Store, DeletePatterns, Backup).")
                       .Register(*registry_)),
      queue_wait_(prometheus::BuildHistogram()
                      .Name("engram_scheduler_queue_wait_seconds")
                      .Help("Time a call waited in a pool's admission queue before an executor "
                            "took it.")
                      .Register(*registry_)),
      rejected_(prometheus::BuildCounter()
                    .Name("engram_scheduler_rejected_total")
                    .Help("Calls answered without running, by pool and reason: queue_full "
                          "(RESOURCE_EXHAUSTED), deadline (DEADLINE_EXCEEDED while queued), "
                          "cancelled, shutdown.")
                    .Register(*registry_)),
      executor_threads_(prometheus::BuildGauge()
                            .Name("engram_scheduler_executor_threads")
                            .Help("Executor threads of a pool (fixed at start).")
                            .Register(*registry_)),
      http_requests_(prometheus::BuildCounter()
                         .Name("engram_http_requests_total")
                         .Help("JSON-over-HTTP requests, by route (RPC name) and HTTP status code. "
                               "Each is also counted as the gRPC call it makes.")
                         .Register(*registry_)),
      http_seconds_(prometheus::BuildHistogram()
                        .Name("engram_http_request_seconds")
                        .Help("Latency of JSON-over-HTTP requests, by route, until the response "
                              "(for SampleStream: until the first frame).")
                        .Register(*registry_)),
      shard_calls_(prometheus::BuildCounter()
                       .Name("engram_shard_calls_total")
                       .Help("A router's calls to its shards (Steps streams and the bank and "
                             "pattern calls), by shard address and gRPC code.")
                       .Register(*registry_)),
      expired_(prometheus::BuildCounter()
                   .Name("engram_patterns_expired_total")
                   .Help("Patterns deleted (from memory and disk) because their time to live "
                         "ran out.")
                   .Register(*registry_)
                   .Add({})),
      resident_bytes_(prometheus::BuildGauge()
                          .Name("engram_process_resident_bytes")
                          .Help("Resident memory of the engramd process (from /proc/self/statm, "
                                "refreshed at most once a second on RPC completion).")
                          .Register(*registry_)
                          .Add({})),
      compute_info_(prometheus::BuildGauge()
                        .Name("engram_compute_info")
                        .Help("Always 1; labels name the SIMD kernel level and compute threads.")
                        .Register(*registry_)
                        .Add({{"simd", core::SimdLevelInUse()},
                              {"threads", std::to_string(core::ComputeThreadsInUse())}})) {
  compute_info_.Set(1);
  RefreshProcessMemory();
}

void Metrics::RecordShardCall(const std::string& shard, int code) {
  shard_calls_.Add({{"shard", shard}, {"grpc_code", CodeName(code)}}).Increment();
}

void Metrics::RecordHttpRequest(const std::string& route, int http_status, double seconds) {
  http_requests_.Add({{"route", route}, {"code", std::to_string(http_status)}}).Increment();
  http_seconds_.Add({{"route", route}}, LatencyBuckets()).Observe(seconds);
}

SchedulerHooks Metrics::SchedulerHooks(const std::string& pool, int threads) {
  const prometheus::Labels labels = {{"pool", pool}};
  executor_threads_.Add(labels).Set(threads);
  server::SchedulerHooks hooks;
  prometheus::Gauge* depth = &queue_depth_.Add(labels);
  prometheus::Histogram* wait = &queue_wait_.Add(labels, LatencyBuckets());
  hooks.queue_depth = [depth](int64_t d) { depth->Set(static_cast<double>(d)); };
  hooks.queue_wait = [wait](double seconds) { wait->Observe(seconds); };
  std::array<prometheus::Counter*, 4> by_reason;
  static constexpr std::array<std::string_view, 4> kReasons = {"queue_full", "deadline",
                                                              "cancelled", "shutdown"};
  for (size_t i = 0; i < kReasons.size(); ++i) {
    by_reason[i] = &rejected_.Add({{"pool", pool}, {"reason", std::string(kReasons[i])}});
  }
  hooks.rejected = [by_reason](const char* reason) {
    for (size_t i = 0; i < kReasons.size(); ++i) {
      if (reason == kReasons[i]) by_reason[i]->Increment();
    }
  };
  hooks.batch = [this](int64_t queries, int64_t calls) { RecordBatch(queries, calls); };
  return hooks;
}

void Metrics::RecordBatch(int64_t queries, int64_t calls) {
  batch_queries_.Observe(static_cast<double>(queries));
  batch_calls_.Observe(static_cast<double>(calls));
}

void Metrics::RefreshProcessMemory() {
  const int64_t now = absl::ToUnixSeconds(absl::Now());
  int64_t last = last_memory_refresh_.load(std::memory_order_relaxed);
  if (now == last || !last_memory_refresh_.compare_exchange_strong(last, now)) return;
  std::FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return;
  long size = 0, resident = 0;
  if (std::fscanf(f, "%ld %ld", &size, &resident) == 2) {
    resident_bytes_.Set(static_cast<double>(resident) * sysconf(_SC_PAGESIZE));
  }
  std::fclose(f);
}

std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
Metrics::InterceptorFactories() {
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> v;
  v.push_back(std::make_unique<MetricsInterceptorFactory>(shared_from_this()));
  return v;
}

// One method's series: resolved once per method, shared by its calls.
struct Metrics::MethodSeries {
  prometheus::Counter* started = nullptr;
  prometheus::Histogram* seconds = nullptr;
  std::array<std::atomic<prometheus::Counter*>, 17> handled{};  // by code, on first use
  prometheus::Labels labels;
};

// One bank's series, created on first use and removed with the bank: each
// entry remembers its family so RemoveBank can take it out.
struct Metrics::BankSeries {
  template <typename T>
  struct Entry {
    prometheus::Family<T>* family;
    T* metric;
  };
  absl::flat_hash_map<std::string, Entry<prometheus::Counter>> counters;
  absl::flat_hash_map<std::string, Entry<prometheus::Histogram>> histograms;
  absl::flat_hash_map<std::string, Entry<prometheus::Gauge>> gauges;
};

Metrics::~Metrics() = default;

Metrics::MethodSeries* Metrics::Method(const std::string& full_method, const std::string& type) {
  core::MutexLock lock(&mu_);
  auto& slot = methods_[absl::StrCat(full_method, "|", type)];
  if (slot == nullptr) {
    auto [service, method] = SplitMethod(full_method);
    slot = std::make_unique<MethodSeries>();
    slot->labels = {{"grpc_type", type}, {"grpc_service", service}, {"grpc_method", method}};
    slot->started = &started_.Add(slot->labels);
    slot->seconds = &handling_seconds_.Add(slot->labels, LatencyBuckets());
  }
  return slot.get();
}

void Metrics::RpcStarted(MethodSeries* m) { m->started->Increment(); }

void Metrics::RpcHandled(MethodSeries* m, int code, double seconds) {
  RefreshProcessMemory();
  const size_t c = (code >= 0 && code <= 16) ? static_cast<size_t>(code) : 2;  // else Unknown
  prometheus::Counter* counter = m->handled[c].load(std::memory_order_acquire);
  if (counter == nullptr) {
    core::MutexLock lock(&mu_);
    counter = m->handled[c].load(std::memory_order_relaxed);
    if (counter == nullptr) {
      prometheus::Labels labels = m->labels;
      labels.emplace("grpc_code", CodeName(static_cast<int>(c)));
      counter = &handled_.Add(labels);
      m->handled[c].store(counter, std::memory_order_release);
    }
  }
  counter->Increment();
  m->seconds->Observe(seconds);
}

template <typename T>
T& Metrics::BankMetric(const std::string& bank, prometheus::Family<T>& family,
                       const std::string& key, const prometheus::Labels& labels,
                       const std::function<T&(prometheus::Family<T>&)>& add) {
  core::MutexLock lock(&mu_);
  std::unique_ptr<BankSeries>& series = banks_[bank];
  if (series == nullptr) series = std::make_unique<BankSeries>();
  auto& map = [&]() -> auto& {
    if constexpr (std::is_same_v<T, prometheus::Counter>) return series->counters;
    else if constexpr (std::is_same_v<T, prometheus::Histogram>) return series->histograms;
    else return series->gauges;
  }();
  auto it = map.find(key);
  if (it != map.end()) return *it->second.metric;
  T* metric;
  if constexpr (std::is_same_v<T, prometheus::Histogram>) {
    metric = &add(family);  // a histogram needs its buckets
  } else {
    metric = add ? &add(family) : &family.Add(labels);
  }
  map.emplace(key, BankSeries::Entry<T>{&family, metric});
  return *metric;
}

void Metrics::RecordRetrieval(const std::string& bank, core::Dynamics dynamics,
                              const core::Trajectory& t) {
  const std::string dyn = core::DynamicsName(dynamics);
  const std::string reason = core::StopReasonName(t.stop_reason);
  const prometheus::Labels labels = {{"bank", bank}, {"dynamics", dyn}};
  BankMetric<prometheus::Histogram>(
      bank, steps_, "steps|" + dyn, labels, [&](prometheus::Family<prometheus::Histogram>& f) -> auto& {
        return f.Add(labels, prometheus::Histogram::BucketBoundaries{
                                 1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 10000});
      }).Observe(t.steps);
  BankMetric<prometheus::Histogram>(
      bank, energy_drop_, "drop|" + dyn, labels, [&](prometheus::Family<prometheus::Histogram>& f) -> auto& {
        return f.Add(labels, prometheus::Histogram::BucketBoundaries{
                                 0, 1e-3, 1e-2, 0.1, 1, 10, 100, 1e3, 1e4, 1e5, 1e6});
      }).Observe(t.energy_start - t.energy_end);
  BankMetric<prometheus::Counter>(bank, stops_, absl::StrCat("stop|", dyn, "|", reason),
                                  {{"bank", bank}, {"dynamics", dyn}, {"reason", reason}}, nullptr)
      .Increment();
  auto& lyap = BankMetric<prometheus::Counter>(bank, lyapunov_, "lyap|" + dyn, labels, nullptr);
  if (t.lyapunov_violations > 0) lyap.Increment(t.lyapunov_violations);
}

void Metrics::RecordSample(const std::string& bank, const std::string& sampler,
                           const std::vector<std::string>& classes, int steps,
                           double seconds) {
  const prometheus::Labels labels = {{"bank", bank}, {"sampler", sampler}};
  BankMetric<prometheus::Histogram>(
      bank, sample_steps_, "sst|" + sampler, labels, [&](prometheus::Family<prometheus::Histogram>& f) -> auto& {
        return f.Add(labels, prometheus::Histogram::BucketBoundaries{
                                 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096});
      }).Observe(steps);
  BankMetric<prometheus::Histogram>(
      bank, sample_seconds_, "ssec|" + sampler, labels, [&](prometheus::Family<prometheus::Histogram>& f) -> auto& {
        return f.Add(labels, LatencyBuckets());
      }).Observe(seconds);
  for (const auto& c : classes) {
    BankMetric<prometheus::Counter>(bank, samples_, absl::StrCat("smp|", sampler, "|", c),
                                    {{"bank", bank}, {"sampler", sampler}, {"class", c}}, nullptr)
        .Increment();
  }
}

void Metrics::SetBankSize(const std::string& bank, int64_t patterns, uint64_t bytes) {
  BankMetric<prometheus::Gauge>(bank, bank_patterns_, "patterns", {{"bank", bank}}, nullptr)
      .Set(static_cast<double>(patterns));
  BankMetric<prometheus::Gauge>(bank, bank_bytes_, "bytes", {{"bank", bank}}, nullptr)
      .Set(static_cast<double>(bytes));
}

void Metrics::RemoveBank(const std::string& bank) {
  core::MutexLock lock(&mu_);
  auto it = banks_.find(bank);
  if (it == banks_.end()) return;
  for (auto& [key, e] : it->second->counters) e.family->Remove(e.metric);
  for (auto& [key, e] : it->second->histograms) e.family->Remove(e.metric);
  for (auto& [key, e] : it->second->gauges) e.family->Remove(e.metric);
  banks_.erase(it);
}

}  // namespace engram::server
