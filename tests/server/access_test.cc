// Bearer tokens scoped to banks and to read or read-write: the token file's
// grammar, and every handler's decision through a real grpc::Server
// (PERMISSION_DENIED changes nothing; ListBanks shows what a token reaches).
#include "server/access.h"

#include <filesystem>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "engram/v1/engram.grpc.pb.h"
#include "server/server.h"

namespace engram::server {
namespace {

TEST(AccessPolicyTest, ParsesScopesAndRejectsBadLines) {
  auto p = AccessPolicy::Parse(
      "# comment\n"
      "admin\n"
      "ingest  digits,faces  rw\n"
      "\n"
      "viewer  demo-*  r   # read-only, a comment\n"
      "tok#en  # a # inside a word is part of it\n");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->size(), 4u);
  EXPECT_TRUE(p->Check("Bearer tok#en", nullptr, Access::kWrite).ok());
  const std::string digits = "digits", demo = "demo-1", other = "other";
  EXPECT_TRUE(p->Check("Bearer admin", nullptr, Access::kWrite).ok());
  EXPECT_TRUE(p->Check("Bearer ingest", &digits, Access::kWrite).ok());
  EXPECT_EQ(p->Check("Bearer ingest", &other, Access::kRead).code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(p->Check("Bearer ingest", nullptr, Access::kWrite).code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE(p->Check("Bearer viewer", &demo, Access::kRead).ok());
  EXPECT_EQ(p->Check("Bearer viewer", &demo, Access::kWrite).code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(p->Check("Bearer viewer", &digits, Access::kRead).code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(p->Check("Bearer viewe", &demo, Access::kRead).code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(p->Check("viewer", &demo, Access::kRead).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(p->Check("", &demo, Access::kRead).code(), absl::StatusCode::kUnauthenticated);

  EXPECT_EQ(AccessPolicy::Parse("a * rwx\n").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AccessPolicy::Parse("a\na\n").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AccessPolicy::Parse("# nothing\n\n").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AccessPolicy::Parse("a b r extra\n").status().code(),
            absl::StatusCode::kInvalidArgument);
  // No token configured: everything is allowed.
  EXPECT_TRUE(AccessPolicy().Check("", &demo, Access::kWrite).ok());
}

class ScopedTokensTest : public ::testing::Test {
 public:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("engram_access_test_" + std::to_string(::getpid()));
    std::filesystem::remove_all(dir_);
    ServerConfig config;
    config.listen = "127.0.0.1:0";
    config.data_dir = dir_.string();
    config.metrics_listen = "";
    config.auth_tokens = "admin\nwriter kv-* rw\nreader kv-a r\n";
    auto s = EngramServer::Start(config);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    stub_ = v1::MemoryService::NewStub(server_->InProcessChannel());
  }
  void TearDown() override {
    server_.reset();
    std::filesystem::remove_all(dir_);
  }

  grpc::StatusCode Create(const std::string& token, const std::string& name) {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer " + token);
    v1::CreateBankRequest req;
    req.set_name(name);
    req.set_dim(2);
    req.set_kind(v1::STATE_KIND_CONTINUOUS);
    v1::BankInfo info;
    return stub_->CreateBank(&ctx, req, &info).error_code();
  }
  grpc::StatusCode Store(const std::string& token, const std::string& bank) {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer " + token);
    v1::StoreRequest req;
    req.set_bank(bank);
    req.add_patterns(1.f);
    req.add_patterns(0.f);
    v1::StoreResponse resp;
    return stub_->Store(&ctx, req, &resp).error_code();
  }
  grpc::StatusCode Retrieve(const std::string& token, const std::string& bank) {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer " + token);
    v1::RetrieveRequest req;
    req.set_bank(bank);
    req.add_queries(1.f);
    req.add_queries(0.f);
    v1::RetrieveResponse resp;
    return stub_->Retrieve(&ctx, req, &resp).error_code();
  }
  std::vector<std::string> List(const std::string& token) {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer " + token);
    v1::ListBanksResponse resp;
    EXPECT_TRUE(stub_->ListBanks(&ctx, v1::ListBanksRequest(), &resp).ok());
    std::vector<std::string> names;
    for (const auto& b : resp.banks()) names.push_back(b.name());
    return names;
  }

  std::filesystem::path dir_;
  std::unique_ptr<EngramServer> server_;
  std::unique_ptr<v1::MemoryService::Stub> stub_;
};

TEST_F(ScopedTokensTest, EachTokenReachesItsBanksWithItsAccess) {
  EXPECT_EQ(Create("admin", "other"), grpc::OK);
  EXPECT_EQ(Create("writer", "kv-a"), grpc::OK);
  EXPECT_EQ(Create("writer", "other2"), grpc::PERMISSION_DENIED);
  EXPECT_EQ(Create("reader", "kv-b"), grpc::PERMISSION_DENIED);
  EXPECT_EQ(Store("writer", "kv-a"), grpc::OK);
  EXPECT_EQ(Store("reader", "kv-a"), grpc::PERMISSION_DENIED);
  EXPECT_EQ(Store("writer", "other"), grpc::PERMISSION_DENIED);
  EXPECT_EQ(Store("nobody", "kv-a"), grpc::UNAUTHENTICATED);
  EXPECT_EQ(Retrieve("reader", "kv-a"), grpc::OK);
  EXPECT_EQ(Retrieve("reader", "other"), grpc::PERMISSION_DENIED);
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer writer");
    v1::BackupRequest req;
    req.set_file("snap.db");
    v1::BackupResponse resp;
    EXPECT_EQ(stub_->Backup(&ctx, req, &resp).error_code(), grpc::PERMISSION_DENIED);
  }
  // Nothing the denied calls asked for happened.
  EXPECT_EQ(server_->registry()->ListBanks().size(), 2u);
  EXPECT_EQ((*server_->registry()->Snapshot("kv-a"))->size(), 1);
  EXPECT_EQ((*server_->registry()->Snapshot("other"))->size(), 0);
  EXPECT_EQ(List("admin"), (std::vector<std::string>{"kv-a", "other"}));
  EXPECT_EQ(List("writer"), (std::vector<std::string>{"kv-a"}));
  EXPECT_EQ(List("reader"), (std::vector<std::string>{"kv-a"}));
}

}  // namespace
}  // namespace engram::server
