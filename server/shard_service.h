// ShardServiceImpl: engram.shard.v1.Shard (proto/engram/shard/v1/shard.proto)
// over this node's banks: the step partials a router merges into the answer
// of a bank held in shards (core/partials.h). Every engramd serves it, with
// MemoryService's credentials and read scopes.
//
//   ShardServiceImpl shard(memory_service.get(), limits.max_batch);
//   builder.RegisterService(&shard);
//
// Threads: a stream is a callback reactor. A step whose pass is within
// --inline_work runs on the thread that read it, as a small call does;
// every other step (and a first step that waits for the write log) is a
// task on the node's compute scheduler (server/scheduler.h), queued behind
// the node's own calls, bounded by its queue (RESOURCE_EXHAUSTED when full)
// and by the call's deadline or --queue_timeout_ms per step. No thread
// waits on an open stream.
// Thread-safety: streams run concurrently; each pins its own snapshot, and
// a stream's steps run one at a time, in order.
#ifndef ENGRAM_SERVER_SHARD_SERVICE_H_
#define ENGRAM_SERVER_SHARD_SERVICE_H_

#include <cstdint>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"

#include "engram/shard/v1/shard.grpc.pb.h"
#include "server/service_impl.h"

namespace engram::server {

class ShardServiceImpl final : public shard::v1::Shard::CallbackService {
 public:
  // `memory` (not owned) opens the banks and runs the steps; `max_batch`
  // bounds the states per request.
  ShardServiceImpl(MemoryServiceImpl* memory, int64_t max_batch)
      : memory_(memory), max_batch_(max_batch) {}

  grpc::ServerBidiReactor<shard::v1::StepRequest, shard::v1::StepReply>* Steps(
      grpc::CallbackServerContext* ctx) override;

 private:
  class StepsReactor;
  class StepTask;

  MemoryServiceImpl* memory_;
  int64_t max_batch_;
};

}  // namespace engram::server

#endif  // ENGRAM_SERVER_SHARD_SERVICE_H_
