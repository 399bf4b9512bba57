// Inner loops over a bank's pattern matrix, one implementation per x86-64
// ISA level, chosen once at run time (never Eigen here: each .cc is built
// with its own -m flags, and inline template code from a shared header would
// be merged across levels by the linker).
//
//   const KernelTable& k = Kernels();
//   k.dot_rows(xi, rows, n, x, scores);      // scores[r] = <xi_r, x>
//   k.axpy_rows(xi, rows, n, weights, acc);  // acc += sum_r w_r xi_r
//
// Layouts: `rows` patterns of `n` values, row-major and contiguous. f32 rows
// are float; bf16 rows are the upper 16 bits of the f32 value (round to
// nearest even); bit rows are `BitWords(n)` uint64 words per row, bit i of
// word i/64 set when the value is +1 (padding bits are 0).
// Tolerance: float accumulation in several independent lanes, so results
// differ from a sequential double sum by O(n * eps_f32 * sum |a_i b_i|); the
// bit kernels are exact.
//
// Thread-safety: all functions are pure (they write only their outputs).
#ifndef ENGRAM_CORE_SRC_KERNELS_KERNELS_H_
#define ENGRAM_CORE_SRC_KERNELS_KERNELS_H_

#include <cmath>
#include <cstdint>
#include <string>

namespace engram::core::kernels {

// kAvx512Bf16 is kAvx512 with the BF16 and VNNI extensions (VDPBF16PS dot
// products over bf16 rows, VPDPBUSD over int8 rows).
enum class SimdLevel { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

std::string SimdLevelName(SimdLevel level);

inline int BitWords(int n) { return (n + 63) / 64; }

// Statistics of a block of integer overlaps d (see overlap_weights).
struct OverlapStats {
  int64_t sum = 0;          // sum d
  double sum_sq = 0.0;      // sum d^2 (exact while below 2^53)
  float max = -INFINITY;    // max d
  float min = INFINITY;     // min d
  int64_t argmax = -1;      // the first row with d = max
};

struct KernelTable {
  SimdLevel level;
  // out[r] = sum_i rows[r*n + i] * x[i], r < count.
  void (*dot_rows)(const float* rows, int64_t count, int n, const float* x,
                   float* out);
  // acc[i] += sum_r w[r] * rows[r*n + i], i < n.
  void (*axpy_rows)(const float* rows, int64_t count, int n, const float* w,
                    float* acc);
  // As dot_rows / axpy_rows over bf16 rows (x, w, acc stay f32).
  void (*dot_rows_bf16)(const uint16_t* rows, int64_t count, int n,
                        const float* x, float* out);
  void (*axpy_rows_bf16)(const uint16_t* rows, int64_t count, int n,
                         const float* w, float* acc);
  // Int8 rows against an int8 x, exactly: out[r] = sum_i x[i] * rows[r*n + i]
  // for values in [-127, 127] and n <= 2^16. row_sums[r] must be
  // sum_i rows[r*n + i] (the VNNI kernel multiplies x + 128 as unsigned
  // bytes and subtracts 128 row_sums[r]).
  void (*dot_rows_i8)(const int8_t* rows, int64_t count, int n, const int8_t* x,
                      const int32_t* row_sums, int32_t* out);
  // Bipolar rows as bits against a bipolar x as bits:
  // out[r] = n - 2 * popcount(row_r XOR x) (exact).
  void (*dot_rows_bits)(const uint64_t* rows, int64_t count, int n,
                        const uint64_t* x, float* out);
  // acc[i] += sum_r w[r] * bit_i(row_r), i < n (the 0/1 indicator; the
  // caller turns it into +-1 as 2 * acc - sum w).
  void (*axpy_rows_bits)(const uint64_t* rows, int64_t count, int n,
                         const float* w, float* acc);
  // Many states against the same f32 rows (a batched step without packing
  // the rows: each row is read once per call, from cache for every state
  // after the first). out[q*count + r] = sum_i rows[r*n + i] * x[q*n + i],
  // for states q < b and rows r < count.
  void (*dot_rows_multi)(const float* rows, int64_t count, int n, const float* x,
                         int64_t b, float* out);
  // acc[q*n + i] += sum_r w[q*count + r] * rows[r*n + i], q < b, i < n.
  // Rows whose weights are zero for a group of states are not read for it.
  void (*axpy_rows_multi)(const float* rows, int64_t count, int n, const float* w,
                          int64_t b, float* acc);
  // Softmax weights of a block relative to a scale (w[i] <= shift):
  // out[i] = exp(w[i] - shift) rounded to f32 when w[i] >= cut, else 0;
  // returns the sum of those exp values in double (before rounding). exp is
  // evaluated in double (the vector levels to within 2^-50 relative); a NaN
  // w[i] gives NaN, as std::exp does.
  double (*exp_weights)(const double* w, int64_t count, double shift, double cut, float* out);
  // acc[i] += sum_r w[r] * bit_i(row_r), i < n, in integers, for weights
  // |w[r]| <= 32767: exact whenever every acc[i] stays in int32 (the kernel
  // sums groups of rows whose |w| add up to at most 32767 in 16-bit lanes,
  // widening each group into acc once). Null at levels where the float
  // axpy_rows_bits is as fast (AVX2). The AVX-512 kernel, while it adds
  // row r, asks the memory system for row r of `next` (r < next_count; next
  // may be null): the caller's next rows arrive while this compute-bound sum
  // runs (a burst of prefetches before the call mostly waits for them).
  void (*axpy_rows_bits_i16)(const uint64_t* rows, int64_t count, int n, const int16_t* w,
                             int32_t* acc, const uint64_t* next, int64_t next_count);
  // The statistics of count > 0 overlaps d (dot_rows_bits's output: exact
  // integers of magnitude <= 2^20), and with w16 non-null the integer
  // weights w16[r] = (a * d[r] + b) >> shift, which the caller guarantees
  // are exact (2^shift divides a * d + b) and fit int16 (and a * d + b int32).
  void (*overlap_weights)(const float* d, int64_t count, int32_t a, int32_t b, int shift,
                          int16_t* w16, OverlapStats* stats);
  // Scans of a batched tile's scores (one state's row of count > 0 floats):
  // the largest v[i], or NaN when any v[i] is NaN.
  float (*max_value)(const float* v, int64_t count);
  // Writes the i with v[i] >= t to idx (count slots, any of which may be
  // written) in increasing order; returns how many.
  int64_t (*indices_at_least)(const float* v, int64_t count, float t, int32_t* idx);
  // The nearest-pattern key k_i = double(v[i]) - 0.5 * double(sq_norms[i]):
  // when some k_i > *key, sets *key to the largest and *row to its first i.
  void (*max_nearest_key)(const float* v, const float* sq_norms, int64_t count, double* key,
                          int64_t* row);
};

// The table for the widest level this CPU supports, capped by the
// environment variable ENGRAM_SIMD=scalar|avx2|avx512|avx512_bf16 when set.
const KernelTable& Kernels();

// The table of one level, or nullptr when this CPU cannot run it.
const KernelTable* KernelsFor(SimdLevel level);

// The widest level this CPU supports (ignores ENGRAM_SIMD).
SimdLevel DetectedSimdLevel();

// Per-level tables (defined in kernels_<level>.cc).
const KernelTable& ScalarKernels();
const KernelTable& Avx2Kernels();
const KernelTable& Avx512Kernels();
const KernelTable& Avx512Bf16Kernels();

// The scalar overlap statistics and score scans, shared by the AVX2 table.
void ScalarOverlapWeights(const float* d, int64_t count, int32_t a, int32_t b, int shift,
                          int16_t* w16, OverlapStats* stats);
float ScalarMaxValue(const float* v, int64_t count);
int64_t ScalarIndicesAtLeast(const float* v, int64_t count, float t, int32_t* idx);
void ScalarMaxNearestKey(const float* v, const float* sq_norms, int64_t count, double* key,
                         int64_t* row);

// For the multi-state weighted sums: the rows any state of each group of
// four (states 4g .. 4g + 3 of b) weights with a nonzero w[q * count + r],
// in row order, in lists[g * count ..] (sizes[g] of them; lists has
// ceil(b / 4) * count slots, sizes ceil(b / 4)). Scalar code, built with the
// baseline flags and called by every level.
void ActiveRowsOfStateGroups(const float* w, int64_t count, int64_t b, int32_t* lists,
                             int64_t* sizes);

// A finite vector v of n floats as int8: writes q[i] = round(v[i] / s)
// (in [-127, 127]) and returns the scale s = max |v[i]| / 127 (0 when that
// is 0 in float, and then every q[i] is 0).
float QuantizeToInt8(const float* v, int n, int8_t* q);

// f32 <-> bf16 (round to nearest even; NaN stays NaN).
uint16_t FloatToBf16(float v);
float Bf16ToFloat(uint16_t v);

}  // namespace engram::core::kernels

#endif  // ENGRAM_CORE_SRC_KERNELS_KERNELS_H_
