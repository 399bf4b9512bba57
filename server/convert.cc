#include "server/convert.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace engram::server {

absl::StatusOr<core::StateKind> KindFromProto(int kind) {
  switch (kind) {
    case v1::STATE_KIND_CONTINUOUS: return core::StateKind::kContinuous;
    case v1::STATE_KIND_BIPOLAR: return core::StateKind::kBipolar;
    case v1::STATE_KIND_UNSPECIFIED:
      return absl::InvalidArgumentError(
          "kind must be STATE_KIND_CONTINUOUS or STATE_KIND_BIPOLAR");
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown kind ", kind));
  }
}

v1::StateKind KindToProto(core::StateKind kind) {
  return kind == core::StateKind::kBipolar ? v1::STATE_KIND_BIPOLAR
                                           : v1::STATE_KIND_CONTINUOUS;
}

absl::StatusOr<core::Precision> PrecisionFromProto(int precision) {
  switch (precision) {
    case v1::PRECISION_UNSPECIFIED:
    case v1::PRECISION_F32: return core::Precision::kF32;
    case v1::PRECISION_BF16: return core::Precision::kBf16;
    case v1::PRECISION_BIT_PACKED: return core::Precision::kBitPacked;
    case v1::PRECISION_F32_SCREENED: return core::Precision::kF32Screened;
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown precision ", precision));
  }
}

absl::StatusOr<core::EnergyConfig> EnergyFromProto(const v1::EnergyConfig& p,
                                                   core::StateKind kind) {
  core::EnergyConfig c;
  switch (p.family()) {
    case v1::ENERGY_FAMILY_UNSPECIFIED:
      c.family = kind == core::StateKind::kBipolar ? core::EnergyFamily::kClassical
                                                   : core::EnergyFamily::kLse;
      break;
    case v1::ENERGY_FAMILY_CLASSICAL: c.family = core::EnergyFamily::kClassical; break;
    case v1::ENERGY_FAMILY_POLYNOMIAL: c.family = core::EnergyFamily::kPolynomial; break;
    case v1::ENERGY_FAMILY_EXPONENTIAL: c.family = core::EnergyFamily::kExponential; break;
    case v1::ENERGY_FAMILY_LSE: c.family = core::EnergyFamily::kLse; break;
    case v1::ENERGY_FAMILY_GAUSSIAN: c.family = core::EnergyFamily::kGaussian; break;
    case v1::ENERGY_FAMILY_GENERAL: c.family = core::EnergyFamily::kGeneral; break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("unknown energy.family ", p.family()));
  }
  c.degree = p.degree() == 0 ? 3 : static_cast<int>(std::min<uint32_t>(p.degree(), 1000));
  c.rectified = p.rectified();
  c.beta = p.beta() == 0.0 ? 1.0 : p.beta();
  switch (p.similarity()) {
    case v1::SIMILARITY_UNSPECIFIED:
    case v1::SIMILARITY_DOT: c.similarity = core::SimilarityKind::kDot; break;
    case v1::SIMILARITY_NEG_HALF_SQ_L2: c.similarity = core::SimilarityKind::kNegHalfSqL2; break;
    case v1::SIMILARITY_NEG_L1: c.similarity = core::SimilarityKind::kNegL1; break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("unknown energy.similarity ", p.similarity()));
  }
  switch (p.separation()) {
    case v1::SEPARATION_UNSPECIFIED:
    case v1::SEPARATION_SOFTMAX: c.separation = core::SeparationKind::kSoftmax; break;
    case v1::SEPARATION_IDENTITY: c.separation = core::SeparationKind::kIdentity; break;
    case v1::SEPARATION_POLYNOMIAL: c.separation = core::SeparationKind::kPolynomial; break;
    case v1::SEPARATION_MAX: c.separation = core::SeparationKind::kMax; break;
    case v1::SEPARATION_SPARSEMAX: c.separation = core::SeparationKind::kSparsemax; break;
    case v1::SEPARATION_ENTMAX15: c.separation = core::SeparationKind::kEntmax15; break;
    case v1::SEPARATION_LOG_SUM_RELU: c.separation = core::SeparationKind::kLogSumRelu; break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("unknown energy.separation ", p.separation()));
  }
  return c;
}

v1::EnergyConfig EnergyToProto(const core::EnergyConfig& c) {
  v1::EnergyConfig p;
  switch (c.family) {
    case core::EnergyFamily::kClassical: p.set_family(v1::ENERGY_FAMILY_CLASSICAL); break;
    case core::EnergyFamily::kPolynomial: p.set_family(v1::ENERGY_FAMILY_POLYNOMIAL); break;
    case core::EnergyFamily::kExponential: p.set_family(v1::ENERGY_FAMILY_EXPONENTIAL); break;
    case core::EnergyFamily::kLse: p.set_family(v1::ENERGY_FAMILY_LSE); break;
    case core::EnergyFamily::kGaussian: p.set_family(v1::ENERGY_FAMILY_GAUSSIAN); break;
    case core::EnergyFamily::kGeneral: p.set_family(v1::ENERGY_FAMILY_GENERAL); break;
  }
  p.set_degree(c.degree);
  p.set_rectified(c.rectified);
  p.set_beta(c.beta);
  switch (c.similarity) {
    case core::SimilarityKind::kDot: p.set_similarity(v1::SIMILARITY_DOT); break;
    case core::SimilarityKind::kNegHalfSqL2: p.set_similarity(v1::SIMILARITY_NEG_HALF_SQ_L2); break;
    case core::SimilarityKind::kNegL1: p.set_similarity(v1::SIMILARITY_NEG_L1); break;
  }
  switch (c.separation) {
    case core::SeparationKind::kIdentity: p.set_separation(v1::SEPARATION_IDENTITY); break;
    case core::SeparationKind::kPolynomial: p.set_separation(v1::SEPARATION_POLYNOMIAL); break;
    case core::SeparationKind::kSoftmax: p.set_separation(v1::SEPARATION_SOFTMAX); break;
    case core::SeparationKind::kMax: p.set_separation(v1::SEPARATION_MAX); break;
    case core::SeparationKind::kSparsemax: p.set_separation(v1::SEPARATION_SPARSEMAX); break;
    case core::SeparationKind::kEntmax15: p.set_separation(v1::SEPARATION_ENTMAX15); break;
    case core::SeparationKind::kLogSumRelu: p.set_separation(v1::SEPARATION_LOG_SUM_RELU); break;
  }
  return p;
}

absl::StatusOr<core::RetrieveOptions> OptionsFromProto(const v1::RetrieveOptions& p) {
  core::RetrieveOptions o;
  switch (p.dynamics()) {
    case v1::DYNAMICS_UNSPECIFIED:
    case v1::DYNAMICS_SYNC: o.dynamics = core::Dynamics::kSync; break;
    case v1::DYNAMICS_ASYNC: o.dynamics = core::Dynamics::kAsync; break;
    case v1::DYNAMICS_GRADIENT: o.dynamics = core::Dynamics::kGradient; break;
    case v1::DYNAMICS_TINYBRAIN: o.dynamics = core::Dynamics::kTinyBrain; break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("unknown options.dynamics ", p.dynamics()));
  }
  if (p.max_steps() > static_cast<uint32_t>(core::kMaxSteps)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "options.max_steps must be <= ", core::kMaxSteps, ", got ", p.max_steps()));
  }
  o.max_steps = p.max_steps() == 0 ? 100 : static_cast<int>(p.max_steps());
  o.tol = p.tol() == 0.0 ? 1e-6 : p.tol();
  o.alpha = p.alpha() == 0.0 ? 0.1 : p.alpha();
  o.dt = p.dt() == 0.0 ? 0.1 : p.dt();
  o.tau_v = p.tau_v() == 0.0 ? 1.0 : p.tau_v();
  o.tau_h = p.tau_h() == 0.0 ? 1.0 : p.tau_h();
  o.seed = p.seed();
  o.record_trace = p.return_trace();
  return o;
}

v1::StopReason StopReasonToProto(core::StopReason r) {
  switch (r) {
    case core::StopReason::kConverged: return v1::STOP_REASON_CONVERGED;
    case core::StopReason::kMaxSteps: return v1::STOP_REASON_MAX_STEPS;
    case core::StopReason::kDeadline: return v1::STOP_REASON_DEADLINE;
    case core::StopReason::kDiverged: return v1::STOP_REASON_DIVERGED;
  }
  return v1::STOP_REASON_UNSPECIFIED;
}

absl::StatusOr<core::SampleOptions> SampleOptionsFromProto(const v1::SampleRequest& p,
                                                           core::StateKind kind) {
  core::SampleOptions o;
  switch (p.sampler()) {
    case v1::SAMPLER_UNSPECIFIED:
      o.sampler = kind == core::StateKind::kBipolar ? core::SamplerKind::kAnnealedAm
                                                    : core::SamplerKind::kHeun;
      break;
    case v1::SAMPLER_EULER: o.sampler = core::SamplerKind::kEuler; break;
    case v1::SAMPLER_HEUN: o.sampler = core::SamplerKind::kHeun; break;
    case v1::SAMPLER_STOCHASTIC: o.sampler = core::SamplerKind::kStochastic; break;
    case v1::SAMPLER_LANGEVIN: o.sampler = core::SamplerKind::kLangevin; break;
    case v1::SAMPLER_ANNEALED_AM: o.sampler = core::SamplerKind::kAnnealedAm; break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown sampler ", p.sampler()));
  }
  const v1::Schedule& s = p.schedule();
  switch (s.kind()) {
    case v1::SCHEDULE_KIND_UNSPECIFIED:
    case v1::SCHEDULE_KIND_KARRAS: o.schedule.kind = core::ScheduleKind::kKarras; break;
    case v1::SCHEDULE_KIND_GEOMETRIC: o.schedule.kind = core::ScheduleKind::kGeometric; break;
    case v1::SCHEDULE_KIND_LINEAR: o.schedule.kind = core::ScheduleKind::kLinear; break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown schedule.kind ", s.kind()));
  }
  if (s.sigma_max() != 0) o.schedule.sigma_max = s.sigma_max();
  if (s.sigma_min() != 0) o.schedule.sigma_min = s.sigma_min();
  if (s.rho() != 0) o.schedule.rho = s.rho();
  if (s.steps() > static_cast<uint32_t>(core::kMaxSampleSteps)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "schedule.steps must be <= ", core::kMaxSampleSteps, ", got ", s.steps()));
  }
  if (s.steps() != 0) o.schedule.steps = static_cast<int>(s.steps());
  o.schedule.stop_at_sigma_min = s.stop_at_sigma_min();
  o.seed = p.seed();
  o.sigma_start = p.sigma_start();
  if (p.has_churn()) o.churn = p.churn();
  o.s_tmin = p.s_tmin();
  if (p.has_s_tmax()) o.s_tmax = p.s_tmax();
  if (p.has_s_noise()) o.s_noise = p.s_noise();
  if (p.langevin_steps() > 1000 || p.am_iterations() > 1000) {
    return absl::InvalidArgumentError("langevin_steps and am_iterations must be <= 1000");
  }
  if (p.langevin_steps() != 0) o.langevin_steps = static_cast<int>(p.langevin_steps());
  if (p.has_langevin_eta()) o.langevin_eta = p.langevin_eta();
  if (p.am_iterations() != 0) o.am_iterations = static_cast<int>(p.am_iterations());
  if (p.has_delta_memorized()) o.delta_memorized = p.delta_memorized();
  if (p.has_delta_spurious()) o.delta_spurious = p.delta_spurious();
  if (p.trajectory_every() > static_cast<uint32_t>(core::kMaxSampleSteps)) {
    return absl::InvalidArgumentError("trajectory_every is larger than any schedule");
  }
  o.trajectory_every = static_cast<int>(p.trajectory_every());
  return o;
}

void SampleBatchToProto(const core::SampleBatch& b, v1::SampleResponse* out) {
  out->mutable_sigmas()->Add(b.sigmas.begin(), b.sigmas.end());
  out->set_steps(b.steps);
  for (const auto& r : b.samples) {
    auto* s = out->add_samples();
    s->mutable_state()->Add(r.state.begin(), r.state.end());
    s->set_mirrored(r.mirrored);
    s->set_relative_distance(r.relative_distance);
    switch (r.sample_class) {
      case core::SampleClass::kMemorized: s->set_sample_class(v1::SAMPLE_CLASS_MEMORIZED); break;
      case core::SampleClass::kSpurious: s->set_sample_class(v1::SAMPLE_CLASS_SPURIOUS); break;
      case core::SampleClass::kNovel: s->set_sample_class(v1::SAMPLE_CLASS_NOVEL); break;
    }
    s->set_fixed_point(r.fixed_point);
    s->set_spurious_fixed_point(r.spurious_fixed_point);
    s->set_energy(r.energy);
    for (size_t t = 0; t < r.trajectory.size(); ++t) {
      auto* tp = s->add_trajectory();
      tp->set_step(static_cast<uint32_t>(t));
      tp->set_sigma(r.trajectory_sigmas[t]);
      tp->mutable_state()->Add(r.trajectory[t].begin(), r.trajectory[t].end());
    }
  }
}

void SummaryToProto(const core::BankSummary& s, v1::BankInfo* out) {
  out->set_name(s.spec.name);
  out->set_dim(s.spec.dim);
  out->set_kind(KindToProto(s.spec.kind));
  *out->mutable_energy() = EnergyToProto(s.spec.energy);
  switch (s.spec.precision) {
    case core::Precision::kF32: out->set_precision(v1::PRECISION_F32); break;
    case core::Precision::kBf16: out->set_precision(v1::PRECISION_BF16); break;
    case core::Precision::kBitPacked: out->set_precision(v1::PRECISION_BIT_PACKED); break;
    case core::Precision::kF32Screened: out->set_precision(v1::PRECISION_F32_SCREENED); break;
  }
  out->set_value_dim(static_cast<uint32_t>(s.spec.value_dim));
  out->set_ttl_seconds(static_cast<uint64_t>(s.spec.ttl_ms / 1000));
  out->set_decay_half_life_seconds(static_cast<uint64_t>(s.spec.decay_half_life_ms / 1000));
  out->set_patterns(s.patterns);
  out->set_bytes(s.bytes);
  out->set_load(s.load);
  auto* cap = out->mutable_capacity();
  cap->set_patterns(s.capacity.patterns);
  cap->set_exact_patterns(s.capacity.exact_patterns);
  cap->set_formula(s.capacity.formula);
  cap->set_over_capacity(s.over_capacity);
}

void MemoryToProto(const core::NearestMemory& m, const std::string& payload, v1::Memory* out) {
  out->set_id(m.id);
  out->set_payload(payload);
  out->set_distance(m.distance);
  out->set_similarity(m.similarity);
}

void RetrievalToProto(const core::Trajectory& t, const core::NearestMemory& m,
                      const std::string& payload, v1::RetrieveResult* out) {
  out->mutable_state()->Add(t.state.begin(), t.state.end());
  if (m.row >= 0) MemoryToProto(m, payload, out->mutable_nearest());
  out->set_energy_start(t.energy_start);
  out->set_energy_end(t.energy_end);
  out->mutable_energy_trace()->Add(t.energy_trace.begin(), t.energy_trace.end());
  out->set_steps(t.steps);
  out->set_converged(t.converged());
  out->set_stop_reason(StopReasonToProto(t.stop_reason));
  out->set_lyapunov_violations(t.lyapunov_violations);
}

v1::SampleFrame SampleFrameToProto(int step, double sigma,
                                   const std::vector<std::vector<float>>& states) {
  v1::SampleFrame frame;
  frame.set_step(step);
  frame.set_sigma(sigma);
  for (const auto& x : states) frame.mutable_states()->Add(x.begin(), x.end());
  return frame;
}

v1::SampleFrame LastSampleFrame(v1::SampleResponse result) {
  v1::SampleFrame last;
  *last.mutable_result() = std::move(result);
  last.set_step(last.result().steps());
  const auto& sig = last.result().sigmas();
  if (!sig.empty()) {
    last.set_sigma(sig[std::min<int>(static_cast<int>(last.result().steps()), sig.size() - 1)]);
  }
  return last;
}

absl::StatusOr<int64_t> TtlFromProto(uint64_t seconds, const char* field) {
  if (seconds > static_cast<uint64_t>(core::kMaxTtlMs / 1000)) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, " is ", seconds, "; at most ", core::kMaxTtlMs / 1000, " seconds (100 years)"));
  }
  return static_cast<int64_t>(seconds) * 1000;
}

core::Labels LabelsFromProto(const v1::Labels& p) {
  core::Labels l;
  for (const auto& [k, v] : p.strings()) l.strings.emplace_back(k, v);
  for (const auto& [k, v] : p.ints()) l.ints.emplace_back(k, v);
  return l;
}

void LabelsToProto(const core::Labels& l, v1::Labels* out) {
  for (const auto& [k, v] : l.strings) (*out->mutable_strings())[k] = v;
  for (const auto& [k, v] : l.ints) (*out->mutable_ints())[k] = v;
}

absl::StatusOr<core::Filter> FilterFromProto(const v1::Filter& p) {
  core::Filter f;
  if (p.conditions_size() > core::kMaxConditions) {
    return absl::InvalidArgumentError(absl::StrCat(
        "filter has ", p.conditions_size(), " conditions; the limit is ", core::kMaxConditions));
  }
  for (int i = 0; i < p.conditions_size(); ++i) {
    const v1::Condition& c = p.conditions(i);
    core::Condition out;
    out.key = c.key();
    switch (c.test_case()) {
      case v1::Condition::kEquals:
        out.op = core::Condition::kEquals;
        out.strings = {c.equals()};
        break;
      case v1::Condition::kAnyOf:
        out.op = core::Condition::kAnyOf;
        out.strings.assign(c.any_of().values().begin(), c.any_of().values().end());
        break;
      case v1::Condition::kIntEquals:
        out.op = core::Condition::kIntEquals;
        out.ints = {c.int_equals()};
        break;
      case v1::Condition::kIntAnyOf:
        out.op = core::Condition::kIntAnyOf;
        out.ints.assign(c.int_any_of().values().begin(), c.int_any_of().values().end());
        break;
      case v1::Condition::kIntRange:
        out.op = core::Condition::kIntRange;
        out.lo = c.int_range().min();
        out.hi = c.int_range().max();
        break;
      case v1::Condition::TEST_NOT_SET:
        return absl::InvalidArgumentError(absl::StrCat(
            "filter condition ", i, " (key '", c.key(),
            "') has no test: set equals, any_of, int_equals, int_any_of or int_range"));
    }
    f.conditions.push_back(std::move(out));
  }
  if (auto s = core::ValidateFilter(f); !s.ok()) return s;
  return f;
}

}  // namespace engram::server
