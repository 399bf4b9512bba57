// WriteLog: the replicated write-ahead log of a group of engramd replicas,
// kept in a NATS JetStream stream (one stream per group, R copies on the
// NATS servers). No consensus is written here: JetStream's quorum ack makes
// an entry durable, its stream sequence orders all entries, and every
// replica applies them in that order.
//
//   WriteLogOptions o{.servers = "nats://127.0.0.1:4222", .stream = "ENGRAM_A"};
//   ENGRAM_ASSIGN_OR_RETURN(auto log, WriteLog::Open(o, registry->LogSequence(), apply));
//   ENGRAM_ASSIGN_OR_RETURN(WriteLog::Outcome out, log->Write(entry, deadline));
//
// Write publishes an entry, waits for the stream's quorum ack (the entry's
// sequence), then for this replica's applier to apply it, and returns the
// outcome of applying it. The applier runs on one thread: it reads the
// stream from the entry after the last applied one (an ordered consumer,
// re-created on any gap, error or silence while the stream is ahead) and
// calls `apply` for each entry in sequence order. `apply` records the
// sequence durably with the change (core::LogPosition), so a replica that
// restarts resumes exactly after its last applied entry.
//
// An entry whose apply is refused for the request's own sake (NOT_FOUND,
// ALREADY_EXISTS, INVALID_ARGUMENT, ...) is refused alike on every replica
// and passed over. An apply that fails for this replica's sake (INTERNAL,
// DATA_LOSS, UNAVAILABLE: its disk) stops the applier at that entry;
// health() then reports the error and the replica answers UNAVAILABLE until
// it is restarted.
//
// Thread-safety: all methods may be called concurrently.
#ifndef ENGRAM_SERVER_WRITE_LOG_H_
#define ENGRAM_SERVER_WRITE_LOG_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engram/core/mutex.h"
#include "engram/replication/v1/log.pb.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace engram::server {

// Metadata between a router and replicated nodes: a call may carry the
// least write-log sequence to read at (as a request's min_sequence), and a
// write's answer carries its sequence as trailing metadata.
inline constexpr char kMinSequenceHeader[] = "engram-min-sequence";
inline constexpr char kSequenceTrailer[] = "engram-sequence";

struct WriteLogOptions {
  // Comma-separated NATS server URLs (nats://host:port); the client fails
  // over between them.
  std::string servers;
  // The JetStream stream of this replica group ([A-Za-z0-9_-]+); created
  // with `replicas` copies when absent. Its subject is
  // "engram.<stream>.log".
  std::string stream;
  int replicas = 3;
  // Longest wait for the quorum ack of one entry.
  absl::Duration publish_timeout = absl::Seconds(5);
  // Longest wait, after the ack, for this replica to apply the entry.
  absl::Duration apply_timeout = absl::Seconds(10);
  // How long Open retries reaching the servers and the stream (a cluster
  // electing its leaders at start).
  absl::Duration open_timeout = absl::Seconds(30);
  // This replica's id in the entries it publishes; empty: a random one.
  std::string replica_id;
  // Where the log's metrics go (engram_write_log_*); null: none.
  std::shared_ptr<prometheus::Registry> metrics;
};

class WriteLog {
 public:
  // Applies entry `seq` and fills `response` (the serialized response of
  // the entry's call). See the header comment for which errors stop it.
  using Apply = std::function<absl::Status(const replication::v1::LogEntry& entry, uint64_t seq,
                                           std::string* response)>;

  // Connects, creates the stream if absent and starts applying after
  // `applied`. UNAVAILABLE when the servers or the stream cannot be reached
  // within open_timeout; INVALID_ARGUMENT for a bad stream name.
  static absl::StatusOr<std::unique_ptr<WriteLog>> Open(const WriteLogOptions& options,
                                                        uint64_t applied, Apply apply);
  ~WriteLog();
  WriteLog(const WriteLog&) = delete;
  WriteLog& operator=(const WriteLog&) = delete;

  struct Outcome {
    uint64_t seq = 0;
    absl::Status status;   // of applying the entry here
    std::string response;  // serialized, when status is OK
  };
  // Publishes `entry` (its origin and call are set here) and waits as the
  // header says, at most until `deadline`. UNAVAILABLE when no quorum acks
  // it (then the entry may or may not be in the log), or when this replica
  // has not applied it within apply_timeout (it is in the log and every
  // replica will apply it); DEADLINE_EXCEEDED likewise at `deadline`.
  // `msg_id`, when set, makes JetStream drop a second entry with the same
  // id within its duplicate window (the first one's sequence is returned,
  // with an OK status and no response).
  absl::StatusOr<Outcome> Write(replication::v1::LogEntry entry, absl::Time deadline,
                                const std::string& msg_id = "");

  // The sequence of the last entry this replica applied.
  uint64_t applied() const;
  // OK once applied() >= seq; UNAVAILABLE (naming both sequences) when
  // `deadline` passes first or the applier has stopped.
  absl::Status WaitApplied(uint64_t seq, absl::Time deadline) const;
  // Calls `done` once applied() >= seq (OK) or when `deadline` passes or
  // the applier stops (UNAVAILABLE), on the applier's thread, or at once
  // when already applied. `done` must not block.
  void WhenApplied(uint64_t seq, absl::Time deadline, std::function<void(absl::Status)> done);
  // OK while the applier runs; its error once it stopped.
  absl::Status health() const;
  const std::string& replica_id() const { return options_.replica_id; }

 private:
  struct Nats;  // the NATS connection, JetStream context and subscription
  WriteLog(WriteLogOptions options, uint64_t applied, Apply apply);
  absl::Status Connect();
  void RunApplier();
  // Applies one received entry; false when the applier must stop.
  bool ApplyOne(uint64_t seq, const char* data, int size);
  // False, with the applier's health set, when the stream no longer holds
  // entry `next` (trimmed by limits or a purge): this replica cannot catch
  // up from the log. True when it does, or when the stream cannot be asked.
  bool StillHeld(uint64_t next);
  // Answers the waiters whose sequence is applied or whose deadline passed.
  void Notify();
  // A line on stderr about the applier's reading, at most one a second
  // (applier thread only).
  void Report(const std::string& message);
  absl::Time last_report_ = absl::InfinitePast();

  WriteLogOptions options_;
  Apply apply_;
  std::string subject_;
  std::unique_ptr<Nats> nats_;

  // Engram's own lock (POSIX, which ThreadSanitizer sees); cv_ is signalled
  // whenever applied_, health_, stop_ or an entry of pending_ changes.
  mutable core::Mutex mu_;
  mutable core::CondVar cv_;
  uint64_t applied_ ABSL_GUARDED_BY(mu_);
  absl::Status health_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t next_call_ ABSL_GUARDED_BY(mu_) = 1;
  // Outcomes of this replica's own calls, by call number, once applied;
  // an entry is present while its caller waits.
  struct Pending {
    bool applied = false;
    uint64_t seq = 0;
    absl::Status status;
    std::string response;
  };
  std::map<uint64_t, Pending> pending_ ABSL_GUARDED_BY(mu_);
  struct Waiter {
    uint64_t seq;
    absl::Time deadline;
    std::function<void(absl::Status)> done;
  };
  std::multimap<uint64_t, Waiter> waiters_ ABSL_GUARDED_BY(mu_);
  // Metrics (null without a registry): the last applied sequence, the
  // entries in the stream after it, 1 while the applier runs, and the time
  // from publish to applied of this replica's writes.
  prometheus::Gauge* applied_gauge_ = nullptr;
  prometheus::Gauge* pending_gauge_ = nullptr;
  prometheus::Gauge* up_gauge_ = nullptr;
  prometheus::Histogram* commit_seconds_ = nullptr;
  std::thread applier_;
};

}  // namespace engram::server

#endif  // ENGRAM_SERVER_WRITE_LOG_H_
