// engramd: the Engram server.
//
//   engramd --listen=127.0.0.1:50051 --data_dir=./data --metrics_listen=127.0.0.1:9464
//
// Every flag can also be set by an environment variable (ENGRAM_LISTEN,
// ENGRAM_DATA_DIR, ENGRAM_METRICS_LISTEN, ENGRAM_MEMORY_BUDGET_BYTES,
// ENGRAM_MAX_MESSAGE_BYTES, ENGRAM_MAX_BATCH); a flag on the command line
// wins over the environment. SIGTERM / SIGINT shut down gracefully.
#include <malloc.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <cstdlib>
#include <iostream>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/synchronization/mutex.h"
#include "server/limits_table.h"
#include "server/server.h"

namespace {

std::string EnvOr(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return (v != nullptr && *v != '\0') ? std::string(v) : fallback;
}

int64_t EnvOrInt(const char* name, int64_t fallback) {
  int64_t v;
  const std::string s = EnvOr(name, "");
  return (!s.empty() && absl::SimpleAtoi(s, &v)) ? v : fallback;
}

// The flags' defaults are ServerConfig's, from which --print_limits also
// reads them: the documented defaults are the ones engramd runs with.
const engram::server::ServerConfig kDefaults{};

int g_signal_pipe[2] = {-1, -1};

void OnShutdownSignal(int sig) {
  const unsigned char b = static_cast<unsigned char>(sig);
  const int saved = errno;
  (void)!write(g_signal_pipe[1], &b, 1);
  errno = saved;
}

}  // namespace

ABSL_FLAG(std::string, role, EnvOr("ENGRAM_ROLE", "node"),
          "node (holds banks) or router (serves banks held by the --shards nodes) "
          "(env ENGRAM_ROLE)");
ABSL_FLAG(std::string, shards, EnvOr("ENGRAM_SHARDS", ""),
          "a router's shards in order: host:port,host:port,... or the pods of a StatefulSet "
          "behind a headless Service, e.g. engram-{0..3}.engram:50051; a shard that is a replica "
          "group: ip:port|ip:port or dns:///name:port (env ENGRAM_SHARDS)");
ABSL_FLAG(std::string, shard_tls_ca, EnvOr("ENGRAM_SHARD_TLS_CA", ""),
          "a router's: PEM CA certificate(s) the shards' TLS certificates are checked against; "
          "set, the router dials its shards with TLS (env ENGRAM_SHARD_TLS_CA)");
ABSL_FLAG(std::string, listen, EnvOr("ENGRAM_LISTEN", "127.0.0.1:50051"),
          "gRPC listen address host:port (env ENGRAM_LISTEN)");
ABSL_FLAG(std::string, data_dir, EnvOr("ENGRAM_DATA_DIR", "data"),
          "directory of the bank database (env ENGRAM_DATA_DIR)");
ABSL_FLAG(std::string, metrics_listen, EnvOr("ENGRAM_METRICS_LISTEN", "127.0.0.1:9464"),
          "Prometheus endpoint host:port, empty to disable (env ENGRAM_METRICS_LISTEN)");
ABSL_FLAG(int64_t, memory_budget_bytes, EnvOrInt("ENGRAM_MEMORY_BUDGET_BYTES", static_cast<int64_t>(kDefaults.memory_budget_bytes)),
          "upper bound on bank memory, 0 = unlimited (env ENGRAM_MEMORY_BUDGET_BYTES)");
ABSL_FLAG(int32_t, max_message_bytes,
          static_cast<int32_t>(EnvOrInt("ENGRAM_MAX_MESSAGE_BYTES", kDefaults.max_message_bytes)),
          "largest request or response (env ENGRAM_MAX_MESSAGE_BYTES)");
ABSL_FLAG(int64_t, max_batch, EnvOrInt("ENGRAM_MAX_BATCH", kDefaults.max_batch),
          "largest batch of patterns / queries per call (env ENGRAM_MAX_BATCH)");
ABSL_FLAG(bool, batching, EnvOrInt("ENGRAM_BATCHING", 1) != 0,
          "merge concurrent sync Retrieve calls on the same bank and energy into one batched "
          "kernel call (env ENGRAM_BATCHING=0|1)");
ABSL_FLAG(int64_t, max_batch_queries, EnvOrInt("ENGRAM_MAX_BATCH_QUERIES", 256),
          "most queries the dynamic batcher merges into one batch (env ENGRAM_MAX_BATCH_QUERIES)");
ABSL_FLAG(int64_t, max_batch_delay_us, EnvOrInt("ENGRAM_MAX_BATCH_DELAY_US", 0),
          "microseconds a batch waits for more calls before it runs; 0 batches only calls "
          "that queued while the previous batch ran (env ENGRAM_MAX_BATCH_DELAY_US)");
ABSL_FLAG(int32_t, executor_threads, static_cast<int32_t>(EnvOrInt("ENGRAM_EXECUTOR_THREADS", 0)),
          "threads that compute Retrieve, Energy and Sample calls; 0 = one per CPU "
          "(env ENGRAM_EXECUTOR_THREADS)");
ABSL_FLAG(int64_t, max_queue, EnvOrInt("ENGRAM_MAX_QUEUE", kDefaults.max_queue),
          "compute calls that may wait for an executor; more are answered RESOURCE_EXHAUSTED "
          "(env ENGRAM_MAX_QUEUE)");
ABSL_FLAG(int64_t, queue_timeout_ms, EnvOrInt("ENGRAM_QUEUE_TIMEOUT_MS", 0),
          "longest wait in the compute queue for calls that set no queue_timeout_ms; 0 = only "
          "the call's deadline (env ENGRAM_QUEUE_TIMEOUT_MS)");
ABSL_FLAG(int64_t, inline_work, EnvOrInt("ENGRAM_INLINE_WORK", 1 << 20),
          "compute calls of at most this many multiply-adds per pass over the bank are answered "
          "on the thread that read them; 0 = queue every call (env ENGRAM_INLINE_WORK)");
ABSL_FLAG(int64_t, stream_buffer_bytes, EnvOrInt("ENGRAM_STREAM_BUFFER_BYTES", static_cast<int64_t>(kDefaults.stream_buffer_bytes)),
          "SampleStream frames held for a slow reader before the call ends RESOURCE_EXHAUSTED "
          "(env ENGRAM_STREAM_BUFFER_BYTES)");
ABSL_FLAG(int32_t, writer_threads, static_cast<int32_t>(EnvOrInt("ENGRAM_WRITER_THREADS", kDefaults.writer_threads)),
          "threads that run CreateBank, DeleteBank, Store, DeletePatterns and Backup; writes "
          "beyond them queue (up to --max_queue) (env ENGRAM_WRITER_THREADS)");
ABSL_FLAG(std::string, auth_token_file, EnvOr("ENGRAM_AUTH_TOKEN_FILE", ""),
          "file holding the bearer token every call must present (env ENGRAM_AUTH_TOKEN_FILE; "
          "or the token itself in ENGRAM_AUTH_TOKEN)");
ABSL_FLAG(std::string, tls_cert, EnvOr("ENGRAM_TLS_CERT", ""),
          "PEM certificate chain; with --tls_key enables TLS (env ENGRAM_TLS_CERT)");
ABSL_FLAG(std::string, tls_key, EnvOr("ENGRAM_TLS_KEY", ""),
          "PEM private key (env ENGRAM_TLS_KEY)");
ABSL_FLAG(std::string, http_listen, EnvOr("ENGRAM_HTTP_LISTEN", ""),
          "host:port of JSON over HTTP (POST /v1/{Method}) and the web page (/ui/); empty: off "
          "(env ENGRAM_HTTP_LISTEN)");
ABSL_FLAG(std::string, http_ui_dir, EnvOr("ENGRAM_HTTP_UI_DIR", ""),
          "directory of the web page served under /ui/; empty: the ui/ directory of the source "
          "tree engramd was built from, when it exists (env ENGRAM_HTTP_UI_DIR)");
ABSL_FLAG(int32_t, http_threads, static_cast<int32_t>(EnvOrInt("ENGRAM_HTTP_THREADS", kDefaults.http_threads)),
          "threads serving HTTP connections (env ENGRAM_HTTP_THREADS)");
ABSL_FLAG(int64_t, filter_cache_bytes,
          EnvOrInt("ENGRAM_FILTER_CACHE_BYTES", static_cast<int64_t>(kDefaults.filter_cache_bytes)),
          "bytes of filtered banks kept for later calls with the same filter on an unchanged bank "
          "(0 keeps none)");
ABSL_FLAG(int64_t, expire_interval_ms, EnvOrInt("ENGRAM_EXPIRE_INTERVAL_MS", 1000),
          "how often patterns whose time to live ran out are deleted from memory and disk; 0 "
          "turns the sweep off (a read still deletes its bank's expired patterns first)");
ABSL_FLAG(std::string, log, EnvOr("ENGRAM_LOG", ""),
          "replicated mode: NATS URLs of the JetStream cluster holding this replica group's "
          "write log, e.g. nats://n1:4222,nats://n2:4222; every write is acknowledged once a "
          "quorum of the log holds it and this replica applied it; empty: local writes only "
          "(env ENGRAM_LOG)");
ABSL_FLAG(std::string, log_stream, EnvOr("ENGRAM_LOG_STREAM", "ENGRAM"),
          "the replica group's JetStream stream; the same on every replica of the group "
          "(env ENGRAM_LOG_STREAM)");
ABSL_FLAG(int32_t, log_replicas, static_cast<int32_t>(EnvOrInt("ENGRAM_LOG_REPLICAS", 3)),
          "copies of the stream on the NATS servers, used when this replica creates it "
          "(env ENGRAM_LOG_REPLICAS)");
ABSL_FLAG(int64_t, log_publish_timeout_ms, EnvOrInt("ENGRAM_LOG_PUBLISH_TIMEOUT_MS", 5000),
          "longest wait of a write for the log's quorum ack; then UNAVAILABLE "
          "(env ENGRAM_LOG_PUBLISH_TIMEOUT_MS)");
ABSL_FLAG(int64_t, min_sequence_wait_ms, EnvOrInt("ENGRAM_MIN_SEQUENCE_WAIT_MS", 5000),
          "longest wait of a read for its min_sequence; then UNAVAILABLE "
          "(env ENGRAM_MIN_SEQUENCE_WAIT_MS)");
ABSL_FLAG(std::string, restore_from, "",
          "start from this Backup snapshot (the data directory must hold no database)");
ABSL_FLAG(int32_t, shutdown_grace_seconds, 10,
          "seconds running calls get to finish on SIGTERM");
ABSL_FLAG(bool, print_limits, false,
          "print the table of limits (defaults) and their status codes as markdown, and exit");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("Engram: Dense Associative Memory banks over gRPC");
  absl::ParseCommandLine(argc, argv);
  if (absl::GetFlag(FLAGS_print_limits)) {
    std::cout << engram::server::LimitsMarkdown(kDefaults);
    return 0;
  }

  // SIGTERM / SIGINT write their number to a pipe that the waiter below
  // reads (a handler, not sigwait: threads started before main, such as
  // OpenBLAS's, do not have the signals blocked and may receive them).
  if (pipe(g_signal_pipe) != 0) {
    std::cerr << "engramd: cannot create the signal pipe" << std::endl;
    return 1;
  }
  struct sigaction action {};
  action.sa_handler = OnShutdownSignal;
  sigemptyset(&action.sa_mask);
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);

  // Memory that the server frees goes back to the system: a fixed mmap
  // threshold (256 KiB) sends the large blocks (bank versions, batch
  // scratch, messages) to mmap, and a few malloc arenas bound what the
  // freed small blocks of many threads keep. Without it, glibc's
  // self-raising threshold and per-thread arenas let the resident size of
  // a busy server creep up by half under a steady load. GLIBC_TUNABLES
  // overrides both.
  if (std::getenv("GLIBC_TUNABLES") == nullptr) {
    mallopt(M_MMAP_THRESHOLD, 256 << 10);
    mallopt(M_ARENA_MAX, 4);
  }
#ifdef NDEBUG
  // Debian's Abseil is built with the mutex deadlock detector on, and gRPC
  // takes absl::Mutex on every call: the detector's lock graph costs a
  // tiny call several per cent of its time. Builds with NDEBUG (release)
  // turn it off; debug builds keep it.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
#endif

  engram::server::ServerConfig config;
  config.role = absl::GetFlag(FLAGS_role);
  if (config.role == "router") {
    auto shards = engram::server::ParseShardList(absl::GetFlag(FLAGS_shards));
    if (!shards.ok()) {
      std::cerr << "engramd: " << shards.status().message() << std::endl;
      return 1;
    }
    config.shards = *std::move(shards);
    config.shard_tls_ca_file = absl::GetFlag(FLAGS_shard_tls_ca);
  } else if (!absl::GetFlag(FLAGS_shards).empty() || !absl::GetFlag(FLAGS_shard_tls_ca).empty()) {
    std::cerr << "engramd: --shards and --shard_tls_ca are a router's flags; add --role=router"
              << std::endl;
    return 1;
  }
  config.listen = absl::GetFlag(FLAGS_listen);
  config.data_dir = absl::GetFlag(FLAGS_data_dir);
  config.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  config.memory_budget_bytes = static_cast<uint64_t>(absl::GetFlag(FLAGS_memory_budget_bytes));
  config.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  config.max_batch = absl::GetFlag(FLAGS_max_batch);
  config.batching = absl::GetFlag(FLAGS_batching);
  config.max_batch_queries = absl::GetFlag(FLAGS_max_batch_queries);
  config.max_batch_delay = absl::Microseconds(absl::GetFlag(FLAGS_max_batch_delay_us));
  if (config.max_batch_queries < 1 || config.max_batch_delay < absl::ZeroDuration()) {
    std::cerr << "engramd: --max_batch_queries must be >= 1 and --max_batch_delay_us >= 0"
              << std::endl;
    return 1;
  }
  config.executor_threads = absl::GetFlag(FLAGS_executor_threads);
  config.max_queue = absl::GetFlag(FLAGS_max_queue);
  config.queue_timeout = absl::Milliseconds(absl::GetFlag(FLAGS_queue_timeout_ms));
  config.inline_work = static_cast<double>(absl::GetFlag(FLAGS_inline_work));
  config.stream_buffer_bytes = static_cast<size_t>(absl::GetFlag(FLAGS_stream_buffer_bytes));
  config.writer_threads = absl::GetFlag(FLAGS_writer_threads);
  if (config.executor_threads < 0 || config.max_queue < 0 || absl::GetFlag(FLAGS_queue_timeout_ms) < 0 ||
      absl::GetFlag(FLAGS_inline_work) < 0 || absl::GetFlag(FLAGS_stream_buffer_bytes) < 1 ||
      config.writer_threads < 1) {
    std::cerr << "engramd: --executor_threads, --max_queue, --queue_timeout_ms and --inline_work "
                 "must be >= 0, --writer_threads and --stream_buffer_bytes >= 1"
              << std::endl;
    return 1;
  }

  config.http_listen = absl::GetFlag(FLAGS_http_listen);
  config.http_ui_dir = absl::GetFlag(FLAGS_http_ui_dir);
  if (config.http_ui_dir.empty() && std::filesystem::is_directory(ENGRAM_DEFAULT_UI_DIR)) {
    config.http_ui_dir = ENGRAM_DEFAULT_UI_DIR;
  }
  if (absl::GetFlag(FLAGS_filter_cache_bytes) < 0) {
    std::cerr << "engramd: --filter_cache_bytes must be >= 0" << std::endl;
    return 1;
  }
  config.filter_cache_bytes = static_cast<size_t>(absl::GetFlag(FLAGS_filter_cache_bytes));
  if (absl::GetFlag(FLAGS_expire_interval_ms) < 0) {
    std::cerr << "engramd: --expire_interval_ms must be >= 0" << std::endl;
    return 1;
  }
  config.expire_interval = absl::Milliseconds(absl::GetFlag(FLAGS_expire_interval_ms));
  config.http_threads = absl::GetFlag(FLAGS_http_threads);
  if (config.http_threads < 1) {
    std::cerr << "engramd: --http_threads must be >= 1" << std::endl;
    return 1;
  }
  config.restore_from = absl::GetFlag(FLAGS_restore_from);
  config.log_servers = absl::GetFlag(FLAGS_log);
  config.log_stream = absl::GetFlag(FLAGS_log_stream);
  config.log_replicas = absl::GetFlag(FLAGS_log_replicas);
  if (absl::GetFlag(FLAGS_log_publish_timeout_ms) < 1 ||
      absl::GetFlag(FLAGS_min_sequence_wait_ms) < 0) {
    std::cerr << "engramd: --log_publish_timeout_ms must be >= 1 and --min_sequence_wait_ms "
                 ">= 0\n";
    return 2;
  }
  config.log_publish_timeout = absl::Milliseconds(absl::GetFlag(FLAGS_log_publish_timeout_ms));
  config.min_sequence_wait = absl::Milliseconds(absl::GetFlag(FLAGS_min_sequence_wait_ms));
  config.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
  config.tls_key_file = absl::GetFlag(FLAGS_tls_key);
  config.auth_token = EnvOr("ENGRAM_AUTH_TOKEN", "");
  if (const std::string path = absl::GetFlag(FLAGS_auth_token_file); !path.empty()) {
    std::ifstream in(path);
    if (!in) {
      std::cerr << "engramd: cannot read --auth_token_file " << path << std::endl;
      return 1;
    }
    config.auth_tokens.assign(std::istreambuf_iterator<char>(in), {});
    if (config.auth_tokens.find_first_not_of(" \t\r\n") == std::string::npos) {
      std::cerr << "engramd: --auth_token_file " << path << " is empty" << std::endl;
      return 1;
    }
  }

  auto server = engram::server::EngramServer::Start(config);
  if (!server.ok()) {
    std::cerr << "engramd: " << server.status().ToString() << std::endl;
    return 1;
  }
  if (config.role == "router") {
    std::cout << "engramd: routing on " << config.listen << " (port " << (*server)->port()
              << ") to " << config.shards.size() << " shards";
    for (const std::string& shard : config.shards) std::cout << " " << shard;
    std::cout << (config.shard_tls_ca_file.empty() ? "" : " over TLS")
              << (config.tls_cert_file.empty() ? "" : ", listening with TLS");
    std::cout << ", metrics "
              << (config.metrics_listen.empty() ? "off"
                                                : "http://" + config.metrics_listen + "/metrics")
              << std::endl;
  } else {
    size_t banks = (*server)->registry()->ListBanks().size();
  std::cout << "engramd: serving on " << config.listen << " (port " << (*server)->port()
            << "), data " << config.data_dir << " (" << banks << " banks), metrics "
            << (config.metrics_listen.empty() ? "off" : "http://" + config.metrics_listen + "/metrics")
            << (config.http_listen.empty()
                    ? ""
                    : ", HTTP http://" + config.http_listen.substr(0, config.http_listen.rfind(':')) +
                          ":" + std::to_string((*server)->http_port()) +
                          (config.http_ui_dir.empty() ? "/v1/" : "/ui/"))
            << (config.tls_cert_file.empty() ? "" : ", TLS")
            << (config.auth_token.empty() && config.auth_tokens.empty() ? "" : ", bearer-token authentication") << std::endl;
  }

  std::thread waiter([&] {
    unsigned char sig = 0;
    while (read(g_signal_pipe[0], &sig, 1) < 0 && errno == EINTR) {
    }
    std::cout << "engramd: signal " << int{sig} << ", shutting down" << std::endl;
    (*server)->Shutdown(absl::Seconds(absl::GetFlag(FLAGS_shutdown_grace_seconds)));
  });
  (*server)->Wait();
  waiter.join();
  std::cout << "engramd: stopped" << std::endl;
  return 0;
}
