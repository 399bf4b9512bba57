// Filtered retrieval: the patterns of a bank whose labels match a filter,
// and whether they are still alive at a given time.
//
//   Filter f;
//   f.conditions.push_back({.key = "lang", .op = Condition::kAnyOf, .strings = {"en", "fr"}});
//   f.conditions.push_back({.key = "year", .op = Condition::kIntRange, .lo = 2000, .hi = 2009});
//   f.now_ms = NowMs();
//   ENGRAM_RETURN_IF_ERROR(ValidateFilter(f));
//   std::vector<int64_t> rows = MatchingRows(bank, f);
//   Bank only = bank.Subset(rows);   // compute on `only` exactly as on a bank of those patterns
//
// Conditions are answered from the bank's label indexes (string postings
// and per-key integer columns), so a filter's cost is the size of the
// postings it reads, not the bank's.
#ifndef ENGRAM_CORE_FILTER_H_
#define ENGRAM_CORE_FILTER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "engram/core/bank.h"

namespace engram::core {

struct Condition {
  enum Op {
    kEquals,     // string label `key` equals strings[0]
    kAnyOf,      // string label `key` is one of `strings`
    kIntEquals,  // integer label `key` equals ints[0]
    kIntAnyOf,   // integer label `key` is one of `ints`
    kIntRange,   // integer label `key` in [lo, hi]
  };
  std::string key;
  Op op = kEquals;
  std::vector<std::string> strings;
  std::vector<int64_t> ints;
  int64_t lo = 0;
  int64_t hi = 0;
};

// A pattern passes when every condition holds (a pattern without the key
// fails that condition) and, with now_ms > 0, it has not expired (its expiry
// is 0 or later than now_ms).
struct Filter {
  std::vector<Condition> conditions;
  int64_t now_ms = 0;

  bool has_conditions() const { return !conditions.empty(); }
};

// Largest number of conditions and of listed values in one filter.
inline constexpr int kMaxConditions = 16;
inline constexpr int kMaxFilterValues = 1024;

// INVALID_ARGUMENT naming the condition when a key is empty or too long,
// a list is empty or too long, or a range has lo > hi.
absl::Status ValidateFilter(const Filter& filter);

// True when `filter` may leave rows of `bank` out: it has conditions, or
// some row has expired at filter.now_ms.
bool FilterMayExclude(const Bank& bank, const Filter& filter);

// The rows of `bank` that pass, ascending.
std::vector<int64_t> MatchingRows(const Bank& bank, const Filter& filter);

// A stable text form of the filter's conditions (equal filters give equal
// keys), for grouping calls that may share a pass.
std::string FilterKey(const Filter& filter);

}  // namespace engram::core

#endif  // ENGRAM_CORE_FILTER_H_
