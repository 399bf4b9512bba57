// JSON over HTTP (HttpGateway) through a real engramd server and a real
// HTTP client on loopback: answers equal the gRPC answers, every error is
// the gRPC code mapped to its HTTP status, auth and deadlines carry over,
// SampleStream streams NDJSON, the page is served, and requests are counted.
#include <cmath>
#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <prometheus/text_serializer.h>

#include "absl/strings/str_split.h"
#include "engram/v1/engram.grpc.pb.h"
#include "server/http_gateway.h"
#include "server/server.h"

namespace engram::server {
namespace {

using ::testing::HasSubstr;

class HttpGatewayTest : public ::testing::Test {
 public:
  void SetUp() override { Start(""); }
  void TearDown() override {
    server_.reset();
    std::filesystem::remove_all(dir_);
  }

  void Start(const std::string& token) {
    server_.reset();
    dir_ = std::filesystem::temp_directory_path() /
           ("engram_http_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_ / "ui");
    std::ofstream(dir_ / "ui" / "index.html") << "<html><body>engram page</body></html>\n";
    ServerConfig config;
    config.listen = "127.0.0.1:0";
    config.data_dir = (dir_ / "data").string();
    config.metrics_listen = "";
    config.max_message_bytes = 1 << 20;
    config.http_listen = "127.0.0.1:0";
    config.http_ui_dir = (dir_ / "ui").string();
    config.http_threads = 4;
    config.auth_token = token;
    auto s = EngramServer::Start(config);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    ASSERT_GT(server_->http_port(), 0);
    http_ = std::make_unique<httplib::Client>("127.0.0.1", server_->http_port());
    http_->set_read_timeout(60, 0);
    stub_ = v1::MemoryService::NewStub(server_->InProcessChannel());
  }

  httplib::Result Post(const std::string& method, const std::string& body,
                       httplib::Headers headers = {}) {
    return http_->Post(("/v1/" + method).c_str(), headers, body, "application/json");
  }

  template <typename M>
  M Parse(const std::string& json) {
    M m;
    auto status = google::protobuf::util::JsonStringToMessage(json, &m);
    EXPECT_TRUE(status.ok()) << status << " in " << json;
    return m;
  }

  // The LSE bank of the tests: two orthonormal-ish patterns in N = 4.
  void MakeBank(const httplib::Headers& headers = {}) {
    auto r = Post("CreateBank",
                  R"({"name":"demo","dim":4,"kind":"STATE_KIND_CONTINUOUS",
                      "energy":{"family":"ENERGY_FAMILY_LSE","beta":4}})",
                  headers);
    ASSERT_TRUE(r);
    ASSERT_EQ(r->status, 200) << r->body;
    r = Post("Store",
             R"({"bank":"demo","patterns":[1,0,0,0, 0,0.5,0.5,0],
                 "ids":["18446744073709551615","9007199254740993"],
                 "payloads":["YQ==","AP8="]})",
             headers);
    ASSERT_TRUE(r);
    ASSERT_EQ(r->status, 200) << r->body;
  }

  std::filesystem::path dir_;
  std::unique_ptr<EngramServer> server_;
  std::unique_ptr<httplib::Client> http_;
  std::unique_ptr<v1::MemoryService::Stub> stub_;
};

TEST(HttpStatusForGrpcCode, FollowsTheGoogleApiMapping) {
  const std::pair<grpc::StatusCode, int> table[] = {
      {grpc::StatusCode::OK, 200},
      {grpc::StatusCode::CANCELLED, 499},
      {grpc::StatusCode::UNKNOWN, 500},
      {grpc::StatusCode::INVALID_ARGUMENT, 400},
      {grpc::StatusCode::DEADLINE_EXCEEDED, 504},
      {grpc::StatusCode::NOT_FOUND, 404},
      {grpc::StatusCode::ALREADY_EXISTS, 409},
      {grpc::StatusCode::PERMISSION_DENIED, 403},
      {grpc::StatusCode::RESOURCE_EXHAUSTED, 429},
      {grpc::StatusCode::FAILED_PRECONDITION, 400},
      {grpc::StatusCode::ABORTED, 409},
      {grpc::StatusCode::OUT_OF_RANGE, 400},
      {grpc::StatusCode::UNIMPLEMENTED, 501},
      {grpc::StatusCode::INTERNAL, 500},
      {grpc::StatusCode::UNAVAILABLE, 503},
      {grpc::StatusCode::DATA_LOSS, 500},
      {grpc::StatusCode::UNAUTHENTICATED, 401},
  };
  for (const auto& [code, http] : table) {
    EXPECT_EQ(HttpStatusForGrpcCode(code), http) << "code " << code;
  }
}

TEST_F(HttpGatewayTest, StoreRoundTripsUint64IdsAndBytes) {
  MakeBank();
  auto r = Post("GetPatterns", R"({"bank":"demo","ids":["18446744073709551615","9007199254740993"]})");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  // uint64 travels as a decimal string, bytes as base64 (proto3 JSON).
  EXPECT_THAT(r->body, HasSubstr("\"18446744073709551615\""));
  auto got = Parse<v1::GetPatternsResponse>(r->body);
  ASSERT_EQ(got.ids_size(), 2);
  EXPECT_EQ(got.ids(0), 18446744073709551615ULL);
  EXPECT_EQ(got.ids(1), 9007199254740993ULL);
  EXPECT_EQ(got.payloads(0), "a");
  EXPECT_EQ(got.payloads(1), std::string("\x00\xff", 2));
  const std::vector<float> want = {1, 0, 0, 0, 0, 0.5f, 0.5f, 0};
  EXPECT_EQ(std::vector<float>(got.patterns().begin(), got.patterns().end()), want);
}

TEST_F(HttpGatewayTest, RetrieveAnswersAsTheGrpcCallDoes) {
  MakeBank();
  const std::vector<float> query = {0.9f, 0.2f, 0.1f, 0.0f};
  auto r = Post("Retrieve", R"({"bank":"demo","queries":[0.9,0.2,0.1,0],
                              "options":{"dynamics":"DYNAMICS_SYNC","returnTrace":true}})");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(r->get_header_value("Content-Type"), "application/json");
  auto http = Parse<v1::RetrieveResponse>(r->body);

  grpc::ClientContext ctx;
  v1::RetrieveRequest req;
  req.set_bank("demo");
  req.mutable_queries()->Add(query.begin(), query.end());
  req.mutable_options()->set_dynamics(v1::DYNAMICS_SYNC);
  req.mutable_options()->set_return_trace(true);
  v1::RetrieveResponse grpc_resp;
  ASSERT_TRUE(stub_->Retrieve(&ctx, req, &grpc_resp).ok());

  ASSERT_EQ(http.results_size(), 1);
  const auto& a = http.results(0);
  const auto& b = grpc_resp.results(0);
  EXPECT_EQ(a.nearest().id(), 18446744073709551615ULL);
  EXPECT_EQ(a.nearest().id(), b.nearest().id());
  EXPECT_EQ(a.stop_reason(), b.stop_reason());
  EXPECT_EQ(a.steps(), b.steps());
  ASSERT_EQ(a.state_size(), 4);
  // JSON prints floats with enough digits to round-trip them exactly.
  for (int i = 0; i < 4; ++i) EXPECT_EQ(a.state(i), b.state(i)) << i;
  ASSERT_EQ(a.energy_trace_size(), b.energy_trace_size());
  for (int i = 0; i < a.energy_trace_size(); ++i) {
    EXPECT_EQ(a.energy_trace(i), b.energy_trace(i)) << i;
  }
}

TEST_F(HttpGatewayTest, EnergyMatchesTheLseClosedForm) {
  MakeBank();
  auto r = Post("Energy", R"({"bank":"demo","states":[0.3,-0.2,0.4,0.1]})");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  auto got = Parse<v1::EnergyResponse>(r->body);
  // E = -1/beta log sum exp(beta xi.x) + |x|^2 / 2, beta = 4.
  const double s1 = 0.3, s2 = 0.5 * -0.2 + 0.5 * 0.4, beta = 4;
  const double x2 = 0.09 + 0.04 + 0.16 + 0.01;
  const double want = -std::log(std::exp(beta * s1) + std::exp(beta * s2)) / beta + x2 / 2;
  ASSERT_EQ(got.energies_size(), 1);
  EXPECT_NEAR(got.energies(0), want, 1e-6);
}

TEST_F(HttpGatewayTest, ErrorsAreTheGrpcCodeAsHttpStatusAndChangeNothing) {
  MakeBank();
  struct Case {
    std::string method, body;
    int http;
    std::string status, message;
  };
  const Case cases[] = {
      {"Retrieve", R"({"bank":"nope","queries":[1,0,0,0]})", 404, "NOT_FOUND", "nope"},
      {"Store", R"({"bank":"demo","patterns":[1,2,3]})", 400, "INVALID_ARGUMENT", ""},
      {"Store", R"({"bank":"demo","patterns":[1,0,0,0],"ids":["18446744073709551615"]})", 409,
       "ALREADY_EXISTS", ""},
      {"CreateBank", R"({"name":"demo","dim":4,"kind":"STATE_KIND_CONTINUOUS"})", 409,
       "ALREADY_EXISTS", "demo"},
      {"Store", R"({"bank":"demo","patterns":[1,0,0,0],"bogus":1})", 400, "INVALID_ARGUMENT",
       "not a valid engram.v1.StoreRequest JSON message"},
      {"Store", "{not json", 400, "INVALID_ARGUMENT", "engram.v1.StoreRequest"},
      {"Retrieve", R"({"bank":"demo","queries":[1,0,0,0],"options":{"dynamics":"DYNAMICS_X"}})",
       400, "INVALID_ARGUMENT", ""},
      {"NoSuchMethod", "{}", 404, "NOT_FOUND", "no method 'NoSuchMethod'"},
  };
  for (const Case& c : cases) {
    auto r = Post(c.method, c.body);
    ASSERT_TRUE(r) << c.method;
    EXPECT_EQ(r->status, c.http) << c.method << " " << c.body << " -> " << r->body;
    auto body = Parse<google::protobuf::Struct>(r->body);
    const auto& error = body.fields().at("error").struct_value().fields();
    EXPECT_EQ(error.at("status").string_value(), c.status) << r->body;
    EXPECT_EQ(error.at("code").number_value(), c.http) << r->body;
    EXPECT_THAT(error.at("message").string_value(), HasSubstr(c.message)) << r->body;
  }
  // The message is the gRPC call's own.
  grpc::ClientContext ctx;
  v1::RetrieveRequest req;
  req.set_bank("nope");
  req.add_queries(1);
  v1::RetrieveResponse resp;
  const grpc::Status grpc_status = stub_->Retrieve(&ctx, req, &resp);
  auto r = Post("Retrieve", R"({"bank":"nope","queries":[1]})");
  ASSERT_TRUE(r);
  EXPECT_THAT(r->body, HasSubstr(grpc_status.error_message()));
  // Nothing changed: still the two stored patterns.
  r = Post("GetBank", R"({"name":"demo"})");
  ASSERT_TRUE(r);
  EXPECT_EQ(Parse<v1::BankInfo>(r->body).patterns(), 2u);
}

TEST_F(HttpGatewayTest, OversizeBodyIs413) {
  const std::string body((1 << 20) + 16, ' ');
  auto r = Post("ListBanks", body);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 413);
}

TEST_F(HttpGatewayTest, TokenIsForwardedFromTheAuthorizationHeader) {
  Start("s3cret-token");
  auto r = Post("ListBanks", "{}");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 401) << r->body;
  EXPECT_THAT(r->body, HasSubstr("UNAUTHENTICATED"));
  r = Post("ListBanks", "{}", {{"Authorization", "Bearer wrong"}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 401);
  MakeBank({{"Authorization", "Bearer s3cret-token"}});
  r = Post("ListBanks", "{}", {{"Authorization", "Bearer s3cret-token"}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_THAT(r->body, HasSubstr("\"demo\""));
  // The page and the health probe stay open, as health and metrics do.
  EXPECT_EQ(http_->Get("/healthz")->status, 200);
  EXPECT_EQ(http_->Get("/ui/")->status, 200);
}

TEST_F(HttpGatewayTest, ServerTimeoutHeaderBecomesTheDeadline) {
  MakeBank();
  auto r = Post("ListBanks", "{}", {{"X-Server-Timeout", "soon"}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 400);
  EXPECT_THAT(r->body, HasSubstr("X-Server-Timeout"));
  r = Post("ListBanks", "{}", {{"X-Server-Timeout", "-1"}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 400);
  r = Post("ListBanks", "{}", {{"X-Server-Timeout", "30"}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  // A deadline far shorter than a 100000-step gradient descent on a large
  // bank: 504, as DEADLINE_EXCEEDED.
  ASSERT_EQ(Post("CreateBank", R"({"name":"big","dim":256,"kind":"STATE_KIND_CONTINUOUS"})")->status,
            200);
  std::string patterns = "[";
  for (int i = 0; i < 256 * 256; ++i) patterns += (i ? "," : "") + std::to_string((i * 7919) % 13 - 6);
  patterns += "]";
  ASSERT_EQ(Post("Store", R"({"bank":"big","patterns":)" + patterns + "}")->status, 200);
  std::string query = "[";
  for (int i = 0; i < 256; ++i) query += (i ? "," : "") + std::to_string(i % 3);
  query += "]";
  r = Post("Retrieve",
           R"({"bank":"big","queries":)" + query +
               R"(,"options":{"dynamics":"DYNAMICS_GRADIENT","alpha":1e-9,"maxSteps":100000,"tol":1e-30}})",
           {{"X-Server-Timeout", "0.05"}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 504) << r->body.substr(0, 200);
  EXPECT_THAT(r->body, HasSubstr("DEADLINE_EXCEEDED"));
}

TEST_F(HttpGatewayTest, SampleStreamSendsOneJsonFramePerLineThenTheResult) {
  MakeBank();
  auto r = Post("SampleStream",
                R"({"bank":"demo","count":2,"seed":7,
                    "schedule":{"kind":"SCHEDULE_KIND_GEOMETRIC","sigmaMax":2,"sigmaMin":0.1,"steps":5}})");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(r->get_header_value("Content-Type"), "application/x-ndjson");
  std::vector<std::string> lines = absl::StrSplit(r->body, '\n', absl::SkipEmpty());
  ASSERT_GE(lines.size(), 2u);
  uint32_t last_step = 0;
  for (size_t i = 0; i + 1 < lines.size(); ++i) {
    auto frame = Parse<v1::SampleFrame>(lines[i]);
    EXPECT_EQ(frame.states_size(), 2 * 4) << lines[i];
    EXPECT_GE(frame.step(), last_step);
    last_step = frame.step();
    EXPECT_FALSE(frame.has_result());
  }
  auto last = Parse<v1::SampleFrame>(lines.back());
  ASSERT_TRUE(last.has_result()) << lines.back();
  ASSERT_EQ(last.result().samples_size(), 2);

  // The same request over gRPC gives the same samples (same seed).
  grpc::ClientContext ctx;
  v1::SampleRequest req;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(
                  R"({"bank":"demo","count":2,"seed":7,
                      "schedule":{"kind":"SCHEDULE_KIND_GEOMETRIC","sigmaMax":2,"sigmaMin":0.1,"steps":5}})",
                  &req)
                  .ok());
  v1::SampleResponse unary;
  ASSERT_TRUE(stub_->Sample(&ctx, req, &unary).ok());
  for (int s = 0; s < 2; ++s) {
    EXPECT_EQ(last.result().samples(s).nearest().id(), unary.samples(s).nearest().id());
    ASSERT_EQ(last.result().samples(s).state_size(), unary.samples(s).state_size());
    for (int i = 0; i < unary.samples(s).state_size(); ++i) {
      EXPECT_NEAR(last.result().samples(s).state(i), unary.samples(s).state(i), 1e-5);
    }
  }

  // A call that fails before its first frame gets its own status.
  r = Post("SampleStream", R"({"bank":"nope"})");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 404);
  EXPECT_THAT(r->body, HasSubstr("NOT_FOUND"));
}

TEST_F(HttpGatewayTest, ServesThePageAndRedirectsTheRoot) {
  auto r = http_->Get("/ui/");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_THAT(r->body, HasSubstr("engram page"));
  r = http_->Get("/");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 302);
  EXPECT_EQ(r->get_header_value("Location"), "/ui/");
  r = http_->Get("/ui/../data/engram.db");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 404);
}

TEST_F(HttpGatewayTest, RequestsAreCountedByRouteAndStatus) {
  MakeBank();
  Post("Retrieve", R"({"bank":"nope","queries":[1]})");
  prometheus::TextSerializer ser;
  const std::string text = ser.Serialize(server_->metrics()->registry()->Collect());
  EXPECT_THAT(text, HasSubstr(R"(engram_http_requests_total{code="200",route="Store"} 1)"));
  EXPECT_THAT(text, HasSubstr(R"(engram_http_requests_total{code="404",route="Retrieve"} 1)"));
  // Each is also the gRPC call it made.
  EXPECT_THAT(text, HasSubstr(R"(grpc_code="NotFound",grpc_method="Retrieve")"));
}

TEST(HttpGatewayStart, RejectsABadListenAddressAndUiDir) {
  auto metrics = std::make_shared<Metrics>();
  HttpGatewayOptions options;
  options.listen = "no-port";
  auto gw = HttpGateway::Start(options, nullptr, metrics);
  EXPECT_EQ(gw.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(gw.status().message()), HasSubstr("host:port"));
  options.listen = "127.0.0.1:0";
  options.ui_dir = "/nonexistent/engram-ui";
  gw = HttpGateway::Start(options, nullptr, metrics);
  EXPECT_EQ(gw.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(gw.status().message()), HasSubstr("/nonexistent/engram-ui"));
}

}  // namespace
}  // namespace engram::server
