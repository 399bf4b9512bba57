// A small command-line parser for the `engram` CLI: positional arguments
// plus --name=value / --name value options, with unknown options rejected.
#ifndef ENGRAM_CLIENT_CLI_ARGS_H_
#define ENGRAM_CLIENT_CLI_ARGS_H_

#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace engram::cli {

class Args {
 public:
  // `bool_flags` are options that take no value.
  static absl::StatusOr<Args> Parse(const std::vector<std::string>& argv,
                                    const std::set<std::string>& bool_flags);

  const std::vector<std::string>& positional() const { return positional_; }
  bool Has(const std::string& name) const { return options_.contains(name); }
  std::string Get(const std::string& name, const std::string& fallback = "") const;
  absl::StatusOr<double> GetDouble(const std::string& name, double fallback) const;
  absl::StatusOr<int64_t> GetInt(const std::string& name, int64_t fallback) const;
  // INVALID_ARGUMENT naming the first option not in `allowed`.
  absl::Status CheckKnown(const std::set<std::string>& allowed) const;

 private:
  std::vector<std::string> positional_;
  std::map<std::string, std::string> options_;
};

}  // namespace engram::cli

#endif  // ENGRAM_CLIENT_CLI_ARGS_H_
