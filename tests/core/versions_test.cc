// Versions that share rows, under threads: copies of one AppendArray grown
// at once from many threads each keep exactly their own elements, and a
// bank's pinned versions read whole, unchanged batches while a writer
// stores into (and deletes from) the rows they share. Label stress: the
// ThreadSanitizer stage runs it.
#include <atomic>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "engram/core/append_array.h"
#include "engram/core/registry.h"
#include "testing/status_matchers.h"

namespace engram::core {
namespace {

// Copies of one array race to grow from its end: exactly one may write in
// place, the rest move; each copy ends with the base and its own values,
// and the base is unchanged.
TEST(AppendArrayThreads, CopiesGrowingAtOnceKeepTheirOwnElements) {
  for (int round = 0; round < 50; ++round) {
    AppendArray<int64_t> base;
    std::vector<int64_t> first(100);
    for (int i = 0; i < 100; ++i) first[i] = i;
    base.Append(first.data(), first.size());
    constexpr int kThreads = 4;
    std::vector<AppendArray<int64_t>> copies(kThreads, base);
    std::atomic<int> ready{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        ++ready;
        while (ready.load() < kThreads) std::this_thread::yield();
        for (int j = 0; j < 20; ++j) copies[t].push_back(1000 * (t + 1) + j);
      });
    }
    for (auto& th : threads) th.join();
    ASSERT_EQ(base.size(), 100u);
    for (int i = 0; i < 100; ++i) ASSERT_EQ(base[i], i);
    int in_place = 0;
    for (int t = 0; t < kThreads; ++t) {
      ASSERT_EQ(copies[t].size(), 120u);
      for (int i = 0; i < 100; ++i) ASSERT_EQ(copies[t][i], i);
      for (int j = 0; j < 20; ++j) ASSERT_EQ(copies[t][100 + j], 1000 * (t + 1) + j);
      in_place += copies[t].SharesBufferWith(base);
    }
    EXPECT_LE(in_place, 1);
  }
}

// Row r of pattern id `id`: every value derived from the id, so a reader can
// check a row it reads against its id alone.
float ValueOf(uint64_t id, int i) { return static_cast<float>((id * 31 + i) % 1000) / 250.f - 2.f; }

TEST(RegistryVersionsThreads, PinnedVersionsStayWholeWhileAWriterStoresAndDeletes) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("engram_versions_test_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  {
    auto storage = OpenSqliteStorage((dir / "engram.db").string());
    ASSERT_OK(storage);
    auto opened = BankRegistry::Open(std::move(*storage), {});
    ASSERT_OK(opened);
    BankRegistry& r = **opened;
    const int n = 24;
    ASSERT_OK(r.CreateBank({"b", n, StateKind::kContinuous, {}, Precision::kBf16}));
    constexpr int kBatch = 5;
    std::atomic<bool> stop{false};
    std::atomic<int64_t> checked{0}, torn{0};
    std::vector<std::thread> readers;
    for (int t = 0; t < 3; ++t) {
      readers.emplace_back([&] {
        while (!stop.load()) {
          auto snap = r.Snapshot("b");
          if (!snap.ok()) continue;
          const Bank& v = **snap;
          // Whole batches only: ids are stored kBatch at a time, and a
          // delete takes a whole batch.
          if (v.size() % kBatch != 0) ++torn;
          for (int64_t row = 0; row < v.size(); ++row) {
            const uint64_t id = v.id(row);
            const float* p = v.pattern(row);
            for (int i = 0; i < n; ++i) {
              if (p[i] != ValueOf(id, i)) ++torn;
            }
            if (v.RowOf(id) != row) ++torn;
          }
          ++checked;
        }
      });
    }
    uint64_t next = 1;
    for (int batch = 0; batch < 300; ++batch) {
      std::vector<uint64_t> ids;
      std::vector<float> rows;
      for (int j = 0; j < kBatch; ++j, ++next) {
        ids.push_back(next);
        for (int i = 0; i < n; ++i) rows.push_back(ValueOf(next, i));
      }
      ASSERT_OK(r.Store("b", rows, ids, {}));
      if (batch % 25 == 24) {  // drop an early batch
        std::vector<uint64_t> drop;
        for (int j = 0; j < kBatch; ++j) drop.push_back(1 + kBatch * (batch / 25) + j);
        ASSERT_OK(r.DeletePatterns("b", drop));
      }
    }
    stop = true;
    for (auto& th : readers) th.join();
    EXPECT_EQ(torn.load(), 0);
    EXPECT_GT(checked.load(), 0);
    EXPECT_EQ(r.GetBank("b")->patterns, (300 - 12) * kBatch);
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace engram::core
