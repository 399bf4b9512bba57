// The one place where absl::Status becomes grpc::Status: the code is kept
// (never collapsed to INTERNAL) and so is the message.
#ifndef ENGRAM_SERVER_STATUS_MAPPING_H_
#define ENGRAM_SERVER_STATUS_MAPPING_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace engram::server {

grpc::Status ToGrpcStatus(const absl::Status& s);

}  // namespace engram::server

#endif  // ENGRAM_SERVER_STATUS_MAPPING_H_
