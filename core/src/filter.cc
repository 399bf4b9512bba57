#include "engram/core/filter.h"

#include <algorithm>
#include <iterator>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"

namespace engram::core {
namespace {

// Rows of `bank` (ascending) that satisfy one condition.
std::vector<int64_t> ConditionRows(const Bank& bank, const Condition& c) {
  std::vector<int64_t> rows;
  switch (c.op) {
    case Condition::kEquals:
    case Condition::kAnyOf: {
      absl::flat_hash_set<std::string> seen;
      for (const std::string& v : c.strings) {
        if (!seen.insert(v).second) continue;
        absl::Span<const int64_t> p = bank.RowsWithString(c.key, v);
        rows.insert(rows.end(), p.begin(), p.end());
      }
      // Each row has one value per key, so the postings are disjoint.
      std::sort(rows.begin(), rows.end());
      break;
    }
    case Condition::kIntEquals:
    case Condition::kIntAnyOf: {
      absl::flat_hash_set<int64_t> want(c.ints.begin(), c.ints.end());
      for (const auto& [row, value] : bank.RowsWithInt(c.key)) {
        if (want.contains(value)) rows.push_back(row);
      }
      break;
    }
    case Condition::kIntRange:
      for (const auto& [row, value] : bank.RowsWithInt(c.key)) {
        if (value >= c.lo && value <= c.hi) rows.push_back(row);
      }
      break;
  }
  return rows;
}

}  // namespace

absl::Status ValidateFilter(const Filter& filter) {
  if (filter.conditions.size() > static_cast<size_t>(kMaxConditions)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "filter has ", filter.conditions.size(), " conditions; the limit is ", kMaxConditions));
  }
  for (size_t i = 0; i < filter.conditions.size(); ++i) {
    const Condition& c = filter.conditions[i];
    const std::string where = absl::StrCat("filter condition ", i, " (key '", c.key, "')");
    if (c.key.empty() || c.key.size() > kMaxLabelBytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "filter condition ", i, ": key must have 1 to ", kMaxLabelBytes, " bytes"));
    }
    size_t listed = 0;
    switch (c.op) {
      case Condition::kEquals:
      case Condition::kAnyOf:
        listed = c.strings.size();
        break;
      case Condition::kIntEquals:
      case Condition::kIntAnyOf:
        listed = c.ints.size();
        break;
      case Condition::kIntRange:
        if (c.lo > c.hi) {
          return absl::InvalidArgumentError(
              absl::StrCat(where, ": range has min ", c.lo, " > max ", c.hi));
        }
        listed = 1;
        break;
    }
    if (listed == 0) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": no value to match"));
    }
    if (listed > static_cast<size_t>(kMaxFilterValues)) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": ", listed, " values; the limit is ", kMaxFilterValues));
    }
  }
  return absl::OkStatus();
}

bool FilterMayExclude(const Bank& bank, const Filter& filter) {
  if (filter.has_conditions()) return true;
  return filter.now_ms > 0 && bank.min_expires_ms() > 0 && bank.min_expires_ms() <= filter.now_ms;
}

std::vector<int64_t> MatchingRows(const Bank& bank, const Filter& filter) {
  std::vector<int64_t> rows;
  if (filter.conditions.empty()) {
    rows.resize(bank.size());
    for (int64_t r = 0; r < bank.size(); ++r) rows[r] = r;
  } else {
    rows = ConditionRows(bank, filter.conditions[0]);
    for (size_t i = 1; i < filter.conditions.size() && !rows.empty(); ++i) {
      std::vector<int64_t> next = ConditionRows(bank, filter.conditions[i]);
      std::vector<int64_t> both;
      std::set_intersection(rows.begin(), rows.end(), next.begin(), next.end(),
                            std::back_inserter(both));
      rows = std::move(both);
    }
  }
  if (filter.now_ms > 0 && bank.min_expires_ms() > 0 && bank.min_expires_ms() <= filter.now_ms) {
    rows.erase(std::remove_if(rows.begin(), rows.end(),
                              [&](int64_t r) {
                                const int64_t e = bank.expires_ms(r);
                                return e > 0 && e <= filter.now_ms;
                              }),
               rows.end());
  }
  return rows;
}

std::string FilterKey(const Filter& filter) {
  std::string key;
  for (const Condition& c : filter.conditions) {
    absl::StrAppend(&key, c.key.size(), ":", c.key, "/", static_cast<int>(c.op), "/");
    for (const std::string& s : c.strings) absl::StrAppend(&key, s.size(), ":", s, ",");
    for (int64_t v : c.ints) absl::StrAppend(&key, v, ",");
    if (c.op == Condition::kIntRange) absl::StrAppend(&key, c.lo, "..", c.hi);
    key += ';';
  }
  return key;
}

}  // namespace engram::core
