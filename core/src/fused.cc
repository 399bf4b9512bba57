#include "fused.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <sched.h>
#include <unistd.h>
#include <thread>
#include <vector>

#include "engram/core/compute.h"
#include "kernels/kernels.h"

extern "C" {
#include <cblas.h>
}

namespace engram::core::internal {
namespace {

// Work below this many bytes of patterns runs on the caller's thread (a
// pass over 512 KB takes ~5 us; a pass of no-op chunks shared with a
// spinning worker, 0.2-0.6 us).
constexpr int64_t kParallelBytes = int64_t{512} << 10;
// Block size target: the block is re-read from L2 by the weighted sum.
constexpr int64_t kBlockBytes = int64_t{128} << 10;

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Waits until `ready()` or `micros` have passed, without sleeping; returns
// ready(). Waking a sleeping thread through the kernel costs tens of
// microseconds, as long as a pass over a bank of a few MB, so the threads
// of a pass wait for each other this long before they sleep. After the
// first microseconds the wait yields the core at every check, so a thread
// that has work there (OpenBLAS's, another pass's) runs instead.
template <typename Ready>
bool SpinFor(int micros, const Ready& ready) {
  const auto start = std::chrono::steady_clock::now();
  const auto polite = start + std::chrono::microseconds(std::min(micros, 5));
  const auto until = start + std::chrono::microseconds(micros);
  while (!ready()) {
    const auto now = std::chrono::steady_clock::now();
    if (now > until) return ready();
    if (now < polite) {
      for (int i = 0; i < 64 && !ready(); ++i) CpuRelax();
    } else {
      std::this_thread::yield();
    }
  }
  return true;
}

// How long a caller spins for the other threads' last chunks, and how long
// an idle worker spins for the next pass before it sleeps. A retrieval's
// passes follow each other within this time, so its workers stay awake.
constexpr int kCallerSpinMicros = 50;
constexpr int kWorkerSpinMicros = 200;

// Shared between the caller and the workers of one ParallelRows call.
struct Job {
  std::function<void(int, int64_t, int64_t)> fn;
  int64_t rows = 0;
  int chunks = 0;
  int caller_cpu = -1;  // the CPU the caller posted from
  std::atomic<int> next{0};
  std::atomic<int> done{0};
  // The last chunk's notification, for a caller that stopped spinning.
  std::mutex mu;
  std::condition_variable cv;

  bool Claimed() const { return next.load(std::memory_order_relaxed) >= chunks; }
  bool Finished() const { return done.load(std::memory_order_acquire) == chunks; }

  // Claims and runs chunks until none are left.
  void Drain() {
    while (true) {
      const int c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= chunks) return;
      const int64_t begin = rows * c / chunks, end = rows * (c + 1) / chunks;
      fn(c, begin, end);
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }

  // Drains, then waits until every chunk (some run by other threads) is done.
  void RunAndWait() {
    Drain();
    if (SpinFor(kCallerSpinMicros, [this] { return Finished(); })) return;
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [this] { return Finished(); });
  }
};

// The compute threads besides the callers': each takes the oldest posted
// job that still has chunks to claim. Callers drain their own jobs too, so
// a job never waits for a worker (concurrent callers share the workers).
class Team {
 public:
  explicit Team(int workers) {
    for (int i = 0; i < workers; ++i) std::thread([this] { Work(); }).detach();
  }

  void Post(const std::shared_ptr<Job>& job) {
    bool wake;
    {
      std::lock_guard<std::mutex> lock(mu_);
      jobs_.push_back(job);
      posted_.fetch_add(1, std::memory_order_release);
      wake = sleeping_ > 0;
    }
    if (wake) cv_.notify_all();
  }

  // Drops `job` (fully claimed) from the queue if no worker has yet.
  void Retire(const Job* job) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = jobs_.begin(); it != jobs_.end(); ++it) {
      if (it->get() == job) {
        jobs_.erase(it);
        return;
      }
    }
  }

 private:
  void Work() {
    while (true) {
      std::shared_ptr<Job> job;
      uint64_t seen;
      {
        std::lock_guard<std::mutex> lock(mu_);
        while (!jobs_.empty() && jobs_.front()->Claimed()) jobs_.pop_front();
        if (!jobs_.empty()) job = jobs_.front();
        seen = posted_.load(std::memory_order_relaxed);
      }
      if (job != nullptr) {
        LeaveCallersCpu(job->caller_cpu);
        job->Drain();
        continue;
      }
      auto posted = [&] { return posted_.load(std::memory_order_acquire) != seen; };
      if (SpinFor(kWorkerSpinMicros, posted)) continue;
      std::unique_lock<std::mutex> lock(mu_);
      ++sleeping_;
      cv_.wait(lock, posted);
      --sleeping_;
    }
  }

  // A worker on the caller's CPU only takes turns with it while another CPU
  // idles, and the scheduler can leave them so for 100 ms (a new process's
  // caller and its first worker often start so). Such a worker moves
  // itself: it may then run on any CPU the process may (the main thread's
  // set) but the caller's.
  static void LeaveCallersCpu(int caller_cpu) {
    if (caller_cpu < 0 || sched_getcpu() != caller_cpu) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(getpid(), sizeof(set), &set) != 0) return;
    CPU_CLR(caller_cpu, &set);
    if (CPU_COUNT(&set) > 0) sched_setaffinity(0, sizeof(set), &set);
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> jobs_;  // guarded by mu_
  std::atomic<uint64_t> posted_{0};        // written under mu_
  int sleeping_ = 0;                       // guarded by mu_
};

Team& Workers() {
  static Team* team = new Team(std::max(1, ComputeThreads() - 1));
  return *team;
}

bool IsBipolar(const float* x, int n) {
  bool bipolar = true;  // no early exit: the loop vectorises
  for (int i = 0; i < n; ++i) bipolar &= std::fabs(x[i]) == 1.f;
  return bipolar;
}

void ScaleInPlace(float* v, int n, double f) {
  const float ff = static_cast<float>(f);
  for (int i = 0; i < n; ++i) v[i] *= ff;
}

// One state's weights so far, relative to a running scale: in the log
// domain the running max of the log-weights (online log-sum-exp), in the
// linear domain the running max |w|, |h|.
struct RunningSums {
  double log_scale = -INFINITY;  // log domain
  double scale = 0.0;            // linear domain
  double wsum = 0.0;             // sum of weights / scale
  double hsum = 0.0;             // sum of h / scale (linear domain)

  // log of the common scale, as FusedSums::log_scale.
  double LogScale(bool log_domain) const {
    if (log_domain) return log_scale;
    return scale > 0.0 ? std::log(scale) : -INFINITY;
  }
};

// The least power of two >= v (v > 0). Linear-domain scales are powers of
// two, so dividing integer weights by them, rescaling sums when the scale
// grows and merging partials are all exact: the Krotov-Hopfield drive of a
// bipolar state is then exactly 0 at a tie (a flip that leaves the energy
// unchanged) on every path, while its integer sums stay below 2^24.
double PowerOfTwoCeil(double v) {
  int e = 0;
  const double m = std::frexp(v, &e);  // v = m 2^e, m in [0.5, 1)
  return m == 0.5 ? v : std::ldexp(1.0, e);
}

// The factor that brings a partial with `sums` to the merged scale: `top`
// (the largest LogScale) in the log domain, `top_scale` (the largest scale,
// a power of two, so the ratio is exact) in the linear domain.
double MergeFactor(const RunningSums& sums, bool log_domain, double top, double top_scale) {
  if (!log_domain) return sums.scale / top_scale;
  return std::exp(sums.log_scale - top);
}

// Log domain: raises r's scale to `bm` when that is larger, rescaling the
// sum of weights and `acc` (n floats, may be null) to it.
void RaiseLogScale(double bm, RunningSums* r, float* acc, int n) {
  if (!(bm > r->log_scale)) return;
  if (std::isfinite(r->log_scale)) {
    const double f = std::exp(r->log_scale - bm);
    r->wsum *= f;
    if (acc != nullptr) ScaleInPlace(acc, n, f);
  }
  r->log_scale = bm;
}

// Folds a block's weights w (and h) into `r`: when the scale grows, the
// sums and `acc` (n floats, may be null) are rescaled to it; `wf` receives
// the block's weights divided by the scale. Returns false (wf all zero)
// while every weight so far is zero.
bool FoldBlock(bool log_domain, const double* w, const double* h, int64_t count, RunningSums* r,
               float* acc, int n, float* wf, double log_floor = -INFINITY) {
  if (log_domain) {
    double bm = -INFINITY;
    for (int64_t i = 0; i < count; ++i) bm = std::max(bm, w[i]);
    RaiseLogScale(bm, r, acc, n);
    if (!std::isfinite(r->log_scale)) {
      std::fill(wf, wf + count, 0.f);
      return false;
    }
    // Terms below e^-50 of the running scale, or of `log_floor` (a lower
    // bound on the final scale), cannot change wsum (>= 1 at the end of
    // every block) even summed over 10^9 rows: skip their exp.
    const double cut = std::max(r->log_scale, log_floor) - 50.0;
    r->wsum += kernels::Kernels().exp_weights(w, count, r->log_scale, cut, wf);
    return true;
  }
  double bm = 0.0;
  for (int64_t i = 0; i < count; ++i) {
    const double aw = std::fabs(w[i]), ah = std::fabs(h[i]);
    bm = aw > bm ? aw : bm;
    bm = ah > bm ? ah : bm;
  }
  if (bm > r->scale) {
    const double scale = PowerOfTwoCeil(bm);
    if (r->scale > 0.0) {
      const double f = r->scale / scale;
      r->wsum *= f;
      r->hsum *= f;
      if (acc != nullptr) ScaleInPlace(acc, n, f);
    }
    r->scale = scale;
  }
  if (r->scale == 0.0) {
    std::fill(wf, wf + count, 0.f);
    return false;
  }
  const double inv = 1.0 / r->scale;
  // Four partial sums each (the block's terms in a fixed order), so the
  // adds do not wait on one another.
  double ws[4] = {0.0, 0.0, 0.0, 0.0}, hs[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + 4 <= count; i += 4) {
    for (int j = 0; j < 4; ++j) {
      const double v = w[i + j] * inv;
      wf[i + j] = static_cast<float>(v);
      ws[j] += v;
      hs[j] += h[i + j] * inv;
    }
  }
  for (; i < count; ++i) {
    const double v = w[i] * inv;
    wf[i] = static_cast<float>(v);
    ws[0] += v;
    hs[0] += h[i] * inv;
  }
  r->wsum += (ws[0] + ws[1]) + (ws[2] + ws[3]);
  r->hsum += (hs[0] + hs[1]) + (hs[2] + hs[3]);
  return true;
}

// The weighted sum of a block of bit rows in exact integers, when the
// block's weights are integers (the Krotov-Hopfield weights of the classical
// and polynomial energies are, for the integer overlaps of bipolar states):
// divided by the largest power of two g dividing them all, rows go through
// the 16-bit kernel, and acc receives (g / scale) times the exact sum. Returns false, adding
// nothing, when a weight is not an integer or a single |w / g| exceeds 32767.
bool AddIntegerBitRows(const kernels::KernelTable& k, const uint64_t* bits, int64_t count, int n,
                       const double* w, double scale, std::vector<int64_t>* wide,
                       std::vector<int16_t>* wi, std::vector<int32_t>* iacc, float* acc) {
  if (static_cast<int64_t>(wide->size()) < count) wide->resize(count);
  uint64_t bits_or = 0;
  bool integers = true;
  for (int64_t r = 0; r < count; ++r) {
    const double v = w[r];
    const bool in_range = std::fabs(v) < 0x1p52;  // false for NaN
    const int64_t q = in_range ? static_cast<int64_t>(v) : 0;
    integers &= in_range && static_cast<double>(q) == v;
    (*wide)[r] = q;
    bits_or |= static_cast<uint64_t>(q < 0 ? -q : q);
  }
  if (!integers) return false;
  if (bits_or == 0) return true;  // every weight is zero
  // The largest power of two dividing every weight (2d for the classical
  // energy, d of N's parity: 4 for even N) stands for the gcd.
  const uint64_t g = bits_or & (~bits_or + 1);
  const int shift = __builtin_ctzll(bits_or);
  if (static_cast<int64_t>(wi->size()) < count) wi->resize(count);
  for (int64_t r = 0; r < count; ++r) {
    const int64_t q = (*wide)[r] >> shift;  // exact: 2^shift divides w_r
    if (q > 32767 || q < -32767) return false;
    (*wi)[r] = static_cast<int16_t>(q);
  }
  iacc->assign(n, 0);
  k.axpy_rows_bits_i16(bits, count, n, wi->data(), iacc->data(), nullptr, 0);
  const double f = static_cast<double>(g) / scale;
  for (int i = 0; i < n; ++i) acc[i] += static_cast<float>((*iacc)[i] * f);
  return true;
}

// A thread's share of a FusedPass.
struct Partial {
  RunningSums sums;
  double energy = 0.0;
  int64_t nearest_row = -1;
  double nearest_key = -INFINITY;
  std::vector<float> acc;
  // The blocks summed in integers (an affine integer rule on bits),
  // unscaled: folded into sums and acc at the end of the range.
  bool integer = false;
  int64_t iwsum = 0, ihsum = 0, imax = 0;  // sums of w, h; max |w|, |h|
  std::vector<int64_t> iacc;                // sum of w * bit_i (with acc)
  // The blocks since the last flush into iacc, in units of the pass's
  // power of two, and a bound on their magnitude (kept below 2^31).
  std::vector<int32_t> iacc32;
  int64_t ibound = 0;

  void FlushInt32(int shift) {
    const int64_t g = int64_t{1} << shift;
    for (size_t j = 0; j < iacc32.size(); ++j) {
      iacc[j] += iacc32[j] * g;
      iacc32[j] = 0;
    }
    ibound = 0;
  }
};

// Folds a range's integer sums into its running sums (and acc, n floats,
// when `with_acc`), as FoldBlock folds a block of those weights.
void FoldIntegerSums(Partial* p, bool with_acc, int n, int shift) {
  if (with_acc) p->FlushInt32(shift);
  RunningSums& r = p->sums;
  const double bm = static_cast<double>(p->imax);
  if (bm > r.scale) {
    const double scale = PowerOfTwoCeil(bm);
    if (r.scale > 0.0) {
      const double f = r.scale / scale;
      r.wsum *= f;
      r.hsum *= f;
      if (with_acc) ScaleInPlace(p->acc.data(), n, f);
    }
    r.scale = scale;
  }
  if (r.scale == 0.0) return;  // every weight so far is zero
  const double inv = 1.0 / r.scale;
  r.wsum += static_cast<double>(p->iwsum) * inv;
  r.hsum += static_cast<double>(p->ihsum) * inv;
  if (with_acc) {
    for (int j = 0; j < n; ++j) p->acc[j] += static_cast<float>(static_cast<double>(p->iacc[j]) * inv);
  }
}

}  // namespace

int ComputeThreads() {
  static const int threads = [] {
    if (const char* env = std::getenv("ENGRAM_THREADS")) {
      const int t = std::atoi(env);
      if (t >= 1) return std::min(t, 256);
    }
    // The CPUs this process may use (a container's cpuset), not the machine's.
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }();
  return threads;
}

// Eight independent lanes in each: a chain of dependent double adds would
// take 4 cycles a value. The lane loops are unrolled so the lanes stay in
// registers (rolled, GCC kept them on the stack: a store and a reload per
// add, ~1.5 cycles a value).
constexpr int kLoopLanes = 8;

double SquaredNorm(const float* x, int64_t n) {
  double s[kLoopLanes] = {};
  int64_t i = 0;
  for (; i + kLoopLanes <= n; i += kLoopLanes) {
#pragma GCC unroll 8
    for (int j = 0; j < kLoopLanes; ++j) s[j] += double{x[i + j]} * x[i + j];
  }
  for (; i < n; ++i) s[0] += double{x[i]} * x[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

float MaxAbsDiff(const float* a, const float* b, int64_t n) {
  float m[kLoopLanes] = {};
  auto step = [&](int j, int64_t at) {
    const float d = std::fabs(a[at] - b[at]);
    m[j] = d > m[j] ? d : m[j];
  };
  int64_t i = 0;
  for (; i + kLoopLanes <= n; i += kLoopLanes) {
#pragma GCC unroll 8
    for (int j = 0; j < kLoopLanes; ++j) step(j, i + j);
  }
  for (; i < n; ++i) step(0, i);
  return *std::max_element(m, m + kLoopLanes);
}

bool AllFinite(const float* v, int64_t n) {
  // An exponent field of all ones carries into bit 31 when 2^23 is added.
  uint32_t carry[kLoopLanes] = {};
  auto step = [&](int j, int64_t at) {
    uint32_t bits;
    std::memcpy(&bits, v + at, sizeof bits);
    carry[j] |= (bits & 0x7f800000u) + 0x00800000u;
  };
  int64_t i = 0;
  for (; i + kLoopLanes <= n; i += kLoopLanes) {
#pragma GCC unroll 8
    for (int j = 0; j < kLoopLanes; ++j) step(j, i + j);
  }
  for (; i < n; ++i) step(0, i);
  uint32_t all = 0;
  for (uint32_t c : carry) all |= c;
  return (all & 0x80000000u) == 0;
}

void ParallelRows(int64_t rows, int64_t cost_per_row,
                  const std::function<void(int, int64_t, int64_t)>& fn, int* used_ranges) {
  const int threads = ComputeThreads();
  if (threads <= 1 || rows * cost_per_row < kParallelBytes || rows < 2 * threads) {
    *used_ranges = 1;
    fn(0, 0, rows);
    return;
  }
  auto job = std::make_shared<Job>();
  job->fn = fn;
  job->rows = rows;
  job->chunks = static_cast<int>(std::min<int64_t>(4 * threads, rows));
  *used_ranges = job->chunks;
  job->caller_cpu = sched_getcpu();
  Workers().Post(job);
  job->RunAndWait();
  Workers().Retire(job.get());
}

namespace {

// The screened softmax pass (see FusedPass): false when too many rows can be
// significant for the screen to save reads.
bool ScreenedPass(const PatternView& view, SimilarityKind similarity, const float* x,
                  double beta, float* acc, bool track_nearest, FusedSums* out) {
  const kernels::KernelTable& k = kernels::Kernels();
  const int n = view.dim;
  const int64_t rows = view.rows;
  const double sqx = SquaredNorm(x, n);
  if (!std::isfinite(sqx)) return false;
  // The state as int8 (x~ = t u) and the two norms of the screen's bound
  // (ScreenRow), rounded up.
  std::vector<int8_t> xq(n);
  const double t = kernels::QuantizeToInt8(x, n, xq.data());
  double dx2_lanes[kLoopLanes] = {};
  int i = 0;
  for (; i + kLoopLanes <= n; i += kLoopLanes) {
#pragma GCC unroll 8
    for (int j = 0; j < kLoopLanes; ++j) {
      const double d = double{x[i + j]} - t * xq[i + j];
      dx2_lanes[j] += d * d;
    }
  }
  for (; i < n; ++i) dx2_lanes[0] += (double{x[i]} - t * xq[i]) * (double{x[i]} - t * xq[i]);
  double dx2 = 0.0;
  for (double d : dx2_lanes) dx2 += d;
  const double up = 1.0 + 0x1p-30;  // covers the double sums' rounding (n <= 2^17)
  const double xnorm = std::sqrt(sqx) * up;
  // The product scale t D (exact D, two floats) rounds by at most
  // 2^-52 |xi~| |x~| <= 2^-40 norm (|x| + |x - x~|).
  const double dxnorm = (std::sqrt(dx2) * up) * (1.0 + 0x1p-40) + 0x1p-40 * xnorm;
  const bool l2 = similarity == SimilarityKind::kNegHalfSqL2;
  // Similarity from a dot product (exact expression of FusedPass).
  auto sim = [&](double dot, int64_t r) {
    return l2 ? dot - 0.5 * view.sq_norms[r] - 0.5 * sqx : dot;
  };
  // Row r's screened dot product from its int8 dot D, and the bound on its
  // distance to the f32 pass's dot product.
  auto screened = [&](int64_t r, int32_t d) {
    const ScreenRow& sr = view.screen_rows[r];
    return std::pair{double{sr.scale} * t * d, double{sr.err} * xnorm + double{sr.norm} * dxnorm};
  };
  // The int8 dots, in a buffer of the calling thread kept between passes (a
  // fresh one is an mmap above ~128 KB, whose pages fault in on every pass).
  // No pass starts inside another on the same thread.
  thread_local std::vector<int32_t> dot_buffer;
  if (dot_buffer.size() < static_cast<size_t>(rows)) dot_buffer.resize(rows);
  int32_t* const dots = dot_buffer.data();
  // Phase 1: screened dots, and per range the largest lower bound of a
  // log-weight and of a nearest key (x.xi - |xi|^2 / 2).
  const int parts = static_cast<int>(std::min<int64_t>(4 * ComputeThreads(), std::max<int64_t>(rows, 1)));
  std::vector<double> w_lo(parts, -INFINITY), key_lo(parts, -INFINITY);
  constexpr int64_t kChunk = 1024;
  int used = 1;
  ParallelRows(rows, int64_t{n}, [&](int part, int64_t begin, int64_t end) {
    double wl = -INFINITY, kl = -INFINITY;
    for (int64_t b = begin; b < end; b += kChunk) {
      const int64_t count = std::min(kChunk, end - b);
      k.dot_rows_i8(view.screen + b * n, count, n, xq.data(), view.screen_sums + b, &dots[b]);
      for (int64_t r = b; r < b + count; ++r) {
        const auto [s, e] = screened(r, dots[r]);
        wl = std::max(wl, beta * sim(s - e, r));
        kl = std::max(kl, s - e - 0.5 * view.sq_norms[r]);
      }
    }
    w_lo[part] = wl;
    key_lo[part] = kl;
  }, &used);
  double wl = -INFINITY, kl = -INFINITY;
  for (int i = 0; i < used; ++i) {
    wl = std::max(wl, w_lo[i]);
    kl = std::max(kl, key_lo[i]);
  }
  if (!std::isfinite(wl)) return false;
  // Phase 2: the rows that can matter (log-weight upper bound within
  // log(negligible) of the largest lower bound, or a nearest key upper bound
  // at or above the best lower bound); the others' screened weights relative
  // to wl go into the sum of weights.
  const double log_negligible =
      std::log(kNegligibleWeightMass / static_cast<double>(std::max<int64_t>(rows, 1)));
  const int64_t max_candidates = std::max<int64_t>(1024, rows / 16);
  std::vector<std::vector<int64_t>> found(parts);
  std::vector<double> rest(parts, 0.0);
  std::atomic<int64_t> total{0};
  ParallelRows(rows, 64, [&](int part, int64_t begin, int64_t end) {
    std::vector<int64_t>& mine = found[part];
    double sum = 0.0;
    double w[kChunk];
    float unused[kChunk];
    for (int64_t b = begin; b < end; b += kChunk) {
      const int64_t count = std::min(kChunk, end - b);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t r = b + i;
        const auto [sr, e] = screened(r, dots[r]);
        const double hi = sr + e;
        if (beta * sim(hi, r) >= wl + log_negligible ||
            (track_nearest && hi - 0.5 * view.sq_norms[r] >= kl)) {
          mine.push_back(r);
          if (total.fetch_add(1, std::memory_order_relaxed) >= max_candidates) return;
          w[i] = -INFINITY;  // a candidate: weighed from its f32 row
          continue;
        }
        w[i] = beta * sim(sr, r) - wl;
      }
      sum += k.exp_weights(w, count, 0.0, -50.0, unused);
    }
    rest[part] = sum;
  }, &used);
  if (total.load() > max_candidates) return false;
  // Phase 3: the candidates' exact f32 scores, as the f32 pass computes them.
  std::vector<int64_t> cand;
  double rest_sum = 0.0;
  for (int i = 0; i < used; ++i) {
    cand.insert(cand.end(), found[i].begin(), found[i].end());
    rest_sum += rest[i];
  }
  std::vector<double> w(cand.size());
  double top = -INFINITY;
  out->nearest_row = -1;
  out->nearest_key = -INFINITY;
  for (size_t c = 0; c < cand.size(); ++c) {
    const int64_t r = cand[c];
    float dot;
    k.dot_rows(view.data + r * n, 1, n, x, &dot);
    w[c] = beta * sim(double{dot}, r);
    top = std::max(top, w[c]);
    if (track_nearest) {
      const double key = double{dot} - 0.5 * view.sq_norms[r] - 0.5 * sqx;
      if (key > out->nearest_key) {  // candidates are in row order
        out->nearest_key = key;
        out->nearest_row = r;
      }
    }
  }
  if (!std::isfinite(top)) return false;
  const float negligible =
      static_cast<float>(kNegligibleWeightMass / static_cast<double>(std::max<int64_t>(rows, 1)));
  if (acc != nullptr) std::fill(acc, acc + n, 0.f);
  double wsum = rest_sum * std::exp(wl - top);
  for (size_t c = 0; c < cand.size(); ++c) {
    const double e = std::exp(w[c] - top);
    wsum += e;
    const float ef = static_cast<float>(e);
    if (acc != nullptr && ef >= negligible) k.axpy_rows(view.data + cand[c] * n, 1, n, &ef, acc);
  }
  out->log_scale = top;
  out->wsum = wsum;
  out->hsum = 0.0;
  out->energy_terms = 0.0;
  out->x_bipolar = false;
  out->sq_x = sqx;
  return true;
}

// A pass's per-block buffers, one set per thread, kept between passes:
// allocating and zeroing them per chunk (~55 KB on bits) was ~8 % of a
// 784 x 10^4 bit-packed step's samples. Every use writes a block's entries
// before it reads them. A thread runs one chunk at a time, and no chunk
// starts a pass of its own.
struct BlockScratch {
  std::vector<float> sc, wf;
  std::vector<double> s, w, h;
  std::vector<std::pair<int64_t, int64_t>> runs;
  std::vector<int64_t> wide;  // AddIntegerBitRows's
  std::vector<int16_t> wi;
  std::vector<int32_t> iacc;
};

BlockScratch& ThreadScratch(int64_t block) {
  thread_local BlockScratch scratch;
  const size_t size = static_cast<size_t>(block);
  if (scratch.sc.size() < size) {
    scratch.sc.resize(size);
    scratch.wf.resize(size);
    scratch.s.resize(size);
    scratch.w.resize(size);
    scratch.h.resize(size);
    scratch.wi.resize(size);
  }
  return scratch;
}

}  // namespace

FusedSums FusedPass(const PatternView& view, SimilarityKind similarity, const float* x,
                    const RowWeights& rule, float* acc, bool track_nearest, int64_t hint_row) {
  const kernels::KernelTable& k = kernels::Kernels();
  const int n = view.dim;
  const int64_t rows = view.rows;
  const bool log_domain = rule.domain() == WeightDomain::kLog;
  FusedSums out;
  if (log_domain && view.screen != nullptr && view.bf16 == nullptr &&
      rule.log_weight_slope() > 0.0 &&
      (similarity == SimilarityKind::kDot || similarity == SimilarityKind::kNegHalfSqL2) &&
      !(view.bits != nullptr && IsBipolar(x, n)) &&
      ScreenedPass(view, similarity, x, rule.log_weight_slope(), acc, track_nearest, &out)) {
    return out;
  }

  std::vector<uint64_t> xbits;
  out.x_bipolar = view.bits != nullptr && IsBipolar(x, n);
  if (out.x_bipolar) {
    xbits.assign(kernels::BitWords(n), 0);
    for (int i = 0; i < n; ++i) xbits[i >> 6] |= uint64_t{x[i] > 0} << (i & 63);
  }
  const bool use_bf16 = !out.x_bipolar && view.bf16 != nullptr;
  const int64_t row_bytes = out.x_bipolar ? kernels::BitWords(n) * 8
                            : use_bf16    ? int64_t{n} * 2
                                          : int64_t{n} * 4;
  // Nearest-pattern keys use exactly Bank::Nearest's expression, so both
  // pick the same row; bf16 scores are not exact, so not there.
  const bool nearest = track_nearest && !use_bf16;
  const double sqx =
      similarity == SimilarityKind::kNegHalfSqL2 || nearest ? SquaredNorm(x, n) : 0.0;
  if (similarity == SimilarityKind::kNegHalfSqL2 || nearest) out.sq_x = sqx;
  // bf16 blocks are 4x larger: the bf16 dot kernel splits the state once
  // per call (4096 values at N = 4096 against 16 rows of a 128 KB block),
  // and the block is still re-read from L2 by the weighted sum.
  const int64_t block_bytes = use_bf16 ? 4 * kBlockBytes : kBlockBytes;
  const int64_t block = std::clamp<int64_t>(block_bytes / std::max<int64_t>(row_bytes, 1), 8, 1024);
  // Weights (relative to the running scale, which only grows) below this
  // are left out of the weighted sum; see kNegligibleWeightMass.
  const double negligible_mass = kNegligibleWeightMass / static_cast<double>(std::max<int64_t>(rows, 1));
  const float negligible = static_cast<float>(negligible_mass);
  const double log_negligible = std::log(negligible_mass);
  auto score_rows = [&](int64_t b, int64_t count, float* sc) {
    if (out.x_bipolar) {
      k.dot_rows_bits(view.bits + b * kernels::BitWords(n), count, n, xbits.data(), sc);
    } else if (use_bf16) {
      k.dot_rows_bf16(view.bf16 + b * n, count, n, x, sc);
    } else {
      k.dot_rows(view.data + b * n, count, n, x, sc);
    }
  };
  auto similarity_of = [&](float sc, int64_t row) {
    return similarity == SimilarityKind::kNegHalfSqL2
               ? double{sc} - 0.5 * view.sq_norms[row] - 0.5 * sqx
               : double{sc};
  };
  // Log domain: a lower bound on the largest log-weight of the whole pass,
  // shared by the threads (each raises it to its running max) and seeded
  // with the hint row's log-weight. Rows more than log(negligible) below
  // it are negligible against the final scale too, long before a thread's
  // own running max reaches the winner.
  std::atomic<double> floor{-INFINITY};
  if (log_domain && hint_row >= 0 && hint_row < rows) {
    float sc1;
    score_rows(hint_row, 1, &sc1);
    const double s1 = similarity_of(sc1, hint_row);
    double w1 = -INFINITY, h1 = 0.0;
    rule.Block(&s1, 1, &w1, &h1);
    if (!std::isnan(w1)) floor.store(w1, std::memory_order_relaxed);
  }
  // On bits the scores cost ~1/30 of the masked adds of the weighted sum:
  // a scores-only pre-pass finds the exact largest log-weight, so the main
  // pass adds only the rows that matter even before it meets the winner.
  // The pre-pass keeps the scores (4 bytes a row against the row's ~N/8),
  // and the main pass reads them instead of scoring again. On bf16 rows the
  // same holds for the widening weighted sum (without it, a sharp softmax
  // adds every row before the winner, half the bank on average): the main
  // pass then reads only the significant rows again, so a bf16 pass reads
  // the bank once, plus those rows. (Without a hint row only: a hint already
  // bounds the scale from the first block on.)
  std::vector<float> prescores;
  // Log-weights increasing in the raw score (slope * dot product): a
  // block's largest one comes from its largest score alone.
  const bool monotone = log_domain && rule.log_weight_slope() > 0.0 &&
                        similarity == SimilarityKind::kDot;
  if (log_domain && acc != nullptr &&
      (out.x_bipolar || (use_bf16 && !(hint_row >= 0 && hint_row < rows)))) {
    prescores.resize(rows);
    std::vector<double> maxima(std::min<int64_t>(4 * ComputeThreads(), std::max<int64_t>(rows, 1)),
                               -INFINITY);
    int used_ranges = 1;
    ParallelRows(rows, row_bytes, [&](int part, int64_t begin, int64_t end) {
      BlockScratch& bs = ThreadScratch(block);
      std::vector<double>& s = bs.s;
      std::vector<double>& w = bs.w;
      std::vector<double>& h = bs.h;
      double m = -INFINITY;
      for (int64_t b = begin; b < end; b += block) {
        const int64_t count = std::min(block, end - b);
        float* sc = prescores.data() + b;
        score_rows(b, count, sc);
        if (monotone) {  // the largest log-weight is slope times the largest score
          float fm = -INFINITY;
          for (int64_t i = 0; i < count; ++i) fm = sc[i] > fm ? sc[i] : fm;
          const double s1 = fm;
          double w1 = -INFINITY, h1 = 0.0;
          rule.Block(&s1, 1, &w1, &h1);
          m = std::max(m, w1);
          continue;
        }
        for (int64_t i = 0; i < count; ++i) s[i] = similarity_of(sc[i], b + i);
        rule.Block(s.data(), count, w.data(), h.data());
        for (int64_t i = 0; i < count; ++i) m = std::max(m, w[i]);
      }
      maxima[part] = m;
    }, &used_ranges);
    double m = floor.load(std::memory_order_relaxed);
    for (int i = 0; i < used_ranges; ++i) m = std::max(m, maxima[i]);
    floor.store(m, std::memory_order_relaxed);
  }

  // Bit-packed rows with an affine integer rule (classical, quadratic,
  // identity: every weight significant): a block's weights, sums, nearest
  // row and weighted sum come exactly from the integer overlaps d in the
  // kernels' vector code, with no per-row work in double. The weights
  // a d + b share the power of two 2^shift (d has n's parity, so a d + b =
  // (a n + b) - 2 a p for integer p); over it they take the 16-bit kernel
  // when (|a| n + |b|) / 2^shift <= 32767.
  AffineIntegerForm form;
  int shift = 0;
  bool integer_rule = out.x_bipolar && !log_domain && similarity == SimilarityKind::kDot &&
                      rule.affine_integer_form(&form);
  const int64_t w_bound = std::abs(int64_t{form.a}) * n + std::abs(int64_t{form.b});  // >= |w|
  integer_rule = integer_rule && w_bound <= INT32_MAX;
  if (integer_rule && acc != nullptr) {
    const uint32_t lead = static_cast<uint32_t>(std::abs(form.a * n + form.b));
    const uint32_t step = static_cast<uint32_t>(std::abs(2 * form.a));
    const uint32_t both = lead | step;
    shift = both == 0 ? 0 : __builtin_ctz(both);
    integer_rule = k.axpy_rows_bits_i16 != nullptr && (w_bound >> shift) <= 32767;
  }
  auto add_integer_block = [&](int64_t b, int64_t count, int64_t end, const float* sc,
                               std::vector<int16_t>* w16, Partial* p) {
    kernels::OverlapStats st;
    k.overlap_weights(sc, count, form.a, form.b, shift, acc != nullptr ? w16->data() : nullptr, &st);
    p->integer = true;
    p->energy += form.e2 * st.sum_sq + form.e1 * static_cast<double>(st.sum);
    p->iwsum += int64_t{form.a} * st.sum + int64_t{form.b} * count;
    p->ihsum += int64_t{form.c} * count;
    const int64_t wmax = std::max(std::abs(int64_t{form.a} * static_cast<int64_t>(st.max) + form.b),
                                  std::abs(int64_t{form.a} * static_cast<int64_t>(st.min) + form.b));
    p->imax = std::max({p->imax, wmax, std::abs(int64_t{form.c})});
    if (nearest) {
      // Bit rows are +-1 patterns (|xi|^2 = n for each): the nearest row of
      // the block is its first row of largest overlap.
      const int64_t r = b + st.argmax;
      const double key = double{sc[st.argmax]} - 0.5 * view.sq_norms[r] - 0.5 * sqx;
      if (key > p->nearest_key) {
        p->nearest_key = key;
        p->nearest_row = r;
      }
    }
    if (acc == nullptr || wmax == 0) return;
    // The weighted sum adds into 32-bit sums across blocks while they
    // cannot overflow (a bound of count * max |w| / 2^shift per block).
    const int64_t bound = count * (wmax >> shift);
    if (p->ibound + bound > INT32_MAX) p->FlushInt32(shift);
    p->ibound += bound;
    // The weighted sum re-reads the block from L2 and is compute-bound: the
    // kernel asks for the next block's rows one by one as it adds these, so
    // the memory system is not idle meanwhile (a burst of prefetches before
    // the call mostly waited for them: 7.0 against 6.0 ms a step at
    // 784 x 10^6).
    const int64_t words = kernels::BitWords(n);
    k.axpy_rows_bits_i16(view.bits + b * words, count, n, w16->data(), p->iacc32.data(),
                         view.bits + (b + count) * words, std::min(block, end - b - count));
  };
  std::vector<Partial> partials(std::min<int64_t>(4 * ComputeThreads(), std::max<int64_t>(rows, 1)));
  auto run = [&](int part, int64_t begin, int64_t end) {
    Partial& p = partials[part];
    if (acc != nullptr) p.acc.assign(n, 0.f);
    BlockScratch& bs = ThreadScratch(block);
    std::vector<float>& sc_buf = bs.sc;
    std::vector<float>& wf = bs.wf;
    std::vector<double>& s = bs.s;
    std::vector<double>& w = bs.w;
    std::vector<double>& h = bs.h;
    std::vector<std::pair<int64_t, int64_t>>& runs = bs.runs;  // [first, last) rows to add
    std::vector<int16_t>& wi = bs.wi;
    if (integer_rule && acc != nullptr) {
      p.iacc.assign(n, 0);
      p.iacc32.assign(n, 0);
    }
    for (int64_t b = begin; b < end; b += block) {
      const int64_t count = std::min(block, end - b);
      const float* sc = prescores.empty() ? sc_buf.data() : prescores.data() + b;
      if (prescores.empty()) score_rows(b, count, sc_buf.data());
      if (integer_rule) {
        add_integer_block(b, count, end, sc, &wi, &p);
        continue;
      }
      if (nearest) {
        // A branch-free f32 screen of the block; only a block that may hold
        // a better row runs the exact double comparison (the f32 key is off
        // by at most 2^-22 (|sc| + |xi|^2 / 2) from the exact one).
        float block_best = -INFINITY, block_mag = 0.f;
        for (int64_t i = 0; i < count; ++i) {
          const float half_sq = 0.5f * view.sq_norms[b + i];
          const float key = sc[i] - half_sq;
          block_best = key > block_best ? key : block_best;
          const float mag = std::fabs(sc[i]) + half_sq;
          block_mag = mag > block_mag ? mag : block_mag;
        }
        if (double{block_best} + 0x1p-20 * double{block_mag} >= p.nearest_key + 0.5 * sqx ||
            p.nearest_row < 0) {
          for (int64_t i = 0; i < count; ++i) {
            const double key = double{sc[i]} - 0.5 * view.sq_norms[b + i] - 0.5 * sqx;
            if (key > p.nearest_key) {
              p.nearest_key = key;
              p.nearest_row = b + i;
            }
          }
        }
      }
      if (!prescores.empty() && monotone) {
        // As below, from the block's largest score, before any per-row work.
        float fm = -INFINITY;
        bool nan = false;
        for (int64_t i = 0; i < count; ++i) {
          fm = sc[i] > fm ? sc[i] : fm;
          nan |= std::isnan(sc[i]);
        }
        const double s1 = fm;
        double w1 = -INFINITY, h1 = 0.0;
        rule.Block(&s1, 1, &w1, &h1);
        if (!nan && w1 < floor.load(std::memory_order_relaxed) - 50.0) continue;
      }
      for (int64_t i = 0; i < count; ++i) s[i] = similarity_of(sc[i], b + i);
      p.energy += rule.Block(s.data(), count, w.data(), h.data());
      if (!prescores.empty()) {
        // The pre-pass made the floor the exact largest log-weight: a block
        // whose every log-weight is more than 50 below it adds nothing to
        // the sums (FoldBlock would cut each of its terms) nor to acc. A NaN
        // weight is never skipped: it must reach the sums.
        double bm = -INFINITY;
        bool nan = false;
        for (int64_t i = 0; i < count; ++i) {
          bm = w[i] > bm ? w[i] : bm;
          nan |= std::isnan(w[i]);
        }
        if (!nan && bm < floor.load(std::memory_order_relaxed) - 50.0) continue;
      }
      if (!FoldBlock(log_domain, w.data(), h.data(), count, &p.sums,
                     acc != nullptr ? p.acc.data() : nullptr, n, wf.data(),
                     floor.load(std::memory_order_relaxed))) {
        continue;
      }
      if (acc == nullptr) continue;
      if (log_domain) {
        // Publish this thread's running max; cut at the best bound known.
        double f = floor.load(std::memory_order_relaxed);
        while (p.sums.log_scale > f &&
               !floor.compare_exchange_weak(f, p.sums.log_scale, std::memory_order_relaxed)) {
        }
        const double cut = std::max(f, p.sums.log_scale) + log_negligible;
        for (int64_t i = 0; i < count; ++i) {
          if (w[i] < cut) wf[i] = 0.f;
        }
      }
      // Integer weights on bits (classical, polynomial) take one exact
      // integer pass over the block, with no negligible runs to find.
      const bool integer_bits = out.x_bipolar && !log_domain && k.axpy_rows_bits_i16 != nullptr;
      auto find_runs = [&] {
        runs.clear();
        for (int64_t i = 0; i < count;) {
          if (!(std::fabs(wf[i]) >= negligible)) {
            ++i;
            continue;
          }
          int64_t j = i + 1;
          while (j < count && std::fabs(wf[j]) >= negligible) ++j;
          runs.emplace_back(i, j);
          i = j;
        }
      };
      if (!integer_bits) {
        find_runs();
        if (runs.empty()) continue;
      }
      if (integer_bits) {
        if (AddIntegerBitRows(k, view.bits + b * kernels::BitWords(n), count, n, w.data(),
                              p.sums.scale, &bs.wide, &wi, &bs.iacc, p.acc.data())) {
          continue;
        }
        find_runs();  // weights that are not integers: the float kernel
      }
      for (const auto& [first, last] : runs) {
        const int64_t r = b + first, len = last - first;
        if (out.x_bipolar) {
          k.axpy_rows_bits(view.bits + r * kernels::BitWords(n), len, n, wf.data() + first,
                           p.acc.data());
        } else if (use_bf16) {
          k.axpy_rows_bf16(view.bf16 + r * n, len, n, wf.data() + first, p.acc.data());
        } else {
          k.axpy_rows(view.data + r * n, len, n, wf.data() + first, p.acc.data());
        }
      }
    }
    if (p.integer) FoldIntegerSums(&p, acc != nullptr, n, shift);
  };
  int used = 1;
  // A bit-packed pass whose weights are all significant (the linear domain:
  // classical, polynomial) costs one masked add per 16 values of every row,
  // about what streaming an f32 row's n values costs in bytes / 4 (measured
  // 12 ns a row at N = 784 on AVX-512): it is split over threads from far
  // fewer rows than its n / 8 bytes a row would suggest.
  const int64_t cost_per_row =
      out.x_bipolar && !log_domain && acc != nullptr ? std::max<int64_t>(row_bytes, n) : row_bytes;
  ParallelRows(rows, cost_per_row, run, &used);

  // Exact merge: rescale every partial to the largest scale.
  double top = -INFINITY, top_scale = 0.0;
  for (int i = 0; i < used; ++i) {
    top = std::max(top, partials[i].sums.LogScale(log_domain));
    top_scale = std::max(top_scale, partials[i].sums.scale);
  }
  out.log_scale = top;
  if (acc != nullptr) std::fill(acc, acc + n, 0.f);
  for (int i = 0; i < used; ++i) {
    const Partial& p = partials[i];
    out.energy_terms += p.energy;
    if (nearest && p.nearest_key > out.nearest_key) {  // ranges are in row order
      out.nearest_key = p.nearest_key;
      out.nearest_row = p.nearest_row;
    }
    if (!std::isfinite(p.sums.LogScale(log_domain))) continue;
    const double f = MergeFactor(p.sums, log_domain, top, top_scale);
    out.wsum += f * p.sums.wsum;
    out.hsum += f * p.sums.hsum;
    if (acc != nullptr) {
      const float ff = static_cast<float>(f);
      for (int j = 0; j < n; ++j) acc[j] += ff * p.acc[j];
    }
  }
  if (acc != nullptr && out.x_bipolar) {
    // The bit kernel summed w * [xi = +1]; xi = 2 [xi = +1] - 1.
    const float ws = static_cast<float>(out.wsum);
    for (int j = 0; j < n; ++j) acc[j] = 2.f * acc[j] - ws;
  }
  return out;
}

namespace {

// The weight below which a state's tile weights (relative to its running
// scale) are negligible: `negligible` of the larger of that scale and the
// lower bound `log_floor` on the final one.
float NegligibleAgainst(float negligible, const RunningSums& r, double log_floor) {
  if (!(log_floor > r.log_scale)) return negligible;
  return static_cast<float>(negligible * std::exp(log_floor - r.log_scale));
}

// FoldStateTile for log-weights beta * s (beta > 0) of dot products: the
// tile's largest log-weight is beta * max s, and a score needs an exp only
// when its log-weight reaches 50 below the running scale or `log_floor`
// (FoldBlock's cut). When a compare leaves at most 1/4 of the scores (a
// sharp softmax) only those get an exp; otherwise all go through the vector
// exp_weights, as in FoldBlock. False, with srow untouched, when a score is
// NaN (the general path propagates it). w is scratch of `count` doubles.
bool FoldSoftmaxTile(double beta, int64_t count, float* srow, double* w, int32_t* idx,
                     float negligible, double log_floor, RunningSums* running, float* acc, int n,
                     int64_t* left) {
  const kernels::KernelTable& k = kernels::Kernels();
  const double bm = beta * double{k.max_value(srow, count)};
  if (!std::isfinite(bm)) return false;  // NaN scores included
  RaiseLogScale(bm, running, acc, n);
  const double scale = running->log_scale;
  const double cut = std::max(scale, log_floor) - 50.0;
  const float keep = NegligibleAgainst(negligible, *running, log_floor);
  // Every score whose log-weight reaches the cut, and (float rounding) a
  // few just below it, which the exact test then leaves out.
  const float t = std::nextafter(std::nextafter(static_cast<float>(cut / beta), -INFINITY),
                                 -INFINITY);
  const int64_t candidates = k.indices_at_least(srow, count, t, idx);
  int64_t kept = 0;
  if (candidates * 4 > count) {
    for (int64_t i = 0; i < count; ++i) w[i] = beta * double{srow[i]};
    running->wsum += k.exp_weights(w, count, scale, cut, srow);
    for (int64_t i = 0; i < count; ++i) {
      if (!(srow[i] >= keep)) srow[i] = 0.f;
      kept += srow[i] != 0.f;
    }
    *left = kept;
    return true;
  }
  double wsum = 0.0;
  for (int64_t j = 0; j < candidates; ++j) {
    const double lw = beta * double{srow[idx[j]]};
    if (!(lw >= cut)) continue;
    const double e = std::exp(lw - scale);
    wsum += e;
    const float f = static_cast<float>(e);
    idx[kept] = idx[j];  // the rows kept, in place (kept <= j)
    kept += f >= keep;
    srow[idx[j]] = f;  // only scores already read are overwritten
  }
  running->wsum += wsum;
  for (int64_t j = 0, next = 0; j < count; ++j) {
    if (next < kept && idx[next] == j) {
      ++next;
    } else {
      srow[j] = 0.f;
    }
  }
  *left = kept;
  return true;
}

// One state's share of a batched tile: `srow` holds its scores against rows
// [t0, t0 + count) and receives its weights relative to the running scale
// (as FoldBlock computes them), those negligible against the final scale
// set to zero (NegligibleAgainst: the scale only grows, and `log_floor`
// bounds it from below); returns how many are left. The energy terms and
// nearest row are accumulated (the nearest key without FusedSums' constant
// -|x|^2 / 2, which the caller subtracts at the end). s, w and h are scratch
// of `count` doubles, idx of `count` ints.
int64_t FoldStateTile(const PatternView& view, SimilarityKind similarity, const RowWeights& rule,
                      bool track_nearest, double sqx, int64_t t0, int64_t count, float* srow,
                      double* s, double* w, double* h, int32_t* idx, float negligible,
                      double log_floor, RunningSums* running, float* acc, double* energy,
                      double* nearest_key, int64_t* nearest_row) {
  if (track_nearest) {  // keys x.xi - |xi|^2 / 2, without FusedSums' -|x|^2 / 2
    int64_t row = -1;
    kernels::Kernels().max_nearest_key(srow, view.sq_norms + t0, count, nearest_key, &row);
    if (row >= 0) *nearest_row = t0 + row;
  }
  int64_t left = 0;
  const double beta = rule.log_weight_slope();
  if (beta > 0.0 && similarity == SimilarityKind::kDot &&
      FoldSoftmaxTile(beta, count, srow, w, idx, negligible, log_floor, running, acc, view.dim,
                      &left)) {
    return left;  // a softmax has no energy terms
  }
  for (int64_t i = 0; i < count; ++i) {
    s[i] = similarity == SimilarityKind::kNegHalfSqL2
               ? double{srow[i]} - 0.5 * view.sq_norms[t0 + i] - 0.5 * sqx
               : double{srow[i]};
  }
  *energy += rule.Block(s, count, w, h);
  const bool log_domain = rule.domain() == WeightDomain::kLog;
  FoldBlock(log_domain, w, h, count, running, acc, view.dim, srow, log_floor);
  const float keep = log_domain ? NegligibleAgainst(negligible, *running, log_floor) : negligible;
  for (int64_t i = 0; i < count; ++i) {
    if (!(std::fabs(srow[i]) >= keep)) srow[i] = 0.f;
    left += srow[i] != 0.f;
  }
  return left;
}

}  // namespace

// In a batched tile, a state whose weights left (not negligible) are at
// most 1/8 of the tile's adds just those rows with the multi-state kernel,
// which costs about what the sgemm costs per weight it adds; the other
// states' weights go through one sgemm.
constexpr int64_t kSparseTileFraction = 8;

// Scores-first chunks of a batched softmax pass: b x rows floats of scores
// at most.
constexpr int64_t kScoresFirstBytes = int64_t{128} << 20;

// FusedPassBatch above kBatchMultiMaxStates states; sqx and floors as there.
//
// A softmax over dot products scores a chunk of tiles (up to
// kScoresFirstBytes of scores) before it folds any of them: each state's
// largest score in the chunk bounds its scale from below, as a hint row
// does, so before a state's winner only the chunks ahead of it carry
// weights that are not negligible. Without that, a sharp softmax leaves
// every weight of the tiles before the winner, which takes the second sgemm.
static void FusedPassBatchSgemm(const PatternView& view, SimilarityKind similarity, const float* x,
                                int64_t b, const RowWeights& rule, float* acc, FusedSums* sums,
                                bool track_nearest, const std::vector<double>& sqx,
                                std::vector<double> floors) {
  const kernels::KernelTable& k = kernels::Kernels();
  const int n = view.dim;
  const int64_t rows = view.rows;
  const bool log_domain = rule.domain() == WeightDomain::kLog;
  const double beta = rule.log_weight_slope();
  const bool scores_first = beta > 0.0 && similarity == SimilarityKind::kDot;
  // Rows per tile: S and W tiles of b x tile floats stay near 16 MB.
  const int64_t tile = std::clamp<int64_t>((int64_t{4} << 20) / std::max<int64_t>(b, 1), 256, 65536);
  const int64_t chunk =
      scores_first ? std::max<int64_t>(1, kScoresFirstBytes / (4 * b * tile)) * tile : tile;
  // Written by the sgemms before it is read: no need to clear it.
  const std::unique_ptr<float[]> st_buf(new float[b * std::min(chunk, std::max<int64_t>(rows, 1))]);
  float* const st = st_buf.get();
  std::vector<float> dense_w, dense_acc;  // the states that take the sgemm
  std::vector<RunningSums> running(b);
  const float negligible =
      static_cast<float>(kNegligibleWeightMass / static_cast<double>(std::max<int64_t>(rows, 1)));
  std::vector<int64_t> left(b);
  if (acc != nullptr) std::fill(acc, acc + b * n, 0.f);
  for (int64_t c0 = 0; c0 < rows; c0 += chunk) {
    const int64_t c1 = std::min(rows, c0 + chunk);
    // S (b x count) = X (b x n) * Xi_tile^T for every tile of the chunk;
    // tile t0's scores at st + (t0 - c0) * b.
    for (int64_t t0 = c0; t0 < c1; t0 += tile) {
      const int64_t count = std::min(tile, c1 - t0);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(b),
                  static_cast<int>(count), n, 1.f, x, n, view.data + t0 * n, n, 0.f,
                  st + (t0 - c0) * b, static_cast<int>(count));
    }
    int used = 1;
    if (scores_first && c1 - c0 > tile) {
      ParallelRows(b, (c1 - c0) * 4, [&](int, int64_t q_begin, int64_t q_end) {
        for (int64_t q = q_begin; q < q_end; ++q) {
          for (int64_t t0 = c0; t0 < c1; t0 += tile) {
            const int64_t count = std::min(tile, c1 - t0);
            const float m = k.max_value(st + (t0 - c0) * b + q * count, count);
            floors[q] = std::max(floors[q], beta * double{m});  // NaN: no bound
          }
        }
      }, &used);
    }
    for (int64_t t0 = c0; t0 < c1; t0 += tile) {
      const int64_t count = std::min(tile, c1 - t0);
      const float* xi = view.data + t0 * n;
      float* stt = st + (t0 - c0) * b;
      // Per state: weights in place of the scores (states split over
      // threads), negligible ones zeroed, and the weights left counted.
      ParallelRows(b, count * 64, [&](int, int64_t q_begin, int64_t q_end) {
        std::vector<double> s(count), w(count), h(count);
        std::vector<int32_t> idx(count);
        for (int64_t q = q_begin; q < q_end; ++q) {
          FusedSums& p = sums[q];
          left[q] = FoldStateTile(view, similarity, rule, track_nearest, sqx[q], t0, count,
                                  stt + q * count, s.data(), w.data(), h.data(), idx.data(),
                                  negligible, floors[q], &running[q],
                                  acc != nullptr ? acc + q * n : nullptr, &p.energy_terms,
                                  &p.nearest_key, &p.nearest_row);
        }
      }, &used);
      if (acc == nullptr) continue;
      std::vector<int64_t> dense;
      int64_t sparse_pairs = 0;
      for (int64_t q = 0; q < b; ++q) {
        if (left[q] * kSparseTileFraction > count) {
          dense.push_back(q);
        } else {
          sparse_pairs += left[q];
        }
      }
      const int64_t m = static_cast<int64_t>(dense.size());
      if (m == b) {
        // Acc (b x n) += W (b x count) * Xi_tile (count x n)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(b), n,
                    static_cast<int>(count), 1.f, stt, static_cast<int>(count), xi, n, 1.f, acc,
                    n);
        continue;
      }
      if (m > 0) {
        // The dense states' rows of W, gathered (and cleared for the sparse
        // kernel below), times the tile, added back to their accumulators.
        dense_w.resize(m * count);
        dense_acc.assign(m * n, 0.f);
        for (int64_t j = 0; j < m; ++j) {
          float* wq = stt + dense[j] * count;
          std::copy(wq, wq + count, dense_w.begin() + j * count);
          std::fill(wq, wq + count, 0.f);
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(m), n,
                    static_cast<int>(count), 1.f, dense_w.data(), static_cast<int>(count), xi, n,
                    0.f, dense_acc.data(), n);
        for (int64_t j = 0; j < m; ++j) {
          float* a = acc + dense[j] * n;
          const float* d = dense_acc.data() + j * n;
          for (int i = 0; i < n; ++i) a[i] += d[i];
        }
      }
      if (sparse_pairs == 0) continue;
      // A sharp softmax leaves a few rows per state: add just those (the
      // multi-state kernel skips zero weights), four states to a group.
      ParallelRows((b + 3) / 4, 4 * (sparse_pairs / b + 1) * n,
                   [&](int, int64_t g_begin, int64_t g_end) {
        const int64_t q0 = 4 * g_begin, q1 = std::min(b, 4 * g_end);
        k.axpy_rows_multi(xi, count, n, stt + q0 * count, q1 - q0, acc + q0 * n);
      }, &used);
    }
  }
  for (int64_t q = 0; q < b; ++q) {
    sums[q].log_scale = running[q].LogScale(log_domain);
    sums[q].wsum = running[q].wsum;
    sums[q].hsum = running[q].hsum;
    sums[q].nearest_key -= 0.5 * sqx[q];
  }
}

void FusedPassBatch(const PatternView& view, SimilarityKind similarity, const float* x,
                    int64_t b, const RowWeights& rule, float* acc, FusedSums* sums,
                    bool track_nearest, const int64_t* hint_rows) {
  const kernels::KernelTable& k = kernels::Kernels();
  const int n = view.dim;
  const int64_t rows = view.rows;
  const bool log_domain = rule.domain() == WeightDomain::kLog;
  // Per state: |x|^2 (L2 similarity, nearest keys), and in the log domain a
  // lower bound on its largest log-weight, the hint row's (as in FusedPass).
  // Split over states (256 states of 4 096 values: ~3 % of a batched
  // retrieval's samples on one core).
  std::vector<double> sqx(b, 0.0), floors(b, -INFINITY);
  int used_ranges = 1;
  ParallelRows(b, int64_t{n} * 8, [&](int, int64_t q_begin, int64_t q_end) {
    for (int64_t q = q_begin; q < q_end; ++q) {
      sums[q] = FusedSums{};
      const float* xq = x + q * n;
      if (similarity == SimilarityKind::kNegHalfSqL2 || track_nearest) {
        sqx[q] = SquaredNorm(xq, n);
        sums[q].sq_x = sqx[q];
      }
      const int64_t hint = hint_rows != nullptr ? hint_rows[q] : -1;
      if (log_domain && hint >= 0 && hint < rows) {
        float dot;
        k.dot_rows(view.data + hint * n, 1, n, xq, &dot);
        const double s1 = similarity == SimilarityKind::kNegHalfSqL2
                              ? double{dot} - 0.5 * view.sq_norms[hint] - 0.5 * sqx[q]
                              : double{dot};
        double w1 = -INFINITY, h1 = 0.0;
        rule.Block(&s1, 1, &w1, &h1);
        if (!std::isnan(w1)) floors[q] = w1;
      }
    }
  }, &used_ranges);
  if (b > kBatchMultiMaxStates) {
    FusedPassBatchSgemm(view, similarity, x, b, rule, acc, sums, track_nearest, sqx, floors);
    return;
  }
  // Rows per tile: the tile stays in L2 between its scores and its weighted sum.
  const int64_t tile = std::clamp<int64_t>((int64_t{256} << 10) / (int64_t{n} * 4), 16, 1024);
  const float negligible =
      static_cast<float>(kNegligibleWeightMass / static_cast<double>(std::max<int64_t>(rows, 1)));
  constexpr int64_t kStateChunk = 32;
  // A thread's share: per state, its running sums, energy, nearest row and
  // accumulator (b x n).
  struct BatchPartial {
    std::vector<RunningSums> sums;
    std::vector<double> energy;
    std::vector<int64_t> nearest_row;
    std::vector<double> nearest_key;
    std::vector<float> acc;
  };
  std::vector<BatchPartial> partials(
      std::min<int64_t>(4 * ComputeThreads(), std::max<int64_t>(rows, 1)));
  auto run = [&](int part, int64_t begin, int64_t end) {
    BatchPartial& p = partials[part];
    p.sums.assign(b, RunningSums{});
    p.energy.assign(b, 0.0);
    p.nearest_row.assign(b, -1);
    p.nearest_key.assign(b, -INFINITY);
    if (acc != nullptr) p.acc.assign(b * n, 0.f);
    std::vector<float> st(b * tile);
    std::vector<double> s(tile), w(tile), h(tile);
    std::vector<int32_t> idx(tile);
    for (int64_t t0 = begin; t0 < end; t0 += tile) {
      const int64_t count = std::min(tile, end - t0);
      const float* xi = view.data + t0 * n;
      // st is b x count; states in chunks whose x stays in L2 with the tile.
      for (int64_t q0 = 0; q0 < b; q0 += kStateChunk) {
        k.dot_rows_multi(xi, count, n, x + q0 * n, std::min(kStateChunk, b - q0),
                         st.data() + q0 * count);
      }
      if (t0 + count < end) {
        // Ask for the next tile while this one's weights and weighted sum
        // are computed from cache (a batched step is compute-bound; the
        // memory system would otherwise idle).
        const char* next = reinterpret_cast<const char*>(xi + count * n);
        const int64_t next_bytes = std::min(tile, end - t0 - count) * n * 4;
        for (int64_t off = 0; off < next_bytes; off += 64) __builtin_prefetch(next + off, 0, 2);
      }
      for (int64_t q = 0; q < b; ++q) {  // each score row becomes its weight row
        FoldStateTile(view, similarity, rule, track_nearest, sqx[q], t0, count,
                      st.data() + q * count, s.data(), w.data(), h.data(), idx.data(), negligible,
                      floors[q], &p.sums[q], acc != nullptr ? p.acc.data() + q * n : nullptr,
                      &p.energy[q], &p.nearest_key[q], &p.nearest_row[q]);
      }
      if (acc == nullptr) continue;
      for (int64_t q0 = 0; q0 < b; q0 += kStateChunk) {
        k.axpy_rows_multi(xi, count, n, st.data() + q0 * count, std::min(kStateChunk, b - q0),
                          p.acc.data() + q0 * n);
      }
    }
  };
  int used = 1;
  ParallelRows(rows, int64_t{n} * 4 * std::max<int64_t>(b / 4, 1), run, &used);

  // Exact merge per state: rescale every partial to the largest scale.
  if (acc != nullptr) std::fill(acc, acc + b * n, 0.f);
  for (int64_t q = 0; q < b; ++q) {
    FusedSums& out = sums[q];
    double top = -INFINITY, top_scale = 0.0;
    for (int i = 0; i < used; ++i) {
      top = std::max(top, partials[i].sums[q].LogScale(log_domain));
      top_scale = std::max(top_scale, partials[i].sums[q].scale);
    }
    out.log_scale = top;
    for (int i = 0; i < used; ++i) {
      const BatchPartial& p = partials[i];
      out.energy_terms += p.energy[q];
      if (track_nearest && p.nearest_key[q] > out.nearest_key) {  // ranges are in row order
        out.nearest_key = p.nearest_key[q];
        out.nearest_row = p.nearest_row[q];
      }
      if (!std::isfinite(p.sums[q].LogScale(log_domain))) continue;
      const double f = MergeFactor(p.sums[q], log_domain, top, top_scale);
      out.wsum += f * p.sums[q].wsum;
      out.hsum += f * p.sums[q].hsum;
      if (acc != nullptr) {
        const float ff = static_cast<float>(f);
        const float* pa = p.acc.data() + q * n;
        float* a = acc + q * n;
        for (int j = 0; j < n; ++j) a[j] += ff * pa[j];
      }
    }
    out.nearest_key -= 0.5 * sqx[q];
  }
}

void FastSimilarities(const PatternView& view, SimilarityKind similarity, const float* x,
                      double* s) {
  const kernels::KernelTable& k = kernels::Kernels();
  const int n = view.dim;
  const double sqx = similarity == SimilarityKind::kNegHalfSqL2 ? SquaredNorm(x, n) : 0.0;
  int used = 1;
  ParallelRows(view.rows, int64_t{n} * 4, [&](int, int64_t begin, int64_t end) {
    constexpr int64_t kChunk = 256;
    float sc[kChunk];
    for (int64_t b = begin; b < end; b += kChunk) {
      const int64_t count = std::min(kChunk, end - b);
      k.dot_rows(view.data + b * n, count, n, x, sc);
      for (int64_t i = 0; i < count; ++i) {
        s[b + i] = similarity == SimilarityKind::kNegHalfSqL2
                       ? double{sc[i]} - 0.5 * view.sq_norms[b + i] - 0.5 * sqx
                       : double{sc[i]};
      }
    }
  }, &used);
}

double LogSoftmaxWeights::Block(const double* s, int64_t count, double* w, double*) const {
  for (int64_t i = 0; i < count; ++i) w[i] = beta_ * s[i];
  return 0.0;
}

double PolynomialWeights::Block(const double* s, int64_t count, double* w, double* h) const {
  double e = 0.0;
  for (int64_t i = 0; i < count; ++i) {
    const double v = s[i];
    h[i] = 0.0;
    if (degree_ == 0) {  // identity
      w[i] = 1.0;
      e -= v;
      continue;
    }
    if (rectified_ && v <= 0.0) {
      w[i] = 0.0;
      continue;
    }
    double p = 1.0;  // v^(degree-1)
    for (int j = 1; j < degree_; ++j) p *= v;
    if (half_) {
      w[i] = 0.5 * degree_ * p;
      e -= 0.5 * p * v;
    } else {
      w[i] = degree_ * p;
      e -= p * v;
    }
  }
  return e;
}

bool PolynomialWeights::affine_integer_form(AffineIntegerForm* form) const {
  if (degree_ == 0 || (degree_ == 1 && !half_ && !rectified_)) {  // F(s) = s: w = 1
    *form = {.a = 0, .b = 1, .c = 0, .e2 = 0.0, .e1 = -1.0};
    return true;
  }
  if (degree_ == 2 && !rectified_) {  // F(s) = s^2 (/ 2): w = 2 s (s)
    *form = {.a = half_ ? 1 : 2, .b = 0, .c = 0, .e2 = half_ ? -0.5 : -1.0, .e1 = 0.0};
    return true;
  }
  return false;
}

std::unique_ptr<RowWeights> MakeRowWeights(const EnergyConfig& config) {
  switch (config.family) {
    case EnergyFamily::kClassical:
      return std::make_unique<PolynomialWeights>(2, false, true);
    case EnergyFamily::kPolynomial:
      return std::make_unique<PolynomialWeights>(config.degree, config.rectified, false);
    case EnergyFamily::kExponential:
    case EnergyFamily::kLse:
    case EnergyFamily::kGaussian:
      return std::make_unique<LogSoftmaxWeights>(config.beta);
    case EnergyFamily::kGeneral:
      if (config.similarity == SimilarityKind::kNegL1) return nullptr;
      switch (config.separation) {
        case SeparationKind::kIdentity:
          return std::make_unique<PolynomialWeights>(0, false, false);
        case SeparationKind::kPolynomial:
          return std::make_unique<PolynomialWeights>(config.degree, config.rectified, false);
        case SeparationKind::kSoftmax:
          return std::make_unique<LogSoftmaxWeights>(config.beta);
        case SeparationKind::kMax:
          return nullptr;
      }
  }
  return nullptr;
}

}  // namespace engram::core::internal

namespace engram::core {

std::string SimdLevelInUse() { return kernels::SimdLevelName(kernels::Kernels().level); }

int ComputeThreadsInUse() { return internal::ComputeThreads(); }

std::string BlasKernelInUse() { return openblas_get_corename(); }

}  // namespace engram::core
