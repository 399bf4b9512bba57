// Prometheus metrics of engramd: RPC metrics under the conventional
// grpc_server_* names (recorded by one server interceptor), convergence
// metrics per bank and dynamics, and bank sizes. Only this file and
// metrics.cc know Prometheus; core reports plain structs.
//
//   auto metrics = std::make_shared<Metrics>();
//   builder.experimental().SetInterceptorCreators(metrics->InterceptorFactories());
//   metrics->RecordRetrieval("digits", "sync", trajectory);
//   prometheus::Exposer exposer("127.0.0.1:9464");
//   exposer.RegisterCollectable(metrics->registry());
//
// Label cardinality is bounded: banks and methods are labels, ids never are.
// Thread-safety: every method is safe to call concurrently; label handles
// are cached so the hot path never calls Family::Add after the first use.
#ifndef ENGRAM_SERVER_METRICS_H_
#define ENGRAM_SERVER_METRICS_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/support/server_interceptor.h>
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "engram/core/dynamics.h"
#include "engram/core/mutex.h"
#include "server/scheduler.h"

namespace engram::server {

class Metrics : public std::enable_shared_from_this<Metrics> {
 public:
  Metrics();
  ~Metrics();

  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  // Server interceptor factories that record grpc_server_started_total,
  // grpc_server_handled_total and grpc_server_handling_seconds.
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
  InterceptorFactories();

  // One method's RPC series ("/pkg.Service/Method", "unary"...), resolved
  // once per method and kept for the server's life; the interceptor
  // resolves it when a call starts and records the call on it.
  struct MethodSeries;
  MethodSeries* Method(const std::string& full_method, const std::string& type);
  void RpcStarted(MethodSeries* method);
  void RpcHandled(MethodSeries* method, int code, double seconds);

  // Convergence of one retrieval.
  void RecordRetrieval(const std::string& bank, core::Dynamics dynamics,
                       const core::Trajectory& t);
  // One Sample call: classes, steps and latency.
  void RecordSample(const std::string& bank, const std::string& sampler,
                    const std::vector<std::string>& classes, int steps, double seconds);
  // Current size of a bank. A bank's series (size, retrieval, sampling)
  // are created on first use; RemoveBank drops them all.
  void SetBankSize(const std::string& bank, int64_t patterns, uint64_t bytes);
  void RemoveBank(const std::string& bank);
  // One batch run by the dynamic batcher: its queries and merged calls.
  void RecordBatch(int64_t queries, int64_t calls);
  // Hooks that record a pool's queue depth, queue wait, rejected calls (by
  // reason) and batches, labelled pool=`pool`; `threads` is its executor
  // count.
  server::SchedulerHooks SchedulerHooks(const std::string& pool, int threads);
  // One JSON-over-HTTP request: `route` is the RPC name ("Retrieve") or
  // "unknown"; `http_status` the status answered.
  void RecordHttpRequest(const std::string& route, int http_status, double seconds);
  // A router's call to shard `shard` (its address) ended with `code`.
  void RecordShardCall(const std::string& shard, int code);
  // Patterns deleted because their time to live ran out.
  void RecordExpired(int64_t patterns) { expired_.Increment(static_cast<double>(patterns)); }
  // Re-reads the process's resident memory (at most once a second).
  void RefreshProcessMemory();

 private:
  struct BankSeries;
  // The bank's series `key` of `family`: created with `labels` (or by
  // `add`, for histograms' buckets) on first use.
  template <typename T>
  T& BankMetric(const std::string& bank, prometheus::Family<T>& family, const std::string& key,
                const prometheus::Labels& labels,
                const std::function<T&(prometheus::Family<T>&)>& add);

  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& started_;
  prometheus::Family<prometheus::Counter>& handled_;
  prometheus::Family<prometheus::Histogram>& handling_seconds_;
  prometheus::Family<prometheus::Histogram>& steps_;
  prometheus::Family<prometheus::Counter>& stops_;
  prometheus::Family<prometheus::Histogram>& energy_drop_;
  prometheus::Family<prometheus::Counter>& lyapunov_;
  prometheus::Family<prometheus::Counter>& samples_;
  prometheus::Family<prometheus::Histogram>& sample_steps_;
  prometheus::Family<prometheus::Histogram>& sample_seconds_;
  prometheus::Family<prometheus::Gauge>& bank_patterns_;
  prometheus::Family<prometheus::Gauge>& bank_bytes_;
  prometheus::Histogram& batch_queries_;
  prometheus::Histogram& batch_calls_;
  prometheus::Family<prometheus::Gauge>& queue_depth_;
  prometheus::Family<prometheus::Histogram>& queue_wait_;
  prometheus::Family<prometheus::Counter>& rejected_;
  prometheus::Family<prometheus::Gauge>& executor_threads_;
  prometheus::Family<prometheus::Counter>& http_requests_;
  prometheus::Family<prometheus::Histogram>& http_seconds_;
  prometheus::Family<prometheus::Counter>& shard_calls_;
  prometheus::Counter& expired_;
  prometheus::Gauge& resident_bytes_;
  prometheus::Gauge& compute_info_;
  std::atomic<int64_t> last_memory_refresh_{0};

  core::SharedMutex mu_;
  absl::flat_hash_map<std::string, std::unique_ptr<MethodSeries>> methods_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, std::unique_ptr<BankSeries>> banks_ ABSL_GUARDED_BY(mu_);
};

}  // namespace engram::server

#endif  // ENGRAM_SERVER_METRICS_H_
