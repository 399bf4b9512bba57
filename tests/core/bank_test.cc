#include "engram/core/bank.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include <gtest/gtest.h>

#include "testing/random_banks.h"
#include "testing/status_matchers.h"

namespace engram::core {
namespace {

using engram::testing::RandomGaussian;
using engram::testing::StatusIs;

// v rounded to bf16, to nearest even (v finite).
uint16_t Bf16Of(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

Bank Continuous(int dim) {
  return Bank(BankSpec{"b", dim, StateKind::kContinuous, {}, Precision::kF32});
}

TEST(BankName, AcceptsTheSpecGrammar) {
  EXPECT_OK(ValidateBankName("a"));
  EXPECT_OK(ValidateBankName("fashion-mnist_v1.2"));
  EXPECT_OK(ValidateBankName(std::string(64, 'z')));
}

TEST(BankName, RejectsEverythingElse) {
  const std::vector<std::string> bads = {"",  "-a",  "_a",     ".a",
                                        "A", "a/b", "../etc", "a b",
                                        std::string(65, 'a'),
                                        std::string("a\0b", 3)};
  for (const std::string& bad : bads) {
    EXPECT_THAT(ValidateBankName(bad), StatusIs(absl::StatusCode::kInvalidArgument))
        << bad;
  }
}

TEST(BankSpec, RejectsBadDimAndPrecision) {
  BankSpec spec{"ok", 0, StateKind::kContinuous, {}, Precision::kF32};
  EXPECT_THAT(ValidateBankSpec(spec), StatusIs(absl::StatusCode::kInvalidArgument));
  spec.dim = 4;
  spec.precision = Precision::kBf16;
  EXPECT_OK(ValidateBankSpec(spec));
  // Bit packing stores +-1 values only.
  spec.precision = Precision::kBitPacked;
  EXPECT_THAT(ValidateBankSpec(spec), StatusIs(absl::StatusCode::kFailedPrecondition));
  spec.kind = StateKind::kBipolar;
  spec.energy.family = EnergyFamily::kClassical;
  EXPECT_OK(ValidateBankSpec(spec));
}

TEST(BankValidate, RejectsBadBatches) {
  Bank bank = Continuous(3);
  const std::vector<float> two = {1, 2, 3, 4, 5, 6};
  EXPECT_OK(bank.ValidateNewPatterns(two, {}, {}));
  EXPECT_THAT(bank.ValidateNewPatterns({}, {}, {}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(bank.ValidateNewPatterns({1, 2, 3, 4}, {}, {}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(bank.ValidateNewPatterns({1, NAN, 3}, {}, {}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(bank.ValidateNewPatterns({1, INFINITY, 3}, {}, {}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  const std::vector<uint64_t> dup = {5, 5};
  EXPECT_THAT(bank.ValidateNewPatterns(two, dup, {}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  const std::vector<uint64_t> one = {5};
  EXPECT_THAT(bank.ValidateNewPatterns(two, one, {}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  const std::vector<std::string> big = {std::string(kMaxPayloadBytes + 1, 'x'), ""};
  EXPECT_THAT(bank.ValidateNewPatterns(two, {}, big),
              StatusIs(absl::StatusCode::kInvalidArgument));
  const std::vector<uint64_t> ids = {7, 9};
  bank.Append(two, ids, {});
  const std::vector<uint64_t> again = {9};
  EXPECT_THAT(bank.ValidateNewPatterns({0, 0, 0}, again, {}),
              StatusIs(absl::StatusCode::kAlreadyExists));
}

TEST(BankValidate, BipolarAcceptsOnlyPlusMinusOne) {
  Bank bank(BankSpec{"b", 2, StateKind::kBipolar,
                     {.family = EnergyFamily::kClassical}, Precision::kF32});
  EXPECT_OK(bank.ValidateNewPatterns({1, -1}, {}, {}));
  EXPECT_THAT(bank.ValidateNewPatterns({1, 0}, {}, {}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(bank.ValidateNewPatterns({1, 0.5f}, {}, {}),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(Bank, AssignsFreshIdsAndRemovesInOrder) {
  Bank bank = Continuous(2);
  const std::vector<uint64_t> given = {3};
  bank.Append({1, 1}, given, {});
  auto ids = bank.AssignIds(3);
  EXPECT_EQ(ids, (std::vector<uint64_t>{4, 5, 6}));
  const std::vector<std::string> payloads = {"a", "b", "c"};
  bank.Append({2, 2, 3, 3, 4, 4}, ids, payloads);
  ASSERT_EQ(bank.size(), 4);
  const std::vector<uint64_t> drop = {4};
  EXPECT_THAT(bank.ValidateRemoval(std::vector<uint64_t>{4, 99}),
              StatusIs(absl::StatusCode::kNotFound));
  ASSERT_OK(bank.ValidateRemoval(drop));
  bank.Remove(drop);
  ASSERT_EQ(bank.size(), 3);
  EXPECT_EQ(bank.id(0), 3u);
  EXPECT_EQ(bank.id(1), 5u);
  EXPECT_EQ(bank.payload(1), "b");
  EXPECT_EQ(bank.pattern(2)[0], 4.f);
  EXPECT_EQ(*bank.RowOf(6), 2);
  EXPECT_FALSE(bank.RowOf(4).has_value());
  // Removed ids are not handed out again while higher ids exist.
  EXPECT_EQ(bank.AssignIds(1), (std::vector<uint64_t>{7}));
}

// An id map copied along the way answers for the ids inserted before its
// copy and none after, whatever the merges of the original since.
TEST(IdRowMap, CopiesSeeExactlyTheIdsInsertedBeforeThem) {
  IdRowMap map;
  std::vector<std::pair<int64_t, IdRowMap>> copies;
  const int64_t total = 70000;
  auto id_of = [](int64_t row) { return static_cast<uint64_t>(row) * 7919 + 3; };
  for (int64_t row = 0; row < total; ++row) {
    map.Insert(id_of(row), row);
    if (row == 999 || row == 1023 || row == 5000 || row == 40000) copies.emplace_back(row + 1, map);
  }
  for (int64_t row = 0; row < total; row += 13) EXPECT_EQ(map.Find(id_of(row)), row);
  EXPECT_FALSE(map.contains(id_of(total)));
  EXPECT_FALSE(map.contains(4));
  for (const auto& [size, copy] : copies) {
    for (int64_t row = 0; row < total; row += 11) {
      if (row < size) {
        EXPECT_EQ(copy.Find(id_of(row)), row) << size;
      } else {
        EXPECT_FALSE(copy.contains(id_of(row))) << size << " " << row;
      }
    }
  }
}

// Copies of a bank share their rows: appending to a copy writes only the new
// rows (the original's memory is read by both), the original sees nothing
// of it, and two copies growing from the same bank do not write over each
// other (the second moves to its own buffer).
TEST(Bank, CopiesShareRowsAndGrowWithoutTouchingEachOther) {
  const int n = 3;
  Bank a(BankSpec{"b", n, StateKind::kContinuous, {}, Precision::kBf16});
  std::vector<uint64_t> ids(40);
  std::vector<float> rows(40 * n);
  std::vector<std::string> payloads(40);
  std::vector<Labels> labels(40);
  for (int r = 0; r < 40; ++r) {
    ids[r] = 100 + r;
    payloads[r] = "p" + std::to_string(r);
    labels[r].ints = {{"r", r}};
    for (int i = 0; i < n; ++i) rows[r * n + i] = static_cast<float>(r * 10 + i);
  }
  auto append = [&](Bank& bank, int from, int to) {
    bank.Append(absl::MakeConstSpan(rows).subspan(from * n, (to - from) * n),
                absl::MakeConstSpan(ids).subspan(from, to - from),
                absl::MakeConstSpan(payloads).subspan(from, to - from),
                PatternExtras{.labels = absl::MakeConstSpan(labels).subspan(from, to - from)});
  };
  // Row r of a bank holding rows [0, k) of the batch above.
  auto expect_rows = [&](const Bank& bank, int k) {
    ASSERT_EQ(bank.size(), k);
    for (int r = 0; r < k; ++r) {
      EXPECT_EQ(bank.id(r), ids[r]);
      EXPECT_EQ(bank.payload(r), payloads[r]);
      EXPECT_EQ(bank.pattern(r)[n - 1], rows[r * n + n - 1]);
      EXPECT_EQ(bank.view().bf16[r * n + 1], Bf16Of(rows[r * n + 1]));
      EXPECT_EQ(bank.view().sq_norms[r],
                static_cast<float>(double{rows[r * n]} * rows[r * n] +
                                   double{rows[r * n + 1]} * rows[r * n + 1] +
                                   double{rows[r * n + 2]} * rows[r * n + 2]));
      EXPECT_EQ(bank.RowOf(ids[r]), r);
      ASSERT_EQ(bank.RowsWithInt("r").size(), static_cast<size_t>(k));
      EXPECT_EQ(bank.RowsWithInt("r")[r], (std::pair<int64_t, int64_t>{r, r}));
    }
    for (int r = k; r < 40; ++r) EXPECT_FALSE(bank.RowOf(ids[r]).has_value()) << r;
  };
  append(a, 0, 20);  // a's buffers hold 20 rows with room for more
  append(a, 20, 21);
  Bank b = a;
  append(b, 21, 25);
  EXPECT_TRUE(b.SharesRowsWith(a));
  expect_rows(a, 21);
  expect_rows(b, 25);
  // a's next rows would land where b's are: a moves to a buffer of its own.
  Bank c = a;
  append(c, 21, 23);
  EXPECT_FALSE(c.SharesRowsWith(a));
  expect_rows(b, 25);
  expect_rows(c, 23);
  expect_rows(a, 21);
  EXPECT_NE(a.version(), b.version());
  EXPECT_NE(b.version(), c.version());
  // Removing from a copy leaves the others as they were.
  Bank d = b;
  d.Remove(std::vector<uint64_t>{ids[24], ids[23]});
  EXPECT_FALSE(d.SharesRowsWith(b));
  expect_rows(d, 23);
  expect_rows(b, 25);
  EXPECT_EQ(d.bytes(), c.bytes());  // the same 23 rows, whatever the path
}

// A screened bank keeps an int8 copy and per-row scales, bounds and sums
// that stay in step with its rows through removals; its bytes count them.
TEST(Bank, ScreenedBankKeepsItsScreenInStepWithTheRows) {
  const int n = 5;
  Bank plain = Continuous(n);
  Bank screened(BankSpec{"s", n, StateKind::kContinuous, {}, Precision::kF32Screened});
  std::mt19937_64 rng(4);
  const auto data = RandomGaussian(4 * n, rng);
  for (Bank* b : {&plain, &screened}) b->Append(data, b->AssignIds(4), {});
  EXPECT_EQ(screened.bytes(), plain.bytes() + 4 * n + 4 * (3 * 4 + 4));
  EXPECT_EQ(plain.view().screen, nullptr);
  const std::vector<uint64_t> drop = {2};
  screened.Remove(drop);
  const PatternView v = screened.view();
  ASSERT_NE(v.screen, nullptr);
  ASSERT_NE(v.screen_rows, nullptr);
  ASSERT_NE(v.screen_sums, nullptr);
  EXPECT_EQ(v.bf16, nullptr);  // results come from the f32 rows
  ASSERT_EQ(v.rows, 3);
  for (int64_t r = 0; r < v.rows; ++r) {
    double m = 0.0, sq = 0.0;
    for (int i = 0; i < n; ++i) {
      m = std::max(m, std::fabs(double{v.data[r * n + i]}));
      sq += double{v.data[r * n + i]} * v.data[r * n + i];
    }
    const ScreenRow& sr = v.screen_rows[r];
    EXPECT_NEAR(sr.scale, m / 127.0, 1e-6 * m) << r;
    double d2 = 0.0, q2 = 0.0;
    int32_t sum = 0;
    for (int i = 0; i < n; ++i) {
      const int q = v.screen[r * n + i];
      EXPECT_EQ(q, static_cast<int>(std::nearbyint(v.data[r * n + i] / sr.scale))) << r << " " << i;
      const double t = double{sr.scale} * q;
      d2 += (v.data[r * n + i] - t) * (v.data[r * n + i] - t);
      q2 += t * t;
      sum += q;
    }
    EXPECT_EQ(v.screen_sums[r], sum) << r;
    EXPECT_GE(sr.err, std::sqrt(d2) + (n / 4.0 + 8.0) * 0x1p-24 * std::sqrt(sq)) << r;
    EXPECT_LE(sr.err, 2.0 * std::sqrt(d2) + 1e-6) << r;
    EXPECT_GE(sr.norm, std::sqrt(q2)) << r;
  }
}

TEST(Bank, NearestMatchesBruteForce) {
  std::mt19937_64 rng(31);
  const int n = 17, k = 300;
  auto data = RandomGaussian(k * n, rng);
  Bank bank = Continuous(n);
  bank.Append(data, bank.AssignIds(k), {});
  for (int q = 0; q < 50; ++q) {
    auto x = RandomGaussian(n, rng);
    int best = -1;
    double best_d = INFINITY;
    for (int mu = 0; mu < k; ++mu) {
      double d = 0;
      for (int i = 0; i < n; ++i) d += std::pow(double{data[mu * n + i]} - x[i], 2);
      if (d < best_d) { best_d = d; best = mu; }
    }
    NearestMemory m = bank.Nearest(x.data());
    EXPECT_EQ(m.row, best);
    EXPECT_NEAR(m.distance, std::sqrt(best_d), 1e-9);
  }
}

}  // namespace
}  // namespace engram::core
