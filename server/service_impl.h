// MemoryServiceImpl: the gRPC adapter over core. Each handler decodes,
// validates, calls core, converts and maps the status; metrics of RPCs are
// recorded by the interceptor, convergence and bank sizes here.
//
//   auto impl = std::make_unique<MemoryServiceImpl>(registry.get(), metrics, limits);
//   builder.RegisterService(impl.get());
//
// Thread-safety: handlers run concurrently on gRPC's threads; all shared
// state lives in the (thread-safe) BankRegistry and Metrics.
#ifndef ENGRAM_SERVER_SERVICE_IMPL_H_
#define ENGRAM_SERVER_SERVICE_IMPL_H_

#include <atomic>
#include <memory>

#include "engram/core/mutex.h"
#include "engram/core/registry.h"
#include "engram/v1/engram.grpc.pb.h"
#include "server/batcher.h"
#include "server/metrics.h"

namespace engram::server {

struct ServiceLimits {
  // Largest batch (patterns per Store, queries per Retrieve/Energy).
  int64_t max_batch = 65536;
  // Bearer token required on every call; empty disables authentication.
  std::string auth_token;
  // Where Backup writes (<data_dir>/backups).
  std::string backup_dir;
  // Dynamic batching of concurrent sync Retrieve calls on the same bank and
  // energy: at most max_batch_queries queries per batch; a batch leader
  // waits up to max_batch_delay for company (0: batches form only from
  // calls that queue while another batch runs).
  bool batching = true;
  int64_t max_batch_queries = 256;
  absl::Duration max_batch_delay = absl::ZeroDuration();
};

// Retrieve uses gRPC's callback API: a small call (little work: a few
// million multiply-adds at most) runs on the thread that read it and
// answers without any thread hand-off, which is most of a small call's
// latency; larger ones move to a thread of their own, where they may
// block (dynamic batching) without holding up gRPC's threads. The other
// methods use the synchronous API.
class MemoryServiceImpl final
    : public v1::MemoryService::WithCallbackMethod_Retrieve<v1::MemoryService::Service> {
 public:
  // `registry` may be null while banks are loading: calls then fail with
  // UNAVAILABLE until SetRegistry.
  MemoryServiceImpl(core::BankRegistry* registry, std::shared_ptr<Metrics> metrics,
                    ServiceLimits limits = {});
  // Waits for the Retrieve threads still running (each ends right after its
  // Finish, but may not have returned yet when the server's Wait does).
  ~MemoryServiceImpl() override;
  void SetRegistry(core::BankRegistry* registry);

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
  grpc::Status DeletePatterns(grpc::ServerContext* ctx,
                              const v1::DeletePatternsRequest* req,
                              v1::DeletePatternsResponse* resp) override;
  grpc::Status GetPatterns(grpc::ServerContext* ctx, const v1::GetPatternsRequest* req,
                           v1::GetPatternsResponse* resp) override;
  grpc::ServerUnaryReactor* Retrieve(grpc::CallbackServerContext* ctx,
                                     const v1::RetrieveRequest* req,
                                     v1::RetrieveResponse* resp) override;
  // The body of Retrieve on the calling thread; `ctx` may be null (no
  // deadline, no credentials), as for the other handlers.
  grpc::Status RetrieveNow(grpc::ServerContextBase* ctx, const v1::RetrieveRequest* req,
                           v1::RetrieveResponse* resp);
  grpc::Status Backup(grpc::ServerContext* ctx, const v1::BackupRequest* req,
                      v1::BackupResponse* resp) override;
  grpc::Status Sample(grpc::ServerContext* ctx, const v1::SampleRequest* req,
                      v1::SampleResponse* resp) override;
  grpc::Status SampleStream(grpc::ServerContext* ctx, const v1::SampleRequest* req,
                            grpc::ServerWriter<v1::SampleFrame>* writer) override;
  grpc::Status Energy(grpc::ServerContext* ctx, const v1::EnergyRequest* req,
                      v1::EnergyResponse* resp) override;

 private:
  void UpdateBankGauges(const std::string& name);
  // OK, or UNAUTHENTICATED when a token is configured and the call lacks it.
  absl::Status Authorize(grpc::ServerContextBase* ctx) const;
  // True when `req` is small enough to answer on gRPC's thread.
  bool SmallRetrieve(const v1::RetrieveRequest* req) const;
  // Shared by Sample and SampleStream; `writer` may be null.
  absl::Status RunSample(grpc::ServerContext* ctx, const v1::SampleRequest* req,
                         v1::SampleResponse* resp, grpc::ServerWriter<v1::SampleFrame>* writer);

  // UNAVAILABLE while loading.
  absl::Status Ready() const;

  std::atomic<core::BankRegistry*> registry_;
  std::shared_ptr<Metrics> metrics_;
  ServiceLimits limits_;
  std::unique_ptr<RetrieveBatcher> batcher_;  // null when batching is off

  // Retrieve calls answered on a thread of their own, still running.
  core::Mutex threads_mu_;
  core::CondVar threads_done_;
  int threads_running_ ABSL_GUARDED_BY(threads_mu_) = 0;
};

}  // namespace engram::server

#endif  // ENGRAM_SERVER_SERVICE_IMPL_H_
