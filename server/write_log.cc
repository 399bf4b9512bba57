#include "server/write_log.h"

#include <nats/nats.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"

namespace engram::server {
namespace {

// An idle applier checks the stream's last sequence after this long, so a
// consumer that silently stopped delivering (its NATS node died) is
// re-created; the wait doubles, up to kMaxIdleCheck, while re-created
// consumers stay silent (a cluster slow to elect leaders).
constexpr absl::Duration kIdleCheck = absl::Seconds(1);
constexpr absl::Duration kMaxIdleCheck = absl::Seconds(8);
constexpr int64_t kPollMs = 100;

std::string NatsError(const char* what, natsStatus s, jsErrCode jerr = static_cast<jsErrCode>(0)) {
  natsStatus last = NATS_OK;
  const char* detail = nats_GetLastError(&last);
  std::string out = absl::StrCat(what, ": ", natsStatus_GetText(s));
  if (jerr != 0) absl::StrAppend(&out, " (JetStream error ", static_cast<int>(jerr), ")");
  if (detail != nullptr && *detail != '\0') absl::StrAppend(&out, ": ", detail);
  return out;
}

int64_t Millis(absl::Duration d) {
  return std::max<int64_t>(1, absl::ToInt64Milliseconds(d));
}

bool ValidStreamName(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

// Errors of applying an entry that are this replica's own (its storage),
// not the request's: the applier stops rather than pass the entry over.
bool ReplicaFault(const absl::Status& s) {
  return s.code() == absl::StatusCode::kInternal || s.code() == absl::StatusCode::kDataLoss ||
         s.code() == absl::StatusCode::kUnavailable || s.code() == absl::StatusCode::kUnknown;
}

}  // namespace

struct WriteLog::Nats {
  natsOptions* opts = nullptr;
  natsConnection* conn = nullptr;
  jsCtx* js = nullptr;
  natsSubscription* sub = nullptr;  // the applier's; touched by its thread only

  ~Nats() {
    if (sub != nullptr) natsSubscription_Destroy(sub);
    if (js != nullptr) jsCtx_Destroy(js);
    if (conn != nullptr) {
      natsConnection_Close(conn);
      natsConnection_Destroy(conn);
    }
    if (opts != nullptr) natsOptions_Destroy(opts);
  }
};

WriteLog::WriteLog(WriteLogOptions options, uint64_t applied, Apply apply)
    : options_(std::move(options)),
      apply_(std::move(apply)),
      subject_(absl::StrCat("engram.", options_.stream, ".log")),
      nats_(std::make_unique<Nats>()),
      applied_(applied) {
  if (options_.replica_id.empty()) {
    std::random_device rd;
    options_.replica_id = absl::StrCat(absl::Hex(rd()), absl::Hex(rd()));
  }
  if (options_.metrics != nullptr) {
    prometheus::Registry& r = *options_.metrics;
    // One series per metric, labelled with the stream.
    auto gauge = [&](const char* name, const char* help) {
      return &prometheus::BuildGauge().Name(name).Help(help).Register(r).Add(
          {{"stream", options_.stream}});
    };
    applied_gauge_ = gauge("engram_write_log_applied_sequence",
                           "Sequence of the last write-log entry this replica applied.");
    pending_gauge_ = gauge("engram_write_log_pending_entries",
                           "Entries in the write log after the last one this replica applied, "
                           "as last seen (its lag).");
    up_gauge_ = gauge("engram_write_log_up",
                      "1 while this replica applies its write log; 0 once it stopped on an "
                      "error of its own (it then answers UNAVAILABLE).");
    commit_seconds_ = &prometheus::BuildHistogram()
                           .Name("engram_write_log_commit_seconds")
                           .Help("Time from publishing a write to the log to having applied it "
                                 "here (quorum ack included).")
                           .Register(r)
                           .Add({{"stream", options_.stream}},
                                prometheus::Histogram::BucketBoundaries{
                                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2,
                                    0.5, 1, 2, 5});
    applied_gauge_->Set(static_cast<double>(applied));
    up_gauge_->Set(1);
  }
}

absl::StatusOr<std::unique_ptr<WriteLog>> WriteLog::Open(const WriteLogOptions& options,
                                                         uint64_t applied, Apply apply) {
  if (!ValidStreamName(options.stream)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the write log's stream name must match [A-Za-z0-9_-]{1,64}, got '", options.stream,
        "'"));
  }
  if (options.replicas < 1 || options.replicas > 5) {
    return absl::InvalidArgumentError(
        absl::StrCat("the write log's replicas must be in [1, 5], got ", options.replicas));
  }
  std::unique_ptr<WriteLog> log(new WriteLog(options, applied, std::move(apply)));
  const absl::Time give_up = absl::Now() + options.open_timeout;
  absl::Status s;
  while (!(s = log->Connect()).ok()) {
    if (absl::Now() >= give_up) {
      return absl::UnavailableError(absl::StrCat("write log at ", options.servers, ", stream ",
                                                 options.stream, ": ", s.message()));
    }
    absl::SleepFor(absl::Milliseconds(250));
  }
  WriteLog* self = log.get();
  log->applier_ = std::thread([self] { self->RunApplier(); });
  return log;
}

absl::Status WriteLog::Connect() {
  nats_ = std::make_unique<Nats>();
  Nats& n = *nats_;
  std::vector<std::string> urls = absl::StrSplit(options_.servers, ',', absl::SkipWhitespace());
  std::vector<const char*> ptrs;
  for (const std::string& u : urls) ptrs.push_back(u.c_str());
  natsStatus s = natsOptions_Create(&n.opts);
  if (s == NATS_OK) s = natsOptions_SetServers(n.opts, ptrs.data(), static_cast<int>(ptrs.size()));
  if (s == NATS_OK) s = natsOptions_SetMaxReconnect(n.opts, -1);  // forever
  if (s == NATS_OK) s = natsOptions_SetReconnectWait(n.opts, 100);
  if (s == NATS_OK) s = natsOptions_SetTimeout(n.opts, 2000);
  if (s == NATS_OK) s = natsOptions_SetPingInterval(n.opts, 1000);
  if (s == NATS_OK) s = natsOptions_SetMaxPingsOut(n.opts, 2);
  if (s == NATS_OK) s = natsOptions_SetName(n.opts, ("engramd " + options_.replica_id).c_str());
  if (s != NATS_OK) return absl::InvalidArgumentError(NatsError("NATS options", s));
  s = natsConnection_Connect(&n.conn, n.opts);
  if (s != NATS_OK) return absl::UnavailableError(NatsError("connect", s));
  jsOptions jo;
  jsOptions_Init(&jo);
  jo.Wait = Millis(options_.publish_timeout);
  s = natsConnection_JetStream(&n.js, n.conn, &jo);
  if (s != NATS_OK) return absl::UnavailableError(NatsError("JetStream context", s));
  jsErrCode jerr = static_cast<jsErrCode>(0);
  jsStreamInfo* si = nullptr;
  s = js_GetStreamInfo(&si, n.js, options_.stream.c_str(), nullptr, &jerr);
  if (s == NATS_OK) {
    jsStreamInfo_Destroy(si);
    return absl::OkStatus();
  }
  if (s != NATS_NOT_FOUND) return absl::UnavailableError(NatsError("stream info", s, jerr));
  jsStreamConfig cfg;
  jsStreamConfig_Init(&cfg);
  const char* subjects[] = {subject_.c_str()};
  cfg.Name = options_.stream.c_str();
  cfg.Subjects = subjects;
  cfg.SubjectsLen = 1;
  cfg.Storage = js_FileStorage;
  cfg.Replicas = options_.replicas;
  s = js_AddStream(&si, n.js, &cfg, nullptr, &jerr);
  if (s != NATS_OK) return absl::UnavailableError(NatsError("create stream", s, jerr));
  jsStreamInfo_Destroy(si);
  return absl::OkStatus();
}

WriteLog::~WriteLog() {
  {
    core::MutexLock lock(&mu_);
    stop_ = true;
    cv_.SignalAll();
  }
  if (applier_.joinable()) applier_.join();
  core::MutexLock lock(&mu_);
  for (auto& [seq, w] : waiters_) w.done(absl::UnavailableError("the server is shutting down"));
  waiters_.clear();
}

uint64_t WriteLog::applied() const {
  core::MutexLock lock(&mu_);
  return applied_;
}

absl::Status WriteLog::health() const {
  core::MutexLock lock(&mu_);
  return health_;
}

absl::StatusOr<WriteLog::Outcome> WriteLog::Write(replication::v1::LogEntry entry,
                                                  absl::Time deadline, const std::string& msg_id) {
  uint64_t call;
  {
    core::MutexLock lock(&mu_);
    if (!health_.ok()) {
      return absl::UnavailableError(
          absl::StrCat("this replica stopped applying its write log: ", health_.message()));
    }
    call = next_call_++;
    pending_[call] = Pending{};
  }
  struct Forget {
    WriteLog* log;
    uint64_t call;
    ~Forget() {
      core::MutexLock lock(&log->mu_);
      log->pending_.erase(call);
    }
  } forget{this, call};
  entry.set_origin(options_.replica_id);
  entry.set_call(call);
  std::string bytes;
  if (!entry.SerializeToString(&bytes)) return absl::InternalError("cannot encode a log entry");

  const int64_t max_payload = natsConnection_GetMaxPayload(nats_->conn);
  if (max_payload > 0 && static_cast<int64_t>(bytes.size()) > max_payload) {
    return absl::InvalidArgumentError(absl::StrCat(
        "this write is ", bytes.size(), " bytes as a log entry; the log's servers take at most ",
        max_payload, " (nats-server max_payload): nothing was written; store fewer patterns per "
        "call"));
  }
  const absl::Time now = absl::Now();
  if (deadline <= now) return absl::DeadlineExceededError("deadline passed before the write");
  const absl::Time published = now;
  const absl::Duration ack_wait = std::min(options_.publish_timeout, deadline - now);
  jsPubOptions po;
  jsPubOptions_Init(&po);
  po.MaxWait = Millis(ack_wait);
  if (!msg_id.empty()) po.MsgId = msg_id.c_str();
  jsPubAck* ack = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  const natsStatus s = js_Publish(&ack, nats_->js, subject_.c_str(), bytes.data(),
                                  static_cast<int>(bytes.size()), &po, &jerr);
  if (s != NATS_OK) {
    const std::string why = NatsError("write log", s, jerr);
    if (s == NATS_TIMEOUT && absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          why, "; the deadline passed before a quorum of the log acknowledged the write "
               "(it may or may not be applied)"));
    }
    return absl::UnavailableError(absl::StrCat(
        why, "; no quorum of the log acknowledged the write (it may or may not be applied)"));
  }
  Outcome out;
  out.seq = ack->Sequence;
  const bool duplicate = ack->Duplicate;
  jsPubAck_Destroy(ack);
  if (duplicate) return out;

  core::MutexLock lock(&mu_);
  const absl::Time until = std::min(deadline, absl::Now() + options_.apply_timeout);
  Pending& p = pending_[call];
  while (!p.applied && health_.ok() && !stop_) {
    if (!cv_.WaitWithDeadline(&mu_, until) && absl::Now() >= until) break;
  }
  if (p.applied) {
    out.status = p.status;
    out.response = std::move(p.response);
    if (commit_seconds_ != nullptr) {
      commit_seconds_->Observe(absl::ToDoubleSeconds(absl::Now() - published));
    }
    return out;
  }
  const std::string where =
      absl::StrCat("the write is in the log as sequence ", out.seq, " and every replica will "
                   "apply it, but this replica has applied up to ", applied_, " only");
  if (!health_.ok()) {
    return absl::UnavailableError(absl::StrCat(where, ": ", health_.message()));
  }
  if (absl::Now() >= deadline) return absl::DeadlineExceededError(where);
  return absl::UnavailableError(where);
}

absl::Status WriteLog::WaitApplied(uint64_t seq, absl::Time deadline) const {
  core::MutexLock lock(&mu_);
  while (applied_ < seq && health_.ok() && !stop_ && absl::Now() < deadline) {
    cv_.WaitWithDeadline(&mu_, deadline);
  }
  if (applied_ >= seq) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(
      "this replica has applied the write log up to sequence ", applied_, ", not yet ", seq,
      !health_.ok() ? absl::StrCat(": ", health_.message()) : std::string()));
}

void WriteLog::WhenApplied(uint64_t seq, absl::Time deadline,
                           std::function<void(absl::Status)> done) {
  {
    core::MutexLock lock(&mu_);
    if (applied_ < seq && health_.ok() && !stop_ && deadline > absl::Now()) {
      waiters_.emplace(seq, Waiter{seq, deadline, std::move(done)});
      return;
    }
  }
  done(WaitApplied(seq, absl::InfinitePast()));
}

void WriteLog::Notify() {
  std::vector<std::pair<std::function<void(absl::Status)>, absl::Status>> ready;
  {
    core::MutexLock lock(&mu_);
    const absl::Time now = absl::Now();
    for (auto it = waiters_.begin(); it != waiters_.end();) {
      Waiter& w = it->second;
      if (w.seq <= applied_) {
        ready.emplace_back(std::move(w.done), absl::OkStatus());
      } else if (now >= w.deadline || !health_.ok()) {
        ready.emplace_back(std::move(w.done),
                           absl::UnavailableError(absl::StrCat(
                               "this replica has applied the write log up to sequence ",
                               applied_, ", not yet ", w.seq)));
      } else {
        ++it;
        continue;
      }
      it = waiters_.erase(it);
    }
  }
  for (auto& [fn, status] : ready) fn(status);
}

bool WriteLog::ApplyOne(uint64_t seq, const char* data, int size) {
  replication::v1::LogEntry entry;
  absl::Status status;
  std::string response;
  if (!entry.ParseFromArray(data, size)) {
    // Every replica reads the same bytes: an unreadable entry is passed
    // over by all of them.
    status = absl::InvalidArgumentError(absl::StrCat("log entry ", seq, " is unreadable"));
  } else {
    status = apply_(entry, seq, &response);
  }
  core::MutexLock lock(&mu_);
  if (ReplicaFault(status)) {
    health_ = absl::UnavailableError(
        absl::StrCat("applying write-log entry ", seq, ": ", status.message()));
    std::fprintf(stderr, "engramd: %s; this replica stops applying until restarted\n",
                 std::string(health_.message()).c_str());
    if (up_gauge_ != nullptr) up_gauge_->Set(0);
    cv_.SignalAll();
    return false;
  }
  applied_ = seq;
  if (applied_gauge_ != nullptr) applied_gauge_->Set(static_cast<double>(seq));
  if (entry.origin() == options_.replica_id) {
    auto it = pending_.find(entry.call());
    if (it != pending_.end()) {
      it->second.applied = true;
      it->second.seq = seq;
      it->second.status = status;
      it->second.response = std::move(response);
    }
  }
  cv_.SignalAll();
  return true;
}

bool WriteLog::StillHeld(uint64_t next) {
  jsStreamInfo* si = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  if (js_GetStreamInfo(&si, nats_->js, options_.stream.c_str(), nullptr, &jerr) != NATS_OK) {
    return true;  // cannot tell now; read again
  }
  const uint64_t first = si->State.FirstSeq;
  const bool held = si->State.Msgs == 0 ? si->State.LastSeq < next : first <= next;
  jsStreamInfo_Destroy(si);
  if (held) return true;
  core::MutexLock lock(&mu_);
  health_ = absl::UnavailableError(absl::StrCat(
      "the write log no longer holds entry ", next, " (its first entry is ", first,
      "): this replica cannot catch up from the log; start it again from a Backup of another "
      "replica (--restore_from)"));
  std::fprintf(stderr, "engramd: %s\n", std::string(health_.message()).c_str());
  if (up_gauge_ != nullptr) up_gauge_->Set(0);
  cv_.SignalAll();
  return false;
}

void WriteLog::Report(const std::string& message) {
  // At most one line a second: a cluster that is down for long is one
  // retry line per second, not ten.
  const absl::Time now = absl::Now();
  if (now - last_report_ < absl::Seconds(1)) return;
  last_report_ = now;
  std::fprintf(stderr, "engramd: %s\n", message.c_str());
}

void WriteLog::RunApplier() {
  Nats& n = *nats_;
  absl::Time idle_since = absl::Now();
  absl::Duration idle_check = kIdleCheck;
  for (;;) {
    {
      core::MutexLock lock(&mu_);
      if (stop_ || !health_.ok()) break;
    }
    Notify();
    if (n.sub == nullptr) {
      jsSubOptions so;
      jsSubOptions_Init(&so);
      so.Ordered = true;
      so.Config.DeliverPolicy = js_DeliverByStartSequence;
      so.Config.OptStartSeq = applied() + 1;
      jsErrCode jerr = static_cast<jsErrCode>(0);
      const natsStatus s = js_SubscribeSync(&n.sub, n.js, subject_.c_str(), nullptr, &so, &jerr);
      if (s != NATS_OK) {
        n.sub = nullptr;
        Report(NatsError("write log: cannot read the stream (retrying)", s, jerr));
        absl::SleepFor(absl::Milliseconds(kPollMs));
        continue;
      }
      idle_since = absl::Now();
    }
    natsMsg* msg = nullptr;
    const natsStatus s = natsSubscription_NextMsg(&msg, n.sub, kPollMs);
    const char* resubscribe = nullptr;  // why the consumer is re-created
    if (s == NATS_OK) {
      jsMsgMetaData* meta = nullptr;
      if (natsMsg_GetMetaData(&meta, msg) == NATS_OK) {
        const uint64_t seq = meta->Sequence.Stream;
        if (pending_gauge_ != nullptr) pending_gauge_->Set(static_cast<double>(meta->NumPending));
        jsMsgMetaData_Destroy(meta);
        const uint64_t next = applied() + 1;
        if (seq == next) {
          if (!ApplyOne(seq, natsMsg_GetData(msg), natsMsg_GetDataLength(msg))) {
            natsMsg_Destroy(msg);
            break;
          }
          idle_since = absl::Now();
          idle_check = kIdleCheck;
        } else if (seq > next) {
          if (!StillHeld(next)) {
            natsMsg_Destroy(msg);
            break;
          }
          resubscribe = "a gap in the entries received";
        }
      }
      natsMsg_Destroy(msg);
    } else if (s == NATS_TIMEOUT) {
      if (absl::Now() - idle_since >= idle_check) {
        // Silence: make sure the stream is not ahead of this replica.
        jsStreamInfo* si = nullptr;
        jsErrCode jerr = static_cast<jsErrCode>(0);
        if (js_GetStreamInfo(&si, n.js, options_.stream.c_str(), nullptr, &jerr) == NATS_OK) {
          if (pending_gauge_ != nullptr) {
            const uint64_t at = applied();
            pending_gauge_->Set(
                static_cast<double>(si->State.LastSeq > at ? si->State.LastSeq - at : 0));
          }
          if (si->State.FirstSeq > applied() + 1) {
            jsStreamInfo_Destroy(si);
            if (!StillHeld(applied() + 1)) break;
            si = nullptr;
          } else if (si->State.LastSeq > applied()) {
            resubscribe = "the stream is ahead and silent";
            idle_check = std::min(kMaxIdleCheck, 2 * idle_check);
          }
          if (si != nullptr) jsStreamInfo_Destroy(si);
        }
        idle_since = absl::Now();
      }
    } else {
      resubscribe = natsStatus_GetText(s);  // connection lost, missed heartbeats, ...
    }
    if (resubscribe != nullptr) {
      Report(absl::StrCat("write log: reading the stream again after sequence ", applied(), " (",
                          resubscribe, ")"));
      natsSubscription_Unsubscribe(n.sub);
      natsSubscription_Destroy(n.sub);
      n.sub = nullptr;
    }
  }
  Notify();
}

}  // namespace engram::server
