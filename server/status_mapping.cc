#include "server/status_mapping.h"

namespace engram::server {

grpc::Status ToGrpcStatus(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  // absl::StatusCode and grpc::StatusCode share the canonical numbering.
  const int code = static_cast<int>(s.code());
  const auto grpc_code = (code >= 1 && code <= 16)
                             ? static_cast<grpc::StatusCode>(code)
                             : grpc::StatusCode::UNKNOWN;
  return grpc::Status(grpc_code, std::string(s.message()));
}

}  // namespace engram::server
