#include "engram/core/registry.h"

#include "absl/strings/str_cat.h"
#include "engram/core/status_macros.h"

namespace engram::core {

BankRegistry::BankRegistry(std::unique_ptr<BankStorage> storage,
                           RegistryOptions options)
    : storage_(std::move(storage)), options_(options) {}

absl::StatusOr<std::unique_ptr<BankRegistry>> BankRegistry::Open(
    std::unique_ptr<BankStorage> storage, RegistryOptions options) {
  std::unique_ptr<BankRegistry> r(new BankRegistry(std::move(storage), options));
  MutexLock lock(&r->mu_);
  ENGRAM_RETURN_IF_ERROR(r->storage_->LoadAll(
      [&](const BankSpec& spec) -> absl::Status {
        if (auto s = ValidateBankSpec(spec); !s.ok()) {
          return absl::DataLossError(absl::StrCat(
              "stored bank '", spec.name, "' is invalid: ", s.message()));
        }
        r->banks_[spec.name] = std::make_shared<Entry>(Bank(spec));
        return absl::OkStatus();
      },
      [&](std::string_view bank, uint64_t id, absl::Span<const float> data,
          std::string_view payload) -> absl::Status {
        auto it = r->banks_.find(std::string(bank));
        if (it == r->banks_.end()) {
          return absl::DataLossError(absl::StrCat("pattern of unknown bank ", std::string(bank)));
        }
        Entry& e = *it->second;
        MutexLock entry_lock(&e.mu);
        std::string p(payload);
        const uint64_t ids[1] = {id};
        e.bank.Append(data, ids, absl::MakeConstSpan(&p, 1));
        return absl::OkStatus();
      }));
  uint64_t total = 0;
  for (auto& [name, e] : r->banks_) {
    MutexLock entry_lock(&e->mu);
    total += e->bank.bytes();
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

absl::StatusOr<BankSummary> BankRegistry::CreateBank(const BankSpec& spec) {
  ENGRAM_RETURN_IF_ERROR(ValidateBankSpec(spec));
  MutexLock lock(&mu_);
  if (banks_.contains(spec.name)) {
    return absl::AlreadyExistsError(
        absl::StrCat("bank '", spec.name, "' already exists"));
  }
  ENGRAM_RETURN_IF_ERROR(storage_->CreateBank(spec));
  auto entry = std::make_shared<Entry>(Bank(spec));
  banks_[spec.name] = entry;
  ReaderMutexLock entry_lock(&entry->mu);
  return Summarize(entry->bank);
}

absl::Status BankRegistry::DeleteBank(const std::string& name) {
  MutexLock lock(&mu_);
  auto it = banks_.find(name);
  if (it == banks_.end()) {
    return absl::NotFoundError(absl::StrCat("bank '", name, "' not found"));
  }
  std::shared_ptr<Entry> entry = it->second;
  MutexLock entry_lock(&entry->mu);
  ENGRAM_RETURN_IF_ERROR(storage_->DeleteBank(name));
  entry->deleted = true;
  total_bytes_ -= entry->bank.bytes();
  banks_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<BankSummary> BankRegistry::GetBank(const std::string& name) const {
  std::shared_ptr<Entry> e = Find(name);
  if (e != nullptr) {
    ReaderMutexLock lock(&e->mu);
    if (!e->deleted) return Summarize(e->bank);
  }
  return absl::NotFoundError(absl::StrCat("bank '", name, "' not found"));
}

std::vector<BankSummary> BankRegistry::ListBanks() const {
  std::vector<std::shared_ptr<Entry>> entries;
  {
    ReaderMutexLock lock(&mu_);
    for (const auto& [name, e] : banks_) entries.push_back(e);
  }
  std::vector<BankSummary> out;
  for (const auto& e : entries) {
    ReaderMutexLock lock(&e->mu);
    if (!e->deleted) out.push_back(Summarize(e->bank));
  }
  return out;
}

absl::StatusOr<StoreResult> BankRegistry::Store(
    const std::string& name, absl::Span<const float> data,
    absl::Span<const uint64_t> ids, absl::Span<const std::string> payloads) {
  std::shared_ptr<Entry> e = Find(name);
  if (e == nullptr) {
    return absl::NotFoundError(absl::StrCat("bank '", name, "' not found"));
  }
  MutexLock lock(&e->mu);
  if (e->deleted) {
    return absl::NotFoundError(absl::StrCat("bank '", name, "' not found"));
  }
  Bank& bank = e->bank;
  ENGRAM_RETURN_IF_ERROR(bank.ValidateNewPatterns(data, ids, payloads));
  const int64_t k = static_cast<int64_t>(data.size()) / bank.dim();
  uint64_t add = data.size() * sizeof(float) + k * (sizeof(float) + sizeof(uint64_t));
  for (const auto& p : payloads) add += p.size();
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
  ENGRAM_RETURN_IF_ERROR(storage_->AppendPatterns(name, result.ids, data, payloads));
  const uint64_t before = bank.bytes();
  bank.Append(data, result.ids, payloads);
  total_bytes_ += bank.bytes() - before;
  result.bank_patterns = bank.size();
  return result;
}

absl::StatusOr<DeleteResult> BankRegistry::DeletePatterns(
    const std::string& name, absl::Span<const uint64_t> ids) {
  std::shared_ptr<Entry> e = Find(name);
  if (e == nullptr) {
    return absl::NotFoundError(absl::StrCat("bank '", name, "' not found"));
  }
  MutexLock lock(&e->mu);
  if (e->deleted) {
    return absl::NotFoundError(absl::StrCat("bank '", name, "' not found"));
  }
  ENGRAM_RETURN_IF_ERROR(e->bank.ValidateRemoval(ids));
  ENGRAM_RETURN_IF_ERROR(storage_->DeletePatterns(name, ids));
  const uint64_t before = e->bank.bytes();
  e->bank.Remove(ids);
  total_bytes_ -= before - e->bank.bytes();
  return DeleteResult{static_cast<int64_t>(ids.size()), e->bank.size()};
}

absl::Status BankRegistry::WithBank(
    const std::string& name,
    const std::function<absl::Status(const Bank&)>& fn) const {
  std::shared_ptr<Entry> e = Find(name);
  if (e == nullptr) {
    return absl::NotFoundError(absl::StrCat("bank '", name, "' not found"));
  }
  ReaderMutexLock lock(&e->mu);
  if (e->deleted) {
    return absl::NotFoundError(absl::StrCat("bank '", name, "' not found"));
  }
  return fn(e->bank);
}

}  // namespace engram::core
