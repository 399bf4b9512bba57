#include "fused.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "engram/core/compute.h"
#include "kernels/kernels.h"

extern "C" {
#include <cblas.h>
}
#include "fold.h"
#include "parallel.h"
#include "state_loops.h"

namespace engram::core::internal {

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

// In a batched tile, a state whose weights left (not negligible) are at
// most 1/8 of the tile's adds just those rows with the multi-state kernel,
// which costs about what the sgemm costs per weight it adds; the other
// states' weights go through one sgemm.
constexpr int64_t kSparseTileFraction = 8;

// Scores-first chunks of a batched softmax pass: b x rows floats of scores
// at most.
constexpr int64_t kScoresFirstBytes = int64_t{128} << 20;

// A bf16 bank's batched pass widens a tile of its bf16 rows to f32 (exactly:
// a bf16 value is the upper half of its f32) and runs the f32 products on
// it, so that they are the per-state bf16 kernels' products (up to the
// summation order and their split state, within 2^-16 sum |xi_i x_i|).
// Tiles are at most this many bytes of f32 rows (and 4 096 rows).
constexpr int64_t kWideTileBytes = int64_t{16} << 20;

// Release builds with GCC clone Widen for the widest ISA this CPU has (the
// loader picks the clone). Sanitizer builds do not: their runtimes are not
// up yet when the loader runs the clones' resolver.
#if defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_THREAD__) && \
    !defined(__SANITIZE_ADDRESS__)
#define ENGRAM_WIDEN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ENGRAM_WIDEN_CLONES
#endif

// count bf16 values to f32.
ENGRAM_WIDEN_CLONES void Widen(const uint16_t* in, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t u = uint32_t{in[i]} << 16;
    std::memcpy(out + i, &u, sizeof(u));
  }
}

// rows x n bf16 values to f32 in `out`, split over threads.
void WidenRows(const uint16_t* bf16, int64_t rows, int n, float* out) {
  int used = 1;
  ParallelRows(rows, int64_t{n} * 6, [&](int, int64_t begin, int64_t end) {
    Widen(bf16 + begin * n, (end - begin) * n, out + begin * n);
  }, &used);
}

// Acc (b x n) += W (b x count) * Xi_tile (count x n), W's rows in `w`
// (b x count, weights of the tile's rows, negligible ones zero; `left[q]`
// of state q's are not zero). States whose weights left fill more than
// 1/kSparseTileFraction of the tile go through one sgemm; the others add
// just those rows with the multi-state kernel. `w` is clobbered.
struct SgemmScratch {
  std::vector<float> dense_w, dense_acc;  // the states that take the sgemm
};

void AddTileWeightedSums(const float* xi, int64_t count, int n, int64_t b, float* w,
                         const int64_t* left, float* acc, SgemmScratch* scratch) {
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
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(b), n,
                static_cast<int>(count), 1.f, w, static_cast<int>(count), xi, n, 1.f, acc, n);
    return;
  }
  if (m > 0) {
    // The dense states' rows of W, gathered (and cleared for the sparse
    // kernel below), times the tile, added back to their accumulators.
    scratch->dense_w.resize(m * count);
    scratch->dense_acc.assign(m * n, 0.f);
    for (int64_t j = 0; j < m; ++j) {
      float* wq = w + dense[j] * count;
      std::copy(wq, wq + count, scratch->dense_w.begin() + j * count);
      std::fill(wq, wq + count, 0.f);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(m), n,
                static_cast<int>(count), 1.f, scratch->dense_w.data(), static_cast<int>(count), xi,
                n, 0.f, scratch->dense_acc.data(), n);
    for (int64_t j = 0; j < m; ++j) {
      float* a = acc + dense[j] * n;
      const float* d = scratch->dense_acc.data() + j * n;
      for (int i = 0; i < n; ++i) a[i] += d[i];
    }
  }
  if (sparse_pairs == 0) return;
  // A sharp softmax leaves a few rows per state: add just those (the
  // multi-state kernel skips zero weights), four states to a group.
  const kernels::KernelTable& k = kernels::Kernels();
  int used = 1;
  ParallelRows((b + 3) / 4, 4 * (sparse_pairs / b + 1) * n,
               [&](int, int64_t g_begin, int64_t g_end) {
    const int64_t q0 = 4 * g_begin, q1 = std::min(b, 4 * g_end);
    k.axpy_rows_multi(xi, count, n, w + q0 * count, q1 - q0, acc + q0 * n);
  }, &used);
}

// S (b x count) = X (b x n) * Xi_tile^T for every tile [t0, t0 + tile) of
// rows [c0, c1), whose f32 rows start at `rows` (row c0); tile t0's scores
// at st + (t0 - c0) * b.
void ScoreChunk(const float* rows, int n, const float* x, int64_t b, int64_t c0, int64_t c1,
                int64_t tile, float* st) {
  for (int64_t t0 = c0; t0 < c1; t0 += tile) {
    const int64_t count = std::min(tile, c1 - t0);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(b),
                static_cast<int>(count), n, 1.f, x, n, rows + (t0 - c0) * n, n, 0.f,
                st + (t0 - c0) * b, static_cast<int>(count));
  }
}

// Raises each state's floor to beta times its largest similarity in a
// chunk of `rows` rows scored by ScoreChunk (a NaN score gives no bound).
// With `sq_norms` (the chunk's |xi|^2) the similarity is -|x - xi|^2 / 2,
// dot - |xi|^2 / 2 - |x|^2 / 2 (sqx: the states' |x|^2); else the dot
// product.
void RaiseFloors(const float* st, int64_t b, int64_t rows, int64_t tile, double beta,
                 const float* sq_norms, const std::vector<double>& sqx,
                 std::vector<double>* floors) {
  const kernels::KernelTable& k = kernels::Kernels();
  int used = 1;
  ParallelRows(b, rows * 4, [&](int, int64_t q_begin, int64_t q_end) {
    for (int64_t q = q_begin; q < q_end; ++q) {
      for (int64_t t0 = 0; t0 < rows; t0 += tile) {
        const int64_t count = std::min(tile, rows - t0);
        const float* v = st + t0 * b + q * count;
        double m;
        if (sq_norms == nullptr) {
          m = k.max_value(v, count);
        } else {
          double key = -INFINITY;
          int64_t row = -1;
          k.max_nearest_key(v, sq_norms + t0, count, &key, &row);
          m = key - 0.5 * sqx[q];
        }
        (*floors)[q] = std::max((*floors)[q], beta * m);
      }
    }
  }, &used);
}

// FusedPassBatch above kBatchMultiMaxStates states; sqx and floors as there.
//
// A softmax over dot products or -|x - xi|^2 / 2 scores a chunk of tiles (up to
// kScoresFirstBytes of scores) before it folds any of them: each state's
// largest score in the chunk bounds its scale from below, as a hint row
// does, so before a state's winner only the chunks ahead of it carry
// weights that are not negligible. Without that, a sharp softmax leaves
// every weight of the tiles before the winner, which takes the second sgemm.
void FusedPassBatchSgemm(const PatternView& view, SimilarityKind similarity, const float* x,
                                int64_t b, const RowWeights& rule, float* acc, FusedSums* sums,
                                bool track_nearest, const std::vector<double>& sqx,
                                std::vector<double> floors) {
  const int n = view.dim;
  const int64_t rows = view.rows;
  const bool log_domain = rule.domain() == WeightDomain::kLog;
  const double beta = rule.log_weight_slope();
  const bool l2 = similarity == SimilarityKind::kNegHalfSqL2;
  const bool scores_first = beta > 0.0 && (similarity == SimilarityKind::kDot || l2);
  // Rows per tile: S and W tiles of b x tile floats stay near 16 MB. A bf16
  // bank's tile is also its widened rows (kWideTileBytes), one tile a chunk.
  const bool bf16 = view.bf16 != nullptr;
  int64_t tile = std::clamp<int64_t>((int64_t{4} << 20) / std::max<int64_t>(b, 1), 256, 65536);
  if (bf16) tile = std::min(tile, std::clamp<int64_t>(kWideTileBytes / (int64_t{4} * n), 16, 4096));
  const int64_t chunk = scores_first && !bf16
                            ? std::max<int64_t>(1, kScoresFirstBytes / (4 * b * tile)) * tile
                            : tile;
  std::vector<float> wide(bf16 ? std::min(tile, rows) * n : 0);
  // Written by the sgemms before it is read: no need to clear it.
  const std::unique_ptr<float[]> st_buf(new float[b * std::min(chunk, std::max<int64_t>(rows, 1))]);
  float* const st = st_buf.get();
  SgemmScratch scratch;
  std::vector<RunningSums> running(b);
  const float negligible =
      static_cast<float>(kNegligibleWeightMass / static_cast<double>(std::max<int64_t>(rows, 1)));
  std::vector<int64_t> left(b);
  if (acc != nullptr) std::fill(acc, acc + b * n, 0.f);
  for (int64_t c0 = 0; c0 < rows; c0 += chunk) {
    const int64_t c1 = std::min(rows, c0 + chunk);
    if (bf16) WidenRows(view.bf16 + c0 * n, c1 - c0, n, wide.data());
    const float* chunk_rows = bf16 ? wide.data() : view.data + c0 * n;
    ScoreChunk(chunk_rows, n, x, b, c0, c1, tile, st);
    if (scores_first && c1 - c0 > tile) {
      RaiseFloors(st, b, c1 - c0, tile, beta, l2 ? view.sq_norms + c0 : nullptr, sqx, &floors);
    }
    int used = 1;
    for (int64_t t0 = c0; t0 < c1; t0 += tile) {
      const int64_t count = std::min(tile, c1 - t0);
      const float* xi = chunk_rows + (t0 - c0) * n;
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
      if (acc != nullptr) AddTileWeightedSums(xi, count, n, b, stt, left.data(), acc, &scratch);
    }
  }
  for (int64_t q = 0; q < b; ++q) {
    sums[q].log_scale = running[q].LogScale(log_domain);
    sums[q].scale = running[q].scale;
    sums[q].wsum = running[q].wsum;
    sums[q].hsum = running[q].hsum;
    sums[q].nearest_key -= 0.5 * sqx[q];
  }
}

// Per state: |x|^2 into sqx (L2 similarity, nearest keys) and in the log
// domain a lower bound on its largest log-weight into floors, the hint
// row's (as in FusedPass); sums cleared. Split over states (256 states of
// 4 096 values: ~3 % of a batched retrieval's samples on one core).
void PrepareStates(const PatternView& view, SimilarityKind similarity, const float* x, int64_t b,
                   const RowWeights& rule, FusedSums* sums, bool track_nearest,
                   const int64_t* hint_rows, std::vector<double>* sqx,
                   std::vector<double>* floors) {
  const kernels::KernelTable& k = kernels::Kernels();
  const int n = view.dim;
  const bool log_domain = rule.domain() == WeightDomain::kLog;
  sqx->assign(b, 0.0);
  floors->assign(b, -INFINITY);
  int used_ranges = 1;
  ParallelRows(b, int64_t{n} * 8, [&](int, int64_t q_begin, int64_t q_end) {
    for (int64_t q = q_begin; q < q_end; ++q) {
      sums[q] = FusedSums{};
      const float* xq = x + q * n;
      if (similarity == SimilarityKind::kNegHalfSqL2 || track_nearest) {
        (*sqx)[q] = SquaredNorm(xq, n);
        sums[q].sq_x = (*sqx)[q];
      }
      const int64_t hint = hint_rows != nullptr ? hint_rows[q] : -1;
      if (log_domain && hint >= 0 && hint < view.rows) {
        float dot;  // as the pass scores the row
        if (view.bf16 != nullptr) {
          k.dot_rows_bf16(view.bf16 + hint * n, 1, n, xq, &dot);
        } else {
          k.dot_rows(view.data + hint * n, 1, n, xq, &dot);
        }
        const double s1 = similarity == SimilarityKind::kNegHalfSqL2
                              ? double{dot} - 0.5 * view.sq_norms[hint] - 0.5 * (*sqx)[q]
                              : double{dot};
        double w1 = -INFINITY, h1 = 0.0;
        rule.Block(&s1, 1, &w1, &h1);
        if (!std::isnan(w1)) (*floors)[q] = w1;
      }
    }
  }, &used_ranges);
}

// FusedPassBatch up to kBatchMultiMaxStates states, with the multi-state
// kernels over L2-sized tiles; sqx and floors from PrepareStates.
void FusedPassBatchMulti(const PatternView& view, SimilarityKind similarity, const float* x,
                         int64_t b, const RowWeights& rule, float* acc, FusedSums* sums,
                         bool track_nearest, const std::vector<double>& sqx,
                         const std::vector<double>& floors) {
  const kernels::KernelTable& k = kernels::Kernels();
  const int n = view.dim;
  const int64_t rows = view.rows;
  const bool log_domain = rule.domain() == WeightDomain::kLog;
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
  for (int64_t q = 0; q < b; ++q) {
    FusedSums& out = sums[q];
    auto range_at = [&](int i) {
      const BatchPartial& p = partials[i];
      return RangeSums{&p.sums[q], p.energy[q], p.nearest_row[q], p.nearest_key[q],
                       p.acc.empty() ? nullptr : p.acc.data() + q * n};
    };
    MergeRanges(used, range_at, log_domain, track_nearest, n, &out,
                acc != nullptr ? acc + q * n : nullptr);
    out.nearest_key -= 0.5 * sqx[q];
  }
}


}  // namespace

void FusedPassBatch(const PatternView& view, SimilarityKind similarity, const float* x,
                    int64_t b, const RowWeights& rule, float* acc, FusedSums* sums,
                    bool track_nearest, const int64_t* hint_rows) {
  // As FusedPass: bf16 scores are not exact, so no nearest row from them.
  if (view.bf16 != nullptr) track_nearest = false;
  std::vector<double> sqx, floors;
  PrepareStates(view, similarity, x, b, rule, sums, track_nearest, hint_rows, &sqx, &floors);
  if (b > kBatchMultiMaxStates || view.bf16 != nullptr) {
    FusedPassBatchSgemm(view, similarity, x, b, rule, acc, sums, track_nearest, sqx, floors);
  } else {
    FusedPassBatchMulti(view, similarity, x, b, rule, acc, sums, track_nearest, sqx, floors);
  }
}

}  // namespace engram::core::internal
