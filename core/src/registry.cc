#include "engram/core/registry.h"

#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "engram/core/status_macros.h"

namespace engram::core {

BankRegistry::BankRegistry(std::unique_ptr<BankStorage> storage,
                           RegistryOptions options)
    : storage_(std::move(storage)), options_(options) {}

absl::StatusOr<std::unique_ptr<BankRegistry>> BankRegistry::Open(
    std::unique_ptr<BankStorage> storage, RegistryOptions options) {
  std::unique_ptr<BankRegistry> r(new BankRegistry(std::move(storage), options));
  // Nothing else sees the registry while it loads: banks are built directly.
  std::map<std::string, Bank> loaded;
  ENGRAM_RETURN_IF_ERROR(r->storage_->LoadAll(
      [&](const BankSpec& spec, uint64_t next_id) -> absl::Status {
        if (auto s = ValidateBankSpec(spec); !s.ok()) {
          return absl::DataLossError(absl::StrCat(
              "stored bank '", spec.name, "' is invalid: ", s.message()));
        }
        loaded.insert_or_assign(spec.name, Bank(spec, next_id));
        return absl::OkStatus();
      },
      [&](std::string_view bank, const BankStorage::StoredPattern& sp) -> absl::Status {
        auto it = loaded.find(std::string(bank));
        if (it == loaded.end()) {
          return absl::DataLossError(absl::StrCat("pattern of unknown bank ", std::string(bank)));
        }
        std::string p(sp.payload);
        const uint64_t ids[1] = {sp.id};
        PatternExtras extras;
        extras.values = sp.value;
        extras.labels = absl::MakeConstSpan(sp.labels, 1);
        extras.expires_ms = absl::MakeConstSpan(&sp.expires_ms, 1);
        extras.stored_ms = absl::MakeConstSpan(&sp.stored_ms, 1);
        it->second.Append(sp.data, ids, absl::MakeConstSpan(&p, 1), extras);
        return absl::OkStatus();
      }));
  uint64_t total = 0;
  MutexLock lock(&r->mu_);
  for (auto& [name, bank] : loaded) {
    total += bank.bytes();
    r->banks_[name] = std::make_shared<Entry>(std::move(bank));
  }
  r->total_bytes_ = total;
  return r;
}

BankSummary BankRegistry::Summarize(const Bank& bank) {
  BankSummary s;
  s.spec = bank.spec();
  s.patterns = bank.size();
  s.bytes = bank.bytes();
  s.load = static_cast<double>(bank.size()) / bank.dim();
  s.capacity = TheoreticalCapacity(bank.spec().energy, bank.spec().kind, bank.dim());
  s.over_capacity = static_cast<double>(bank.size()) > s.capacity.patterns;
  return s;
}

std::shared_ptr<BankRegistry::Entry> BankRegistry::Find(
    const std::string& name) const {
  ReaderMutexLock lock(&mu_);
  auto it = banks_.find(name);
  return it == banks_.end() ? nullptr : it->second;
}

absl::StatusOr<BankSnapshot> BankRegistry::Pin(const std::string& name, const Entry& e) {
  std::shared_ptr<Version> v;
  {
    MutexLock lock(&e.mu);
    if (e.deleted) return absl::NotFoundError(absl::StrCat("bank '", name, "' not found"));
    v = e.current;
    // Pins are taken only under e.mu, so a writer holding it that reads 0
    // knows none can appear until it lets go.
    v->pins.fetch_add(1, std::memory_order_relaxed);
  }
  const Bank* bank = &v->bank;
  // The release pairs with the writer's acquire load: every read of the
  // version happens before a writer may change it in place.
  return BankSnapshot(bank, [v = std::move(v)](const Bank*) {
    v->pins.fetch_sub(1, std::memory_order_release);
  });
}

void BankRegistry::Mutate(Entry& e, const std::function<void(Bank&)>& mutate) {
  const Version* shared = nullptr;
  {
    MutexLock lock(&e.mu);
    if (e.current->pins.load(std::memory_order_acquire) == 0) {
      mutate(e.current->bank);
      return;
    }
    shared = e.current.get();
  }
  // Only the holder of write_mu replaces or changes `current`, so `shared`
  // stays current (and, being pinned, unchanged) while the next version is
  // built from it: the copy shares its rows, and what mutate appends lies
  // beyond every row `shared` reads.
  auto next = std::make_shared<Version>(shared->bank);
  mutate(next->bank);
  MutexLock lock(&e.mu);
  e.current = std::move(next);
}

absl::StatusOr<BankSummary> BankRegistry::CreateBank(const BankSpec& spec,
                                                     const LogPosition& at) {
  ENGRAM_RETURN_IF_ERROR(ValidateBankSpec(spec));
  MutexLock lock(&mu_);
  if (banks_.contains(spec.name)) {
    return absl::AlreadyExistsError(
        absl::StrCat("bank '", spec.name, "' already exists"));
  }
  ENGRAM_RETURN_IF_ERROR(storage_->CreateBank(spec, WriteMeta{.log_seq = at.seq}));
  Bank bank(spec);
  BankSummary summary = Summarize(bank);
  banks_[spec.name] = std::make_shared<Entry>(std::move(bank));
  return summary;
}

absl::Status BankRegistry::DeleteBank(const std::string& name, const LogPosition& at) {
  MutexLock lock(&mu_);
  auto it = banks_.find(name);
  if (it == banks_.end()) {
    return absl::NotFoundError(absl::StrCat("bank '", name, "' not found"));
  }
  std::shared_ptr<Entry> entry = it->second;
  MutexLock write_lock(&entry->write_mu);
  ENGRAM_RETURN_IF_ERROR(storage_->DeleteBank(name, WriteMeta{.log_seq = at.seq}));
  {
    MutexLock entry_lock(&entry->mu);
    entry->deleted = true;
    total_bytes_ -= entry->current->bank.bytes();
  }
  banks_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<BankSnapshot> BankRegistry::Snapshot(const std::string& name) const {
  std::shared_ptr<Entry> e = Find(name);
  if (e == nullptr) return absl::NotFoundError(absl::StrCat("bank '", name, "' not found"));
  return Pin(name, *e);
}

bool BankRegistry::IsCurrent(const std::string& name, const BankSnapshot& snapshot) const {
  std::shared_ptr<Entry> e = Find(name);
  if (e == nullptr) return false;
  MutexLock lock(&e->mu);
  return !e->deleted && &e->current->bank == snapshot.get();
}

absl::StatusOr<BankSummary> BankRegistry::GetBank(const std::string& name) const {
  std::shared_ptr<Entry> e = Find(name);
  if (e == nullptr) return absl::NotFoundError(absl::StrCat("bank '", name, "' not found"));
  return SummarizeCurrent(name, *e);
}

absl::StatusOr<BankSummary> BankRegistry::SummarizeCurrent(const std::string& name,
                                                           const Entry& e) {
  // Read under e.mu, not pinned: a pin taken only to read the counts would
  // make a concurrent write copy the whole bank.
  MutexLock lock(&e.mu);
  if (e.deleted) return absl::NotFoundError(absl::StrCat("bank '", name, "' not found"));
  return Summarize(e.current->bank);
}

std::vector<BankSummary> BankRegistry::ListBanks() const {
  std::vector<std::pair<std::string, std::shared_ptr<Entry>>> entries;
  {
    ReaderMutexLock lock(&mu_);
    for (const auto& [name, e] : banks_) entries.emplace_back(name, e);
  }
  std::vector<BankSummary> out;
  for (const auto& [name, e] : entries) {
    absl::StatusOr<BankSummary> summary = SummarizeCurrent(name, *e);
    if (summary.ok()) out.push_back(*std::move(summary));
  }
  return out;
}

int64_t BankRegistry::NowMs() const {
  if (options_.clock_ms) return options_.clock_ms();
  return absl::ToUnixMillis(absl::Now());
}

absl::StatusOr<StoreResult> BankRegistry::Store(
    const std::string& name, absl::Span<const float> data,
    absl::Span<const uint64_t> ids, absl::Span<const std::string> payloads,
    const StoreExtras& extras, const CommitCheck& may_commit, const LogPosition& at) {
  if (extras.ttl_ms < 0 || extras.ttl_ms > kMaxTtlMs) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ttl must be in [0, ", kMaxTtlMs / 1000, "] seconds, got ", extras.ttl_ms / 1000));
  }
  std::shared_ptr<Entry> e = Find(name);
  if (e == nullptr) {
    return absl::NotFoundError(absl::StrCat("bank '", name, "' not found"));
  }
  MutexLock write_lock(&e->write_mu);
  // The writer's view: only write_mu's holder changes the current version.
  ENGRAM_ASSIGN_OR_RETURN(BankSnapshot current, Pin(name, *e));
  const Bank& bank = *current;
  PatternExtras checked{extras.values, extras.labels, {}};
  ENGRAM_RETURN_IF_ERROR(bank.ValidateNewPatterns(data, ids, payloads, checked));
  const int64_t k = static_cast<int64_t>(data.size()) / bank.dim();
  std::vector<Labels> labels(extras.labels.begin(), extras.labels.end());
  for (Labels& l : labels) l.Normalize().IgnoreError();  // validated above
  const int64_t ttl = extras.ttl_ms > 0 ? extras.ttl_ms : bank.spec().ttl_ms;
  const int64_t now = at.now_ms != 0 ? at.now_ms : NowMs();
  std::vector<int64_t> expires;
  if (ttl > 0) expires.assign(k, now + ttl);
  const std::vector<int64_t> stored_at(k, now);
  const PatternExtras stored{extras.values, labels, expires, stored_at};
  uint64_t add = data.size() * sizeof(float) + k * (sizeof(float) + sizeof(uint64_t)) +
                 extras.values.size() * sizeof(float) + 2 * k * sizeof(int64_t);
  for (const auto& p : payloads) add += p.size();
  for (const Labels& l : labels) add += l.bytes();
  if (options_.memory_budget_bytes > 0 &&
      total_bytes_.load() + add > options_.memory_budget_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "storing ", k, " patterns needs ", add, " bytes; the memory budget of ",
        options_.memory_budget_bytes, " bytes has ",
        options_.memory_budget_bytes - std::min(options_.memory_budget_bytes,
                                                total_bytes_.load()),
        " left"));
  }
  StoreResult result;
  result.ids = ids.empty() ? bank.AssignIds(k)
                           : std::vector<uint64_t>(ids.begin(), ids.end());
  // Bank::Append's rule for the next automatic id, kept durable so that ids
  // are never handed out twice, across restarts too.
  uint64_t next_id = bank.next_id();
  for (uint64_t id : result.ids) {
    if (id >= next_id && id != std::numeric_limits<uint64_t>::max()) next_id = id + 1;
  }
  if (may_commit) ENGRAM_RETURN_IF_ERROR(may_commit());
  ENGRAM_RETURN_IF_ERROR(storage_->AppendPatterns(
      name, result.ids, data, payloads, stored, WriteMeta{.log_seq = at.seq, .next_id = next_id}));
  const uint64_t before = bank.bytes();
  current.reset();  // unpinned, so an unshared version grows in place
  Mutate(*e, [&](Bank& b) {
    b.Append(data, result.ids, payloads, stored);
    total_bytes_ += b.bytes() - before;
    result.bank_patterns = b.size();
  });
  return result;
}

absl::StatusOr<DeleteResult> BankRegistry::DeletePatterns(
    const std::string& name, absl::Span<const uint64_t> ids, const CommitCheck& may_commit,
    const LogPosition& at) {
  std::shared_ptr<Entry> e = Find(name);
  if (e == nullptr) {
    return absl::NotFoundError(absl::StrCat("bank '", name, "' not found"));
  }
  MutexLock write_lock(&e->write_mu);
  ENGRAM_ASSIGN_OR_RETURN(BankSnapshot current, Pin(name, *e));
  ENGRAM_RETURN_IF_ERROR(current->ValidateRemoval(ids));
  if (may_commit) ENGRAM_RETURN_IF_ERROR(may_commit());
  ENGRAM_RETURN_IF_ERROR(storage_->DeletePatterns(name, ids, WriteMeta{.log_seq = at.seq}));
  const uint64_t before = current->bytes();
  current.reset();
  DeleteResult result{static_cast<int64_t>(ids.size()), 0};
  Mutate(*e, [&](Bank& b) {
    b.Remove(ids);
    total_bytes_ -= before - b.bytes();
    result.bank_patterns = b.size();
  });
  return result;
}

absl::StatusOr<int64_t> BankRegistry::ExpireBank(const std::string& name,
                                                 const LogPosition& at) {
  std::shared_ptr<Entry> e = Find(name);
  if (e == nullptr) return absl::NotFoundError(absl::StrCat("bank '", name, "' not found"));
  MutexLock write_lock(&e->write_mu);
  ENGRAM_ASSIGN_OR_RETURN(BankSnapshot current, Pin(name, *e));
  const int64_t now = at.now_ms != 0 ? at.now_ms : NowMs();
  const int64_t first = current->min_expires_ms();
  if (first == 0 || first > now) return 0;
  std::vector<uint64_t> ids;
  for (int64_t r = 0; r < current->size(); ++r) {
    const int64_t t = current->expires_ms(r);
    if (t > 0 && t <= now) ids.push_back(current->id(r));
  }
  ENGRAM_RETURN_IF_ERROR(storage_->DeletePatterns(name, ids, WriteMeta{.log_seq = at.seq}));
  const uint64_t before = current->bytes();
  current.reset();
  Mutate(*e, [&](Bank& b) {
    b.Remove(ids);
    total_bytes_ -= before - b.bytes();
  });
  return static_cast<int64_t>(ids.size());
}

std::vector<std::pair<std::string, int64_t>> BankRegistry::ExpireDue(absl::Status* first_error) {
  std::vector<std::string> names;
  {
    ReaderMutexLock lock(&mu_);
    for (const auto& entry : banks_) names.push_back(entry.first);
  }
  std::vector<std::pair<std::string, int64_t>> swept;
  for (const std::string& name : names) {
    absl::StatusOr<int64_t> n = ExpireBank(name);
    if (!n.ok()) {
      // NOT_FOUND: deleted meanwhile, nothing to do.
      if (n.status().code() != absl::StatusCode::kNotFound && first_error != nullptr &&
          first_error->ok()) {
        *first_error = n.status();
      }
      continue;
    }
    if (*n > 0) swept.emplace_back(name, *n);
  }
  return swept;
}

absl::Status BankRegistry::WithBank(
    const std::string& name,
    const std::function<absl::Status(const Bank&)>& fn) const {
  ENGRAM_ASSIGN_OR_RETURN(BankSnapshot bank, Snapshot(name));
  return fn(*bank);
}

}  // namespace engram::core
