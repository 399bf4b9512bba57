// Durable storage of banks behind a small interface. The SQLite
// implementation (WAL, synchronous=FULL) makes every call durable before it
// returns, and every call is one transaction: all of it or none.
//
//   ENGRAM_ASSIGN_OR_RETURN(auto storage, OpenSqliteStorage("data/engram.db"));
//   ENGRAM_RETURN_IF_ERROR(storage->CreateBank(spec));
//   ENGRAM_RETURN_IF_ERROR(storage->AppendPatterns("digits", ids, data, {}));
//
// Thread-safety: implementations are safe for concurrent use.
#ifndef ENGRAM_CORE_STORAGE_H_
#define ENGRAM_CORE_STORAGE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engram/core/bank.h"

namespace engram::core {

// Bookkeeping a mutation writes in its own transaction.
struct WriteMeta {
  // Nonzero: the sequence of the replicated-log entry this write applies,
  // recorded as the last applied one (LogSequence).
  uint64_t log_seq = 0;
  // Nonzero: the bank's next automatic id after this write (AppendPatterns).
  uint64_t next_id = 0;
};

class BankStorage {
 public:
  virtual ~BankStorage() = default;

  // Each returns OK once the change (with `meta`) is durable; INTERNAL (with
  // the storage engine's message) or RESOURCE_EXHAUSTED (disk full)
  // otherwise, in which case nothing changed.
  virtual absl::Status CreateBank(const BankSpec& spec, const WriteMeta& meta = {}) = 0;
  virtual absl::Status DeleteBank(std::string_view name, const WriteMeta& meta = {}) = 0;
  // `data` holds ids.size() rows of the bank's dimension; `payloads` is empty
  // or one per id; `extras` as for Bank::Append (values of the bank's
  // value_dim, normalized labels, expiry times), kept bit for bit.
  virtual absl::Status AppendPatterns(std::string_view bank,
                                      absl::Span<const uint64_t> ids,
                                      absl::Span<const float> data,
                                      absl::Span<const std::string> payloads,
                                      const PatternExtras& extras = {},
                                      const WriteMeta& meta = {}) = 0;
  virtual absl::Status DeletePatterns(std::string_view bank,
                                      absl::Span<const uint64_t> ids,
                                      const WriteMeta& meta = {}) = 0;

  // The last replicated-log sequence recorded by a write (0: none).
  virtual absl::StatusOr<uint64_t> LogSequence() = 0;

  // Calls `on_bank` for every bank (ordered by name) with its next automatic
  // id (0 when never recorded), followed by `on_pattern` for each of its
  // patterns in storage order.
  using BankVisitor = std::function<absl::Status(const BankSpec&, uint64_t next_id)>;
  struct StoredPattern {
    uint64_t id = 0;
    absl::Span<const float> data;    // dim floats
    std::string_view payload;
    absl::Span<const float> value;   // value_dim floats
    const Labels* labels = nullptr;  // never null
    int64_t expires_ms = 0;
    int64_t stored_ms = 0;           // Unix ms at which it was stored; 0 unknown
  };
  using PatternVisitor =
      std::function<absl::Status(std::string_view bank, const StoredPattern& pattern)>;
  virtual absl::Status LoadAll(const BankVisitor& on_bank,
                               const PatternVisitor& on_pattern) = 0;

  // Writes a consistent snapshot of every bank to a new database file at
  // `dest_path` (SQLite online backup: concurrent writes wait, nothing is
  // torn). ALREADY_EXISTS if the file exists; a storage error otherwise.
  virtual absl::Status Backup(const std::string& dest_path) = 0;
};

// Opens (creating if needed) a SQLite database at `path`; ":memory:" gives a
// private in-memory database for tests.
absl::StatusOr<std::unique_ptr<BankStorage>> OpenSqliteStorage(
    const std::string& path);

}  // namespace engram::core

#endif  // ENGRAM_CORE_STORAGE_H_
