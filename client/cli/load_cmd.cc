// engram load BANK ...: a load generator in the spirit of ghz, for Engram's
// RPCs. Workers share one or more channels, pick an RPC by weight, optionally
// pace themselves to a target rate, and record every latency; the report
// gives counts by status code, achieved versus target rate, percentiles and a
// latency histogram as text, JSON or CSV.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <iostream>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "client/cli/commands.h"
#include "engram/core/status_macros.h"

namespace engram::cli {
namespace {

using Clock = std::chrono::steady_clock;

// `info` is GetBank: no computation, the floor a call pays for transport,
// authorization and the handler's prelude.
enum Rpc { kRetrieve, kSample, kEnergy, kStore, kInfo, kNumRpcs };
const char* kRpcNames[] = {"retrieve", "sample", "energy", "store", "info"};

struct Record {
  double seconds_since_start;
  double latency;
  int rpc;
  int code;
};

absl::StatusOr<std::vector<double>> ParseMix(const std::string& spec) {
  std::vector<double> w(kNumRpcs, 0.0);
  for (absl::string_view part : absl::StrSplit(spec, ',', absl::SkipEmpty())) {
    std::pair<std::string, std::string> kv = absl::StrSplit(part, '=');
    const std::string name = absl::AsciiStrToLower(kv.first);
    double weight = 1;
    if (!kv.second.empty() && (!absl::SimpleAtod(kv.second, &weight) || weight < 0)) {
      return absl::InvalidArgumentError(absl::StrCat("--mix: bad weight in '", std::string(part), "'"));
    }
    auto it = std::find(std::begin(kRpcNames), std::end(kRpcNames), name);
    if (it == std::end(kRpcNames)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--mix: unknown RPC '", name, "' (retrieve, sample, energy, store, info)"));
    }
    w[it - std::begin(kRpcNames)] = weight;
  }
  double total = 0;
  for (double v : w) total += v;
  if (total <= 0) return absl::InvalidArgumentError("--mix needs a positive weight");
  return w;
}

double Percentile(std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  const double rank = p / 100.0 * (sorted.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(sorted.size() - 1, lo + 1);
  return sorted[lo] + (rank - lo) * (sorted[hi] - sorted[lo]);
}

}  // namespace

namespace {

// What `engram load` was asked to do.
struct LoadPlan {
  std::string bank;
  int n = 0;
  bool bipolar = false;
  int64_t concurrency = 8, connections = 1, total = 0, batch = 1, seed = 1;
  int64_t sample_steps = 16, max_steps = 0;
  double rate = 0, duration = 0, warmup = 0;
  std::vector<double> mix;
  v1::Dynamics dynamics = v1::DYNAMICS_SYNC;
  std::string format = "text";
  bool include_errors = false;
  client::Matrix data;  // rows to send, or empty (random rows)
};

absl::StatusOr<LoadPlan> ParsePlan(const Args& args, const v1::BankInfo& info) {
  LoadPlan p;
  p.bank = info.name();
  p.n = static_cast<int>(info.dim());
  p.bipolar = info.kind() == v1::STATE_KIND_BIPOLAR;
  ENGRAM_ASSIGN_OR_RETURN(p.concurrency, args.GetInt("concurrency", 8));
  ENGRAM_ASSIGN_OR_RETURN(p.connections, args.GetInt("connections", 1));
  ENGRAM_ASSIGN_OR_RETURN(p.rate, args.GetDouble("rate", 0));
  ENGRAM_ASSIGN_OR_RETURN(p.duration, args.GetDouble("duration", 0));
  ENGRAM_ASSIGN_OR_RETURN(p.total, args.GetInt("total", 0));
  ENGRAM_ASSIGN_OR_RETURN(p.warmup, args.GetDouble("warmup", 0));
  ENGRAM_ASSIGN_OR_RETURN(p.batch, args.GetInt("batch", 1));
  ENGRAM_ASSIGN_OR_RETURN(p.seed, args.GetInt("seed", 1));
  ENGRAM_ASSIGN_OR_RETURN(p.sample_steps, args.GetInt("sample-steps", 16));
  ENGRAM_ASSIGN_OR_RETURN(p.max_steps, args.GetInt("max-steps", 0));
  ENGRAM_ASSIGN_OR_RETURN(p.mix, ParseMix(args.Get("mix", "retrieve")));
  ENGRAM_ASSIGN_OR_RETURN(p.dynamics, ParseDynamics(args.Get("dynamics", "sync")));
  p.format = args.Get("format", "text");
  p.include_errors = args.Has("include-errors");
  if (p.format != "text" && p.format != "json" && p.format != "csv") {
    return absl::InvalidArgumentError("--format must be text, json or csv");
  }
  if (p.concurrency < 1 || p.concurrency > 4096 || p.connections < 1 || p.connections > 256 ||
      p.batch < 1 || p.rate < 0 || p.duration < 0 || p.total < 0 || p.warmup < 0 ||
      p.sample_steps < 1) {
    return absl::InvalidArgumentError(
        "need 1 <= --concurrency <= 4096, 1 <= --connections <= 256, --batch >= 1 and "
        "non-negative --rate, --duration, --total, --warmup");
  }
  if (p.duration == 0 && p.total == 0) p.duration = 10;
  if (args.Has("data")) {
    ENGRAM_ASSIGN_OR_RETURN(p.data, LoadData(args.Get("data"), args));
    if (p.data.cols != p.n) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--data rows have ", p.data.cols, " values; the bank's dimension is ", p.n));
    }
  }
  return p;
}

// The clients the workers share: the command's own, then connections - 1
// fresh connections to the same target.
std::vector<std::unique_ptr<client::EngramClient>> ExtraConnections(const Args& args,
                                                                    const Context& ctx,
                                                                    int64_t connections) {
  std::vector<std::unique_ptr<client::EngramClient>> extra;
  for (int64_t c = 1; c < connections; ++c) {
    client::ClientOptions o = ctx.client->options();
    grpc::ChannelArguments a;
    a.SetInt("grpc.channel_id", static_cast<int>(c));  // a connection of its own
    a.SetLoadBalancingPolicyName("round_robin");        // as EngramClient::Connect
    std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
    if (!o.tls_root_pem.empty()) {
      grpc::SslCredentialsOptions ssl;
      ssl.pem_root_certs = o.tls_root_pem;
      creds = grpc::SslCredentials(ssl);
    }
    const char* env_target = std::getenv("ENGRAM_TARGET");
    auto ch = grpc::CreateCustomChannel(
        args.Get("target", env_target != nullptr && *env_target ? env_target : "127.0.0.1:50051"),
        creds, a);
    extra.push_back(std::make_unique<client::EngramClient>(ch, o));
  }
  return extra;
}

// One worker: picks an RPC by weight, paces itself to its share of the
// target rate, and records every call.
class LoadWorker {
 public:
  LoadWorker(const LoadPlan& plan, int w, client::EngramClient* client, Clock::time_point start,
             std::vector<Record>* records)
      : plan_(plan), client_(client), start_(start), records_(records),
        rng_(static_cast<uint64_t>(plan.seed) * 1000003 + w),
        pick_(plan.mix.begin(), plan.mix.end()), data_row_(w),
        interval_(plan.rate > 0 ? plan.concurrency / plan.rate : 0.0),
        next_(start + ToDuration(interval_ * w / plan.concurrency)) {}

  // Calls until `stop`, or until `issued` reaches the plan's total.
  void Run(std::atomic<int64_t>& issued, std::atomic<int64_t>& done,
           std::atomic<int64_t>& failed, const std::atomic<bool>& stop) {
    while (!stop) {
      if (plan_.total > 0 && issued.fetch_add(1) >= plan_.total) break;
      if (interval_ > 0) {
        std::this_thread::sleep_until(next_);
        next_ += ToDuration(interval_);
      }
      const int rpc = pick_(rng_);
      const auto t0 = Clock::now();
      const grpc::Status s = Call(rpc);
      const auto t1 = Clock::now();
      records_->push_back({std::chrono::duration<double>(t0 - start_).count(),
                           std::chrono::duration<double>(t1 - t0).count(), rpc,
                           static_cast<int>(s.error_code())});
      ++done;
      if (!s.ok()) ++failed;
    }
  }

 private:
  static Clock::duration ToDuration(double seconds) {
    return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  }

  // `rows` vectors: the next rows of --data, or random ones.
  void Fill(google::protobuf::RepeatedField<float>* out, int64_t rows) {
    const int n = plan_.n;
    for (int64_t r = 0; r < rows; ++r) {
      if (plan_.data.rows > 0) {
        const float* src = plan_.data.row(data_row_++ % plan_.data.rows);
        out->Add(src, src + n);
      } else {
        for (int i = 0; i < n; ++i) {
          out->Add(plan_.bipolar ? ((rng_() & 1) ? 1.f : -1.f) : gauss_(rng_));
        }
      }
    }
  }

  grpc::Status Call(int rpc) {
    grpc::ClientContext cctx;
    client_->Prepare(&cctx);
    switch (rpc) {
      case kRetrieve: {
        v1::RetrieveRequest req;
        req.set_bank(plan_.bank);
        Fill(req.mutable_queries(), plan_.batch);
        req.mutable_options()->set_dynamics(plan_.dynamics);
        req.mutable_options()->set_max_steps(static_cast<uint32_t>(plan_.max_steps));
        v1::RetrieveResponse resp;
        return client_->stub()->Retrieve(&cctx, req, &resp);
      }
      case kSample: {
        v1::SampleRequest req;
        req.set_bank(plan_.bank);
        req.set_count(static_cast<uint32_t>(plan_.batch));
        req.set_seed(rng_());
        req.mutable_schedule()->set_steps(static_cast<uint32_t>(plan_.sample_steps));
        v1::SampleResponse resp;
        return client_->stub()->Sample(&cctx, req, &resp);
      }
      case kEnergy: {
        v1::EnergyRequest req;
        req.set_bank(plan_.bank);
        Fill(req.mutable_states(), plan_.batch);
        v1::EnergyResponse resp;
        return client_->stub()->Energy(&cctx, req, &resp);
      }
      case kInfo: {
        v1::GetBankRequest req;
        req.set_name(plan_.bank);
        v1::BankInfo resp;
        return client_->stub()->GetBank(&cctx, req, &resp);
      }
      default: {
        v1::StoreRequest req;
        req.set_bank(plan_.bank);
        Fill(req.mutable_patterns(), plan_.batch);
        v1::StoreResponse resp;
        return client_->stub()->Store(&cctx, req, &resp);
      }
    }
  }

  const LoadPlan& plan_;
  client::EngramClient* client_;
  Clock::time_point start_;
  std::vector<Record>* records_;
  std::mt19937_64 rng_;
  std::normal_distribution<float> gauss_;
  std::discrete_distribution<int> pick_;
  int64_t data_row_;
  double interval_;
  Clock::time_point next_;
};

// What the calls after the warm-up amount to.
struct LoadSummary {
  double elapsed = 0, achieved = 0, mean = 0, max = 0;
  int64_t counted = 0, errors = 0;
  std::vector<int64_t> per_rpc = std::vector<int64_t>(kNumRpcs, 0);
  std::map<std::string, int64_t> codes;
  std::vector<double> percentiles;  // p50, p90, p99, p99.9
  std::vector<double> bounds;       // histogram: 10 us .. 10 s, 3 buckets a decade
  std::vector<int64_t> hist;        // bounds.size() + 1 counts
};

LoadSummary Summarize(const LoadPlan& plan, const std::vector<std::vector<Record>>& records,
                      double elapsed) {
  LoadSummary s;
  s.elapsed = elapsed;
  std::vector<double> lat;
  for (const auto& recs : records) {
    for (const Record& r : recs) {
      if (r.seconds_since_start < plan.warmup) continue;
      ++s.counted;
      ++s.per_rpc[r.rpc];
      s.codes[absl::StatusCodeToString(static_cast<absl::StatusCode>(r.code))]++;
      if (r.code != 0) ++s.errors;
      if (r.code == 0 || plan.include_errors) lat.push_back(r.latency);
    }
  }
  std::sort(lat.begin(), lat.end());
  const double window = std::max(1e-9, elapsed - std::min(plan.warmup, elapsed));
  s.achieved = s.counted / window;
  for (double v : lat) s.mean += v;
  s.mean = lat.empty() ? 0 : s.mean / lat.size();
  for (double p : {50.0, 90.0, 99.0, 99.9}) s.percentiles.push_back(Percentile(lat, p));
  s.max = lat.empty() ? 0 : lat.back();
  for (double b = 1e-5; b <= 10.0 * 1.0001; b *= std::pow(10.0, 1.0 / 3)) s.bounds.push_back(b);
  s.hist.assign(s.bounds.size() + 1, 0);
  for (double v : lat) s.hist[std::lower_bound(s.bounds.begin(), s.bounds.end(), v) - s.bounds.begin()]++;
  return s;
}

void PrintJson(const LoadPlan& plan, const LoadSummary& s) {
  const std::vector<double>& pv = s.percentiles;
  std::string out = absl::StrCat(
      "{\"bank\":\"", plan.bank, "\",\"concurrency\":", plan.concurrency,
      ",\"connections\":", plan.connections, ",\"duration_seconds\":", s.elapsed,
      ",\"warmup_seconds\":", plan.warmup, ",\"calls\":", s.counted, ",\"errors\":", s.errors,
      ",\"target_rate\":", plan.rate, ",\"achieved_rate\":", s.achieved, ",\"calls_by_rpc\":{");
  for (int r = 0; r < kNumRpcs; ++r) {
    absl::StrAppend(&out, r ? "," : "", "\"", kRpcNames[r], "\":", s.per_rpc[r]);
  }
  absl::StrAppend(&out, "},\"codes\":{");
  bool first = true;
  for (auto& [c, k] : s.codes) {
    absl::StrAppend(&out, first ? "" : ",", "\"", c, "\":", k);
    first = false;
  }
  absl::StrAppend(&out, "},\"latency_seconds\":{\"mean\":", s.mean, ",\"p50\":", pv[0],
                  ",\"p90\":", pv[1], ",\"p99\":", pv[2], ",\"p99_9\":", pv[3],
                  ",\"max\":", s.max, "},\"histogram\":[");
  for (size_t b = 0; b < s.hist.size(); ++b) {
    absl::StrAppend(&out, b ? "," : "", "{\"le\":",
                    b < s.bounds.size() ? absl::StrCat(s.bounds[b]) : "\"+Inf\"",
                    ",\"count\":", s.hist[b], "}");
  }
  absl::StrAppend(&out, "]}");
  std::cout << out << "\n";
}

void PrintCsv(const LoadPlan& plan, const LoadSummary& s) {
  const std::vector<double>& pv = s.percentiles;
  std::cout << "calls,errors,duration_s,target_rate,achieved_rate,mean_s,p50_s,p90_s,p99_s,"
               "p99_9_s,max_s\n"
            << absl::StrFormat("%d,%d,%.3f,%.1f,%.1f,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g\n", s.counted,
                               s.errors, s.elapsed, plan.rate, s.achieved, s.mean, pv[0], pv[1],
                               pv[2], pv[3], s.max);
}

void PrintText(const LoadPlan& plan, const LoadSummary& s) {
  const std::vector<double>& pv = s.percentiles;
  std::cout << absl::StrFormat(
      "Summary (bank %s, %d workers over %d connection%s)\n"
      "  calls:      %d in %.2f s (warm-up %.1f s excluded), %d errors\n"
      "  rate:       %.1f calls/s achieved%s\n",
      plan.bank, plan.concurrency, plan.connections, plan.connections == 1 ? "" : "s", s.counted,
      s.elapsed, plan.warmup, s.errors, s.achieved,
      plan.rate > 0 ? absl::StrFormat(" of %.1f target", plan.rate) : " (unbounded)");
  std::cout << "  by RPC:    ";
  for (int r = 0; r < kNumRpcs; ++r) {
    if (s.per_rpc[r]) std::cout << " " << kRpcNames[r] << "=" << s.per_rpc[r];
  }
  std::cout << "\n  by code:   ";
  for (auto& [c, k] : s.codes) std::cout << " " << c << "=" << k;
  std::cout << absl::StrFormat(
      "\n  latency%s: mean %.3f ms  p50 %.3f ms  p90 %.3f ms  p99 %.3f ms  p99.9 %.3f ms  max "
      "%.3f ms\n",
      plan.include_errors ? " (errors included)" : "", s.mean * 1e3, pv[0] * 1e3, pv[1] * 1e3,
      pv[2] * 1e3, pv[3] * 1e3, s.max * 1e3);
  std::cout << "  histogram:\n";
  const int64_t peak = std::max<int64_t>(1, *std::max_element(s.hist.begin(), s.hist.end()));
  for (size_t b = 0; b < s.hist.size(); ++b) {
    if (s.hist[b] == 0) continue;
    const std::string label = b < s.bounds.size()
                                  ? absl::StrFormat("<= %9.3f ms", s.bounds[b] * 1e3)
                                  : std::string("    > 10 s    ");
    std::cout << "    " << label << absl::StrFormat(" %8d ", s.hist[b])
              << std::string(static_cast<size_t>(40.0 * s.hist[b] / peak), '#') << "\n";
  }
}

}  // namespace

absl::Status RunLoad(const Args& args, Context& ctx) {
  ENGRAM_ASSIGN_OR_RETURN(v1::BankInfo info, ctx.client->GetBank(args.positional()[1]));
  ENGRAM_ASSIGN_OR_RETURN(const LoadPlan plan, ParsePlan(args, info));
  std::vector<std::unique_ptr<client::EngramClient>> extra =
      ExtraConnections(args, ctx, plan.connections);
  std::vector<client::EngramClient*> clients = {ctx.client};
  for (auto& c : extra) clients.push_back(c.get());

  std::atomic<int64_t> issued{0}, done{0}, failed{0};
  std::atomic<bool> stop{false};
  std::vector<std::vector<Record>> records(plan.concurrency);
  const auto start = Clock::now();
  std::vector<std::thread> threads;
  for (int w = 0; w < plan.concurrency; ++w) {
    threads.emplace_back([&, w] {
      LoadWorker(plan, w, clients[w % clients.size()], start, &records[w])
          .Run(issued, done, failed, stop);
    });
  }
  // Progress line and the duration limit.
  while (!stop) {
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    const double el = std::chrono::duration<double>(Clock::now() - start).count();
    if (plan.format == "text") {
      std::cerr << absl::StrFormat("\r%6.1fs  %lld calls  %lld errors  %.0f calls/s   ", el,
                                   static_cast<long long>(done.load()),
                                   static_cast<long long>(failed.load()), done.load() / el);
    }
    if ((plan.duration > 0 && el >= plan.duration) || (plan.total > 0 && done.load() >= plan.total)) {
      stop = true;
    }
  }
  for (auto& t : threads) t.join();
  if (plan.format == "text") std::cerr << "\n";
  const LoadSummary summary =
      Summarize(plan, records, std::chrono::duration<double>(Clock::now() - start).count());
  if (plan.format == "json") {
    PrintJson(plan, summary);
  } else if (plan.format == "csv") {
    PrintCsv(plan, summary);
  } else {
    PrintText(plan, summary);
  }
  return absl::OkStatus();
}

}  // namespace engram::cli
