// RouterService: engram.v1.MemoryService for banks held in shards on other
// engramd nodes (engramd --role=router). The router holds no patterns and
// no state of its own: every call is answered from the shards.
//
//   RouterOptions o;
//   o.shards = {"engram-0:50051", "engram-1:50051", "engram-2:50051"};
//   ENGRAM_ASSIGN_OR_RETURN(auto router, RouterService::Create(o));
//   builder.RegisterService(router.get());
//
// What goes where:
//  - CreateBank and DeleteBank go to every shard. A shard that already has
//    the same bank (create) or no longer has it (delete) counts as done, so
//    after a failure naming a shard, repeating the same call converges; a
//    shard holding another bank of that name is ALREADY_EXISTS.
//  - Store, GetPatterns (by id) and DeletePatterns go to the shard that owns
//    each id: ShardOf(id), a fixed hash of the id modulo the shard count. A
//    Store without ids gets fresh random ids from the router. A Store that
//    fails on one shard is undone on the others (on contexts of the
//    router's own) before the error is returned; a DeletePatterns checks
//    every id first, and one that still fails on a shard says which
//    shards' deletes stand.
//  - Energy and Retrieve (SYNC and GRADIENT) open one engram.shard.v1 Steps stream per
//    shard per call, send the resolved energy and every step's states to
//    all shards, and merge their partials (core::MergeStepPartials, in shard
//    order): the answer is the single-node answer up to float
//    reassociation. The nearest memory is the closest of the shards'
//    nearest (the first shard wins an exact tie).
//  - Sample and SampleStream (continuous banks) run the samplers at the
//    router (core::SampleWith) with every denoiser evaluation merged from
//    the shards, the same draws for the same seed.
//  - GetBank and ListBanks sum the shards' counts; ListBanks lists a name
//    any shard holds.
//  - Backup writes each shard's snapshot on that shard (restore each shard
//    from its own, --restore_from).
// A shard that cannot be reached fails the call UNAVAILABLE naming it; an
// answer is never made from some of the shards. The caller's deadline (60 s
// when it sets none), cancellation and authorization header go to the
// shards. The router listens with TLS when given a certificate, and dials
// the shards with TLS when given their CA (RouterOptions::shard_tls_ca_pem).
//
//
// SYNC on a bipolar bank under a non-general family merges the shards'
// drive partials (core::DrivePartialBatch) and steps on the drive.
//
// A shard may be a replica group (engramd --log): its target names every
// replica ("ipv4:a:p,b:p" from "a:p|b:p", or a DNS name) and calls spread
// over them (round_robin). The router keeps each shard's highest
// acknowledged write-log sequence (Seen) and sends it with every call to
// that shard (kMinSequenceHeader), so its reads see its writes.
//
// Banks that decay with age: every shard weighs its rows at the time the
// router sends with the call's streams (RouterOptions::clock_ms).
//
// Every energy routes (partials.h: the softmax and linear families' sums,
// the whole-row separations' forms, sparsemax and 1.5-entmax in two
// requests per step), and so does Energy's novelty (the reference sample is
// chosen by id), ASYNC retrieval and bipolar sampling (each flip's energy
// merged from the shards) and TINYBRAIN (each shard keeps its rows' memory
// layer on the call's stream).
//
// Thread-safety: gRPC's synchronous API; calls run concurrently.
#ifndef ENGRAM_SERVER_ROUTER_H_
#define ENGRAM_SERVER_ROUTER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "engram/core/mutex.h"
#include "engram/core/sampler.h"
#include "engram/shard/v1/shard.grpc.pb.h"
#include "engram/v1/engram.grpc.pb.h"
#include "server/metrics.h"

namespace engram::server {

struct RouterOptions {
  // host:port of each shard, in shard order (the order partials merge in
  // and ids hash over). Changing the count moves ids to other shards.
  std::vector<std::string> shards;
  // PEM CA certificates the shards' TLS certificates are checked against;
  // set, the shards are dialled with TLS (their names in `shards` must match
  // their certificates); empty, in plaintext.
  std::string shard_tls_ca_pem;
  // The Unix time in milliseconds sent to the shards of a call, at which
  // banks that decay with age are weighed; null: the system clock.
  std::function<int64_t()> clock_ms;
  // Deadline of the shard calls of a caller that sets none.
  absl::Duration default_timeout = absl::Seconds(60);
  // Largest message to and from a shard.
  int max_message_bytes = 64 << 20;
  // Largest batch of a call (patterns per Store, ids per GetPatterns and
  // DeletePatterns, states per Energy and Retrieve, samples per Sample), as
  // on a node.
  int64_t max_batch = 65536;
  // Where shard call outcomes (engram_shard_calls_total) and batches
  // (engram_batch_queries / engram_batch_calls) are counted; may be null.
  std::shared_ptr<Metrics> metrics;
  // SYNC Retrieves of one bank, energy, filter and authorization header
  // run as one batch: one stream per shard and one request per step for all
  // their queries (at most max_batch_queries). A call joins a running batch
  // at a step boundary once a step sent after it came finds every shard's
  // bank unchanged since the batch pinned it (StepReply.current), so a call
  // sees every write acknowledged before it; otherwise it waits for the next
  // batch. At most two batches of one key run at once. Off: every call runs
  // alone.
  bool batching = true;
  int64_t max_batch_queries = 256;
};

// The shard (0 .. shards - 1) that owns `id`.
int ShardOf(uint64_t id, int shards);

// The shard list of a --shards flag: comma-separated host:port, or
// "name-{0..N}.rest:port" for the N+1 pods of a Kubernetes StatefulSet
// behind a headless Service (name-0.rest:port ... name-N.rest:port). A
// shard written "ip:port|ip:port|..." (a replica group) becomes the target
// "ipv4:ip:port,ip:port,..."; any other gRPC target (dns:///...) is kept.
absl::StatusOr<std::vector<std::string>> ParseShardList(const std::string& flag);

class RouterService final : public v1::MemoryService::Service {
 public:
  // INVALID_ARGUMENT for an empty shard list.
  static absl::StatusOr<std::unique_ptr<RouterService>> Create(RouterOptions options);
  ~RouterService() override;

  grpc::Status CreateBank(grpc::ServerContext* ctx, const v1::CreateBankRequest* req,
                          v1::BankInfo* resp) override;
  grpc::Status GetBank(grpc::ServerContext* ctx, const v1::GetBankRequest* req,
                       v1::BankInfo* resp) override;
  grpc::Status ListBanks(grpc::ServerContext* ctx, const v1::ListBanksRequest* req,
                         v1::ListBanksResponse* resp) override;
  grpc::Status DeleteBank(grpc::ServerContext* ctx, const v1::DeleteBankRequest* req,
                          v1::DeleteBankResponse* resp) override;
  grpc::Status Store(grpc::ServerContext* ctx, const v1::StoreRequest* req,
                     v1::StoreResponse* resp) override;
  grpc::Status DeletePatterns(grpc::ServerContext* ctx, const v1::DeletePatternsRequest* req,
                              v1::DeletePatternsResponse* resp) override;
  grpc::Status GetPatterns(grpc::ServerContext* ctx, const v1::GetPatternsRequest* req,
                           v1::GetPatternsResponse* resp) override;
  grpc::Status Retrieve(grpc::ServerContext* ctx, const v1::RetrieveRequest* req,
                        v1::RetrieveResponse* resp) override;
  grpc::Status Energy(grpc::ServerContext* ctx, const v1::EnergyRequest* req,
                      v1::EnergyResponse* resp) override;
  grpc::Status Sample(grpc::ServerContext* ctx, const v1::SampleRequest* req,
                      v1::SampleResponse* resp) override;
  grpc::Status SampleStream(grpc::ServerContext* ctx, const v1::SampleRequest* req,
                            grpc::ServerWriter<v1::SampleFrame>* writer) override;
  grpc::Status Backup(grpc::ServerContext* ctx, const v1::BackupRequest* req,
                      v1::BackupResponse* resp) override;

  int shards() const { return static_cast<int>(shards_.size()); }
  // RouterOptions::clock_ms, or the system clock.
  int64_t NowMs() const;

 private:
  struct Shard {
    std::string address;
    std::unique_ptr<v1::MemoryService::Stub> memory;
    std::unique_ptr<shard::v1::Shard::Stub> steps;
  };
  class StepStreams;

  explicit RouterService(RouterOptions options);

  // A frame for SampleStream; false when the client is gone.
  using FrameSink = std::function<bool(const v1::SampleFrame&)>;
  // A Sample call over the shards (core::SampleWith); the nearest
  // memories' payloads by id into `payloads`.
  absl::StatusOr<core::SampleBatch> RunSample(grpc::ServerContext* ctx,
                                              const v1::SampleRequest* req,
                                              const FrameSink& on_frame,
                                              absl::flat_hash_map<uint64_t, std::string>* payloads);
  static void SampleToProto(const core::SampleBatch& batch,
                            const absl::flat_hash_map<uint64_t, std::string>& payloads,
                            v1::SampleResponse* resp);

  // A client context for a call to a shard on behalf of `ctx`: its deadline
  // (or the default timeout), cancellation and authorization header.
  // With `detached`, a context of the router's own (its default timeout,
  // the caller's authorization header only), for work that must outlive a
  // failed or cancelled call (undoing a Store).
  // With `shard` >= 0, the context asks that shard for reads at least as
  // fresh as every write this router saw it acknowledge (replicated shards,
  // see Seen).
  std::unique_ptr<grpc::ClientContext> Forward(grpc::ServerContext* ctx, bool detached = false,
                                               int shard = -1) const;
  // Replicated shards (engramd --log): the highest write-log sequence shard
  // `i` acknowledged to this router (0: none, or not replicated). Every
  // call to shard i asks for it as the least sequence to read at, so a read
  // through this router sees every write acknowledged through it, whichever
  // replica of the shard answers.
  uint64_t Seen(int i) const { return seen_[i].load(); }
  // Records the sequence a call to shard i returned (its trailing metadata).
  void Saw(int i, const grpc::ClientContext& c);
  // Seen() of every shard, as part of a batching key: a call joins only a
  // batch whose streams read at least as fresh.
  std::string SeenKey() const;
  // `s` from shard `i`, its message prefixed with the shard's name; the
  // outcome is counted.
  grpc::Status FromShard(int i, const grpc::Status& s) const;
  // The bank as shard 0 describes it (dimension, kind, energy, values).
  absl::StatusOr<v1::BankInfo> Describe(grpc::ServerContext* ctx, const std::string& bank);
  // `count` fresh random ids.
  std::vector<uint64_t> FreshIds(int64_t count);
  // One shard call on the callback API: starts it with `context` and ends
  // by calling `done` with its status (once, from any thread).
  using ShardDone = std::function<void(grpc::Status)>;
  using ShardCall = std::function<void(int shard, grpc::ClientContext* context, ShardDone done)>;
  // Starts `start` for every shard in `shards` at once (no thread is
  // created: the calls run on gRPC's callback API) and waits for all;
  // returns each shard's status, named (FromShard).
  std::vector<grpc::Status> FanOut(grpc::ServerContext* ctx, const std::vector<int>& shards,
                                   const ShardCall& start, bool detached = false);
  std::vector<int> AllShards() const;

  // One SYNC Retrieve's queries and results in a batch (router.cc).
  struct SyncCall;
  // Calls whose queries run as one core::SyncBatch over one set of shard
  // streams, on a runner thread of the router's (a call's own thread only
  // waits). The first block is set before the batch runs and read-only
  // after; fields after `calls` are guarded by batch_mu_.
  struct SyncGroup {
    shard::v1::StepRequest first;  // the streams' first request
    core::EnergyConfig cfg;
    core::StateKind kind = core::StateKind::kContinuous;
    int n = 0;  // the bank's dimension
    int m = 0;  // its value dimension
    std::string authorization;  // the calls' authorization header
    std::vector<SyncCall*> calls;  // the calls it starts with
    int64_t queries = 0;           // queries of its calls not yet answered
    bool started = false;          // a runner took it (its calls are fixed)
    bool open = false;             // takes joiners (its shards still current)
    std::chrono::system_clock::time_point until;  // its streams' deadline
    int64_t step_seq = 0;          // steps begun
    std::vector<SyncCall*> joining;  // came while it ran, not yet admitted
    std::string key;  // its key (empty: a call alone)
    // Counted by the thread running it: calls and queries it ran.
    int64_t calls_run = 0;
    int64_t queries_run = 0;
  };
  // The batches of one key: those running, and the one forming.
  struct KeyGroups {
    std::vector<std::shared_ptr<SyncGroup>> running;
    std::shared_ptr<SyncGroup> forming;
  };
  static constexpr int kSyncGroupsPerKey = 2;
  // Threads that run Retrieve batches (each mostly waits on the shards).
  static constexpr int kRunnerThreads = 8;
  class Runners;
  // A batch of `key` with no calls, computing as `shape` (its first block).
  static std::shared_ptr<SyncGroup> EmptyLike(const SyncGroup& shape, const std::string& key);
  // Runs `call` in a batch of `key` (computing as `shape`, whose first block
  // is set); returns when it is answered (its results in, or its status
  // set).
  void RunSyncGrouped(const std::string& key, const SyncGroup& shape, SyncCall* call);
  // Starts `group` (one of `key`'s running ones) on a runner. Requires
  // batch_mu_.
  void StartGroup(const std::string& key, std::shared_ptr<SyncGroup> group)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(batch_mu_);
  // Runs the calls of `group`, and those that join it, to their end on this
  // thread, with the streams' context detached from every call (`attached`:
  // that of the group's only call, running on its own thread).
  void RunSyncGroup(SyncGroup& group, grpc::ServerContext* attached = nullptr);
  // Takes no more joiners into `group`: those waiting go first in its key's
  // next batch, started at once when a slot is free. Requires batch_mu_.
  void CloseGroup(SyncGroup& group) ABSL_EXCLUSIVE_LOCKS_REQUIRED(batch_mu_);
  // Its body; `taken` holds the calls admitted and not yet answered.
  void RunSyncGroupSteps(SyncGroup& group, grpc::ServerContext* attached,
                         std::vector<SyncCall*>* taken);

  RouterOptions options_;
  std::vector<Shard> shards_;
  std::unique_ptr<std::atomic<uint64_t>[]> seen_;
  core::Mutex batch_mu_;
  core::CondVar batch_cv_;
  absl::flat_hash_map<std::string, KeyGroups> sync_groups_ ABSL_GUARDED_BY(batch_mu_);
  std::unique_ptr<Runners> runners_;
  absl::Mutex rng_mu_;
  uint64_t rng_state_ ABSL_GUARDED_BY(rng_mu_);
};

}  // namespace engram::server

#endif  // ENGRAM_SERVER_ROUTER_H_
