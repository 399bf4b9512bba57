#include "server/service_impl.h"

#include <chrono>
#include <cmath>
#include <deque>
#include <filesystem>
#include <limits>
#include <new>
#include <system_error>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engram/core/energy.h"
#include "engram/core/mutex.h"
#include "engram/core/novelty.h"
#include "engram/core/readout.h"
#include "engram/core/status_macros.h"
#include "server/convert.h"
#include "server/status_mapping.h"

namespace engram::server {
namespace {

// Error messages quote at most this much of a user's string.
constexpr size_t kQuoteBytes = 64;

std::string Quote(std::string_view s) {
  if (s.size() <= kQuoteBytes) return std::string(s);
  return absl::StrCat(std::string(s.substr(0, kQuoteBytes)), "... (", s.size(), " bytes)");
}


// Checks a packed batch of vectors against dimension `dim`; returns B.
absl::StatusOr<int64_t> CheckBatch(const google::protobuf::RepeatedField<float>& v,
                                   int dim, const char* field, int64_t max_batch,
                                   core::StateKind kind) {
  if (v.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(field, " must not be empty"));
  }
  if (v.size() % dim != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, " has ", v.size(), " floats, not a multiple of the bank's dimension ",
        dim));
  }
  const int64_t b = v.size() / dim;
  if (b > max_batch) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, " holds ", b, " vectors; the limit per call is ", max_batch));
  }
  for (int i = 0; i < v.size(); ++i) {
    if (!std::isfinite(v[i])) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, " vector ", i / dim, " coordinate ", i % dim, " is not finite"));
    }
    if (kind == core::StateKind::kBipolar && v[i] != 1.f && v[i] != -1.f) {
      return absl::InvalidArgumentError(absl::StrCat(
          "bank is bipolar but ", field, " vector ", i / dim, " coordinate ",
          i % dim, " is ", v[i], " (expected +1 or -1)"));
    }
  }
  return b;
}

// The request's energy override, or the bank's default, validated for the
// bank's kind.
absl::StatusOr<core::EnergyConfig> ResolveEnergy(bool has_override,
                                                 const v1::EnergyConfig& p,
                                                 const core::Bank& bank) {
  core::EnergyConfig cfg = bank.spec().energy;
  if (has_override && p.family() != v1::ENERGY_FAMILY_UNSPECIFIED) {
    ENGRAM_ASSIGN_OR_RETURN(cfg, EnergyFromProto(p, bank.spec().kind));
  } else if (has_override && (p.similarity() != 0 || p.separation() != 0 ||
                              p.degree() != 0 || p.beta() != 0 || p.rectified())) {
    return absl::InvalidArgumentError(
        "energy override sets parameters but no family; set energy.family");
  }
  ENGRAM_RETURN_IF_ERROR(core::ValidateEnergyConfig(cfg, bank.spec().kind));
  ENGRAM_RETURN_IF_ERROR(
      core::ValidateDecay(bank.spec().decay_half_life_ms, cfg, bank.spec().kind));
  return cfg;
}

// The latest store time of any row of `bank`; -1 when a row's store time
// is unknown (0), whose prior then does not move with time.
int64_t NewestStore(const core::Bank& bank) {
  int64_t t = 0;
  for (int64_t r = 0; r < bank.size(); ++r) {
    if (bank.stored_ms(r) == 0) return -1;
    t = std::max(t, bank.stored_ms(r));
  }
  return t;
}

// The bank's rows as a computation at `now_ms` reads them: with the log
// weight prior of its decay with age, which `prior` holds (and must outlive
// the view), when the bank decays.
core::PatternView ViewAt(const core::Bank& bank, int64_t now_ms, std::vector<double>* prior) {
  core::PatternView v = bank.view();
  *prior = bank.LogPrior(now_ms);
  if (!prior->empty()) v.log_prior = prior->data();
  return v;
}

bool DeadlinePassed(grpc::ServerContextBase* ctx) {
  if (ctx == nullptr) return false;
  return ctx->IsCancelled() || std::chrono::system_clock::now() > ctx->deadline();
}

// The least write-log sequence a call asks to read at in its metadata
// (kMinSequenceHeader, set by routers); 0 when absent or malformed.
uint64_t HeaderMinSequence(grpc::ServerContextBase* ctx) {
  if (ctx == nullptr) return 0;
  auto it = ctx->client_metadata().find(kMinSequenceHeader);
  uint64_t seq = 0;
  if (it == ctx->client_metadata().end() ||
      !absl::SimpleAtoi(absl::string_view(it->second.data(), it->second.size()), &seq)) {
    return 0;
  }
  return seq;
}

// A write commits only while its call is live: a deadline that passed (or
// a client that left) before the commit fails the write and changes
// nothing, so DEADLINE_EXCEEDED means "not written" unless the deadline
// passes during the commit itself.
core::BankRegistry::CommitCheck CommitBefore(grpc::ServerContextBase* ctx, const char* what) {
  return [ctx, what]() -> absl::Status {
    if (!DeadlinePassed(ctx)) return absl::OkStatus();
    return absl::DeadlineExceededError(
        absl::StrCat("the call's deadline passed before the write committed; ", what));
  };
}

std::string EnergyKey(const core::EnergyConfig& c) {
  return absl::StrCat(static_cast<int>(c.family), ",", c.degree, ",", c.rectified, ",",
                      absl::StrFormat("%a", c.beta), ",", static_cast<int>(c.similarity), ",",
                      static_cast<int>(c.separation));
}

// A read whose filter (or expiry) leaves no pattern of a non-empty bank.
absl::Status NonePasses(const core::Bank& bank, const core::Filter& filter) {
  return absl::FailedPreconditionError(absl::StrCat(
      "no pattern of bank '", bank.spec().name, "' passes the filter",
      filter.has_conditions() ? "" : " (every pattern has expired)"));
}

absl::Status BankReplaced(const std::string& bank) {
  return absl::AbortedError(
      absl::StrCat("bank '", bank, "' was replaced while the call waited; retry"));
}

}  // namespace

absl::Status AuthorizeBearer(std::string_view want, std::string_view got) {
  return AccessPolicy::SingleToken(std::string(want)).Check(got, nullptr, Access::kWrite);
}

// One Retrieve call's validated queries, and what they get back.
struct MemoryServiceImpl::RetrieveWork {
  const v1::RetrieveRequest* req = nullptr;
  grpc::ServerContextBase* ctx = nullptr;
  int dim = 0;  // the bank's shape when the call was validated
  core::StateKind kind = core::StateKind::kContinuous;
  core::EnergyConfig cfg;
  core::RetrieveOptions opts;
  core::Filter filter;
  std::vector<char> clamp;  // 0, dim or count * dim flags
  int64_t count = 0;
  // Per query, filled as queries finish; `ran` queries have run.
  std::vector<core::Trajectory> results;
  std::vector<core::NearestMemory> nearest;
  std::vector<std::string> payloads;
  std::vector<std::vector<float>> values;  // readouts, banks with values
  int64_t ran = 0;
  int64_t remaining = 0;  // queries of a batch not finished yet
  absl::Status status;

  absl::Span<const float> Query(int64_t q) const {
    return absl::MakeConstSpan(req->queries().data() + q * dim, dim);
  }
  absl::Span<const bool> Clamp(int64_t q) const {
    const bool* c = reinterpret_cast<const bool*>(clamp.data());
    if (static_cast<int64_t>(clamp.size()) == dim) return absl::MakeConstSpan(c, dim);
    if (!clamp.empty()) return absl::MakeConstSpan(c + q * dim, dim);
    return {};
  }
  void Reset() {
    results.assign(count, {});
    nearest.assign(count, {});
    payloads.assign(count, {});
    values.assign(count, {});
    ran = 0;
    remaining = count;
    status = absl::OkStatus();
  }
  // Records query q's result, read on `bank` with `energy` (the work's
  // energy over that bank).
  void Record(const core::Bank& bank, const core::EnergyFunction& energy, int64_t q,
              absl::StatusOr<core::Trajectory> r) {
    if (!r.ok()) {
      if (status.ok()) status = r.status();
      return;
    }
    nearest[q] = bank.NearestAt(r->nearest_row, r->state.data());
    payloads[q] = nearest[q].row >= 0 ? bank.payload(nearest[q].row) : std::string();
    if (const int m = bank.spec().value_dim; m > 0) {
      values[q].resize(m);
      core::ValueReadout(energy, bank.value(0), m, r->state.data(), values[q].data());
    }
    results[q] = *std::move(r);
    ran = std::max(ran, q + 1);
  }
};

// A queued unary call: `answer` (a guarded handler body) finishes the
// reactor.
class MemoryServiceImpl::UnaryTask : public Scheduler::Task {
 public:
  UnaryTask(grpc::CallbackServerContext* ctx, grpc::ServerUnaryReactor* reactor,
            google::protobuf::Message* resp, std::function<grpc::Status()> answer)
      : ctx_(ctx), reactor_(reactor), resp_(resp), answer_(std::move(answer)) {}
  bool Cancelled() const override { return ctx_->IsCancelled(); }
  void Run(Scheduler::Batch&) override { reactor_->Finish(answer_()); }
  void Reject(const absl::Status& s) override {
    resp_->Clear();
    reactor_->Finish(ToGrpcStatus(s));
  }

 private:
  grpc::CallbackServerContext* ctx_;
  grpc::ServerUnaryReactor* reactor_;
  google::protobuf::Message* resp_;
  std::function<grpc::Status()> answer_;
};

// A queued Retrieve call. Sync calls carry a batch key (bank and energy)
// and run through RunRetrieveBatch; the others run alone.
class MemoryServiceImpl::RetrieveTask : public Scheduler::Task {
 public:
  RetrieveTask(MemoryServiceImpl* service, grpc::CallbackServerContext* ctx,
               grpc::ServerUnaryReactor* reactor, v1::RetrieveResponse* resp,
               std::unique_ptr<RetrieveWork> work, std::string key)
      : service_(service), ctx_(ctx), reactor_(reactor), resp_(resp),
        work_(std::move(work)), key_(std::move(key)) {}
  std::string batch_key() const override { return key_; }
  int64_t queries() const override { return work_->count; }
  bool Cancelled() const override { return ctx_->IsCancelled(); }
  void Run(Scheduler::Batch& batch) override {
    if (!key_.empty()) return service_->RunRetrieveBatch(batch);
    Answer([&]() -> absl::Status {
      core::BankRegistry* registry = service_->registry_.load();
      ENGRAM_ASSIGN_OR_RETURN(core::BankSnapshot pinned, registry->Snapshot(work_->req->bank()));
      ENGRAM_ASSIGN_OR_RETURN(core::BankSnapshot bank,
                              service_->Visible(registry, &pinned, work_->filter, true));
      return service_->RunRetrieve(*bank, work_.get());
    });
  }
  void Reject(const absl::Status& s) override {
    resp_->Clear();
    reactor_->Finish(ToGrpcStatus(s));
  }
  RetrieveWork& work() { return *work_; }
  // Encodes the answer (or `run`'s error) and finishes the call; nothing
  // may touch the task's call afterwards.
  template <typename F>
  void Answer(F&& run) {
    reactor_->Finish(Guarded(resp_, [&]() -> absl::Status {
      ENGRAM_RETURN_IF_ERROR(run());
      return service_->FinishRetrieve(*work_, resp_);
    }));
  }

 private:
  MemoryServiceImpl* service_;
  grpc::CallbackServerContext* ctx_;
  grpc::ServerUnaryReactor* reactor_;
  v1::RetrieveResponse* resp_;
  std::unique_ptr<RetrieveWork> work_;
  std::string key_;
};

// SampleStream's writer: the executor pushes frames, gRPC writes them one
// at a time as the client takes them. No lock is held while writing, so a
// client that stops reading holds only its buffered frames (at most
// `max_bytes`), never a thread or a bank.
class MemoryServiceImpl::StreamReactor : public grpc::ServerWriteReactor<v1::SampleFrame> {
 public:
  explicit StreamReactor(size_t max_bytes) : max_bytes_(max_bytes) {}

  // Queues a frame; false when the client is gone or reads too slowly (the
  // buffer is over its bound).
  bool Push(v1::SampleFrame frame) {
    bool start = false;
    {
      core::MutexLock lock(&mu_);
      if (gone_) return false;
      const size_t bytes = frame.ByteSizeLong();
      if (buffered_ + bytes > max_bytes_ && !outbox_.empty()) {
        overflow_ = true;
        return false;
      }
      buffered_ += bytes;
      outbox_.push_back(std::move(frame));
      start = !writing_;
      writing_ = writing_ || start;
    }
    if (start) StartWrite(&outbox_.front());
    return true;
  }
  bool gone() const {
    core::MutexLock lock(&mu_);
    return gone_;
  }
  bool overflow() const {
    core::MutexLock lock(&mu_);
    return overflow_;
  }
  // Ends the stream with `status` once the queued frames are written (at
  // once if the client is gone). Called once.
  void Close(grpc::Status status) {
    bool finish = false;
    {
      core::MutexLock lock(&mu_);
      closed_ = true;
      final_ = std::move(status);
      if (gone_ || !final_.ok()) {
        // Frames not yet handed to gRPC are dropped; one in flight finishes.
        while (outbox_.size() > (writing_ ? 1u : 0u)) outbox_.pop_back();
      }
      finish = !writing_ && !finished_;
      finished_ = finished_ || finish;
    }
    if (finish) Finish(final_);
  }

  void OnWriteDone(bool ok) override {
    bool next = false, finish = false;
    {
      core::MutexLock lock(&mu_);
      buffered_ -= outbox_.front().ByteSizeLong();
      outbox_.pop_front();
      if (!ok) {
        gone_ = true;
        outbox_.clear();
        buffered_ = 0;
      }
      next = !outbox_.empty();
      writing_ = next;
      finish = !next && closed_ && !finished_;
      finished_ = finished_ || finish;
    }
    if (next) StartWrite(&outbox_.front());
    if (finish) Finish(final_);
  }
  void OnCancel() override {
    core::MutexLock lock(&mu_);
    gone_ = true;
  }
  void OnDone() override { delete this; }

 private:
  const size_t max_bytes_;
  mutable core::Mutex mu_;
  // Frames not yet written; the front one is being written while writing_.
  std::deque<v1::SampleFrame> outbox_ ABSL_GUARDED_BY(mu_);
  size_t buffered_ ABSL_GUARDED_BY(mu_) = 0;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool gone_ ABSL_GUARDED_BY(mu_) = false;
  bool overflow_ ABSL_GUARDED_BY(mu_) = false;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status final_ ABSL_GUARDED_BY(mu_);
};

class MemoryServiceImpl::StreamTask : public Scheduler::Task {
 public:
  StreamTask(MemoryServiceImpl* service, grpc::CallbackServerContext* ctx,
             const v1::SampleRequest* req, StreamReactor* reactor)
      : service_(service), ctx_(ctx), req_(req), reactor_(reactor) {}
  bool Cancelled() const override { return ctx_->IsCancelled(); }
  void Run(Scheduler::Batch&) override {
    v1::SampleResponse result;
    grpc::Status s = service_->SampleNow(
        ctx_, req_, &result, [this](v1::SampleFrame f) { return reactor_->Push(std::move(f)); });
    if (s.ok() && !reactor_->Push(LastSampleFrame(std::move(result)))) {
      s = ToGrpcStatus(absl::ResourceExhaustedError(
          "the client reads the stream too slowly; the server's frame buffer is full"));
    }
    reactor_->Close(std::move(s));
  }
  void Reject(const absl::Status& s) override { reactor_->Close(ToGrpcStatus(s)); }

 private:
  MemoryServiceImpl* service_;
  grpc::CallbackServerContext* ctx_;
  const v1::SampleRequest* req_;
  StreamReactor* reactor_;
};

MemoryServiceImpl::MemoryServiceImpl(core::BankRegistry* registry,
                                     std::shared_ptr<Metrics> metrics,
                                     ServiceLimits limits)
    : registry_(nullptr), metrics_(std::move(metrics)), limits_(limits) {
  SchedulerOptions so = limits_.scheduler;
  if (so.threads <= 0) so.threads = AvailableCpus();
  scheduler_ = std::make_unique<Scheduler>(so, metrics_->SchedulerHooks("compute", so.threads));
  SchedulerOptions wo = limits_.writer;
  if (wo.threads <= 0) wo.threads = 1;
  writer_ = std::make_unique<Scheduler>(wo, metrics_->SchedulerHooks("writer", wo.threads));
  if (registry != nullptr) SetRegistry(registry);
}

MemoryServiceImpl::~MemoryServiceImpl() { Shutdown(); }

void MemoryServiceImpl::Shutdown() {
  scheduler_->Shutdown();
  writer_->Shutdown();
}

void MemoryServiceImpl::SetRegistry(core::BankRegistry* registry) {
  for (const auto& s : registry->ListBanks()) {
    metrics_->SetBankSize(s.spec.name, s.patterns, s.bytes);
  }
  registry_.store(registry);
}

absl::StatusOr<const TokenScope*> MemoryServiceImpl::Authenticate(
    grpc::ServerContextBase* ctx) const {
  std::string_view header;
  if (ctx != nullptr) {
    auto range = ctx->client_metadata().equal_range("authorization");
    if (range.first != range.second) {
      header = std::string_view(range.first->second.data(), range.first->second.size());
    }
  }
  return limits_.access.Authenticate(header);
}

absl::StatusOr<core::BankRegistry*> MemoryServiceImpl::Ready() const {
  core::BankRegistry* registry = registry_.load();
  if (registry == nullptr) {
    return absl::UnavailableError("engramd is still loading its banks; retry shortly");
  }
  if (WriteLog* log = write_log_.load(); log != nullptr) {
    if (absl::Status h = log->health(); !h.ok()) return h;
  }
  return registry;
}

absl::StatusOr<core::BankRegistry*> MemoryServiceImpl::Begin(grpc::ServerContextBase* ctx,
                                                             const std::string* bank,
                                                             Access access) const {
  ENGRAM_ASSIGN_OR_RETURN(const TokenScope* scope, Authenticate(ctx));
  ENGRAM_ASSIGN_OR_RETURN(core::BankRegistry * registry, Ready());
  if (bank != nullptr) ENGRAM_RETURN_IF_ERROR(core::ValidateBankName(*bank));
  ENGRAM_RETURN_IF_ERROR(AccessPolicy::Allows(scope, bank, access));
  return registry;
}

void MemoryServiceImpl::UpdateBankGauges(core::BankRegistry* registry, const std::string& name) {
  auto s = registry->GetBank(name);
  if (s.ok()) metrics_->SetBankSize(name, s->patterns, s->bytes);
}

// --- Banks and patterns ----------------------------------------------------

template <typename Req, typename Resp>
grpc::ServerUnaryReactor* MemoryServiceImpl::Answer(
    grpc::CallbackServerContext* ctx, const Req* req, Resp* resp,
    grpc::Status (MemoryServiceImpl::*now)(grpc::ServerContextBase*, const Req*, Resp*),
    bool writes) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (!writes) {
    uint64_t min_sequence = 0;
    if constexpr (requires { req->min_sequence(); }) min_sequence = req->min_sequence();
    AtSequence(
        ctx, min_sequence, [=, this] { reactor->Finish((this->*now)(ctx, req, resp)); },
        [reactor](const grpc::Status& s) { reactor->Finish(s); });
    return reactor;
  }
  auto task = std::make_unique<UnaryTask>(ctx, reactor, resp,
                                          [=, this] { return (this->*now)(ctx, req, resp); });
  task->queue_deadline = QueueDeadline(ctx, 0);
  writer_->Submit(std::move(task));
  return reactor;
}

grpc::ServerUnaryReactor* MemoryServiceImpl::CreateBank(grpc::CallbackServerContext* ctx,
                                                        const v1::CreateBankRequest* req,
                                                        v1::BankInfo* resp) {
  return Answer(ctx, req, resp, &MemoryServiceImpl::CreateBankNow, /*writes=*/true);
}
grpc::ServerUnaryReactor* MemoryServiceImpl::GetBank(grpc::CallbackServerContext* ctx,
                                                     const v1::GetBankRequest* req,
                                                     v1::BankInfo* resp) {
  return Answer(ctx, req, resp, &MemoryServiceImpl::GetBankNow, /*writes=*/false);
}
grpc::ServerUnaryReactor* MemoryServiceImpl::ListBanks(grpc::CallbackServerContext* ctx,
                                                       const v1::ListBanksRequest* req,
                                                       v1::ListBanksResponse* resp) {
  return Answer(ctx, req, resp, &MemoryServiceImpl::ListBanksNow, /*writes=*/false);
}
grpc::ServerUnaryReactor* MemoryServiceImpl::DeleteBank(grpc::CallbackServerContext* ctx,
                                                        const v1::DeleteBankRequest* req,
                                                        v1::DeleteBankResponse* resp) {
  return Answer(ctx, req, resp, &MemoryServiceImpl::DeleteBankNow, /*writes=*/true);
}
grpc::ServerUnaryReactor* MemoryServiceImpl::Store(grpc::CallbackServerContext* ctx,
                                                   const v1::StoreRequest* req,
                                                   v1::StoreResponse* resp) {
  return Answer(ctx, req, resp, &MemoryServiceImpl::StoreNow, /*writes=*/true);
}
grpc::ServerUnaryReactor* MemoryServiceImpl::DeletePatterns(grpc::CallbackServerContext* ctx,
                                                            const v1::DeletePatternsRequest* req,
                                                            v1::DeletePatternsResponse* resp) {
  return Answer(ctx, req, resp, &MemoryServiceImpl::DeletePatternsNow, /*writes=*/true);
}
grpc::ServerUnaryReactor* MemoryServiceImpl::GetPatterns(grpc::CallbackServerContext* ctx,
                                                         const v1::GetPatternsRequest* req,
                                                         v1::GetPatternsResponse* resp) {
  return Answer(ctx, req, resp, &MemoryServiceImpl::GetPatternsNow, /*writes=*/false);
}
grpc::ServerUnaryReactor* MemoryServiceImpl::Backup(grpc::CallbackServerContext* ctx,
                                                    const v1::BackupRequest* req,
                                                    v1::BackupResponse* resp) {
  return Answer(ctx, req, resp, &MemoryServiceImpl::BackupNow, /*writes=*/true);
}

static absl::StatusOr<core::BankSpec> SpecFromRequest(const v1::CreateBankRequest& req) {
  if (req.dim() < 1 || req.dim() > static_cast<uint32_t>(core::kMaxDim)) {
    return absl::InvalidArgumentError(
        absl::StrCat("dim must be in [1, ", core::kMaxDim, "], got ", req.dim()));
  }
  core::BankSpec spec;
  spec.name = req.name();
  spec.dim = static_cast<int>(req.dim());
  ENGRAM_ASSIGN_OR_RETURN(spec.kind, KindFromProto(req.kind()));
  ENGRAM_ASSIGN_OR_RETURN(spec.energy, EnergyFromProto(req.energy(), spec.kind));
  ENGRAM_ASSIGN_OR_RETURN(spec.precision, PrecisionFromProto(req.precision()));
  if (req.value_dim() > static_cast<uint32_t>(core::kMaxDim)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "value_dim must be in [0, ", core::kMaxDim, "], got ", req.value_dim()));
  }
  spec.value_dim = static_cast<int>(req.value_dim());
  ENGRAM_ASSIGN_OR_RETURN(spec.ttl_ms, TtlFromProto(req.ttl_seconds(), "ttl_seconds"));
  ENGRAM_ASSIGN_OR_RETURN(spec.decay_half_life_ms,
                          TtlFromProto(req.decay_half_life_seconds(), "decay_half_life_seconds"));
  return spec;
}

absl::Status MemoryServiceImpl::ApplyCreateBank(core::BankRegistry* registry,
                                                const v1::CreateBankRequest& req,
                                                const core::LogPosition& at, v1::BankInfo* resp) {
  ENGRAM_ASSIGN_OR_RETURN(core::BankSpec spec, SpecFromRequest(req));
  ENGRAM_ASSIGN_OR_RETURN(core::BankSummary summary, registry->CreateBank(spec, at));
  SummaryToProto(summary, resp);
  metrics_->SetBankSize(spec.name, 0, summary.bytes);
  return absl::OkStatus();
}

grpc::Status MemoryServiceImpl::CreateBankNow(grpc::ServerContextBase* ctx,
                                           const v1::CreateBankRequest* req,
                                           v1::BankInfo* resp) {
  return Guarded(resp, [&]() -> absl::Status {
    ENGRAM_ASSIGN_OR_RETURN(core::BankRegistry * registry, Begin(ctx, &req->name(), Access::kWrite));
    if (write_log_.load() == nullptr) return ApplyCreateBank(registry, *req, {}, resp);
    ENGRAM_ASSIGN_OR_RETURN(core::BankSpec spec, SpecFromRequest(*req));
    ENGRAM_RETURN_IF_ERROR(core::ValidateBankSpec(spec));  // refused before it is published
    replication::v1::LogEntry entry;
    *entry.mutable_create_bank() = *req;
    ENGRAM_ASSIGN_OR_RETURN(uint64_t seq, Replicate(ctx, registry, std::move(entry), resp));
    resp->set_sequence(seq);
    return absl::OkStatus();
  });
}

grpc::Status MemoryServiceImpl::GetBankNow(grpc::ServerContextBase* ctx,
                                        const v1::GetBankRequest* req, v1::BankInfo* resp) {
  return Guarded(resp, [&]() -> absl::Status {
    ENGRAM_ASSIGN_OR_RETURN(core::BankRegistry * registry, Begin(ctx, &req->name(), Access::kRead));
    ENGRAM_ASSIGN_OR_RETURN(core::BankSummary summary, registry->GetBank(req->name()));
    SummaryToProto(summary, resp);
    if (WriteLog* log = write_log_.load()) resp->set_sequence(log->applied());
    return absl::OkStatus();
  });
}

grpc::Status MemoryServiceImpl::ListBanksNow(grpc::ServerContextBase* ctx, const v1::ListBanksRequest*,
                                          v1::ListBanksResponse* resp) {
  return Guarded(resp, [&]() -> absl::Status {
    ENGRAM_ASSIGN_OR_RETURN(const TokenScope* scope, Authenticate(ctx));
    ENGRAM_ASSIGN_OR_RETURN(core::BankRegistry * registry, Ready());
    // A scoped token lists the banks it reaches.
    for (const auto& summary : registry->ListBanks()) {
      if (scope == nullptr || scope->Reaches(summary.spec.name)) {
        SummaryToProto(summary, resp->add_banks());
      }
    }
    return absl::OkStatus();
  });
}

absl::Status MemoryServiceImpl::ApplyDeleteBank(core::BankRegistry* registry,
                                                const v1::DeleteBankRequest& req,
                                                const core::LogPosition& at) {
  ENGRAM_RETURN_IF_ERROR(core::ValidateBankName(req.name()));
  ENGRAM_RETURN_IF_ERROR(registry->DeleteBank(req.name(), at));
  metrics_->RemoveBank(req.name());
  return absl::OkStatus();
}

grpc::Status MemoryServiceImpl::DeleteBankNow(grpc::ServerContextBase* ctx,
                                           const v1::DeleteBankRequest* req,
                                           v1::DeleteBankResponse* resp) {
  return Guarded(resp, [&]() -> absl::Status {
    ENGRAM_ASSIGN_OR_RETURN(core::BankRegistry * registry, Begin(ctx, &req->name(), Access::kWrite));
    if (write_log_.load() == nullptr) return ApplyDeleteBank(registry, *req, {});
    replication::v1::LogEntry entry;
    *entry.mutable_delete_bank() = *req;
    ENGRAM_ASSIGN_OR_RETURN(uint64_t seq, Replicate(ctx, registry, std::move(entry), resp));
    resp->set_sequence(seq);
    return absl::OkStatus();
  });
}

absl::Status MemoryServiceImpl::ApplyStore(core::BankRegistry* registry,
                                           const v1::StoreRequest& req,
                                           const core::LogPosition& at,
                                           const core::BankRegistry::CommitCheck& commit,
                                           v1::StoreResponse* resp) {
  ENGRAM_RETURN_IF_ERROR(core::ValidateBankName(req.bank()));
  ENGRAM_ASSIGN_OR_RETURN(core::BankSummary info, registry->GetBank(req.bank()));
  ENGRAM_RETURN_IF_ERROR(CheckBatch(req.patterns(), info.spec.dim, "patterns",
                                    limits_.max_batch, info.spec.kind)
                             .status());
  std::vector<std::string> payloads(req.payloads().begin(), req.payloads().end());
  std::vector<core::Labels> labels;
  labels.reserve(req.labels_size());
  for (const v1::Labels& l : req.labels()) labels.push_back(LabelsFromProto(l));
  core::StoreExtras extras;
  extras.values = absl::MakeConstSpan(req.values().data(), req.values().size());
  extras.labels = labels;
  ENGRAM_ASSIGN_OR_RETURN(extras.ttl_ms, TtlFromProto(req.ttl_seconds(), "ttl_seconds"));
  ENGRAM_ASSIGN_OR_RETURN(
      core::StoreResult r,
      registry->Store(req.bank(), absl::MakeConstSpan(req.patterns().data(), req.patterns().size()),
                      absl::MakeConstSpan(req.ids().data(), req.ids().size()), payloads, extras,
                      commit, at));
  resp->mutable_ids()->Add(r.ids.begin(), r.ids.end());
  resp->set_bank_patterns(r.bank_patterns);
  UpdateBankGauges(registry, req.bank());
  return absl::OkStatus();
}

grpc::Status MemoryServiceImpl::StoreNow(grpc::ServerContextBase* ctx, const v1::StoreRequest* req,
                                      v1::StoreResponse* resp) {
  return Guarded(resp, [&]() -> absl::Status {
    ENGRAM_ASSIGN_OR_RETURN(core::BankRegistry * registry, Begin(ctx, &req->bank(), Access::kWrite));
    if (write_log_.load() == nullptr) {
      return ApplyStore(registry, *req, {}, CommitBefore(ctx, "nothing was stored"), resp);
    }
    // Refused before it is published when this replica already knows the
    // bank (one it has not applied yet is left to the entry's apply).
    if (absl::StatusOr<core::BankSummary> info = registry->GetBank(req->bank()); info.ok()) {
      ENGRAM_RETURN_IF_ERROR(CheckBatch(req->patterns(), info->spec.dim, "patterns",
                                        limits_.max_batch, info->spec.kind)
                                 .status());
      ENGRAM_RETURN_IF_ERROR(TtlFromProto(req->ttl_seconds(), "ttl_seconds").status());
    }
    replication::v1::LogEntry entry;
    *entry.mutable_store() = *req;
    ENGRAM_ASSIGN_OR_RETURN(uint64_t seq, Replicate(ctx, registry, std::move(entry), resp));
    resp->set_sequence(seq);
    return absl::OkStatus();
  });
}

absl::Status MemoryServiceImpl::ApplyDeletePatterns(core::BankRegistry* registry,
                                                    const v1::DeletePatternsRequest& req,
                                                    const core::LogPosition& at,
                                                    const core::BankRegistry::CommitCheck& commit,
                                                    v1::DeletePatternsResponse* resp) {
  ENGRAM_RETURN_IF_ERROR(core::ValidateBankName(req.bank()));
  if (req.ids_size() > limits_.max_batch) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ids holds ", req.ids_size(), " entries; the limit per call is ", limits_.max_batch));
  }
  ENGRAM_ASSIGN_OR_RETURN(
      core::DeleteResult r,
      registry->DeletePatterns(req.bank(), absl::MakeConstSpan(req.ids().data(), req.ids().size()),
                               commit, at));
  resp->set_deleted(r.deleted);
  resp->set_bank_patterns(r.bank_patterns);
  UpdateBankGauges(registry, req.bank());
  return absl::OkStatus();
}

grpc::Status MemoryServiceImpl::DeletePatternsNow(grpc::ServerContextBase* ctx,
                                               const v1::DeletePatternsRequest* req,
                                               v1::DeletePatternsResponse* resp) {
  return Guarded(resp, [&]() -> absl::Status {
    ENGRAM_ASSIGN_OR_RETURN(core::BankRegistry * registry, Begin(ctx, &req->bank(), Access::kWrite));
    if (write_log_.load() == nullptr) {
      return ApplyDeletePatterns(registry, *req, {}, CommitBefore(ctx, "nothing was deleted"),
                                 resp);
    }
    if (req->ids_size() > limits_.max_batch) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ids holds ", req->ids_size(), " entries; the limit per call is ", limits_.max_batch));
    }
    replication::v1::LogEntry entry;
    *entry.mutable_delete_patterns() = *req;
    ENGRAM_ASSIGN_OR_RETURN(uint64_t seq, Replicate(ctx, registry, std::move(entry), resp));
    resp->set_sequence(seq);
    return absl::OkStatus();
  });
}

// --- The replicated write log ----------------------------------------------

absl::StatusOr<uint64_t> MemoryServiceImpl::Replicate(grpc::ServerContextBase* ctx,
                                                      core::BankRegistry* registry,
                                                      replication::v1::LogEntry entry,
                                                      google::protobuf::Message* resp) {
  WriteLog* log = write_log_.load();
  entry.set_now_unix_ms(registry->NowMs());
  absl::Time deadline = absl::InfiniteFuture();
  if (ctx != nullptr && ctx->deadline() != std::chrono::system_clock::time_point::max()) {
    deadline = absl::FromChrono(ctx->deadline());
  }
  ENGRAM_ASSIGN_OR_RETURN(WriteLog::Outcome out, log->Write(std::move(entry), deadline));
  ENGRAM_RETURN_IF_ERROR(out.status);
  if (ctx != nullptr) ctx->AddTrailingMetadata(kSequenceTrailer, absl::StrCat(out.seq));
  if (!resp->ParseFromString(out.response)) {
    return absl::InternalError("cannot decode the applied write's response");
  }
  return out.seq;
}

absl::Status MemoryServiceImpl::ApplyLogEntry(core::BankRegistry* registry,
                                              const replication::v1::LogEntry& entry,
                                              uint64_t seq, std::string* response) {
  using Entry = replication::v1::LogEntry;
  const core::LogPosition at{.seq = seq, .now_ms = entry.now_unix_ms()};
  // Patterns due by the entry's time go first, on every replica alike.
  auto expire = [&](const std::string& bank) -> absl::Status {
    absl::StatusOr<int64_t> n = registry->ExpireBank(bank, at);
    if (n.ok()) {
      if (*n > 0) RecordExpired(registry, bank, *n);
      return absl::OkStatus();
    }
    if (n.status().code() == absl::StatusCode::kNotFound) return absl::OkStatus();
    return n.status();
  };
  auto encode = [&](const google::protobuf::Message& m) -> absl::Status {
    if (!m.SerializeToString(response)) return absl::InternalError("cannot encode a response");
    return absl::OkStatus();
  };
  try {
    switch (entry.op_case()) {
      case Entry::kCreateBank: {
        v1::BankInfo r;
        ENGRAM_RETURN_IF_ERROR(ApplyCreateBank(registry, entry.create_bank(), at, &r));
        return encode(r);
      }
      case Entry::kDeleteBank: {
        ENGRAM_RETURN_IF_ERROR(ApplyDeleteBank(registry, entry.delete_bank(), at));
        return encode(v1::DeleteBankResponse());
      }
      case Entry::kStore: {
        if (core::ValidateBankName(entry.store().bank()).ok()) {
          ENGRAM_RETURN_IF_ERROR(expire(entry.store().bank()));
        }
        v1::StoreResponse r;
        ENGRAM_RETURN_IF_ERROR(ApplyStore(registry, entry.store(), at, nullptr, &r));
        return encode(r);
      }
      case Entry::kDeletePatterns: {
        if (core::ValidateBankName(entry.delete_patterns().bank()).ok()) {
          ENGRAM_RETURN_IF_ERROR(expire(entry.delete_patterns().bank()));
        }
        v1::DeletePatternsResponse r;
        ENGRAM_RETURN_IF_ERROR(
            ApplyDeletePatterns(registry, entry.delete_patterns(), at, nullptr, &r));
        return encode(r);
      }
      case Entry::kExpire:
        return expire(entry.expire().bank());
      case Entry::OP_NOT_SET:
        break;
    }
    return absl::InvalidArgumentError(
        absl::StrCat("write-log entry ", seq, " holds no operation this engramd knows"));
  } catch (const std::bad_alloc&) {
    return absl::InternalError(absl::StrCat("out of memory applying write-log entry ", seq));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("applying write-log entry ", seq, ": ", e.what()));
  }
}

absl::StatusOr<int64_t> MemoryServiceImpl::PublishExpiry() {
  WriteLog* log = write_log_.load();
  core::BankRegistry* registry = registry_.load();
  if (log == nullptr || registry == nullptr) return 0;
  const int64_t now = registry->NowMs();
  int64_t published = 0;
  absl::Status first;
  for (const core::BankSummary& summary : registry->ListBanks()) {
    absl::StatusOr<core::BankSnapshot> bank = registry->Snapshot(summary.spec.name);
    if (!bank.ok()) continue;
    const int64_t due = (*bank)->min_expires_ms();
    if (due == 0 || due > now) continue;
    replication::v1::LogEntry entry;
    entry.set_now_unix_ms(now);
    entry.mutable_expire()->set_bank(summary.spec.name);
    // Every replica sees the same first expiry time: one entry among them.
    const std::string id = absl::StrCat("expire/", summary.spec.name, "/", due);
    absl::StatusOr<WriteLog::Outcome> out =
        log->Write(std::move(entry), absl::Now() + absl::Seconds(5), id);
    if (out.ok()) {
      ++published;
    } else if (first.ok()) {
      first = out.status();
    }
  }
  if (!first.ok() && published == 0) return first;
  return published;
}

void MemoryServiceImpl::AtSequence(grpc::ServerContextBase* ctx, uint64_t min_sequence,
                                   std::function<void()> start,
                                   std::function<void(const grpc::Status&)> fail) {
  WriteLog* log = write_log_.load();
  if (log != nullptr) min_sequence = std::max(min_sequence, HeaderMinSequence(ctx));
  if (log == nullptr || min_sequence == 0 || log->applied() >= min_sequence) {
    start();
    return;
  }
  absl::Time deadline = absl::Now() + limits_.min_sequence_wait;
  if (ctx->deadline() != std::chrono::system_clock::time_point::max()) {
    deadline = std::min(deadline, absl::FromChrono(ctx->deadline()));
  }
  log->WhenApplied(min_sequence, deadline,
                   [start = std::move(start), fail = std::move(fail)](absl::Status s) {
                     if (s.ok()) {
                       start();
                     } else {
                       fail(ToGrpcStatus(s));
                     }
                   });
}

grpc::Status MemoryServiceImpl::GetPatternsNow(grpc::ServerContextBase* ctx,
                                            const v1::GetPatternsRequest* req,
                                            v1::GetPatternsResponse* resp) {
  return Guarded(resp, [&]() -> absl::Status {
    ENGRAM_ASSIGN_OR_RETURN(core::BankRegistry * registry, Begin(ctx, &req->bank(), Access::kRead));
    if (req->ids_size() > limits_.max_batch ||
        req->page_size() > static_cast<uint64_t>(limits_.max_batch)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "at most ", limits_.max_batch, " patterns per GetPatterns call"));
    }
    ENGRAM_ASSIGN_OR_RETURN(core::BankSnapshot bank, registry->Snapshot(req->bank()));
    const int n = bank->dim();
    resp->set_dim(n);
    auto add_row = [&](int64_t row) {
      resp->add_ids(bank->id(row));
      resp->mutable_patterns()->Add(bank->pattern(row), bank->pattern(row) + n);
      resp->add_payloads(bank->payload(row));
      const int m = bank->spec().value_dim;
      resp->mutable_values()->Add(bank->value(row), bank->value(row) + m);
      LabelsToProto(bank->labels(row), resp->add_labels());
      resp->add_expires_unix_ms(bank->expires_ms(row));
      resp->add_stored_unix_ms(bank->stored_ms(row));
    };
    const uint64_t size = static_cast<uint64_t>(bank->size());
    if (req->ids_size() > 0) {
      for (uint64_t id : req->ids()) {
        std::optional<int64_t> row = bank->RowOf(id);
        if (!row.has_value()) {
          return absl::NotFoundError(absl::StrCat("id ", id, " is not in bank '", req->bank(), "'"));
        }
        add_row(*row);
      }
      resp->set_next_page_start(size);
      return absl::OkStatus();
    }
    // Unsigned and clamped: a start past the end (up to 2^64 - 1) gives an
    // empty page at the end.
    const uint64_t page = req->page_size() == 0 ? 1000 : req->page_size();
    const uint64_t start = std::min<uint64_t>(req->page_start(), size);
    const uint64_t end = start + std::min<uint64_t>(page, size - start);
    for (uint64_t row = start; row < end; ++row) add_row(static_cast<int64_t>(row));
    resp->set_next_page_start(end);
    return absl::OkStatus();
  });
}

grpc::Status MemoryServiceImpl::BackupNow(grpc::ServerContextBase* ctx, const v1::BackupRequest* req,
                                       v1::BackupResponse* resp) {
  return Guarded(resp, [&]() -> absl::Status {
    ENGRAM_ASSIGN_OR_RETURN(core::BankRegistry * registry, Begin(ctx, nullptr, Access::kWrite));
    // The bank-name grammar: no '/', no leading '.', so never outside backup_dir.
    if (auto v = core::ValidateBankName(req->file()); !v.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "backup file name must match [a-z0-9][a-z0-9_.-]{0,63}, got '", Quote(req->file()),
          "'"));
    }
    if (limits_.backup_dir.empty()) return absl::FailedPreconditionError("backups are disabled");
    std::error_code ec;
    std::filesystem::create_directories(limits_.backup_dir, ec);
    if (ec) return absl::UnavailableError(absl::StrCat("backup directory: ", ec.message()));
    const std::string path = (std::filesystem::path(limits_.backup_dir) / req->file()).string();
    const size_t banks = registry->ListBanks().size();
    ENGRAM_RETURN_IF_ERROR(registry->Backup(path));
    resp->set_path(path);
    resp->set_bytes(std::filesystem::file_size(path, ec));
    resp->set_banks(static_cast<uint32_t>(banks));
    return absl::OkStatus();
  });
}

// --- Compute (callback API, scheduler) --------------------------------------

bool MemoryServiceImpl::Inline(core::BankRegistry* registry, const std::string& bank,
                               const std::function<double(int dim)>& vectors) const {
  if (limits_.inline_work <= 0) return false;
  absl::StatusOr<core::BankSnapshot> b = registry->Snapshot(bank);
  if (!b.ok()) return true;  // answered at once
  const int dim = (*b)->dim();
  return vectors(dim) * static_cast<double>((*b)->size()) * dim <= limits_.inline_work;
}

absl::Time MemoryServiceImpl::QueueDeadline(const grpc::CallbackServerContext* ctx,
                                            uint32_t timeout_ms) const {
  absl::Time deadline = absl::InfiniteFuture();
  if (ctx->deadline() != std::chrono::system_clock::time_point::max()) {
    deadline = absl::FromChrono(ctx->deadline());
  }
  const absl::Duration timeout =
      timeout_ms > 0 ? absl::Milliseconds(timeout_ms) : limits_.queue_timeout;
  if (timeout > absl::ZeroDuration()) deadline = std::min(deadline, absl::Now() + timeout);
  return deadline;
}

void MemoryServiceImpl::SubmitCompute(const grpc::CallbackServerContext* ctx,
                                      std::unique_ptr<Scheduler::Task> task) {
  task->queue_deadline = QueueDeadline(ctx, 0);
  scheduler_->Submit(std::move(task));
}

bool MemoryServiceImpl::InlineShardOpen(grpc::ServerContextBase* ctx, const std::string& bank,
                                        int64_t floats) const {
  if (WriteLog* log = write_log_.load(); log != nullptr && HeaderMinSequence(ctx) > log->applied()) {
    return false;  // OpenShardRead waits for the log
  }
  core::BankRegistry* registry = registry_.load();
  if (registry == nullptr) return true;  // UNAVAILABLE at once
  return Inline(registry, bank, [floats](int dim) { return static_cast<double>(floats) / dim; });
}

void MemoryServiceImpl::RecordExpired(core::BankRegistry* registry, const std::string& bank,
                                      int64_t patterns) {
  metrics_->RecordExpired(patterns);
  UpdateBankGauges(registry, bank);
}

absl::StatusOr<core::BankSnapshot> MemoryServiceImpl::Visible(core::BankRegistry* registry,
                                                              core::BankSnapshot* pinned,
                                                              core::Filter filter,
                                                              bool need_patterns) {
  filter.now_ms = registry->NowMs();
  const int64_t due = (*pinned)->min_expires_ms();
  // A replica deletes only by its write log's entries; its reads leave the
  // expired rows out instead.
  if (due > 0 && due <= filter.now_ms && write_log_.load() == nullptr) {
    // Expired patterns are deleted before the read rather than copied
    // around; should storage fail, they are left out of a copy below.
    const std::string name = (*pinned)->spec().name;
    absl::StatusOr<int64_t> n = registry->ExpireBank(name);
    if (n.ok()) {
      if (*n > 0) RecordExpired(registry, name, *n);
      ENGRAM_ASSIGN_OR_RETURN(*pinned, registry->Snapshot(name));
    }
  }
  const core::BankSnapshot& bank = *pinned;
  if (!core::FilterMayExclude(*bank, filter)) return bank;
  const std::string key =
      absl::StrCat(bank->spec().name, "|", bank->version(), "|", core::FilterKey(filter));
  {
    core::MutexLock lock(&filter_mu_);
    auto it = filter_cache_.find(key);
    if (it != filter_cache_.end()) {
      const int64_t until = it->second->min_expires_ms();
      if (until == 0 || filter.now_ms < until) return it->second;
    }
  }
  std::vector<int64_t> rows = core::MatchingRows(*bank, filter);
  if (need_patterns && rows.empty() && bank->size() > 0) return NonePasses(*bank, filter);
  if (static_cast<int64_t>(rows.size()) == bank->size()) return bank;
  auto subset = std::make_shared<const core::Bank>(bank->Subset(rows));
  const size_t bytes = subset->bytes();
  if (bytes <= limits_.filter_cache_bytes) {
    core::MutexLock lock(&filter_mu_);
    // Versions only move forward: a full cache is simply started again.
    if (filter_cache_used_ + bytes > limits_.filter_cache_bytes) {
      filter_cache_.clear();
      filter_cache_used_ = 0;
    }
    if (filter_cache_.emplace(key, subset).second) filter_cache_used_ += bytes;
  }
  return subset;
}

std::shared_ptr<const core::StoredEnergies> MemoryServiceImpl::NoveltyReference(
    const core::Bank& bank, const core::EnergyFunction& energy, bool cache) {
  if (!cache) {
    return std::make_shared<const core::StoredEnergies>(
        core::StoredPatternEnergies(energy, bank.ids()));
  }
  const std::string key =
      absl::StrCat(bank.spec().name, "|", bank.version(), "|", EnergyKey(energy.config()));
  {
    core::MutexLock lock(&novelty_mu_);
    auto it = novelty_cache_.find(key);
    if (it != novelty_cache_.end()) return it->second;
  }
  auto ref = std::make_shared<const core::StoredEnergies>(
      core::StoredPatternEnergies(energy, bank.ids()));
  core::MutexLock lock(&novelty_mu_);
  // Versions only move forward: a full cache is simply started again.
  if (novelty_cache_.size() >= kNoveltyCacheEntries) novelty_cache_.clear();
  novelty_cache_[key] = ref;
  return ref;
}

absl::StatusOr<std::unique_ptr<MemoryServiceImpl::RetrieveWork>>
MemoryServiceImpl::PrepareRetrieve(grpc::ServerContextBase* ctx, const v1::RetrieveRequest* req) {
  ENGRAM_ASSIGN_OR_RETURN(core::BankRegistry * registry, Begin(ctx, &req->bank(), Access::kRead));
  auto work = std::make_unique<RetrieveWork>();
  work->req = req;
  work->ctx = ctx;
  ENGRAM_ASSIGN_OR_RETURN(work->opts, OptionsFromProto(req->options()));
  work->opts.should_stop = [ctx] { return DeadlinePassed(ctx); };
  ENGRAM_ASSIGN_OR_RETURN(work->filter, FilterFromProto(req->filter()));
  ENGRAM_ASSIGN_OR_RETURN(core::BankSnapshot bank, registry->Snapshot(req->bank()));
  const int n = bank->dim();
  ENGRAM_ASSIGN_OR_RETURN(work->count, CheckBatch(req->queries(), n, "queries",
                                                  limits_.max_batch, bank->spec().kind));
  const int64_t mask = req->clamp_size();
  if (mask != 0 && mask != n && mask != work->count * n) {
    return absl::InvalidArgumentError(absl::StrCat(
        "clamp has ", mask, " entries; expected 0, ", n, " (one mask for all queries) or ",
        work->count * n, " (one per query)"));
  }
  ENGRAM_ASSIGN_OR_RETURN(work->cfg, ResolveEnergy(req->has_energy(), req->energy(), *bank));
  ENGRAM_RETURN_IF_ERROR(core::ValidateRetrieveOptions(work->opts, bank->spec().kind));
  if (bank->size() == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("bank '", bank->spec().name, "' is empty; store patterns first"));
  }
  {
    core::Filter now = work->filter;
    now.now_ms = registry->NowMs();
    if (core::FilterMayExclude(*bank, now) && core::MatchingRows(*bank, now).empty()) {
      return NonePasses(*bank, now);
    }
  }
  work->dim = n;
  work->kind = bank->spec().kind;
  work->clamp.assign(req->clamp().begin(), req->clamp().end());
  return work;
}

absl::Status MemoryServiceImpl::RunRetrieve(const core::Bank& bank, RetrieveWork* w) {
  if (bank.dim() != w->dim || bank.spec().kind != w->kind) return BankReplaced(w->req->bank());
  if (bank.size() == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("bank '", bank.spec().name, "' is empty; store patterns first"));
  }
  w->Reset();
  std::vector<double> prior;
  core::EnergyFunction energy(w->cfg, ViewAt(bank, registry_.load()->NowMs(), &prior));
  if (w->opts.dynamics == core::Dynamics::kSync) {
    core::SyncBatch batch(energy, w->kind, [&](uint64_t q, absl::StatusOr<core::Trajectory> r) {
      w->Record(bank, energy, static_cast<int64_t>(q), std::move(r));
    });
    for (int64_t q = 0; q < w->count; ++q) batch.Admit(q, {w->Query(q), w->Clamp(q), &w->opts});
    while (!batch.empty()) batch.Step();
    return absl::OkStatus();
  }
  for (int64_t q = 0; q < w->count; ++q) {
    absl::StatusOr<core::Trajectory> r =
        core::RunDynamics(energy, w->kind, w->Query(q), w->Clamp(q), w->opts);
    const bool deadline = r.ok() && r->stop_reason == core::StopReason::kDeadline;
    w->Record(bank, energy, q, std::move(r));
    // Remaining queries are not started once the deadline has passed.
    if (deadline || !w->status.ok()) break;
  }
  return absl::OkStatus();
}

absl::Status MemoryServiceImpl::FinishRetrieve(RetrieveWork& w, v1::RetrieveResponse* resp) {
  ENGRAM_RETURN_IF_ERROR(w.status);
  const std::string& bank = w.req->bank();
  for (int64_t q = 0; q < w.ran; ++q) {
    const core::Trajectory& t = w.results[q];
    metrics_->RecordRetrieval(bank, w.opts.dynamics, t);
    v1::RetrieveResult* out = resp->add_results();
    RetrievalToProto(t, w.nearest[q], w.payloads[q], out);
    out->mutable_value()->Add(w.values[q].begin(), w.values[q].end());
    if (t.stop_reason == core::StopReason::kDeadline && !w.req->options().partial_on_deadline()) {
      return absl::DeadlineExceededError(absl::StrCat(
          "deadline passed after ", t.steps, " steps of query ", q, " of ", w.count,
          "; set options.partial_on_deadline to receive partial states"));
    }
  }
  return absl::OkStatus();
}

void MemoryServiceImpl::RunRetrieveBatch(Scheduler::Batch& batch) {
  auto* lead = static_cast<RetrieveTask*>(batch.tasks().front());
  const std::string bank_name = lead->work().req->bank();
  core::BankRegistry* registry = registry_.load();
  auto fail_all = [&](const absl::Status& s) {
    for (Scheduler::Task* t : std::vector<Scheduler::Task*>(batch.tasks())) {
      static_cast<RetrieveTask*>(t)->Answer([&] { return s; });
      batch.Release(t);
    }
  };
  absl::StatusOr<core::BankSnapshot> pinned = registry->Snapshot(bank_name);
  if (!pinned.ok()) return fail_all(pinned.status());
  absl::StatusOr<core::BankSnapshot> visible =
      Visible(registry, &*pinned, lead->work().filter, true);
  if (!visible.ok()) return fail_all(visible.status());
  const core::Bank& bank = **visible;
  // The first expiry among the rows read: calls may join only before it,
  // so none sees a pattern that expired after the batch began.
  const int64_t valid_until = bank.min_expires_ms();
  // Copied: the lead task is released (freed) when its queries finish.
  const core::EnergyConfig cfg = lead->work().cfg;
  const core::StateKind kind = lead->work().kind;
  if (bank.size() == 0) {
    return fail_all(absl::FailedPreconditionError(
        absl::StrCat("bank '", bank_name, "' is empty; store patterns first")));
  }
  std::vector<double> prior;
  core::EnergyFunction energy(cfg, ViewAt(bank, registry->NowMs(), &prior));
  // Slot tag -> (task, query); entries leave as queries finish.
  absl::flat_hash_map<uint64_t, std::pair<RetrieveTask*, int64_t>> owner;
  uint64_t next_tag = 0;
  core::SyncBatch sync(energy, kind, [&](uint64_t tag, absl::StatusOr<core::Trajectory> r) {
    auto it = owner.find(tag);
    auto [task, q] = it->second;
    owner.erase(it);
    RetrieveWork& w = task->work();
    w.Record(bank, energy, q, std::move(r));
    if (--w.remaining == 0) {
      task->Answer([] { return absl::OkStatus(); });
      batch.Release(task);
    }
  });
  auto admit = [&](Scheduler::Task* t) {
    auto* task = static_cast<RetrieveTask*>(t);
    RetrieveWork& w = task->work();
    if (bank.dim() != w.dim || bank.spec().kind != w.kind) {
      task->Answer([&] { return BankReplaced(bank_name); });
      batch.Release(task);
      return;
    }
    w.Reset();
    for (int64_t q = 0; q < w.count; ++q) {
      owner[next_tag] = {task, q};
      sync.Admit(next_tag++, {w.Query(q), w.Clamp(q), &w.opts});
    }
  };
  for (Scheduler::Task* t : std::vector<Scheduler::Task*>(batch.tasks())) admit(t);
  const int64_t max_queries = scheduler_->options().max_batch_queries;
  while (!sync.empty()) {
    // Calls queued meanwhile join at the step boundary while the pinned
    // version is still current (later ones wait for a batch that sees the
    // newer version: a call never reads a bank older than when it came).
    if (sync.size() < max_queries && registry->IsCurrent(bank_name, *pinned) &&
        (valid_until == 0 || registry->NowMs() < valid_until)) {
      for (Scheduler::Task* t : batch.TakeMore(max_queries - sync.size())) admit(t);
    }
    sync.Step();
  }
}

grpc::ServerUnaryReactor* MemoryServiceImpl::Retrieve(grpc::CallbackServerContext* ctx,
                                                      const v1::RetrieveRequest* req,
                                                      v1::RetrieveResponse* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  AtSequence(
      ctx, req->min_sequence(), [=, this] { StartRetrieve(ctx, req, resp, reactor); },
      [reactor](const grpc::Status& s) { reactor->Finish(s); });
  return reactor;
}

void MemoryServiceImpl::StartRetrieve(grpc::CallbackServerContext* ctx,
                                      const v1::RetrieveRequest* req, v1::RetrieveResponse* resp,
                                      grpc::ServerUnaryReactor* reactor) {
  std::unique_ptr<RetrieveWork> work;
  grpc::Status prepared = Guarded(resp, [&]() -> absl::Status {
    ENGRAM_ASSIGN_OR_RETURN(work, PrepareRetrieve(ctx, req));
    return absl::OkStatus();
  });
  if (!prepared.ok()) {
    reactor->Finish(prepared);
    return;
  }
  const bool sync = work->opts.dynamics == core::Dynamics::kSync;
  if (Inline(registry_.load(), req->bank(), [&](int) { return double(work->count); })) {
    RetrieveTask task(this, ctx, reactor, resp, std::move(work), {});
    task.Answer([&]() -> absl::Status {
      core::BankRegistry* registry = registry_.load();
      ENGRAM_ASSIGN_OR_RETURN(core::BankSnapshot pinned, registry->Snapshot(req->bank()));
      ENGRAM_ASSIGN_OR_RETURN(core::BankSnapshot bank,
                              Visible(registry, &pinned, task.work().filter, true));
      return RunRetrieve(*bank, &task.work());
    });
    return;
  }
  std::string key;
  if (sync && limits_.batching) {
    key = absl::StrCat("retrieve|", req->bank(), "|", EnergyKey(work->cfg), "|",
                       core::FilterKey(work->filter));
  }
  auto task = std::make_unique<RetrieveTask>(this, ctx, reactor, resp, std::move(work), key);
  task->queue_deadline = QueueDeadline(ctx, req->queue_timeout_ms());
  scheduler_->Submit(std::move(task));
}

grpc::Status MemoryServiceImpl::RetrieveNow(grpc::ServerContextBase* ctx,
                                            const v1::RetrieveRequest* req,
                                            v1::RetrieveResponse* resp) {
  return Guarded(resp, [&]() -> absl::Status {
    ENGRAM_ASSIGN_OR_RETURN(std::unique_ptr<RetrieveWork> work, PrepareRetrieve(ctx, req));
    core::BankRegistry* registry = registry_.load();
    ENGRAM_ASSIGN_OR_RETURN(core::BankSnapshot pinned, registry->Snapshot(req->bank()));
    ENGRAM_ASSIGN_OR_RETURN(core::BankSnapshot bank,
                            Visible(registry, &pinned, work->filter, true));
    ENGRAM_RETURN_IF_ERROR(RunRetrieve(*bank, work.get()));
    return FinishRetrieve(*work, resp);
  });
}

absl::StatusOr<MemoryServiceImpl::ShardRead> MemoryServiceImpl::OpenShardRead(
    grpc::ServerContextBase* ctx, const std::string& bank_name, bool has_energy,
    const v1::EnergyConfig& energy, const v1::Filter& filter_proto) {
  ENGRAM_ASSIGN_OR_RETURN(core::BankRegistry * registry, Begin(ctx, &bank_name, Access::kRead));
  const uint64_t min_sequence = HeaderMinSequence(ctx);
  if (WriteLog* log = write_log_.load(); log != nullptr && min_sequence > log->applied()) {
    absl::Time deadline = absl::Now() + limits_.min_sequence_wait;
    if (ctx->deadline() != std::chrono::system_clock::time_point::max()) {
      deadline = std::min(deadline, absl::FromChrono(ctx->deadline()));
    }
    ENGRAM_RETURN_IF_ERROR(log->WaitApplied(min_sequence, deadline));
  }
  ENGRAM_ASSIGN_OR_RETURN(core::Filter filter, FilterFromProto(filter_proto));
  ENGRAM_ASSIGN_OR_RETURN(core::BankSnapshot pinned, registry->Snapshot(bank_name));
  ShardRead read;
  read.now_ms = registry->NowMs();
  ENGRAM_ASSIGN_OR_RETURN(read.bank, Visible(registry, &pinned, std::move(filter), false));
  ENGRAM_ASSIGN_OR_RETURN(read.energy, ResolveEnergy(has_energy, energy, *read.bank));
  const int64_t valid_until = pinned->min_expires_ms();
  read.current = [registry, bank_name, pinned, valid_until] {
    return registry->IsCurrent(bank_name, pinned) &&
           (valid_until == 0 || registry->NowMs() < valid_until);
  };
  return read;
}

absl::Status MemoryServiceImpl::RunEnergy(grpc::ServerContextBase* ctx,
                                          const v1::EnergyRequest* req,
                                          v1::EnergyResponse* resp) {
  ENGRAM_ASSIGN_OR_RETURN(core::BankRegistry * registry, Begin(ctx, &req->bank(), Access::kRead));
  ENGRAM_ASSIGN_OR_RETURN(core::Filter filter, FilterFromProto(req->filter()));
  ENGRAM_ASSIGN_OR_RETURN(core::BankSnapshot pinned, registry->Snapshot(req->bank()));
  ENGRAM_ASSIGN_OR_RETURN(core::BankSnapshot bank,
                          Visible(registry, &pinned, std::move(filter), false));
  // A filtered call's bank is its own: its novelty reference is not kept.
  const bool whole_bank = bank.get() == pinned.get();
  const int n = bank->dim();
  const int m = bank->spec().value_dim;
  std::vector<float> value(m);
  // States for Energy may be any finite vector, also on bipolar banks.
  ENGRAM_ASSIGN_OR_RETURN(int64_t b, CheckBatch(req->states(), n, "states", limits_.max_batch,
                                                core::StateKind::kContinuous));
  ENGRAM_ASSIGN_OR_RETURN(core::EnergyConfig cfg,
                          ResolveEnergy(req->has_energy(), req->energy(), *bank));
  const int64_t now = registry->NowMs();
  std::vector<double> prior, newest_prior;
  core::EnergyFunction energy(cfg, ViewAt(*bank, now, &prior));
  std::shared_ptr<const core::StoredEnergies> reference;
  // Energies minus `shift` are those the novelty reference was taken at.
  double shift = 0.0;
  if (req->return_novelty()) {
    const int64_t newest = NewestStore(*bank);
    if (bank->decays() && newest >= 0 && now >= newest) {
      // The reference of a decaying bank is taken at its newest store time
      // t, and kept: at any later time every row's prior is lower by the
      // same ln 2 (now - t) / h, so every energy is higher by that over beta
      // and ranks and z-scores do not change.
      const core::EnergyFunction at_newest(cfg, ViewAt(*bank, newest, &newest_prior));
      reference = NoveltyReference(*bank, at_newest, whole_bank);
      shift = std::log(2.0) * static_cast<double>(now - newest) /
              (static_cast<double>(bank->spec().decay_half_life_ms) * cfg.beta);
    } else {
      // Rows stored after `now` (a clock step back) have age 0: no common
      // shift, and the reference is not kept.
      reference = NoveltyReference(*bank, energy, whole_bank && !bank->decays());
    }
  }
  std::vector<float> grad(n);
  for (int64_t q = 0; q < b; ++q) {
    if (q % 64 == 63 && DeadlinePassed(ctx)) {
      return absl::DeadlineExceededError(
          absl::StrCat("deadline passed after ", q, " of ", b, " states"));
    }
    const float* x = req->states().data() + q * n;
    if (req->return_gradient()) {
      resp->add_energies(energy.ValueAndGradient(x, grad.data()));
      resp->mutable_gradients()->Add(grad.begin(), grad.end());
    } else {
      resp->add_energies(energy.Value(x));
    }
    if (m > 0) {
      core::ValueReadout(energy, bank->value(0), m, x, value.data());
      resp->mutable_values()->Add(value.begin(), value.end());
    }
    if (reference != nullptr) {
      const double e = resp->energies(static_cast<int>(q)) - shift;
      resp->add_novelty(core::Novelty(*reference, e));
      resp->add_novelty_z(reference->ZScore(e));
    }
  }
  return absl::OkStatus();
}

grpc::Status MemoryServiceImpl::EnergyNow(grpc::ServerContextBase* ctx,
                                          const v1::EnergyRequest* req,
                                          v1::EnergyResponse* resp) {
  return Guarded(resp, [&] { return RunEnergy(ctx, req, resp); });
}

grpc::ServerUnaryReactor* MemoryServiceImpl::Energy(grpc::CallbackServerContext* ctx,
                                                    const v1::EnergyRequest* req,
                                                    v1::EnergyResponse* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  AtSequence(
      ctx, req->min_sequence(), [=, this] { StartEnergy(ctx, req, resp, reactor); },
      [reactor](const grpc::Status& s) { reactor->Finish(s); });
  return reactor;
}

void MemoryServiceImpl::StartEnergy(grpc::CallbackServerContext* ctx, const v1::EnergyRequest* req,
                                    v1::EnergyResponse* resp, grpc::ServerUnaryReactor* reactor) {
  core::BankRegistry* registry = registry_.load();
  // A call refused at the door (token, scope, loading) takes no queue slot.
  if (!Begin(ctx, &req->bank(), Access::kRead).ok() ||
      Inline(registry, req->bank(), [&](int dim) {
        return static_cast<double>(req->states_size()) / dim;
      })) {
    reactor->Finish(EnergyNow(ctx, req, resp));  // small, or failing at once
    return;
  }
  auto task = std::make_unique<UnaryTask>(ctx, reactor, resp,
                                          [this, ctx, req, resp] { return EnergyNow(ctx, req, resp); });
  task->queue_deadline = QueueDeadline(ctx, req->queue_timeout_ms());
  scheduler_->Submit(std::move(task));
}

absl::Status MemoryServiceImpl::RunSample(grpc::ServerContextBase* ctx,
                                          const v1::SampleRequest* req, v1::SampleResponse* resp,
                                          const FrameSink& on_frame) {
  ENGRAM_ASSIGN_OR_RETURN(core::BankRegistry * registry, Begin(ctx, &req->bank(), Access::kRead));
  const auto start = std::chrono::steady_clock::now();
  const int64_t count = req->count() == 0 ? 1 : req->count();
  if (count > limits_.max_batch) {
    return absl::InvalidArgumentError(absl::StrCat(
        "count is ", count, "; the limit per call is ", limits_.max_batch));
  }
  ENGRAM_ASSIGN_OR_RETURN(core::Filter filter, FilterFromProto(req->filter()));
  ENGRAM_ASSIGN_OR_RETURN(core::BankSnapshot pinned, registry->Snapshot(req->bank()));
  ENGRAM_ASSIGN_OR_RETURN(core::BankSnapshot bank,
                          Visible(registry, &pinned, std::move(filter), true));
  const int n = bank->dim();
  ENGRAM_ASSIGN_OR_RETURN(core::SampleOptions o, SampleOptionsFromProto(*req, bank->spec().kind));
  const std::string sampler_name = core::SamplerName(o.sampler);
  if (!req->query().empty()) {
    ENGRAM_RETURN_IF_ERROR(
        CheckBatch(req->query(), n, "query", count, bank->spec().kind).status());
  }
  ENGRAM_ASSIGN_OR_RETURN(core::EnergyConfig cfg,
                          ResolveEnergy(req->has_energy(), req->energy(), *bank));
  const std::vector<double> prior = bank->LogPrior(registry->NowMs());
  o.log_prior = prior;
  bool sink_full = false;
  o.should_stop = [ctx, &sink_full] { return sink_full || DeadlinePassed(ctx); };
  const int every = std::max(1, o.trajectory_every);
  if (on_frame) {
    o.on_step = [&](int step, double sigma, const std::vector<std::vector<float>>& xs) {
      if (step % every != 0 || sink_full) return;
      sink_full = !on_frame(SampleFrameToProto(step, sigma, xs));
    };
  }
  std::vector<char> clamp(req->clamp().begin(), req->clamp().end());
  ENGRAM_ASSIGN_OR_RETURN(
      core::SampleBatch batch,
      core::Sample(*bank, cfg, static_cast<int>(count),
                   absl::MakeConstSpan(req->query().data(), req->query_size()),
                   absl::MakeConstSpan(reinterpret_cast<const bool*>(clamp.data()), clamp.size()),
                   o));
  if (sink_full) {
    return absl::ResourceExhaustedError(
        "the client reads the stream too slowly; the server's frame buffer is full");
  }
  if (batch.deadline) {
    return absl::DeadlineExceededError(absl::StrCat(
        "deadline passed after ", batch.steps, " of ", batch.sigmas.size() - 1,
        " sampling steps"));
  }
  SampleBatchToProto(batch, resp);
  std::vector<std::string> classes;
  for (int i = 0; i < resp->samples_size(); ++i) {
    const core::SampleResult& r = batch.samples[i];
    MemoryToProto(r.nearest, bank->payload(r.nearest.row),
                  resp->mutable_samples(i)->mutable_nearest());
    classes.push_back(core::SampleClassName(r.sample_class));
  }
  metrics_->RecordSample(
      req->bank(), sampler_name, classes, batch.steps,
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  return absl::OkStatus();
}

grpc::Status MemoryServiceImpl::SampleNow(grpc::ServerContextBase* ctx,
                                          const v1::SampleRequest* req,
                                          v1::SampleResponse* resp, const FrameSink& on_frame) {
  return Guarded(resp, [&] { return RunSample(ctx, req, resp, on_frame); });
}

grpc::ServerUnaryReactor* MemoryServiceImpl::Sample(grpc::CallbackServerContext* ctx,
                                                    const v1::SampleRequest* req,
                                                    v1::SampleResponse* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  AtSequence(
      ctx, req->min_sequence(), [=, this] { StartSample(ctx, req, resp, reactor); },
      [reactor](const grpc::Status& s) { reactor->Finish(s); });
  return reactor;
}

void MemoryServiceImpl::StartSample(grpc::CallbackServerContext* ctx, const v1::SampleRequest* req,
                                    v1::SampleResponse* resp, grpc::ServerUnaryReactor* reactor) {
  if (!Begin(ctx, &req->bank(), Access::kRead).ok()) {
    reactor->Finish(SampleNow(ctx, req, resp));  // refused: its status, no queue slot
    return;
  }
  auto task = std::make_unique<UnaryTask>(ctx, reactor, resp,
                                          [this, ctx, req, resp] { return SampleNow(ctx, req, resp); });
  task->queue_deadline = QueueDeadline(ctx, req->queue_timeout_ms());
  scheduler_->Submit(std::move(task));
}

grpc::ServerWriteReactor<v1::SampleFrame>* MemoryServiceImpl::SampleStream(
    grpc::CallbackServerContext* ctx, const v1::SampleRequest* req) {
  auto* reactor = new StreamReactor(limits_.stream_buffer_bytes);
  AtSequence(
      ctx, req->min_sequence(), [=, this] { StartSampleStream(ctx, req, reactor); },
      [reactor](const grpc::Status& s) { reactor->Close(s); });
  return reactor;
}

void MemoryServiceImpl::StartSampleStream(grpc::CallbackServerContext* ctx,
                                          const v1::SampleRequest* req, StreamReactor* reactor) {
  if (absl::StatusOr<core::BankRegistry*> b = Begin(ctx, &req->bank(), Access::kRead); !b.ok()) {
    reactor->Close(ToGrpcStatus(b.status()));  // refused: no queue slot
    return;
  }
  auto task = std::make_unique<StreamTask>(this, ctx, req, reactor);
  task->queue_deadline = QueueDeadline(ctx, req->queue_timeout_ms());
  scheduler_->Submit(std::move(task));
}

}  // namespace engram::server
