// HttpGateway: JSON over HTTP for every MemoryService method, and the static
// web page, on a port of its own.
//
//   POST /v1/{Method}      body: the request message in protobuf's JSON
//                          mapping; 200 and the response message as JSON, or
//                          an HTTP error status mapped from the gRPC code
//                          with {"error": {"code", "status", "message"}}.
//   POST /v1/SampleStream  200, application/x-ndjson: one SampleFrame per
//                          line as the sampler runs; a failure after the
//                          first frame arrives as a last {"error": ...} line.
//   GET  /ui/...           static files from `ui_dir` (GET / redirects here).
//   GET  /healthz          200 "ok" once the gateway listens.
//
// The gateway is a client of the gRPC server it runs beside, over the
// in-process channel: a JSON call passes the same authorization, limits,
// scheduler, interceptors and metrics as a gRPC call, and gets the same
// status code. "Authorization: Bearer <token>" is forwarded as gRPC
// metadata; "X-Server-Timeout: <seconds>" becomes the call's deadline.
// Routes come from the service's descriptor, so a new RPC is served without
// code here.
//
//   HttpGatewayOptions options;
//   options.listen = "127.0.0.1:8080";
//   ENGRAM_ASSIGN_OR_RETURN(auto gw, HttpGateway::Start(options, channel, metrics));
//   ...
//   gw->Stop();
//
// Thread-safety: Stop may be called from any thread; it is idempotent.
#ifndef ENGRAM_SERVER_HTTP_GATEWAY_H_
#define ENGRAM_SERVER_HTTP_GATEWAY_H_

#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "server/metrics.h"

namespace httplib {
class Server;
}

namespace engram::server {

struct HttpGatewayOptions {
  // host:port; port 0 picks a free one (see HttpGateway::port()).
  std::string listen = "127.0.0.1:8080";
  // Directory served under /ui/; empty serves no page.
  std::string ui_dir;
  // Threads that serve HTTP connections; a JSON call holds one for its
  // duration (the compute limits are the gRPC server's).
  int threads = 8;
  // Largest request body accepted (413 beyond it).
  size_t max_body_bytes = 64 << 20;
};

// The HTTP status for a gRPC status code (Google API design guide mapping):
// INVALID_ARGUMENT, FAILED_PRECONDITION and OUT_OF_RANGE 400, UNAUTHENTICATED
// 401, PERMISSION_DENIED 403, NOT_FOUND 404, ALREADY_EXISTS and ABORTED 409,
// RESOURCE_EXHAUSTED 429, CANCELLED 499, UNIMPLEMENTED 501, UNAVAILABLE 503,
// DEADLINE_EXCEEDED 504, the rest 500.
int HttpStatusForGrpcCode(grpc::StatusCode code);

class HttpGateway {
 public:
  // UNAVAILABLE if `options.listen` cannot be bound; INVALID_ARGUMENT if it
  // is not host:port or `ui_dir` is not a directory.
  static absl::StatusOr<std::unique_ptr<HttpGateway>> Start(
      const HttpGatewayOptions& options, std::shared_ptr<grpc::Channel> channel,
      std::shared_ptr<Metrics> metrics);
  ~HttpGateway();

  int port() const { return port_; }
  // Stops accepting connections and waits for the serving threads.
  void Stop();

 private:
  HttpGateway() = default;

  std::unique_ptr<httplib::Server> http_;
  std::thread listener_;
  std::once_flag stopped_;
  int port_ = 0;
  struct Routes;
  std::unique_ptr<Routes> routes_;
};

}  // namespace engram::server

#endif  // ENGRAM_SERVER_HTTP_GATEWAY_H_
