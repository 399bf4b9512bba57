// The Engram side of bench/compare.py: loads a bank and queries written by
// the script (raw little-endian float32), times the core operations and
// prints one JSON object of median seconds. Also measures the machine's
// read bandwidth (a STREAM-like sum over an array far larger than L3).
//
//   engram_compare --patterns xi.f32 --queries q.f32 --dim 784 --batch 256 \
//       --beta 0.05 --repeats 7
//   engram_compare --sample 1 --patterns xi.f32 --dim 784 --count 64 [--precision bf16] \
//       --steps 64 --out DIR          # diffusion sampling (see SampleWorkload)
//   engram_compare --throughput 1 --patterns xi.f32 --queries q.f32 --dim 784 \
//       --batch 32 --beta 20          # batched retrieval rate (RetrieveThroughput)
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "engram/core/bank.h"
#include "engram/core/compute.h"
#include "engram/core/dynamics.h"
#include "engram/core/energy.h"
#include "engram/core/sampler.h"

namespace {

using namespace engram;

std::vector<float> ReadFloats(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) {
    std::fprintf(stderr, "cannot read %s\n", path.c_str());
    std::exit(2);
  }
  const std::streamsize bytes = in.tellg();
  in.seekg(0);
  std::vector<float> v(bytes / 4);
  in.read(reinterpret_cast<char*>(v.data()), bytes);
  return v;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double TimeMedian(int repeats, const std::function<void()>& fn) {
  fn();  // warm-up
  std::vector<double> t;
  for (int r = 0; r < repeats; ++r) {
    const auto a = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
  }
  return Median(t);
}

// Sum of a[b, e) with AVX2 loads (4 independent accumulators), so the loop
// is limited by memory, not by the add latency.
__attribute__((target("avx2"))) double SumAvx2(const float* a, size_t b, size_t e) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  size_t i = b;
  for (; i + 32 <= e; i += 32) {
    s0 = _mm256_add_ps(s0, _mm256_loadu_ps(a + i));
    s1 = _mm256_add_ps(s1, _mm256_loadu_ps(a + i + 8));
    s2 = _mm256_add_ps(s2, _mm256_loadu_ps(a + i + 16));
    s3 = _mm256_add_ps(s3, _mm256_loadu_ps(a + i + 24));
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  double s = 0;
  for (float v : t) s += v;
  for (; i < e; ++i) s += a[i];
  return s;
}

double SumPortable(const float* a, size_t b, size_t e) {
  float acc[16] = {};
  size_t i = b;
  for (; i + 16 <= e; i += 16) {
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j];
  }
  double s = 0;
  for (float x : acc) s += x;
  for (; i < e; ++i) s += a[i];
  return s;
}

// Read bandwidth in bytes/s: every thread sums its share of a 1 GiB array.
double ReadBandwidth(int repeats) {
  const size_t n = size_t{1} << 28;  // 1 GiB of floats
  std::vector<float> a(n, 1.0f);
  const int threads = core::ComputeThreadsInUse();
  std::vector<double> sums(threads);
  const bool avx2 = __builtin_cpu_supports("avx2");
  auto pass = [&] {
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        const size_t b = n * t / threads, e = n * (t + 1) / threads;
        sums[t] = avx2 ? SumAvx2(a.data(), b, e) : SumPortable(a.data(), b, e);
      });
    }
    for (auto& th : pool) th.join();
  };
  const double sec = TimeMedian(repeats, pass);
  return n * 4.0 / sec;
}

std::string Arg(int argc, char** argv, const char* name, const char* fallback) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], name) == 0) return argv[i + 1];
  }
  return fallback;
}

void WriteFloats(const std::string& path, const void* data, size_t bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  if (!out) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(2);
  }
}

// Diffusion sampling on a Gaussian bank: `count` samples of a Heun sampler
// over a Karras schedule of `steps` levels (sigma 80 -> 0.002, then 0), with
// the ideal denoiser. Times the call, one sample alone, and one batched
// denoiser evaluation at sigma = 1 (every row weighted); writes the initial
// and final states (count x n float32) and the schedule (float64) under
// `out` for the script to check against its own sampler.
template <typename Emit>
void SampleWorkload(const std::vector<float>& xi, int n, int count, int steps, int repeats,
                    core::Precision precision, const std::string& out, Emit& emit) {
  const int64_t k = static_cast<int64_t>(xi.size()) / n;
  const core::EnergyConfig cfg{.family = core::EnergyFamily::kGaussian};
  core::Bank bank(core::BankSpec{"g", n, core::StateKind::kContinuous, cfg, precision});
  bank.Append(xi, bank.AssignIds(k), {});
  core::SampleOptions o;
  o.sampler = core::SamplerKind::kHeun;
  o.schedule = {.sigma_max = 80, .sigma_min = 0.002, .steps = steps};
  o.seed = 1;
  o.trajectory_every = 1 << 30;  // the initial state and the final one
  absl::StatusOr<core::SampleBatch> batch;
  emit("sample_heun", TimeMedian(repeats, [&] {
         batch = core::Sample(bank, cfg, count, {}, {}, o);
         if (!batch.ok()) std::abort();
       }));
  emit("sample_heun_one", TimeMedian(1, [&] {
         if (!core::Sample(bank, cfg, 1, {}, {}, o).ok()) std::abort();
       }));
  std::vector<float> states(int64_t{count} * n), dens(states.size());
  std::vector<double> energies(count);
  for (int q = 0; q < count; ++q) {
    std::copy(batch->samples[q].trajectory.front().begin(),
              batch->samples[q].trajectory.front().end(), states.begin() + int64_t{q} * n);
  }
  const core::EnergyConfig at_one{.family = core::EnergyFamily::kGaussian, .beta = 1.0};
  core::EnergyFunction energy(at_one, bank.view());
  std::vector<float> unit(states.size());
  for (size_t i = 0; i < unit.size(); ++i) unit[i] = states[i] / 80.f;  // noise at sigma 1
  emit("denoise_batch", TimeMedian(repeats, [&] {
         energy.UpdateTargetBatch(unit.data(), count, dens.data(), energies.data());
       }));
  if (out.empty()) return;
  WriteFloats(out + "/x0.f32", states.data(), states.size() * 4);
  for (int q = 0; q < count; ++q) {
    std::copy(batch->samples[q].state.begin(), batch->samples[q].state.end(),
              states.begin() + int64_t{q} * n);
  }
  WriteFloats(out + "/final.f32", states.data(), states.size() * 4);
  WriteFloats(out + "/sigmas.f64", batch->sigmas.data(), batch->sigmas.size() * 8);
  WriteFloats(out + "/unit.f32", unit.data(), unit.size() * 4);
}

// Sync retrieval of every query to convergence on an lse bank, in batches
// of b queries (RunSyncBatch, default options): what the server's dynamic
// batcher runs for b concurrent single-query Retrieve calls. Emits queries
// per second (median over the repeats) and the mean steps per query.
template <typename Emit>
void RetrieveThroughput(const std::vector<float>& xi, const std::vector<float>& q, int n,
                        int b, double beta, int repeats, Emit& emit) {
  const int64_t k = static_cast<int64_t>(xi.size()) / n;
  const int64_t nq = static_cast<int64_t>(q.size()) / n;
  const core::EnergyConfig cfg{.family = core::EnergyFamily::kLse, .beta = beta};
  core::Bank bank(core::BankSpec{"b", n, core::StateKind::kContinuous, cfg, core::Precision::kF32});
  bank.Append(xi, bank.AssignIds(k), {});
  core::EnergyFunction energy(cfg, bank.view());
  const core::RetrieveOptions o;
  int64_t steps = 0;
  const double t = TimeMedian(repeats, [&] {
    steps = 0;
    for (int64_t q0 = 0; q0 < nq; q0 += b) {
      std::vector<core::BatchQuery> batch;
      for (int64_t i = q0; i < std::min<int64_t>(nq, q0 + b); ++i) {
        batch.push_back({absl::MakeConstSpan(q.data() + i * n, n), {}, &o});
      }
      for (auto& r : core::RunSyncBatch(energy, core::StateKind::kContinuous, batch)) {
        if (!r.ok()) std::abort();
        steps += r->steps;
      }
    }
  });
  emit("queries_per_s", static_cast<double>(nq) / t);
  emit("steps_per_query", static_cast<double>(steps) / static_cast<double>(nq));
}

}  // namespace

int main(int argc, char** argv) {
  const int repeats = std::atoi(Arg(argc, argv, "--repeats", "7").c_str());
  if (Arg(argc, argv, "--bandwidth", "0") == "1") {
    std::printf("{\"read_bytes_per_s\": %.6g, \"simd\": \"%s\", \"threads\": %d, "
                "\"blas\": \"%s\"}\n",
                ReadBandwidth(repeats), core::SimdLevelInUse().c_str(),
                core::ComputeThreadsInUse(), core::BlasKernelInUse().c_str());
    return 0;
  }
  const int n = std::atoi(Arg(argc, argv, "--dim", "0").c_str());
  const int b = std::atoi(Arg(argc, argv, "--batch", "1").c_str());
  const double beta = std::atof(Arg(argc, argv, "--beta", "0.05").c_str());
  const bool bipolar = Arg(argc, argv, "--bipolar", "0") == "1";
  const std::vector<float> xi = ReadFloats(Arg(argc, argv, "--patterns", ""));
  const int64_t k = static_cast<int64_t>(xi.size()) / n;
  std::printf("{");
  auto emit = [first = true](const char* name, double v) mutable {
    std::printf("%s\"%s\": %.6g", first ? "" : ", ", name, v);
    std::fflush(stdout);
    first = false;
  };
  if (Arg(argc, argv, "--sample", "0") == "1") {
    SampleWorkload(xi, n, std::atoi(Arg(argc, argv, "--count", "64").c_str()),
                   std::atoi(Arg(argc, argv, "--steps", "64").c_str()), repeats,
                   Arg(argc, argv, "--precision", "f32") == "bf16" ? core::Precision::kBf16
                                                                   : core::Precision::kF32,
                   Arg(argc, argv, "--out", ""), emit);
    std::printf("}\n");
    return 0;
  }
  const std::vector<float> q = ReadFloats(Arg(argc, argv, "--queries", ""));
  if (Arg(argc, argv, "--throughput", "0") == "1") {
    RetrieveThroughput(xi, q, n, b, beta, repeats, emit);
    std::printf("}\n");
    return 0;
  }
  std::vector<float> out(int64_t{b} * n);
  std::vector<double> energies(b);
  if (bipolar) {
    // One sync step on a bipolar bank (Krotov-Hopfield drive) at f32 and
    // bit-packed precision, for the classical and the exponential energy.
    for (auto family : {core::EnergyFamily::kClassical, core::EnergyFamily::kExponential}) {
      core::EnergyConfig cfg{.family = family, .beta = 0.1};
      for (auto precision : {core::Precision::kF32, core::Precision::kBitPacked}) {
        core::Bank bank(core::BankSpec{"b", n, core::StateKind::kBipolar, cfg, precision});
        bank.Append(xi, bank.AssignIds(k), {});
        core::EnergyFunction energy(cfg, bank.view());
        core::RetrieveOptions o;
        o.max_steps = 1;
        const double t = TimeMedian(repeats, [&] {
          auto r = core::RunDynamics(energy, core::StateKind::kBipolar,
                                     absl::MakeConstSpan(q.data(), n), {}, o);
          if (!r.ok()) std::abort();
        });
        const bool exp = family == core::EnergyFamily::kExponential;
        const bool f32 = precision == core::Precision::kF32;
        emit(exp ? (f32 ? "bipolar_exp_step_f32" : "bipolar_exp_step_bits")
                 : (f32 ? "bipolar_step_f32" : "bipolar_step_bits"),
             t);
      }
    }
    std::printf("}\n");
    return 0;
  }
  core::EnergyConfig cfg{.family = core::EnergyFamily::kLse, .beta = beta};
  core::Bank bank(core::BankSpec{"b", n, core::StateKind::kContinuous, cfg, core::Precision::kF32});
  bank.Append(xi, bank.AssignIds(k), {});
  core::EnergyFunction energy(cfg, bank.view());
  emit("step_b1", TimeMedian(repeats, [&] { energy.UpdateTarget(q.data(), out.data()); }));
  emit("nearest_b1", TimeMedian(repeats, [&] { bank.Nearest(q.data()); }));
  core::RetrieveOptions o;
  int steps = 0;
  emit("retrieve_b1", TimeMedian(repeats, [&] {
         auto r = core::RunDynamics(energy, core::StateKind::kContinuous,
                                    absl::MakeConstSpan(q.data(), n), {}, o);
         steps = r->steps;
       }));
  emit("retrieve_b1_steps", steps);
  if (b > 1) {
    emit("step_batch", TimeMedian(repeats, [&] {
           energy.UpdateTargetBatch(q.data(), b, out.data(), energies.data());
         }));
    std::vector<core::BatchQuery> batch;
    for (int i = 0; i < b; ++i) batch.push_back({absl::MakeConstSpan(q.data() + int64_t{i} * n, n), {}, &o});
    emit("retrieve_batch", TimeMedian(std::max(3, repeats / 2), [&] {
           auto r = core::RunSyncBatch(energy, core::StateKind::kContinuous, batch);
           steps = 0;
           for (auto& t : r) steps = std::max(steps, t->steps);
         }));
    emit("retrieve_batch_max_steps", steps);
  }
  // bf16 copy of the same bank.
  {
    core::Bank half(core::BankSpec{"h", n, core::StateKind::kContinuous, cfg, core::Precision::kBf16});
    half.Append(xi, half.AssignIds(k), {});
    core::EnergyFunction e16(cfg, half.view());
    emit("step_b1_bf16", TimeMedian(repeats, [&] { e16.UpdateTarget(q.data(), out.data()); }));
  }
  // The same f32 bank with a bf16 screen.
  {
    core::Bank screened(
        core::BankSpec{"s", n, core::StateKind::kContinuous, cfg, core::Precision::kF32Screened});
    screened.Append(xi, screened.AssignIds(k), {});
    core::EnergyFunction es(cfg, screened.view());
    emit("step_b1_screened", TimeMedian(repeats, [&] { es.UpdateTarget(q.data(), out.data()); }));
    emit("retrieve_b1_screened", TimeMedian(repeats, [&] {
           auto r = core::RunDynamics(es, core::StateKind::kContinuous,
                                      absl::MakeConstSpan(q.data(), n), {}, o);
           steps = r->steps;
         }));
    emit("retrieve_b1_screened_steps", steps);
  }
  std::printf("}\n");
  return 0;
}
