// WriteLog against a real nats-server (one node, JetStream, on loopback):
// concurrent writers each get their own entry's outcome, the applier sees
// every entry once in sequence order, waiters are answered once, a log
// opened again resumes after the given sequence, and an apply that fails
// for the replica's own sake stops it with every caller told. Run under
// ThreadSanitizer by scripts/test.sh.
#include "server/write_log.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace engram::server {
namespace {

using replication::v1::LogEntry;

int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

bool Listening(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  const bool ok = connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  close(fd);
  return ok;
}

std::string NatsServer() {
  for (const char* p : {"/usr/bin/nats-server", "/usr/sbin/nats-server", "/usr/local/bin/nats-server"}) {
    if (std::filesystem::exists(p)) return p;
  }
  return "";
}

// One nats-server with JetStream in a temporary directory.
class WriteLogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string binary = NatsServer();
    ASSERT_FALSE(binary.empty()) << "nats-server is not installed (scripts/setup.sh installs it)";
    dir_ = std::filesystem::temp_directory_path() /
           ("engram_write_log_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    port_ = FreePort();
    pid_ = fork();
    const std::string log = (dir_ / "nats.log").string();
    if (pid_ == 0) {
      const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
      }
      const std::string port = std::to_string(port_), store = (dir_ / "js").string();
      execl(binary.c_str(), binary.c_str(), "-a", "127.0.0.1", "-p", port.c_str(), "-js", "-sd",
            store.c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    const absl::Time give_up = absl::Now() + absl::Seconds(20);
    while (!Listening(port_)) {
      ASSERT_LT(absl::Now(), give_up) << "nats-server did not listen";
      absl::SleepFor(absl::Milliseconds(20));
    }
  }
  void TearDown() override {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    std::filesystem::remove_all(dir_);
  }

  WriteLogOptions Options() const {
    WriteLogOptions o;
    o.servers = absl::StrCat("nats://127.0.0.1:", port_);
    o.stream = "TEST";
    o.replicas = 1;
    o.publish_timeout = absl::Seconds(10);
    o.apply_timeout = absl::Seconds(20);
    return o;
  }

  static LogEntry Entry(const std::string& bank) {
    LogEntry e;
    e.mutable_store()->set_bank(bank);
    return e;
  }

  std::filesystem::path dir_;
  int port_ = 0;
  pid_t pid_ = -1;
};

// What the applier saw, in order.
struct Applied {
  std::mutex mu;
  std::vector<uint64_t> seqs;
  std::vector<std::string> banks;
};

TEST_F(WriteLogTest, ConcurrentWritersGetTheirOwnOutcomesAndEntriesApplyOnceInOrder) {
  Applied seen;
  auto apply = [&seen](const LogEntry& e, uint64_t seq, std::string* response) -> absl::Status {
    {
      std::lock_guard<std::mutex> lock(seen.mu);
      seen.seqs.push_back(seq);
      seen.banks.push_back(e.store().bank());
    }
    if (absl::StartsWith(e.store().bank(), "bad")) {
      return absl::InvalidArgumentError("refused by the request");
    }
    *response = absl::StrCat(e.store().bank(), "@", seq);
    return absl::OkStatus();
  };
  auto log = WriteLog::Open(Options(), 0, apply);
  ASSERT_TRUE(log.ok()) << log.status();

  constexpr int kThreads = 8, kEach = 40;
  std::vector<std::vector<WriteLog::Outcome>> outcomes(kThreads);
  std::atomic<int> waited_ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) {
        const std::string bank = absl::StrCat(i % 7 == 3 ? "bad" : "b", t, "-", i);
        auto out = (*log)->Write(Entry(bank), absl::Now() + absl::Seconds(60));
        ASSERT_TRUE(out.ok()) << out.status();
        outcomes[t].push_back(*out);
        if (i % 7 == 3) {
          EXPECT_EQ(out->status.code(), absl::StatusCode::kInvalidArgument);
        } else {
          EXPECT_TRUE(out->status.ok()) << out->status;
          EXPECT_EQ(out->response, absl::StrCat(bank, "@", out->seq)) << "another call's outcome";
        }
        // Applied here before the write returned; a waiter on it at once.
        EXPECT_GE((*log)->applied(), out->seq);
        (*log)->WhenApplied(out->seq, absl::Now() + absl::Seconds(5), [&](absl::Status s) {
          if (s.ok()) waited_ok.fetch_add(1);
        });
      }
    });
  }
  for (std::thread& t : threads) t.join();
  const uint64_t total = uint64_t{kThreads} * kEach;
  std::set<uint64_t> seqs;
  for (const auto& per : outcomes) {
    for (const WriteLog::Outcome& o : per) seqs.insert(o.seq);
  }
  EXPECT_EQ(seqs.size(), total) << "every write is its own entry";
  EXPECT_EQ(*seqs.begin(), 1u);
  EXPECT_EQ(*seqs.rbegin(), total);
  {
    std::lock_guard<std::mutex> lock(seen.mu);
    ASSERT_EQ(seen.seqs.size(), total);
    for (uint64_t i = 0; i < total; ++i) EXPECT_EQ(seen.seqs[i], i + 1) << "in order, once";
  }
  EXPECT_EQ(waited_ok.load(), static_cast<int>(total));

  // Waiting for an entry not yet written: answered UNAVAILABLE at the
  // deadline, once; then answered OK once it is written.
  std::atomic<int> calls{0};
  std::atomic<bool> ok{false};
  (*log)->WhenApplied(total + 1, absl::Now() + absl::Seconds(30), [&](absl::Status s) {
    calls.fetch_add(1);
    ok = s.ok();
  });
  EXPECT_EQ((*log)->WaitApplied(total + 1, absl::Now() + absl::Milliseconds(200)).code(),
            absl::StatusCode::kUnavailable);
  ASSERT_TRUE((*log)->Write(Entry("late"), absl::Now() + absl::Seconds(60)).ok());
  EXPECT_TRUE((*log)->WaitApplied(total + 1, absl::Now() + absl::Seconds(10)).ok());
  const absl::Time until = absl::Now() + absl::Seconds(10);
  while (calls.load() == 0 && absl::Now() < until) absl::SleepFor(absl::Milliseconds(10));
  EXPECT_EQ(calls.load(), 1);
  EXPECT_TRUE(ok.load());
  log->reset();

  // Opened again after entry 100: it applies 101.. in order, and no more.
  Applied again;
  auto resume = [&again](const LogEntry& e, uint64_t seq, std::string*) -> absl::Status {
    std::lock_guard<std::mutex> lock(again.mu);
    again.seqs.push_back(seq);
    return absl::OkStatus();
  };
  auto reopened = WriteLog::Open(Options(), 100, resume);
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  EXPECT_TRUE((*reopened)->WaitApplied(total + 1, absl::Now() + absl::Seconds(20)).ok());
  std::lock_guard<std::mutex> lock(again.mu);
  ASSERT_EQ(again.seqs.size(), total + 1 - 100);
  for (size_t i = 0; i < again.seqs.size(); ++i) EXPECT_EQ(again.seqs[i], 101 + i);
}

TEST_F(WriteLogTest, AnApplyFailingForTheReplicasOwnSakeStopsItAndTellsEveryCaller) {
  auto apply = [](const LogEntry& e, uint64_t, std::string*) -> absl::Status {
    if (e.store().bank() == "disk") return absl::InternalError("storage: disk I/O error");
    return absl::OkStatus();
  };
  auto log = WriteLog::Open(Options(), 0, apply);
  ASSERT_TRUE(log.ok()) << log.status();
  ASSERT_TRUE((*log)->Write(Entry("a"), absl::Now() + absl::Seconds(60))->status.ok());
  std::atomic<int> told{0};
  (*log)->WhenApplied(50, absl::Now() + absl::Seconds(60), [&](absl::Status s) {
    EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
    told.fetch_add(1);
  });
  auto failed = (*log)->Write(Entry("disk"), absl::Now() + absl::Seconds(60));
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(failed.status().message().find("disk I/O error"), std::string::npos)
      << failed.status();
  EXPECT_EQ((*log)->applied(), 1u) << "the failed entry is not passed over";
  EXPECT_EQ((*log)->health().code(), absl::StatusCode::kUnavailable);
  auto refused = (*log)->Write(Entry("b"), absl::Now() + absl::Seconds(60));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable);
  const absl::Time until = absl::Now() + absl::Seconds(10);
  while (told.load() == 0 && absl::Now() < until) absl::SleepFor(absl::Milliseconds(10));
  EXPECT_EQ(told.load(), 1);
}

TEST_F(WriteLogTest, ALogEntryLargerThanTheServersTakeIsRefusedBeforePublishing) {
  auto log = WriteLog::Open(Options(), 0, [](const LogEntry&, uint64_t, std::string*) {
    return absl::OkStatus();
  });
  ASSERT_TRUE(log.ok()) << log.status();
  LogEntry big = Entry("big");
  big.mutable_store()->mutable_patterns()->Resize(400'000, 1.0f);  // 1.6 MB > 1 MiB
  auto out = (*log)->Write(big, absl::Now() + absl::Seconds(60));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument) << out.status();
  EXPECT_EQ((*log)->applied(), 0u);
  EXPECT_TRUE((*log)->Write(Entry("small"), absl::Now() + absl::Seconds(60)).ok());
}

}  // namespace
}  // namespace engram::server
