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

// One query of a batch: its state, clamp mask (empty or dim flags) and
// options (not owned; must outlive the call).
struct BatchQuery {
  absl::Span<const float> query;
  absl::Span<const bool> clamp;
  const RetrieveOptions* options = nullptr;
};

// Runs the sync dynamics for many queries at once, each with its own
// options, clamp, stopping rule and deadline. Every step evaluates all
// queries still running with two matrix-matrix products per tile of
// patterns instead of one pass over the bank per query; the trajectories
// equal RunDynamics' to float tolerance. Returns one result per query, in
// order: the trajectory, or the query's validation error (INVALID_ARGUMENT;
// options.dynamics must be kSync). `on_finished`, when set, is called on the
// calling thread as soon as a query's result is final (index, result), while
// others may still run; the result may be moved from, and the query's
// memory may be released.
//
// Continuous batching: `admit`, when set, is called at every step boundary
// with the number of queries still running and returns queries that join
// the batch there (their memory must stay valid until their on_finished);
// they are numbered after `queries`, in order, and are in the result too.
std::vector<absl::StatusOr<Trajectory>> RunSyncBatch(
    const EnergyFunction& energy, StateKind kind, absl::Span<const BatchQuery> queries,
    const std::function<void(size_t, absl::StatusOr<Trajectory>&)>& on_finished = nullptr,
    const std::function<std::vector<BatchQuery>(int64_t running)>& admit = nullptr);

// Relative float tolerance used for the Lyapunov check.
double EnergyTolerance(double e_before, double e_after);

}  // namespace engram::core

#endif  // ENGRAM_CORE_DYNAMICS_H_
