// Single-pass evaluation of a Dense Associative Memory step over a bank:
// similarities, separation weights and the weighted sum of patterns in one
// read of the pattern matrix per call, split over threads.
//
//   internal::LogSoftmaxWeights rule(beta);
//   std::vector<float> acc(n);
//   internal::FusedSums s = internal::FusedPass(view, SimilarityKind::kDot,
//                                               x, rule, acc.data());
//   // sum_mu softmax(beta s)_mu xi_mu == acc / s.wsum
//
// Rows are taken in cache-sized blocks: the block's scores come from one
// streaming pass (dot_rows), its weights are computed in double, and the
// weighted sum (axpy_rows) re-reads the block while it is still in L2. The
// weights are kept relative to a running scale so nothing overflows: in the
// log domain (softmax) the scale is the running max of the log-weights (the
// online log-sum-exp), in the linear domain it is the running max |w|. Each
// thread takes a contiguous range of rows; the partial (scale, sums, acc)
// are merged exactly by rescaling to the largest scale.
//
// Thread-safety: FusedPass is reentrant; the view must not change during the
// call. It uses the shared compute threads (parallel.h).
#ifndef ENGRAM_CORE_SRC_FUSED_H_
#define ENGRAM_CORE_SRC_FUSED_H_

#include <cmath>
#include <cstdint>
#include <functional>

#include "engram/core/energy_config.h"
#include "engram/core/partials.h"
#include "engram/core/pattern_view.h"

namespace engram::core::internal {

enum class WeightDomain { kLog, kLinear };

// The separation function of one energy, evaluated on a block of
// similarities. Implementations must be thread-safe (const, no state).
// An integer form of a kLinear rule over integer similarities d (the
// overlaps of bit-packed rows with a bipolar state): weight w = a d + b,
// second quantity h = c, energy term e2 d^2 + e1 d.
struct AffineIntegerForm {
  int32_t a = 0, b = 0, c = 0;
  double e2 = 0.0, e1 = 0.0;
};

class RowWeights {
 public:
  virtual ~RowWeights() = default;
  virtual WeightDomain domain() const = 0;
  // kLog: w[i] = log-weight of s[i] (h unused), returns 0.
  // kLinear: w[i] = weight, h[i] = a second per-row quantity summed with the
  // same scale (0 when unused), returns the block's sum of energy terms.
  virtual double Block(const double* s, int64_t count, double* w, double* h) const = 0;
  // For kLog rules whose log-weight is slope * s (softmax): the slope
  // (beta), which lets a screened pass bound log-weights from bounds on s;
  // 0 for any other rule.
  virtual double log_weight_slope() const { return 0.0; }
  // For kLinear rules whose weights are affine in the similarity with
  // integer coefficients (classical, quadratic, identity): that form, which
  // lets a pass over bit-packed rows sum them exactly in integers. False for
  // any other rule.
  virtual bool affine_integer_form(AffineIntegerForm* form) const { return false; }
};

// sum_mu w_mu xi_mu = exp(log_scale) * acc (acc as written by FusedPass).
struct FusedSums {
  double log_scale = -INFINITY;  // log of the common scale of acc and the sums
  double scale = 0.0;            // kLinear: that scale (a power of two)
  double wsum = 0.0;             // sum_mu w_mu / exp(log_scale)
  double hsum = 0.0;             // sum_mu h_mu / exp(log_scale) (kLinear)
  double energy_terms = 0.0;     // sum of Block() returns (kLinear)
  bool x_bipolar = false;        // the bit-packed kernels were usable
  // With track_nearest: the row maximising x.xi - |xi|^2/2 (the nearest
  // pattern in L2; first one on ties), -1 when the pass did not track it
  // exactly (bf16 rows, or rows == 0).
  int64_t nearest_row = -1;
  double nearest_key = -INFINITY;
  // |x|^2 (SquaredNorm) when the pass computed it, NaN otherwise.
  double sq_x = NAN;
};

// Rows whose weight is below this fraction of the largest weight, divided
// by the number of rows, are left out of the weighted sum (never out of the
// sums of weights): together they move the normalised weighted sum by at most
// 2^-24 (f32 rounding) times max |xi|. With a sharp softmax almost every row
// is such a row, and the pass costs little more than its dot products.
inline constexpr double kNegligibleWeightMass = 0x1p-24;

// Runs one fused pass over `view` for state x (view.dim floats). When `acc`
// is non-null it receives sum_mu (w_mu / exp(log_scale)) xi_mu (view.dim
// floats, overwritten); when null only the sums are formed (scores only).
// `similarity` must be kDot or kNegHalfSqL2. With `track_nearest` the pass
// also finds the nearest pattern (FusedSums::nearest_row) from the same
// scores, as Bank::Nearest would, when it reads the exact rows (f32, or bits
// for a bipolar state).
//
// On a screened view (PatternView::screen) a softmax pass first scores every
// row on the int8 screen, bounds each row's log-weight from the screen's
// error bound, and reads the f32 rows of only the rows that can reach
// kNegligibleWeightMass / K of the largest weight or be the nearest pattern:
// their scores, weights, weighted sum and nearest row are exactly those of
// the f32 pass. The other rows enter the sum of weights with their screened
// scores (they hold less than 2^-24 of it, so log-sum-exp moves by less than
// 2^-24 (e^(beta e_mu) - 1), e_mu the row's bound). When more than 1/16 of the rows (and more
// than 1024) can be significant, the pass runs on the f32 rows as usual.
// (FusedPassBatch does not screen: batched steps read the f32 rows.)
//
// `hint_row` (log domain, optional) names a row likely to carry one of the
// largest weights, e.g. the previous state's nearest pattern: its weight
// bounds the final scale from below from the start, so the negligible rows
// are left out of the weighted sum from the first block on. Any row is a
// valid hint; a poor one only costs speed.
FusedSums FusedPass(const PatternView& view, SimilarityKind similarity, const float* x,
                    const RowWeights& rule, float* acc, bool track_nearest = false,
                    int64_t hint_row = -1);

// The batched form for `b` states x (b x view.dim floats, row-major), one
// read of the f32 rows per call. Up to kBatchMultiMaxStates states, the rows
// are taken in L2-sized tiles: the multi-state kernels score every state
// against the tile (dot_rows_multi), the weights are computed per state as
// in FusedPass (weights negligible against the running scale are left out,
// as there), and axpy_rows_multi adds the tile to every state's accumulator
// while it is still in cache; threads take contiguous ranges of rows and
// their partial sums are merged exactly. Larger batches score with sgemms
// (S = X Xi^T per tile), where OpenBLAS's packed kernels are faster; a
// softmax over dot products scores a chunk of tiles (up to 128 MB of S)
// before it folds them, so each state's largest score bounds its scale from
// the start. The weighted sum then takes a second sgemm (Acc += W Xi) only
// for the states whose weights left (negligible ones zeroed, as above) fill
// more than 1/8 of the tile; the multi-state kernel adds the few rows the
// others keep. A bf16 bank always takes the sgemm form, over its bf16 rows
// widened to f32 a tile at a time (the products of its per-state kernels,
// so a batched state's weights and sums agree with FusedPass's to within
// 2^-16 sum |xi_i x_i| of each score, plus f32 reassociation), and like
// FusedPass tracks no nearest row. `acc` is b x view.dim (or null); `sums`
// has b entries.
inline constexpr int64_t kBatchMultiMaxStates = 32;

// Batches smaller than this run as one FusedPass per state: on f32 rows a
// pass per state streams at memory speed, which the multi-state kernels beat
// from 4 states on; on bit-packed rows (a bipolar bank) the per-state passes
// read 1/32 of the bytes, so batching starts at 8; on bf16 rows they read
// half the bytes and the batch runs as sgemms, which pay from 16 states.
inline int64_t BatchMinStates(const PatternView& view) {
  return view.bits != nullptr ? 8 : view.bf16 != nullptr ? 16 : 4;
}

// With `track_nearest`, sums[q].nearest_row is set as in FusedPass (from
// the sgemm scores, which may round differently from Bank::Nearest's dot
// products: rows tied to within f32 rounding can come out either way).
// `hint_rows` (b entries, -1 for none; optional) are hint rows per state,
// as FusedPass's `hint_row`.
void FusedPassBatch(const PatternView& view, SimilarityKind similarity, const float* x,
                    int64_t b, const RowWeights& rule, float* acc, FusedSums* sums,
                    bool track_nearest = false, const int64_t* hint_rows = nullptr);

// s_mu = S(xi_mu, x) for every row (kDot or kNegHalfSqL2), with the fast
// kernels; `s` has view.rows slots.
void FastSimilarities(const PatternView& view, SimilarityKind similarity, const float* x,
                      double* s);

// ---- Separation rules -----------------------------------------------------

// log-weights beta * s (softmax / exponential separation).
class LogSoftmaxWeights : public RowWeights {
 public:
  explicit LogSoftmaxWeights(double beta) : beta_(beta) {}
  WeightDomain domain() const override { return WeightDomain::kLog; }
  double Block(const double* s, int64_t count, double* w, double* h) const override;
  double log_weight_slope() const override { return beta_; }

 private:
  double beta_;
};

// Weights -dE/dS and energy terms of the classical, polynomial and UHN
// identity/polynomial separations.
class PolynomialWeights : public RowWeights {
 public:
  // degree 2 with half = true is the classical F(s) = s^2 / 2; degree 0 is
  // the identity separation F(s) = s.
  PolynomialWeights(int degree, bool rectified, bool half)
      : degree_(degree), rectified_(rectified), half_(half) {}
  WeightDomain domain() const override { return WeightDomain::kLinear; }
  double Block(const double* s, int64_t count, double* w, double* h) const override;
  bool affine_integer_form(AffineIntegerForm* form) const override;

 private:
  int degree_;
  bool rectified_;
  bool half_;
};

// The rule for an energy config, or nullptr when the config has no fused
// form (kMax separation, L1 similarity).
std::unique_ptr<RowWeights> MakeRowWeights(const EnergyConfig& config);

// A pass's sums as a partial's (all but the rows, domain, sum and nearest).
void SumsToPartial(const FusedSums& s, StepPartial* p);

}  // namespace engram::core::internal

#endif  // ENGRAM_CORE_SRC_FUSED_H_
