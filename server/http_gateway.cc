#include "server/http_gateway.h"

#include <atomic>
#include <cmath>
#include <filesystem>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/dynamic_message.h>
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <grpcpp/generic/generic_stub.h>
#include <httplib.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "engram/core/mutex.h"
#include "engram/v1/engram.grpc.pb.h"

namespace engram::server {
namespace {

using google::protobuf::Message;
using google::protobuf::MethodDescriptor;
using MessageStub = grpc::TemplatedGenericStub<Message, Message>;

constexpr char kJson[] = "application/json";
constexpr char kNdjson[] = "application/x-ndjson";

std::string CodeName(grpc::StatusCode code) {
  static constexpr const char* kNames[] = {
      "OK",           "CANCELLED",          "UNKNOWN",          "INVALID_ARGUMENT",
      "DEADLINE_EXCEEDED", "NOT_FOUND",     "ALREADY_EXISTS",   "PERMISSION_DENIED",
      "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",   "OUT_OF_RANGE",
      "UNIMPLEMENTED", "INTERNAL",          "UNAVAILABLE",      "DATA_LOSS",
      "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  return i >= 0 && i < static_cast<int>(std::size(kNames)) ? kNames[i] : "UNKNOWN";
}

// A JSON string literal holding `text` (quoted and escaped).
std::string JsonQuoted(const std::string& text) {
  google::protobuf::Value value;
  value.set_string_value(text);
  std::string out;
  if (!google::protobuf::util::MessageToJsonString(value, &out).ok()) return "\"\"";
  return out;
}

// {"error": {"code": <http status>, "status": "<gRPC code>", "message": ...}}
std::string ErrorJson(int http_status, grpc::StatusCode code, const std::string& message) {
  return absl::StrCat(R"({"error":{"code":)", http_status, R"(,"status":")", CodeName(code),
                      R"(","message":)", JsonQuoted(message), "}}");
}

std::string ResponseJson(const Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.always_print_primitive_fields = true;
  std::string out;
  auto status = google::protobuf::util::MessageToJsonString(message, &out, options);
  if (!status.ok()) {
    // Only non-finite doubles have no JSON form; the server answers none.
    return ErrorJson(500, grpc::StatusCode::INTERNAL,
                     absl::StrCat("cannot encode the response as JSON: ", status.message().ToString()));
  }
  return out;
}

// A server-streaming call read one message at a time by the HTTP thread.
// Reads are started only when the previous frame was taken, so a slow HTTP
// reader slows the stream (gRPC flow control) instead of buffering it here.
// A hold keeps gRPC's stream object alive between a frame's arrival and the
// next StartRead; it is released once the reads are over (or on
// destruction), after which OnDone ends the call.
class StreamCall final : public grpc::ClientBidiReactor<Message, Message> {
 public:
  StreamCall(std::unique_ptr<Message> request, const Message* frame_prototype)
      : request_(std::move(request)), frame_prototype_(frame_prototype) {
    frame_.reset(frame_prototype_->New());
  }
  // Cancels a call still running and waits until gRPC is done with it.
  ~StreamCall() override {
    if (!started_) return;
    context_.TryCancel();
    ReleaseHold();
    Finish();
  }

  // Set deadline and metadata here before Begin.
  grpc::ClientContext* context() { return &context_; }
  void Begin(MessageStub* stub, const std::string& path) {
    stub->PrepareBidiStreamingCall(&context_, path, grpc::StubOptions(), this);
    started_ = true;
    AddHold();
    StartWriteLast(request_.get(), grpc::WriteOptions());
    StartRead(frame_.get());
    StartCall();
  }

  // The next frame, or nullptr once the stream ended (then see Finish).
  // Called from one thread at a time.
  std::unique_ptr<Message> Next() {
    std::unique_ptr<Message> out;
    {
      core::MutexLock lock(&mu_);
      while (!frame_ready_ && !reads_over_) cv_.Wait(&mu_);
      if (frame_ready_) {
        out = std::move(frame_);
        frame_.reset(frame_prototype_->New());
        frame_ready_ = false;
      }
    }
    if (out == nullptr) {
      ReleaseHold();
      return nullptr;
    }
    StartRead(frame_.get());
    return out;
  }

  void Cancel() { context_.TryCancel(); }

  // Waits for the call's status; the reads must be over (Next returned
  // nullptr) or the call cancelled.
  grpc::Status Finish() {
    core::MutexLock lock(&mu_);
    while (!done_) cv_.Wait(&mu_);
    return status_;
  }

  void OnReadDone(bool ok) override {
    core::MutexLock lock(&mu_);
    (ok ? frame_ready_ : reads_over_) = true;
    cv_.SignalAll();
  }
  void OnDone(const grpc::Status& status) override {
    core::MutexLock lock(&mu_);
    status_ = status;
    done_ = reads_over_ = true;
    cv_.SignalAll();
  }

 private:
  void ReleaseHold() {
    if (held_ && started_) {
      held_ = false;
      RemoveHold();
    }
  }

  grpc::ClientContext context_;
  std::unique_ptr<Message> request_;
  const Message* frame_prototype_;
  bool started_ = false;  // consumer thread only
  bool held_ = true;      // consumer thread only
  core::Mutex mu_;
  core::CondVar cv_;
  std::unique_ptr<Message> frame_ ABSL_GUARDED_BY(mu_);
  bool frame_ready_ ABSL_GUARDED_BY(mu_) = false;
  bool reads_over_ ABSL_GUARDED_BY(mu_) = false;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

int HttpStatusForGrpcCode(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return 200;
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::OUT_OF_RANGE: return 400;
    case grpc::StatusCode::UNAUTHENTICATED: return 401;
    case grpc::StatusCode::PERMISSION_DENIED: return 403;
    case grpc::StatusCode::NOT_FOUND: return 404;
    case grpc::StatusCode::ALREADY_EXISTS:
    case grpc::StatusCode::ABORTED: return 409;
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return 429;
    case grpc::StatusCode::CANCELLED: return 499;
    case grpc::StatusCode::UNIMPLEMENTED: return 501;
    case grpc::StatusCode::UNAVAILABLE: return 503;
    case grpc::StatusCode::DEADLINE_EXCEEDED: return 504;
    default: return 500;
  }
}

struct HttpGateway::Routes {
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<MessageStub> stub;
  std::shared_ptr<Metrics> metrics;
  const google::protobuf::ServiceDescriptor* service = nullptr;

  void Fail(httplib::Response& res, grpc::StatusCode code, const std::string& message) {
    res.status = HttpStatusForGrpcCode(code);
    res.set_content(ErrorJson(res.status, code, message), kJson);
  }

  // Fills `context` from the HTTP headers; INVALID_ARGUMENT on a bad
  // X-Server-Timeout.
  grpc::Status Prepare(const httplib::Request& req, grpc::ClientContext* context) {
    if (req.has_header("Authorization")) {
      context->AddMetadata("authorization", req.get_header_value("Authorization"));
    }
    if (req.has_header("X-Server-Timeout")) {
      const std::string value = req.get_header_value("X-Server-Timeout");
      double seconds = 0;
      if (!absl::SimpleAtod(value, &seconds) || !std::isfinite(seconds) || seconds <= 0) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            absl::StrCat("X-Server-Timeout must be a positive number of "
                                         "seconds, got '", value, "'"));
      }
      context->set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(seconds)));
    }
    return grpc::Status::OK;
  }

  void Call(const httplib::Request& req, httplib::Response& res) {
    const absl::Time start = absl::Now();
    const std::string name = req.matches[1];
    const MethodDescriptor* method = service->FindMethodByName(name);
    if (method == nullptr || method->client_streaming()) {
      std::vector<std::string> names;
      for (int i = 0; i < service->method_count(); ++i) {
        if (!service->method(i)->client_streaming()) names.push_back(service->method(i)->name());
      }
      Fail(res, grpc::StatusCode::NOT_FOUND,
           absl::StrCat("no method '", name, "'; POST /v1/{", absl::StrJoin(names, ","), "}"));
      metrics->RecordHttpRequest("unknown", res.status, absl::ToDoubleSeconds(absl::Now() - start));
      return;
    }
    auto* factory = google::protobuf::MessageFactory::generated_factory();
    std::unique_ptr<Message> request(factory->GetPrototype(method->input_type())->New());
    google::protobuf::util::JsonParseOptions parse;
    parse.ignore_unknown_fields = false;
    auto parsed = google::protobuf::util::JsonStringToMessage(req.body.empty() ? "{}" : req.body,
                                                              request.get(), parse);
    if (!parsed.ok()) {
      Fail(res, grpc::StatusCode::INVALID_ARGUMENT,
           absl::StrCat("the body is not a valid ", method->input_type()->full_name(),
                        " JSON message: ", parsed.message().ToString()));
    } else if (method->server_streaming()) {
      Stream(req, res, method, std::move(request));
    } else {
      Unary(req, res, method, *request);
    }
    metrics->RecordHttpRequest(name, res.status, absl::ToDoubleSeconds(absl::Now() - start));
  }

  std::string Path(const MethodDescriptor* method) const {
    return absl::StrCat("/", service->full_name(), "/", method->name());
  }

  void Unary(const httplib::Request& req, httplib::Response& res, const MethodDescriptor* method,
             const Message& request) {
    grpc::ClientContext context;
    if (grpc::Status bad = Prepare(req, &context); !bad.ok()) {
      return Fail(res, bad.error_code(), bad.error_message());
    }
    auto* factory = google::protobuf::MessageFactory::generated_factory();
    std::unique_ptr<Message> response(factory->GetPrototype(method->output_type())->New());
    core::Mutex mu;
    core::CondVar cv;
    bool done = false;
    grpc::Status status;
    stub->UnaryCall(&context, Path(method), grpc::StubOptions(), &request, response.get(),
                    [&](grpc::Status s) {
                      core::MutexLock lock(&mu);
                      status = std::move(s);
                      done = true;
                      cv.SignalAll();
                    });
    {
      core::MutexLock lock(&mu);
      while (!done) cv.Wait(&mu);
    }
    if (!status.ok()) return Fail(res, status.error_code(), status.error_message());
    res.status = 200;
    res.set_content(ResponseJson(*response), kJson);
  }

  // The status line is sent with the first frame: a call that fails before
  // it (unknown bank, bad input) gets its own HTTP status.
  void Stream(const httplib::Request& req, httplib::Response& res, const MethodDescriptor* method,
              std::unique_ptr<Message> request) {
    auto* factory = google::protobuf::MessageFactory::generated_factory();
    auto call = std::make_shared<StreamCall>(std::move(request),
                                             factory->GetPrototype(method->output_type()));
    if (grpc::Status bad = Prepare(req, call->context()); !bad.ok()) {
      return Fail(res, bad.error_code(), bad.error_message());
    }
    call->Begin(stub.get(), Path(method));
    std::unique_ptr<Message> first = call->Next();
    if (first == nullptr) {
      grpc::Status status = call->Finish();
      if (!status.ok()) return Fail(res, status.error_code(), status.error_message());
      res.status = 200;
      res.set_content("", kNdjson);
      return;
    }
    res.status = 200;
    auto pending = std::make_shared<std::unique_ptr<Message>>(std::move(first));
    res.set_chunked_content_provider(
        kNdjson, [call, pending](size_t, httplib::DataSink& sink) {
          std::unique_ptr<Message> frame = std::move(*pending);
          for (; frame != nullptr; frame = call->Next()) {
            std::string line = ResponseJson(*frame);
            line.push_back('\n');
            if (!sink.write(line.data(), line.size())) {
              call->Cancel();  // the HTTP client went away
              return false;
            }
          }
          grpc::Status status = call->Finish();
          if (!status.ok()) {
            std::string line = ErrorJson(HttpStatusForGrpcCode(status.error_code()),
                                         status.error_code(), status.error_message());
            line.push_back('\n');
            sink.write(line.data(), line.size());
          }
          sink.done();
          return true;
        });
  }
};

absl::StatusOr<std::unique_ptr<HttpGateway>> HttpGateway::Start(
    const HttpGatewayOptions& options, std::shared_ptr<grpc::Channel> channel,
    std::shared_ptr<Metrics> metrics) {
  const size_t colon = options.listen.rfind(':');
  int port = -1;
  std::string host = colon == std::string::npos ? "" : options.listen.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  if (colon == std::string::npos || host.empty() ||
      !absl::SimpleAtoi(options.listen.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--http_listen must be host:port (port 0 picks a free one), got '", options.listen, "'"));
  }
  if (!options.ui_dir.empty() && !std::filesystem::is_directory(options.ui_dir)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--http_ui_dir '", options.ui_dir, "' is not a directory"));
  }
  std::unique_ptr<HttpGateway> gw(new HttpGateway());
  gw->routes_ = std::make_unique<Routes>();
  Routes* routes = gw->routes_.get();
  routes->channel = channel;
  routes->stub = std::make_unique<MessageStub>(std::move(channel));
  routes->metrics = std::move(metrics);
  routes->service = google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(
      v1::MemoryService::service_full_name());
  if (routes->service == nullptr) {
    return absl::InternalError("the MemoryService descriptor is not linked in");
  }

  gw->http_ = std::make_unique<httplib::Server>();
  httplib::Server& http = *gw->http_;
  const int threads = std::max(1, options.threads);
  http.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  http.set_payload_max_length(options.max_body_bytes);
  // Headers and body go out in separate writes: without TCP_NODELAY the
  // body waits for the client's delayed ACK (~40 ms a call).
  http.set_tcp_nodelay(true);
  http.set_exception_handler([](const httplib::Request&, httplib::Response& res,
                                std::exception_ptr) {
    res.status = 500;
    res.set_content(ErrorJson(500, grpc::StatusCode::INTERNAL, "unexpected error"), kJson);
  });
  http.Post(R"(/v1/([A-Za-z0-9_]+))", [routes](const httplib::Request& req,
                                                 httplib::Response& res) {
    routes->Call(req, res);
  });
  http.Get("/healthz", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("ok\n", "text/plain");
  });
  if (!options.ui_dir.empty()) {
    http.set_mount_point("/ui", options.ui_dir);
    http.Get("/", [](const httplib::Request&, httplib::Response& res) {
      res.set_redirect("/ui/");
    });
    http.Get("/ui", [](const httplib::Request&, httplib::Response& res) {
      res.set_redirect("/ui/");
    });
  }

  if (port == 0) {
    gw->port_ = http.bind_to_any_port(host);
  } else if (http.bind_to_port(host, port)) {
    gw->port_ = port;
  }
  if (gw->port_ <= 0) {
    return absl::UnavailableError(absl::StrCat("cannot serve HTTP on ", options.listen));
  }
  auto returned = std::make_shared<std::atomic<bool>>(false);
  gw->listener_ = std::thread([&http, returned] {
    http.listen_after_bind();
    returned->store(true);
  });
  // stop() only takes effect once the accept loop runs: Start returns when
  // it does, so a Stop right after Start cannot be lost.
  while (!http.is_running() && !returned->load()) absl::SleepFor(absl::Milliseconds(1));
  return gw;
}

HttpGateway::~HttpGateway() { Stop(); }

void HttpGateway::Stop() {
  std::call_once(stopped_, [this] {
    http_->stop();
    if (listener_.joinable()) listener_.join();
  });
}

}  // namespace engram::server
