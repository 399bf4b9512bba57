// Google Benchmark microbenchmarks of the core kernels and of one Retrieve /
// Sample through gRPC (in-process channel and TCP loopback).
//
//   build/bench/engram_bench --benchmark_repetitions=5 \
//       --benchmark_report_aggregates_only=true
#include <cmath>
#include <filesystem>
#include <random>

#include <benchmark/benchmark.h>
#include <grpcpp/grpcpp.h>

#include "engram/core/dynamics.h"
#include "engram/core/filter.h"
#include "engram/core/readout.h"
#include "engram/core/registry.h"
#include "engram/core/sampler.h"
#include "kernels/kernels.h"
#include "engram/v1/engram.grpc.pb.h"
#include "server/server.h"

namespace {

using namespace engram;

core::Bank RandomBank(int n, int k, core::StateKind kind, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<float> data(static_cast<size_t>(n) * k);
  std::normal_distribution<float> g;
  for (auto& v : data) v = kind == core::StateKind::kBipolar ? ((rng() & 1) ? 1.f : -1.f) : g(rng);
  core::Bank bank(core::BankSpec{"bench", n, kind, {}, core::Precision::kF32});
  bank.Append(data, bank.AssignIds(k), {});
  return bank;
}

// K gaussian rows of dimension N scaled to unit norm, in a continuous bank.
core::Bank UnitNormBank(int n, int k, uint64_t seed,
                        core::Precision precision = core::Precision::kF32) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g;
  std::vector<float> data(static_cast<size_t>(n) * k);
  for (int64_t r = 0; r < k; ++r) {
    double sq = 0.0;
    for (int i = 0; i < n; ++i) sq += std::pow(data[r * n + i] = g(rng), 2);
    for (int i = 0; i < n; ++i) data[r * n + i] /= std::sqrt(sq);
  }
  core::Bank bank(core::BankSpec{"bench", n, core::StateKind::kContinuous, {}, precision});
  bank.Append(data, bank.AssignIds(k), {});
  return bank;
}

// One sync step of the lse energy (scores, softmax, weighted sum), one query.
void BM_LseSyncStep(benchmark::State& state) {
  const int n = state.range(0), k = state.range(1);
  core::Bank bank = RandomBank(n, k, core::StateKind::kContinuous, 1);
  core::EnergyConfig cfg{.family = core::EnergyFamily::kLse, .beta = 0.05};
  core::EnergyFunction energy(cfg, bank.view());
  std::vector<float> x(bank.pattern(3), bank.pattern(3) + n), out(n);
  for (auto _ : state) {
    benchmark::DoNotOptimize(energy.UpdateTarget(x.data(), out.data()));
  }
  state.SetBytesProcessed(state.iterations() * int64_t{n} * k * 4);
}
BENCHMARK(BM_LseSyncStep)->Args({784, 10000})->Args({784, 1000})->Args({4096, 10000})
    ->Unit(benchmark::kMicrosecond)->UseRealTime();

// The value readout of a key -> value bank (M = arg 2) at one state: the
// scores pass plus the weighted sum of values, next to BM_LseSyncStep's
// step on the same bank shape; arg 3 = 1 reads out a sparsemax bank
// (beta 40), which sums the values of its support only.
void BM_ValueReadout(benchmark::State& state) {
  const int n = state.range(0), k = state.range(1), m = state.range(2);
  const bool sparse = state.range(3) == 1;
  core::Bank keys = RandomBank(n, k, core::StateKind::kContinuous, 1);
  std::mt19937_64 rng(3);
  std::normal_distribution<float> g;
  std::vector<float> data(keys.pattern(0), keys.pattern(0) + int64_t{k} * n), values(int64_t{k} * m);
  for (float& v : values) v = g(rng);
  core::Bank bank(core::BankSpec{"bench", n, core::StateKind::kContinuous, {},
                                 core::Precision::kF32, m});
  bank.Append(data, bank.AssignIds(k), {}, core::PatternExtras{values, {}, {}});
  const core::EnergyConfig cfg =
      sparse ? core::EnergyConfig{.family = core::EnergyFamily::kGeneral, .beta = 40.0,
                                  .separation = core::SeparationKind::kSparsemax}
             : core::EnergyConfig{.family = core::EnergyFamily::kLse, .beta = 0.05};
  core::EnergyFunction energy(cfg, bank.view());
  std::vector<float> x(bank.pattern(3), bank.pattern(3) + n), out(m);
  for (auto _ : state) {
    core::ValueReadout(energy, bank.value(0), m, x.data(), out.data());
    benchmark::DoNotOptimize(out.data());
  }
}
BENCHMARK(BM_ValueReadout)->Args({784, 10000, 16, 0})->Args({784, 10000, 784, 0})
    ->Args({784, 10000, 16, 1})->Args({784, 10000, 784, 1})
    ->Unit(benchmark::kMicrosecond)->UseRealTime();

// One step of a compact-support separation (arg 0: 0 sparsemax, 1 1.5-entmax,
// 2 log-sum-ReLU with the -|x - xi|^2 / 2 similarity) from a pattern plus
// noise of norm ~0.3 on unit-norm rows of 784 x arg 1, beta = arg 2, through
// the compact pass (arg 3 = 1) or the reference over every row (0).
void BM_CompactStep(benchmark::State& state) {
  const int n = 784, k = state.range(1);
  const core::SeparationKind sep = state.range(0) == 0   ? core::SeparationKind::kSparsemax
                                   : state.range(0) == 1 ? core::SeparationKind::kEntmax15
                                                         : core::SeparationKind::kLogSumRelu;
  const bool compact = state.range(3) != 0;
  core::Bank bank = UnitNormBank(n, k, 6);
  std::mt19937_64 rng(7);
  std::normal_distribution<float> g;
  core::EnergyConfig cfg{.family = core::EnergyFamily::kGeneral,
                         .beta = static_cast<double>(state.range(2)),
                         .similarity = sep == core::SeparationKind::kLogSumRelu
                                           ? core::SimilarityKind::kNegHalfSqL2
                                           : core::SimilarityKind::kDot,
                         .separation = sep};
  core::EnergyFunction energy(cfg, bank.view());
  std::vector<float> x(bank.pattern(k / 2), bank.pattern(k / 2) + n), out(n);
  for (auto& v : x) v += g(rng) * 0.3f / std::sqrt(n);
  for (auto _ : state) {
    benchmark::DoNotOptimize(compact ? energy.UpdateTarget(x.data(), out.data())
                                     : energy.ReferenceUpdateTarget(x.data(), out.data()));
  }
  state.SetBytesProcessed(state.iterations() * int64_t{n} * k * 4);
  state.SetLabel(compact ? "compact" : "reference");
}
BENCHMARK(BM_CompactStep)->ArgsProduct({{0, 1}, {10000}, {40}, {0, 1}})
    ->Args({2, 10000, 10, 0})->Args({2, 10000, 10, 1})
    ->Args({0, 100000, 40, 0})->Args({0, 100000, 40, 1})
    ->Unit(benchmark::kMicrosecond)->UseRealTime();

// One lse sync step (beta 0.05) on a 784 x 10^4 bank without decay (arg 0)
// and on a bank whose weights decay with age (arg 1): the prior of the
// call's time (Bank::LogPrior) and the two-pass reference evaluation that
// reads it.
void BM_DecayStep(benchmark::State& state) {
  const int n = 784, k = 10000;
  const bool decay = state.range(0) == 1;
  core::Bank plain = RandomBank(n, k, core::StateKind::kContinuous, 1);
  const core::EnergyConfig cfg{.family = core::EnergyFamily::kLse, .beta = 0.05};
  core::BankSpec spec{"bench", n, core::StateKind::kContinuous, cfg, core::Precision::kF32};
  spec.decay_half_life_ms = decay ? 3'600'000 : 0;
  core::Bank bank(spec);
  std::vector<int64_t> stored(k);
  for (int r = 0; r < k; ++r) stored[r] = int64_t{1'700'000'000'000} + r * 1'000;
  bank.Append(absl::MakeConstSpan(plain.pattern(0), int64_t{k} * n), bank.AssignIds(k), {},
              core::PatternExtras{{}, {}, {}, stored});
  std::vector<float> x(bank.pattern(3), bank.pattern(3) + n), out(n);
  for (auto _ : state) {
    const std::vector<double> prior = bank.LogPrior(int64_t{1'700'000'000'000} + k * 1'000);
    core::PatternView view = bank.view();
    if (!prior.empty()) view.log_prior = prior.data();
    core::EnergyFunction energy(cfg, view);
    benchmark::DoNotOptimize(energy.UpdateTarget(x.data(), out.data()));
  }
}
BENCHMARK(BM_DecayStep)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond)->UseRealTime();

// A Store of one row into a 784 x 20 000 bank (SQLite storage on the temp
// directory), with (arg 1) or without (arg 0) a reader pinning the bank's
// current version across the Store: the pinned case publishes a new version
// that shares the pinned one's rows.
void BM_StoreUnderReader(benchmark::State& state) {
  const int n = 784, k = 20000;
  const bool pin = state.range(0) != 0;
  const auto dir = std::filesystem::temp_directory_path() /
                   ("engram_bench_store_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  {
    auto registry = core::BankRegistry::Open(
        std::move(*core::OpenSqliteStorage((dir / "engram.db").string())), {});
    core::BankRegistry& r = **registry;
    (void)r.CreateBank(core::BankSpec{"bench", n, core::StateKind::kContinuous, {},
                                      core::Precision::kF32});
    core::Bank seed = RandomBank(n, k, core::StateKind::kContinuous, 3);
    (void)r.Store("bench", absl::MakeConstSpan(seed.pattern(0), int64_t{k} * n), {}, {});
    const std::vector<float> row(seed.pattern(7), seed.pattern(7) + n);
    for (auto _ : state) {
      core::BankSnapshot reader;
      if (pin) reader = *r.Snapshot("bench");
      auto st = r.Store("bench", row, {}, {});
      if (!st.ok()) state.SkipWithError(std::string(st.status().message()).c_str());
    }
  }
  std::filesystem::remove_all(dir);
}
BENCHMARK(BM_StoreUnderReader)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond)->UseRealTime();

// Loading a bank as BankRegistry::Open does: one Append per stored row
// (arg: rows; dimension 16, so the per-row bookkeeping shows).
void BM_LoadRowByRow(benchmark::State& state) {
  const int n = 16;
  const int64_t k = state.range(0);
  std::vector<float> row(n, 0.5f);
  const std::string payload;
  for (auto _ : state) {
    core::Bank bank(core::BankSpec{"bench", n, core::StateKind::kContinuous, {},
                                   core::Precision::kF32});
    for (int64_t r = 0; r < k; ++r) {
      const uint64_t id = static_cast<uint64_t>(r) * 2654435761u + 1;
      bank.Append(row, absl::MakeConstSpan(&id, 1), absl::MakeConstSpan(&payload, 1));
    }
    benchmark::DoNotOptimize(bank.size());
  }
  state.SetItemsProcessed(state.iterations() * k);
}
BENCHMARK(BM_LoadRowByRow)->Arg(100000)->Arg(1000000)->Unit(benchmark::kMillisecond)->UseRealTime();

// What a filtered call adds before it computes: the rows that pass (label
// index) and the bank of those rows, for a filter keeping 1 in arg 2 rows
// of a 784 x 10^4 bank.
void BM_FilteredBank(benchmark::State& state) {
  const int n = 784, k = 10000, every = state.range(0);
  core::Bank plain = RandomBank(n, k, core::StateKind::kContinuous, 1);
  std::vector<float> data(plain.pattern(0), plain.pattern(0) + int64_t{k} * n);
  std::vector<core::Labels> labels(k);
  for (int r = 0; r < k; ++r) labels[r].ints = {{"group", r % every}};
  core::Bank bank(core::BankSpec{"bench", n, core::StateKind::kContinuous, {},
                                 core::Precision::kF32});
  bank.Append(data, bank.AssignIds(k), {}, core::PatternExtras{{}, labels, {}});
  core::Filter f{{{.key = "group", .op = core::Condition::kIntEquals, .ints = {0}}}};
  for (auto _ : state) {
    core::Bank sub = bank.Subset(core::MatchingRows(bank, f));
    benchmark::DoNotOptimize(sub.size());
  }
}
BENCHMARK(BM_FilteredBank)->Arg(100)->Arg(10)->Arg(2)->Unit(benchmark::kMicrosecond)->UseRealTime();

// One sharp lse step (beta = 40) from a pattern plus noise of norm ~0.3 on
// unit-norm rows, on an f32 bank (arg 2 = 0) and a screened one (1): the
// screened pass reads the int8 screen and the f32 rows of the few winners.
void BM_SharpLseStep(benchmark::State& state) {
  const int n = state.range(0), k = state.range(1);
  const bool screened = state.range(2) != 0;
  core::Bank bank = UnitNormBank(n, k, 6, screened ? core::Precision::kF32Screened
                                                  : core::Precision::kF32);
  std::mt19937_64 rng(7);
  std::normal_distribution<float> g;
  core::EnergyConfig cfg{.family = core::EnergyFamily::kLse, .beta = 40};
  core::EnergyFunction energy(cfg, bank.view());
  std::vector<float> x(bank.pattern(k / 2), bank.pattern(k / 2) + n), out(n);
  for (auto& v : x) v += g(rng) * 0.3f / std::sqrt(n);
  for (auto _ : state) {
    benchmark::DoNotOptimize(energy.UpdateTarget(x.data(), out.data()));
  }
  state.SetBytesProcessed(state.iterations() * int64_t{n} * k * 4);
  state.SetLabel(screened ? "f32_screened" : "f32");
}
BENCHMARK(BM_SharpLseStep)->ArgsProduct({{784}, {10000, 100000}, {0, 1}})
    ->Args({4096, 1000, 0})->Args({4096, 1000, 1})
    ->Unit(benchmark::kMicrosecond)->UseRealTime();

// One sync step on a bipolar bank (the Krotov-Hopfield drive, then the
// scores-only pass at max_steps), as bench/compare.py times it: arg 0 the
// energy (0 classical, 1 exponential at beta = 0.1), arg 1 the precision
// (0 f32, 1 bit-packed), arg 2 = K, arg 3 = N; the query is a stored pattern
// with 10 % of its signs flipped.
void BM_BipolarSyncStep(benchmark::State& state) {
  const int n = state.range(3), k = state.range(2);
  const auto family = state.range(0) == 0 ? core::EnergyFamily::kClassical
                                          : core::EnergyFamily::kExponential;
  const auto precision = state.range(1) == 0 ? core::Precision::kF32 : core::Precision::kBitPacked;
  std::mt19937_64 rng(3);
  std::vector<float> data(static_cast<size_t>(n) * k);
  for (size_t i = 0; i < data.size(); i += 64) {  // 64 signs a draw
    const uint64_t r = rng();
    for (size_t j = i; j < std::min(data.size(), i + 64); ++j) {
      data[j] = (r >> (j - i)) & 1 ? 1.f : -1.f;
    }
  }
  core::EnergyConfig cfg{.family = family, .beta = 0.1};
  core::Bank bank(core::BankSpec{"bench", n, core::StateKind::kBipolar, cfg, precision});
  bank.Append(data, bank.AssignIds(k), {});
  core::EnergyFunction energy(cfg, bank.view());
  std::vector<float> q(data.begin(), data.begin() + n);
  for (int i = 0; i < n; i += 10) q[i] = -q[i];
  core::RetrieveOptions o;
  o.max_steps = 1;
  for (auto _ : state) {
    auto r = core::RunDynamics(energy, core::StateKind::kBipolar, absl::MakeConstSpan(q), {}, o);
    benchmark::DoNotOptimize(r);
  }
}
BENCHMARK(BM_BipolarSyncStep)
    ->ArgsProduct({{0, 1}, {0, 1}, {10000, 100000}, {784}})
    ->ArgsProduct({{0, 1}, {1}, {100000}, {4096}})
    ->ArgsProduct({{0, 1}, {1}, {1000000}, {784}})
    ->Unit(benchmark::kMicrosecond)->UseRealTime();

// One batched sync step of the lse energy for B states (arg 2) on unit-norm
// patterns at beta = 20, where every weight counts (no row is negligible):
// two sgemms per tile and B * K exps between them.
void BM_LseSyncStepBatch(benchmark::State& state) {
  const int n = state.range(0), k = state.range(1), b = state.range(2);
  core::Bank bank = UnitNormBank(n, k, 2);
  core::EnergyConfig cfg{.family = core::EnergyFamily::kLse, .beta = 20};
  core::EnergyFunction energy(cfg, bank.view());
  std::vector<float> x(bank.pattern(0), bank.pattern(0) + int64_t{b} * n), out(x.size());
  std::vector<double> e(b);
  for (auto _ : state) {
    energy.UpdateTargetBatch(x.data(), b, out.data(), e.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations() * int64_t{4} * b * k * n);  // flops
}
BENCHMARK(BM_LseSyncStepBatch)->Args({784, 10000, 32})->Args({784, 10000, 256})
    ->Unit(benchmark::kMillisecond)->UseRealTime();

// Every kernel at every SIMD level this CPU runs: one pass of `rows` rows of
// dimension N (arg 0: level, arg 1: N, arg 2: rows). Bytes are those the
// kernel reads from the rows.
// kDotMulti / kAxpyMulti: 32 states against the same rows (a batched step's
// tile).
// kAxpyBitsI16: the integer weighted sum with the classical energy's
// weights over their power of two (d / 2 for the overlap d of a random row
// with a random state), all rows in one call.
enum KernelOp {
  kDot, kAxpy, kDotBf16, kAxpyBf16, kDotI8, kDotBits, kAxpyBits, kDotMulti, kAxpyMulti,
  kAxpyBitsI16
};
constexpr int64_t kMultiStates = 32;

template <KernelOp op>
void BM_Kernel(benchmark::State& state) {
  const auto level = static_cast<core::kernels::SimdLevel>(state.range(0));
  const core::kernels::KernelTable* k = core::kernels::KernelsFor(level);
  if (k == nullptr) {
    state.SkipWithError("SIMD level not supported by this CPU");
    return;
  }
  const int n = state.range(1);
  const int64_t rows = state.range(2);
  std::mt19937_64 rng(1);
  std::normal_distribution<float> g;
  std::vector<float> f(rows * n), x(kMultiStates * n), w(kMultiStates * rows),
      out(kMultiStates * std::max<int64_t>(rows, n));
  for (auto& v : f) v = g(rng);
  for (auto& v : x) v = g(rng);
  for (auto& v : w) v = g(rng);
  std::vector<uint16_t> h(f.size());
  for (size_t i = 0; i < f.size(); ++i) h[i] = core::kernels::FloatToBf16(f[i]);
  const int words = core::kernels::BitWords(n);
  std::vector<uint64_t> bits(rows * words), xb(words);
  for (auto& v : bits) v = rng();
  for (auto& v : xb) v = rng();
  std::vector<int16_t> wi(rows);
  for (auto& v : wi) {
    int ones = 0;
    for (int i = 0; i < n; ++i) ones += static_cast<int>(rng() & 1);
    v = static_cast<int16_t>((n - 2 * ones) / 2);
  }
  std::vector<int32_t> iacc(n);
  std::vector<int8_t> q(f.size()), xq(n);
  std::vector<int32_t> qsums(rows, 0), qout(rows);
  core::kernels::QuantizeToInt8(x.data(), n, xq.data());
  for (int64_t r = 0; r < rows; ++r) {
    core::kernels::QuantizeToInt8(f.data() + r * n, n, q.data() + r * n);
    for (int i = 0; i < n; ++i) qsums[r] += q[r * n + i];
  }
  int64_t bytes = 0;
  for (auto _ : state) {
    switch (op) {
      case kDot: k->dot_rows(f.data(), rows, n, x.data(), out.data()); bytes = rows * n * 4; break;
      case kAxpy: k->axpy_rows(f.data(), rows, n, w.data(), out.data()); bytes = rows * n * 4; break;
      case kDotBf16: k->dot_rows_bf16(h.data(), rows, n, x.data(), out.data()); bytes = rows * n * 2; break;
      case kAxpyBf16: k->axpy_rows_bf16(h.data(), rows, n, w.data(), out.data()); bytes = rows * n * 2; break;
      case kDotI8:
        k->dot_rows_i8(q.data(), rows, n, xq.data(), qsums.data(), qout.data());
        bytes = rows * n;
        break;
      case kDotBits: k->dot_rows_bits(bits.data(), rows, n, xb.data(), out.data()); bytes = rows * words * 8; break;
      case kAxpyBits: k->axpy_rows_bits(bits.data(), rows, n, w.data(), out.data()); bytes = rows * words * 8; break;
      case kAxpyBitsI16:
        if (k->axpy_rows_bits_i16 == nullptr) {
          state.SkipWithError("no integer kernel at this level");
          return;
        }
        k->axpy_rows_bits_i16(bits.data(), rows, n, wi.data(), iacc.data(), nullptr, 0);
        bytes = rows * words * 8;
        break;
      case kDotMulti:
        k->dot_rows_multi(f.data(), rows, n, x.data(), kMultiStates, out.data());
        bytes = rows * n * 4;
        break;
      case kAxpyMulti:
        k->axpy_rows_multi(f.data(), rows, n, w.data(), kMultiStates, out.data());
        bytes = rows * n * 4;
        break;
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::DoNotOptimize(qout.data());
  }
  state.SetBytesProcessed(state.iterations() * bytes);
  state.SetLabel(core::kernels::SimdLevelName(level));
}

void KernelArgs(benchmark::internal::Benchmark* b) {
  // 784 x 40 rows: one L2-resident block (what the fused pass hands a kernel);
  // 784 x 20000: a stream from memory.
  for (int level = 0; level <= 3; ++level) {
    b->Args({level, 784, 40});
    b->Args({level, 784, 20000});
  }
}
BENCHMARK(BM_Kernel<kDot>)->Apply(KernelArgs)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Kernel<kAxpy>)->Apply(KernelArgs)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Kernel<kDotBf16>)->Apply(KernelArgs)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Kernel<kAxpyBf16>)->Apply(KernelArgs)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Kernel<kDotI8>)->Apply(KernelArgs)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Kernel<kDotBits>)->Apply(KernelArgs)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Kernel<kAxpyBits>)->Apply(KernelArgs)->Unit(benchmark::kMicrosecond);
// Also the fused pass's block at N = 784 (1024 rows) and 4096 (256 rows).
BENCHMARK(BM_Kernel<kAxpyBitsI16>)->Args({0, 784, 40})->Args({0, 784, 20000})
    ->Args({2, 784, 40})->Args({2, 784, 1024})->Args({2, 784, 20000})->Args({2, 4096, 256})
    ->Args({2, 4096, 20000})->Unit(benchmark::kMicrosecond);
// 32 states x 784 x 40 rows: 2.5 MFLOP per call (GFLOP/s = 2 * 32 * 784 * 40 / time).
BENCHMARK(BM_Kernel<kDotMulti>)->Args({1, 784, 40})->Args({2, 784, 40})->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Kernel<kAxpyMulti>)->Args({1, 784, 40})->Args({2, 784, 40})->Unit(benchmark::kMicrosecond);

// A whole Retrieve: lse sync from a noisy pattern to convergence + nearest.
void BM_RetrieveInProcess(benchmark::State& state) {
  const int n = 784, k = 10000;
  core::Bank bank = RandomBank(n, k, core::StateKind::kContinuous, 2);
  core::EnergyConfig cfg{.family = core::EnergyFamily::kLse, .beta = 0.1};
  core::EnergyFunction energy(cfg, bank.view());
  std::mt19937_64 rng(3);
  std::normal_distribution<float> g(0.f, 0.3f);
  std::vector<float> q(bank.pattern(5), bank.pattern(5) + n);
  for (auto& v : q) v += g(rng);
  core::RetrieveOptions o;
  int steps = 0;
  for (auto _ : state) {
    auto t = core::RunDynamics(energy, core::StateKind::kContinuous, q, {}, o);
    benchmark::DoNotOptimize(bank.Nearest(t->state.data()));
    steps = t->steps;
  }
  state.counters["steps"] = steps;
}
BENCHMARK(BM_RetrieveInProcess)->Unit(benchmark::kMicrosecond);

// B queries retrieved together to convergence (RunSyncBatch), lse at
// beta = 40 on unit-norm patterns, each query a pattern plus noise of norm
// ~0.3 (as bench/compare.py): arg 0 = N, arg 1 = K, arg 2 = B.
void BM_LseRetrieveBatch(benchmark::State& state) {
  const int n = state.range(0), k = state.range(1), b = state.range(2);
  core::Bank bank = UnitNormBank(n, k, 4);
  std::mt19937_64 rng(5);
  std::normal_distribution<float> g;
  core::EnergyConfig cfg{.family = core::EnergyFamily::kLse, .beta = 40};
  core::EnergyFunction energy(cfg, bank.view());
  std::vector<float> q(static_cast<size_t>(b) * n);
  for (int i = 0; i < b; ++i) {
    const float* p = bank.pattern((i * 7919) % k);
    for (int j = 0; j < n; ++j) q[int64_t{i} * n + j] = p[j] + g(rng) * 0.3f / std::sqrt(n);
  }
  core::RetrieveOptions o;
  std::vector<core::BatchQuery> batch;
  for (int i = 0; i < b; ++i) batch.push_back({absl::MakeConstSpan(q.data() + int64_t{i} * n, n), {}, &o});
  int steps = 0;
  for (auto _ : state) {
    auto r = core::RunSyncBatch(energy, core::StateKind::kContinuous, batch);
    steps = 0;
    for (auto& t : r) steps = std::max(steps, t->steps);
  }
  state.counters["steps"] = steps;
}
BENCHMARK(BM_LseRetrieveBatch)->Args({4096, 1000, 256})->Args({784, 10000, 256})
    ->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_AsyncSweepBipolar(benchmark::State& state) {
  const int n = state.range(0), k = state.range(1);
  core::Bank bank = RandomBank(n, k, core::StateKind::kBipolar, 4);
  core::EnergyConfig cfg{.family = core::EnergyFamily::kClassical};
  core::EnergyFunction energy(cfg, bank.view());
  std::vector<float> q(bank.pattern(0), bank.pattern(0) + n);
  core::RetrieveOptions o;
  o.dynamics = core::Dynamics::kAsync;
  o.max_steps = 1;
  for (auto _ : state) benchmark::DoNotOptimize(core::RunDynamics(energy, core::StateKind::kBipolar, q, {}, o));
}
BENCHMARK(BM_AsyncSweepBipolar)->Args({784, 100})->Unit(benchmark::kMicrosecond);

// A 64-step Heun sample (gaussian energy), one sample.
void BM_SampleHeun64(benchmark::State& state) {
  const int n = 784, k = state.range(0);
  core::Bank bank = RandomBank(n, k, core::StateKind::kContinuous, 5);
  core::SampleOptions o;
  o.sampler = core::SamplerKind::kHeun;
  o.schedule = {.sigma_max = 80, .sigma_min = 0.002, .steps = 64};
  for (auto _ : state) {
    auto b = core::Sample(bank, {.family = core::EnergyFamily::kGaussian}, 1, {}, {}, o);
    benchmark::DoNotOptimize(b);
  }
}
BENCHMARK(BM_SampleHeun64)->Arg(10000)->Unit(benchmark::kMillisecond);

// One Retrieve through gRPC: range(0) = 0 in-process channel, 1 TCP loopback;
// range(1) = K (N = 784).
// An Engram server on a fresh data directory under the temp dir, and a stub
// over an in-process channel (state.range(0) == 0) or TCP loopback (1).
struct BenchServer {
  std::filesystem::path dir;
  std::unique_ptr<server::EngramServer> srv;
  std::unique_ptr<v1::MemoryService::Stub> stub;

  static std::unique_ptr<BenchServer> Start(benchmark::State& state, const std::string& name) {
    auto b = std::make_unique<BenchServer>();
    b->dir = std::filesystem::temp_directory_path() / name;
    std::filesystem::remove_all(b->dir);
    server::ServerConfig cfg;
    cfg.listen = "127.0.0.1:0";
    cfg.data_dir = b->dir.string();
    cfg.metrics_listen = "";
    auto srv = server::EngramServer::Start(cfg);
    if (!srv.ok()) {
      state.SkipWithError(std::string(srv.status().message()).c_str());
      return nullptr;
    }
    b->srv = std::move(*srv);
    std::shared_ptr<grpc::Channel> ch =
        state.range(0) == 1 ? grpc::CreateChannel("127.0.0.1:" + std::to_string(b->srv->port()),
                                                  grpc::InsecureChannelCredentials())
                            : b->srv->InProcessChannel();
    b->stub = v1::MemoryService::NewStub(ch);
    return b;
  }
  ~BenchServer() {
    stub.reset();
    srv.reset();
    std::filesystem::remove_all(dir);
  }
};

void BM_GrpcRetrieve(benchmark::State& state) {
  const int n = 784, k = state.range(1);
  auto bench = BenchServer::Start(state, "engram_bench_grpc");
  if (bench == nullptr) return;
  v1::MemoryService::Stub* stub = bench->stub.get();
  {
    grpc::ClientContext c;
    v1::CreateBankRequest req;
    req.set_name("b");
    req.set_dim(n);
    req.set_kind(v1::STATE_KIND_CONTINUOUS);
    req.mutable_energy()->set_family(v1::ENERGY_FAMILY_LSE);
    req.mutable_energy()->set_beta(0.1);
    v1::BankInfo info;
    stub->CreateBank(&c, req, &info);
    core::Bank bank = RandomBank(n, k, core::StateKind::kContinuous, 6);
    for (int start = 0; start < k; start += 2000) {
      grpc::ClientContext sc;
      v1::StoreRequest sr;
      sr.set_bank("b");
      const int end = std::min(k, start + 2000);
      sr.mutable_patterns()->Add(bank.pattern(start), bank.pattern(start) + int64_t{end - start} * n);
      v1::StoreResponse resp;
      stub->Store(&sc, sr, &resp);
    }
  }
  core::Bank q = RandomBank(n, 1, core::StateKind::kContinuous, 7);
  v1::RetrieveRequest req;
  req.set_bank("b");
  req.mutable_queries()->Add(q.pattern(0), q.pattern(0) + n);
  req.mutable_options()->set_max_steps(1);
  for (auto _ : state) {
    grpc::ClientContext c;
    v1::RetrieveResponse resp;
    auto s = stub->Retrieve(&c, req, &resp);
    if (!s.ok()) state.SkipWithError(s.error_message().c_str());
  }
}
BENCHMARK(BM_GrpcRetrieve)
    ->Args({0, 16})->Args({1, 16})->Args({0, 10000})->Args({1, 10000})
    ->Unit(benchmark::kMicrosecond)->UseRealTime();

// The round trip alone: Retrieve on a bank that does not exist (answered
// NOT_FOUND by the handler after a map lookup), over the same channels: what
// gRPC itself costs per call on this machine, the floor under
// BM_GrpcRetrieve.
void BM_GrpcRoundTrip(benchmark::State& state) {
  auto bench = BenchServer::Start(state, "engram_bench_grpc_rt");
  if (bench == nullptr) return;
  v1::RetrieveRequest req;
  req.set_bank("absent");
  req.mutable_queries()->Add(1.f);
  for (auto _ : state) {
    grpc::ClientContext c;
    v1::RetrieveResponse resp;
    auto s = bench->stub->Retrieve(&c, req, &resp);
    if (s.error_code() != grpc::StatusCode::NOT_FOUND) state.SkipWithError("expected NOT_FOUND");
  }
}
BENCHMARK(BM_GrpcRoundTrip)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
