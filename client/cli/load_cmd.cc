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

enum Rpc { kRetrieve, kSample, kEnergy, kStore, kNumRpcs };
const char* kRpcNames[] = {"retrieve", "sample", "energy", "store"};

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
          "--mix: unknown RPC '", name, "' (retrieve, sample, energy, store)"));
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

absl::Status RunLoad(const Args& args, Context& ctx) {
  const auto& pos = args.positional();
  const std::string bank = pos[1];
  ENGRAM_ASSIGN_OR_RETURN(v1::BankInfo info, ctx.client->GetBank(bank));
  const int n = static_cast<int>(info.dim());
  const bool bipolar = info.kind() == v1::STATE_KIND_BIPOLAR;
  ENGRAM_ASSIGN_OR_RETURN(int64_t concurrency, args.GetInt("concurrency", 8));
  ENGRAM_ASSIGN_OR_RETURN(int64_t connections, args.GetInt("connections", 1));
  ENGRAM_ASSIGN_OR_RETURN(double rate, args.GetDouble("rate", 0));
  ENGRAM_ASSIGN_OR_RETURN(double duration, args.GetDouble("duration", 0));
  ENGRAM_ASSIGN_OR_RETURN(int64_t total, args.GetInt("total", 0));
  ENGRAM_ASSIGN_OR_RETURN(double warmup, args.GetDouble("warmup", 0));
  ENGRAM_ASSIGN_OR_RETURN(int64_t batch, args.GetInt("batch", 1));
  ENGRAM_ASSIGN_OR_RETURN(int64_t seed, args.GetInt("seed", 1));
  ENGRAM_ASSIGN_OR_RETURN(int64_t sample_steps, args.GetInt("sample-steps", 16));
  ENGRAM_ASSIGN_OR_RETURN(int64_t max_steps, args.GetInt("max-steps", 0));
  ENGRAM_ASSIGN_OR_RETURN(std::vector<double> mix, ParseMix(args.Get("mix", "retrieve")));
  ENGRAM_ASSIGN_OR_RETURN(v1::Dynamics dynamics, ParseDynamics(args.Get("dynamics", "sync")));
  const std::string format = args.Get("format", "text");
  if (format != "text" && format != "json" && format != "csv") {
    return absl::InvalidArgumentError("--format must be text, json or csv");
  }
  if (concurrency < 1 || concurrency > 4096 || connections < 1 || connections > 256 ||
      batch < 1 || rate < 0 || duration < 0 || total < 0 || warmup < 0 || sample_steps < 1) {
    return absl::InvalidArgumentError(
        "need 1 <= --concurrency <= 4096, 1 <= --connections <= 256, --batch >= 1 and "
        "non-negative --rate, --duration, --total, --warmup");
  }
  if (duration == 0 && total == 0) duration = 10;
  client::Matrix data;
  if (args.Has("data")) {
    ENGRAM_ASSIGN_OR_RETURN(data, LoadData(args.Get("data"), args));
    if (data.cols != n) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--data rows have ", data.cols, " values; the bank's dimension is ", n));
    }
  }

  // Channels: the first is the client's; others are fresh connections.
  std::vector<std::unique_ptr<client::EngramClient>> extra;
  std::vector<client::EngramClient*> clients = {ctx.client};
  for (int64_t c = 1; c < connections; ++c) {
    client::ClientOptions o = ctx.client->options();
    grpc::ChannelArguments a;
    a.SetInt("grpc.channel_id", static_cast<int>(c));  // a connection of its own
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
    clients.push_back(extra.back().get());
  }

  std::atomic<int64_t> issued{0}, done{0}, failed{0};
  std::atomic<bool> stop{false};
  std::vector<std::vector<Record>> records(concurrency);
  const auto start = Clock::now();
  const double per_worker_interval = rate > 0 ? concurrency / rate : 0.0;

  auto worker = [&](int w) {
    std::mt19937_64 rng(static_cast<uint64_t>(seed) * 1000003 + w);
    std::normal_distribution<float> g;
    std::discrete_distribution<int> pick(mix.begin(), mix.end());
    client::EngramClient* cl = clients[w % clients.size()];
    auto next = start + std::chrono::duration_cast<Clock::duration>(
                            std::chrono::duration<double>(per_worker_interval * w / concurrency));
    int64_t data_row = w;
    auto fill = [&](google::protobuf::RepeatedField<float>* out, int64_t rows) {
      for (int64_t r = 0; r < rows; ++r) {
        if (data.rows > 0) {
          const float* src = data.row(data_row++ % data.rows);
          out->Add(src, src + n);
        } else {
          for (int i = 0; i < n; ++i) out->Add(bipolar ? ((rng() & 1) ? 1.f : -1.f) : g(rng));
        }
      }
    };
    while (!stop) {
      if (total > 0 && issued.fetch_add(1) >= total) break;
      if (per_worker_interval > 0) {
        std::this_thread::sleep_until(next);
        next += std::chrono::duration_cast<Clock::duration>(
            std::chrono::duration<double>(per_worker_interval));
      }
      const int rpc = pick(rng);
      grpc::ClientContext cctx;
      cl->Prepare(&cctx);
      grpc::Status s;
      const auto t0 = Clock::now();
      switch (rpc) {
        case kRetrieve: {
          v1::RetrieveRequest req;
          req.set_bank(bank);
          fill(req.mutable_queries(), batch);
          req.mutable_options()->set_dynamics(dynamics);
          req.mutable_options()->set_max_steps(static_cast<uint32_t>(max_steps));
          v1::RetrieveResponse resp;
          s = cl->stub()->Retrieve(&cctx, req, &resp);
          break;
        }
        case kSample: {
          v1::SampleRequest req;
          req.set_bank(bank);
          req.set_count(static_cast<uint32_t>(batch));
          req.set_seed(rng());
          req.mutable_schedule()->set_steps(static_cast<uint32_t>(sample_steps));
          v1::SampleResponse resp;
          s = cl->stub()->Sample(&cctx, req, &resp);
          break;
        }
        case kEnergy: {
          v1::EnergyRequest req;
          req.set_bank(bank);
          fill(req.mutable_states(), batch);
          v1::EnergyResponse resp;
          s = cl->stub()->Energy(&cctx, req, &resp);
          break;
        }
        case kStore: {
          v1::StoreRequest req;
          req.set_bank(bank);
          fill(req.mutable_patterns(), batch);
          v1::StoreResponse resp;
          s = cl->stub()->Store(&cctx, req, &resp);
          break;
        }
      }
      const auto t1 = Clock::now();
      records[w].push_back({std::chrono::duration<double>(t0 - start).count(),
                            std::chrono::duration<double>(t1 - t0).count(), rpc,
                            static_cast<int>(s.error_code())});
      ++done;
      if (!s.ok()) ++failed;
    }
  };
  std::vector<std::thread> threads;
  for (int w = 0; w < concurrency; ++w) threads.emplace_back(worker, w);
  // Progress line and the duration limit.
  while (true) {
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    const double el = std::chrono::duration<double>(Clock::now() - start).count();
    if (format == "text") {
      std::cerr << absl::StrFormat("\r%6.1fs  %lld calls  %lld errors  %.0f calls/s   ", el,
                                   static_cast<long long>(done.load()),
                                   static_cast<long long>(failed.load()), done.load() / el);
    }
    if (duration > 0 && el >= duration) stop = true;
    if (total > 0 && done.load() >= total) stop = true;
    if (stop) break;
  }
  for (auto& t : threads) t.join();
  if (format == "text") std::cerr << "\n";
  const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();

  // Aggregate (after warm-up).
  std::vector<double> lat;
  std::map<std::string, int64_t> codes;
  std::vector<int64_t> per_rpc(kNumRpcs, 0);
  int64_t counted = 0, errors = 0;
  for (const auto& recs : records) {
    for (const Record& r : recs) {
      if (r.seconds_since_start < warmup) continue;
      ++counted;
      ++per_rpc[r.rpc];
      codes[absl::StatusCodeToString(static_cast<absl::StatusCode>(r.code))]++;
      if (r.code != 0) ++errors;
      if (r.code == 0 || args.Has("include-errors")) lat.push_back(r.latency);
    }
  }
  std::sort(lat.begin(), lat.end());
  const double window = std::max(1e-9, elapsed - std::min(warmup, elapsed));
  const double achieved = counted / window;
  double mean = 0;
  for (double v : lat) mean += v;
  mean = lat.empty() ? 0 : mean / lat.size();
  const std::vector<double> ps = {50, 90, 99, 99.9};
  std::vector<double> pv;
  for (double p : ps) pv.push_back(Percentile(lat, p));
  const double maxv = lat.empty() ? 0 : lat.back();
  // Histogram: 10 us .. 10 s, 3 buckets per decade.
  std::vector<double> bounds;
  for (double b = 1e-5; b <= 10.0 * 1.0001; b *= std::pow(10.0, 1.0 / 3)) bounds.push_back(b);
  std::vector<int64_t> hist(bounds.size() + 1, 0);
  for (double v : lat) hist[std::lower_bound(bounds.begin(), bounds.end(), v) - bounds.begin()]++;

  if (format == "json") {
    std::string out = absl::StrCat(
        "{\"bank\":\"", bank, "\",\"concurrency\":", concurrency, ",\"connections\":", connections,
        ",\"duration_seconds\":", elapsed, ",\"warmup_seconds\":", warmup,
        ",\"calls\":", counted, ",\"errors\":", errors, ",\"target_rate\":", rate,
        ",\"achieved_rate\":", achieved, ",\"calls_by_rpc\":{");
    for (int r = 0; r < kNumRpcs; ++r) absl::StrAppend(&out, r ? "," : "", "\"", kRpcNames[r], "\":", per_rpc[r]);
    absl::StrAppend(&out, "},\"codes\":{");
    bool first = true;
    for (auto& [c, k] : codes) {
      absl::StrAppend(&out, first ? "" : ",", "\"", c, "\":", k);
      first = false;
    }
    absl::StrAppend(&out, "},\"latency_seconds\":{\"mean\":", mean, ",\"p50\":", pv[0], ",\"p90\":", pv[1],
                    ",\"p99\":", pv[2], ",\"p99_9\":", pv[3], ",\"max\":", maxv, "},\"histogram\":[");
    for (size_t b = 0; b < hist.size(); ++b) {
      absl::StrAppend(&out, b ? "," : "", "{\"le\":", b < bounds.size() ? absl::StrCat(bounds[b]) : "\"+Inf\"",
                      ",\"count\":", hist[b], "}");
    }
    absl::StrAppend(&out, "]}");
    std::cout << out << "\n";
  } else if (format == "csv") {
    std::cout << "calls,errors,duration_s,target_rate,achieved_rate,mean_s,p50_s,p90_s,p99_s,p99_9_s,max_s\n"
              << absl::StrFormat("%d,%d,%.3f,%.1f,%.1f,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g\n", counted, errors,
                                 elapsed, rate, achieved, mean, pv[0], pv[1], pv[2], pv[3], maxv);
  } else {
    std::cout << absl::StrFormat(
        "Summary (bank %s, %d workers over %d connection%s)\n"
        "  calls:      %d in %.2f s (warm-up %.1f s excluded), %d errors\n"
        "  rate:       %.1f calls/s achieved%s\n",
        bank, concurrency, connections, connections == 1 ? "" : "s", counted, elapsed, warmup, errors,
        achieved, rate > 0 ? absl::StrFormat(" of %.1f target", rate) : " (unbounded)");
    std::cout << "  by RPC:    ";
    for (int r = 0; r < kNumRpcs; ++r) {
      if (per_rpc[r]) std::cout << " " << kRpcNames[r] << "=" << per_rpc[r];
    }
    std::cout << "\n  by code:   ";
    for (auto& [c, k] : codes) std::cout << " " << c << "=" << k;
    std::cout << absl::StrFormat(
        "\n  latency%s: mean %.3f ms  p50 %.3f ms  p90 %.3f ms  p99 %.3f ms  p99.9 %.3f ms  max %.3f ms\n",
        args.Has("include-errors") ? " (errors included)" : "", mean * 1e3, pv[0] * 1e3, pv[1] * 1e3,
        pv[2] * 1e3, pv[3] * 1e3, maxv * 1e3);
    std::cout << "  histogram:\n";
    const int64_t peak = std::max<int64_t>(1, *std::max_element(hist.begin(), hist.end()));
    for (size_t b = 0; b < hist.size(); ++b) {
      if (hist[b] == 0) continue;
      const std::string label = b < bounds.size() ? absl::StrFormat("<= %9.3f ms", bounds[b] * 1e3)
                                                  : std::string("    > 10 s    ");
      std::cout << "    " << label << absl::StrFormat(" %8d ", hist[b])
                << std::string(static_cast<size_t>(40.0 * hist[b] / peak), '#') << "\n";
    }
  }
  return absl::OkStatus();
}

}  // namespace engram::cli
