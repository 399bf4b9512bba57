// The `engram` CLI's commands as one table: each command's name, operands,
// options and runner. The top-level help, each command's usage line, the
// set of options that take no value and the check of a command line's
// options and operand count are all generated from it, so an option is
// written once.
//
//   const Command* c = FindCommand(args.positional());
//   if (absl::Status s = CheckCommandLine(*c, args); !s.ok()) ...  // "usage: ..."
//   c->run(args, ctx);
#ifndef ENGRAM_CLIENT_CLI_COMMAND_TABLE_H_
#define ENGRAM_CLIENT_CLI_COMMAND_TABLE_H_

#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "client/cli/args.h"
#include "client/cli/commands.h"

namespace engram::cli {

struct Option {
  std::string_view name;   // without the leading "--"
  std::string_view value;  // the value's placeholder; empty for a flag
};
using OptionGroup = std::vector<Option>;

struct Command {
  std::string_view name;      // "retrieve", or "bank create" (two words)
  std::string_view operands;  // "BANK FILE", "BANK [ID...]"
  std::string_view summary;   // one line for the help
  // The command's own options, then the shared groups it takes.
  std::vector<const OptionGroup*> options;
  int min_operands = 0;
  int max_operands = 0;  // -1: no upper bound
  absl::Status (*run)(const Args& args, Context& ctx) = nullptr;
};

// Options every command takes (--target, --timeout, --json, --token,
// --tls-ca, --help).
const OptionGroup& GlobalOptions();
// Every command, in help order.
const std::vector<Command>& Commands();
// The command a command line names (its first one or two positional
// words), or null.
const Command* FindCommand(const std::vector<std::string>& positional);
// The options of every command that take no value (for Args::Parse).
std::set<std::string> FlagOptions();

// "usage: engram NAME OPERANDS [--opt V] ..." with every option the
// command takes, wrapped to 100 columns.
std::string CommandUsage(const Command& command);
// The whole help: global options, then each command's usage and summary.
std::string HelpText();
// INVALID_ARGUMENT starting "usage:" (exit status 2) when `args` carries an
// option `command` does not take or the wrong number of operands.
absl::Status CheckCommandLine(const Command& command, const Args& args);

}  // namespace engram::cli

#endif  // ENGRAM_CLIENT_CLI_COMMAND_TABLE_H_
