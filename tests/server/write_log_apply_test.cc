// Applying a replicated write log (MemoryServiceImpl::ApplyLogEntry) without
// NATS: replicas that apply the same entries in the same order hold the same
// banks bit for bit, refuse the same entries, and a replica that stops
// anywhere and reopens its database resumes after the last entry it recorded
// and ends where the others do. (The log itself, NATS and its faults:
// tests/integration/replicas_test.py.)
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engram/core/registry.h"
#include "engram/core/storage.h"
#include "server/metrics.h"
#include "server/service_impl.h"

namespace engram::server {
namespace {

using replication::v1::LogEntry;

// A replica without the log: its database, registry and service.
class Replica {
 public:
  explicit Replica(std::filesystem::path db) : db_(std::move(db)) { Open(); }

  void Open() {
    service_.reset();
    registry_.reset();
    auto storage = core::OpenSqliteStorage(db_.string());
    EXPECT_TRUE(storage.ok()) << storage.status();
    auto registry = core::BankRegistry::Open(std::move(*storage), {});
    EXPECT_TRUE(registry.ok()) << registry.status();
    registry_ = std::move(*registry);
    service_ = std::make_unique<MemoryServiceImpl>(registry_.get(), std::make_shared<Metrics>());
  }

  // Applies `entries` from sequence `from` (1-based) on; returns each
  // entry's status code.
  std::vector<absl::StatusCode> Apply(const std::vector<LogEntry>& entries, uint64_t from) {
    std::vector<absl::StatusCode> codes;
    for (uint64_t seq = from; seq <= entries.size(); ++seq) {
      std::string response;
      codes.push_back(
          service_->ApplyLogEntry(registry_.get(), entries[seq - 1], seq, &response).code());
    }
    return codes;
  }

  uint64_t LogSequence() { return *registry_->LogSequence(); }
  core::BankRegistry& registry() { return *registry_; }

 private:
  std::filesystem::path db_;
  std::unique_ptr<core::BankRegistry> registry_;
  std::unique_ptr<MemoryServiceImpl> service_;
};

// Every bank's rows as bytes: ids, patterns, payloads, stored and expiry
// times.
std::string Contents(core::BankRegistry& registry) {
  std::string out;
  for (const core::BankSummary& s : registry.ListBanks()) {
    out += s.spec.name + ":";
    auto bank = registry.Snapshot(s.spec.name);
    EXPECT_TRUE(bank.ok());
    const core::Bank& b = **bank;
    for (int64_t r = 0; r < b.size(); ++r) {
      const uint64_t id = b.id(r);
      const int64_t t[2] = {b.stored_ms(r), b.expires_ms(r)};
      out.append(reinterpret_cast<const char*>(&id), sizeof id);
      out.append(reinterpret_cast<const char*>(b.pattern(r)), b.dim() * sizeof(float));
      out.append(b.payload(r));
      out.append(reinterpret_cast<const char*>(t), sizeof t);
    }
    out += ";";
  }
  return out;
}

std::vector<LogEntry> Entries() {
  constexpr int kDim = 6;
  std::mt19937 rng(7);
  std::normal_distribution<float> g;
  std::vector<LogEntry> e;
  auto at = [&](int64_t now) {
    e.emplace_back();
    e.back().set_now_unix_ms(now);
    return &e.back();
  };
  auto store = [&](int64_t now, int k, std::vector<uint64_t> ids, uint64_t ttl_seconds) {
    v1::StoreRequest* s = at(now)->mutable_store();
    s->set_bank("b");
    for (int i = 0; i < k * kDim; ++i) s->add_patterns(g(rng));
    for (uint64_t id : ids) s->add_ids(id);
    for (int i = 0; i < k; ++i) s->add_payloads("p" + std::to_string(e.size()) + "-" + std::to_string(i));
    s->set_ttl_seconds(ttl_seconds);
  };
  v1::CreateBankRequest* c = at(1'000'000)->mutable_create_bank();
  c->set_name("b");
  c->set_dim(kDim);
  c->set_kind(v1::STATE_KIND_CONTINUOUS);
  store(1'000'100, 3, {}, 0);                 // ids 1, 2, 3
  store(1'000'200, 2, {}, 5);                 // ids 4, 5; expire at 1'005'200
  store(1'000'300, 1, {2}, 0);                // refused: id 2 exists
  {
    v1::DeletePatternsRequest* d = at(1'000'400)->mutable_delete_patterns();
    d->set_bank("b");
    d->add_ids(5);                            // the highest id goes
  }
  store(1'000'500, 1, {}, 0);                 // id 6, never 5 again
  {
    v1::DeletePatternsRequest* d = at(1'000'600)->mutable_delete_patterns();
    d->set_bank("b");
    d->add_ids(99);                           // refused: absent
  }
  store(1'000'700, 2, {}, 0);                 // refused: patterns of another dimension below
  e.back().mutable_store()->add_patterns(1.0f);
  store(1'006'000, 1, {}, 0);                 // id 7; id 4 expired first (at 1'005'200)
  at(1'007'000)->mutable_expire()->set_bank("b");
  {
    v1::CreateBankRequest* c2 = at(1'008'000)->mutable_create_bank();
    *c2 = *c;
    c2->set_name("b");                        // refused: exists
  }
  at(1'009'000)->mutable_delete_bank()->set_name("nope");  // refused: absent
  return e;
}

class WriteLogApplyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("engram_write_log_apply_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::filesystem::path dir_;
};

TEST_F(WriteLogApplyTest, ReplicasApplyingTheSameEntriesHoldTheSameBanks) {
  const std::vector<LogEntry> entries = Entries();
  Replica a(dir_ / "a.db"), b(dir_ / "b.db");
  const auto codes = a.Apply(entries, 1);
  EXPECT_EQ(b.Apply(entries, 1), codes) << "every replica refuses the same entries";
  using C = absl::StatusCode;
  EXPECT_EQ(codes, (std::vector<C>{C::kOk, C::kOk, C::kOk, C::kAlreadyExists, C::kOk, C::kOk,
                                   C::kNotFound, C::kInvalidArgument, C::kOk, C::kOk,
                                   C::kAlreadyExists, C::kNotFound}));
  EXPECT_EQ(Contents(a.registry()), Contents(b.registry()));

  // What the entries say, independently of the code: ids 1, 2, 3, 6, 7
  // (4 expired, 5 deleted); times from the entries, not the clock.
  auto bank = a.registry().Snapshot("b");
  ASSERT_TRUE(bank.ok());
  std::vector<uint64_t> ids;
  for (int64_t r = 0; r < (*bank)->size(); ++r) ids.push_back((*bank)->id(r));
  EXPECT_EQ(ids, (std::vector<uint64_t>{1, 2, 3, 6, 7}));
  EXPECT_EQ((*bank)->stored_ms(*(*bank)->RowOf(6)), 1'000'500);
  EXPECT_EQ((*bank)->stored_ms(*(*bank)->RowOf(7)), 1'006'000);
  // The last entry that changed something is recorded: 9 (entry 10 found
  // nothing due, 11 and 12 were refused; all three change nothing when a
  // replica reads them again).
  EXPECT_EQ(a.LogSequence(), 9u);
  EXPECT_EQ(b.LogSequence(), 9u);
}

TEST_F(WriteLogApplyTest, AReplicaStoppedAnywhereResumesAfterItsLastRecordedEntry) {
  const std::vector<LogEntry> entries = Entries();
  Replica reference(dir_ / "ref.db");
  reference.Apply(entries, 1);
  const std::string want = Contents(reference.registry());
  for (size_t stop = 0; stop <= entries.size(); ++stop) {
    SCOPED_TRACE("stopped after entry " + std::to_string(stop));
    const auto db = dir_ / ("r" + std::to_string(stop) + ".db");
    {
      Replica r(db);
      std::vector<LogEntry> first(entries.begin(), entries.begin() + stop);
      r.Apply(first, 1);
    }
    Replica r(db);  // reopened from its database, as after kill -9
    const uint64_t from = r.LogSequence() + 1;
    EXPECT_LE(from, stop + 1) << "never past what it applied";
    r.Apply(entries, from);
    EXPECT_EQ(Contents(r.registry()), want);
    EXPECT_EQ(r.LogSequence(), reference.LogSequence());
  }
}

}  // namespace
}  // namespace engram::server
