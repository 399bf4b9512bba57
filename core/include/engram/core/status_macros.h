// Error-propagation helpers for absl::Status / absl::StatusOr.
//
// Debian's Abseil (20220623) ships no ABSL_RETURN_IF_ERROR, so Engram defines
// its own two macros here, once.
//
//   absl::Status Load() {
//     ENGRAM_RETURN_IF_ERROR(Open());
//     ENGRAM_ASSIGN_OR_RETURN(auto rows, ReadRows());
//     ...
//   }
#ifndef ENGRAM_CORE_STATUS_MACROS_H_
#define ENGRAM_CORE_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define ENGRAM_STATUS_CONCAT_INNER_(a, b) a##b
#define ENGRAM_STATUS_CONCAT_(a, b) ENGRAM_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function when `expr` is not OK.
#define ENGRAM_RETURN_IF_ERROR(expr)                  \
  do {                                                \
    ::absl::Status engram_status_ = (expr);           \
    if (!engram_status_.ok()) return engram_status_;  \
  } while (0)

// Evaluates a StatusOr expression; returns its status on error, otherwise
// moves the value into `lhs` (which may be a declaration).
#define ENGRAM_ASSIGN_OR_RETURN(lhs, expr) \
  ENGRAM_ASSIGN_OR_RETURN_IMPL_(           \
      ENGRAM_STATUS_CONCAT_(engram_statusor_, __LINE__), lhs, expr)

#define ENGRAM_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                  \
  if (!tmp.ok()) return tmp.status();                 \
  lhs = std::move(tmp).value()

#endif  // ENGRAM_CORE_STATUS_MACROS_H_
