// engram: command-line client of an Engram server.
//
//   engram bank create digits --dim 784 --kind bipolar --energy polynomial --degree 3
//   engram store digits /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
//       --labels .../train-labels-idx1-ubyte.gz --limit 100 --binarize   (one line)
//   engram retrieve digits ...images.gz --limit 10 --binarize --flip 0.15
//   engram --json bank list
//
// The commands and their options are one table (command_table.h), from
// which the help and the usage errors are generated. The server address
// comes from --target or ENGRAM_TARGET (default 127.0.0.1:50051); a bearer
// token from --token or ENGRAM_TOKEN. Exit status: 0 on success, 1 on a
// server or input error (printed with its gRPC code), 2 on a usage error.
#include <cstdlib>
#include <fstream>
#include <iostream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "client/cli/command_table.h"

int main(int argc, char** argv) {
  using engram::cli::HelpText;
#ifdef NDEBUG
  // As engramd: gRPC's absl::Mutex calls skip Debian Abseil's deadlock
  // detector in release builds (it costs `engram load` measurable latency).
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
#endif
  std::vector<std::string> argv_vec(argv + 1, argv + argc);
  auto args = engram::cli::Args::Parse(argv_vec, engram::cli::FlagOptions());
  if (!args.ok()) {
    std::cerr << "engram: " << args.status().message() << "\n" << HelpText();
    return 2;
  }
  const std::vector<std::string>& pos = args->positional();
  if (pos.empty() || (pos.size() == 1 && pos[0] == "help")) {
    (pos.empty() && !args->Has("help") ? std::cerr : std::cout) << HelpText();
    return pos.empty() && !args->Has("help") ? 2 : 0;
  }
  const engram::cli::Command* command = engram::cli::FindCommand(pos);
  if (command == nullptr) {
    const size_t words = pos[0] == "bank" ? std::min<size_t>(2, pos.size()) : 1;
    std::cerr << "engram: unknown command '" << absl::StrJoin(pos.begin(), pos.begin() + words, " ")
              << "'\n" << HelpText();
    return 2;
  }
  if (args->Has("help")) {
    std::cout << engram::cli::CommandUsage(*command) << "\n";
    return 0;
  }
  if (absl::Status s = engram::cli::CheckCommandLine(*command, *args); !s.ok()) {
    std::cerr << "engram: " << s.message() << "\n";
    return 2;
  }
  const char* env_target = std::getenv("ENGRAM_TARGET");
  const std::string target =
      args->Get("target", env_target != nullptr && *env_target ? env_target : "127.0.0.1:50051");
  engram::client::ClientOptions opts;
  auto timeout = args->GetDouble("timeout", 60);
  if (!timeout.ok()) {
    std::cerr << "engram: " << timeout.status().message() << "\n";
    return 2;
  }
  opts.timeout = absl::Seconds(*timeout);
  const char* env_token = std::getenv("ENGRAM_TOKEN");
  opts.token = args->Get("token", env_token != nullptr ? env_token : "");
  if (args->Has("tls-ca")) {
    std::ifstream in(args->Get("tls-ca"), std::ios::binary);
    if (!in) {
      std::cerr << "engram: cannot read --tls-ca " << args->Get("tls-ca") << "\n";
      return 2;
    }
    opts.tls_root_pem.assign(std::istreambuf_iterator<char>(in), {});
  }
  auto client = engram::client::EngramClient::Connect(target, opts);
  if (!client.ok()) {
    std::cerr << "engram: " << client.status().message() << "\n";
    return 1;
  }
  engram::cli::Context ctx{client->get(), args->Has("json")};
  absl::Status s = command->run(*args, ctx);
  if (!s.ok()) {
    std::cerr << "engram: " << absl::StatusCodeToString(s.code()) << ": " << s.message() << "\n";
    return s.code() == absl::StatusCode::kInvalidArgument &&
                   absl::StartsWith(s.message(), "usage:")
               ? 2
               : 1;
  }
  return 0;
}
