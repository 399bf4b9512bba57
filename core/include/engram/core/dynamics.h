// Retrieval dynamics: energy descent from a query to a fixed point
// (SPEC section 3): sync, async (bipolar), gradient and TinyBrain, with a
// clamp mask (pattern completion), a stopping rule and a stop reason.
//
//   RetrieveOptions opts;
//   opts.dynamics = Dynamics::kSync;
//   EnergyFunction energy(cfg, bank.view());
//   absl::StatusOr<Trajectory> t =
//       RunDynamics(energy, StateKind::kBipolar, query, clamp, opts);
//   // t->state, t->stop_reason, t->energy_end ...
//
// Guarantees (tested): sync on LSE / GAUSSIAN (CCCP) and async on any bipolar
// bank never raise the energy; gradient with small alpha and TinyBrain with
// small dt descend. `lyapunov_violations` counts rises beyond float tolerance
// for the dynamics whose descent is unconditional, and is 0 unless there is a
// bug.
//
// Thread-safety: RunDynamics is reentrant; the EnergyFunction's patterns
// must not change during the call.
#ifndef ENGRAM_CORE_DYNAMICS_H_
#define ENGRAM_CORE_DYNAMICS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engram/core/energy.h"

namespace engram::core {

enum class Dynamics { kSync, kAsync, kGradient, kTinyBrain };
// kDiverged: a step produced a non-finite state (e.g. gradient descent with
// alpha above 2/L); the last finite state is returned.
enum class StopReason { kConverged, kMaxSteps, kDeadline, kDiverged };

std::string DynamicsName(Dynamics d);
std::string StopReasonName(StopReason r);

inline constexpr int kMaxSteps = 100000;

struct RetrieveOptions {
  Dynamics dynamics = Dynamics::kSync;
  int max_steps = 100;
  // On |x_{t+1} - x_t|_inf. Sync stops at x_t when the update would move it
  // by less than tol (the update is not applied); the others apply the step.
  double tol = 1e-6;
  double alpha = 0.1;    // gradient step
  double dt = 0.1;       // TinyBrain Euler step
  double tau_v = 1.0;
  double tau_h = 1.0;
  uint64_t seed = 0;     // async neuron order
  bool record_trace = false;
  // Polled between steps; returning true stops with kDeadline.
  std::function<bool()> should_stop;
};

// OK, or INVALID_ARGUMENT naming the bad option, or FAILED_PRECONDITION
// (async on a continuous bank).
absl::Status ValidateRetrieveOptions(const RetrieveOptions& options,
                                     StateKind kind);

// True for the dynamics/energy pairs whose descent needs no step-size
// condition (the Lyapunov metric counts only these).
bool GuaranteesDescent(Dynamics dynamics, const EnergyConfig& config);

struct Trajectory {
  std::vector<float> state;
  double energy_start = 0.0;
  double energy_end = 0.0;
  std::vector<double> energy_trace;  // start, then after every step
  int steps = 0;
  StopReason stop_reason = StopReason::kMaxSteps;
  int lyapunov_violations = 0;
  // Row of the stored pattern nearest to `state` when the dynamics found it
  // in their last pass over the bank (sync dynamics on convergence), else -1.
  int64_t nearest_row = -1;
  bool converged() const { return stop_reason == StopReason::kConverged; }
};

// Runs `options.dynamics` from `query` (dim floats). `clamp` is empty or dim
// flags; clamped coordinates keep their query value throughout. For
// kTinyBrain the energies are the system energy of survey Eq. 14.
// Returns the options' validation error, if any.
absl::StatusOr<Trajectory> RunDynamics(const EnergyFunction& energy,
                                       StateKind kind,
                                       absl::Span<const float> query,
                                       absl::Span<const bool> clamp,
                                       const RetrieveOptions& options);

// E(x) and grad E(x) (into `grad`, dim floats) from wherever they come
// (e.g. merged from a bank's shards).
using GradientOracle = std::function<absl::StatusOr<double>(const float* x, float* grad)>;

// The GRADIENT dynamics of RunDynamics, x <- x - alpha grad E(x), with the
// energies and gradients from `value_and_gradient` over a bank of dimension
// `dim` whose energy is `config` (which decides whether descent is
// guaranteed, for the Lyapunov count). A failed evaluation is returned.
absl::StatusOr<Trajectory> RunGradientDynamics(int dim, const EnergyConfig& config,
                                               absl::Span<const float> query,
                                               absl::Span<const bool> clamp,
                                               const RetrieveOptions& options,
                                               const GradientOracle& value_and_gradient);

// A bipolar state's energy for the async dynamics, and a strictly monotone
// key of it that never overflows (the energy itself, but -lse(beta S) for
// the exponential family).
struct KeyedEnergy {
  double key = 0.0;
  double energy = 0.0;
};

// Where the async dynamics' evaluations come from: one bank's overlaps, or
// a bank's shards merged.
class FlipOracle {
 public:
  virtual ~FlipOracle() = default;
  // The energy at x, which is the current state (flipped = -1) or the
  // current state with neuron `flipped` flipped.
  virtual absl::StatusOr<KeyedEnergy> Evaluate(const float* x, int flipped) = 0;
  // The last evaluated flip is kept: x is the current state from now on.
  virtual void Accept(int flipped) = 0;
};

// The ASYNC dynamics of RunDynamics (the exact energy-difference rule:
// unclamped neurons in a seeded random order each sweep, a flip kept when
// it strictly lowers the key) from `query` (dim values +-1), with its
// evaluations from `oracle`. A failed evaluation is returned.
absl::StatusOr<Trajectory> RunAsyncDynamics(int dim, absl::Span<const float> query,
                                            absl::Span<const bool> clamp,
                                            const RetrieveOptions& options, FlipOracle& oracle);

// TinyBrain's memory layer (survey Eq. 12-16) over some of a bank's rows
// (a whole bank, or a shard's part): its state h, one value per row, and at
// a visible state v the layer's part of the system energy and of the
// visible update Xi^T hh, as a StepPartial that merges over parts:
//   - softmax memories (every family but classical and polynomial): log
//     domain over beta h, wsum = sum e_mu, hsum = sum e_mu (h_mu - xi_mu.vh),
//     sum = sum e_mu xi_mu, with e_mu = exp(beta h_mu - log_scale);
//   - classical and polynomial: linear (scale 1), energy_terms = the layer's
//     energy minus sum hh_mu (xi_mu.vh), sum = sum hh_mu xi_mu.
class TinyBrainMemory {
 public:
  // rh = dt / tau_h. The energy's patterns must outlive this object.
  TinyBrainMemory(const EnergyFunction& energy, StateKind kind, double rh);

  // The partial at visible state v (dim floats). The first call starts h
  // at equilibrium with v (h = Xi vh); each later call first moves h by the
  // step the previous call computed. `step_max` receives max |dh| of the
  // step from here, dh = rh (Xi vh - h) (+inf when h + dh is not finite).
  StepPartial At(const float* v, double* step_max);

 private:
  const EnergyFunction& energy_;
  StateKind kind_;
  float rh_;
  bool started_ = false;
  std::vector<float> h_, dh_;
};

// The system energy (Eq. 14) at v from the merge of every part's
// TinyBrainMemory::At(v), and the visible pull Xi^T hh (dim floats).
double FinishTinyBrain(const EnergyConfig& config, StateKind kind, const StepPartial& merged,
                       const float* v, float* pull);

// The memory layer's merged partial at v, and the largest memory step from
// there (`start`: the first call, memory at equilibrium with v).
using TinyBrainOracle = std::function<absl::Status(const float* v, bool start,
                                                   StepPartial* merged, double* step_max)>;

// The TINYBRAIN dynamics of RunDynamics (Euler steps of the visible and
// memory layers) from `query`, with the memory layer's evaluations from
// `oracle` (over a bank of `dim` columns under `config`). A failed
// evaluation is returned.
absl::StatusOr<Trajectory> RunTinyBrainDynamics(int dim, StateKind kind,
                                                const EnergyConfig& config,
                                                absl::Span<const float> query,
                                                absl::Span<const bool> clamp,
                                                const RetrieveOptions& options,
                                                const TinyBrainOracle& oracle);

// The sync step of a bipolar bank under a non-general family (classical,
// polynomial, exponential, lse, gaussian; dot or L2 similarity) gives each
// neuron the sign of its Krotov-Hopfield drive, the lower energy with every
// other neuron fixed (a zero drive keeps the neuron's sign); other banks step
// to an update target.
bool UsesBipolarDrive(const EnergyConfig& config, StateKind kind);

// That drive as a mergeable partial (partials.h): the partial of each of `b`
// states x (b x dim, bipolar) over `energy`'s rows, in `out` (no nearest
// row). Partials of a bank's shards merged with MergeStepPartials, then
// FinishDrive, give the whole bank's drive up to a positive factor and float
// reassociation, so its signs and zeros are those of the sync step on one
// node. UNIMPLEMENTED when !UsesBipolarDrive(energy.config(), kBipolar).
absl::Status DrivePartialBatch(const EnergyFunction& energy, const float* x, int64_t b,
                               std::vector<StepPartial>* out);

// The drive (dim floats, dim = merged.sum.size()) at bipolar state x from
// the merge of every shard's DrivePartialBatch; all zero (every neuron keeps
// its sign) when the partial covers no row.
void FinishDrive(const EnergyConfig& config, const StepPartial& merged, const float* x,
                 float* drive);

// One query of a batch: its state, clamp mask (empty or dim flags) and
// options (not owned; must outlive the call).
struct BatchQuery {
  absl::Span<const float> query;
  absl::Span<const bool> clamp;
  const RetrieveOptions* options = nullptr;
};

// The sync dynamics' stopping rule, the same for one query and for a batch:
// checked at state x after `steps` steps, with `finite` telling whether x's
// update target is finite and `delta` = |move|_inf. Returns why to stop at x,
// or nullopt to take the move. In order: max_steps, the deadline
// (options.should_stop), a non-finite target (diverged), delta < tol
// (converged).
std::optional<StopReason> SyncStopRule(int steps, const RetrieveOptions& options, bool finite,
                                       double delta);

// Continuous batching of the sync dynamics. Queries join (Admit) between
// steps; every Step evaluates all running queries with two matrix-matrix
// products per tile of patterns instead of one pass over the bank per
// query, and a query that stops leaves at once: its trajectory goes to
// `on_finished` and its slot is freed, so the memory held is that of the
// running queries, never of the queries seen. Each trajectory equals
// RunDynamics' for the same query up to float reassociation (the batched
// products sum in another order), whatever else is in the batch.
//
//   SyncBatch batch(energy, kind, [&](uint64_t tag, absl::StatusOr<Trajectory> t) {...});
//   batch.Admit(1, {query, clamp, &options});
//   while (!batch.empty()) { /* admit more */ batch.Step(); }
//
// Thread-safety: not thread-safe; on_finished runs on the caller's thread.
class SyncBatch {
 public:
  // Receives each query's result (its trajectory, or INVALID_ARGUMENT for a
  // query whose options, dimension or clamp are wrong), exactly once; after
  // it the query's memory may be released.
  using OnFinished = std::function<void(uint64_t tag, absl::StatusOr<Trajectory> result)>;

  // Evaluates b states (b x dim, row-major) as
  // EnergyFunction::UpdateTargetBatch does: energies (b), targets (b x dim;
  // null when only energies are asked) and nearest rows (b; hints on entry,
  // -1 when unknown). A non-OK status finishes every query of the batch
  // with it.
  using Evaluator = std::function<absl::Status(const float* x, int64_t b, float* targets,
                                               double* energies, int64_t* nearest_rows)>;

  SyncBatch(const EnergyFunction& energy, StateKind kind, OnFinished on_finished);
  // The same dynamics with the evaluations made by `evaluate` (e.g. merged
  // from the shards of a bank, partials.h) instead of energy's pass over its
  // patterns; `energy` gives the dimension and config. Where the step is a
  // bipolar drive (UsesBipolarDrive), `evaluate` writes each state's drive
  // (FinishDrive) as its target.
  SyncBatch(const EnergyFunction& energy, StateKind kind, OnFinished on_finished,
            Evaluator evaluate);
  ~SyncBatch();
  SyncBatch(const SyncBatch&) = delete;
  SyncBatch& operator=(const SyncBatch&) = delete;

  // Adds a query (its memory must stay valid until its on_finished); it is
  // evaluated by the next Step. An invalid query is finished at once.
  void Admit(uint64_t tag, const BatchQuery& query);
  // Takes the stopping decision for every running query (finishing those
  // that stop), moves the others one step, and evaluates them together with
  // the queries admitted since the last Step.
  void Step();
  // Queries admitted and not yet finished.
  int64_t size() const;
  bool empty() const { return size() == 0; }

 private:
  struct Live;
  absl::Status Evaluate(const std::vector<Live*>& states, bool with_targets);
  void Finish(std::unique_ptr<Live> live, StopReason reason);

  const EnergyFunction& energy_;
  StateKind kind_;
  OnFinished on_finished_;
  bool krotov_hopfield_;
  Evaluator evaluate_;
  std::vector<std::unique_ptr<Live>> running_;  // evaluated, deciding next Step
  std::vector<std::unique_ptr<Live>> joining_;  // admitted, evaluated next Step
  // Scratch of the batched evaluation, sized by the running queries.
  std::vector<float> xs_, targets_;
  std::vector<double> energies_;
  std::vector<int64_t> nearest_;
};

// Runs the sync dynamics for many queries at once (a SyncBatch run to the
// end), each with its own options, clamp, stopping rule and deadline.
// Returns one result per query, in order: the trajectory, or the query's
// validation error (INVALID_ARGUMENT; options.dynamics must be kSync).
std::vector<absl::StatusOr<Trajectory>> RunSyncBatch(const EnergyFunction& energy,
                                                     StateKind kind,
                                                     absl::Span<const BatchQuery> queries);

// Relative float tolerance used for the Lyapunov check.
double EnergyTolerance(double e_before, double e_after);

}  // namespace engram::core

#endif  // ENGRAM_CORE_DYNAMICS_H_
