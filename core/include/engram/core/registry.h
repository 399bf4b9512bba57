// BankRegistry: the named banks of one Engram instance, kept in memory for
// compute and in a BankStorage for durability.
//
//   ENGRAM_ASSIGN_OR_RETURN(auto storage, OpenSqliteStorage(path));
//   ENGRAM_ASSIGN_OR_RETURN(auto registry,
//                           BankRegistry::Open(std::move(storage), {}));
//   ENGRAM_RETURN_IF_ERROR(registry->CreateBank(spec).status());
//   ENGRAM_ASSIGN_OR_RETURN(StoreResult r, registry->Store("digits", data, {}, {}));
//   ENGRAM_ASSIGN_OR_RETURN(BankSnapshot bank, registry->Snapshot("digits"));
//   ... read *bank for as long as needed; no lock is held ...
//
// Every mutation is durable in storage before it becomes visible in memory
// and before the call returns; a failed mutation changes nothing.
//
// Readers pin versions. A bank is a sequence of immutable versions; a
// reader pins the current one (Snapshot) and reads it without any lock for
// as long as it likes, never seeing half of a batch. A mutation of a bank
// that no reader pins is applied in place; a mutation of a pinned version
// applies to a copy that is then published, so a Store or Delete never
// waits for a reader, and a reader waits for a writer only for the instant
// of swapping (or changing) an unpinned version. Versions share their rows
// (Bank, AppendArray): a Store under pinned readers writes only the new
// rows (amortised O(batch)), and the kernels still read one contiguous array
// per precision. A Delete or expiry builds the remaining rows into new
// arrays (O(K)).
//
// Thread-safety: all methods are safe to call concurrently. Mutations of one
// bank are serialised.
#ifndef ENGRAM_CORE_REGISTRY_H_
#define ENGRAM_CORE_REGISTRY_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "engram/core/bank.h"
#include "engram/core/capacity.h"
#include "engram/core/mutex.h"
#include "engram/core/storage.h"

namespace engram::core {

struct RegistryOptions {
  // Upper bound on the bytes of all banks; 0 means unlimited. A Store that
  // would exceed it fails with RESOURCE_EXHAUSTED before allocating.
  uint64_t memory_budget_bytes = 0;
  // The current Unix time in milliseconds, which expiry times are set from
  // and compared with; null means the system clock. Tests inject their own.
  std::function<int64_t()> clock_ms;
};

// What a Store may add beside rows, ids and payloads.
struct StoreExtras {
  // K * value_dim floats; required for a bank with values.
  absl::Span<const float> values;
  // Empty or one per pattern (normalized by the registry).
  absl::Span<const Labels> labels;
  // Time to live of these patterns in milliseconds; 0 means the bank's
  // ttl_ms (which may be 0: no expiry). At most kMaxTtlMs.
  int64_t ttl_ms = 0;
};

struct BankSummary {
  BankSpec spec;
  int64_t patterns = 0;
  uint64_t bytes = 0;
  double load = 0.0;  // K / N
  CapacityEstimate capacity;
  bool over_capacity = false;
};

// Where a mutation comes from when it applies an entry of a replicated log:
// the entry's sequence, recorded durably with the change (LogSequence), and
// the time the entry carries, used instead of the clock so that every
// replica computes the same expiry times. Zero values: a local write.
struct LogPosition {
  uint64_t seq = 0;
  int64_t now_ms = 0;
};

struct StoreResult {
  std::vector<uint64_t> ids;
  int64_t bank_patterns = 0;
};

// A pinned, immutable version of one bank; copies share the pin, which is
// released when the last copy goes.
using BankSnapshot = std::shared_ptr<const Bank>;

struct DeleteResult {
  int64_t deleted = 0;
  int64_t bank_patterns = 0;
};

class BankRegistry {
 public:
  // Loads every bank from `storage`. Returns the storage's error, or
  // DATA_LOSS when stored data is inconsistent.
  static absl::StatusOr<std::unique_ptr<BankRegistry>> Open(
      std::unique_ptr<BankStorage> storage, RegistryOptions options);

  // INVALID_ARGUMENT / FAILED_PRECONDITION / UNIMPLEMENTED from
  // ValidateBankSpec, ALREADY_EXISTS, or a storage error.
  absl::StatusOr<BankSummary> CreateBank(const BankSpec& spec, const LogPosition& at = {});
  // NOT_FOUND or a storage error.
  absl::Status DeleteBank(const std::string& name, const LogPosition& at = {});
  // NOT_FOUND.
  absl::StatusOr<BankSummary> GetBank(const std::string& name) const;
  // Every bank, ordered by name.
  std::vector<BankSummary> ListBanks() const;

  // Asked immediately before a write commits, under the bank's write lock:
  // an error aborts the write (nothing changes) and is returned.
  using CommitCheck = std::function<absl::Status()>;

  // Stores a batch atomically (see Bank::ValidateNewPatterns for the input
  // rules). NOT_FOUND, INVALID_ARGUMENT, ALREADY_EXISTS, RESOURCE_EXHAUSTED
  // (memory budget), `may_commit`'s error or a storage error.
  absl::StatusOr<StoreResult> Store(const std::string& name,
                                    absl::Span<const float> data,
                                    absl::Span<const uint64_t> ids,
                                    absl::Span<const std::string> payloads,
                                    const CommitCheck& may_commit = nullptr) {
    return Store(name, data, ids, payloads, StoreExtras{}, may_commit);
  }
  // The same with values, labels and a time to live (see StoreExtras).
  absl::StatusOr<StoreResult> Store(const std::string& name,
                                    absl::Span<const float> data,
                                    absl::Span<const uint64_t> ids,
                                    absl::Span<const std::string> payloads,
                                    const StoreExtras& extras,
                                    const CommitCheck& may_commit = nullptr,
                                    const LogPosition& at = {});
  // Deletes ids atomically: NOT_FOUND (nothing deleted) if any is absent.
  absl::StatusOr<DeleteResult> DeletePatterns(const std::string& name,
                                              absl::Span<const uint64_t> ids,
                                              const CommitCheck& may_commit = nullptr,
                                              const LogPosition& at = {});

  // Deletes, durably, every pattern of bank `name` whose expiry time is at
  // or before now (the clock, or at.now_ms); returns how many went (0 when
  // none was due), NOT_FOUND or a storage error (nothing deleted).
  absl::StatusOr<int64_t> ExpireBank(const std::string& name, const LogPosition& at = {});

  // The last replicated-log sequence a write recorded (0: none), or a
  // storage error.
  absl::StatusOr<uint64_t> LogSequence() { return storage_->LogSequence(); }

  // ExpireBank for every bank: the banks that lost patterns, with how many.
  // A bank whose storage fails is skipped (a later call retries it); the
  // first such error goes to *first_error when given.
  std::vector<std::pair<std::string, int64_t>> ExpireDue(absl::Status* first_error = nullptr);

  // The registry's clock: the current Unix time in milliseconds.
  int64_t NowMs() const;

  // The bank's current version, pinned; NOT_FOUND.
  absl::StatusOr<BankSnapshot> Snapshot(const std::string& name) const;

  // True while `snapshot` is the bank's current version (no write since it
  // was pinned).
  bool IsCurrent(const std::string& name, const BankSnapshot& snapshot) const;

  // Runs `fn` on a pinned snapshot of the bank (no lock held); returns
  // NOT_FOUND or fn's status.
  absl::Status WithBank(const std::string& name,
                        const std::function<absl::Status(const Bank&)>& fn) const;

  // A consistent snapshot of every bank to `dest_path` (see
  // BankStorage::Backup).
  absl::Status Backup(const std::string& dest_path) { return storage_->Backup(dest_path); }

  uint64_t total_bytes() const { return total_bytes_.load(); }

 private:
  // One version of a bank and the number of snapshots pinning it.
  struct Version {
    explicit Version(Bank b) : bank(std::move(b)) {}
    Bank bank;
    std::atomic<int64_t> pins{0};
  };
  struct Entry {
    explicit Entry(Bank b) : current(std::make_shared<Version>(std::move(b))) {}
    // Serialises the mutations of this bank (held across the storage write).
    Mutex write_mu;
    // Guards `current` and `deleted`: held to pin, to swap in a new version,
    // or to mutate an unpinned version in place.
    mutable Mutex mu;
    std::shared_ptr<Version> current ABSL_GUARDED_BY(mu);
    bool deleted ABSL_GUARDED_BY(mu) = false;
  };

  BankRegistry(std::unique_ptr<BankStorage> storage, RegistryOptions options);
  std::shared_ptr<Entry> Find(const std::string& name) const;
  static BankSummary Summarize(const Bank& bank);
  // The summary of e's current version, read under e.mu without pinning
  // it; NOT_FOUND once the bank is deleted.
  static absl::StatusOr<BankSummary> SummarizeCurrent(const std::string& name, const Entry& e);
  // Pins e's current version; NOT_FOUND once the bank is deleted.
  static absl::StatusOr<BankSnapshot> Pin(const std::string& name, const Entry& e);
  // Applies `mutate` to e's current version, in place when no snapshot pins
  // it, else to a copy (sharing its rows) that then becomes current. Needs
  // e.write_mu.
  static void Mutate(Entry& e, const std::function<void(Bank&)>& mutate);

  std::unique_ptr<BankStorage> storage_;
  RegistryOptions options_;
  mutable SharedMutex mu_;
  std::map<std::string, std::shared_ptr<Entry>> banks_ ABSL_GUARDED_BY(mu_);
  std::atomic<uint64_t> total_bytes_{0};
};

}  // namespace engram::core

#endif  // ENGRAM_CORE_REGISTRY_H_
