// The table of the limits engramd enforces and the codes it answers when
// one is passed, generated from the constants the checks use (core's
// limits.h, bank.h, dynamics.h, schedule.h) and the server's defaults, so
// the documentation cannot drift from the code (engramd --print_limits;
// docs/reliability.md holds its output, checked by a test).
#ifndef ENGRAM_SERVER_LIMITS_TABLE_H_
#define ENGRAM_SERVER_LIMITS_TABLE_H_

#include <string>

#include "server/server.h"

namespace engram::server {

// A GitHub-markdown table: limit, where it is set, its value (`config`'s,
// normally the defaults), the code when it is passed.
std::string LimitsMarkdown(const ServerConfig& config);

}  // namespace engram::server

#endif  // ENGRAM_SERVER_LIMITS_TABLE_H_
