#include "engram/core/bank.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

#include <Eigen/Core>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "fused.h"
#include "kernels/kernels.h"

namespace engram::core {
namespace {

bool NameChar(char c, bool first) {
  if ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')) return true;
  return !first && (c == '_' || c == '.' || c == '-');
}

}  // namespace

absl::Status ValidateBankName(std::string_view name) {
  if (name.empty() || name.size() > 64) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bank name must be 1 to 64 characters matching "
        "[a-z0-9][a-z0-9_.-]{0,63}, got ", name.size(), " characters"));
  }
  for (size_t i = 0; i < name.size(); ++i) {
    if (!NameChar(name[i], i == 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "bank name must match [a-z0-9][a-z0-9_.-]{0,63}; bad character at "
          "position ", i));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateBankSpec(const BankSpec& spec) {
  if (auto s = ValidateBankName(spec.name); !s.ok()) return s;
  if (spec.dim < 1 || spec.dim > kMaxDim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dim must be in [1, ", kMaxDim, "], got ", spec.dim));
  }
  if (spec.value_dim < 0 || spec.value_dim > kMaxDim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "value_dim must be in [0, ", kMaxDim, "], got ", spec.value_dim));
  }
  if (spec.ttl_ms < 0 || spec.ttl_ms > kMaxTtlMs) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ttl must be in [0, ", kMaxTtlMs / 1000, "] seconds, got ", spec.ttl_ms / 1000));
  }
  if (spec.precision == Precision::kBitPacked && spec.kind != StateKind::kBipolar) {
    return absl::FailedPreconditionError(
        "precision bit_packed stores +-1 patterns; it needs a bipolar bank");
  }
  if (auto s = ValidateEnergyConfig(spec.energy, spec.kind); !s.ok()) return s;
  return ValidateDecay(spec.decay_half_life_ms, spec.energy, spec.kind);
}

absl::Status ValidateDecay(int64_t half_life_ms, const EnergyConfig& energy, StateKind kind) {
  if (half_life_ms < 0 || half_life_ms > kMaxTtlMs) {
    return absl::InvalidArgumentError(absl::StrCat("decay half-life must be in [0, ",
                                                   kMaxTtlMs / 1000, "] seconds, got ",
                                                   half_life_ms / 1000.0));
  }
  if (half_life_ms == 0) return absl::OkStatus();
  if (kind != StateKind::kContinuous) {
    return absl::FailedPreconditionError(
        "decay with age weighs the softmax of a continuous bank; this bank is bipolar");
  }
  const bool softmax =
      energy.family == EnergyFamily::kLse || energy.family == EnergyFamily::kGaussian ||
      (energy.family == EnergyFamily::kGeneral && energy.separation == SeparationKind::kSoftmax &&
       energy.similarity != SimilarityKind::kNegL1);
  if (!softmax) {
    return absl::FailedPreconditionError(absl::StrCat(
        "this bank decays with age, which scales softmax weights; energy family ",
        EnergyFamilyName(energy.family),
        energy.family == EnergyFamily::kGeneral ? " with this separation and similarity" : "",
        " has none (use lse, gaussian, or general with softmax over dot or l2)"));
  }
  return absl::OkStatus();
}

std::vector<double> Bank::LogPrior(int64_t now_ms) const {
  if (!decays()) return {};
  std::vector<double> prior(size());
  const double per_ms = -std::log(2.0) / static_cast<double>(spec_.decay_half_life_ms);
  for (int64_t r = 0; r < size(); ++r) {
    const int64_t t = stored_ms_[r];
    prior[r] = t == 0 ? 0.0 : per_ms * static_cast<double>(std::max<int64_t>(0, now_ms - t));
  }
  return prior;
}

absl::Status Labels::Normalize() {
  if (strings.size() + ints.size() > static_cast<size_t>(kMaxLabels)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a pattern has ", strings.size() + ints.size(), " labels; the limit is ", kMaxLabels));
  }
  auto by_key = [](const auto& a, const auto& b) { return a.first < b.first; };
  std::sort(strings.begin(), strings.end(), by_key);
  std::sort(ints.begin(), ints.end(), by_key);
  absl::flat_hash_set<std::string_view> keys;
  auto check_key = [&](const std::string& key) -> absl::Status {
    if (key.empty() || key.size() > kMaxLabelBytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "a label key must have 1 to ", kMaxLabelBytes, " bytes, got ", key.size()));
    }
    if (!keys.insert(key).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("label key '", key, "' appears twice on one pattern"));
    }
    return absl::OkStatus();
  };
  for (const auto& [key, value] : strings) {
    if (auto s = check_key(key); !s.ok()) return s;
    if (value.size() > kMaxLabelBytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "label '", key, "' has a ", value.size(), "-byte value; the limit is ",
          kMaxLabelBytes));
    }
  }
  for (const auto& entry : ints) {
    if (auto s = check_key(entry.first); !s.ok()) return s;
  }
  return absl::OkStatus();
}

namespace {
uint64_t NextVersion() {
  static std::atomic<uint64_t> counter{0};
  return counter.fetch_add(1, std::memory_order_relaxed) + 1;
}
}  // namespace

Bank::Bank(BankSpec spec, uint64_t next_id)
    : spec_(std::move(spec)), next_id_(next_id == 0 ? 1 : next_id), version_(NextVersion()) {}

uint64_t Bank::bytes() const {
  uint64_t b = data_.size() * sizeof(float) + sq_norms_.size() * sizeof(float) +
               ids_.size() * sizeof(uint64_t) + bf16_.size() * sizeof(uint16_t) +
               screen_.size() + screen_rows_.size() * sizeof(ScreenRow) +
               screen_sums_.size() * sizeof(int32_t) +
               bits_.size() * sizeof(uint64_t);
  b += payload_bytes_ + label_bytes_;
  b += values_.size() * sizeof(float) + (expires_ms_.size() + stored_ms_.size()) * sizeof(int64_t);
  return b;
}

PatternView Bank::view() const {
  PatternView v{data_.data(), sq_norms_.data(), size(), dim()};
  if (spec_.precision == Precision::kBf16) v.bf16 = bf16_.data();
  if (spec_.precision == Precision::kBitPacked) v.bits = bits_.data();
  if (spec_.precision == Precision::kF32Screened && dim() <= kMaxScreenDim) {
    v.screen = screen_.data();
    v.screen_rows = screen_rows_.data();
    v.screen_sums = screen_sums_.data();
  }
  return v;
}

absl::Span<const int64_t> Bank::RowsWithString(const std::string& key,
                                               const std::string& value) const {
  auto k = labels_index_->strings.find(key);
  if (k == labels_index_->strings.end()) return {};
  auto v = k->second.find(value);
  if (v == k->second.end()) return {};
  return v->second;
}

absl::Span<const std::pair<int64_t, int64_t>> Bank::RowsWithInt(const std::string& key) const {
  auto k = labels_index_->ints.find(key);
  if (k == labels_index_->ints.end()) return {};
  return k->second;
}

std::optional<int64_t> Bank::RowOf(uint64_t id) const {
  return row_of_.Find(id);
}

absl::Status Bank::ValidateNewPatterns(
    absl::Span<const float> data, absl::Span<const uint64_t> ids,
    absl::Span<const std::string> payloads, const PatternExtras& extras) const {
  const int n = dim();
  if (data.empty()) {
    return absl::InvalidArgumentError("patterns must not be empty");
  }
  if (data.size() % n != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "patterns has ", data.size(), " floats, not a multiple of the bank's "
        "dimension ", n));
  }
  const size_t k = data.size() / n;
  if (!ids.empty() && ids.size() != k) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ids has ", ids.size(), " entries for ", k, " patterns"));
  }
  if (!payloads.empty() && payloads.size() != k) {
    return absl::InvalidArgumentError(absl::StrCat(
        "payloads has ", payloads.size(), " entries for ", k, " patterns"));
  }
  for (size_t i = 0; i < data.size(); ++i) {
    const float v = data[i];
    if (!std::isfinite(v)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "pattern ", i / n, " coordinate ", i % n, " is not finite"));
    }
    if (spec_.kind == StateKind::kBipolar && v != 1.0f && v != -1.0f) {
      return absl::InvalidArgumentError(absl::StrCat(
          "bank is bipolar but pattern ", i / n, " coordinate ", i % n,
          " is ", v, " (expected +1 or -1)"));
    }
  }
  const size_t m = static_cast<size_t>(spec_.value_dim);
  if (m == 0 && !extras.values.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bank '", spec_.name, "' has no values (value_dim 0); values must be empty"));
  }
  if (m > 0 && extras.values.size() != k * m) {
    return absl::InvalidArgumentError(absl::StrCat(
        "values has ", extras.values.size(), " floats; bank '", spec_.name,
        "' needs one value of ", m, " floats per pattern (", k * m, ")"));
  }
  for (size_t i = 0; i < extras.values.size(); ++i) {
    if (!std::isfinite(extras.values[i])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "value ", i / m, " coordinate ", i % m, " is not finite"));
    }
  }
  if (!extras.labels.empty() && extras.labels.size() != k) {
    return absl::InvalidArgumentError(absl::StrCat(
        "labels has ", extras.labels.size(), " entries for ", k, " patterns"));
  }
  for (size_t i = 0; i < extras.labels.size(); ++i) {
    Labels copy = extras.labels[i];
    if (auto s = copy.Normalize(); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("labels of pattern ", i, ": ", s.message()));
    }
  }
  if (!extras.expires_ms.empty() && extras.expires_ms.size() != k) {
    return absl::InvalidArgumentError(absl::StrCat(
        "expiries has ", extras.expires_ms.size(), " entries for ", k, " patterns"));
  }
  for (int64_t e : extras.expires_ms) {
    if (e < 0) return absl::InvalidArgumentError("an expiry time is negative");
  }
  if (!extras.stored_ms.empty() && extras.stored_ms.size() != k) {
    return absl::InvalidArgumentError(absl::StrCat(
        "store times has ", extras.stored_ms.size(), " entries for ", k, " patterns"));
  }
  for (int64_t t : extras.stored_ms) {
    if (t < 0) return absl::InvalidArgumentError("a store time is negative");
  }
  for (size_t i = 0; i < payloads.size(); ++i) {
    if (payloads[i].size() > kMaxPayloadBytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "payload ", i, " has ", payloads[i].size(), " bytes; the limit is ",
          kMaxPayloadBytes));
    }
  }
  absl::flat_hash_set<uint64_t> seen;
  for (uint64_t id : ids) {
    if (!seen.insert(id).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("id ", id, " appears twice in the request"));
    }
    if (row_of_.contains(id)) {
      return absl::AlreadyExistsError(absl::StrCat(
          "id ", id, " already exists in bank '", spec_.name, "'"));
    }
  }
  return absl::OkStatus();
}

std::vector<uint64_t> Bank::AssignIds(int64_t count) const {
  std::vector<uint64_t> out;
  out.reserve(count);
  uint64_t next = next_id_;
  while (static_cast<int64_t>(out.size()) < count) {
    if (!row_of_.contains(next)) out.push_back(next);
    ++next;
  }
  return out;
}

void Bank::Append(absl::Span<const float> data, absl::Span<const uint64_t> ids,
                  absl::Span<const std::string> payloads, const PatternExtras& extras) {
  const int n = dim();
  const size_t k = ids.size();
  const int64_t first = size();
  version_ = NextVersion();
  data_.Append(data.data(), data.size());
  PackRows(data);
  if (spec_.value_dim > 0) {
    float* v = values_.Grow(k * spec_.value_dim);  // zeros when none are given
    std::copy(extras.values.begin(), extras.values.end(), v);
  }
  Labels* labels = labels_.Grow(k);
  int64_t* expires = expires_ms_.Grow(k);
  int64_t* stored = stored_ms_.Grow(k);
  float* sq_norms = sq_norms_.Grow(k);
  uint64_t* row_ids = ids_.Grow(k);
  std::string* row_payloads = payloads_.Grow(k);
  for (size_t r = 0; r < k; ++r) {
    if (!extras.labels.empty()) {
      labels[r] = extras.labels[r];
      label_bytes_ += labels[r].bytes();
      IndexLabels(first + static_cast<int64_t>(r));
    }
    expires[r] = extras.expires_ms.empty() ? 0 : extras.expires_ms[r];
    stored[r] = extras.stored_ms.empty() ? 0 : extras.stored_ms[r];
    if (expires[r] > 0 && (min_expires_ms_ == 0 || expires[r] < min_expires_ms_)) {
      min_expires_ms_ = expires[r];
    }
    Eigen::Map<const Eigen::VectorXf> row(data.data() + r * n, n);
    sq_norms[r] = static_cast<float>(row.cast<double>().squaredNorm());
    row_of_.Insert(ids[r], first + static_cast<int64_t>(r));
    row_ids[r] = ids[r];
    if (!payloads.empty()) {
      row_payloads[r] = payloads[r];
      payload_bytes_ += payloads[r].size();
    }
    if (ids[r] >= next_id_ && ids[r] != std::numeric_limits<uint64_t>::max()) {
      next_id_ = ids[r] + 1;
    }
  }
}

absl::Status Bank::ValidateRemoval(absl::Span<const uint64_t> ids) const {
  if (ids.empty()) return absl::InvalidArgumentError("ids must not be empty");
  absl::flat_hash_set<uint64_t> seen;
  for (uint64_t id : ids) {
    if (!seen.insert(id).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("id ", id, " appears twice in the request"));
    }
    if (!row_of_.contains(id)) {
      return absl::NotFoundError(absl::StrCat(
          "id ", id, " is not in bank '", spec_.name, "'"));
    }
  }
  return absl::OkStatus();
}

void Bank::Remove(absl::Span<const uint64_t> ids) {
  absl::flat_hash_set<uint64_t> drop(ids.begin(), ids.end());
  std::vector<int64_t> kept;
  kept.reserve(size());
  for (int64_t r = 0; r < size(); ++r) {
    if (!drop.contains(ids_[r])) kept.push_back(r);
  }
  // Fresh arrays: other copies of this bank keep reading the old ones.
  *this = Subset(kept);
}

void Bank::PackRows(absl::Span<const float> data) {
  const int n = dim();
  if (spec_.precision == Precision::kBf16) {
    uint16_t* out = bf16_.Grow(data.size());
    for (size_t i = 0; i < data.size(); ++i) out[i] = kernels::FloatToBf16(data[i]);
  } else if (spec_.precision == Precision::kF32Screened && n <= kMaxScreenDim) {
    // The f32 dot kernels sum with at most n/4 + 8 sequential roundings per
    // lane and reduction, so they are within (n/4 + 8) 2^-24 |xi| |x| of the
    // exact dot product; the screen adds |xi - xi~| |x| + |xi~| |x - x~|
    // (ScreenRow). The bounds are computed in double and rounded up.
    const size_t k = data.size() / n;
    const double acc_rel = (n / 4.0 + 8.0) * 0x1p-24;
    int8_t* screen = screen_.Grow(data.size());
    ScreenRow* rows = screen_rows_.Grow(k);
    int32_t* sums = screen_sums_.Grow(k);
    for (size_t r = 0; r < k; ++r) {
      const float* v = data.data() + r * n;
      int8_t* q = screen + r * n;
      ScreenRow row;
      row.scale = kernels::QuantizeToInt8(v, n, q);
      int32_t sum = 0;
      double d2 = 0.0, q2 = 0.0, v2 = 0.0;
      for (int i = 0; i < n; ++i) {
        const double t = double{row.scale} * q[i];
        d2 += (double{v[i]} - t) * (double{v[i]} - t);
        q2 += t * t;
        v2 += double{v[i]} * v[i];
        sum += q[i];
      }
      const double up = 1.0 + 0x1p-20;
      row.err = static_cast<float>((std::sqrt(d2) + acc_rel * std::sqrt(v2)) * up + 0x1p-100);
      row.norm = static_cast<float>(std::sqrt(q2) * up + 0x1p-100);
      rows[r] = row;
      sums[r] = sum;
    }
  } else if (spec_.precision == Precision::kBitPacked) {
    const int words = kernels::BitWords(n);
    const size_t k = data.size() / n;
    uint64_t* bits = bits_.Grow(k * words);  // zeros
    for (size_t r = 0; r < k; ++r) {
      for (int i = 0; i < n; ++i) {
        if (data[r * n + i] > 0.f) bits[r * words + (i >> 6)] |= uint64_t{1} << (i & 63);
      }
    }
  }
}

void Bank::IndexLabels(int64_t r) {
  const Labels& l = labels_[r];
  if (l.empty()) return;
  if (labels_index_.use_count() > 1) labels_index_ = std::make_shared<LabelIndex>(*labels_index_);
  LabelIndex& index = *labels_index_;  // only this bank holds it now
  for (const auto& [key, value] : l.strings) index.strings[key][value].push_back(r);
  for (const auto& [key, value] : l.ints) index.ints[key].emplace_back(r, value);
}

Bank Bank::Subset(absl::Span<const int64_t> rows) const {
  Bank out(spec_, next_id_);
  const int n = dim();
  const int m = spec_.value_dim;
  const size_t k = rows.size();
  std::vector<float> data(k * n), values(k * m);
  std::vector<uint64_t> ids(k);
  std::vector<std::string> payloads(k);
  std::vector<Labels> labels(k);
  std::vector<int64_t> expires(k), stored(k);
  for (size_t i = 0; i < k; ++i) {
    const int64_t r = rows[i];
    std::copy(pattern(r), pattern(r) + n, data.begin() + i * n);
    if (m > 0) std::copy(value(r), value(r) + m, values.begin() + i * m);
    ids[i] = ids_[r];
    payloads[i] = payloads_[r];
    labels[i] = labels_[r];
    expires[i] = expires_ms_[r];
    stored[i] = stored_ms_[r];
  }
  out.Append(data, ids, payloads, PatternExtras{values, labels, expires, stored});
  out.next_id_ = next_id_;
  return out;
}

NearestMemory Bank::Nearest(const float* x) const {
  NearestMemory best;
  if (size() == 0) return best;
  // argmax of x.xi - |xi|^2/2 is the argmin of |x - xi|.
  std::vector<double> score(size());
  internal::FastSimilarities(view(), SimilarityKind::kNegHalfSqL2, x, score.data());
  double best_key = -std::numeric_limits<double>::infinity();
  for (int64_t r = 0; r < size(); ++r) {
    if (score[r] > best_key) {
      best_key = score[r];
      best.row = r;
    }
  }
  // A non-finite state has no nearest memory.
  if (best.row < 0) return best;
  return NearestAt(best.row, x);
}

NearestMemory Bank::NearestAt(int64_t row, const float* x) const {
  if (row < 0 || row >= size()) return Nearest(x);
  const int n = dim();
  NearestMemory best;
  best.row = row;
  // Exact distance of the winner, in double.
  const float* p = pattern(best.row);
  double d2 = 0.0, dot = 0.0;
  for (int i = 0; i < n; ++i) {
    const double d = double{p[i]} - x[i];
    d2 += d * d;
    dot += double{p[i]} * x[i];
  }
  best.id = ids_[best.row];
  best.distance = std::sqrt(d2);
  best.similarity = dot;
  return best;
}

}  // namespace engram::core
