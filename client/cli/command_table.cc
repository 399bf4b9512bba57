#include "client/cli/command_table.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace engram::cli {
namespace {

const OptionGroup kGlobal = {{"target", "HOST:PORT"}, {"timeout", "SECONDS"}, {"json", ""},
                             {"token", "TOKEN"},      {"tls-ca", "FILE"},     {"help", ""}};

// Rows of a data file and their preprocessing (store, retrieve, energy,
// sample's query, load's data).
const OptionGroup kData = {{"offset", "R"},  {"limit", "N"},       {"binarize", ""},
                           {"normalize", ""}, {"standardize", ""}, {"scale", "X"}};

// An energy (bank create's, or a call's override).
const OptionGroup kEnergy = {{"energy", "FAMILY"},
                             {"beta", "B"},
                             {"degree", "n"},
                             {"rectified", ""},
                             {"similarity", "dot|l2|l1"},
                             {"separation", "identity|polynomial|softmax|max|sparsemax|entmax15|log_sum_relu"}};

const OptionGroup kNone = {};

// Restricts a call to the patterns whose labels pass.
const OptionGroup kFilter = {{"filter", "KEY=V[|V..],KEY#=N[|N..],KEY#=LO..HI"}};

const OptionGroup kBankCreate = {{"dim", "N"},
                                 {"kind", "bipolar|continuous"},
                                 {"precision", "f32|bf16|bit_packed|f32_screened"},
                                 {"value-dim", "M"},
                                 {"ttl", "SECONDS"},
                                 {"decay-half-life", "SECONDS"}};
const OptionGroup kBankImport = {{"name", "NEW"}};
const OptionGroup kStore = {{"labels", "FILE"}, {"label-key", "KEY"}, {"payloads", "FILE"},
                            {"values", "FILE"}, {"ttl", "SECONDS"},  {"ids-start", "ID"},
                            {"batch", "N"}};
const OptionGroup kGet = {{"out", "patterns.npy"}};
const OptionGroup kRetrieve = {
    {"flip", "F"},      {"noise", "SIGMA"},
    {"mask-fraction", "F"}, {"clamp", "FILE"},
    {"seed", "S"},      {"dynamics", "sync|async|gradient|tinybrain"},
    {"max-steps", "N"}, {"tol", "T"},
    {"alpha", "A"},     {"dt", "DT"},
    {"tau-v", "T"},     {"tau-h", "T"},
    {"trace", ""},      {"out", "states.npy"},
    {"partial", ""}};
const OptionGroup kEnergyCmd = {{"gradient", ""}, {"novelty", ""}};
const OptionGroup kSample = {{"count", "N"},
                             {"sampler", "heun|euler|stochastic|langevin|annealed_am"},
                             {"schedule", "karras|geometric|linear"},
                             {"sigma-max", "S"},
                             {"sigma-min", "S"},
                             {"rho", "R"},
                             {"steps", "S"},
                             {"stop-at-sigma-min", ""},
                             {"seed", "S"},
                             {"query", "FILE"},
                             {"sigma-start", "S"},
                             {"mask-fraction", "F"},
                             {"clamp", "FILE"},
                             {"churn", "C"},
                             {"s-tmin", "T"},
                             {"s-tmax", "T"},
                             {"s-noise", "X"},
                             {"langevin-steps", "L"},
                             {"langevin-eta", "E"},
                             {"am-iterations", "K"},
                             {"delta-memorized", "D"},
                             {"delta-spurious", "D"},
                             {"trajectory-every", "K"},
                             {"png", "grid.png"},
                             {"png-trajectory", "strip.png"},
                             {"image-shape", "HxW"},
                             {"columns", "C"},
                             {"out", "samples.npy"},
                             {"stream", ""}};
const OptionGroup kHealth = {{"service", "NAME"}};
const OptionGroup kLoad = {{"concurrency", "C"},
                           {"connections", "M"},
                           {"rate", "RPS"},
                           {"duration", "S"},
                           {"total", "N"},
                           {"warmup", "S"},
                           {"mix", "retrieve=8,sample=1,energy=1,store=0,info=0"},
                           {"data", "FILE"},
                           {"batch", "B"},
                           {"seed", "S"},
                           {"sample-steps", "S"},
                           {"max-steps", "N"},
                           {"dynamics", "D"},
                           {"include-errors", ""},
                           {"format", "text|json|csv"}};

constexpr int kUnbounded = -1;
constexpr size_t kColumns = 100;

std::string OptionText(const Option& o) {
  const std::string name(o.name), value(o.value);
  return value.empty() ? absl::StrCat("[--", name, "]")
                       : absl::StrCat("[--", name, " ", value, "]");
}

// `words` joined by spaces, wrapped to kColumns with continuation lines
// indented by `indent`.
std::string Wrap(const std::vector<std::string>& words, size_t indent) {
  std::string out;
  size_t column = 0;
  for (const std::string& w : words) {
    if (column > indent && column + 1 + w.size() > kColumns) {
      out += "\n" + std::string(indent, ' ');
      column = indent;
    } else if (!out.empty()) {
      out += " ";
      ++column;
    }
    out += w;
    column += w.size();
  }
  return out;
}

std::vector<std::string> UsageWords(const Command& c) {
  std::vector<std::string> words = {"engram", std::string(c.name)};
  if (!c.operands.empty()) words.emplace_back(c.operands);
  for (const OptionGroup* g : c.options) {
    for (const Option& o : *g) words.push_back(OptionText(o));
  }
  return words;
}

}  // namespace

const OptionGroup& GlobalOptions() { return kGlobal; }

const std::vector<Command>& Commands() {
  static const std::vector<Command> commands = {
      {"bank create", "NAME", "create a bank", {&kBankCreate, &kEnergy}, 1, 1, RunBank},
      {"bank get", "NAME", "a bank's configuration, size and capacity", {&kNone}, 1, 1, RunBank},
      {"bank list", "", "every bank", {&kNone}, 0, 0, RunBank},
      {"bank delete", "NAME", "delete a bank and its patterns", {&kNone}, 1, 1, RunBank},
      {"bank export", "NAME FILE", "config, ids, patterns and payloads to a file", {&kNone}, 2,
       2, RunBankExport},
      {"bank import", "FILE", "recreate an exported bank (ids preserved)", {&kBankImport}, 1, 1,
       RunBankImport},
      {"store", "BANK FILE", "store patterns from .npy, .csv or IDX(.gz)", {&kStore, &kData}, 2,
       2, RunStore},
      {"get", "BANK [ID...]", "read stored patterns back (all when no id)", {&kGet}, 1,
       kUnbounded, RunGet},
      {"delete", "BANK ID...", "delete patterns by id", {&kNone}, 2, kUnbounded, RunDelete},
      {"backup", "FILE", "consistent snapshot of every bank to <data_dir>/backups/FILE",
       {&kNone}, 1, 1, RunBackup},
      {"retrieve", "BANK FILE", "recall the memories that corrupted or partial rows fall into",
       {&kRetrieve, &kFilter, &kData, &kEnergy}, 2, 2, RunRetrieve},
      {"energy", "BANK FILE", "energy (and gradient) of the states in a file",
       {&kEnergyCmd, &kFilter, &kData, &kEnergy}, 2, 2, RunEnergy},
      {"sample", "BANK", "diffusion-style sampling", {&kSample, &kFilter, &kData, &kEnergy}, 1, 1,
       RunSample},
      {"health", "", "grpc.health.v1 check (exit 0 when SERVING)", {&kHealth}, 0, 0, RunHealth},
      {"load", "BANK", "load test (latency percentiles, calls/s)", {&kLoad, &kData}, 1, 1,
       RunLoad},
  };
  return commands;
}

const Command* FindCommand(const std::vector<std::string>& positional) {
  if (positional.empty()) return nullptr;
  for (const Command& c : Commands()) {
    const std::vector<std::string> words = absl::StrSplit(std::string(c.name), ' ');
    if (positional.size() < words.size()) continue;
    bool match = true;
    for (size_t i = 0; i < words.size(); ++i) match = match && positional[i] == words[i];
    if (match) return &c;
  }
  return nullptr;
}

std::set<std::string> FlagOptions() {
  std::set<std::string> flags;
  auto add = [&](const OptionGroup& g) {
    for (const Option& o : g) {
      if (o.value.empty()) flags.emplace(o.name);
    }
  };
  add(kGlobal);
  for (const Command& c : Commands()) {
    for (const OptionGroup* g : c.options) add(*g);
  }
  return flags;
}

std::string CommandUsage(const Command& command) {
  std::vector<std::string> words = UsageWords(command);
  words.insert(words.begin(), "usage:");
  return Wrap(words, 8);
}

std::string HelpText() {
  std::vector<std::string> global = {"usage: engram"};
  for (const Option& o : kGlobal) global.push_back(OptionText(o));
  global.emplace_back("COMMAND ...");
  std::string out = Wrap(global, 14) + "\n\ncommands:\n";
  for (const Command& c : Commands()) {
    out += absl::StrCat("  ", Wrap(UsageWords(c), 6), "\n      ", std::string(c.summary), "\n");
  }
  out +=
      "\nenergy families: classical polynomial exponential lse gaussian general\n"
      "--filter: comma-separated conditions, all of which must hold: KEY=V (string label equal),\n"
      "KEY=V1|V2 (one of), KEY#=N (integer label equal), KEY#=N1|N2, KEY#=LO..HI (inclusive).\n"
      "store --labels FILE --label-key KEY keeps each row's class as integer label KEY.\n"
      "The server address comes from --target or ENGRAM_TARGET (default 127.0.0.1:50051), a\n"
      "bearer token from --token or ENGRAM_TOKEN. Exit status: 0 on success, 1 on a server or\n"
      "input error, 2 on a usage error.\n";
  return out;
}

absl::Status CheckCommandLine(const Command& command, const Args& args) {
  std::set<std::string> allowed;
  for (const Option& o : kGlobal) allowed.emplace(o.name);
  for (const OptionGroup* g : command.options) {
    for (const Option& o : *g) allowed.emplace(o.name);
  }
  if (absl::Status s = args.CheckKnown(allowed); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(s.message(), "\n", CommandUsage(command)));
  }
  const int words = static_cast<int>(std::count(command.name.begin(), command.name.end(), ' ')) + 1;
  const int operands = static_cast<int>(args.positional().size()) - words;
  if (operands < command.min_operands ||
      (command.max_operands != kUnbounded && operands > command.max_operands)) {
    return absl::InvalidArgumentError(CommandUsage(command));
  }
  return absl::OkStatus();
}

}  // namespace engram::cli
