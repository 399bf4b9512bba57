// engram retrieve BANK FILE ...   and   engram energy BANK FILE ...
#include <cmath>
#include <iostream>
#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/cli/commands.h"
#include "engram/core/status_macros.h"

namespace engram::cli {

absl::Status RunRetrieve(const Args& args, Context& ctx) {
  const auto& pos = args.positional();
  const std::string& bank = pos[1];
  ENGRAM_ASSIGN_OR_RETURN(v1::BankInfo info, ctx.client->GetBank(bank));
  const bool bipolar = info.kind() == v1::STATE_KIND_BIPOLAR;
  ENGRAM_ASSIGN_OR_RETURN(client::Matrix truth, LoadData(pos[2], args));
  if (truth.cols != info.dim()) {
    return absl::InvalidArgumentError(absl::StrCat(
        pos[2], " has ", truth.cols, " values per row; bank ", bank, " has dimension ",
        info.dim()));
  }
  client::Matrix queries = truth;
  ENGRAM_ASSIGN_OR_RETURN(int64_t seed, args.GetInt("seed", 0));
  std::mt19937_64 rng(static_cast<uint64_t>(seed));
  ENGRAM_ASSIGN_OR_RETURN(double flip, args.GetDouble("flip", 0));
  ENGRAM_ASSIGN_OR_RETURN(double noise, args.GetDouble("noise", 0));
  ENGRAM_ASSIGN_OR_RETURN(double mask, args.GetDouble("mask-fraction", 0));
  if (flip < 0 || flip > 1 || mask < 0 || mask > 1 || noise < 0) {
    return absl::InvalidArgumentError("--flip and --mask-fraction are in [0, 1]; --noise >= 0");
  }
  if (noise > 0 && bipolar) {
    return absl::InvalidArgumentError("--noise makes non-bipolar queries; use --flip on a bipolar bank");
  }
  if (flip > 0) client::FlipFraction(&queries, flip, rng);
  if (noise > 0) client::AddNoise(&queries, noise, rng);
  v1::RetrieveRequest req;
  req.set_bank(bank);
  if (mask > 0) {
    if (args.Has("clamp")) return absl::InvalidArgumentError("use --clamp or --mask-fraction, not both");
    std::vector<bool> known = client::MaskFraction(&queries, mask, bipolar, rng);
    for (bool k : known) req.add_clamp(k);
  } else if (args.Has("clamp")) {
    ENGRAM_ASSIGN_OR_RETURN(client::Matrix c, client::LoadMatrix(args.Get("clamp")));
    for (float v : c.data) req.add_clamp(v != 0.f);
  }
  req.mutable_queries()->Add(queries.data.begin(), queries.data.end());
  if (args.Has("filter")) ENGRAM_RETURN_IF_ERROR(ParseFilter(args.Get("filter"), req.mutable_filter()));
  bool energy_set = false;
  ENGRAM_RETURN_IF_ERROR(ParseEnergy(args, req.mutable_energy(), &energy_set));
  if (!energy_set) req.clear_energy();
  auto* o = req.mutable_options();
  ENGRAM_ASSIGN_OR_RETURN(v1::Dynamics dyn, ParseDynamics(args.Get("dynamics", "sync")));
  o->set_dynamics(dyn);
  ENGRAM_ASSIGN_OR_RETURN(int64_t max_steps, args.GetInt("max-steps", 0));
  if (max_steps < 0) return absl::InvalidArgumentError("--max-steps must be >= 1");
  o->set_max_steps(static_cast<uint32_t>(max_steps));
  ENGRAM_ASSIGN_OR_RETURN(double tol, args.GetDouble("tol", 0));
  ENGRAM_ASSIGN_OR_RETURN(double alpha, args.GetDouble("alpha", 0));
  ENGRAM_ASSIGN_OR_RETURN(double dt, args.GetDouble("dt", 0));
  ENGRAM_ASSIGN_OR_RETURN(double tau_v, args.GetDouble("tau-v", 0));
  ENGRAM_ASSIGN_OR_RETURN(double tau_h, args.GetDouble("tau-h", 0));
  o->set_tol(tol);
  o->set_alpha(alpha);
  o->set_dt(dt);
  o->set_tau_v(tau_v);
  o->set_tau_h(tau_h);
  o->set_seed(static_cast<uint64_t>(seed));
  o->set_return_trace(args.Has("trace"));
  o->set_partial_on_deadline(args.Has("partial"));

  ENGRAM_ASSIGN_OR_RETURN(v1::RetrieveResponse resp, ctx.client->Retrieve(req));

  // Compare each final state with the uncorrupted row it came from.
  int exact = 0;
  std::vector<double> dist(resp.results_size());
  for (int q = 0; q < resp.results_size(); ++q) {
    const auto& r = resp.results(q);
    double d2 = 0, n2 = 0;
    for (int i = 0; i < r.state_size(); ++i) {
      d2 += std::pow(double{r.state(i)} - truth.row(q)[i], 2);
      n2 += std::pow(double{truth.row(q)[i]}, 2);
    }
    dist[q] = std::sqrt(d2);
    if (dist[q] <= 1e-3 * std::sqrt(std::max(n2, 1.0))) ++exact;
  }
  if (args.Has("out")) {
    client::Matrix out;
    out.rows = resp.results_size();
    out.cols = info.dim();
    for (const auto& r : resp.results()) out.data.insert(out.data.end(), r.state().begin(), r.state().end());
    ENGRAM_RETURN_IF_ERROR(client::SaveNpy(args.Get("out"), out));
  }
  if (ctx.json) {
    std::cout << absl::StrCat("{\"queries\":", resp.results_size(), ",\"recovered\":", exact,
                              ",\"response\":", ToJson(resp), "}\n");
    return absl::OkStatus();
  }
  for (int q = 0; q < resp.results_size(); ++q) {
    const auto& r = resp.results(q);
    const std::string reason = absl::AsciiStrToLower(
        v1::StopReason_Name(r.stop_reason()).substr(std::string("STOP_REASON_").size()));
    std::cout << absl::StrFormat(
        "#%d  nearest id=%d payload=\"%s\" dist=%.4g  %s after %d steps  E %.6g -> %.6g  "
        "distance to original %.4g%s\n",
        q, r.nearest().id(), r.nearest().payload(), r.nearest().distance(), reason, r.steps(),
        r.energy_start(), r.energy_end(), dist[q], dist[q] == 0 ? " (exact)" : "");
    if (r.value_size() > 0) {
      std::cout << "    value:";
      for (int j = 0; j < std::min(r.value_size(), 8); ++j) std::cout << " " << absl::StrFormat("%.6g", r.value(j));
      std::cout << (r.value_size() > 8 ? " ...\n" : "\n");
    }
    if (args.Has("trace")) {
      std::cout << "    energy trace:";
      for (double e : r.energy_trace()) std::cout << " " << absl::StrFormat("%.6g", e);
      std::cout << "\n";
    }
  }
  std::cout << absl::StrFormat("recovered %d of %d queries (final state within 1e-3 relative of the original row)\n",
                               exact, resp.results_size());
  return absl::OkStatus();
}

absl::Status RunEnergy(const Args& args, Context& ctx) {
  const auto& pos = args.positional();
  ENGRAM_ASSIGN_OR_RETURN(client::Matrix states, LoadData(pos[2], args));
  v1::EnergyRequest req;
  req.set_bank(pos[1]);
  req.mutable_states()->Add(states.data.begin(), states.data.end());
  bool set = false;
  ENGRAM_RETURN_IF_ERROR(ParseEnergy(args, req.mutable_energy(), &set));
  if (!set) req.clear_energy();
  req.set_return_gradient(args.Has("gradient"));
  req.set_return_novelty(args.Has("novelty"));
  if (args.Has("filter")) ENGRAM_RETURN_IF_ERROR(ParseFilter(args.Get("filter"), req.mutable_filter()));
  ENGRAM_ASSIGN_OR_RETURN(v1::EnergyResponse resp, ctx.client->Energy(req));
  if (ctx.json) {
    std::cout << ToJson(resp) << "\n";
    return absl::OkStatus();
  }
  const int n = static_cast<int>(states.cols);
  for (int q = 0; q < resp.energies_size(); ++q) {
    std::cout << absl::StrFormat("#%d  E = %.10g", q, resp.energies(q));
    if (req.return_gradient()) {
      double g2 = 0;
      for (int i = 0; i < n; ++i) g2 += std::pow(double{resp.gradients(q * n + i)}, 2);
      std::cout << absl::StrFormat("  |grad E| = %.6g", std::sqrt(g2));
    }
    if (q < resp.novelty_size()) {
      std::cout << absl::StrFormat("  novelty %.4f (z %.3g)", resp.novelty(q), resp.novelty_z(q));
    }
    if (const int m = resp.values_size() / std::max(1, resp.energies_size()); m > 0) {
      std::cout << "  value:";
      for (int j = 0; j < std::min(m, 8); ++j) std::cout << " " << absl::StrFormat("%.6g", resp.values(q * m + j));
      if (m > 8) std::cout << " ...";
    }
    std::cout << "\n";
  }
  return absl::OkStatus();
}

}  // namespace engram::cli
