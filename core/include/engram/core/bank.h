// A Bank: one named set of K stored patterns of dimension N, kept contiguous
// in memory (row-major K x N floats) with their ids and payloads.
//
// Copies share rows: a copy of a bank costs O(1) for its rows and O(recent
// ids) for its id map (AppendArray, IdRowMap), and appending to a copy
// writes only the new rows (amortised), never the ones the original reads.
// Remove builds fresh arrays (O(K)). Label indexes are shared until a copy
// appends labelled rows, which copies them once.
//
//   BankSpec spec{.name = "digits", .dim = 784, .kind = StateKind::kBipolar};
//   ENGRAM_RETURN_IF_ERROR(ValidateBankSpec(spec));
//   Bank bank(spec);
//   ENGRAM_RETURN_IF_ERROR(bank.ValidateNewPatterns(data, ids, payloads));
//   bank.Append(data, ids, payloads);
//   EnergyFunction energy(spec.energy, bank.view());
//
// Thread-safety: a Bank is not synchronised. Concurrent const calls are
// safe, as are calls on distinct copies; anything that mutates one object
// needs exclusive access to it (BankRegistry mutates only versions no
// reader pins).
#ifndef ENGRAM_CORE_BANK_H_
#define ENGRAM_CORE_BANK_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/types/span.h"
#include "engram/core/append_array.h"
#include "engram/core/energy_config.h"
#include "engram/core/pattern_view.h"

namespace engram::core {

// Storage precision of the fast kernels. The f32 values are always kept
// (exact read-back, storage, reference paths); kBf16 adds a bf16 copy that
// the scores and weighted sums read (half the memory traffic, values rounded
// to 8 significant bits), kBitPacked (bipolar banks only) a 1-bit copy read
// with XOR + popcount whenever the state is +-1 (exact). kF32Screened
// computes with the f32 values like kF32 but also keeps an int8 copy as a
// screen: a softmax pass scores every row on the screen (a quarter of the
// traffic) with a per-row bound on the screen's error, and reads the f32
// rows of only the rows whose weight can be significant (the few near the
// winner when the softmax is sharp); +25 % memory (dims up to kMaxScreenDim;
// larger ones are not screened).
enum class Precision { kF32, kBf16, kBitPacked, kF32Screened };

// Largest accepted dimension and payload.
inline constexpr int kMaxDim = 1 << 20;
inline constexpr size_t kMaxPayloadBytes = 64 * 1024;
// Limits of a pattern's labels: entries, and bytes of one key or value.
inline constexpr int kMaxLabels = 64;
inline constexpr size_t kMaxLabelBytes = 256;
// Longest time to live: 100 years, in milliseconds.
inline constexpr int64_t kMaxTtlMs = int64_t{100} * 366 * 24 * 3600 * 1000;

struct BankSpec {
  std::string name;
  int dim = 0;
  StateKind kind = StateKind::kContinuous;
  EnergyConfig energy;
  Precision precision = Precision::kF32;
  // Dimension M of the value each pattern carries (a hetero-associative,
  // key -> value bank); 0 for none. At most kMaxDim.
  int value_dim = 0;
  // Time to live of a stored pattern unless its Store says otherwise, in
  // milliseconds; 0: patterns live until deleted. At most kMaxTtlMs.
  int64_t ttl_ms = 0;
  // Half-life of a pattern's weight, in milliseconds; 0: no decay. With
  // decay, a pattern stored `age` ago enters the softmax with its weight
  // times 2^(-age / half-life) (Bank::LogPrior). Only for energies with
  // softmax weights on continuous banks (ValidateDecay). At most kMaxTtlMs.
  int64_t decay_half_life_ms = 0;
};

// OK when a bank that decays with half-life `half_life_ms` (0: none) can use
// `energy`: lse, gaussian, or general with the softmax separation and a dot
// or -|x - xi|^2/2 similarity, on a continuous bank. FAILED_PRECONDITION
// otherwise; INVALID_ARGUMENT for a half-life outside [0, kMaxTtlMs].
absl::Status ValidateDecay(int64_t half_life_ms, const EnergyConfig& energy, StateKind kind);

// The labels of one pattern: string and integer entries, each list sorted by
// key with distinct keys (a key is either a string or an integer label).
struct Labels {
  std::vector<std::pair<std::string, std::string>> strings;
  std::vector<std::pair<std::string, int64_t>> ints;

  bool empty() const { return strings.empty() && ints.empty(); }
  friend bool operator==(const Labels& a, const Labels& b) {
    return a.strings == b.strings && a.ints == b.ints;
  }
  // Bytes held for these labels in a bank: the entries and their places in
  // the label indexes.
  uint64_t bytes() const {
    uint64_t b = 0;
    for (const auto& [k, v] : strings) b += k.size() + v.size() + sizeof(int64_t);
    for (const auto& [k, v] : ints) b += k.size() + sizeof(v) + 2 * sizeof(int64_t);
    return b;
  }
  // Sorts both lists by key; INVALID_ARGUMENT on a repeated or empty key,
  // an oversize key or value, or more than kMaxLabels entries.
  absl::Status Normalize();
};

// What a Store adds beside the rows. Each span is empty or holds one entry
// per pattern (values: K * value_dim floats, required when the bank's
// value_dim > 0). expires_ms is the Unix time in milliseconds at which the
// pattern expires, 0 for never; stored_ms the Unix time in milliseconds at
// which it was stored (its age for decay), 0 when unknown.
struct PatternExtras {
  absl::Span<const float> values;
  absl::Span<const Labels> labels;
  absl::Span<const int64_t> expires_ms;
  absl::Span<const int64_t> stored_ms;
};

// OK if `name` matches [a-z0-9][a-z0-9_.-]{0,63}; INVALID_ARGUMENT otherwise.
absl::Status ValidateBankName(std::string_view name);

// OK if the name, dimension, energy and precision are usable; otherwise
// INVALID_ARGUMENT, FAILED_PRECONDITION (energy not defined on the kind) or
// UNIMPLEMENTED (precision not available).
absl::Status ValidateBankSpec(const BankSpec& spec);

// The nearest stored memory to a state, by Euclidean distance.
struct NearestMemory {
  int64_t row = -1;  // -1 for an empty bank
  uint64_t id = 0;
  double distance = 0.0;
  double similarity = 0.0;  // dot product
};

class Bank {
 public:
  explicit Bank(BankSpec spec, uint64_t next_id = 1);

  const BankSpec& spec() const { return spec_; }
  int dim() const { return spec_.dim; }
  int64_t size() const { return static_cast<int64_t>(ids_.size()); }
  // Bytes held for pattern data, norms, ids and payloads.
  uint64_t bytes() const;
  // Identifies the bank's content: a number no other content of any bank in
  // the process had, changed by every Append and Remove (a copy keeps it).
  uint64_t version() const { return version_; }
  // The id the next server-assigned pattern receives.
  uint64_t next_id() const { return next_id_; }

  PatternView view() const;
  const float* pattern(int64_t row) const { return data_.data() + row * dim(); }
  // Whether this bank's pattern rows are `other`'s own memory, not a copy
  // (a version and the one it was appended from).
  bool SharesRowsWith(const Bank& other) const { return data_.SharesBufferWith(other.data_); }
  uint64_t id(int64_t row) const { return ids_[row]; }
  // Every row's id, in row order.
  absl::Span<const uint64_t> ids() const { return ids_; }
  const std::string& payload(int64_t row) const { return payloads_[row]; }
  // M = spec().value_dim floats: the value stored with row's pattern.
  const float* value(int64_t row) const { return values_.data() + row * spec_.value_dim; }
  const Labels& labels(int64_t row) const { return labels_[row]; }
  // Unix time in milliseconds at which the row expires; 0 for never.
  int64_t expires_ms(int64_t row) const { return expires_ms_[row]; }
  // The earliest expiry of any row; 0 when no row expires.
  int64_t min_expires_ms() const { return min_expires_ms_; }
  // Unix time in milliseconds at which the row was stored; 0 when unknown.
  int64_t stored_ms(int64_t row) const { return stored_ms_[row]; }
  // Whether the bank's weights decay with age (spec().decay_half_life_ms > 0).
  bool decays() const { return spec_.decay_half_life_ms > 0; }
  // The log weight prior of every row at `now_ms` for a decaying bank:
  // b_mu = -ln 2 * max(0, now_ms - stored_ms(mu)) / half-life (0 for a row
  // whose store time is unknown), set as PatternView::log_prior for a
  // computation at that time. Empty when the bank does not decay.
  std::vector<double> LogPrior(int64_t now_ms) const;
  // Rows in ascending order whose string label `key` is `value`.
  absl::Span<const int64_t> RowsWithString(const std::string& key, const std::string& value) const;
  // (row, value) for every row with integer label `key`, rows ascending.
  absl::Span<const std::pair<int64_t, int64_t>> RowsWithInt(const std::string& key) const;
  // Row of `id`, or nullopt.
  std::optional<int64_t> RowOf(uint64_t id) const;

  // Checks a batch before it is stored: `data` is K * dim() finite floats
  // (exactly +-1 for a bipolar bank), `ids` is empty or K distinct ids not
  // in the bank, `payloads` is empty or K entries of at most
  // kMaxPayloadBytes. Returns INVALID_ARGUMENT or ALREADY_EXISTS.
  // `extras` must match (see PatternExtras): values finite, labels valid
  // (Labels::Normalize), expiries >= 0.
  absl::Status ValidateNewPatterns(absl::Span<const float> data,
                                   absl::Span<const uint64_t> ids,
                                   absl::Span<const std::string> payloads,
                                   const PatternExtras& extras = {}) const;

  // Ids to give a batch of `count` patterns that came without ids.
  std::vector<uint64_t> AssignIds(int64_t count) const;

  // Appends a validated batch (ids must be given, one per pattern).
  // Labels must be normalized.
  void Append(absl::Span<const float> data, absl::Span<const uint64_t> ids,
              absl::Span<const std::string> payloads, const PatternExtras& extras = {});

  // A bank holding only `rows` (ascending, distinct) of this one, in order,
  // with their ids, payloads, values, labels and expiries: every
  // computation on it equals the one on a bank built from those patterns.
  Bank Subset(absl::Span<const int64_t> rows) const;

  // Returns NOT_FOUND (and changes nothing) if any id is absent,
  // INVALID_ARGUMENT on a repeated id.
  absl::Status ValidateRemoval(absl::Span<const uint64_t> ids) const;
  // Removes validated ids, keeping the remaining patterns in order.
  void Remove(absl::Span<const uint64_t> ids);

  // Nearest stored memory to x (dim() floats) by Euclidean distance; row -1
  // for an empty bank or a non-finite x.
  NearestMemory Nearest(const float* x) const;
  // Nearest(x) when the nearest row is already known (e.g.
  // Trajectory::nearest_row); a negative `row` falls back to Nearest(x).
  NearestMemory NearestAt(int64_t row, const float* x) const;

 private:
  // The label indexes: key -> value -> rows (ascending); key -> (row,
  // value), rows ascending.
  struct LabelIndex {
    absl::flat_hash_map<std::string, absl::flat_hash_map<std::string, std::vector<int64_t>>>
        strings;
    absl::flat_hash_map<std::string, std::vector<std::pair<int64_t, int64_t>>> ints;
  };

  // Adds row r's labels to the label indexes (rows are indexed in order),
  // copying them first when another copy of the bank shares them.
  void IndexLabels(int64_t r);
  // Appends the reduced-precision copy of `data` (whole rows) for bf16,
  // screened and bit-packed banks.
  void PackRows(absl::Span<const float> data);

  BankSpec spec_;
  uint64_t next_id_;
  uint64_t version_;
  AppendArray<float> data_;      // size() x dim(), row-major
  AppendArray<float> sq_norms_;  // |xi_mu|^2
  AppendArray<uint16_t> bf16_;   // kBf16: data_ rounded to bf16
  AppendArray<int8_t> screen_;   // kF32Screened: PatternView::screen
  AppendArray<ScreenRow> screen_rows_;
  AppendArray<int32_t> screen_sums_;
  AppendArray<uint64_t> bits_;   // kBitPacked: one bit per value (+1 set)
  AppendArray<uint64_t> ids_;
  AppendArray<std::string> payloads_;
  AppendArray<float> values_;         // size() x spec_.value_dim
  AppendArray<Labels> labels_;        // one per row
  AppendArray<int64_t> expires_ms_;   // one per row, 0 for never
  AppendArray<int64_t> stored_ms_;    // one per row, 0 when unknown
  int64_t min_expires_ms_ = 0;
  uint64_t payload_bytes_ = 0;  // sum of the payloads' sizes
  uint64_t label_bytes_ = 0;    // sum of Labels::bytes()
  IdRowMap row_of_;
  std::shared_ptr<LabelIndex> labels_index_ = std::make_shared<LabelIndex>();
};

}  // namespace engram::core

#endif  // ENGRAM_CORE_BANK_H_
