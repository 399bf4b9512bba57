// EngramClient: a small synchronous client library over the engram.v1 stubs,
// returning absl::StatusOr so callers see gRPC codes as absl codes.
//
//   ENGRAM_ASSIGN_OR_RETURN(auto client, EngramClient::Connect("127.0.0.1:50051"));
//   v1::CreateBankRequest req;
//   req.set_name("digits"); req.set_dim(784); req.set_kind(v1::STATE_KIND_BIPOLAR);
//   ENGRAM_ASSIGN_OR_RETURN(v1::BankInfo info, client->CreateBank(req));
//
// Thread-safety: an EngramClient may be shared by threads (gRPC stubs are
// thread-safe).
#ifndef ENGRAM_CLIENT_ENGRAM_CLIENT_H_
#define ENGRAM_CLIENT_ENGRAM_CLIENT_H_

#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engram/v1/engram.grpc.pb.h"

namespace engram::client {

struct ClientOptions {
  // Per-call deadline; zero or negative means none.
  absl::Duration timeout = absl::Seconds(60);
  // How long Connect waits for the channel to become ready.
  absl::Duration connect_timeout = absl::Seconds(5);
  int max_message_bytes = 256 << 20;
  // Sent as "authorization: Bearer <token>" when non-empty.
  std::string token;
  // PEM root certificates; non-empty connects with TLS.
  std::string tls_root_pem;
};

// absl::Status with the gRPC code and message.
absl::Status FromGrpc(const grpc::Status& s);

class EngramClient {
 public:
  // UNAVAILABLE if the server does not answer within connect_timeout.
  static absl::StatusOr<std::unique_ptr<EngramClient>> Connect(
      const std::string& target, ClientOptions options = {});
  // Wraps an existing channel (e.g. an in-process one); does not wait.
  EngramClient(std::shared_ptr<grpc::Channel> channel, ClientOptions options);

  absl::StatusOr<v1::BankInfo> CreateBank(const v1::CreateBankRequest& req);
  absl::StatusOr<v1::BankInfo> GetBank(const std::string& name);
  absl::StatusOr<v1::ListBanksResponse> ListBanks();
  absl::Status DeleteBank(const std::string& name);
  absl::StatusOr<v1::StoreResponse> Store(const v1::StoreRequest& req);
  absl::StatusOr<v1::DeletePatternsResponse> DeletePatterns(
      const v1::DeletePatternsRequest& req);
  absl::StatusOr<v1::GetPatternsResponse> GetPatterns(const v1::GetPatternsRequest& req);
  absl::StatusOr<v1::RetrieveResponse> Retrieve(const v1::RetrieveRequest& req);
  absl::StatusOr<v1::SampleResponse> Sample(const v1::SampleRequest& req);
  absl::StatusOr<v1::EnergyResponse> Energy(const v1::EnergyRequest& req);

  v1::MemoryService::Stub* stub() { return stub_.get(); }
  const ClientOptions& options() const { return options_; }
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }
  // Applies the deadline and credentials of the options to a context (for
  // calls made directly on stub()).
  void Prepare(grpc::ClientContext* ctx) const;

 private:

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::MemoryService::Stub> stub_;
  ClientOptions options_;
};

}  // namespace engram::client

#endif  // ENGRAM_CLIENT_ENGRAM_CLIENT_H_
