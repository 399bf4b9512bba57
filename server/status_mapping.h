// The one place where absl::Status becomes grpc::Status: the code is kept
// (never collapsed to INTERNAL) and so is the message.
#ifndef ENGRAM_SERVER_STATUS_MAPPING_H_
#define ENGRAM_SERVER_STATUS_MAPPING_H_

#include <exception>
#include <new>

#include <google/protobuf/message.h>
#include <grpcpp/support/status.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace engram::server {

grpc::Status ToGrpcStatus(const absl::Status& s);

// Runs a handler body (returning absl::Status); an exception becomes a
// status (RESOURCE_EXHAUSTED for memory, INTERNAL otherwise), and a failed
// call leaves `resp` (may be null) empty.
template <typename F>
grpc::Status Guarded(google::protobuf::Message* resp, F&& body) {
  absl::Status s;
  try {
    s = body();
  } catch (const std::bad_alloc&) {
    s = absl::ResourceExhaustedError("engramd has no memory left for this call; send less");
  } catch (const std::exception& e) {
    s = absl::InternalError(absl::StrCat("unexpected error in engramd: ", e.what()));
  } catch (...) {
    s = absl::InternalError("unexpected error in engramd");
  }
  if (!s.ok() && resp != nullptr) resp->Clear();
  return ToGrpcStatus(s);
}

}  // namespace engram::server

#endif  // ENGRAM_SERVER_STATUS_MAPPING_H_
