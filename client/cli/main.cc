// engram: command-line client of an Engram server.
//
//   engram bank create digits --dim 784 --kind bipolar --energy polynomial --degree 3
//   engram store digits /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
//       --labels .../train-labels-idx1-ubyte.gz --limit 100 --binarize   (one line)
//   engram retrieve digits ...images.gz --limit 10 --binarize --flip 0.15
//   engram --json bank list
//
// The server address comes from --target or ENGRAM_TARGET (default
// 127.0.0.1:50051); a bearer token from --token or ENGRAM_TOKEN. Exit status: 0 on success, 1 on a server or input error
// (printed with its gRPC code), 2 on a usage error.
#include <cstdlib>
#include <fstream>
#include <iostream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/cli/commands.h"

namespace {

constexpr char kUsage[] = R"(usage: engram [--target HOST:PORT] [--timeout SECONDS] [--json] COMMAND ...

commands:
  bank create NAME --dim N --kind bipolar|continuous [--energy FAMILY] [--beta B]
                   [--degree n] [--rectified] [--similarity dot|l2|l1]
                   [--precision f32|bf16|bit_packed|f32_screened]
                   [--separation identity|polynomial|softmax|max]
  bank get NAME | bank list | bank delete NAME
  bank export NAME FILE                 config, ids, patterns and payloads to a file
  bank import FILE [--name NEW]         recreate an exported bank (ids preserved)
  store BANK FILE      patterns from .npy, .csv or IDX(.gz); [--labels FILE] [--payloads FILE]
                       [--ids-start ID] [--offset R] [--limit N] [--batch N]
                       [--binarize] [--normalize] [--standardize] [--scale X]
  get BANK [ID...]     read stored patterns back (all when no id); [--out patterns.npy]
  delete BANK ID...    delete patterns by id
  backup FILE          consistent snapshot of every bank to <data_dir>/backups/FILE on the server
  retrieve BANK FILE   recall from queries; [--flip F] [--noise SIGMA] [--mask-fraction F]
                       [--clamp FILE] [--seed S] [--dynamics sync|async|gradient|tinybrain]
                       [--max-steps N] [--tol T] [--alpha A] [--dt DT] [--tau-v T] [--tau-h T]
                       [--energy FAMILY ...] [--trace] [--out states.npy] [--partial]
                       plus the same row/preprocessing options as store
  energy BANK FILE     energy of states; [--gradient] [--energy FAMILY ...]
  sample BANK          diffusion-style sampling; [--count N] [--sampler heun|euler|stochastic|
                       langevin|annealed_am] [--schedule karras|geometric|linear] [--sigma-max S]
                       [--sigma-min S] [--rho R] [--steps S] [--stop-at-sigma-min] [--seed S]
                       [--query FILE [--sigma-start S] [--mask-fraction F | --clamp FILE]]
                       [--churn C] [--s-tmin T] [--s-tmax T] [--s-noise X] [--langevin-steps L]
                       [--langevin-eta E] [--am-iterations K] [--delta-memorized D]
                       [--delta-spurious D] [--trajectory-every K] [--energy FAMILY ...]
                       [--png grid.png] [--png-trajectory strip.png] [--image-shape HxW]
                       [--columns C] [--out samples.npy] [--stream]
  health               grpc.health.v1 check (exit 0 when SERVING); [--service NAME]
  load BANK            load test; [--concurrency C] [--connections M] [--rate RPS]
                       [--duration S | --total N] [--warmup S] [--include-errors]
                       [--mix retrieve=8,sample=1,energy=1,store=0] [--data FILE] [--batch B]
                       [--seed S] [--sample-steps S] [--max-steps N] [--dynamics D]
                       [--format text|json|csv]

energy families: classical polynomial exponential lse gaussian general
)";

const std::set<std::string> kBoolFlags = {"json", "help", "rectified", "binarize", "normalize",
                                          "standardize", "trace", "gradient", "partial",
                                          "stop-at-sigma-min", "stream", "include-errors"};

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> argv_vec(argv + 1, argv + argc);
  auto args = engram::cli::Args::Parse(argv_vec, kBoolFlags);
  if (!args.ok()) {
    std::cerr << "engram: " << args.status().message() << "\n" << kUsage;
    return 2;
  }
  if (args->Has("help") || args->positional().empty()) {
    std::cout << kUsage;
    return args->Has("help") ? 0 : 2;
  }
  const std::string& cmd = args->positional()[0];
  using Runner = absl::Status (*)(const engram::cli::Args&, engram::cli::Context&);
  Runner run = nullptr;
  if (cmd == "bank") run = engram::cli::RunBank;
  else if (cmd == "store") run = engram::cli::RunStore;
  else if (cmd == "delete") run = engram::cli::RunDelete;
  else if (cmd == "get") run = engram::cli::RunGet;
  else if (cmd == "backup") run = engram::cli::RunBackup;
  else if (cmd == "retrieve") run = engram::cli::RunRetrieve;
  else if (cmd == "energy") run = engram::cli::RunEnergy;
  else if (cmd == "sample") run = engram::cli::RunSample;
  else if (cmd == "load") run = engram::cli::RunLoad;
  else if (cmd == "health") run = engram::cli::RunHealth;
  if (run == nullptr) {
    std::cerr << "engram: unknown command '" << cmd << "'\n" << kUsage;
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
  absl::Status s = run(*args, ctx);
  if (!s.ok()) {
    std::cerr << "engram: " << absl::StatusCodeToString(s.code()) << ": " << s.message() << "\n";
    return s.code() == absl::StatusCode::kInvalidArgument &&
                   absl::StartsWith(s.message(), "usage:")
               ? 2
               : 1;
  }
  return 0;
}
