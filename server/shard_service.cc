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

}  // namespace

grpc::Status ShardServiceImpl::Steps(
    grpc::ServerContext* ctx,
    grpc::ServerReaderWriter<shard::v1::StepReply, shard::v1::StepRequest>* stream) {
  shard::v1::StepRequest req;
  if (!stream->Read(&req)) return grpc::Status::OK;  // nothing asked
  return Guarded(nullptr, [&] { return Serve(ctx, stream, &req); });
}

absl::Status ShardServiceImpl::Serve(
    grpc::ServerContext* ctx,
    grpc::ServerReaderWriter<shard::v1::StepReply, shard::v1::StepRequest>* stream,
    shard::v1::StepRequest* req) {
  ENGRAM_ASSIGN_OR_RETURN(
      MemoryServiceImpl::ShardRead read,
      memory_->OpenShardRead(ctx, req->bank(), req->has_energy(), req->energy(), req->filter()));
  const core::Bank& bank = *read.bank;
  // A bank that decays with age weighs its rows at the call's time (the
  // router's, so every shard's the same).
  const std::vector<double> prior =
      bank.LogPrior(req->now_unix_ms() > 0 ? req->now_unix_ms() : read.now_ms);
  core::PatternView view = bank.view();
  if (!prior.empty()) view.log_prior = prior.data();
  core::EnergyConfig cfg = read.energy;
  auto energy = std::make_unique<core::EnergyFunction>(cfg, view);
  // TINYBRAIN: each state's memory layer, kept between the stream's requests.
  std::vector<std::unique_ptr<core::TinyBrainMemory>> memories;
  do {
    if (req->level_beta() > 0.0 && req->level_beta() != cfg.beta) {
      if (!std::isfinite(req->level_beta())) {
        return absl::InvalidArgumentError("level_beta is not finite");
      }
      cfg.beta = req->level_beta();
      memories.clear();  // they refer to the energy replaced here
      energy = std::make_unique<core::EnergyFunction>(cfg, view);
    }
    shard::v1::StepReply reply;
    if (req->has_tinybrain()) {
      ENGRAM_RETURN_IF_ERROR(
          AnswerTinyBrain(bank, *energy, *req, max_batch_, &memories, &reply));
    } else {
      ENGRAM_RETURN_IF_ERROR(Answer(bank, *energy, *req, max_batch_, &reply));
    }
    reply.set_current(read.current());
    if (!stream->Write(reply)) return absl::CancelledError("the router closed the stream");
  } while (stream->Read(req));
  return absl::OkStatus();
}

}  // namespace engram::server
