// Subcommands of the `engram` CLI. Each returns OK or the error to print;
// output goes to stdout (human text, or JSON with --json).
#ifndef ENGRAM_CLIENT_CLI_COMMANDS_H_
#define ENGRAM_CLIENT_CLI_COMMANDS_H_

#include <set>
#include <string>

#include "absl/status/status.h"
#include "client/cli/args.h"
#include "client/data_io.h"
#include "client/engram_client.h"

namespace engram::cli {

struct Context {
  client::EngramClient* client = nullptr;
  bool json = false;
};

absl::Status RunBank(const Args& args, Context& ctx);
// `bank export NAME FILE` and `bank import FILE [--name NEW]`.
absl::Status RunBankExport(const Args& args, Context& ctx);
absl::Status RunBankImport(const Args& args, Context& ctx);
absl::Status RunStore(const Args& args, Context& ctx);
absl::Status RunDelete(const Args& args, Context& ctx);
absl::Status RunGet(const Args& args, Context& ctx);
absl::Status RunBackup(const Args& args, Context& ctx);
absl::Status RunRetrieve(const Args& args, Context& ctx);
absl::Status RunEnergy(const Args& args, Context& ctx);
absl::Status RunSample(const Args& args, Context& ctx);
absl::Status RunLoad(const Args& args, Context& ctx);
absl::Status RunHealth(const Args& args, Context& ctx);

// The options that only make sense with --energy.
extern const std::set<std::string> kEnergyOptions;

// --energy/--beta/--degree/--rectified/--similarity/--separation into `out`.
// Returns false in *set when no --energy was given.
absl::Status ParseEnergy(const Args& args, v1::EnergyConfig* out, bool* set);
absl::StatusOr<v1::StateKind> ParseKind(const std::string& s);
// --filter's expression (see the help text) into `out`; INVALID_ARGUMENT
// naming the condition it cannot read.
absl::Status ParseFilter(const std::string& expr, v1::Filter* out);
absl::StatusOr<v1::Dynamics> ParseDynamics(const std::string& s);

// Loads a data file and applies --offset/--limit/--binarize/--normalize/
// --standardize/--scale.
absl::StatusOr<client::Matrix> LoadData(const std::string& path, const Args& args);

// Protobuf message as JSON (all fields printed).
std::string ToJson(const google::protobuf::Message& m);
std::string EnergyName(const v1::EnergyConfig& e);

}  // namespace engram::cli

#endif  // ENGRAM_CLIENT_CLI_COMMANDS_H_
