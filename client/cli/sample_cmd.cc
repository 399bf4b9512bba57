// engram sample BANK ...
#include <iostream>
#include <map>
#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/cli/commands.h"
#include "client/png_grid.h"
#include "engram/core/status_macros.h"

namespace engram::cli {
namespace {

absl::StatusOr<v1::Sampler> ParseSampler(const std::string& s) {
  static const std::map<std::string, v1::Sampler> kSamplers = {
      {"euler", v1::SAMPLER_EULER}, {"heun", v1::SAMPLER_HEUN},
      {"stochastic", v1::SAMPLER_STOCHASTIC}, {"langevin", v1::SAMPLER_LANGEVIN},
      {"annealed_am", v1::SAMPLER_ANNEALED_AM}, {"annealed-am", v1::SAMPLER_ANNEALED_AM}};
  auto it = kSamplers.find(absl::AsciiStrToLower(s));
  if (it == kSamplers.end()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--sampler must be euler, heun, stochastic, langevin or annealed_am, got '", s, "'"));
  }
  return it->second;
}

absl::StatusOr<v1::ScheduleKind> ParseSchedule(const std::string& s) {
  const std::string k = absl::AsciiStrToLower(s);
  if (k == "karras") return v1::SCHEDULE_KIND_KARRAS;
  if (k == "geometric") return v1::SCHEDULE_KIND_GEOMETRIC;
  if (k == "linear") return v1::SCHEDULE_KIND_LINEAR;
  return absl::InvalidArgumentError(
      absl::StrCat("--schedule must be karras, geometric or linear, got '", s, "'"));
}

std::string ClassName(v1::SampleClass c) {
  return absl::AsciiStrToLower(v1::SampleClass_Name(c).substr(std::string("SAMPLE_CLASS_").size()));
}

// The schedule and seed options.
absl::Status SetSchedule(const Args& args, v1::SampleRequest* req) {
  auto* sch = req->mutable_schedule();
  if (args.Has("schedule")) {
    ENGRAM_ASSIGN_OR_RETURN(v1::ScheduleKind k, ParseSchedule(args.Get("schedule")));
    sch->set_kind(k);
  }
  ENGRAM_ASSIGN_OR_RETURN(double smax, args.GetDouble("sigma-max", 0));
  ENGRAM_ASSIGN_OR_RETURN(double smin, args.GetDouble("sigma-min", 0));
  ENGRAM_ASSIGN_OR_RETURN(double rho, args.GetDouble("rho", 0));
  ENGRAM_ASSIGN_OR_RETURN(int64_t steps, args.GetInt("steps", 0));
  if (steps < 0) return absl::InvalidArgumentError("--steps must be >= 1");
  sch->set_sigma_max(smax);
  sch->set_sigma_min(smin);
  sch->set_rho(rho);
  sch->set_steps(static_cast<uint32_t>(steps));
  sch->set_stop_at_sigma_min(args.Has("stop-at-sigma-min"));
  ENGRAM_ASSIGN_OR_RETURN(int64_t seed, args.GetInt("seed", 0));
  req->set_seed(static_cast<uint64_t>(seed));
  return absl::OkStatus();
}

// --query (1 or `count` rows of the bank's dimension `n`) with its clamp
// (--mask-fraction drawn with the request's seed, or --clamp) and
// --sigma-start; those three need --query.
absl::Status SetQuery(const Args& args, int n, bool bipolar, int64_t count,
                      v1::SampleRequest* req) {
  if (args.Has("query")) {
    ENGRAM_ASSIGN_OR_RETURN(client::Matrix q, LoadData(args.Get("query"), args));
    if (q.cols != n) {
      return absl::InvalidArgumentError(absl::StrCat("--query rows have ", q.cols,
                                                     " values; the bank's dimension is ", n));
    }
    if (q.rows != 1 && q.rows != count) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--query has ", q.rows, " rows; give 1 (shared) or --count of them (use --limit)"));
    }
    ENGRAM_ASSIGN_OR_RETURN(double mask, args.GetDouble("mask-fraction", 0));
    if (mask > 0) {
      std::mt19937_64 rng(req->seed());
      std::vector<bool> known = client::MaskFraction(&q, mask, bipolar, rng);
      for (bool k : known) req->add_clamp(k);
    } else if (args.Has("clamp")) {
      ENGRAM_ASSIGN_OR_RETURN(client::Matrix c, client::LoadMatrix(args.Get("clamp")));
      for (float v : c.data) req->add_clamp(v != 0.f);
    }
    req->mutable_query()->Add(q.data.begin(), q.data.end());
    ENGRAM_ASSIGN_OR_RETURN(double ss, args.GetDouble("sigma-start", 0));
    req->set_sigma_start(ss);
  } else if (args.Has("mask-fraction") || args.Has("clamp") || args.Has("sigma-start")) {
    return absl::InvalidArgumentError("--mask-fraction, --clamp and --sigma-start need --query");
  }
  return absl::OkStatus();
}

// The sampler-specific options.
absl::Status SetSamplerOptions(const Args& args, v1::SampleRequest* req) {
  struct OptD { const char* flag; void (v1::SampleRequest::*set)(double); };
  for (auto [flag, set] : {OptD{"churn", &v1::SampleRequest::set_churn},
                           OptD{"s-tmin", &v1::SampleRequest::set_s_tmin},
                           OptD{"s-tmax", &v1::SampleRequest::set_s_tmax},
                           OptD{"s-noise", &v1::SampleRequest::set_s_noise},
                           OptD{"langevin-eta", &v1::SampleRequest::set_langevin_eta},
                           OptD{"delta-memorized", &v1::SampleRequest::set_delta_memorized},
                           OptD{"delta-spurious", &v1::SampleRequest::set_delta_spurious}}) {
    if (args.Has(flag)) {
      ENGRAM_ASSIGN_OR_RETURN(double v, args.GetDouble(flag, 0));
      (req->*set)(v);
    }
  }
  ENGRAM_ASSIGN_OR_RETURN(int64_t lsteps, args.GetInt("langevin-steps", 0));
  ENGRAM_ASSIGN_OR_RETURN(int64_t am_it, args.GetInt("am-iterations", 0));
  ENGRAM_ASSIGN_OR_RETURN(int64_t every, args.GetInt("trajectory-every", 0));
  if (lsteps < 0 || am_it < 0 || every < 0) {
    return absl::InvalidArgumentError("--langevin-steps, --am-iterations, --trajectory-every >= 0");
  }
  req->set_langevin_steps(static_cast<uint32_t>(lsteps));
  req->set_am_iterations(static_cast<uint32_t>(am_it));
  if (args.Has("png-trajectory") && every == 0) every = 8;
  req->set_trajectory_every(static_cast<uint32_t>(every));
  return absl::OkStatus();
}

// Sample, or SampleStream with --stream (progress on stderr).
absl::StatusOr<v1::SampleResponse> CallSample(const Args& args, Context& ctx,
                                              const v1::SampleRequest& req) {
  if (!args.Has("stream")) return ctx.client->Sample(req);
  v1::SampleResponse resp;
  grpc::ClientContext cctx;
  ctx.client->Prepare(&cctx);
  auto reader = ctx.client->stub()->SampleStream(&cctx, req);
  v1::SampleFrame frame;
  while (reader->Read(&frame)) {
    if (frame.has_result()) {
      resp = frame.result();
    } else if (!ctx.json) {
      std::cerr << absl::StrFormat("\rstep %d  sigma %.4g", frame.step(), frame.sigma());
    }
  }
  if (!ctx.json) std::cerr << "\n";
  ENGRAM_RETURN_IF_ERROR(client::FromGrpc(reader->Finish()));
  return resp;
}

// --out (npy), --png (a grid of the samples) and --png-trajectory.
absl::Status WriteSampleFiles(const Args& args, const v1::SampleResponse& resp, int n) {
  if (args.Has("out")) {
    client::Matrix m;
    m.rows = resp.samples_size();
    m.cols = n;
    for (const auto& s : resp.samples()) m.data.insert(m.data.end(), s.state().begin(), s.state().end());
    ENGRAM_RETURN_IF_ERROR(client::SaveNpy(args.Get("out"), m));
  }
  ENGRAM_ASSIGN_OR_RETURN(int64_t columns, args.GetInt("columns", 8));
  if (args.Has("png") || args.Has("png-trajectory")) {
    int h = 0, w = 0;
    ENGRAM_RETURN_IF_ERROR(client::ParseImageShape(args.Get("image-shape"), n, &h, &w));
    if (args.Has("png")) {
      std::vector<std::vector<float>> tiles;
      for (const auto& s : resp.samples()) tiles.emplace_back(s.state().begin(), s.state().end());
      ENGRAM_RETURN_IF_ERROR(client::WritePngGrid(args.Get("png"), tiles, h, w,
                                                  static_cast<int>(columns)));
    }
    if (args.Has("png-trajectory")) {
      // One row per sample (at most 8), one column per recorded step.
      std::vector<std::vector<float>> tiles;
      int cols = 0;
      for (int i = 0; i < std::min(resp.samples_size(), 8); ++i) {
        const auto& traj = resp.samples(i).trajectory();
        cols = traj.size();
        for (const auto& p : traj) tiles.emplace_back(p.state().begin(), p.state().end());
      }
      ENGRAM_RETURN_IF_ERROR(client::WritePngGrid(args.Get("png-trajectory"), tiles, h, w, cols));
    }
  }
  return absl::OkStatus();
}

// The samples' classes: one line each and a summary, or JSON.
void PrintSamples(const v1::SampleResponse& resp, const Context& ctx) {
  std::map<std::string, int> classes;
  int spurious_fixed = 0;
  for (const auto& s : resp.samples()) {
    ++classes[ClassName(s.sample_class())];
    spurious_fixed += s.spurious_fixed_point();
  }
  if (ctx.json) {
    // Trajectories can be large; the JSON keeps them (use --trajectory-every 0 to drop).
    std::cout << absl::StrCat("{\"memorized\":", classes["memorized"], ",\"spurious\":",
                              classes["spurious"], ",\"novel\":", classes["novel"],
                              ",\"spurious_fixed_points\":", spurious_fixed,
                              ",\"response\":", ToJson(resp), "}\n");
    return;
  }
  for (int i = 0; i < resp.samples_size(); ++i) {
    const auto& s = resp.samples(i);
    std::cout << absl::StrFormat(
        "#%d  %-9s nearest id=%d payload=\"%s\" rel.dist=%.4f%s%s  E=%.6g\n", i,
        ClassName(s.sample_class()), s.nearest().id(), s.nearest().payload(),
        s.relative_distance(), s.mirrored() ? " (mirrored)" : "",
        s.fixed_point() ? " fixed-point" : "", s.energy());
  }
  std::cout << absl::StrFormat(
      "%d samples, %d steps: memorized %d, spurious %d, novel %d; fixed points near no memory %d\n",
      resp.samples_size(), resp.steps(), classes["memorized"], classes["spurious"],
      classes["novel"], spurious_fixed);
}

}  // namespace

absl::Status RunSample(const Args& args, Context& ctx) {
  const auto& pos = args.positional();
  const std::string& bank = pos[1];
  ENGRAM_ASSIGN_OR_RETURN(v1::BankInfo info, ctx.client->GetBank(bank));
  const bool bipolar = info.kind() == v1::STATE_KIND_BIPOLAR;
  const int n = static_cast<int>(info.dim());
  v1::SampleRequest req;
  req.set_bank(bank);
  if (args.Has("filter")) ENGRAM_RETURN_IF_ERROR(ParseFilter(args.Get("filter"), req.mutable_filter()));
  ENGRAM_ASSIGN_OR_RETURN(int64_t count, args.GetInt("count", 8));
  if (count < 1) return absl::InvalidArgumentError("--count must be >= 1");
  req.set_count(static_cast<uint32_t>(count));
  if (args.Has("sampler")) {
    ENGRAM_ASSIGN_OR_RETURN(v1::Sampler s, ParseSampler(args.Get("sampler")));
    req.set_sampler(s);
  }
  ENGRAM_RETURN_IF_ERROR(SetSchedule(args, &req));
  bool energy_set = false;
  ENGRAM_RETURN_IF_ERROR(ParseEnergy(args, req.mutable_energy(), &energy_set));
  if (!energy_set) req.clear_energy();
  ENGRAM_RETURN_IF_ERROR(SetQuery(args, n, bipolar, count, &req));
  ENGRAM_RETURN_IF_ERROR(SetSamplerOptions(args, &req));
  ENGRAM_ASSIGN_OR_RETURN(v1::SampleResponse resp, CallSample(args, ctx, req));
  ENGRAM_RETURN_IF_ERROR(WriteSampleFiles(args, resp, n));
  PrintSamples(resp, ctx);
  return absl::OkStatus();
}

}  // namespace engram::cli
