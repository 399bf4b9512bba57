// engram bank export NAME FILE   and   engram bank import FILE [--name NEW]
//
// The export file is self-describing: the line "engram-bank-export 1\n",
// then length-delimited engram.v1 messages (varint length + bytes, protobuf's
// delimited format):
//   1. BankInfo: name, dim, kind, energy, precision, value_dim, ttl_seconds
//      and decay_half_life_seconds of the bank;
//   2. GetPatternsResponse pages: ids, patterns (bit for bit), payloads,
//      values and labels (and the expiries and store times, which import
//      does not restore);
//   3. a final GetPatternsResponse with no ids whose next_page_start is the
//      number of patterns written (a file without it is truncated).
// Import creates the bank (ALREADY_EXISTS if the name is taken) and stores
// every page as one Store call with the ids, payloads, values and labels of
// the file, so ids are preserved. The imported patterns are stored at import
// time: their time to live is the bank's from then, and a decaying bank
// counts their age from then. Export pages through the bank by row; it is exact for a bank
// that is not being written meanwhile (Backup gives a point-in-time snapshot
// of a bank under writes).
#include <algorithm>
#include <fstream>
#include <iostream>

#include <google/protobuf/io/zero_copy_stream_impl.h>
#include <google/protobuf/util/delimited_message_util.h>

#include "absl/strings/str_cat.h"
#include "client/cli/commands.h"
#include "engram/core/status_macros.h"

namespace engram::cli {
namespace {

constexpr char kMagic[] = "engram-bank-export 1\n";
// Pages stay far below the default 64 MiB message limit.
constexpr int64_t kPageBytes = 8 << 20;

int64_t PageRows(uint32_t dim) {
  return std::clamp<int64_t>(kPageBytes / (4 * int64_t{dim} + 64), 1, 1000);
}

}  // namespace

absl::Status RunBankExport(const Args& args, Context& ctx) {
  const auto& pos = args.positional();
  const std::string& name = pos[2];
  const std::string& path = pos[3];
  ENGRAM_ASSIGN_OR_RETURN(v1::BankInfo info, ctx.client->GetBank(name));
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::UnavailableError(absl::StrCat("cannot write '", path, "'"));
  out.write(kMagic, sizeof(kMagic) - 1);
  int64_t written = 0;
  {
    google::protobuf::io::OstreamOutputStream stream(&out);
    using google::protobuf::util::SerializeDelimitedToZeroCopyStream;
    v1::BankInfo header;
    header.set_name(info.name());
    header.set_dim(info.dim());
    header.set_kind(info.kind());
    *header.mutable_energy() = info.energy();
    header.set_precision(info.precision());
    header.set_patterns(info.patterns());
    header.set_value_dim(info.value_dim());
    header.set_ttl_seconds(info.ttl_seconds());
    header.set_decay_half_life_seconds(info.decay_half_life_seconds());
    bool ok = SerializeDelimitedToZeroCopyStream(header, &stream);
    v1::GetPatternsRequest req;
    req.set_bank(name);
    req.set_page_size(static_cast<uint32_t>(PageRows(info.dim())));
    uint64_t start = 0;
    while (ok) {
      req.set_page_start(start);
      ENGRAM_ASSIGN_OR_RETURN(v1::GetPatternsResponse page, ctx.client->GetPatterns(req));
      if (page.ids_size() == 0) break;
      written += page.ids_size();
      ok = SerializeDelimitedToZeroCopyStream(page, &stream);
      if (page.next_page_start() == start) break;
      start = page.next_page_start();
    }
    v1::GetPatternsResponse trailer;
    trailer.set_next_page_start(static_cast<uint64_t>(written));
    ok = ok && SerializeDelimitedToZeroCopyStream(trailer, &stream);
    if (!ok) return absl::UnavailableError(absl::StrCat("cannot write '", path, "'"));
  }
  out.close();
  if (!out) return absl::UnavailableError(absl::StrCat("cannot write '", path, "'"));
  if (ctx.json) {
    std::cout << "{\"bank\":\"" << name << "\",\"file\":\"" << path << "\",\"patterns\":" << written
              << "}\n";
  } else {
    std::cout << "exported bank " << name << " (N=" << info.dim() << ", " << written
              << " patterns) to " << path << "\n";
  }
  return absl::OkStatus();
}

absl::Status RunBankImport(const Args& args, Context& ctx) {
  const auto& pos = args.positional();
  const std::string& path = pos[2];
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read '", path, "'"));
  std::string magic(sizeof(kMagic) - 1, '\0');
  in.read(magic.data(), static_cast<std::streamsize>(magic.size()));
  if (!in || magic != kMagic) {
    return absl::InvalidArgumentError(absl::StrCat(
        "'", path, "' is not an engram bank export (no \"engram-bank-export 1\" header)"));
  }
  google::protobuf::io::IstreamInputStream stream(&in);
  using google::protobuf::util::ParseDelimitedFromZeroCopyStream;
  v1::BankInfo info;
  if (!ParseDelimitedFromZeroCopyStream(&info, &stream, nullptr)) {
    return absl::DataLossError(absl::StrCat("'", path, "': bank description is unreadable"));
  }
  v1::CreateBankRequest create;
  create.set_name(args.Get("name", info.name()));
  create.set_dim(info.dim());
  create.set_kind(info.kind());
  *create.mutable_energy() = info.energy();
  create.set_precision(info.precision());
  create.set_value_dim(info.value_dim());
  create.set_ttl_seconds(info.ttl_seconds());
  create.set_decay_half_life_seconds(info.decay_half_life_seconds());
  ENGRAM_RETURN_IF_ERROR(ctx.client->CreateBank(create).status());
  int64_t stored = 0;
  while (true) {
    v1::GetPatternsResponse page;
    if (!ParseDelimitedFromZeroCopyStream(&page, &stream, nullptr)) {
      return absl::DataLossError(absl::StrCat(
          "'", path, "' is truncated or corrupt after ", stored, " patterns; bank '",
          create.name(), "' holds those ", stored));
    }
    if (page.ids_size() == 0) {
      if (static_cast<int64_t>(page.next_page_start()) != stored) {
        return absl::DataLossError(absl::StrCat(
            "'", path, "' lists ", page.next_page_start(), " patterns but holds ", stored));
      }
      break;
    }
    v1::StoreRequest store;
    store.set_bank(create.name());
    *store.mutable_ids() = page.ids();
    *store.mutable_patterns() = std::move(*page.mutable_patterns());
    *store.mutable_payloads() = std::move(*page.mutable_payloads());
    *store.mutable_values() = std::move(*page.mutable_values());
    *store.mutable_labels() = std::move(*page.mutable_labels());
    auto r = ctx.client->Store(store);
    if (!r.ok()) {
      return absl::Status(r.status().code(), absl::StrCat(
          r.status().message(), " (bank '", create.name(), "' holds the first ", stored,
          " patterns of the file)"));
    }
    stored += page.ids_size();
  }
  if (ctx.json) {
    std::cout << "{\"bank\":\"" << create.name() << "\",\"file\":\"" << path
              << "\",\"patterns\":" << stored << "}\n";
  } else {
    std::cout << "imported bank " << create.name() << " (N=" << info.dim() << ", " << stored
              << " patterns, ids and payloads as exported) from " << path << "\n";
  }
  return absl::OkStatus();
}

}  // namespace engram::cli
