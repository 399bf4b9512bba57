#include "server/service_impl.h"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <functional>
#include <system_error>
#include <thread>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engram/core/energy.h"
#include "engram/core/status_macros.h"
#include "server/convert.h"
#include "server/status_mapping.h"

namespace engram::server {
namespace {

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
  return cfg;
}

bool DeadlinePassed(grpc::ServerContextBase* ctx) {
  if (ctx == nullptr) return false;
  return ctx->IsCancelled() ||
         std::chrono::system_clock::now() > ctx->deadline();
}

}  // namespace

MemoryServiceImpl::MemoryServiceImpl(core::BankRegistry* registry,
                                     std::shared_ptr<Metrics> metrics,
                                     ServiceLimits limits)
    : registry_(nullptr), metrics_(std::move(metrics)), limits_(limits) {
  if (limits_.batching) {
    batcher_ = std::make_unique<RetrieveBatcher>(
        RetrieveBatcher::Options{limits_.max_batch_queries, limits_.max_batch_delay},
        [m = metrics_](int64_t queries, int64_t calls) { m->RecordBatch(queries, calls); });
  }
  if (registry != nullptr) SetRegistry(registry);
}

void MemoryServiceImpl::SetRegistry(core::BankRegistry* registry) {
  for (const auto& s : registry->ListBanks()) {
    metrics_->SetBankSize(s.spec.name, s.patterns, s.bytes);
  }
  registry_.store(registry);
}

absl::Status MemoryServiceImpl::Ready() const {
  if (registry_.load() == nullptr) {
    return absl::UnavailableError("engramd is still loading its banks; retry shortly");
  }
  return absl::OkStatus();
}

absl::Status MemoryServiceImpl::Authorize(grpc::ServerContextBase* ctx) const {
  if (limits_.auth_token.empty()) return absl::OkStatus();
  const std::string& want = limits_.auth_token;
  std::string_view got;
  if (ctx != nullptr) {
    auto range = ctx->client_metadata().equal_range("authorization");
    if (range.first != range.second) {
      got = std::string_view(range.first->second.data(), range.first->second.size());
    }
  }
  constexpr std::string_view kBearer = "Bearer ";
  bool ok = got.size() == kBearer.size() + want.size() && got.substr(0, kBearer.size()) == kBearer;
  // Constant-time comparison of the token (its length is not secret).
  unsigned char diff = ok ? 0 : 1;
  const std::string_view token = ok ? got.substr(kBearer.size()) : std::string_view(want);
  for (size_t i = 0; i < want.size(); ++i) {
    diff |= static_cast<unsigned char>(token[i] ^ want[i]);
  }
  if (diff != 0) {
    return absl::UnauthenticatedError(
        "this server requires 'authorization: Bearer <token>' metadata");
  }
  return absl::OkStatus();
}

void MemoryServiceImpl::UpdateBankGauges(const std::string& name) {
  auto s = registry_.load()->GetBank(name);
  if (s.ok()) metrics_->SetBankSize(name, s->patterns, s->bytes);
}

grpc::Status MemoryServiceImpl::CreateBank(grpc::ServerContext* ctx,
                                           const v1::CreateBankRequest* req,
                                           v1::BankInfo* resp) {
  absl::Status s = [&]() -> absl::Status {
    ENGRAM_RETURN_IF_ERROR(Authorize(ctx));
    ENGRAM_RETURN_IF_ERROR(Ready());
    ENGRAM_RETURN_IF_ERROR(core::ValidateBankName(req->name()));
    if (req->dim() < 1 || req->dim() > static_cast<uint32_t>(core::kMaxDim)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "dim must be in [1, ", core::kMaxDim, "], got ", req->dim()));
    }
    core::BankSpec spec;
    spec.name = req->name();
    spec.dim = static_cast<int>(req->dim());
    ENGRAM_ASSIGN_OR_RETURN(spec.kind, KindFromProto(req->kind()));
    ENGRAM_ASSIGN_OR_RETURN(spec.energy, EnergyFromProto(req->energy(), spec.kind));
    ENGRAM_ASSIGN_OR_RETURN(spec.precision, PrecisionFromProto(req->precision()));
    ENGRAM_ASSIGN_OR_RETURN(core::BankSummary summary, registry_.load()->CreateBank(spec));
    SummaryToProto(summary, resp);
    metrics_->SetBankSize(spec.name, 0, summary.bytes);
    return absl::OkStatus();
  }();
  return ToGrpcStatus(s);
}

grpc::Status MemoryServiceImpl::GetBank(grpc::ServerContext* ctx,
                                        const v1::GetBankRequest* req,
                                        v1::BankInfo* resp) {
  absl::Status s = [&]() -> absl::Status {
    ENGRAM_RETURN_IF_ERROR(Authorize(ctx));
    ENGRAM_RETURN_IF_ERROR(Ready());
    ENGRAM_RETURN_IF_ERROR(core::ValidateBankName(req->name()));
    ENGRAM_ASSIGN_OR_RETURN(core::BankSummary summary, registry_.load()->GetBank(req->name()));
    SummaryToProto(summary, resp);
    return absl::OkStatus();
  }();
  return ToGrpcStatus(s);
}

grpc::Status MemoryServiceImpl::ListBanks(grpc::ServerContext* ctx,
                                          const v1::ListBanksRequest*,
                                          v1::ListBanksResponse* resp) {
  if (absl::Status a = Authorize(ctx); !a.ok()) return ToGrpcStatus(a);
  if (absl::Status a = Ready(); !a.ok()) return ToGrpcStatus(a);
  for (const auto& summary : registry_.load()->ListBanks()) {
    SummaryToProto(summary, resp->add_banks());
  }
  return grpc::Status::OK;
}

grpc::Status MemoryServiceImpl::DeleteBank(grpc::ServerContext* ctx,
                                           const v1::DeleteBankRequest* req,
                                           v1::DeleteBankResponse*) {
  absl::Status s = [&]() -> absl::Status {
    ENGRAM_RETURN_IF_ERROR(Authorize(ctx));
    ENGRAM_RETURN_IF_ERROR(Ready());
    ENGRAM_RETURN_IF_ERROR(core::ValidateBankName(req->name()));
    ENGRAM_RETURN_IF_ERROR(registry_.load()->DeleteBank(req->name()));
    metrics_->RemoveBank(req->name());
    return absl::OkStatus();
  }();
  return ToGrpcStatus(s);
}

grpc::Status MemoryServiceImpl::Store(grpc::ServerContext* ctx,
                                      const v1::StoreRequest* req,
                                      v1::StoreResponse* resp) {
  absl::Status s = [&]() -> absl::Status {
    ENGRAM_RETURN_IF_ERROR(Authorize(ctx));
    ENGRAM_RETURN_IF_ERROR(Ready());
    ENGRAM_RETURN_IF_ERROR(core::ValidateBankName(req->bank()));
    ENGRAM_ASSIGN_OR_RETURN(core::BankSummary info, registry_.load()->GetBank(req->bank()));
    ENGRAM_RETURN_IF_ERROR(CheckBatch(req->patterns(), info.spec.dim, "patterns",
                                      limits_.max_batch, info.spec.kind)
                               .status());
    std::vector<std::string> payloads(req->payloads().begin(), req->payloads().end());
    ENGRAM_ASSIGN_OR_RETURN(
        core::StoreResult r,
        registry_.load()->Store(req->bank(),
                         absl::MakeConstSpan(req->patterns().data(), req->patterns().size()),
                         absl::MakeConstSpan(req->ids().data(), req->ids().size()),
                         payloads));
    resp->mutable_ids()->Add(r.ids.begin(), r.ids.end());
    resp->set_bank_patterns(r.bank_patterns);
    UpdateBankGauges(req->bank());
    return absl::OkStatus();
  }();
  return ToGrpcStatus(s);
}

grpc::Status MemoryServiceImpl::DeletePatterns(grpc::ServerContext* ctx,
                                               const v1::DeletePatternsRequest* req,
                                               v1::DeletePatternsResponse* resp) {
  absl::Status s = [&]() -> absl::Status {
    ENGRAM_RETURN_IF_ERROR(Authorize(ctx));
    ENGRAM_RETURN_IF_ERROR(Ready());
    ENGRAM_RETURN_IF_ERROR(core::ValidateBankName(req->bank()));
    if (req->ids_size() > limits_.max_batch) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ids holds ", req->ids_size(), " entries; the limit per call is ",
          limits_.max_batch));
    }
    ENGRAM_ASSIGN_OR_RETURN(
        core::DeleteResult r,
        registry_.load()->DeletePatterns(req->bank(),
                                  absl::MakeConstSpan(req->ids().data(), req->ids().size())));
    resp->set_deleted(r.deleted);
    resp->set_bank_patterns(r.bank_patterns);
    UpdateBankGauges(req->bank());
    return absl::OkStatus();
  }();
  return ToGrpcStatus(s);
}

grpc::Status MemoryServiceImpl::GetPatterns(grpc::ServerContext* ctx,
                                            const v1::GetPatternsRequest* req,
                                            v1::GetPatternsResponse* resp) {
  absl::Status s = [&]() -> absl::Status {
    ENGRAM_RETURN_IF_ERROR(Authorize(ctx));
    ENGRAM_RETURN_IF_ERROR(Ready());
    ENGRAM_RETURN_IF_ERROR(core::ValidateBankName(req->bank()));
    if (req->ids_size() > limits_.max_batch || req->page_size() > limits_.max_batch) {
      return absl::InvalidArgumentError(absl::StrCat(
          "at most ", limits_.max_batch, " patterns per GetPatterns call"));
    }
    return registry_.load()->WithBank(req->bank(), [&](const core::Bank& bank) -> absl::Status {
      const int n = bank.dim();
      resp->set_dim(n);
      auto add_row = [&](int64_t row) {
        resp->add_ids(bank.id(row));
        resp->mutable_patterns()->Add(bank.pattern(row), bank.pattern(row) + n);
        resp->add_payloads(bank.payload(row));
      };
      if (req->ids_size() > 0) {
        for (uint64_t id : req->ids()) {
          std::optional<int64_t> row = bank.RowOf(id);
          if (!row.has_value()) {
            return absl::NotFoundError(absl::StrCat(
                "id ", id, " is not in bank '", req->bank(), "'"));
          }
          add_row(*row);
        }
        resp->set_next_page_start(bank.size());
        return absl::OkStatus();
      }
      const int64_t size = req->page_size() == 0 ? 1000 : req->page_size();
      const int64_t start = std::min<int64_t>(req->page_start(), bank.size());
      const int64_t end = std::min<int64_t>(bank.size(), start + size);
      for (int64_t row = start; row < end; ++row) add_row(row);
      resp->set_next_page_start(end);
      return absl::OkStatus();
    });
  }();
  if (!s.ok()) resp->Clear();
  return ToGrpcStatus(s);
}

namespace {

// One Retrieve call's queries inside a dynamic batch, and what it gets back.
struct RetrieveWork {
  const v1::RetrieveRequest* req = nullptr;
  int dim = 0;  // the bank's dimension when the call was validated
  core::RetrieveOptions opts;
  std::unique_ptr<bool[]> clamp;
  int64_t mask = 0;
  int64_t count = 0;
  std::vector<core::Trajectory> results;
  std::vector<core::NearestMemory> nearest;
  std::vector<std::string> payloads;
};

std::string EnergyKey(const core::EnergyConfig& c) {
  return absl::StrCat(static_cast<int>(c.family), ",", c.degree, ",", c.rectified, ",",
                      absl::StrFormat("%a", c.beta), ",", static_cast<int>(c.similarity), ",",
                      static_cast<int>(c.separation));
}

// Runs the queries of `works` on `bank`: the sync dynamics of every query
// of every call in one RunSyncBatch, other dynamics one query at a time.
// `on_work_done(w, status)`, when set, is called as soon as all of w's
// queries are final (a batch keeps running for the others); after it the
// work is not touched again. `admit_works(running)`, when set (sync only),
// is asked at every step boundary for works that join the running batch.
absl::Status RunRetrieveWorks(
    const core::Bank& bank, const core::EnergyConfig& cfg, absl::Span<RetrieveWork* const> works,
    const std::function<void(RetrieveWork*, const absl::Status&)>& on_work_done = nullptr,
    const std::function<std::vector<RetrieveWork*>(int64_t running)>& admit_works = nullptr) {
  const int n = bank.dim();
  core::EnergyFunction energy(cfg, bank.view());
  std::vector<core::BatchQuery> batch;
  std::vector<std::pair<RetrieveWork*, int64_t>> owner;  // slot -> (work, index)
  std::vector<int64_t> remaining, first;  // per work: queries left, first slot
  std::vector<absl::Status> status;
  // Registers a work; false (and the work answered) when the bank changed
  // shape since the call was validated.
  auto enroll = [&](RetrieveWork* w, std::vector<core::BatchQuery>* out) {
    const int64_t wi = static_cast<int64_t>(status.size());
    status.emplace_back();
    remaining.push_back(w->count);
    first.push_back(static_cast<int64_t>(owner.size()));
    w->results.resize(w->count);
    w->nearest.resize(w->count);
    w->payloads.resize(w->count);
    if (w->dim != n) {
      status[wi] = absl::AbortedError(absl::StrCat(
          "bank '", w->req->bank(), "' was replaced while the call waited; retry"));
      remaining[wi] = 0;
      if (on_work_done) on_work_done(w, status[wi]);
      return false;
    }
    for (int64_t q = 0; q < w->count; ++q) {
      absl::Span<const bool> c;
      if (w->mask == n) c = absl::MakeConstSpan(w->clamp.get(), n);
      if (w->mask == w->count * n && w->mask != 0) {
        c = absl::MakeConstSpan(w->clamp.get() + q * n, n);
      }
      out->push_back({absl::MakeConstSpan(w->req->queries().data() + q * n, n), c, &w->opts});
      owner.push_back({w, wi});
    }
    return true;
  };
  for (RetrieveWork* w : works) enroll(w, &batch);
  if (works.front()->opts.dynamics == core::Dynamics::kSync) {
    std::function<std::vector<core::BatchQuery>(int64_t)> admit;
    if (admit_works) {
      admit = [&](int64_t running) {
        std::vector<core::BatchQuery> joined;
        for (RetrieveWork* w : admit_works(running)) enroll(w, &joined);
        return joined;
      };
    }
    core::RunSyncBatch(energy, bank.spec().kind, batch,
                       [&](size_t slot, absl::StatusOr<core::Trajectory>& r) {
      const int64_t wi = owner[slot].second;
      RetrieveWork* w = owner[slot].first;
      const int64_t q = static_cast<int64_t>(slot) - first[wi];
      if (!r.ok()) {
        if (status[wi].ok()) status[wi] = r.status();
      } else {
        const core::NearestMemory m = bank.NearestAt(r->nearest_row, r->state.data());
        w->payloads[q] = m.row >= 0 ? bank.payload(m.row) : std::string();
        w->nearest[q] = m;
        w->results[q] = std::move(*r);
      }
      if (--remaining[wi] == 0 && on_work_done) on_work_done(w, status[wi]);
    }, admit);
    if (on_work_done) return absl::OkStatus();
    for (const absl::Status& st : status) ENGRAM_RETURN_IF_ERROR(st);
    return absl::OkStatus();
  }
  // Other dynamics, one query at a time (never batched across calls).
  for (const absl::Status& st : status) ENGRAM_RETURN_IF_ERROR(st);
  for (RetrieveWork* w : works) {
    w->results.clear();
    w->nearest.clear();
    w->payloads.clear();
  }
  std::vector<absl::StatusOr<core::Trajectory>> results;
  for (const core::BatchQuery& q : batch) {
    results.push_back(core::RunDynamics(energy, bank.spec().kind, q.query, q.clamp, *q.options));
    // Remaining queries are not started once the deadline has passed.
    if (results.back().ok() && results.back()->stop_reason == core::StopReason::kDeadline) break;
  }
  size_t at = 0;
  absl::Status st;
  for (RetrieveWork* w : works) {
    for (int64_t q = 0; q < w->count && at < results.size(); ++q, ++at) {
      if (!results[at].ok()) {
        st = results[at].status();
        break;
      }
      core::Trajectory t = std::move(*results[at]);
      const core::NearestMemory m = bank.NearestAt(t.nearest_row, t.state.data());
      w->payloads.push_back(m.row >= 0 ? bank.payload(m.row) : std::string());
      w->nearest.push_back(m);
      w->results.push_back(std::move(t));
    }
    if (on_work_done) on_work_done(w, st);
  }
  return st;
}

}  // namespace

bool MemoryServiceImpl::SmallRetrieve(const v1::RetrieveRequest* req) const {
  // Work bound: queries x patterns x dimension x steps multiply-adds.
  constexpr double kSmallWork = 4e6;
  core::BankRegistry* registry = registry_.load();
  if (registry == nullptr) return true;  // answered UNAVAILABLE at once
  const double steps = req->options().max_steps() == 0 ? 100.0 : req->options().max_steps();
  double work = 0.0;
  const absl::Status s = registry->WithBank(req->bank(), [&](const core::Bank& bank) {
    work = static_cast<double>(req->queries_size()) * static_cast<double>(bank.size()) * steps;
    return absl::OkStatus();
  });
  return !s.ok() || work <= kSmallWork;  // errors are answered at once too
}

MemoryServiceImpl::~MemoryServiceImpl() {
  core::MutexLock lock(&threads_mu_);
  while (threads_running_ > 0) threads_done_.Wait(&threads_mu_);
}

grpc::ServerUnaryReactor* MemoryServiceImpl::Retrieve(grpc::CallbackServerContext* ctx,
                                                      const v1::RetrieveRequest* req,
                                                      v1::RetrieveResponse* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (!SmallRetrieve(req)) {
    try {
      {
        core::MutexLock lock(&threads_mu_);
        ++threads_running_;
      }
      // Nothing may touch the call after Finish: the thread ends there,
      // leaving only its count, which the destructor waits on.
      try {
        std::thread([this, ctx, req, resp, reactor] {
          reactor->Finish(RetrieveNow(ctx, req, resp));
          core::MutexLock lock(&threads_mu_);
          if (--threads_running_ == 0) threads_done_.SignalAll();
        }).detach();
      } catch (...) {
        core::MutexLock lock(&threads_mu_);
        --threads_running_;
        throw;
      }
      return reactor;
    } catch (const std::system_error&) {
      // No thread to be had: answer on this one.
    }
  }
  reactor->Finish(RetrieveNow(ctx, req, resp));
  return reactor;
}

grpc::Status MemoryServiceImpl::RetrieveNow(grpc::ServerContextBase* ctx,
                                            const v1::RetrieveRequest* req,
                                            v1::RetrieveResponse* resp) {
  absl::Status s = [&]() -> absl::Status {
    ENGRAM_RETURN_IF_ERROR(Authorize(ctx));
    ENGRAM_RETURN_IF_ERROR(Ready());
    ENGRAM_RETURN_IF_ERROR(core::ValidateBankName(req->bank()));
    RetrieveWork work;
    work.req = req;
    ENGRAM_ASSIGN_OR_RETURN(work.opts, OptionsFromProto(req->options()));
    work.opts.should_stop = [ctx] { return DeadlinePassed(ctx); };
    core::EnergyConfig cfg;
    int dim = 0;
    core::StateKind kind = core::StateKind::kContinuous;
    core::BankRegistry* registry = registry_.load();
    // Validation against the bank as it is now; a batch re-checks the
    // dimension when it runs.
    auto validate = [&](const core::Bank& bank) -> absl::Status {
      const int n = bank.dim();
      ENGRAM_ASSIGN_OR_RETURN(work.count, CheckBatch(req->queries(), n, "queries",
                                                     limits_.max_batch, bank.spec().kind));
      work.mask = req->clamp_size();
      if (work.mask != 0 && work.mask != n && work.mask != work.count * n) {
        return absl::InvalidArgumentError(absl::StrCat(
            "clamp has ", work.mask, " entries; expected 0, ", n, " (one mask for all "
            "queries) or ", work.count * n, " (one per query)"));
      }
      ENGRAM_ASSIGN_OR_RETURN(cfg, ResolveEnergy(req->has_energy(), req->energy(), bank));
      ENGRAM_RETURN_IF_ERROR(core::ValidateRetrieveOptions(work.opts, bank.spec().kind));
      if (bank.size() == 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            "bank '", bank.spec().name, "' is empty; store patterns first"));
      }
      dim = n;
      work.dim = n;
      kind = bank.spec().kind;
      return absl::OkStatus();
    };
    const bool batched = batcher_ != nullptr && work.opts.dynamics == core::Dynamics::kSync;
    if (!batched) {
      ENGRAM_RETURN_IF_ERROR(registry->WithBank(req->bank(), [&](const core::Bank& bank) {
        ENGRAM_RETURN_IF_ERROR(validate(bank));
        work.clamp.reset(new bool[work.mask]);
        for (int64_t i = 0; i < work.mask; ++i) work.clamp[i] = req->clamp(i);
        RetrieveWork* one = &work;
        return RunRetrieveWorks(bank, cfg, absl::MakeConstSpan(&one, 1));
      }));
    } else {
      ENGRAM_RETURN_IF_ERROR(registry->WithBank(req->bank(), validate));
      work.clamp.reset(new bool[work.mask]);
      for (int64_t i = 0; i < work.mask; ++i) work.clamp[i] = req->clamp(i);
      RetrieveBatcher::Call call;
      call.queries = work.count;
      call.payload = &work;
      const std::string key = absl::StrCat(req->bank(), "|", EnergyKey(cfg));
      ENGRAM_RETURN_IF_ERROR(batcher_->Run(
          key, &call,
          [&](absl::Span<RetrieveBatcher::Call* const> calls,
              const std::function<void(RetrieveBatcher::Call*)>& complete,
              const RetrieveBatcher::TakeMore& take_more) {
            std::vector<RetrieveWork*> works;
            absl::flat_hash_map<RetrieveWork*, RetrieveBatcher::Call*> call_of;
            for (RetrieveBatcher::Call* c : calls) {
              works.push_back(static_cast<RetrieveWork*>(c->payload));
              call_of[works.back()] = c;
            }
            // Continuous batching: calls queued meanwhile join at a step
            // boundary, up to max_batch queries running.
            const int64_t max_batch = batcher_->options().max_batch;
            auto admit = [&](int64_t running) {
              std::vector<RetrieveWork*> joined;
              if (running >= max_batch) return joined;
              for (RetrieveBatcher::Call* c : take_more(max_batch - running)) {
                joined.push_back(static_cast<RetrieveWork*>(c->payload));
                call_of[joined.back()] = c;
              }
              return joined;
            };
            // Each caller is answered as soon as its own queries are done.
            const absl::Status st = registry->WithBank(req->bank(), [&](const core::Bank& bank) {
              if (bank.dim() != dim || bank.spec().kind != kind) {
                return absl::AbortedError(absl::StrCat(
                    "bank '", req->bank(), "' was replaced while the call waited; retry"));
              }
              return RunRetrieveWorks(bank, cfg, works,
                                      [&](RetrieveWork* w, const absl::Status& ws) {
                                        RetrieveBatcher::Call* c = call_of[w];
                                        c->status = ws;
                                        call_of.erase(w);
                                        complete(c);
                                      },
                                      admit);
            });
            for (auto& [w, c] : call_of) c->status = st.ok() ? absl::InternalError("not run") : st;
          }));
    }
    core::Dynamics dynamics = work.opts.dynamics;
    for (size_t q = 0; q < work.results.size(); ++q) {
      const core::Trajectory& t = work.results[q];
      metrics_->RecordRetrieval(req->bank(), dynamics, t);
      auto* out = resp->add_results();
      out->mutable_state()->Add(t.state.begin(), t.state.end());
      const core::NearestMemory& m = work.nearest[q];
      if (m.row >= 0) {
        auto* mem = out->mutable_nearest();
        mem->set_id(m.id);
        mem->set_payload(work.payloads[q]);
        mem->set_distance(m.distance);
        mem->set_similarity(m.similarity);
      }
      out->set_energy_start(t.energy_start);
      out->set_energy_end(t.energy_end);
      out->mutable_energy_trace()->Add(t.energy_trace.begin(), t.energy_trace.end());
      out->set_steps(t.steps);
      out->set_converged(t.converged());
      out->set_stop_reason(StopReasonToProto(t.stop_reason));
      out->set_lyapunov_violations(t.lyapunov_violations);
      if (t.stop_reason == core::StopReason::kDeadline &&
          !req->options().partial_on_deadline()) {
        return absl::DeadlineExceededError(absl::StrCat(
            "deadline passed after ", t.steps, " steps of query ", q, " of ", work.count,
            "; set options.partial_on_deadline to receive partial states"));
      }
    }
    return absl::OkStatus();
  }();
  if (!s.ok()) resp->Clear();
  return ToGrpcStatus(s);
}

grpc::Status MemoryServiceImpl::Backup(grpc::ServerContext* ctx, const v1::BackupRequest* req,
                                       v1::BackupResponse* resp) {
  absl::Status s = [&]() -> absl::Status {
    ENGRAM_RETURN_IF_ERROR(Authorize(ctx));
    ENGRAM_RETURN_IF_ERROR(Ready());
    // The bank-name grammar: no '/', no leading '.', so never outside backup_dir.
    if (auto v = core::ValidateBankName(req->file()); !v.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "backup file name must match [a-z0-9][a-z0-9_.-]{0,63}, got '", req->file(), "'"));
    }
    if (limits_.backup_dir.empty()) return absl::FailedPreconditionError("backups are disabled");
    std::error_code ec;
    std::filesystem::create_directories(limits_.backup_dir, ec);
    if (ec) return absl::UnavailableError(absl::StrCat("backup directory: ", ec.message()));
    const std::string path = (std::filesystem::path(limits_.backup_dir) / req->file()).string();
    const size_t banks = registry_.load()->ListBanks().size();
    ENGRAM_RETURN_IF_ERROR(registry_.load()->Backup(path));
    resp->set_path(path);
    resp->set_bytes(std::filesystem::file_size(path, ec));
    resp->set_banks(static_cast<uint32_t>(banks));
    return absl::OkStatus();
  }();
  if (!s.ok()) resp->Clear();
  return ToGrpcStatus(s);
}

absl::Status MemoryServiceImpl::RunSample(grpc::ServerContext* ctx,
                                          const v1::SampleRequest* req,
                                          v1::SampleResponse* resp,
                                          grpc::ServerWriter<v1::SampleFrame>* writer) {
  ENGRAM_RETURN_IF_ERROR(Authorize(ctx));
  ENGRAM_RETURN_IF_ERROR(Ready());
  ENGRAM_RETURN_IF_ERROR(core::ValidateBankName(req->bank()));
  const auto start = std::chrono::steady_clock::now();
  const int64_t count = req->count() == 0 ? 1 : req->count();
  if (count > limits_.max_batch) {
    return absl::InvalidArgumentError(absl::StrCat(
        "count is ", count, "; the limit per call is ", limits_.max_batch));
  }
  std::string sampler_name;
  std::vector<std::string> classes;
  int steps = 0;
  ENGRAM_RETURN_IF_ERROR(registry_.load()->WithBank(req->bank(), [&](const core::Bank& bank)
                                                              -> absl::Status {
    const int n = bank.dim();
    ENGRAM_ASSIGN_OR_RETURN(core::SampleOptions o,
                            SampleOptionsFromProto(*req, bank.spec().kind));
    sampler_name = core::SamplerName(o.sampler);
    if (!req->query().empty()) {
      ENGRAM_RETURN_IF_ERROR(CheckBatch(req->query(), n, "query", count, bank.spec().kind)
                                 .status());
    }
    ENGRAM_ASSIGN_OR_RETURN(core::EnergyConfig cfg,
                            ResolveEnergy(req->has_energy(), req->energy(), bank));
    o.should_stop = [ctx] { return DeadlinePassed(ctx); };
    const int every = std::max(1, o.trajectory_every);
    if (writer != nullptr) {
      o.on_step = [&](int step, double sigma, const std::vector<std::vector<float>>& xs) {
        if (step % every != 0) return;
        v1::SampleFrame frame;
        frame.set_step(step);
        frame.set_sigma(sigma);
        for (const auto& x : xs) frame.mutable_states()->Add(x.begin(), x.end());
        writer->Write(frame);
      };
    }
    std::unique_ptr<bool[]> clamp(new bool[req->clamp_size()]);
    for (int i = 0; i < req->clamp_size(); ++i) clamp[i] = req->clamp(i);
    ENGRAM_ASSIGN_OR_RETURN(
        core::SampleBatch batch,
        core::Sample(bank, cfg, static_cast<int>(count),
                     absl::MakeConstSpan(req->query().data(), req->query_size()),
                     absl::MakeConstSpan(clamp.get(), req->clamp_size()), o));
    if (batch.deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "deadline passed after ", batch.steps, " of ", batch.sigmas.size() - 1,
          " sampling steps"));
    }
    SampleBatchToProto(batch, resp);
    for (int i = 0; i < resp->samples_size(); ++i) {
      const core::SampleResult& r = batch.samples[i];
      auto* mem = resp->mutable_samples(i)->mutable_nearest();
      mem->set_id(r.nearest.id);
      mem->set_payload(bank.payload(r.nearest.row));
      mem->set_distance(r.nearest.distance);
      mem->set_similarity(r.nearest.similarity);
      classes.push_back(core::SampleClassName(r.sample_class));
    }
    steps = batch.steps;
    return absl::OkStatus();
  }));
  metrics_->RecordSample(
      req->bank(), sampler_name, classes, steps,
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  return absl::OkStatus();
}

grpc::Status MemoryServiceImpl::Sample(grpc::ServerContext* ctx, const v1::SampleRequest* req,
                                       v1::SampleResponse* resp) {
  absl::Status s = RunSample(ctx, req, resp, nullptr);
  if (!s.ok()) resp->Clear();
  return ToGrpcStatus(s);
}

grpc::Status MemoryServiceImpl::SampleStream(grpc::ServerContext* ctx,
                                             const v1::SampleRequest* req,
                                             grpc::ServerWriter<v1::SampleFrame>* writer) {
  v1::SampleFrame last;
  absl::Status s = RunSample(ctx, req, last.mutable_result(), writer);
  if (!s.ok()) return ToGrpcStatus(s);
  last.set_step(last.result().steps());
  const auto& sig = last.result().sigmas();
  if (!sig.empty()) last.set_sigma(sig[std::min<int>(last.result().steps(), sig.size() - 1)]);
  writer->Write(last);
  return grpc::Status::OK;
}

grpc::Status MemoryServiceImpl::Energy(grpc::ServerContext* ctx,
                                       const v1::EnergyRequest* req,
                                       v1::EnergyResponse* resp) {
  absl::Status s = [&]() -> absl::Status {
    ENGRAM_RETURN_IF_ERROR(Authorize(ctx));
    ENGRAM_RETURN_IF_ERROR(Ready());
    ENGRAM_RETURN_IF_ERROR(core::ValidateBankName(req->bank()));
    return registry_.load()->WithBank(req->bank(), [&](const core::Bank& bank) -> absl::Status {
      const int n = bank.dim();
      // States for Energy may be any finite vector, also on bipolar banks.
      ENGRAM_ASSIGN_OR_RETURN(int64_t b, CheckBatch(req->states(), n, "states",
                                                    limits_.max_batch,
                                                    core::StateKind::kContinuous));
      ENGRAM_ASSIGN_OR_RETURN(core::EnergyConfig cfg,
                              ResolveEnergy(req->has_energy(), req->energy(), bank));
      core::EnergyFunction energy(cfg, bank.view());
      std::vector<float> grad(n);
      for (int64_t q = 0; q < b; ++q) {
        const float* x = req->states().data() + q * n;
        if (req->return_gradient()) {
          resp->add_energies(energy.ValueAndGradient(x, grad.data()));
          resp->mutable_gradients()->Add(grad.begin(), grad.end());
        } else {
          resp->add_energies(energy.Value(x));
        }
      }
      return absl::OkStatus();
    });
  }();
  if (!s.ok()) resp->Clear();
  return ToGrpcStatus(s);
}

}  // namespace engram::server
