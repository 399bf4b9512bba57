#include "client/engram_client.h"

#include "absl/strings/str_cat.h"

namespace engram::client {

absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

absl::StatusOr<std::unique_ptr<EngramClient>> EngramClient::Connect(
    const std::string& target, ClientOptions options) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.max_message_bytes);
  args.SetMaxSendMessageSize(options.max_message_bytes);
  // Calls spread over every address the target names or resolves to
  // (replicas: "ipv4:h1:p,h2:p" or a headless Service's DNS name).
  args.SetLoadBalancingPolicyName("round_robin");
  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
  if (!options.tls_root_pem.empty()) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = options.tls_root_pem;
    creds = grpc::SslCredentials(ssl);
  }
  auto channel = grpc::CreateCustomChannel(target, creds, args);
  if (!channel->WaitForConnected(absl::ToChronoTime(absl::Now() + options.connect_timeout))) {
    return absl::UnavailableError(absl::StrCat(
        "no Engram server answered at ", target, " within ",
        absl::FormatDuration(options.connect_timeout),
        " (start one with engramd, or set --target / ENGRAM_TARGET)"));
  }
  return std::make_unique<EngramClient>(std::move(channel), options);
}

EngramClient::EngramClient(std::shared_ptr<grpc::Channel> channel, ClientOptions options)
    : channel_(std::move(channel)),
      stub_(v1::MemoryService::NewStub(channel_)),
      options_(options) {}

void EngramClient::Prepare(grpc::ClientContext* ctx) const {
  if (options_.timeout > absl::ZeroDuration()) {
    ctx->set_deadline(absl::ToChronoTime(absl::Now() + options_.timeout));
  }
  if (!options_.token.empty()) ctx->AddMetadata("authorization", "Bearer " + options_.token);
}

#define ENGRAM_CLIENT_CALL(Method, Req, Resp, req)      \
  grpc::ClientContext ctx;                              \
  Prepare(&ctx);                                        \
  Resp resp;                                            \
  grpc::Status s = stub_->Method(&ctx, req, &resp);     \
  if (!s.ok()) return FromGrpc(s);                      \
  return resp

absl::StatusOr<v1::BankInfo> EngramClient::CreateBank(const v1::CreateBankRequest& req) {
  ENGRAM_CLIENT_CALL(CreateBank, v1::CreateBankRequest, v1::BankInfo, req);
}

absl::StatusOr<v1::BankInfo> EngramClient::GetBank(const std::string& name) {
  v1::GetBankRequest req;
  req.set_name(name);
  ENGRAM_CLIENT_CALL(GetBank, v1::GetBankRequest, v1::BankInfo, req);
}

absl::StatusOr<v1::ListBanksResponse> EngramClient::ListBanks() {
  v1::ListBanksRequest req;
  ENGRAM_CLIENT_CALL(ListBanks, v1::ListBanksRequest, v1::ListBanksResponse, req);
}

absl::Status EngramClient::DeleteBank(const std::string& name) {
  v1::DeleteBankRequest req;
  req.set_name(name);
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::DeleteBankResponse resp;
  return FromGrpc(stub_->DeleteBank(&ctx, req, &resp));
}

absl::StatusOr<v1::StoreResponse> EngramClient::Store(const v1::StoreRequest& req) {
  ENGRAM_CLIENT_CALL(Store, v1::StoreRequest, v1::StoreResponse, req);
}

absl::StatusOr<v1::DeletePatternsResponse> EngramClient::DeletePatterns(
    const v1::DeletePatternsRequest& req) {
  ENGRAM_CLIENT_CALL(DeletePatterns, v1::DeletePatternsRequest, v1::DeletePatternsResponse, req);
}

absl::StatusOr<v1::GetPatternsResponse> EngramClient::GetPatterns(
    const v1::GetPatternsRequest& req) {
  ENGRAM_CLIENT_CALL(GetPatterns, v1::GetPatternsRequest, v1::GetPatternsResponse, req);
}

absl::StatusOr<v1::RetrieveResponse> EngramClient::Retrieve(const v1::RetrieveRequest& req) {
  ENGRAM_CLIENT_CALL(Retrieve, v1::RetrieveRequest, v1::RetrieveResponse, req);
}

absl::StatusOr<v1::SampleResponse> EngramClient::Sample(const v1::SampleRequest& req) {
  ENGRAM_CLIENT_CALL(Sample, v1::SampleRequest, v1::SampleResponse, req);
}

absl::StatusOr<v1::EnergyResponse> EngramClient::Energy(const v1::EnergyRequest& req) {
  ENGRAM_CLIENT_CALL(Energy, v1::EnergyRequest, v1::EnergyResponse, req);
}

#undef ENGRAM_CLIENT_CALL

}  // namespace engram::client
