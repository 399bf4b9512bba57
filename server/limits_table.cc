#include "server/limits_table.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engram/core/bank.h"
#include "engram/core/dynamics.h"
#include "engram/core/energy.h"
#include "engram/core/filter.h"
#include "engram/core/limits.h"
#include "engram/core/schedule.h"

namespace engram::server {
namespace {

std::string Bytes(double b) {
  if (b >= (1 << 20) && static_cast<int64_t>(b) % (1 << 20) == 0) {
    return absl::StrCat(static_cast<int64_t>(b) >> 20, " MiB");
  }
  if (b >= 1024 && static_cast<int64_t>(b) % 1024 == 0) {
    return absl::StrCat(static_cast<int64_t>(b) >> 10, " KiB");
  }
  return absl::StrCat(static_cast<int64_t>(b), " bytes");
}

}  // namespace

std::string LimitsMarkdown(const ServerConfig& c) {
  std::string t =
      "| limit | set by | value | code when passed |\n"
      "| --- | --- | --- | --- |\n";
  auto row = [&](const std::string& what, const std::string& by, const std::string& value,
                 const std::string& code) {
    absl::StrAppend(&t, "| ", what, " | ", by, " | ", value, " | ", code, " |\n");
  };
  row("memory of all banks", "`--memory_budget_bytes`",
      c.memory_budget_bytes == 0 ? "0 = unlimited" : Bytes(c.memory_budget_bytes),
      "`RESOURCE_EXHAUSTED`, checked before allocating; nothing stored");
  row("request / response size", "`--max_message_bytes`", Bytes(c.max_message_bytes),
      "`RESOURCE_EXHAUSTED`");
  row("patterns per Store, queries per Retrieve / Energy, ids per DeletePatterns / GetPatterns, "
      "GetPatterns page size, Sample count",
      "`--max_batch`", absl::StrCat(c.max_batch), "`INVALID_ARGUMENT`");
  row("calls waiting for an executor or a writer", "`--max_queue`", absl::StrCat(c.max_queue),
      "`RESOURCE_EXHAUSTED` at once");
  row("time in the queue", "the call's deadline; `queue_timeout_ms` or `--queue_timeout_ms`",
      "none", "`DEADLINE_EXCEEDED`, not run");
  row("SampleStream frames held for a slow reader", "`--stream_buffer_bytes`",
      Bytes(static_cast<double>(c.stream_buffer_bytes)), "`RESOURCE_EXHAUSTED` (the stream ends)");
  row("one write as a log entry (replicated mode)", "nats-server `max_payload`",
      "1 MiB unless the NATS servers raise it (at most 64 MiB)",
      "`INVALID_ARGUMENT`; nothing written");
  row("bank name, Backup file name", "—", "`[a-z0-9][a-z0-9_.-]{0,63}`", "`INVALID_ARGUMENT`");
  row("dimension N", "CreateBank `dim`", absl::StrCat("1 .. ", core::kMaxDim),
      "`INVALID_ARGUMENT`");
  row("payload per pattern", "—", Bytes(core::kMaxPayloadBytes), "`INVALID_ARGUMENT`");
  row("value dimension M", "CreateBank `value_dim`", absl::StrCat("0 .. ", core::kMaxDim),
      "`INVALID_ARGUMENT`");
  row("labels per pattern; bytes of a label key or string value", "—",
      absl::StrCat(core::kMaxLabels, "; 1 .. ", core::kMaxLabelBytes, " (key), 0 .. ",
                   core::kMaxLabelBytes, " (value)"),
      "`INVALID_ARGUMENT`");
  row("filter conditions; values listed in one condition", "`filter`",
      absl::StrCat(core::kMaxConditions, "; 1 .. ", core::kMaxFilterValues), "`INVALID_ARGUMENT`");
  row("time to live", "CreateBank / Store `ttl_seconds`",
      absl::StrCat("0 .. ", core::kMaxTtlMs / 1000, " s (100 years)"), "`INVALID_ARGUMENT`");
  row("weight half-life (decay with age)", "CreateBank `decay_half_life_seconds`",
      absl::StrCat("0 .. ", core::kMaxTtlMs / 1000, " s (100 years)"), "`INVALID_ARGUMENT`");
  row("energy `beta`", "`energy.beta`",
      absl::StrFormat("%g .. %g (finite)", core::kMinBeta, core::kMaxBeta), "`INVALID_ARGUMENT`");
  row("energy `degree` (polynomial separations)", "`energy.degree`",
      absl::StrCat(core::kMinDegree, " .. ", core::kMaxDegree), "`INVALID_ARGUMENT`");
  row("energy family on a continuous bank", "`energy.family`",
      "lse, gaussian, general (classical, polynomial and exponential need a bipolar bank)",
      "`FAILED_PRECONDITION`");
  row("steps per retrieval", "`options.max_steps`", absl::StrCat("1 .. ", core::kMaxSteps),
      "`INVALID_ARGUMENT`");
  row("sampling levels", "`schedule.steps`", absl::StrCat("1 .. ", core::kMaxSampleSteps),
      "`INVALID_ARGUMENT`");
  row("Langevin steps per level", "`langevin_steps`",
      absl::StrCat("1 .. ", core::kMaxLangevinSteps), "`INVALID_ARGUMENT`");
  row("annealed-AM iterations per level", "`am_iterations`",
      absl::StrCat("1 .. ", core::kMaxAmIterations), "`INVALID_ARGUMENT`");
  row("screened dimension", "CreateBank `precision` = f32_screened",
      absl::StrCat("screens up to N = ", core::kMaxScreenDim, "; larger banks run as f32"),
      "— (not an error)");
  row("time", "the call's deadline, checked between steps", "none",
      "`DEADLINE_EXCEEDED` within one step");
  return t;
}

}  // namespace engram::server
