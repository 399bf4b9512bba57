// engram store BANK FILE ...   and   engram delete BANK ID...
#include <fstream>
#include <iostream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "client/cli/commands.h"
#include "engram/core/status_macros.h"

namespace engram::cli {

absl::Status RunStore(const Args& args, Context& ctx) {
  const auto& pos = args.positional();
  const std::string& bank = pos[1];
  ENGRAM_ASSIGN_OR_RETURN(client::Matrix m, LoadData(pos[2], args));
  std::vector<std::string> payloads;
  std::vector<int64_t> classes;  // --labels' values, for --label-key
  client::Matrix values;
  if (args.Has("values")) {
    ENGRAM_ASSIGN_OR_RETURN(values, client::LoadMatrix(args.Get("values")));
    ENGRAM_ASSIGN_OR_RETURN(int64_t offset, args.GetInt("offset", 0));
    ENGRAM_RETURN_IF_ERROR(client::SliceRows(&values, offset, m.rows));
    if (values.rows != m.rows) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--values has ", values.rows, " rows for ", m.rows, " patterns"));
    }
  }
  if (args.Has("label-key") && !args.Has("labels")) {
    return absl::InvalidArgumentError("--label-key names the label of --labels' classes; give --labels");
  }
  ENGRAM_ASSIGN_OR_RETURN(int64_t ttl, args.GetInt("ttl", 0));
  if (ttl < 0) return absl::InvalidArgumentError("--ttl must be >= 0 seconds");
  if (args.Has("labels")) {
    Args label_args = args;  // same row range as the data
    ENGRAM_ASSIGN_OR_RETURN(client::Matrix labels, client::LoadMatrix(args.Get("labels")));
    ENGRAM_ASSIGN_OR_RETURN(int64_t offset, args.GetInt("offset", 0));
    ENGRAM_RETURN_IF_ERROR(client::SliceRows(&labels, offset, m.rows));
    if (labels.rows != m.rows) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--labels has ", labels.rows, " rows for ", m.rows, " patterns"));
    }
    for (int64_t r = 0; r < labels.rows; ++r) {
      classes.push_back(static_cast<int64_t>(labels.row(r)[0]));
      payloads.push_back(absl::StrCat(classes.back()));
    }
  } else if (args.Has("payloads")) {
    std::ifstream in(args.Get("payloads"));
    if (!in) return absl::NotFoundError("cannot open --payloads " + args.Get("payloads"));
    std::string line;
    while (std::getline(in, line)) payloads.push_back(line);
    if (static_cast<int64_t>(payloads.size()) < m.rows) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--payloads has ", payloads.size(), " lines for ", m.rows, " patterns"));
    }
    payloads.resize(m.rows);
  }
  ENGRAM_ASSIGN_OR_RETURN(int64_t ids_start, args.GetInt("ids-start", -1));
  ENGRAM_ASSIGN_OR_RETURN(int64_t batch, args.GetInt("batch", 1000));
  if (batch < 1) return absl::InvalidArgumentError("--batch must be >= 1");
  int64_t stored = 0;
  uint64_t bank_patterns = 0;
  uint64_t first_id = 0, last_id = 0;
  for (int64_t start = 0; start < m.rows; start += batch) {
    const int64_t end = std::min(m.rows, start + batch);
    v1::StoreRequest req;
    req.set_bank(bank);
    req.mutable_patterns()->Add(m.row(start), m.row(start) + (end - start) * m.cols);
    if (ids_start >= 0) {
      for (int64_t r = start; r < end; ++r) req.add_ids(ids_start + r);
    }
    if (!payloads.empty()) {
      for (int64_t r = start; r < end; ++r) req.add_payloads(payloads[r]);
    }
    if (values.rows > 0) {
      req.mutable_values()->Add(values.row(start), values.row(start) + (end - start) * values.cols);
    }
    if (args.Has("label-key")) {
      for (int64_t r = start; r < end; ++r) {
        (*req.add_labels()->mutable_ints())[args.Get("label-key")] = classes[r];
      }
    }
    req.set_ttl_seconds(static_cast<uint64_t>(ttl));
    auto resp = ctx.client->Store(req);
    if (!resp.ok()) {
      return absl::Status(resp.status().code(), absl::StrCat(
          resp.status().message(), " (rows ", start, "..", end - 1, "; ", stored,
          " patterns before them were stored)"));
    }
    if (stored == 0 && resp->ids_size() > 0) first_id = resp->ids(0);
    if (resp->ids_size() > 0) last_id = resp->ids(resp->ids_size() - 1);
    stored += end - start;
    bank_patterns = resp->bank_patterns();
  }
  if (ctx.json) {
    std::cout << absl::StrCat("{\"bank\":\"", bank, "\",\"stored\":", stored,
                              ",\"first_id\":", first_id, ",\"last_id\":", last_id,
                              ",\"bank_patterns\":", bank_patterns, "}\n");
  } else {
    std::cout << "stored " << stored << " patterns of dimension " << m.cols << " in "
              << bank << " (ids " << first_id << ".." << last_id << "); bank now holds "
              << bank_patterns << "\n";
  }
  return absl::OkStatus();
}

absl::Status RunGet(const Args& args, Context& ctx) {
  const auto& pos = args.positional();
  client::Matrix m;
  std::vector<uint64_t> ids;
  std::vector<std::string> payloads;
  auto append = [&](const v1::GetPatternsResponse& r) {
    m.cols = r.dim();
    m.data.insert(m.data.end(), r.patterns().begin(), r.patterns().end());
    ids.insert(ids.end(), r.ids().begin(), r.ids().end());
    payloads.insert(payloads.end(), r.payloads().begin(), r.payloads().end());
  };
  v1::GetPatternsRequest req;
  req.set_bank(pos[1]);
  if (pos.size() > 2) {
    for (size_t i = 2; i < pos.size(); ++i) {
      uint64_t id;
      if (!absl::SimpleAtoi(pos[i], &id)) {
        return absl::InvalidArgumentError(absl::StrCat("not an id: '", pos[i], "'"));
      }
      req.add_ids(id);
    }
    ENGRAM_ASSIGN_OR_RETURN(v1::GetPatternsResponse r, ctx.client->GetPatterns(req));
    append(r);
  } else {
    uint64_t start = 0;
    while (true) {
      req.set_page_start(start);
      req.set_page_size(1000);
      ENGRAM_ASSIGN_OR_RETURN(v1::GetPatternsResponse r, ctx.client->GetPatterns(req));
      append(r);
      if (r.ids_size() == 0 || r.next_page_start() == start) break;
      start = r.next_page_start();
    }
  }
  m.rows = static_cast<int64_t>(ids.size());
  if (args.Has("out")) ENGRAM_RETURN_IF_ERROR(client::SaveNpy(args.Get("out"), m));
  if (ctx.json) {
    std::cout << "{\"bank\":\"" << pos[1] << "\",\"dim\":" << m.cols << ",\"ids\":[";
    for (size_t i = 0; i < ids.size(); ++i) std::cout << (i ? "," : "") << ids[i];
    std::cout << "]}\n";
  } else {
    for (int64_t r = 0; r < m.rows; ++r) {
      std::cout << "id=" << ids[r] << " payload=\"" << payloads[r] << "\" [";
      for (int64_t i = 0; i < std::min<int64_t>(m.cols, 8); ++i) {
        std::cout << (i ? " " : "") << m.row(r)[i];
      }
      std::cout << (m.cols > 8 ? " ...]\n" : "]\n");
    }
    std::cout << m.rows << " patterns" << (args.Has("out") ? " written to " + args.Get("out") : "")
              << "\n";
  }
  return absl::OkStatus();
}

absl::Status RunBackup(const Args& args, Context& ctx) {
  const auto& pos = args.positional();
  v1::BackupRequest req;
  req.set_file(pos[1]);
  grpc::ClientContext cctx;
  ctx.client->Prepare(&cctx);
  v1::BackupResponse resp;
  ENGRAM_RETURN_IF_ERROR(client::FromGrpc(ctx.client->stub()->Backup(&cctx, req, &resp)));
  if (ctx.json) std::cout << ToJson(resp) << "\n";
  else std::cout << "snapshot of " << resp.banks() << " banks (" << resp.bytes() << " bytes) written to "
                 << resp.path() << " on the server; restore with engramd --restore_from\n";
  return absl::OkStatus();
}

absl::Status RunDelete(const Args& args, Context& ctx) {
  const auto& pos = args.positional();
  v1::DeletePatternsRequest req;
  req.set_bank(pos[1]);
  for (size_t i = 2; i < pos.size(); ++i) {
    uint64_t id;
    if (!absl::SimpleAtoi(pos[i], &id)) {
      return absl::InvalidArgumentError(absl::StrCat("not an id: '", pos[i], "'"));
    }
    req.add_ids(id);
  }
  ENGRAM_ASSIGN_OR_RETURN(v1::DeletePatternsResponse resp, ctx.client->DeletePatterns(req));
  if (ctx.json) std::cout << ToJson(resp) << "\n";
  else std::cout << "deleted " << resp.deleted() << " patterns; bank holds "
                 << resp.bank_patterns() << "\n";
  return absl::OkStatus();
}

}  // namespace engram::cli
