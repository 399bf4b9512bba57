// EngramServer: opens the data directory, loads the banks and serves
// MemoryService with health checking, reflection and a Prometheus endpoint.
// engramd's main() and the service tests both use it.
//
//   ServerConfig config;
//   config.listen = "127.0.0.1:0";          // any free port
//   config.data_dir = "/tmp/engram";
//   ENGRAM_ASSIGN_OR_RETURN(auto server, EngramServer::Start(config));
//   auto stub = v1::MemoryService::NewStub(server->InProcessChannel());
//   ...
//   server->Shutdown(absl::Seconds(5));
//
// Thread-safety: Shutdown may be called from any thread, once.
#ifndef ENGRAM_SERVER_SERVER_H_
#define ENGRAM_SERVER_SERVER_H_

#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <prometheus/exposer.h>

#include "absl/status/statusor.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "engram/core/registry.h"
#include "server/http_gateway.h"
#include "server/metrics.h"
#include "server/router.h"
#include "server/service_impl.h"
#include "server/shard_service.h"

namespace engram::server {

struct ServerConfig {
  // "node": holds banks in data_dir and serves MemoryService and the shard
  // protocol. "router": holds nothing and serves MemoryService from the
  // nodes in `shards` (server/router.h); data_dir, the compute and writer
  // options, the HTTP gateway, the tokens and expiry are a node's and
  // unused (a router passes the caller's authorization on to the shards).
  std::string role = "node";
  // The router's shards (host:port), in shard order.
  std::vector<std::string> shards;
  // A router's: PEM CA certificates that the shards' TLS certificates are
  // checked against; set, the router dials its shards with TLS.
  std::string shard_tls_ca_file;
  std::string listen = "127.0.0.1:50051";
  std::string data_dir = "data";
  // host:port of the Prometheus endpoint (/metrics); empty disables it.
  std::string metrics_listen = "127.0.0.1:9464";
  uint64_t memory_budget_bytes = 0;
  int max_message_bytes = 64 << 20;
  int64_t max_batch = 65536;
  // Dynamic batching of concurrent sync Retrieve calls (see ServiceLimits).
  bool batching = true;
  int64_t max_batch_queries = 256;
  absl::Duration max_batch_delay = absl::ZeroDuration();
  // The compute scheduler (see SchedulerOptions, ServiceLimits): executor
  // threads (0: one per CPU), admission queue bound, default queue timeout,
  // the inline bound and SampleStream's frame buffer.
  int executor_threads = 0;
  int64_t max_queue = 1024;
  absl::Duration queue_timeout = absl::ZeroDuration();
  double inline_work = 1 << 20;
  size_t stream_buffer_bytes = 64 << 20;
  // Bytes of filtered banks kept for repeated filters (ServiceLimits).
  size_t filter_cache_bytes = 64 << 20;
  // Threads that run the writes (CreateBank, DeleteBank, Store,
  // DeletePatterns, Backup); their queue is bounded by max_queue too.
  int writer_threads = 2;
  // When non-empty, every MemoryService call must carry
  // "authorization: Bearer <token>" (UNAUTHENTICATED otherwise). Health,
  // reflection and the metrics endpoint stay open for probes.
  std::string auth_token;
  // A token file's text (see server/access.h): tokens scoped to banks and
  // to read or read-write. Overrides auth_token when set.
  std::string auth_tokens;
  // PEM files; both set enables TLS on the gRPC port (a node's or a
  // router's).
  std::string tls_cert_file;
  std::string tls_key_file;
  // host:port of the JSON-over-HTTP gateway and web page (HttpGateway);
  // empty disables it. Port 0 picks a free one (http_port()).
  std::string http_listen;
  // Directory served under /ui/ by the gateway; empty serves no page.
  std::string http_ui_dir;
  // Threads serving HTTP connections.
  int http_threads = 8;
  // A Backup snapshot to start from: copied to <data_dir>/engram.db when
  // the data directory holds no database yet (FAILED_PRECONDITION if it does).
  std::string restore_from;
  // How often expired patterns are deleted from memory and disk; zero turns
  // the sweep off (a read still deletes its bank's expired patterns first).
  absl::Duration expire_interval = absl::Seconds(1);
  // Replicated mode (server/write_log.h): comma-separated NATS URLs of the
  // JetStream cluster holding this replica group's write log; empty: writes
  // go to the local database only.
  std::string log_servers;
  // The group's stream; every replica of the group names the same one.
  std::string log_stream = "ENGRAM";
  // Copies of the stream on the NATS servers (when this replica creates it).
  int log_replicas = 3;
  // Longest wait of a write for the log's quorum ack.
  absl::Duration log_publish_timeout = absl::Seconds(5);
  // Longest wait of a read for its min_sequence.
  absl::Duration min_sequence_wait = absl::Seconds(5);
  // The Unix time in milliseconds for expiry; null means the system clock.
  std::function<int64_t()> clock_ms;
};

class EngramServer {
 public:
  // UNAVAILABLE if the port or data directory cannot be used; storage errors
  // while loading.
  static absl::StatusOr<std::unique_ptr<EngramServer>> Start(const ServerConfig& config);
  ~EngramServer();

  int port() const { return port_; }
  // The HTTP gateway's port; 0 when it is off.
  int http_port() const { return gateway_ == nullptr ? 0 : gateway_->port(); }
  std::shared_ptr<grpc::Channel> InProcessChannel();
  core::BankRegistry* registry() { return registry_.get(); }
  const std::shared_ptr<Metrics>& metrics() const { return metrics_; }

  // Stops accepting calls, lets running calls finish within `grace`, then
  // cancels the rest.
  void Shutdown(absl::Duration grace);
  void Wait();

  // Deletes the patterns expired by now and updates the bank gauges;
  // returns how many went, or the first storage error (the other banks are
  // still swept). The sweep thread calls it every expire_interval.
  absl::StatusOr<int64_t> ExpireNow();

 private:
  EngramServer() = default;
  void StopExpiry();
  static absl::StatusOr<std::unique_ptr<EngramServer>> StartRouter(const ServerConfig& config);
  // The Prometheus endpoint on `listen` (none when empty).
  absl::Status ServeMetrics(const std::string& listen);

  std::unique_ptr<core::BankRegistry> registry_;
  // Replicated mode's write log; it applies entries through service_.
  std::unique_ptr<WriteLog> write_log_;
  std::shared_ptr<Metrics> metrics_;
  std::unique_ptr<MemoryServiceImpl> service_;  // null on a router
  std::unique_ptr<ShardServiceImpl> shard_;
  std::unique_ptr<RouterService> router_;       // a router's only service
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<HttpGateway> gateway_;
  int port_ = 0;
  absl::Notification stop_expiry_;
  std::thread expiry_;
};

}  // namespace engram::server

#endif  // ENGRAM_SERVER_SERVER_H_
