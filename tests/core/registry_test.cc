// BankRegistry over real SQLite storage: durability across reopen, atomic
// batches, validation leaves state unchanged, memory budget.
#include "engram/core/registry.h"

#include <cstring>
#include <filesystem>
#include <random>

#include <gtest/gtest.h>

#include "testing/random_banks.h"
#include "testing/status_matchers.h"

namespace engram::core {
namespace {

using engram::testing::RandomGaussian;
using engram::testing::StatusIs;

class RegistryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("engram_registry_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::unique_ptr<BankRegistry> Open(RegistryOptions o = {}) {
    auto storage = OpenSqliteStorage((dir_ / "engram.db").string());
    EXPECT_OK(storage);
    auto r = BankRegistry::Open(std::move(*storage), o);
    EXPECT_OK(r);
    return std::move(*r);
  }

  std::filesystem::path dir_;
};

TEST_F(RegistryTest, ReopenRestoresBitForBit) {
  std::mt19937_64 rng(41);
  const int n = 33;
  auto data = RandomGaussian(50 * n, rng);
  data[3] = -0.0f;  // sign of zero must survive
  data[4] = 1e-45f; // denormal
  std::vector<std::string> payloads;
  for (int i = 0; i < 50; ++i) payloads.push_back("label-" + std::to_string(i));
  payloads[7] = std::string("\0\x01\xff", 3);
  std::vector<uint64_t> ids;
  {
    auto r = Open();
    ASSERT_OK(r->CreateBank({"cont", n, StateKind::kContinuous,
                             {.family = EnergyFamily::kGaussian, .beta = 3.5}, Precision::kF32}));
    auto st = r->Store("cont", data, {}, payloads);
    ASSERT_OK(st);
    ids = st->ids;
    ASSERT_OK(r->DeletePatterns("cont", std::vector<uint64_t>{ids[10]}));
    ASSERT_OK(r->CreateBank({"gone", 2, StateKind::kContinuous, {}, Precision::kF32}));
    ASSERT_OK(r->DeleteBank("gone"));
  }
  auto r = Open();
  EXPECT_THAT(r->GetBank("gone"), StatusIs(absl::StatusCode::kNotFound));
  auto info = r->GetBank("cont");
  ASSERT_OK(info);
  EXPECT_EQ(info->patterns, 49);
  EXPECT_EQ(info->spec.energy.family, EnergyFamily::kGaussian);
  EXPECT_EQ(info->spec.energy.beta, 3.5);
  ASSERT_OK(r->WithBank("cont", [&](const Bank& bank) {
    for (int mu = 0, row = 0; mu < 50; ++mu) {
      if (mu == 10) {
        EXPECT_FALSE(bank.RowOf(ids[mu]).has_value());
        continue;
      }
      EXPECT_EQ(bank.id(row), ids[mu]);
      EXPECT_EQ(bank.payload(row), payloads[mu]);
      EXPECT_EQ(std::memcmp(bank.pattern(row), data.data() + mu * n, n * sizeof(float)), 0)
          << "pattern " << mu;
      ++row;
    }
    return absl::OkStatus();
  }));
}

TEST_F(RegistryTest, AutomaticIdsAreNeverHandedOutTwiceAcrossReopen) {
  std::mt19937_64 rng(5);
  const int n = 4;
  {
    auto r = Open();
    ASSERT_OK(r->CreateBank({"b", n, StateKind::kContinuous, {}, Precision::kF32}));
    auto st = r->Store("b", RandomGaussian(3 * n, rng), {}, {});
    ASSERT_OK(st);
    EXPECT_EQ(st->ids, (std::vector<uint64_t>{1, 2, 3}));
    ASSERT_OK(r->DeletePatterns("b", std::vector<uint64_t>{2, 3}));
  }
  // The highest ids are gone from the data; the next automatic id is not
  // theirs, here or after another reopen.
  auto r = Open();
  auto st = r->Store("b", RandomGaussian(n, rng), {}, {});
  ASSERT_OK(st);
  EXPECT_EQ(st->ids, (std::vector<uint64_t>{4}));
  ASSERT_OK(r->Store("b", RandomGaussian(n, rng), std::vector<uint64_t>{100}, {}));
  ASSERT_OK(r->DeletePatterns("b", std::vector<uint64_t>{4, 100}));
  r.reset();
  r = Open();
  st = r->Store("b", RandomGaussian(n, rng), {}, {});
  ASSERT_OK(st);
  EXPECT_EQ(st->ids, (std::vector<uint64_t>{101}));
}

TEST_F(RegistryTest, LogPositionIsRecordedWithTheWriteAndItsTimeUsed) {
  std::mt19937_64 rng(6);
  const int n = 4;
  {
    auto r = Open({.clock_ms = [] { return int64_t{1'000'000}; }});
    EXPECT_EQ(*r->LogSequence(), 0u);
    ASSERT_OK(r->CreateBank({"b", n, StateKind::kContinuous, {}, Precision::kF32},
                            LogPosition{.seq = 7, .now_ms = 0}));
    EXPECT_EQ(*r->LogSequence(), 7u);
    StoreExtras extras;
    extras.ttl_ms = 500;
    auto st = r->Store("b", RandomGaussian(2 * n, rng), {}, {}, extras, nullptr,
                       LogPosition{.seq = 9, .now_ms = 2'000});
    ASSERT_OK(st);
    EXPECT_EQ(*r->LogSequence(), 9u);
    // Stored and expiry times come from the entry, not the clock.
    ASSERT_OK(r->WithBank("b", [&](const Bank& bank) {
      EXPECT_EQ(bank.stored_ms(0), 2'000);
      EXPECT_EQ(bank.expires_ms(1), 2'500);
      return absl::OkStatus();
    }));
    // A refused write records nothing.
    EXPECT_THAT(r->Store("b", RandomGaussian(n, rng), std::vector<uint64_t>{1}, {}, {}, nullptr,
                         LogPosition{.seq = 10, .now_ms = 2'000}),
                StatusIs(absl::StatusCode::kAlreadyExists));
    EXPECT_EQ(*r->LogSequence(), 9u);
    // Expiry at the entry's time: nothing is due at 2'499, both at 2'500.
    EXPECT_EQ(*r->ExpireBank("b", LogPosition{.seq = 11, .now_ms = 2'499}), 0);
    EXPECT_EQ(*r->ExpireBank("b", LogPosition{.seq = 12, .now_ms = 2'500}), 2);
  }
  auto r = Open();
  EXPECT_EQ(*r->LogSequence(), 12u);
  EXPECT_EQ(r->GetBank("b")->patterns, 0);
  ASSERT_OK(r->DeleteBank("b", LogPosition{.seq = 13}));
  EXPECT_EQ(*r->LogSequence(), 13u);
}

TEST_F(RegistryTest, RejectedBatchChangesNothing) {
  auto r = Open();
  ASSERT_OK(r->CreateBank({"b", 2, StateKind::kContinuous, {}, Precision::kF32}));
  ASSERT_OK(r->Store("b", std::vector<float>{1, 2}, std::vector<uint64_t>{1}, {}));
  // Second pattern collides with an existing id: nothing of the batch lands.
  EXPECT_THAT(r->Store("b", std::vector<float>{3, 4, 5, 6}, std::vector<uint64_t>{2, 1}, {}),
              StatusIs(absl::StatusCode::kAlreadyExists));
  EXPECT_THAT(r->Store("b", std::vector<float>{3, NAN}, {}, {}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(r->Store("nope", std::vector<float>{3, 4}, {}, {}),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(r->GetBank("b")->patterns, 1);
  r.reset();
  EXPECT_EQ(Open()->GetBank("b")->patterns, 1);
}

// A write whose commit check fails (the server's: the call's deadline has
// passed) returns that error and changes nothing, in memory or on disk;
// the check runs after validation, so an invalid write still gets its own
// error.
TEST_F(RegistryTest, FailedCommitCheckChangesNothing) {
  auto r = Open();
  ASSERT_OK(r->CreateBank({"b", 2, StateKind::kContinuous, {}, Precision::kF32}));
  ASSERT_OK(r->Store("b", std::vector<float>{1, 2}, std::vector<uint64_t>{1}, {}));
  int asked = 0;
  auto too_late = [&]() -> absl::Status {
    ++asked;
    return absl::DeadlineExceededError("deadline passed");
  };
  EXPECT_THAT(r->Store("b", std::vector<float>{3, 4}, std::vector<uint64_t>{2}, {}, too_late),
              StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_THAT(r->DeletePatterns("b", std::vector<uint64_t>{1}, too_late),
              StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_EQ(asked, 2);
  EXPECT_THAT(r->Store("b", std::vector<float>{3, NAN}, {}, {}, too_late),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(asked, 2);
  EXPECT_EQ(r->GetBank("b")->patterns, 1);
  // The same write with a check that passes lands.
  ASSERT_OK(r->Store("b", std::vector<float>{3, 4}, std::vector<uint64_t>{2}, {},
                     [] { return absl::OkStatus(); }));
  r.reset();
  auto reopened = Open();
  EXPECT_EQ(reopened->GetBank("b")->patterns, 2);
  ASSERT_OK(reopened->WithBank("b", [](const Bank& bank) {
    EXPECT_TRUE(bank.RowOf(1).has_value());
    EXPECT_TRUE(bank.RowOf(2).has_value());
    return absl::OkStatus();
  }));
}

// A Store while readers pin the bank writes only the new rows: each new
// version reads its predecessor's rows in place, except when the shared
// buffer runs out of room (it doubles, so a few times in 200 Stores; a
// copy-on-write bank would copy at every one), and every pinned version
// keeps exactly the rows it had. The memory count follows the rows, not
// the buffers.
TEST_F(RegistryTest, StoreUnderPinnedReadersWritesOnlyTheNewRows) {
  auto r = Open();
  const int n = 16;
  ASSERT_OK(r->CreateBank({"b", n, StateKind::kContinuous, {}, Precision::kF32Screened}));
  std::mt19937_64 rng(7);
  const auto first = RandomGaussian(64 * n, rng);
  ASSERT_OK(r->Store("b", first, {}, {}));
  std::vector<BankSnapshot> pinned;
  std::vector<std::vector<float>> stored;
  int copies = 0;
  const uint64_t bytes_before = r->total_bytes();
  for (int i = 0; i < 200; ++i) {
    pinned.push_back(*r->Snapshot("b"));
    stored.push_back(RandomGaussian(n, rng));
    ASSERT_OK(r->Store("b", stored.back(), {}, {}));
    const BankSnapshot now = *r->Snapshot("b");
    copies += !now->SharesRowsWith(*pinned.back());
  }
  EXPECT_LE(copies, 4);
  const uint64_t row_bytes = r->total_bytes() - bytes_before;
  EXPECT_EQ(row_bytes % 200, 0u);
  EXPECT_GT(row_bytes / 200, uint64_t{n} * 5);  // f32 + int8 rows at least
  for (int i = 0; i < 200; ++i) {
    const Bank& v = *pinned[i];
    ASSERT_EQ(v.size(), 64 + i);
    EXPECT_EQ(std::memcmp(v.pattern(0), first.data(), sizeof(float) * n), 0);
    if (i > 0) {
      EXPECT_EQ(std::memcmp(v.pattern(63 + i), stored[i - 1].data(), sizeof(float) * n), 0);
    }
    EXPECT_FALSE(v.RowOf(v.id(v.size() - 1) + 1).has_value());
  }
  // Deleting under readers rebuilds the arrays; the pinned versions stay.
  const uint64_t first_id = pinned[0]->id(0);
  ASSERT_OK(r->DeletePatterns("b", std::vector<uint64_t>{first_id}));
  EXPECT_EQ(r->GetBank("b")->patterns, 263);
  EXPECT_EQ(pinned[5]->RowOf(first_id), 0);
  EXPECT_EQ(std::memcmp(pinned[5]->pattern(0), first.data(), sizeof(float) * n), 0);
}

TEST_F(RegistryTest, DuplicateCreateIsAlreadyExists) {
  auto r = Open();
  ASSERT_OK(r->CreateBank({"b", 2, StateKind::kContinuous, {}, Precision::kF32}));
  EXPECT_THAT(r->CreateBank({"b", 3, StateKind::kContinuous, {}, Precision::kF32}),
              StatusIs(absl::StatusCode::kAlreadyExists));
  EXPECT_EQ(r->GetBank("b")->spec.dim, 2);
}

TEST_F(RegistryTest, MemoryBudgetIsResourceExhaustedBeforeStoring) {
  auto r = Open({.memory_budget_bytes = 1000});
  ASSERT_OK(r->CreateBank({"b", 10, StateKind::kContinuous, {}, Precision::kF32}));
  ASSERT_OK(r->Store("b", std::vector<float>(10 * 10, 1.f), {}, {}));  // 520 bytes
  EXPECT_THAT(r->Store("b", std::vector<float>(10 * 10, 1.f), {}, {}),
              StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_EQ(r->GetBank("b")->patterns, 10);
}

TEST_F(RegistryTest, ListIsOrderedByName) {
  auto r = Open();
  for (std::string name : {"zeta", "alpha", "mid"}) {
    ASSERT_OK(r->CreateBank({name, 1, StateKind::kContinuous, {}, Precision::kF32}));
  }
  auto list = r->ListBanks();
  ASSERT_EQ(list.size(), 3u);
  EXPECT_EQ(list[0].spec.name, "alpha");
  EXPECT_EQ(list[2].spec.name, "zeta");
}

}  // namespace
}  // namespace engram::core
