// Every kernel level against a double-precision reference, on shapes that
// hit the SIMD tails, and the fused single-pass energy evaluations against
// the two-pass reference implementations.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <set>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "engram/core/bank.h"
#include "engram/core/dynamics.h"
#include "engram/core/energy.h"
#include "fused.h"
#include "state_loops.h"
#include "kernels/kernels.h"
#include "testing/random_banks.h"

namespace engram::core {
namespace {

using kernels::KernelTable;
using kernels::SimdLevel;
using testing::RandomBipolar;
using testing::RandomGaussian;

const int kDims[] = {1, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 784, 1000};
const int kCounts[] = {1, 3, 4, 5, 17};

std::vector<const KernelTable*> Levels() {
  std::vector<const KernelTable*> out;
  for (SimdLevel l : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512,
                      SimdLevel::kAvx512Bf16}) {
    if (const KernelTable* t = kernels::KernelsFor(l)) out.push_back(t);
  }
  return out;
}

TEST(KernelDispatch, ScalarAlwaysAvailableAndChosenLevelIsSupported) {
  ASSERT_NE(kernels::KernelsFor(SimdLevel::kScalar), nullptr);
  const KernelTable& k = kernels::Kernels();
  EXPECT_LE(static_cast<int>(k.level), static_cast<int>(kernels::DetectedSimdLevel()));
  EXPECT_NE(kernels::KernelsFor(k.level), nullptr);
  std::printf("detected SIMD level: %s\n",
              kernels::SimdLevelName(kernels::DetectedSimdLevel()).c_str());
}

TEST(Bf16, RoundsToNearestEvenAndKeepsSpecials) {
  EXPECT_EQ(kernels::Bf16ToFloat(kernels::FloatToBf16(1.0f)), 1.0f);
  EXPECT_EQ(kernels::Bf16ToFloat(kernels::FloatToBf16(-2.5f)), -2.5f);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1).
  EXPECT_EQ(kernels::Bf16ToFloat(kernels::FloatToBf16(1.0f + 0x1p-8f)), 1.0f);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even.
  EXPECT_EQ(kernels::Bf16ToFloat(kernels::FloatToBf16(1.0f + 3 * 0x1p-8f)), 1.0f + 0x1p-6f);
  EXPECT_TRUE(std::isnan(kernels::Bf16ToFloat(kernels::FloatToBf16(NAN))));
  EXPECT_TRUE(std::isinf(kernels::Bf16ToFloat(kernels::FloatToBf16(INFINITY))));
  std::mt19937_64 rng(5);
  for (float v : RandomGaussian(1000, rng, 100.f)) {
    const float r = kernels::Bf16ToFloat(kernels::FloatToBf16(v));
    EXPECT_LE(std::fabs(r - v), std::fabs(v) * 0x1p-8f) << v;
  }
}

// Reference dot products and weighted sums in double.
std::vector<double> RefDots(const std::vector<float>& rows, int count, int n,
                            const std::vector<float>& x) {
  std::vector<double> out(count);
  for (int r = 0; r < count; ++r) {
    double s = 0;
    for (int i = 0; i < n; ++i) s += double{rows[r * n + i]} * x[i];
    out[r] = s;
  }
  return out;
}

double Tolerance(int n) { return 1e-6 * (4.0 + n); }

TEST(Kernels, DotAndAxpyMatchDoubleReferenceAtEveryLevel) {
  std::mt19937_64 rng(1);
  for (const KernelTable* k : Levels()) {
    for (int n : kDims) {
      for (int count : kCounts) {
        auto rows = RandomGaussian(int64_t{count} * n, rng);
        auto x = RandomGaussian(n, rng);
        auto w = RandomGaussian(count, rng);
        if (count > 2) w[1] = 0.f;  // zero weights are skipped
        const auto want = RefDots(rows, count, n, x);
        std::vector<float> got(count + 1, 123.f);
        k->dot_rows(rows.data(), count, n, x.data(), got.data());
        for (int r = 0; r < count; ++r) {
          EXPECT_NEAR(got[r], want[r], Tolerance(n) * std::sqrt(double(n)))
              << kernels::SimdLevelName(k->level) << " n=" << n << " r=" << r;
        }
        EXPECT_EQ(got[count], 123.f) << "wrote past the output";
        std::vector<float> acc(n + 1, 0.5f);
        acc[n] = 77.f;
        k->axpy_rows(rows.data(), count, n, w.data(), acc.data());
        for (int i = 0; i < n; ++i) {
          double s = 0.5;
          for (int r = 0; r < count; ++r) s += double{w[r]} * rows[r * n + i];
          EXPECT_NEAR(acc[i], s, Tolerance(count) * 4)
              << kernels::SimdLevelName(k->level) << " n=" << n << " i=" << i;
        }
        EXPECT_EQ(acc[n], 77.f) << "wrote past the accumulator";
      }
    }
  }
}

// The multi-state kernels against per-state double references, with a
// group of four states whose weights are all zero (skipped: left exactly as
// they were) and a row no state weights.
TEST(Kernels, MultiStateKernelsMatchDoubleReferenceAtEveryLevel) {
  std::mt19937_64 rng(12);
  for (const KernelTable* k : Levels()) {
    for (int n : kDims) {
      for (int count : {1, 3, 4, 5, 17, 40}) {
        for (int b : {1, 3, 4, 5, 9}) {
          auto rows = RandomGaussian(int64_t{count} * n, rng);
          auto x = RandomGaussian(int64_t{b} * n, rng);
          auto w = RandomGaussian(int64_t{b} * count, rng);
          if (b >= 8) std::fill(w.begin(), w.begin() + 4 * count, 0.f);  // states 0-3
          if (count > 2) {
            for (int q = 0; q < b; ++q) w[q * count + 1] = 0.f;  // row 1
          }
          if (count > 34) {  // rows 18-33 zero but for row 25 of the last state
            for (int q = 0; q < b; ++q) std::fill(&w[q * count + 18], &w[q * count + 34], 0.f);
            w[(b - 1) * count + 25] = 0.75f;
          }
          std::vector<float> got(int64_t{b} * count + 1, 123.f);
          k->dot_rows_multi(rows.data(), count, n, x.data(), b, got.data());
          for (int q = 0; q < b; ++q) {
            const std::vector<float> xq(x.begin() + int64_t{q} * n, x.begin() + int64_t{q + 1} * n);
            const auto want = RefDots(rows, count, n, xq);
            for (int r = 0; r < count; ++r) {
              EXPECT_NEAR(got[q * count + r], want[r], Tolerance(n) * std::sqrt(double(n)))
                  << kernels::SimdLevelName(k->level) << " n=" << n << " b=" << b << " q=" << q;
            }
          }
          EXPECT_EQ(got[int64_t{b} * count], 123.f) << "wrote past the output";
          std::vector<float> acc(int64_t{b} * n + 1, 0.5f);
          acc[int64_t{b} * n] = 77.f;
          k->axpy_rows_multi(rows.data(), count, n, w.data(), b, acc.data());
          for (int q = 0; q < b; ++q) {
            for (int i = 0; i < n; ++i) {
              double s = 0.5;
              for (int r = 0; r < count; ++r) s += double{w[q * count + r]} * rows[r * n + i];
              if (b >= 8 && q < 4) {
                EXPECT_EQ(acc[q * n + i], 0.5f) << "a state with zero weights changed";
              } else {
                EXPECT_NEAR(acc[q * n + i], s, Tolerance(count) * 4)
                    << kernels::SimdLevelName(k->level) << " n=" << n << " b=" << b << " q=" << q;
              }
            }
          }
          EXPECT_EQ(acc[int64_t{b} * n], 77.f) << "wrote past the accumulator";
        }
      }
    }
  }
}

// exp_weights against std::exp on lengths that hit the vector tails: each
// output is the f32 rounding of exp (to one f32 ulp), rows below the cut get
// exactly 0, and the returned sum is the double sum of the exps (1e-14).
TEST(Kernels, ExpWeightsMatchExpWithinStatedError) {
  std::mt19937_64 rng(13);
  std::uniform_real_distribution<double> u(-60.0, 0.0);
  for (const KernelTable* k : Levels()) {
    for (int count : {1, 7, 8, 9, 33, 1000}) {
      const double shift = 37.25, cut = shift - 40.0;
      std::vector<double> w(count);
      for (auto& v : w) v = shift + u(rng);
      w[0] = shift;  // the largest weight, exp(0) = 1
      std::vector<float> out(count + 1, 5.f);
      const double sum = k->exp_weights(w.data(), count, shift, cut, out.data());
      double want_sum = 0.0;
      for (int i = 0; i < count; ++i) {
        const double d = w[i] - shift;
        if (w[i] < cut) {
          EXPECT_EQ(out[i], 0.f) << kernels::SimdLevelName(k->level) << " d=" << d;
        } else {
          const double e = std::exp(d);
          EXPECT_NEAR(out[i], e, 0x1p-23 * e) << kernels::SimdLevelName(k->level) << " d=" << d;
          want_sum += e;
        }
      }
      EXPECT_EQ(out[0], 1.f) << kernels::SimdLevelName(k->level);
      EXPECT_NEAR(sum, want_sum, 1e-14 * want_sum) << kernels::SimdLevelName(k->level);
      EXPECT_EQ(out[count], 5.f) << "wrote past the output";
      // NaN propagates (a NaN state must not look like a zero weight).
      w[count - 1] = NAN;
      EXPECT_TRUE(std::isnan(k->exp_weights(w.data(), count, shift, cut, out.data())));
      EXPECT_TRUE(std::isnan(out[count - 1])) << kernels::SimdLevelName(k->level);
    }
  }
}

TEST(Kernels, Bf16KernelsMatchReferenceOnRoundedRows) {
  std::mt19937_64 rng(2);
  for (const KernelTable* k : Levels()) {
    for (int n : kDims) {
      for (int count : kCounts) {
        auto rows = RandomGaussian(int64_t{count} * n, rng);
        std::vector<uint16_t> half(rows.size());
        for (size_t i = 0; i < rows.size(); ++i) {
          half[i] = kernels::FloatToBf16(rows[i]);
          rows[i] = kernels::Bf16ToFloat(half[i]);  // the values the kernel sees
        }
        auto x = RandomGaussian(n, rng);
        auto w = RandomGaussian(count, rng);
        const auto want = RefDots(rows, count, n, x);
        std::vector<float> got(count);
        k->dot_rows_bf16(half.data(), count, n, x.data(), got.data());
        for (int r = 0; r < count; ++r) {
          EXPECT_NEAR(got[r], want[r], Tolerance(n) * std::sqrt(double(n)))
              << kernels::SimdLevelName(k->level) << " n=" << n;
        }
        std::vector<float> acc(n, 0.f);
        k->axpy_rows_bf16(half.data(), count, n, w.data(), acc.data());
        for (int i = 0; i < n; ++i) {
          double s = 0;
          for (int r = 0; r < count; ++r) s += double{w[r]} * rows[r * n + i];
          EXPECT_NEAR(acc[i], s, Tolerance(count) * 4) << kernels::SimdLevelName(k->level);
        }
      }
    }
  }
}

// The bf16 dot product's stated bound (kernels.h, kernels_avx512_bf16.cc):
// against the exact dot product of the stored bf16 row with the f32 state,
// at most 2^-16 sum |row_i x_i| for the state's split into two bf16 parts
// plus n 2^-24 sum |row_i x_i| for the f32 accumulation, at every level; on
// states whose entries span many binades (where a single bf16 rounding of
// the state would be off by up to 2^-9).
TEST(Kernels, Bf16DotWithinStatedBoundOfExactRowDot) {
  std::mt19937_64 rng(21);
  for (const KernelTable* k : Levels()) {
    for (int n : {31, 32, 33, 784, 4096, 4100}) {
      const int count = 9;
      auto rows = RandomGaussian(int64_t{count} * n, rng);
      std::vector<uint16_t> half(rows.size());
      for (size_t i = 0; i < rows.size(); ++i) {
        half[i] = kernels::FloatToBf16(rows[i]);
        rows[i] = kernels::Bf16ToFloat(half[i]);
      }
      auto x = RandomGaussian(n, rng);
      std::uniform_int_distribution<int> binade(-20, 20);
      for (float& v : x) v = std::ldexp(v, binade(rng));
      std::vector<float> got(count);
      k->dot_rows_bf16(half.data(), count, n, x.data(), got.data());
      for (int r = 0; r < count; ++r) {
        double exact = 0, mag = 0;
        for (int i = 0; i < n; ++i) {
          exact += double{rows[int64_t{r} * n + i]} * x[i];
          mag += std::fabs(double{rows[int64_t{r} * n + i]} * x[i]);
        }
        EXPECT_LE(std::fabs(got[r] - exact), (0x1p-16 + n * 0x1p-24) * mag)
            << kernels::SimdLevelName(k->level) << " n=" << n << " r=" << r;
      }
    }
  }
}

// A state entry that is not finite gives what the f32 kernel gives.
TEST(Kernels, Bf16DotPropagatesInfAndNaNOfTheState) {
  for (const KernelTable* k : Levels()) {
    const int n = 40;
    std::vector<uint16_t> row(n, kernels::FloatToBf16(1.f));
    std::vector<float> x(n, 0.5f);
    x[35] = INFINITY;
    float out = 0.f;
    k->dot_rows_bf16(row.data(), 1, n, x.data(), &out);
    EXPECT_EQ(out, INFINITY) << kernels::SimdLevelName(k->level);
    x[3] = NAN;
    k->dot_rows_bf16(row.data(), 1, n, x.data(), &out);
    EXPECT_TRUE(std::isnan(out)) << kernels::SimdLevelName(k->level);
  }
}

std::vector<uint64_t> Pack(const float* v, int n) {
  std::vector<uint64_t> b(kernels::BitWords(n), 0);
  for (int i = 0; i < n; ++i) {
    if (v[i] > 0) b[i >> 6] |= uint64_t{1} << (i & 63);
  }
  return b;
}

// The overlap statistics and integer weights at every level against an
// exact integer reference: overlaps of n's parity in [-n, n] (as
// dot_rows_bits writes them), ties at the max (the first row wins), counts
// off the vector width, and affine weights with their power of two.
// The scans of a batched tile's scores against loops written out here, on
// lengths around the vector widths, with ties at the largest value and key
// (the first index must win), a NaN anywhere, and a threshold that selects
// a handful of entries or none.
TEST(Kernels, ScoreScansMatchPlainLoopsAtEveryLevel) {
  std::mt19937_64 rng(41);
  std::normal_distribution<float> g;
  for (const KernelTable* k : Levels()) {
    for (int count : {1, 7, 8, 15, 16, 17, 33, 1000, 1023}) {
      std::vector<float> v(count), sq(count);
      for (auto& e : v) e = g(rng);
      for (auto& e : sq) e = 1.f + 0.1f * g(rng);
      if (count > 20) {  // ties at the max and at the largest key, 8 apart and far apart
        for (int i : {3, 11, count - 2}) {
          v[i] = 5.f;
          sq[i] = 1.f;
        }
      }
      float want_max = v[0];
      double want_key = -INFINITY;
      int64_t want_row = -1;
      for (int i = 0; i < count; ++i) {
        want_max = std::max(want_max, v[i]);
        const double key = double{v[i]} - 0.5 * double{sq[i]};
        if (key > want_key) {
          want_key = key;
          want_row = i;
        }
      }
      EXPECT_EQ(k->max_value(v.data(), count), want_max) << SimdLevelName(k->level) << " " << count;
      double key = -INFINITY;
      int64_t row = -1;
      k->max_nearest_key(v.data(), sq.data(), count, &key, &row);
      EXPECT_EQ(row, want_row) << SimdLevelName(k->level) << " " << count;
      EXPECT_EQ(key, want_key) << SimdLevelName(k->level) << " " << count;
      // A running key already above every key here is kept.
      double high = want_key + 1.0;
      row = 7;
      k->max_nearest_key(v.data(), sq.data(), count, &high, &row);
      EXPECT_EQ(row, 7);
      EXPECT_EQ(high, want_key + 1.0);
      for (float t : {want_max, 1.5f, -INFINITY, want_max + 1.f}) {
        std::vector<int32_t> want, got(count, -1);
        for (int i = 0; i < count; ++i) {
          if (v[i] >= t) want.push_back(i);
        }
        got.resize(k->indices_at_least(v.data(), count, t, got.data()));
        EXPECT_EQ(got, want) << SimdLevelName(k->level) << " " << count << " t=" << t;
      }
      v[count / 2] = std::nanf("");
      EXPECT_TRUE(std::isnan(k->max_value(v.data(), count))) << SimdLevelName(k->level);
    }
  }
}

TEST(Kernels, OverlapWeightsAreExact) {
  std::mt19937_64 rng(37);
  struct Form { int32_t a, b; int shift; };
  for (const KernelTable* k : Levels()) {
    for (int n : {1, 64, 784, 4097}) {
      for (int count : {1, 5, 16, 17, 250, 1024}) {
        std::vector<float> d(count);
        for (auto& v : d) v = static_cast<float>(n - 2 * static_cast<int>(rng() % (n + 1)));
        if (count > 3) d[count - 1] = d[2] = static_cast<float>(n);  // a tie at the max
        for (Form f : {Form{2, 0, 2}, Form{1, 0, 1}, Form{0, 1, 0}, Form{-3, 7, 0}}) {
          if (n % 2 == 1 && f.shift > 0) f.shift = f.a == 2 ? 1 : 0;  // odd overlaps
          std::vector<int16_t> w(count + 1, 123);
          kernels::OverlapStats st;
          k->overlap_weights(d.data(), count, f.a, f.b, f.shift, w.data(), &st);
          int64_t sum = 0, sq = 0, first = 0;
          float mx = d[0], mn = d[0];
          for (int i = 0; i < count; ++i) {
            const int64_t v = static_cast<int64_t>(d[i]);
            sum += v;
            sq += v * v;
            if (d[i] > mx) { mx = d[i]; first = i; }
            mn = std::min(mn, d[i]);
            const int64_t want = (f.a * v + f.b) / (int64_t{1} << f.shift);
            ASSERT_EQ(f.a * v + f.b, want * (int64_t{1} << f.shift)) << "test forms must divide";
            ASSERT_EQ(w[i], want) << kernels::SimdLevelName(k->level) << " n=" << n << " i=" << i;
          }
          EXPECT_EQ(w[count], 123) << "wrote past the weights";
          EXPECT_EQ(st.sum, sum) << kernels::SimdLevelName(k->level);
          EXPECT_EQ(st.sum_sq, static_cast<double>(sq)) << kernels::SimdLevelName(k->level);
          EXPECT_EQ(st.max, mx);
          EXPECT_EQ(st.min, mn);
          EXPECT_EQ(st.argmax, first) << kernels::SimdLevelName(k->level) << " count=" << count;
          // Without weights: the same statistics, nothing written.
          std::vector<int16_t> untouched(count + 1, 123);
          kernels::OverlapStats st2;
          k->overlap_weights(d.data(), count, f.a, f.b, f.shift, nullptr, &st2);
          EXPECT_EQ(st2.sum, sum);
          EXPECT_EQ(st2.argmax, first);
        }
      }
    }
  }
}

// The integer bit weighted sum at every level that has one: exact against
// an int64 reference for weights anywhere in [-32767, 32767], whose sums pass
// the 16-bit range many times over (the kernel's own grouping), small
// weights with zeros among them, adding into a non-zero accumulator and
// writing nothing past it.
TEST(Kernels, IntegerBitWeightedSumIsExactOverTheInt16Range) {
  std::mt19937_64 rng(31);
  int levels = 0;
  for (const KernelTable* k : Levels()) {
    if (k->axpy_rows_bits_i16 == nullptr) continue;
    ++levels;
    for (int n : {1, 7, 31, 32, 33, 63, 64, 65, 100, 511, 512, 513, 784, 1000, 4096}) {
      for (int count : {1, 3, 17, 40, 301}) {
        auto rows = RandomBipolar(int64_t{count} * n, rng);
        for (int r = 0; r < count; ++r) rows[int64_t{r} * n] = rows[int64_t{r} * n + n - 1] = 1.f;
        std::vector<uint64_t> bits;
        for (int r = 0; r < count; ++r) {
          auto b = Pack(rows.data() + int64_t{r} * n, n);
          bits.insert(bits.end(), b.begin(), b.end());
        }
        for (int kind = 0; kind < 7; ++kind) {
          std::vector<int16_t> w(count);
          for (int r = 0; r < count; ++r) {
            const int64_t mag =
                kind == 0   ? 32767                                       // every row its own group
                : kind == 1 ? static_cast<int64_t>(rng() % 32768)         // groups of a few rows
                : kind == 2 ? static_cast<int64_t>(rng() % 9)             // long groups
                : kind == 3 ? (r % 11 == 5 ? 128 + static_cast<int64_t>(rng() % 900)  // a few
                                           : static_cast<int64_t>(rng() % 61))  // above 8 bits
                : kind == 4 ? 16000 + static_cast<int64_t>(rng() % 16768)  // 16-bit, and
                            : static_cast<int64_t>(rng() % 128);           // 8-bit limits
            // Alternating signs; kinds 4 and 5 all positive, kind 6 all
            // negative, where the first and last columns (set in every row)
            // sum whole groups and segments: a lane at its range's limit.
            const int sign = kind == 6 ? -1 : kind >= 4 ? 1 : (r % 2 == 0 ? 1 : -1);
            w[r] = static_cast<int16_t>(sign * mag);
          }
          if (count > 2) w[1] = 0;
          std::vector<int32_t> acc(n + 1, -5);
          acc[n] = 99;
          // Asking for rows to prefetch (here, the same rows) changes nothing.
          k->axpy_rows_bits_i16(bits.data(), count, n, w.data(), acc.data(),
                                kind % 2 == 0 ? nullptr : bits.data(), count);
          for (int i = 0; i < n; ++i) {
            int64_t want = -5;
            for (int r = 0; r < count; ++r) want += rows[int64_t{r} * n + i] > 0 ? w[r] : 0;
            ASSERT_EQ(acc[i], want) << kernels::SimdLevelName(k->level) << " n=" << n
                                    << " count=" << count << " kind=" << kind << " i=" << i;
          }
          EXPECT_EQ(acc[n], 99) << "wrote past the accumulator";
        }
      }
    }
  }
  EXPECT_GE(levels, 1);  // the scalar level always has it
}

// The int8 dot products are exact integers at every level: random values,
// rows and states at the extremes (+-127, where the VNNI form's unsigned
// bytes reach 255), and a dimension at the int32 limit of kMaxScreenDim.
TEST(Kernels, Int8DotsAreExact) {
  std::mt19937_64 rng(5);
  auto check = [&](const std::vector<int8_t>& rows, int count, int n, const std::vector<int8_t>& x) {
    std::vector<int32_t> sums(count, 0);
    std::vector<int64_t> want(count, 0);
    for (int r = 0; r < count; ++r) {
      for (int i = 0; i < n; ++i) {
        sums[r] += rows[int64_t{r} * n + i];
        want[r] += int64_t{rows[int64_t{r} * n + i]} * x[i];
      }
    }
    for (const KernelTable* k : Levels()) {
      std::vector<int32_t> got(count + 1, 12345);
      k->dot_rows_i8(rows.data(), count, n, x.data(), sums.data(), got.data());
      for (int r = 0; r < count; ++r) {
        ASSERT_EQ(got[r], want[r]) << kernels::SimdLevelName(k->level) << " n=" << n << " r=" << r;
      }
      EXPECT_EQ(got[count], 12345);  // nothing past the last row
    }
  };
  auto random_i8 = [&](int64_t m) {
    std::vector<int8_t> v(m);
    for (auto& c : v) c = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
    return v;
  };
  for (int n : {1, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 784, 1000, 4096}) {
    for (int count : kCounts) {
      check(random_i8(int64_t{count} * n), count, n, random_i8(n));
      // Extremes: +-127 everywhere, signs mixed and aligned.
      std::vector<int8_t> rows(int64_t{count} * n), x(n);
      for (int64_t i = 0; i < int64_t{count} * n; ++i) rows[i] = (i % 3 == 0) ? -127 : 127;
      for (int i = 0; i < n; ++i) x[i] = (i % 2 == 0) ? -127 : 127;
      check(rows, count, n, x);
    }
  }
  const int n = kMaxScreenDim;
  std::vector<int8_t> rows(int64_t{5} * n, 127), x(n, 127);
  for (int i = 0; i < n; ++i) rows[int64_t{1} * n + i] = -127;  // row 1: the most negative
  for (int64_t i = 2 * int64_t{n}; i < 5 * int64_t{n}; ++i) rows[i] = (i & 1) ? 127 : -127;
  check(rows, 5, n, x);
}

// QuantizeToInt8: q = round(v / s), s = max |v| / 127, against a direct
// computation; the largest |v| maps to +-127; zero maps to zero.
TEST(Kernels, QuantizeToInt8RoundsToTheScale) {
  std::mt19937_64 rng(6);
  for (int n : {1, 5, 64, 785}) {
    auto v = RandomGaussian(n, rng, 2.f);
    std::vector<int8_t> q(n);
    const float s = kernels::QuantizeToInt8(v.data(), n, q.data());
    double m = 0.0;
    for (float c : v) m = std::max(m, std::fabs(double{c}));
    EXPECT_NEAR(s, m / 127.0, 1e-6 * m);
    bool extreme = false;
    for (int i = 0; i < n; ++i) {
      EXPECT_LE(std::fabs(double{v[i]} - double{s} * q[i]), 0.5 * s * (1 + 1e-5)) << i;
      extreme |= std::abs(q[i]) == 127;
    }
    EXPECT_TRUE(extreme);
  }
  // Zero, and values so small that max / 127 underflows to 0, give zeros.
  for (float tiny : {0.f, 5e-44f}) {
    std::vector<float> v(9, 0.f);
    v[4] = tiny;
    std::vector<int8_t> q(9, 1);
    EXPECT_EQ(kernels::QuantizeToInt8(v.data(), 9, q.data()), 0.f);
    for (int8_t c : q) EXPECT_EQ(c, 0);
  }
}

TEST(Kernels, BitKernelsAreExact) {
  std::mt19937_64 rng(3);
  for (const KernelTable* k : Levels()) {
    for (int n : {1, 7, 63, 64, 65, 100, 127, 128, 129, 511, 512, 513, 784, 1000}) {
      for (int count : kCounts) {
        auto rows = RandomBipolar(int64_t{count} * n, rng);
        auto x = RandomBipolar(n, rng);
        std::vector<uint64_t> bits;
        for (int r = 0; r < count; ++r) {
          auto b = Pack(rows.data() + int64_t{r} * n, n);
          bits.insert(bits.end(), b.begin(), b.end());
        }
        const auto xb = Pack(x.data(), n);
        const auto want = RefDots(rows, count, n, x);
        std::vector<float> got(count);
        k->dot_rows_bits(bits.data(), count, n, xb.data(), got.data());
        for (int r = 0; r < count; ++r) {
          EXPECT_EQ(got[r], want[r]) << kernels::SimdLevelName(k->level) << " n=" << n;
        }
        // Small integer weights: the indicator sums are exact in float.
        std::vector<float> w(count);
        for (int r = 0; r < count; ++r) w[r] = static_cast<float>(int(rng() % 7) - 3);
        std::vector<float> acc(n + 1, 1.f);
        acc[n] = 9.f;
        k->axpy_rows_bits(bits.data(), count, n, w.data(), acc.data());
        for (int i = 0; i < n; ++i) {
          float s = 1.f;
          for (int r = 0; r < count; ++r) s += rows[r * n + i] > 0 ? w[r] : 0.f;
          EXPECT_EQ(acc[i], s) << kernels::SimdLevelName(k->level) << " n=" << n << " i=" << i;
        }
        EXPECT_EQ(acc[n], 9.f);
      }
    }
  }
}

// ---- Fused passes against the reference implementations -------------------

struct FusedCase {
  std::string name;
  EnergyConfig config;
  StateKind kind;
  Precision precision;
};

std::vector<FusedCase> FusedCases() {
  const auto B = StateKind::kBipolar;
  const auto C = StateKind::kContinuous;
  std::vector<FusedCase> c = {
      {"classical", {.family = EnergyFamily::kClassical}, B, Precision::kF32},
      {"classical_bits", {.family = EnergyFamily::kClassical}, B, Precision::kBitPacked},
      {"poly3", {.family = EnergyFamily::kPolynomial, .degree = 3}, B, Precision::kF32},
      {"poly3_bits", {.family = EnergyFamily::kPolynomial, .degree = 3}, B, Precision::kBitPacked},
      {"poly4_rect", {.family = EnergyFamily::kPolynomial, .degree = 4, .rectified = true}, B,
       Precision::kF32},
      {"exponential", {.family = EnergyFamily::kExponential, .beta = 0.05}, B, Precision::kF32},
      {"exponential_bits", {.family = EnergyFamily::kExponential, .beta = 0.05}, B,
       Precision::kBitPacked},
      {"lse", {.family = EnergyFamily::kLse, .beta = 0.5}, C, Precision::kF32},
      {"lse_bf16", {.family = EnergyFamily::kLse, .beta = 0.5}, C, Precision::kBf16},
      {"lse_sharp", {.family = EnergyFamily::kLse, .beta = 20.0}, C, Precision::kF32},
      {"gaussian", {.family = EnergyFamily::kGaussian, .beta = 0.3}, C, Precision::kF32},
      {"uhn_dot_poly",
       {.family = EnergyFamily::kGeneral, .degree = 3, .separation = SeparationKind::kPolynomial},
       C, Precision::kF32},
      {"uhn_l2_softmax",
       {.family = EnergyFamily::kGeneral, .beta = 0.7, .similarity = SimilarityKind::kNegHalfSqL2,
        .separation = SeparationKind::kSoftmax},
       C, Precision::kF32},
      {"uhn_dot_identity",
       {.family = EnergyFamily::kGeneral, .separation = SeparationKind::kIdentity}, C,
       Precision::kF32},
  };
  return c;
}

class FusedTest : public ::testing::TestWithParam<FusedCase> {};

// The case's bank over rows xi (k x n), and an f32 reference bank over the
// values its kernels read (xi rounded to bf16 for a bf16 bank).
std::pair<Bank, Bank> CaseAndReferenceBanks(const FusedCase& c, const std::vector<float>& xi,
                                            int n, int k) {
  Bank bank(BankSpec{"f", n, c.kind, c.config, c.precision});
  bank.Append(xi, bank.AssignIds(k), {});
  Bank ref_bank(BankSpec{"r", n, c.kind, c.config, Precision::kF32});
  std::vector<float> ref_xi = xi;
  if (c.precision == Precision::kBf16) {
    for (auto& v : ref_xi) v = kernels::Bf16ToFloat(kernels::FloatToBf16(v));
  }
  ref_bank.Append(ref_xi, ref_bank.AssignIds(k), {});
  return {std::move(bank), std::move(ref_bank)};
}

// Relative distance |a - b|_inf / max(|b|_inf, tiny).
double RelInf(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0, m = 1e-30;
  for (size_t i = 0; i < a.size(); ++i) {
    d = std::max(d, std::fabs(double{a[i]} - b[i]));
    m = std::max(m, std::fabs(double{b[i]}));
  }
  return d / m;
}

TEST_P(FusedTest, MatchesReferenceOnShapesThatSplitIntoBlocksAndThreads) {
  const FusedCase& c = GetParam();
  std::mt19937_64 rng(11);
  // Small shapes (one block, one thread) and large ones (many blocks, split
  // over threads: K * N * 4 bytes above the parallel threshold).
  const std::pair<int, int> shapes[] = {{3, 1}, {17, 5}, {64, 33}, {784, 300}, {257, 4200}};
  for (auto [n, k] : shapes) {
    const bool bipolar = c.kind == StateKind::kBipolar;
    // Continuous patterns scaled so that beta * s stays moderate.
    auto xi = bipolar ? RandomBipolar(int64_t{k} * n, rng)
                      : RandomGaussian(int64_t{k} * n, rng, 1.f / std::sqrt(float(n)));
    ASSERT_TRUE(ValidateBankSpec(BankSpec{"f", n, c.kind, c.config, c.precision}).ok()) << c.name;
    const auto [bank, ref_bank] = CaseAndReferenceBanks(c, xi, n, k);
    EnergyFunction fast(c.config, bank.view());
    EnergyFunction ref(c.config, ref_bank.view());
    for (int trial = 0; trial < 3; ++trial) {
      // A state near a stored pattern (the regime retrieval runs in).
      std::vector<float> x(xi.begin() + int64_t{trial} * n % (int64_t{k} * n),
                           xi.begin() + int64_t{trial} * n % (int64_t{k} * n) + n);
      if (bipolar) {
        x = testing::FlipBits(x.data(), n, n / 10, rng);
      } else {
        auto noise = RandomGaussian(n, rng, 0.3f / std::sqrt(float(n)));
        for (int i = 0; i < n; ++i) x[i] += noise[i];
      }
      const double e_ref = ref.ReferenceValue(x.data());
      const double tol = 2e-5 * std::max(1.0, std::fabs(e_ref));
      EXPECT_NEAR(fast.Value(x.data()), e_ref, tol) << c.name << " n=" << n << " k=" << k;

      std::vector<float> t_fast(n), t_ref(n);
      const double et = fast.UpdateTarget(x.data(), t_fast.data());
      ref.ReferenceUpdateTarget(x.data(), t_ref.data());
      EXPECT_NEAR(et, e_ref, tol) << c.name;
      EXPECT_LT(RelInf(t_fast, t_ref), 1e-4) << c.name << " n=" << n << " k=" << k;

      if (!bipolar || c.config.family == EnergyFamily::kClassical) {
        std::vector<float> g_fast(n), g_ref(n);
        const double eg = fast.ValueAndGradient(x.data(), g_fast.data());
        ref.ReferenceValueAndGradient(x.data(), g_ref.data());
        EXPECT_NEAR(eg, e_ref, tol) << c.name;
        EXPECT_LT(RelInf(g_fast, g_ref), 1e-4) << c.name << " n=" << n << " k=" << k;
      }
    }
  }
}

// One batched step of `fast` at b states x (hint rows in `nearest`, -1 for
// none) against `ref`'s double reference of each `stride`-th state: energy,
// target (to `tol`) and nearest row (Bank::Nearest's, where the pass reports
// one; with `nearest_always` it must).
struct BatchCheck {
  double tol = 1e-4;
  int stride = 1;
  bool nearest_always = true;
  std::string label;
};
void ExpectBatchedStepMatchesReference(const EnergyFunction& fast, const EnergyFunction& ref,
                                       const Bank& bank, const std::vector<float>& x, int b,
                                       std::vector<int64_t> nearest, const BatchCheck& check) {
  const int n = bank.dim();
  std::vector<float> targets(x.size());
  std::vector<double> energies(b);
  fast.UpdateTargetBatch(x.data(), b, targets.data(), energies.data(), nearest.data());
  for (int q = 0; q < b; q += check.stride) {
    const float* xq = x.data() + int64_t{q} * n;
    std::vector<float> want(n);
    const double e_ref = ref.ReferenceUpdateTarget(xq, want.data());
    const std::vector<float> got(targets.begin() + int64_t{q} * n,
                                 targets.begin() + int64_t{q + 1} * n);
    EXPECT_NEAR(energies[q], e_ref, 2e-5 * std::max(1.0, std::fabs(e_ref)))
        << check.label << " b=" << b << " q=" << q;
    EXPECT_LT(RelInf(got, want), check.tol) << check.label << " b=" << b << " q=" << q;
    if (check.nearest_always || nearest[q] >= 0) {
      EXPECT_EQ(nearest[q], bank.Nearest(xq).row) << check.label << " b=" << b << " q=" << q;
    }
  }
}

// The batched step (UpdateTargetBatch) against the reference of each state,
// at batch sizes on both sides of every switch: per-state passes, the
// multi-state kernels, sgemm; on a shape split over threads. The nearest
// rows equal Bank::Nearest's where the pass reports them.
TEST_P(FusedTest, BatchedStepMatchesReferenceAtEveryBatchSize) {
  const FusedCase& c = GetParam();
  std::mt19937_64 rng(19);
  const bool bipolar = c.kind == StateKind::kBipolar;
  const int n = 257, k = 4200;
  auto xi = bipolar ? RandomBipolar(int64_t{k} * n, rng)
                    : RandomGaussian(int64_t{k} * n, rng, 1.f / std::sqrt(float(n)));
  const auto [bank, ref_bank] = CaseAndReferenceBanks(c, xi, n, k);
  EnergyFunction fast(c.config, bank.view());
  EnergyFunction ref(c.config, ref_bank.view());
  for (int b : {3, 4, 13, 32, 45}) {
    std::vector<float> x;
    for (int q = 0; q < b; ++q) {
      const int64_t row = (int64_t{q} * 97) % k;
      std::vector<float> xq(xi.begin() + row * n, xi.begin() + (row + 1) * n);
      if (bipolar) {
        xq = testing::FlipBits(xq.data(), n, n / 10, rng);
      } else {
        auto noise = RandomGaussian(n, rng, 0.3f / std::sqrt(float(n)));
        for (int i = 0; i < n; ++i) xq[i] += noise[i];
      }
      x.insert(x.end(), xq.begin(), xq.end());
    }
    // Per-state passes over bits (b < 8) form sum w xi as 2 sum w [xi = +1]
    // - sum w in f32: that cancellation costs a few more digits. bf16 and
    // bit passes may not report the nearest row.
    ExpectBatchedStepMatchesReference(
        fast, ref, bank, x, b, std::vector<int64_t>(b, -1),
        {.tol = c.precision == Precision::kBitPacked ? 1e-3 : 1e-4, .nearest_always = false,
         .label = c.name});
  }
}

// A batch above the multi-state kernels' size on a sharp softmax: most
// states keep one row, so the tile's weighted sum adds the rows left instead
// of running the second sgemm. A few diffuse states (random directions, many
// rows of weight) share the tiles, and the tile size leaves a partial last
// tile. Every state against its reference in double.
TEST(FusedPassBatch, SharpSoftmaxBatchAddsOnlyTheRowsLeft) {
  std::mt19937_64 rng(23);
  const int n = 301, k = 3001;
  auto xi = RandomGaussian(int64_t{k} * n, rng, 1.f / std::sqrt(float(n)));
  Bank bank(BankSpec{"b", n, StateKind::kContinuous, {}, Precision::kF32});
  bank.Append(xi, bank.AssignIds(k), {});
  const EnergyConfig config{.family = EnergyFamily::kLse, .beta = 60.0};
  EnergyFunction energy(config, bank.view());
  for (int b : {33, 100, 1500}) {  // 1500 states: tiles of 2796 rows, so two
    std::vector<float> x;
    for (int q = 0; q < b; ++q) {
      std::vector<float> xq;
      if (q % 48 == 3) {
        xq = RandomGaussian(n, rng, 1.f / std::sqrt(float(n)));
      } else {
        const int64_t row = (int64_t{q} * 389) % k;
        xq.assign(xi.begin() + row * n, xi.begin() + (row + 1) * n);
        auto noise = RandomGaussian(n, rng, 0.3f / std::sqrt(float(n)));
        for (int i = 0; i < n; ++i) xq[i] += noise[i];
      }
      x.insert(x.end(), xq.begin(), xq.end());
    }
    // Every diffuse state is among those checked.
    ExpectBatchedStepMatchesReference(energy, energy, bank, x, b, std::vector<int64_t>(b, -1),
                                      {.stride = b > 100 ? 3 : 1});
  }
}

void ScoresFirstCase(const Bank& bank, const std::vector<float>& xi, const EnergyConfig& config,
                     std::mt19937_64& rng) {
  const int n = 12, b = 34;
  EnergyFunction energy(config, bank.view());
  std::vector<float> x;
  std::vector<int64_t> nearest(b, -1);
  for (int q = 0; q < b; ++q) {
    const int64_t row = q % 2 == 0 ? 1'000'000 + 997 * q : 13 + 28'001 * q;
    std::vector<float> xq(xi.begin() + row * n, xi.begin() + (row + 1) * n);
    auto noise = RandomGaussian(n, rng, 0.05f);
    for (int i = 0; i < n; ++i) xq[i] += noise[i];
    x.insert(x.end(), xq.begin(), xq.end());
    if (q % 4 < 2) nearest[q] = bank.Nearest(xq.data()).row;  // a hint for half the states
  }
  ExpectBatchedStepMatchesReference(energy, energy, bank, x, b, nearest, {});
}

// A batch whose scores outgrow one scores-first chunk (34 states x 1.1M
// rows: 983 040 rows to a chunk, then the rest): states whose winner is in
// the second chunk carry weights in the first one (the multi-state kernel
// for a few of them, the sgemm for the states gathered), and the hint rows
// bound half of the states from the start. Every state against its
// reference in double, for dot products (lse) and -|x - xi|^2 / 2
// (gaussian), whose floors also take each row's |xi|^2.
TEST(FusedPassBatch, ScoresFirstChunksAndHintsMatchTheReference) {
  std::mt19937_64 rng(29);
  const int n = 12, k = 1'100'000, b = 34;
  auto xi = RandomGaussian(int64_t{k} * n, rng, 1.f / std::sqrt(float(n)));
  Bank bank(BankSpec{"b", n, StateKind::kContinuous, {}, Precision::kF32});
  bank.Append(xi, bank.AssignIds(k), {});
  for (EnergyFamily family : {EnergyFamily::kLse, EnergyFamily::kGaussian}) {
    SCOPED_TRACE(EnergyFamilyName(family));
    ScoresFirstCase(bank, xi, {.family = family, .beta = 60.0}, rng);
  }
}

INSTANTIATE_TEST_SUITE_P(Families, FusedTest, ::testing::ValuesIn(FusedCases()),
                         [](const auto& info) { return info.param.name; });

// The fused online log-sum-exp against a direct two-pass one, with scores so
// spread that exp overflows without the running max.
// The state loops without a branch per value against plain loops: every
// length up to 40 and 4 096, specials placed at every position.
TEST(StateLoops, MatchPlainLoopsWithSpecialsAnywhere) {
  std::mt19937_64 rng(41);
  const float specials[] = {NAN, INFINITY, -INFINITY, std::numeric_limits<float>::max(),
                            -std::numeric_limits<float>::max(), 1e-40f, -0.f};
  std::vector<int> lengths(41);
  std::iota(lengths.begin(), lengths.end(), 0);
  lengths.push_back(4096);
  for (int n : lengths) {
    std::vector<float> a = RandomGaussian(n, rng), b = RandomGaussian(n, rng);
    long double sq = 0.0L;
    for (float v : a) sq += static_cast<long double>(v) * v;
    EXPECT_NEAR(internal::SquaredNorm(a.data(), n), static_cast<double>(sq), 1e-14 * (sq + 1))
        << n;
    auto plain_max = [&] {
      double m = 0.0;
      for (int i = 0; i < n; ++i) m = std::max(m, static_cast<double>(std::fabs(a[i] - b[i])));
      return m;
    };
    EXPECT_EQ(internal::MaxAbsDiff(a.data(), b.data(), n), plain_max()) << n;
    EXPECT_TRUE(internal::AllFinite(a.data(), n)) << n;
    const int stride = n > 64 ? 509 : 1;
    for (int at = 0; at < n; at += stride) {
      for (float sp : specials) {
        const float keep = a[at];
        a[at] = sp;
        const bool finite = std::all_of(a.begin(), a.end(), [](float v) { return std::isfinite(v); });
        EXPECT_EQ(internal::AllFinite(a.data(), n), finite) << n << " at " << at << " " << sp;
        const float got = internal::MaxAbsDiff(a.data(), b.data(), n);
        const double want = plain_max();
        EXPECT_TRUE(got == want || (std::isnan(got) && std::isnan(want))) << n << " " << sp;
        a[at] = keep;
      }
    }
  }
}

TEST(FusedPass, OnlineLogSumExpSurvivesHugeBetaAcrossThreads) {
  std::mt19937_64 rng(4);
  const int n = 64, k = 20000;  // 5 MB: split over threads
  auto xi = RandomGaussian(int64_t{k} * n, rng);
  Bank bank(BankSpec{"b", n, StateKind::kContinuous, {}, Precision::kF32});
  bank.Append(xi, bank.AssignIds(k), {});
  auto x = RandomGaussian(n, rng);
  const double beta = 500.0;  // beta * s ~ 1e4: exp overflows double
  internal::LogSoftmaxWeights rule(beta);
  std::vector<float> acc(n);
  const internal::FusedSums sums =
      internal::FusedPass(bank.view(), SimilarityKind::kDot, x.data(), rule, acc.data());
  std::vector<double> s(k);
  double m = -INFINITY;
  for (int mu = 0; mu < k; ++mu) {
    double d = 0;
    for (int i = 0; i < n; ++i) d += double{xi[int64_t{mu} * n + i]} * x[i];
    s[mu] = beta * d;
    m = std::max(m, s[mu]);
  }
  double l = 0;
  std::vector<double> want(n, 0.0);
  for (int mu = 0; mu < k; ++mu) {
    const double w = std::exp(s[mu] - m);
    l += w;
    for (int i = 0; i < n; ++i) want[i] += w * xi[int64_t{mu} * n + i];
  }
  const double lse_want = m + std::log(l);
  const double lse_got = sums.log_scale + std::log(sums.wsum);
  EXPECT_NEAR(lse_got, lse_want, 1e-5 * std::fabs(lse_want));
  for (int i = 0; i < n; ++i) {
    EXPECT_NEAR(acc[i] / sums.wsum, want[i] / l, 1e-3) << i;
  }
}

// Rows whose softmax weight is below 2^-24 / K of the largest are left out
// of the weighted sum, and only those: the result stays within the stated
// bound 2^-24 max|xi| of a double reference. Coordinate c (1..n-1) holds
// four rows with relative weight exp(-gap_c), gap_c from 0 to 70, so a row
// wrongly left out (weight >= 1e-7 for gap <= 16) moves its coordinate by
// far more than the bound; filler rows (weight e^-500) make K large enough
// to split into blocks and threads.
TEST(FusedPass, LeavesOutOnlyNegligibleWeights) {
  const int n = 40;
  const int k = 30000;  // 4.8 MB: split over threads, many blocks
  const int signal_rows = 4 * (n - 1);
  const double beta = 1.0, top = 100.0;
  std::vector<float> xi(int64_t{k} * n, 0.f);
  std::vector<double> s(k);
  std::vector<int> coord(k);
  for (int mu = 0; mu < k; ++mu) {
    if (mu < signal_rows) {
      const int c = mu % (n - 1);
      coord[mu] = 1 + c;
      s[mu] = top - 70.0 * c / (n - 2);
    } else {
      coord[mu] = 0;
      s[mu] = top - 500.0;
    }
    // x = ones, so the score of a one-hot row is its (f32) value.
    s[mu] = static_cast<float>(s[mu]);
    xi[int64_t{mu} * n + coord[mu]] = static_cast<float>(s[mu]);
  }
  // Spread the signal rows over the bank (and over the threads' ranges).
  std::vector<float> shuffled(xi.size());
  std::vector<int> order(k);
  for (int mu = 0; mu < k; ++mu) order[mu] = mu;
  std::mt19937_64 rng(3);
  std::shuffle(order.begin(), order.end(), rng);
  for (int r = 0; r < k; ++r) {
    std::copy(xi.begin() + int64_t{order[r]} * n, xi.begin() + int64_t{order[r] + 1} * n,
              shuffled.begin() + int64_t{r} * n);
  }
  // Also on a screened bank, whose pass reads only the rows the screen
  // cannot rule out.
  for (Precision precision : {Precision::kF32, Precision::kF32Screened}) {
    Bank bank(BankSpec{"b", n, StateKind::kContinuous, {}, precision});
    bank.Append(shuffled, bank.AssignIds(k), {});
    std::vector<float> x(n, 1.f), acc(n);
    internal::LogSoftmaxWeights rule(beta);
    const internal::FusedSums sums =
        internal::FusedPass(bank.view(), SimilarityKind::kDot, x.data(), rule, acc.data());
    // Independent double reference of sum_mu softmax(beta s)_mu xi_mu.
    std::vector<double> want(n, 0.0);
    double z = 0.0;
    for (int mu = 0; mu < k; ++mu) z += std::exp(beta * (s[mu] - top));
    for (int mu = 0; mu < k; ++mu) want[coord[mu]] += std::exp(beta * (s[mu] - top)) / z * s[mu];
    const double bound = internal::kNegligibleWeightMass * top;  // max |xi| = top
    for (int i = 0; i < n; ++i) {
      EXPECT_NEAR(acc[i] / sums.wsum, want[i], 1e-6 * std::fabs(want[i]) + bound) << "coordinate " << i
            << (precision == Precision::kF32 ? " f32" : " screened");
    }
    // The partition function still counts every row.
    EXPECT_NEAR(sums.log_scale + std::log(sums.wsum), beta * top + std::log(z), 1e-12 * top);
  }
}

// ValueAndNearest finds the row Bank::Nearest finds, from the same pass,
// on shapes that split into blocks and threads; bf16 banks defer to
// Bank::Nearest.
TEST(FusedPass, ValueAndNearestAgreesWithBankNearest) {
  std::mt19937_64 rng(17);
  const std::pair<int, int> shapes[] = {{3, 2}, {33, 17}, {784, 301}, {257, 4203}};
  for (auto [n, k] : shapes) {
    for (Precision precision : {Precision::kF32, Precision::kBf16, Precision::kBitPacked}) {
      const bool bipolar = precision == Precision::kBitPacked;
      auto xi = bipolar ? RandomBipolar(int64_t{k} * n, rng)
                        : RandomGaussian(int64_t{k} * n, rng, 1.f / std::sqrt(float(n)));
      // Unequal norms so the nearest row by L2 is not the best dot product.
      if (!bipolar) {
        for (int mu = 0; mu < k; ++mu) {
          const float f = 0.5f + 0.01f * static_cast<float>(mu % 97);
          for (int i = 0; i < n; ++i) xi[int64_t{mu} * n + i] *= f;
        }
      }
      for (auto family : {EnergyFamily::kLse, EnergyFamily::kGaussian, EnergyFamily::kClassical}) {
        if (bipolar && family == EnergyFamily::kLse) continue;
        if (!bipolar && family == EnergyFamily::kClassical) continue;
        EnergyConfig cfg{.family = family, .beta = 2.0};
        Bank bank(BankSpec{"b", n, bipolar ? StateKind::kBipolar : StateKind::kContinuous, cfg,
                           precision});
        bank.Append(xi, bank.AssignIds(k), {});
        EnergyFunction energy(cfg, bank.view());
        for (int trial = 0; trial < 4; ++trial) {
          std::vector<float> x = bipolar ? RandomBipolar(n, rng)
                                         : RandomGaussian(n, rng, 1.f / std::sqrt(float(n)));
          int64_t row = -2;
          const double e = energy.ValueAndNearest(x.data(), &row);
          if (precision == Precision::kBf16) {  // energy over bf16 rows: FusedTest
            EXPECT_EQ(row, -1);
            continue;
          }
          EXPECT_NEAR(e, energy.ReferenceValue(x.data()), 2e-5 * std::max(1.0, std::fabs(e)));
          // Independent double reference of argmin |x - xi|.
          int64_t want = -1;
          double best = INFINITY;
          for (int mu = 0; mu < k; ++mu) {
            double d2 = 0.0;
            for (int i = 0; i < n; ++i) {
              const double d = double{xi[int64_t{mu} * n + i]} - x[i];
              d2 += d * d;
            }
            if (d2 < best) {
              best = d2;
              want = mu;
            }
          }
          EXPECT_EQ(row, bank.Nearest(x.data()).row) << "n=" << n << " k=" << k;
          EXPECT_EQ(row, want) << "n=" << n << " k=" << k;
        }
      }
    }
  }
}

// Queries near stored patterns: pattern (q * stride) of `xi` plus gaussian
// noise of norm ~`noise`, for q < count.
std::vector<std::vector<float>> NoisyPatterns(const std::vector<float>& xi, int n, int count,
                                              int stride, float noise, std::mt19937_64& rng) {
  std::vector<std::vector<float>> qs;
  for (int q = 0; q < count; ++q) {
    std::vector<float> x(xi.begin() + int64_t{q} * stride * n,
                         xi.begin() + (int64_t{q} * stride + 1) * n);
    auto e = RandomGaussian(n, rng, noise / std::sqrt(float(n)));
    for (int i = 0; i < n; ++i) x[i] += e[i];
    qs.push_back(x);
  }
  return qs;
}

// A converged sync retrieval reports the nearest memory of its final state,
// found in its last pass, one query at a time and batched.
TEST(FusedPass, ConvergedRetrievalCarriesTheNearestRow) {
  std::mt19937_64 rng(23);
  const int n = 96, k = 500;
  auto xi = RandomGaussian(int64_t{k} * n, rng, 1.f / std::sqrt(float(n)));
  EnergyConfig cfg{.family = EnergyFamily::kLse, .beta = 30.0};
  Bank bank(BankSpec{"b", n, StateKind::kContinuous, cfg, Precision::kF32});
  bank.Append(xi, bank.AssignIds(k), {});
  EnergyFunction energy(cfg, bank.view());
  RetrieveOptions o;
  const std::vector<std::vector<float>> qs = NoisyPatterns(xi, n, 10, 7, 0.3f, rng);
  std::vector<BatchQuery> batch;
  for (const auto& q : qs) batch.push_back({q, {}, &o});
  auto batched = RunSyncBatch(energy, StateKind::kContinuous, batch);
  for (int q = 0; q < 10; ++q) {
    auto one = RunDynamics(energy, StateKind::kContinuous, qs[q], {}, o);
    ASSERT_TRUE(one.ok() && batched[q].ok());
    ASSERT_TRUE(one->converged());
    EXPECT_EQ(one->nearest_row, bank.Nearest(one->state.data()).row);
    EXPECT_EQ(one->nearest_row, q * 7);
    EXPECT_EQ(batched[q]->nearest_row, bank.Nearest(batched[q]->state.data()).row);
    const NearestMemory m = bank.NearestAt(one->nearest_row, one->state.data());
    const NearestMemory full = bank.Nearest(one->state.data());
    EXPECT_EQ(m.id, full.id);
    EXPECT_DOUBLE_EQ(m.distance, full.distance);
    EXPECT_DOUBLE_EQ(m.similarity, full.similarity);
  }
}

// Sync retrieval on bipolar banks reads each state's energy and nearest
// memory off the drive pass (one pass per step): both must equal the
// reference energy of the state and Bank::Nearest, for every bipolar family
// and precision, one query at a time and batched.
TEST(FusedPass, BipolarRetrievalEnergiesAndNearestFromTheDrivePass) {
  std::mt19937_64 rng(29);
  const int n = 100, k = 8;
  for (const FusedCase& c : FusedCases()) {
    if (c.kind != StateKind::kBipolar) continue;
    auto xi = RandomBipolar(int64_t{k} * n, rng);
    Bank bank(BankSpec{"b", n, c.kind, c.config, c.precision});
    bank.Append(xi, bank.AssignIds(k), {});
    EnergyFunction energy(c.config, bank.view());
    RetrieveOptions o;
    o.record_trace = true;
    std::vector<std::vector<float>> qs;
    std::vector<BatchQuery> batch;
    for (int q = 0; q < 9; ++q) qs.push_back(testing::FlipBits(xi.data() + int64_t{q % k} * n, n, 20, rng));
    for (const auto& q : qs) batch.push_back({q, {}, &o});
    auto batched = RunSyncBatch(energy, c.kind, batch);
    for (int q = 0; q < 9; ++q) {
      auto one = RunDynamics(energy, c.kind, qs[q], {}, o);
      ASSERT_TRUE(one.ok() && batched[q].ok()) << c.name;
      for (const auto* t : {&*one, &*batched[q]}) {
        const double e_end = energy.ReferenceValue(t->state.data());
        const double e_start = energy.ReferenceValue(qs[q].data());
        EXPECT_NEAR(t->energy_end, e_end, 1e-9 * std::max(1.0, std::fabs(e_end))) << c.name;
        EXPECT_NEAR(t->energy_start, e_start, 1e-9 * std::max(1.0, std::fabs(e_start))) << c.name;
        EXPECT_EQ(t->energy_trace.size(), static_cast<size_t>(t->steps) + 1) << c.name;
        EXPECT_EQ(t->nearest_row, bank.Nearest(t->state.data()).row) << c.name;
      }
    }
  }
}

// One sync step on a bit-packed bank against the Krotov-Hopfield update
// computed directly in the test (in double: exact for these integer sums): sigma_i <- sign(sum_mu
// F(r_mu + xi_mui) - F(r_mu - xi_mui)), r_mu = sum_{j != i} xi_muj sigma_j,
// the state kept where that sum is 0. Coordinates whose sum is within
// 1e-5 of the largest |sum| may round either way (f32 sums); every other
// coordinate must match on bits and on the f32 bank alike, and the energy
// and nearest memory reported for the new state must be its own. Classical
// (exact integer sums on bits), cubic and exponential energies; banks small
// enough for one thread and large enough to split over threads and blocks,
// N odd and even.
TEST(FusedPass, BitPackedStepIsTheKrotovHopfieldUpdate) {
  std::mt19937_64 rng(9);
  const EnergyConfig configs[] = {{.family = EnergyFamily::kClassical},
                                  {.family = EnergyFamily::kPolynomial, .degree = 3},
                                  {.family = EnergyFamily::kExponential, .beta = 0.05}};
  const std::pair<int, int> shapes[] = {{200, 12}, {784, 6000}, {333, 13000}};
  for (const EnergyConfig& cfg : configs) {
    auto F = [&](double s) -> double {
      switch (cfg.family) {
        case EnergyFamily::kClassical: return 0.5 * s * s;
        case EnergyFamily::kPolynomial: return s * s * s;
        default: return std::exp(cfg.beta * s);
      }
    };
    for (auto [n, k] : shapes) {
      auto xi = RandomBipolar(int64_t{k} * n, rng);
      Bank f32(BankSpec{"a", n, StateKind::kBipolar, cfg, Precision::kF32});
      Bank bits(BankSpec{"b", n, StateKind::kBipolar, cfg, Precision::kBitPacked});
      f32.Append(xi, f32.AssignIds(k), {});
      bits.Append(xi, bits.AssignIds(k), {});
      EXPECT_LT(bits.bytes(), f32.bytes() * 1.05);
      for (int q = 0; q < 2; ++q) {
        auto x = testing::FlipBits(xi.data() + int64_t{q} * n, n, n / 7, rng);
        std::vector<double> d(k, 0.0);
        for (int mu = 0; mu < k; ++mu) {
          for (int i = 0; i < n; ++i) d[mu] += xi[int64_t{mu} * n + i] * x[i];
        }
        std::vector<double> drive(n, 0.0);
        double top = 0.0;
        for (int i = 0; i < n; ++i) {
          for (int mu = 0; mu < k; ++mu) {
            const double e = xi[int64_t{mu} * n + i];
            const double r = d[mu] - e * x[i];
            drive[i] += F(r + e) - F(r - e);
          }
          top = std::max(top, std::fabs(drive[i]));
        }
        RetrieveOptions o;
        o.max_steps = 1;
        auto a = RunDynamics(EnergyFunction(cfg, f32.view()), StateKind::kBipolar, x, {}, o);
        auto b = RunDynamics(EnergyFunction(cfg, bits.view()), StateKind::kBipolar, x, {}, o);
        ASSERT_TRUE(a.ok() && b.ok());
        int decided = 0;
        for (int i = 0; i < n; ++i) {
          if (std::fabs(drive[i]) <= 1e-5 * top) continue;
          ++decided;
          const float want = drive[i] > 0 ? 1.f : -1.f;
          ASSERT_EQ(b->state[i], want) << "bits n=" << n << " k=" << k << " i=" << i;
          ASSERT_EQ(a->state[i], want) << "f32 n=" << n << " k=" << k << " i=" << i;
        }
        EXPECT_GT(decided, n / 2);
        // The energy and nearest memory of the state reached, from the pass at it.
        double e_ref = 0.0;
        int64_t best = 0;
        double best_d = -1e30;
        for (int mu = 0; mu < k; ++mu) {
          double dm = 0.0;
          for (int i = 0; i < n; ++i) dm += xi[int64_t{mu} * n + i] * b->state[i];
          e_ref -= F(dm);
          if (dm > best_d) {
            best_d = dm;
            best = mu;
          }
        }
        EXPECT_NEAR(b->energy_end, e_ref, 1e-9 * std::fabs(e_ref))
            << "n=" << n << " k=" << k;
        EXPECT_EQ(b->nearest_row, best) << "n=" << n << " k=" << k;
      }
    }
  }
}

}  // namespace
}  // namespace engram::core

namespace engram::core {
namespace {

// ---- Screened f32 banks ------------------------------------------------------

// Unit-norm rows (so a sharp beta separates the winner from the rest).
std::vector<float> UnitRows(int k, int n, std::mt19937_64& rng) {
  auto xi = RandomGaussian(int64_t{k} * n, rng);
  for (int mu = 0; mu < k; ++mu) {
    double sq = 0.0;
    for (int i = 0; i < n; ++i) sq += double{xi[int64_t{mu} * n + i]} * xi[int64_t{mu} * n + i];
    for (int i = 0; i < n; ++i) xi[int64_t{mu} * n + i] /= static_cast<float>(std::sqrt(sq));
  }
  return xi;
}

// The screen's per-row bound holds: the f32 dot kernel of every level is
// within err |x| + norm |x - x~| of the screened dot (row scale * state scale
// * the exact int8 dot, computed here from the stored int8 values), on rows
// of very different scales, one with a single large value, and states of
// different spreads.
TEST(Screen, ErrorBoundCoversTheF32DotAtEveryLevel) {
  std::mt19937_64 rng(41);
  for (int n : kDims) {
    const int k = 17;
    auto xi = RandomGaussian(int64_t{k} * n, rng);
    for (int mu = 0; mu < k; ++mu) {
      const float f = std::pow(10.f, static_cast<float>(mu % 7) - 3.f);
      for (int i = 0; i < n; ++i) xi[int64_t{mu} * n + i] *= f;
    }
    xi[int64_t{16} * n] = 1e3f;  // row 16: one value far above the rest
    Bank bank(BankSpec{"s", n, StateKind::kContinuous, {}, Precision::kF32Screened});
    bank.Append(xi, bank.AssignIds(k), {});
    const PatternView v = bank.view();
    ASSERT_NE(v.screen, nullptr);
    for (float spread : {3.f, 1e-3f}) {
      auto x = RandomGaussian(n, rng, spread);
      x[0] *= 50.f;
      // The state's int8 form, as the pass makes it.
      std::vector<int8_t> u(n);
      const double t = kernels::QuantizeToInt8(x.data(), n, u.data());
      double xn = 0.0, dx = 0.0;
      for (int i = 0; i < n; ++i) {
        xn += double{x[i]} * x[i];
        dx += (x[i] - t * u[i]) * (x[i] - t * u[i]);
      }
      xn = std::sqrt(xn);
      dx = std::sqrt(dx);
      for (const KernelTable* lvl : Levels()) {
        std::vector<float> f32(k);
        lvl->dot_rows(xi.data(), k, n, x.data(), f32.data());
        for (int r = 0; r < k; ++r) {
          int64_t d = 0;
          for (int i = 0; i < n; ++i) d += int64_t{v.screen[int64_t{r} * n + i]} * u[i];
          const double screened = double{v.screen_rows[r].scale} * t * d;
          EXPECT_LE(std::fabs(f32[r] - screened),
                    double{v.screen_rows[r].err} * xn + double{v.screen_rows[r].norm} * dx)
              << kernels::SimdLevelName(lvl->level) << " n=" << n << " r=" << r;
        }
      }
    }
  }
}

// A sharp softmax on a screened bank reads the f32 rows of only the rows
// that can matter: here every other row of the f32 matrix is NaN, and the
// results still equal the f32 bank's (energy, update target, nearest row),
// for dot and L2 similarities, on a bank split over threads.
TEST(Screen, SharpSoftmaxReadsOnlyTheRowsThatMatter) {
  std::mt19937_64 rng(43);
  const int n = 256, k = 8000;  // 8 MB: several threads
  const auto xi = UnitRows(k, n, rng);
  Bank plain(BankSpec{"p", n, StateKind::kContinuous, {}, Precision::kF32});
  Bank screened(BankSpec{"s", n, StateKind::kContinuous, {}, Precision::kF32Screened});
  for (Bank* b : {&plain, &screened}) b->Append(xi, b->AssignIds(k), {});
  for (const EnergyConfig& cfg : {EnergyConfig{.family = EnergyFamily::kLse, .beta = 80.0},
                                  EnergyConfig{.family = EnergyFamily::kGaussian, .beta = 80.0}}) {
    EnergyFunction f32(cfg, plain.view());
    for (const auto& x : NoisyPatterns(xi, n, 4, 1777, 0.3f, rng)) {
      // Rows whose log-weight is 60 below the largest are poisoned.
      std::vector<double> s(k);
      double top = -INFINITY;
      double sqx = 0.0;
      for (float c : x) sqx += double{c} * c;
      for (int mu = 0; mu < k; ++mu) {
        double d = 0.0, sq = 0.0;
        for (int i = 0; i < n; ++i) {
          d += double{xi[int64_t{mu} * n + i]} * x[i];
          sq += double{xi[int64_t{mu} * n + i]} * xi[int64_t{mu} * n + i];
        }
        s[mu] = cfg.beta * (cfg.family == EnergyFamily::kGaussian ? d - 0.5 * sq - 0.5 * sqx : d);
        top = std::max(top, s[mu]);
      }
      std::vector<float> poisoned = xi;
      int count = 0;
      for (int mu = 0; mu < k; ++mu) {
        if (s[mu] < top - 60.0) {
          std::fill(poisoned.begin() + int64_t{mu} * n, poisoned.begin() + int64_t{mu + 1} * n, NAN);
          ++count;
        }
      }
      ASSERT_GT(count, k * 9 / 10);
      PatternView v = screened.view();
      v.data = poisoned.data();
      EnergyFunction fast(cfg, v);
      std::vector<float> want(n), got(n);
      int64_t want_row = -1, got_row = -1;
      const double e_want = f32.UpdateTarget(x.data(), want.data(), &want_row);
      const double e_got = fast.UpdateTarget(x.data(), got.data(), &got_row);
      EXPECT_NEAR(e_got, e_want, 1e-9 * std::max(1.0, std::fabs(e_want)));
      EXPECT_LT(RelInf(got, want), 1e-5);
      EXPECT_EQ(got_row, want_row);
      EXPECT_EQ(got_row, plain.Nearest(x.data()).row);
      int64_t row = -1;
      EXPECT_NEAR(fast.ValueAndNearest(x.data(), &row), e_want,
                  1e-9 * std::max(1.0, std::fabs(e_want)));
      EXPECT_EQ(row, want_row);
    }
  }
}

// With a flat softmax the screen cannot narrow the rows: the pass runs on
// the f32 rows and gives exactly the f32 bank's results.
TEST(Screen, FlatSoftmaxFallsBackToTheF32Pass) {
  std::mt19937_64 rng(47);
  const int n = 64, k = 3000;
  const auto xi = UnitRows(k, n, rng);
  Bank plain(BankSpec{"p", n, StateKind::kContinuous, {}, Precision::kF32});
  Bank screened(BankSpec{"s", n, StateKind::kContinuous, {}, Precision::kF32Screened});
  for (Bank* b : {&plain, &screened}) b->Append(xi, b->AssignIds(k), {});
  const EnergyConfig cfg{.family = EnergyFamily::kLse, .beta = 0.5};
  EnergyFunction f32(cfg, plain.view()), fast(cfg, screened.view());
  const auto x = RandomGaussian(n, rng, 0.2f);
  std::vector<float> want(n), got(n);
  EXPECT_EQ(fast.UpdateTarget(x.data(), got.data()), f32.UpdateTarget(x.data(), want.data()));
  EXPECT_EQ(got, want);
}

// Retrieval to convergence on a screened bank ends where it ends on the f32
// bank: same steps, stop reason and nearest memory.
TEST(Screen, RetrievalEqualsF32Retrieval) {
  std::mt19937_64 rng(53);
  const int n = 128, k = 5000;
  const auto xi = UnitRows(k, n, rng);
  const EnergyConfig cfg{.family = EnergyFamily::kLse, .beta = 60.0};
  Bank plain(BankSpec{"p", n, StateKind::kContinuous, cfg, Precision::kF32});
  Bank screened(BankSpec{"s", n, StateKind::kContinuous, cfg, Precision::kF32Screened});
  for (Bank* b : {&plain, &screened}) b->Append(xi, b->AssignIds(k), {});
  EnergyFunction f32(cfg, plain.view()), fast(cfg, screened.view());
  RetrieveOptions o;
  for (const auto& q : NoisyPatterns(xi, n, 6, 811, 0.4f, rng)) {
    auto want = RunDynamics(f32, StateKind::kContinuous, q, {}, o);
    auto got = RunDynamics(fast, StateKind::kContinuous, q, {}, o);
    ASSERT_TRUE(want.ok() && got.ok());
    EXPECT_EQ(got->steps, want->steps);
    EXPECT_EQ(got->stop_reason, want->stop_reason);
    EXPECT_EQ(got->nearest_row, want->nearest_row);
    EXPECT_LT(RelInf(got->state, want->state), 1e-5);
    EXPECT_NEAR(got->energy_end, want->energy_end, 1e-9 * std::max(1.0, std::fabs(want->energy_end)));
  }
}

// Batched sync retrieval (sgemm) equals one-at-a-time retrieval: same final
// states, steps, stop reasons and energies to float tolerance, with
// per-query options.
TEST(SyncBatch, EqualsSequentialRetrievalForEveryFamily) {
  std::mt19937_64 rng(21);
  for (const FusedCase& c : FusedCases()) {
    // UHN dot-product separations without normalisation grow |x| without
    // bound under sync; float differences then grow with it.
    if (c.name == "uhn_dot_poly" || c.name == "uhn_dot_identity") continue;
    const bool bipolar = c.kind == StateKind::kBipolar;
    const int n = bipolar ? 129 : 65, k = bipolar ? 9 : 300;
    auto xi = bipolar ? RandomBipolar(int64_t{k} * n, rng)
                      : RandomGaussian(int64_t{k} * n, rng, 1.f / std::sqrt(float(n)));
    Bank bank(BankSpec{"b", n, c.kind, c.config, c.precision});
    bank.Append(xi, bank.AssignIds(k), {});
    EnergyFunction energy(c.config, bank.view());
    const int b = 12;  // above the sgemm threshold, falling below it as queries converge
    std::vector<std::vector<float>> qs;
    std::vector<RetrieveOptions> opts(b);
    std::vector<std::vector<bool>> clamps(b);
    std::unique_ptr<bool[]> clamp_mem(new bool[n]);
    for (int i = 0; i < n; ++i) clamp_mem[i] = i < n / 4;
    for (int q = 0; q < b; ++q) {
      std::vector<float> x(xi.begin() + int64_t{q % k} * n, xi.begin() + int64_t{q % k + 1} * n);
      if (bipolar) {
        x = testing::FlipBits(x.data(), n, n / 8, rng);
      } else {
        auto noise = RandomGaussian(n, rng, 0.5f / std::sqrt(float(n)));
        for (int i = 0; i < n; ++i) x[i] += noise[i];
      }
      qs.push_back(x);
      opts[q].max_steps = q == 3 ? 1 : 50;  // one query stops early
      opts[q].record_trace = true;
    }
    std::vector<BatchQuery> batch;
    for (int q = 0; q < b; ++q) {
      absl::Span<const bool> cl;
      if (q == 2) cl = absl::MakeConstSpan(clamp_mem.get(), n);
      batch.push_back({qs[q], cl, &opts[q]});
    }
    auto got = RunSyncBatch(energy, c.kind, batch);
    ASSERT_EQ(got.size(), static_cast<size_t>(b));
    for (int q = 0; q < b; ++q) {
      auto want = RunDynamics(energy, c.kind, qs[q], batch[q].clamp, opts[q]);
      ASSERT_TRUE(want.ok() && got[q].ok()) << c.name;
      EXPECT_EQ(got[q]->stop_reason, want->stop_reason) << c.name << " q=" << q;
      EXPECT_EQ(got[q]->steps, want->steps) << c.name << " q=" << q;
      EXPECT_LT(RelInf(got[q]->state, want->state), 1e-4) << c.name << " q=" << q;
      EXPECT_NEAR(got[q]->energy_end, want->energy_end,
                  2e-5 * std::max(1.0, std::fabs(want->energy_end))) << c.name;
      EXPECT_EQ(got[q]->energy_trace.size(), want->energy_trace.size()) << c.name;
      EXPECT_EQ(got[q]->lyapunov_violations, 0) << c.name;
      if (q == 2) {
        for (int i = 0; i < n / 4; ++i) EXPECT_EQ(got[q]->state[i], qs[q][i]);
      }
    }
  }
}

// Continuous batching: queries admitted between steps end exactly as if run
// alone, and a finished query leaves the batch at once (the batch holds only
// the queries still running).
TEST(SyncBatch, QueriesAdmittedAtStepBoundariesEndAsIfRunAlone) {
  std::mt19937_64 rng(31);
  const int n = 48, k = 200;
  auto xi = RandomGaussian(int64_t{k} * n, rng, 1.f / std::sqrt(float(n)));
  EnergyConfig cfg{.family = EnergyFamily::kLse, .beta = 6.0};
  Bank bank(BankSpec{"b", n, StateKind::kContinuous, cfg, Precision::kF32});
  bank.Append(xi, bank.AssignIds(k), {});
  EnergyFunction energy(cfg, bank.view());
  RetrieveOptions o;
  o.record_trace = true;
  const std::vector<std::vector<float>> qs = NoisyPatterns(xi, n, 16, 11, 0.6f, rng);
  std::vector<absl::StatusOr<Trajectory>> got(16, absl::UnknownError("not run"));
  int64_t finished = 0;
  SyncBatch batch(energy, StateKind::kContinuous, [&](uint64_t tag, absl::StatusOr<Trajectory> r) {
    got[tag] = std::move(r);
    ++finished;
  });
  for (int q = 0; q < 10; ++q) batch.Admit(q, {qs[q], {}, &o});
  int steps = 0, next = 10;
  while (!batch.empty()) {
    if (++steps <= 2) {
      for (int j = 0; j < 3; ++j, ++next) batch.Admit(next, {qs[next], {}, &o});
    }
    EXPECT_EQ(batch.size(), next - finished);
    batch.Step();
  }
  ASSERT_EQ(finished, 16);
  for (int q = 0; q < 16; ++q) {
    auto want = RunDynamics(energy, StateKind::kContinuous, qs[q], {}, o);
    ASSERT_TRUE(want.ok() && got[q].ok()) << q;
    EXPECT_EQ(got[q]->steps, want->steps) << q;
    EXPECT_EQ(got[q]->stop_reason, want->stop_reason) << q;
    EXPECT_LT(RelInf(got[q]->state, want->state), 1e-4) << q;
    EXPECT_NEAR(got[q]->energy_start, want->energy_start, 1e-6 * std::max(1.0, std::fabs(want->energy_start))) << q;
    EXPECT_EQ(got[q]->energy_trace.size(), want->energy_trace.size()) << q;
    EXPECT_EQ(got[q]->nearest_row, bank.Nearest(got[q]->state.data()).row) << q;
  }
}

TEST(SyncBatch, ReportsBadQueriesInTheirSlotAndRunsTheRest) {
  std::mt19937_64 rng(5);
  const int n = 16, k = 4;
  auto xi = RandomGaussian(int64_t{k} * n, rng);
  Bank bank(BankSpec{"b", n, StateKind::kContinuous, {}, Precision::kF32});
  bank.Append(xi, bank.AssignIds(k), {});
  EnergyFunction energy(EnergyConfig{.family = EnergyFamily::kLse, .beta = 4.0}, bank.view());
  RetrieveOptions good, gradient;
  gradient.dynamics = Dynamics::kGradient;
  std::vector<float> short_query(n - 1, 0.f);
  std::vector<BatchQuery> batch = {{absl::MakeConstSpan(xi.data(), n), {}, &good},
                                   {short_query, {}, &good},
                                   {absl::MakeConstSpan(xi.data(), n), {}, &gradient}};
  auto got = RunSyncBatch(energy, StateKind::kContinuous, batch);
  EXPECT_TRUE(got[0].ok());
  EXPECT_EQ(got[1].status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(got[2].status().code(), absl::StatusCode::kInvalidArgument);
}

// A batch large enough that its per-state work (|x|^2 and hint rows before
// the pass, the finite check and the move after it) is split over threads:
// every query ends as it does alone, including one clamped, one stopped at
// max_steps and one that diverges (NaN).
TEST(SyncBatch, LargeBatchEndsAsEachQueryAlone) {
  std::mt19937_64 rng(41);
  const int n = 1024, k = 40, b = 72;
  auto xi = RandomGaussian(int64_t{k} * n, rng, 1.f / std::sqrt(float(n)));
  EnergyConfig cfg{.family = EnergyFamily::kLse, .beta = 20.0};
  Bank bank(BankSpec{"b", n, StateKind::kContinuous, cfg, Precision::kF32});
  bank.Append(xi, bank.AssignIds(k), {});
  EnergyFunction energy(cfg, bank.view());
  std::vector<std::vector<float>> qs = NoisyPatterns(xi, n, k, 1, 0.4f, rng);
  for (int q = k; q < b; ++q) qs.push_back(RandomGaussian(n, rng, 1.f / std::sqrt(float(n))));
  qs[7][100] = std::nanf("");
  std::vector<RetrieveOptions> opts(b);
  opts[3].max_steps = 1;
  std::unique_ptr<bool[]> clamp_mem(new bool[n]);
  for (int i = 0; i < n; ++i) clamp_mem[i] = i % 3 == 0;
  std::vector<BatchQuery> batch;
  for (int q = 0; q < b; ++q) {
    absl::Span<const bool> cl;
    if (q == 5) cl = absl::MakeConstSpan(clamp_mem.get(), n);
    batch.push_back({qs[q], cl, &opts[q]});
  }
  auto got = RunSyncBatch(energy, StateKind::kContinuous, batch);
  ASSERT_EQ(got.size(), static_cast<size_t>(b));
  std::set<StopReason> reasons;
  for (int q = 0; q < b; ++q) {
    auto want = RunDynamics(energy, StateKind::kContinuous, qs[q], batch[q].clamp, opts[q]);
    ASSERT_TRUE(want.ok() && got[q].ok()) << q;
    reasons.insert(want->stop_reason);
    EXPECT_EQ(got[q]->stop_reason, want->stop_reason) << q;
    EXPECT_EQ(got[q]->steps, want->steps) << q;
    if (want->stop_reason == StopReason::kDiverged) continue;
    EXPECT_LT(RelInf(got[q]->state, want->state), 1e-4) << q;
    EXPECT_NEAR(got[q]->energy_end, want->energy_end,
                2e-5 * std::max(1.0, std::fabs(want->energy_end))) << q;
    EXPECT_EQ(got[q]->nearest_row, want->nearest_row) << q;
  }
  EXPECT_EQ(got[7]->stop_reason, StopReason::kDiverged);
  EXPECT_EQ(got[3]->stop_reason, StopReason::kMaxSteps);
  EXPECT_TRUE(reasons.count(StopReason::kConverged));
  for (int i = 0; i < n; i += 3) ASSERT_EQ(got[5]->state[i], qs[5][i]);
}

}  // namespace
}  // namespace engram::core
