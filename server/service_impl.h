// MemoryServiceImpl: the gRPC adapter over core. Each handler runs the
// common prelude (credentials, readiness, bank name), decodes and validates,
// calls core on a pinned snapshot of the bank, and encodes (convert.h); RPC
// metrics are recorded by the interceptor, convergence and bank sizes here.
//
//   auto impl = std::make_unique<MemoryServiceImpl>(registry.get(), metrics, limits);
//   builder.RegisterService(impl.get());
//
// Threads: every method uses gRPC's callback API and no handler blocks.
// Reads of bank metadata and patterns (GetBank, ListBanks, GetPatterns) are
// answered on the handler's thread from a pinned snapshot. Writes
// (CreateBank, DeleteBank, Store, DeletePatterns, Backup), which wait for
// the disk, queue on the writer pool (a Scheduler of `writer_threads`). The
// compute methods (Retrieve, Energy, Sample, SampleStream) answer small work
// at once and queue the rest on the compute Scheduler, whose executors
// compute and Finish. Sync Retrieve calls on the same bank and energy are
// batched there (continuous batching, core::SyncBatch). The process's
// threads are therefore fixed: the two pools, their timers and gRPC's own.
// No handler lets an exception escape: every error is a chosen status code.
//
// Thread-safety: handlers run concurrently; all shared state lives in the
// (thread-safe) BankRegistry, Scheduler and Metrics.
#ifndef ENGRAM_SERVER_SERVICE_IMPL_H_
#define ENGRAM_SERVER_SERVICE_IMPL_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string_view>

#include "absl/container/flat_hash_map.h"
#include "engram/core/filter.h"
#include "engram/core/mutex.h"
#include "engram/core/novelty.h"
#include "engram/core/registry.h"
#include "engram/v1/engram.grpc.pb.h"
#include "server/metrics.h"
#include "server/access.h"
#include "server/scheduler.h"
#include "server/write_log.h"

namespace engram::server {

struct ServiceLimits {
  // Largest batch (patterns per Store, queries per Retrieve/Energy).
  int64_t max_batch = 65536;
  // Bearer tokens and what each may reach; none disables authentication.
  AccessPolicy access;
  // Where Backup writes (<data_dir>/backups).
  std::string backup_dir;
  // Merge concurrent sync Retrieve calls on the same bank and energy into
  // batched kernel calls (scheduler.max_batch_queries, max_batch_delay).
  bool batching = true;
  // Executor pool, admission queue and batch sizes.
  SchedulerOptions scheduler;
  // The writers' pool and queue (its batching options are unused).
  SchedulerOptions writer = {.name = "writer", .threads_flag = "--writer_threads",
                             .threads = 2, .max_queue = 1024};
  // Queue timeout of calls that do not set queue_timeout_ms; zero: none
  // (the call's own deadline still applies).
  absl::Duration queue_timeout = absl::ZeroDuration();
  // Replicated mode: the longest a read waits for its min_sequence (within
  // its deadline) before UNAVAILABLE.
  absl::Duration min_sequence_wait = absl::Seconds(5);
  // Compute calls whose work is at most this many multiply-adds per pass
  // over the bank (queries x patterns x dimension) are answered on the
  // thread that read them, without the hop to an executor; 0 queues all.
  double inline_work = 1 << 20;
  // Frames a SampleStream may hold unsent for a client that reads slowly;
  // beyond it the call ends RESOURCE_EXHAUSTED.
  size_t stream_buffer_bytes = 64 << 20;
  // Bytes of filtered banks (the rows a filter passes) kept for later calls
  // with the same filter on the same bank version; 0 keeps none.
  size_t filter_cache_bytes = 64 << 20;
};

// OK when `header` (the call's "authorization" metadata, empty if absent)
// is "Bearer <token>"; UNAUTHENTICATED otherwise; OK for an empty `token`.
// Constant time in the token's content.
absl::Status AuthorizeBearer(std::string_view token, std::string_view header);

class MemoryServiceImpl final : public v1::MemoryService::CallbackService {
 public:
  // `registry` may be null while banks are loading: calls then fail with
  // UNAVAILABLE until SetRegistry.
  MemoryServiceImpl(core::BankRegistry* registry, std::shared_ptr<Metrics> metrics,
                    ServiceLimits limits = {});
  // Rejects queued calls and waits for the running ones.
  ~MemoryServiceImpl() override;
  void SetRegistry(core::BankRegistry* registry);
  // Replicated mode: writes go through `log` (published, then applied by
  // ApplyLogEntry on every replica, this one included) and reads honour
  // min_sequence. Set before SetRegistry; `log` outlives the calls.
  void SetWriteLog(WriteLog* log) { write_log_.store(log); }
  // Applies one write-log entry to `registry` at sequence `seq` and encodes
  // its call's response into *response (WriteLog::Apply).
  absl::Status ApplyLogEntry(core::BankRegistry* registry, const replication::v1::LogEntry& entry,
                             uint64_t seq, std::string* response);
  // Replicated mode: publishes an expiry entry for every bank holding
  // patterns due by now (deduplicated across replicas); returns how many
  // entries were published, or the first error.
  absl::StatusOr<int64_t> PublishExpiry();
  // Stops taking compute calls (UNAVAILABLE) and ends the executors once
  // the running calls are answered.
  void Shutdown();
  const Scheduler& scheduler() const { return *scheduler_; }
  // Queues `task` (a step of a shard stream, shard_service.h) on the compute
  // scheduler; it may wait until the call's deadline or --queue_timeout_ms.
  void SubmitCompute(const grpc::CallbackServerContext* ctx, std::unique_ptr<Scheduler::Task> task);
  // Work (multiply-adds per pass) small enough to answer on the thread that
  // read the call (--inline_work).
  bool InlineWork(double multiply_adds) const {
    return limits_.inline_work > 0 && multiply_adds <= limits_.inline_work;
  }
  // True when a shard stream's first step on `bank`, `floats` state values,
  // may run on the thread that read it, as a small call does: its pass is
  // within --inline_work and it need not wait for the write log.
  bool InlineShardOpen(grpc::ServerContextBase* ctx, const std::string& bank,
                       int64_t floats) const;
  const Scheduler& writer() const { return *writer_; }

  grpc::ServerUnaryReactor* CreateBank(grpc::CallbackServerContext* ctx,
                                       const v1::CreateBankRequest* req,
                                       v1::BankInfo* resp) override;
  grpc::ServerUnaryReactor* GetBank(grpc::CallbackServerContext* ctx,
                                    const v1::GetBankRequest* req, v1::BankInfo* resp) override;
  grpc::ServerUnaryReactor* ListBanks(grpc::CallbackServerContext* ctx,
                                      const v1::ListBanksRequest* req,
                                      v1::ListBanksResponse* resp) override;
  grpc::ServerUnaryReactor* DeleteBank(grpc::CallbackServerContext* ctx,
                                       const v1::DeleteBankRequest* req,
                                       v1::DeleteBankResponse* resp) override;
  grpc::ServerUnaryReactor* Store(grpc::CallbackServerContext* ctx, const v1::StoreRequest* req,
                                  v1::StoreResponse* resp) override;
  grpc::ServerUnaryReactor* DeletePatterns(grpc::CallbackServerContext* ctx,
                                           const v1::DeletePatternsRequest* req,
                                           v1::DeletePatternsResponse* resp) override;
  grpc::ServerUnaryReactor* GetPatterns(grpc::CallbackServerContext* ctx,
                                        const v1::GetPatternsRequest* req,
                                        v1::GetPatternsResponse* resp) override;
  grpc::ServerUnaryReactor* Backup(grpc::CallbackServerContext* ctx,
                                   const v1::BackupRequest* req,
                                   v1::BackupResponse* resp) override;

  grpc::ServerUnaryReactor* Retrieve(grpc::CallbackServerContext* ctx,
                                     const v1::RetrieveRequest* req,
                                     v1::RetrieveResponse* resp) override;
  grpc::ServerUnaryReactor* Energy(grpc::CallbackServerContext* ctx,
                                   const v1::EnergyRequest* req,
                                   v1::EnergyResponse* resp) override;
  grpc::ServerUnaryReactor* Sample(grpc::CallbackServerContext* ctx,
                                   const v1::SampleRequest* req,
                                   v1::SampleResponse* resp) override;
  grpc::ServerWriteReactor<v1::SampleFrame>* SampleStream(
      grpc::CallbackServerContext* ctx, const v1::SampleRequest* req) override;

  // A read of `bank` for the shard protocol (shard_service.h): credentials
  // and read scope checked, expired rows swept, `filter` applied (rows that
  // all fail give a bank of none, as an Energy call sees it), and the
  // energy override or the bank's own energy resolved as the read methods
  // do.
  struct ShardRead {
    core::BankSnapshot bank;  // the pinned bank, filtered
    core::EnergyConfig energy;
    // True while no write or expiry changed the bank since it was pinned.
    std::function<bool()> current;
    int64_t now_ms = 0;  // the registry's clock when it was pinned
  };
  // On a replica, a call carrying kMinSequenceHeader first waits (blocking,
  // up to its deadline or --min_sequence_wait_ms) until the write log is
  // applied that far, else UNAVAILABLE.
  absl::StatusOr<ShardRead> OpenShardRead(grpc::ServerContextBase* ctx, const std::string& bank,
                                          bool has_energy, const v1::EnergyConfig& energy,
                                          const v1::Filter& filter);

  // The bodies of the bank and pattern methods on the calling thread; `ctx`
  // may be null (no deadline, no credentials).
  grpc::Status CreateBankNow(grpc::ServerContextBase* ctx, const v1::CreateBankRequest* req,
                          v1::BankInfo* resp);
  grpc::Status GetBankNow(grpc::ServerContextBase* ctx, const v1::GetBankRequest* req,
                       v1::BankInfo* resp);
  grpc::Status ListBanksNow(grpc::ServerContextBase* ctx, const v1::ListBanksRequest* req,
                         v1::ListBanksResponse* resp);
  grpc::Status DeleteBankNow(grpc::ServerContextBase* ctx, const v1::DeleteBankRequest* req,
                          v1::DeleteBankResponse* resp);
  grpc::Status StoreNow(grpc::ServerContextBase* ctx, const v1::StoreRequest* req,
                     v1::StoreResponse* resp);
  grpc::Status DeletePatternsNow(grpc::ServerContextBase* ctx, const v1::DeletePatternsRequest* req,
                              v1::DeletePatternsResponse* resp);
  grpc::Status GetPatternsNow(grpc::ServerContextBase* ctx, const v1::GetPatternsRequest* req,
                           v1::GetPatternsResponse* resp);
  grpc::Status BackupNow(grpc::ServerContextBase* ctx, const v1::BackupRequest* req,
                      v1::BackupResponse* resp);

  // The bodies of the compute methods on the calling thread, unbatched;
  // `ctx` may be null (no deadline, no credentials). `on_frame`, when set,
  // receives SampleStream's frames and returns false to stop the sampler
  // (RESOURCE_EXHAUSTED).
  grpc::Status RetrieveNow(grpc::ServerContextBase* ctx, const v1::RetrieveRequest* req,
                           v1::RetrieveResponse* resp);
  grpc::Status EnergyNow(grpc::ServerContextBase* ctx, const v1::EnergyRequest* req,
                         v1::EnergyResponse* resp);
  using FrameSink = std::function<bool(v1::SampleFrame frame)>;
  grpc::Status SampleNow(grpc::ServerContextBase* ctx, const v1::SampleRequest* req,
                         v1::SampleResponse* resp, const FrameSink& on_frame = nullptr);

 private:
  struct RetrieveWork;
  class RetrieveTask;
  class UnaryTask;
  class StreamReactor;
  class StreamTask;

  // The prelude of every handler: credentials, readiness, the bank name
  // and the token's scope (`bank` null: every bank). Returns the registry.
  absl::StatusOr<core::BankRegistry*> Begin(grpc::ServerContextBase* ctx, const std::string* bank,
                                            Access access) const;
  // The call's token scope (null when no token is configured), or
  // UNAUTHENTICATED.
  absl::StatusOr<const TokenScope*> Authenticate(grpc::ServerContextBase* ctx) const;
  // The registry, or UNAVAILABLE while banks load or when this replica
  // stopped applying its write log.
  absl::StatusOr<core::BankRegistry*> Ready() const;
  // Writes: the change a call asks for, applied to `registry` (at `at` when
  // it comes from the write log; `commit` is asked just before a local
  // write commits). Validation is part of it, so every replica refuses an
  // entry alike.
  absl::Status ApplyCreateBank(core::BankRegistry* registry, const v1::CreateBankRequest& req,
                               const core::LogPosition& at, v1::BankInfo* resp);
  absl::Status ApplyDeleteBank(core::BankRegistry* registry, const v1::DeleteBankRequest& req,
                               const core::LogPosition& at);
  absl::Status ApplyStore(core::BankRegistry* registry, const v1::StoreRequest& req,
                          const core::LogPosition& at,
                          const core::BankRegistry::CommitCheck& commit, v1::StoreResponse* resp);
  absl::Status ApplyDeletePatterns(core::BankRegistry* registry,
                                   const v1::DeletePatternsRequest& req,
                                   const core::LogPosition& at,
                                   const core::BankRegistry::CommitCheck& commit,
                                   v1::DeletePatternsResponse* resp);
  // Publishes `entry` for the call and decodes its outcome into *resp;
  // returns the entry's sequence.
  absl::StatusOr<uint64_t> Replicate(grpc::ServerContextBase* ctx, core::BankRegistry* registry,
                                     replication::v1::LogEntry entry,
                                     google::protobuf::Message* resp);
  // Runs `start` at once, or, in replicated mode for a read asking for a
  // min_sequence this replica has not applied yet, once it has (on the
  // log's applier thread); `fail` gets UNAVAILABLE instead when the read's
  // deadline or --min_sequence_wait_ms passes first.
  void AtSequence(grpc::ServerContextBase* ctx, uint64_t min_sequence,
                  std::function<void()> start, std::function<void(const grpc::Status&)> fail);
  // The compute handlers' bodies, once min_sequence is met.
  void StartRetrieve(grpc::CallbackServerContext* ctx, const v1::RetrieveRequest* req,
                     v1::RetrieveResponse* resp, grpc::ServerUnaryReactor* reactor);
  void StartEnergy(grpc::CallbackServerContext* ctx, const v1::EnergyRequest* req,
                   v1::EnergyResponse* resp, grpc::ServerUnaryReactor* reactor);
  void StartSample(grpc::CallbackServerContext* ctx, const v1::SampleRequest* req,
                   v1::SampleResponse* resp, grpc::ServerUnaryReactor* reactor);
  void StartSampleStream(grpc::CallbackServerContext* ctx, const v1::SampleRequest* req,
                         StreamReactor* reactor);
  void UpdateBankGauges(core::BankRegistry* registry, const std::string& name);
 public:
  // Counts `patterns` expired from `bank` and refreshes its gauges.
  void RecordExpired(core::BankRegistry* registry, const std::string& bank, int64_t patterns);
 private:
  // Answers a bank or pattern call: at once for reads, through the writer
  // pool for writes (`now` runs there).
  template <typename Req, typename Resp>
  grpc::ServerUnaryReactor* Answer(grpc::CallbackServerContext* ctx, const Req* req, Resp* resp,
                                   grpc::Status (MemoryServiceImpl::*now)(
                                       grpc::ServerContextBase*, const Req*, Resp*),
                                   bool writes);
  // The patterns a read sees. A bank holding expired patterns is swept
  // first (*pinned is then re-pinned); the result is *pinned when the
  // filter passes all of it, else a bank of the rows that pass (the
  // filter's now_ms is set from the registry's clock). With
  // `need_patterns`, an empty result is FAILED_PRECONDITION.
  absl::StatusOr<core::BankSnapshot> Visible(core::BankRegistry* registry,
                                             core::BankSnapshot* pinned, core::Filter filter,
                                             bool need_patterns);
  // Validates a Retrieve call against the bank as it is now.
  absl::StatusOr<std::unique_ptr<RetrieveWork>> PrepareRetrieve(grpc::ServerContextBase* ctx,
                                                                const v1::RetrieveRequest* req);
  // Runs one call's queries on `bank`; encodes the answer.
  absl::Status RunRetrieve(const core::Bank& bank, RetrieveWork* work);
  absl::Status FinishRetrieve(RetrieveWork& work, v1::RetrieveResponse* resp);
  // Runs a batch of keyed RetrieveTasks with continuous batching.
  void RunRetrieveBatch(Scheduler::Batch& batch);
  absl::Status RunEnergy(grpc::ServerContextBase* ctx, const v1::EnergyRequest* req,
                         v1::EnergyResponse* resp);
  absl::Status RunSample(grpc::ServerContextBase* ctx, const v1::SampleRequest* req,
                         v1::SampleResponse* resp, const FrameSink& on_frame);
  // True when a call on `bank` with vectors(dim) vectors is small enough to
  // answer on the handler's thread (limits_.inline_work), or fails at once.
  bool Inline(core::BankRegistry* registry, const std::string& bank,
              const std::function<double(int dim)>& vectors) const;
  // The latest time a compute call may leave the queue.
  absl::Time QueueDeadline(const grpc::CallbackServerContext* ctx, uint32_t timeout_ms) const;

  // The stored-pattern energies novelty is measured against, per bank
  // version and energy, kept for reuse when `cache` (not for a filtered
  // call's bank, which is a version of its own).
  std::shared_ptr<const core::StoredEnergies> NoveltyReference(const core::Bank& bank,
                                                               const core::EnergyFunction& energy,
                                                               bool cache);
  static constexpr size_t kNoveltyCacheEntries = 64;
  // Filtered banks by bank name, version and filter; each is valid until
  // its first expiry. Bounded by limits_.filter_cache_bytes.
  core::Mutex filter_mu_;
  absl::flat_hash_map<std::string, core::BankSnapshot> filter_cache_
      ABSL_GUARDED_BY(filter_mu_);
  size_t filter_cache_used_ ABSL_GUARDED_BY(filter_mu_) = 0;
  core::Mutex novelty_mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<const core::StoredEnergies>> novelty_cache_
      ABSL_GUARDED_BY(novelty_mu_);

  std::atomic<core::BankRegistry*> registry_;
  std::atomic<WriteLog*> write_log_{nullptr};
  std::shared_ptr<Metrics> metrics_;
  ServiceLimits limits_;
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<Scheduler> writer_;
};

}  // namespace engram::server

#endif  // ENGRAM_SERVER_SERVICE_IMPL_H_
