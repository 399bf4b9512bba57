#include "server/shard_service.h"

#include <cmath>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engram/core/dynamics.h"
#include "engram/core/energy.h"
#include "engram/core/novelty.h"
#include "engram/core/partials.h"
#include "engram/core/readout.h"
#include "engram/core/status_macros.h"
#include "server/convert.h"
#include "server/status_mapping.h"

namespace engram::server {
namespace {

// The states of `req`: a whole number of `n`-vectors, finite, at most
// `max_batch`.
absl::StatusOr<int64_t> CountStates(const shard::v1::StepRequest& req, int n, int64_t max_batch) {
  if (req.states_size() % n != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "states has ", req.states_size(), " floats, not a multiple of the bank's dimension ", n));
  }
  const int64_t b = req.states_size() / n;
  if (b > max_batch) {
    return absl::InvalidArgumentError(
        absl::StrCat("states holds ", b, " vectors; the limit per request is ", max_batch));
  }
  for (int i = 0; i < req.states_size(); ++i) {
    if (!std::isfinite(req.states(i))) {
      return absl::InvalidArgumentError(absl::StrCat(
          "states vector ", i / n, " coordinate ", i % n, " is not finite"));
    }
  }
  return b;
}

void PartialToProto(const core::StepPartial& p, shard::v1::Partial* out) {
  out->set_log_domain(p.log_domain);
  out->set_log_scale(p.log_scale);
  out->set_scale(p.scale);
  out->set_wsum(p.wsum);
  out->set_hsum(p.hsum);
  out->set_energy_terms(p.energy_terms);
  out->set_rows(p.rows);
  out->set_sq_x(p.sq_x);
  out->mutable_sum()->Add(p.sum.begin(), p.sum.end());
  out->mutable_value()->Add(p.value.begin(), p.value.end());
  out->set_value_log_norm(p.value_log_norm);
  out->set_form(static_cast<int32_t>(p.form));
  out->set_top(p.top);
  out->mutable_candidates()->Add(p.candidates.begin(), p.candidates.end());
  out->mutable_sign_sum()->Add(p.sign_sum.begin(), p.sign_sum.end());
}

// A sparse separation's second round: each state's sums at the whole
// bank's threshold.
absl::Status AnswerThresholds(const core::Bank& bank, const core::EnergyFunction& energy,
                              const shard::v1::StepRequest& req, int64_t b,
                              shard::v1::StepReply* reply) {
  const int n = bank.dim();
  const int m = bank.spec().value_dim;
  if (req.thresholds_size() != b) {
    return absl::InvalidArgumentError(absl::StrCat("thresholds has ", req.thresholds_size(),
                                                   " entries for ", b, " states"));
  }
  const bool values = req.with_value() && m > 0 && bank.size() > 0;
  for (int64_t q = 0; q < b; ++q) {
    const shard::v1::Threshold& t = req.thresholds(static_cast<int>(q));
    if (!std::isfinite(t.tau()) || !std::isfinite(t.shift())) {
      return absl::InvalidArgumentError("a threshold is not finite");
    }
    ENGRAM_ASSIGN_OR_RETURN(
        core::StepPartial p,
        energy.ThresholdPartial(req.states().data() + q * n,
                                core::SparseThreshold{.tau = t.tau(), .shift = t.shift()},
                                req.with_sum(), values ? bank.value(0) : nullptr, m));
    PartialToProto(p, reply->add_partials());
  }
  return absl::OkStatus();
}

// A TINYBRAIN request: each state's memory layer partial at its visible
// state, the memories started on `start` and moved on otherwise.
absl::Status AnswerTinyBrain(const core::Bank& bank, const core::EnergyFunction& energy,
                             const shard::v1::StepRequest& req, int64_t max_batch,
                             std::vector<std::unique_ptr<core::TinyBrainMemory>>* memories,
                             shard::v1::StepReply* reply) {
  const int n = bank.dim();
  ENGRAM_ASSIGN_OR_RETURN(const int64_t b, CountStates(req, n, max_batch));
  if (b != 1) {
    // A memory layer is one float per row: one per stream bounds it.
    return absl::InvalidArgumentError(
        absl::StrCat("a tinybrain request takes one state, not ", b));
  }
  reply->set_dim(static_cast<uint32_t>(n));
  const double rh = req.tinybrain().rh();
  if (req.tinybrain().start()) {
    if (!(rh > 0.0) || !std::isfinite(rh)) {
      return absl::InvalidArgumentError("tinybrain.rh must be positive and finite");
    }
    memories->clear();
    for (int64_t q = 0; q < b; ++q) {
      memories->push_back(
          std::make_unique<core::TinyBrainMemory>(energy, bank.spec().kind, rh));
    }
  } else if (static_cast<int64_t>(memories->size()) != b) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tinybrain continues ", memories->size(), " memories with ", b, " states"));
  }
  for (int64_t q = 0; q < b; ++q) {
    double step_max = 0.0;
    const core::StepPartial p = (*memories)[q]->At(req.states().data() + q * n, &step_max);
    PartialToProto(p, reply->add_partials());
    reply->add_memory_step_max(step_max);
  }
  return absl::OkStatus();
}

// One request's reply from `bank` under `energy`.
absl::Status Answer(const core::Bank& bank, const core::EnergyFunction& energy,
                    const shard::v1::StepRequest& req, int64_t max_batch,
                    shard::v1::StepReply* reply) {
  const int n = bank.dim();
  const int m = bank.spec().value_dim;
  ENGRAM_ASSIGN_OR_RETURN(const int64_t b, CountStates(req, n, max_batch));
  reply->set_dim(static_cast<uint32_t>(n));
  if (req.reference_rows() > 0) {
    if (b > 0) return absl::InvalidArgumentError("reference_rows takes no states");
    std::vector<int64_t> rows = core::NoveltyRows(bank.ids());
    if (rows.size() > req.reference_rows()) rows.resize(req.reference_rows());
    for (int64_t r : rows) {
      reply->add_reference_keys(core::NoveltyKey(bank.id(r)));
      reply->mutable_reference_rows()->Add(bank.pattern(r), bank.pattern(r) + n);
    }
    return absl::OkStatus();
  }
  if (b == 0) return absl::OkStatus();  // nothing asked: no partials
  if (req.thresholds_size() > 0) return AnswerThresholds(bank, energy, req, b, reply);
  std::vector<core::StepPartial> partials;
  if (req.with_nearest() && !req.with_sum() && !req.with_value()) {
    // Nearest memories only: the partials carry just their rows.
    partials.resize(b);
    for (core::StepPartial& p : partials) p.rows = bank.size();
  } else {
    ENGRAM_RETURN_IF_ERROR(
        energy.PartialBatch(req.states().data(), b, req.with_sum(), &partials));
  }
  // The states' nearest rows from one batched scores pass (a scan per
  // state otherwise); -1 where the pass does not give it exactly (then
  // NearestAt scans).
  std::vector<int64_t> nearest_rows(req.with_nearest() ? b : 0, -1);
  if (req.with_nearest() && b > 1 && bank.size() > 0) {
    std::vector<double> energies(b);
    energy.UpdateTargetBatch(req.states().data(), b, nullptr, energies.data(),
                             nearest_rows.data());
  }
  if (req.with_drive()) {
    std::vector<core::StepPartial> drives;
    ENGRAM_RETURN_IF_ERROR(core::DrivePartialBatch(energy, req.states().data(), b, &drives));
    for (const core::StepPartial& d : drives) PartialToProto(d, reply->add_drives());
  }
  for (int64_t q = 0; q < b; ++q) {
    const float* x = req.states().data() + q * n;
    core::StepPartial& p = partials[q];
    const bool candidates =
        p.form == core::PartialForm::kSparsemax || p.form == core::PartialForm::kEntmax15;
    if (req.with_value() && m > 0 && bank.size() > 0 && !candidates) {
      core::ValueReadoutPartial(energy, bank.value(0), m, x, &p);
    }
    shard::v1::Partial* out = reply->add_partials();
    PartialToProto(p, out);
    if (req.with_nearest()) {
      const core::NearestMemory near = bank.NearestAt(nearest_rows[q], x);
      if (near.row >= 0) {
        MemoryToProto(near, bank.payload(near.row), out->mutable_nearest());
        out->set_nearest_key(-0.5 * near.distance * near.distance);
        const float* xi = bank.pattern(near.row);
        double sq = 0.0;
        for (int i = 0; i < n; ++i) sq += double{xi[i]} * xi[i];
        out->set_nearest_norm(std::sqrt(sq));
      } else {
        out->set_nearest_key(-INFINITY);
      }
    }
  }
  return absl::OkStatus();
}

// What a stream keeps between its steps: the bank pinned by its first
// request, the energy (replaced when a request changes level_beta) and the
// TINYBRAIN memory layer.
class StreamState {
 public:
  StreamState(MemoryServiceImpl* memory, int64_t max_batch)
      : memory_(memory), max_batch_(max_batch) {}

  bool open() const { return energy_ != nullptr; }
  // Multiply-adds of one pass for `req` over the open bank.
  double Work(const shard::v1::StepRequest& req) const {
    return static_cast<double>(req.states_size()) * static_cast<double>(read_.bank->size());
  }

  // Answers `req` into *reply; the first request opens the bank.
  absl::Status Step(grpc::ServerContextBase* ctx, const shard::v1::StepRequest& req,
                    shard::v1::StepReply* reply) {
    if (energy_ == nullptr) ENGRAM_RETURN_IF_ERROR(Open(ctx, req));
    if (req.level_beta() > 0.0 && req.level_beta() != cfg_.beta) {
      if (!std::isfinite(req.level_beta())) {
        return absl::InvalidArgumentError("level_beta is not finite");
      }
      cfg_.beta = req.level_beta();
      memories_.clear();  // they refer to the energy replaced here
      energy_ = std::make_unique<core::EnergyFunction>(cfg_, view_);
    }
    const core::Bank& bank = *read_.bank;
    if (req.has_tinybrain()) {
      ENGRAM_RETURN_IF_ERROR(AnswerTinyBrain(bank, *energy_, req, max_batch_, &memories_, reply));
    } else {
      ENGRAM_RETURN_IF_ERROR(Answer(bank, *energy_, req, max_batch_, reply));
    }
    reply->set_current(read_.current());
    return absl::OkStatus();
  }

 private:
  absl::Status Open(grpc::ServerContextBase* ctx, const shard::v1::StepRequest& req) {
    ENGRAM_ASSIGN_OR_RETURN(read_, memory_->OpenShardRead(ctx, req.bank(), req.has_energy(),
                                                          req.energy(), req.filter()));
    const core::Bank& bank = *read_.bank;
    // A bank that decays with age weighs its rows at the call's time (the
    // router's, so every shard's the same).
    prior_ = bank.LogPrior(req.now_unix_ms() > 0 ? req.now_unix_ms() : read_.now_ms);
    view_ = bank.view();
    if (!prior_.empty()) view_.log_prior = prior_.data();
    cfg_ = read_.energy;
    energy_ = std::make_unique<core::EnergyFunction>(cfg_, view_);
    return absl::OkStatus();
  }

  MemoryServiceImpl* memory_;
  int64_t max_batch_;
  MemoryServiceImpl::ShardRead read_;
  std::vector<double> prior_;
  core::PatternView view_;
  core::EnergyConfig cfg_;
  std::unique_ptr<core::EnergyFunction> energy_;  // null until the first request
  std::vector<std::unique_ptr<core::TinyBrainMemory>> memories_;
};

}  // namespace

// One Steps stream: read a request, run its step on the compute scheduler
// (or here, when small), write the reply, read the next. At most one of
// those is outstanding at a time, so the state is touched by one thread at
// a time, and OnDone (after Finish) comes when none is.
class ShardServiceImpl::StepsReactor final
    : public grpc::ServerBidiReactor<shard::v1::StepRequest, shard::v1::StepReply> {
 public:
  StepsReactor(ShardServiceImpl* service, grpc::CallbackServerContext* ctx)
      : service_(service), ctx_(ctx), state_(service->memory_, service->max_batch_) {
    StartRead(&req_);
  }

  const grpc::CallbackServerContext* ctx() const { return ctx_; }

  // Answers req_ (on an executor, or in OnReadDone when small), then
  // writes, or ends the call.
  void RunStep() {
    reply_.Clear();
    const grpc::Status s = Guarded(nullptr, [&] { return state_.Step(ctx_, req_, &reply_); });
    if (!s.ok()) {
      Finish(s);
      return;
    }
    StartWrite(&reply_);
  }

  void OnReadDone(bool ok) override;

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(ToGrpcStatus(absl::CancelledError("the router closed the stream")));
      return;
    }
    StartRead(&req_);
  }

  void OnDone() override { delete this; }

 private:
  ShardServiceImpl* service_;
  grpc::CallbackServerContext* ctx_;
  StreamState state_;
  shard::v1::StepRequest req_;
  shard::v1::StepReply reply_;
};

// A stream's step in the compute queue.
class ShardServiceImpl::StepTask final : public Scheduler::Task {
 public:
  explicit StepTask(StepsReactor* reactor) : reactor_(reactor) {}
  bool Cancelled() const override { return reactor_->ctx()->IsCancelled(); }
  void Run(Scheduler::Batch&) override { reactor_->RunStep(); }
  void Reject(const absl::Status& s) override { reactor_->Finish(ToGrpcStatus(s)); }

 private:
  StepsReactor* reactor_;
};

void ShardServiceImpl::StepsReactor::OnReadDone(bool ok) {
  if (!ok) {
    Finish(grpc::Status::OK);  // the router closed its side: nothing more asked
    return;
  }
  // A step small enough (--inline_work) is answered here, as a node answers
  // a small call; larger ones, and a first step that must wait for the
  // write log, queue.
  MemoryServiceImpl* memory = service_->memory_;
  if (state_.open() ? memory->InlineWork(state_.Work(req_))
                    : memory->InlineShardOpen(ctx_, req_.bank(), req_.states_size())) {
    RunStep();
    return;
  }
  service_->memory_->SubmitCompute(ctx_, std::make_unique<StepTask>(this));
}

grpc::ServerBidiReactor<shard::v1::StepRequest, shard::v1::StepReply>* ShardServiceImpl::Steps(
    grpc::CallbackServerContext* ctx) {
  return new StepsReactor(this, ctx);
}

}  // namespace engram::server
