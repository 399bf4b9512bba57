// The read-only view of a bank's rows that every pass reads: f32 rows and
// their squared norms, and the reduced-precision copies a bank may keep
// (bf16 rows, bipolar bits, an int8 screen with per-row error bounds).
//
// Thread-safety: a view does not own memory; it is valid while its bank is
// not modified.
#ifndef ENGRAM_CORE_PATTERN_VIEW_H_
#define ENGRAM_CORE_PATTERN_VIEW_H_

#include <cstdint>

namespace engram::core {

// One row of an int8 screen: the row xi is stored as q (int8, |q_i| <= 127)
// with xi~ = scale q. For a state x stored the same way (x~ = t u), and
// D = sum_i q_i u_i (exact in int32 for dims up to kMaxScreenDim),
//   |f32 dot(xi, x) - scale t D| <= err |x| + norm |x - x~|,
// where err >= |xi - xi~| + (n/4 + 8) 2^-24 |xi| also covers the f32 dot
// kernels' accumulation error, and norm >= |xi~|.
struct ScreenRow {
  float scale = 0.f;
  float err = 0.f;
  float norm = 0.f;
};

// Largest dimension a bank screens (int8 dot products stay in int32).
inline constexpr int kMaxScreenDim = 1 << 17;

// Read-only view of a bank's patterns: `rows` x `dim` floats, row-major and
// contiguous; `sq_norms` holds |xi_mu|^2 per row. A bank stored at reduced
// precision also exposes the same rows as `bf16` (upper halves of the f32
// values, rounded) or `bits` (bipolar rows, ceil(dim/64) words each, bit set
// for +1); the fast paths read those instead of `data`. The view does not
// own memory and is valid while the bank is not modified.
struct PatternView {
  const float* data = nullptr;
  const float* sq_norms = nullptr;
  int64_t rows = 0;
  int dim = 0;
  const uint16_t* bf16 = nullptr;
  const uint64_t* bits = nullptr;
  // A screen of f32 rows (Precision::kF32Screened): each row as int8
  // (`dim` bytes a row, see ScreenRow), which bounds every row's f32 dot
  // product from a single int8 dot product; screen_sums[r] = sum_i q_i.
  const int8_t* screen = nullptr;
  const ScreenRow* screen_rows = nullptr;
  const int32_t* screen_sums = nullptr;
  // A log weight prior per row (b_mu <= 0; null for none): an energy with
  // softmax weights over this view weighs row mu by exp(beta S_mu + b_mu),
  // i.e. it sees the similarity S_mu + b_mu / beta. A bank's decay with age
  // (Bank::LogPrior). Only the reference evaluation reads it; the fast
  // passes decline a view that has one.
  const double* log_prior = nullptr;
  const float* row(int64_t mu) const { return data + mu * dim; }
};

}  // namespace engram::core

#endif  // ENGRAM_CORE_PATTERN_VIEW_H_
