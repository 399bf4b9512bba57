#include "server/server.h"

#include <cstdio>
#include <filesystem>
#include <fstream>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include "absl/strings/str_cat.h"
#include "engram/core/status_macros.h"
#include "engram/core/storage.h"

namespace engram::server {
namespace {
// gRPC's synchronous threads: reflection and a router's calls.
constexpr int kMaxSyncThreads = 256;
}  // namespace

absl::Status EngramServer::ServeMetrics(const std::string& listen) {
  if (listen.empty()) return absl::OkStatus();
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(listen);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", listen, ": ", e.what()));
  }
  exposer_->RegisterCollectable(metrics_->registry());
  return absl::OkStatus();
}

namespace {

// The whole of a file, or UNAVAILABLE naming it.
absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::UnavailableError(absl::StrCat("cannot read '", path, "'"));
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The gRPC port's credentials: TLS with --tls_cert / --tls_key, else
// plaintext; the common mistakes in the files are named with the file.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ListenCredentials(
    const ServerConfig& config) {
  if (!config.tls_cert_file.empty() || !config.tls_key_file.empty()) {
    if (config.tls_cert_file.empty() || config.tls_key_file.empty()) {
      return absl::InvalidArgumentError("TLS needs both a certificate and a key file");
    }
    ENGRAM_ASSIGN_OR_RETURN(std::string cert, ReadFile(config.tls_cert_file));
    ENGRAM_ASSIGN_OR_RETURN(std::string key, ReadFile(config.tls_key_file));
    // The TLS library's own refusal comes only as a failed listen; the
    // common mistakes are named here, with the file.
    if (cert.find("-----BEGIN CERTIFICATE-----") == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--tls_cert '", config.tls_cert_file, "' holds no PEM certificate "
          "(-----BEGIN CERTIFICATE-----)"));
    }
    if (key.find("-----BEGIN") == std::string::npos ||
        key.find("PRIVATE KEY-----") == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--tls_key '", config.tls_key_file, "' holds no PEM private key "
          "(-----BEGIN ... PRIVATE KEY-----)"));
    }
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({key, cert});
    return grpc::SslServerCredentials(ssl);
  }
  return grpc::InsecureServerCredentials();
}

}  // namespace

absl::StatusOr<std::unique_ptr<EngramServer>> EngramServer::StartRouter(
    const ServerConfig& config) {
  std::unique_ptr<EngramServer> s(new EngramServer());
  s->metrics_ = std::make_shared<Metrics>();
  RouterOptions ro;
  ro.shards = config.shards;
  ro.max_message_bytes = config.max_message_bytes;
  ro.max_batch = config.max_batch;
  ro.clock_ms = config.clock_ms;
  ro.batching = config.batching;
  ro.max_batch_queries = config.max_batch_queries;
  ro.metrics = s->metrics_;
  if (!config.shard_tls_ca_file.empty()) {
    ENGRAM_ASSIGN_OR_RETURN(ro.shard_tls_ca_pem, ReadFile(config.shard_tls_ca_file));
    if (ro.shard_tls_ca_pem.find("-----BEGIN CERTIFICATE-----") == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--shard_tls_ca '", config.shard_tls_ca_file, "' holds no PEM certificate "
          "(-----BEGIN CERTIFICATE-----)"));
    }
  }
  ENGRAM_ASSIGN_OR_RETURN(s->router_, RouterService::Create(ro));
  ENGRAM_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> creds,
                          ListenCredentials(config));
  ENGRAM_RETURN_IF_ERROR(s->ServeMetrics(config.metrics_listen));
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(config.listen, creds, &s->port_);
  builder.SetMaxReceiveMessageSize(config.max_message_bytes);
  builder.SetMaxSendMessageSize(config.max_message_bytes);
  grpc::ResourceQuota quota("engramd-router");
  quota.SetMaxThreads(kMaxSyncThreads);
  builder.SetResourceQuota(quota);
  builder.RegisterService(s->router_.get());
  builder.experimental().SetInterceptorCreators(s->metrics_->InterceptorFactories());
  s->server_ = builder.BuildAndStart();
  if (s->server_ == nullptr || s->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", config.listen));
  }
  s->server_->GetHealthCheckService()->SetServingStatus(v1::MemoryService::service_full_name(),
                                                        true);
  s->server_->GetHealthCheckService()->SetServingStatus(true);
  return s;
}

absl::StatusOr<std::unique_ptr<EngramServer>> EngramServer::Start(
    const ServerConfig& config) {
  if (config.role == "router") return StartRouter(config);
  if (config.role != "node") {
    return absl::InvalidArgumentError(
        absl::StrCat("--role is '", config.role, "'; expected node or router"));
  }
  std::unique_ptr<EngramServer> s(new EngramServer());
  std::error_code ec;
  std::filesystem::create_directories(config.data_dir, ec);
  if (ec) {
    return absl::UnavailableError(absl::StrCat(
        "cannot create data directory '", config.data_dir, "': ", ec.message()));
  }
  s->metrics_ = std::make_shared<Metrics>();
  ServiceLimits limits;
  limits.max_batch = config.max_batch;
  limits.batching = config.batching;
  limits.scheduler.threads = config.executor_threads;
  limits.scheduler.max_queue = config.max_queue;
  limits.scheduler.max_batch_queries = config.max_batch_queries;
  limits.scheduler.max_batch_delay = config.max_batch_delay;
  limits.queue_timeout = config.queue_timeout;
  limits.min_sequence_wait = config.min_sequence_wait;
  limits.inline_work = config.inline_work;
  limits.stream_buffer_bytes = config.stream_buffer_bytes;
  limits.filter_cache_bytes = config.filter_cache_bytes;
  limits.writer.threads = config.writer_threads;
  limits.writer.max_queue = config.max_queue;
  if (!config.auth_tokens.empty()) {
    ENGRAM_ASSIGN_OR_RETURN(limits.access, AccessPolicy::Parse(config.auth_tokens));
  } else {
    limits.access = AccessPolicy::SingleToken(config.auth_token);
  }
  limits.backup_dir = (std::filesystem::path(config.data_dir) / "backups").string();
  s->service_ = std::make_unique<MemoryServiceImpl>(nullptr, s->metrics_, limits);
  s->shard_ = std::make_unique<ShardServiceImpl>(s->service_.get(), limits.max_batch);

  ENGRAM_RETURN_IF_ERROR(s->ServeMetrics(config.metrics_listen));

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  ENGRAM_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> creds,
                          ListenCredentials(config));
  builder.AddListeningPort(config.listen, creds, &s->port_);
  builder.SetMaxReceiveMessageSize(config.max_message_bytes);
  builder.SetMaxSendMessageSize(config.max_message_bytes);
  // MemoryService and the shard protocol run on the callback API and the
  // node's own pools; reflection uses gRPC's synchronous threads, bounded
  // here.
  grpc::ResourceQuota quota("engramd");
  quota.SetMaxThreads(kMaxSyncThreads);
  builder.SetResourceQuota(quota);
  builder.RegisterService(s->service_.get());
  builder.RegisterService(s->shard_.get());
  builder.experimental().SetInterceptorCreators(s->metrics_->InterceptorFactories());
  s->server_ = builder.BuildAndStart();
  if (s->server_ == nullptr || s->port_ == 0) {
    if (!config.tls_cert_file.empty()) {
      return absl::UnavailableError(absl::StrCat(
          "cannot listen on ", config.listen, " with TLS: the address is taken, or the TLS "
          "library refused the certificate '", config.tls_cert_file, "' or the key '",
          config.tls_key_file, "' (a malformed PEM body, or a key that does not match the "
          "certificate; gRPC's log above names which)"));
    }
    return absl::UnavailableError(absl::StrCat("cannot listen on ", config.listen));
  }
  // NOT_SERVING (and MemoryService UNAVAILABLE) until every bank is loaded.
  s->server_->GetHealthCheckService()->SetServingStatus(v1::MemoryService::service_full_name(),
                                                        false);
  s->server_->GetHealthCheckService()->SetServingStatus(false);
  const std::string db = (std::filesystem::path(config.data_dir) / "engram.db").string();
  if (!config.restore_from.empty()) {
    if (std::filesystem::exists(db)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--restore_from needs an empty data directory; '", db, "' exists"));
    }
    std::filesystem::copy_file(config.restore_from, db, ec);
    if (ec) {
      return absl::UnavailableError(absl::StrCat(
          "cannot restore from '", config.restore_from, "': ", ec.message()));
    }
  }
  ENGRAM_ASSIGN_OR_RETURN(auto storage, core::OpenSqliteStorage(db));
  core::RegistryOptions ropts;
  ropts.memory_budget_bytes = config.memory_budget_bytes;
  ropts.clock_ms = config.clock_ms;
  ENGRAM_ASSIGN_OR_RETURN(s->registry_,
                          core::BankRegistry::Open(std::move(storage), ropts));

  if (!config.log_servers.empty()) {
    WriteLogOptions lo;
    lo.servers = config.log_servers;
    lo.stream = config.log_stream;
    lo.replicas = config.log_replicas;
    lo.publish_timeout = config.log_publish_timeout;
    lo.metrics = s->metrics_->registry();
    ENGRAM_ASSIGN_OR_RETURN(uint64_t applied, s->registry_->LogSequence());
    MemoryServiceImpl* service = s->service_.get();
    core::BankRegistry* registry = s->registry_.get();
    ENGRAM_ASSIGN_OR_RETURN(
        s->write_log_,
        WriteLog::Open(lo, applied,
                       [service, registry](const replication::v1::LogEntry& entry, uint64_t seq,
                                           std::string* response) {
                         return service->ApplyLogEntry(registry, entry, seq, response);
                       }));
    s->service_->SetWriteLog(s->write_log_.get());
  }
  s->service_->SetRegistry(s->registry_.get());
  if (!config.http_listen.empty()) {
    HttpGatewayOptions http;
    http.listen = config.http_listen;
    http.ui_dir = config.http_ui_dir;
    http.threads = config.http_threads;
    http.max_body_bytes = static_cast<size_t>(config.max_message_bytes);
    ENGRAM_ASSIGN_OR_RETURN(s->gateway_,
                            HttpGateway::Start(http, s->InProcessChannel(), s->metrics_));
  }
  if (config.expire_interval > absl::ZeroDuration()) {
    EngramServer* self = s.get();
    s->expiry_ = std::thread([self, every = config.expire_interval] {
      while (!self->stop_expiry_.WaitForNotificationWithTimeout(every)) {
        absl::StatusOr<int64_t> n = self->ExpireNow();
        if (!n.ok()) {
          std::fprintf(stderr, "engramd: expiry sweep: %s (retried next interval)\n",
                       n.status().ToString().c_str());
        }
      }
    });
  }
  s->server_->GetHealthCheckService()->SetServingStatus(true);
  return s;
}

absl::StatusOr<int64_t> EngramServer::ExpireNow() {
  if (registry_ == nullptr) return 0;  // a router holds no patterns
  if (write_log_ != nullptr) return service_->PublishExpiry();
  absl::Status error;
  int64_t total = 0;
  for (const auto& [name, n] : registry_->ExpireDue(&error)) {
    total += n;
    service_->RecordExpired(registry_.get(), name, n);
  }
  if (!error.ok() && total == 0) return error;
  return total;
}

void EngramServer::StopExpiry() {
  if (!expiry_.joinable()) return;
  if (!stop_expiry_.HasBeenNotified()) stop_expiry_.Notify();
  expiry_.join();
}

EngramServer::~EngramServer() {
  StopExpiry();
  // HTTP first: its running requests finish on the still-open gRPC server.
  if (gateway_ != nullptr) gateway_->Stop();
  if (server_ != nullptr) {
    server_->Shutdown(std::chrono::system_clock::now());
    if (service_ != nullptr) service_->Shutdown();  // queued compute calls: UNAVAILABLE
    server_->Wait();
  }
  write_log_.reset();  // its applier calls into service_
}

std::shared_ptr<grpc::Channel> EngramServer::InProcessChannel() {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  return server_->InProcessChannel(args);
}

void EngramServer::Shutdown(absl::Duration grace) {
  server_->GetHealthCheckService()->SetServingStatus(false);
  if (gateway_ != nullptr) gateway_->Stop();
  StopExpiry();
  server_->Shutdown(absl::ToChronoTime(absl::Now() + grace));
  if (service_ != nullptr) service_->Shutdown();
}

void EngramServer::Wait() { server_->Wait(); }

}  // namespace engram::server
