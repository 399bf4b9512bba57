// engram health [--service NAME]: the standard grpc.health.v1.Health/Check,
// for probes (exit 0 only when SERVING). The two tiny messages are encoded by
// hand on a generic stub, so the CLI needs no generated health code.
#include <condition_variable>
#include <iostream>
#include <mutex>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/support/byte_buffer.h>

#include "absl/strings/str_cat.h"
#include "client/cli/commands.h"
#include "engram/core/status_macros.h"

namespace engram::cli {

absl::Status RunHealth(const Args& args, Context& ctx) {
  const std::string service = args.Get("service", "");
  if (service.size() > 127) return absl::InvalidArgumentError("--service name too long");
  // HealthCheckRequest { string service = 1; }
  std::string request;
  if (!service.empty()) {
    request.push_back(0x0a);
    request.push_back(static_cast<char>(service.size()));
    request += service;
  }
  grpc::Slice slice(request);
  grpc::ByteBuffer req_buf(&slice, 1);
  grpc::GenericStub stub(ctx.client->channel());
  grpc::ClientContext cctx;
  ctx.client->Prepare(&cctx);
  grpc::ByteBuffer resp_buf;
  grpc::Status status;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  stub.UnaryCall(&cctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &req_buf,
                 &resp_buf, [&](grpc::Status s) {
                   std::lock_guard<std::mutex> lock(mu);
                   status = std::move(s);
                   done = true;
                   cv.notify_one();
                 });
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done; });
  }
  ENGRAM_RETURN_IF_ERROR(client::FromGrpc(status));
  std::vector<grpc::Slice> slices;
  resp_buf.Dump(&slices);
  std::string resp;
  for (const auto& s : slices) resp.append(reinterpret_cast<const char*>(s.begin()), s.size());
  // HealthCheckResponse { ServingStatus status = 1; } (a one-byte varint)
  int code = 0;  // UNKNOWN when absent
  if (resp.size() >= 2 && resp[0] == 0x08) code = static_cast<unsigned char>(resp[1]);
  static const char* kNames[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};
  const std::string name = code >= 0 && code <= 3 ? kNames[code] : "UNKNOWN";
  if (ctx.json) std::cout << "{\"status\":\"" << name << "\"}\n";
  else std::cout << name << "\n";
  if (code != 1) return absl::UnavailableError(absl::StrCat("health: ", name));
  return absl::OkStatus();
}

}  // namespace engram::cli
