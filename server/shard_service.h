// ShardServiceImpl: engram.shard.v1.Shard (proto/engram/shard/v1/shard.proto)
// over this node's banks: the step partials a router merges into the answer
// of a bank held in shards (core/partials.h). Every engramd serves it, with
// MemoryService's credentials and read scopes.
//
//   ShardServiceImpl shard(memory_service.get(), limits.max_batch);
//   builder.RegisterService(&shard);
//
// Threads: gRPC's synchronous API; a stream holds one of its threads while
// open. Thread-safety: streams run concurrently; each pins its own snapshot.
#ifndef ENGRAM_SERVER_SHARD_SERVICE_H_
#define ENGRAM_SERVER_SHARD_SERVICE_H_

#include <cstdint>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"

#include "engram/shard/v1/shard.grpc.pb.h"
#include "server/service_impl.h"

namespace engram::server {

class ShardServiceImpl final : public shard::v1::Shard::Service {
 public:
  // `memory` (not owned) opens the banks; `max_batch` bounds the states per
  // request.
  ShardServiceImpl(MemoryServiceImpl* memory, int64_t max_batch)
      : memory_(memory), max_batch_(max_batch) {}

  grpc::Status Steps(
      grpc::ServerContext* ctx,
      grpc::ServerReaderWriter<shard::v1::StepReply, shard::v1::StepRequest>* stream) override;

 private:
  // Answers `req` (the stream's first request) and every later one.
  absl::Status Serve(
      grpc::ServerContext* ctx,
      grpc::ServerReaderWriter<shard::v1::StepReply, shard::v1::StepRequest>* stream,
      shard::v1::StepRequest* req);

  MemoryServiceImpl* memory_;
  int64_t max_batch_;
};

}  // namespace engram::server

#endif  // ENGRAM_SERVER_SHARD_SERVICE_H_
