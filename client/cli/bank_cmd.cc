// engram bank create|get|list|delete (export and import: export_cmd.cc)
#include <cstdio>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/cli/commands.h"
#include "engram/core/status_macros.h"

namespace engram::cli {
namespace {

void PrintBank(const v1::BankInfo& b) {
  const std::string kind = b.kind() == v1::STATE_KIND_BIPOLAR ? "bipolar" : "continuous";
  std::cout << absl::StrFormat(
      "%s: N=%d %s%s, energy %s, K=%d patterns, %d bytes, load K/N=%.4f\n"
      "  capacity %s = %.6g patterns%s\n%s",
      b.name(), b.dim(), kind,
      b.precision() == v1::PRECISION_BF16         ? " bf16"
      : b.precision() == v1::PRECISION_BIT_PACKED ? " bit_packed"
      : b.precision() == v1::PRECISION_F32_SCREENED ? " f32_screened"
                                                  : "",
      EnergyName(b.energy()), b.patterns(), b.bytes(), b.load(),
      b.capacity().formula(), b.capacity().patterns(),
      b.capacity().over_capacity() ? "  ** OVER CAPACITY **" : "",
      b.value_dim() > 0 || b.ttl_seconds() > 0 || b.decay_half_life_seconds() > 0
          ? absl::StrFormat(
                "  values of dimension %d; time to live %s; weight half-life %s\n", b.value_dim(),
                b.ttl_seconds() > 0 ? absl::StrCat(b.ttl_seconds(), " s") : "none",
                b.decay_half_life_seconds() > 0 ? absl::StrCat(b.decay_half_life_seconds(), " s")
                                                : "none")
          : "");
}

}  // namespace

absl::Status RunBank(const Args& args, Context& ctx) {
  const auto& pos = args.positional();
  const std::string& verb = pos[1];
  if (verb == "export") return RunBankExport(args, ctx);
  if (verb == "import") return RunBankImport(args, ctx);
  if (verb == "list") {
    ENGRAM_ASSIGN_OR_RETURN(v1::ListBanksResponse list, ctx.client->ListBanks());
    if (ctx.json) {
      std::cout << ToJson(list) << "\n";
    } else if (list.banks().empty()) {
      std::cout << "no banks\n";
    } else {
      for (const auto& b : list.banks()) PrintBank(b);
    }
    return absl::OkStatus();
  }
  const std::string& name = pos[2];
  if (verb == "create") {
    v1::CreateBankRequest req;
    req.set_name(name);
    ENGRAM_ASSIGN_OR_RETURN(int64_t dim, args.GetInt("dim", 0));
    if (dim <= 0 || dim > (1 << 20)) {
      return absl::InvalidArgumentError("--dim must be given, in [1, 1048576]");
    }
    req.set_dim(static_cast<uint32_t>(dim));
    ENGRAM_ASSIGN_OR_RETURN(v1::StateKind kind, ParseKind(args.Get("kind", "continuous")));
    req.set_kind(kind);
    const std::string precision = args.Get("precision", "f32");
    if (precision == "f32") {
      req.set_precision(v1::PRECISION_F32);
    } else if (precision == "bf16") {
      req.set_precision(v1::PRECISION_BF16);
    } else if (precision == "bit_packed") {
      req.set_precision(v1::PRECISION_BIT_PACKED);
    } else if (precision == "f32_screened") {
      req.set_precision(v1::PRECISION_F32_SCREENED);
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "--precision must be f32, bf16, bit_packed or f32_screened, got '", precision, "'"));
    }
    bool set = false;
    ENGRAM_RETURN_IF_ERROR(ParseEnergy(args, req.mutable_energy(), &set));
    ENGRAM_ASSIGN_OR_RETURN(int64_t value_dim, args.GetInt("value-dim", 0));
    ENGRAM_ASSIGN_OR_RETURN(int64_t ttl, args.GetInt("ttl", 0));
    ENGRAM_ASSIGN_OR_RETURN(int64_t half_life, args.GetInt("decay-half-life", 0));
    if (value_dim < 0 || value_dim > (1 << 20) || ttl < 0 || half_life < 0) {
      return absl::InvalidArgumentError(
          "--value-dim must be in [0, 1048576], --ttl and --decay-half-life >= 0");
    }
    req.set_value_dim(static_cast<uint32_t>(value_dim));
    req.set_ttl_seconds(static_cast<uint64_t>(ttl));
    req.set_decay_half_life_seconds(static_cast<uint64_t>(half_life));
    ENGRAM_ASSIGN_OR_RETURN(v1::BankInfo info, ctx.client->CreateBank(req));
    if (ctx.json) std::cout << ToJson(info) << "\n";
    else { std::cout << "created "; PrintBank(info); }
    return absl::OkStatus();
  }
  if (verb == "get") {
    ENGRAM_ASSIGN_OR_RETURN(v1::BankInfo info, ctx.client->GetBank(name));
    if (ctx.json) std::cout << ToJson(info) << "\n";
    else PrintBank(info);
    return absl::OkStatus();
  }
  if (verb == "delete") {
    ENGRAM_RETURN_IF_ERROR(ctx.client->DeleteBank(name));
    if (ctx.json) std::cout << "{\"deleted\":\"" << name << "\"}\n";
    else std::cout << "deleted bank " << name << "\n";
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown bank command '", verb, "' (create, get, list, delete, export, import)"));
}

}  // namespace engram::cli
