// libFuzzer target over MemoryService: bytes -> request protobufs -> the real
// handlers (decode, validate, core, convert, status mapping) on a fresh
// registry per input.
//
// Input format: up to kMaxRecords records, each
//   [1 byte: RPC selector][2 bytes little-endian: length L][L bytes: request]
// The request bytes are parsed as that RPC's request message (a parse
// failure is the decoding path's answer, as gRPC would give INTERNAL /
// INVALID_ARGUMENT before the handler; the record is skipped). A record
// truncated by the end of the input takes what is left.
//
// Every input starts from the same state: an in-memory SQLite registry with
// two banks ("bip": bipolar, N = 16, polynomial; "cont": continuous, N = 8,
// LSE), six patterns each with ids 1..6, a 3 KiB memory budget and batches
// of at most 16. Parameters whose cost grows without bound (dimension,
// steps, sweeps) are capped when they lie inside the accepted range, so an
// input runs in well under a millisecond; values outside the range are kept
// and must be rejected with INVALID_ARGUMENT.
//
// The target aborts on a crash or sanitizer report (libFuzzer's own check)
// and on any UNKNOWN, INTERNAL or DATA_LOSS status: every hostile input must
// get a documented client-side code.
//
//   tests/fuzz/run_fuzz.sh build-fuzz 60      # bounded run (CI)
//   build-fuzz/tests/fuzz/service_fuzz tests/fuzz/corpus -runs=0   # replay
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>

#include <unistd.h>

#include <google/protobuf/stubs/logging.h>
#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "engram/core/bank.h"
#include "engram/core/dynamics.h"
#include "engram/core/registry.h"
#include "engram/core/schedule.h"
#include "engram/core/storage.h"
#include "engram/v1/engram.pb.h"
#include "server/metrics.h"
#include "server/service_impl.h"

namespace engram::server {
namespace {

constexpr int kMaxRecords = 8;
constexpr uint32_t kDimCap = 256;
constexpr uint32_t kStepCap = 64;
constexpr uint32_t kScheduleCap = 24;
constexpr uint32_t kInnerCap = 6;
constexpr int64_t kMaxBatch = 16;
constexpr uint64_t kMemoryBudget = 3 << 10;

enum Rpc : uint8_t {
  kCreateBank,
  kGetBank,
  kListBanks,
  kDeleteBank,
  kStore,
  kDeletePatterns,
  kGetPatterns,
  kRetrieve,
  kEnergy,
  kSample,
  kBackup,
  kSampleStream,
  kAuth,
  kRpcCount
};

constexpr const char* kRpcNames[kRpcCount] = {
    "CreateBank", "GetBank",  "ListBanks", "DeleteBank", "Store", "DeletePatterns",
    "GetPatterns", "Retrieve", "Energy",   "Sample",     "Backup", "SampleStream", "Auth"};

// Calls per RPC and status code; printed at exit when ENGRAM_FUZZ_STATS is
// set (e.g. while replaying a corpus with -runs=0).
uint64_t code_counts[kRpcCount][17];
uint64_t unparsed[kRpcCount];

void PrintCodeCounts() {
  std::fprintf(stderr, "calls by RPC and code:\n");
  for (int r = 0; r < kRpcCount; ++r) {
    std::fprintf(stderr, "  %-15s unparsable=%llu", kRpcNames[r],
                 static_cast<unsigned long long>(unparsed[r]));
    for (int c = 0; c < 17; ++c) {
      if (code_counts[r][c] > 0) {
        std::fprintf(stderr, " %s=%llu", absl::StatusCodeToString(static_cast<absl::StatusCode>(c)).c_str(),
                     static_cast<unsigned long long>(code_counts[r][c]));
      }
    }
    std::fprintf(stderr, "\n");
  }
}

// Codes a hostile request may get; anything else is a server bug.
void CheckStatus(const grpc::Status& s, int rpc) {
  const int code = static_cast<int>(s.error_code());
  if (code >= 0 && code < 17) ++code_counts[rpc][code];
  switch (s.error_code()) {
    case grpc::StatusCode::UNKNOWN:
    case grpc::StatusCode::INTERNAL:
    case grpc::StatusCode::DATA_LOSS:
      std::fprintf(stderr, "rpc %d returned code %d: %s\n", rpc,
                   static_cast<int>(s.error_code()), s.error_message().c_str());
      std::abort();
    default:
      break;
  }
}

void Cap(uint32_t cap, uint32_t limit, uint32_t value, const std::function<void(uint32_t)>& set) {
  if (value > cap && value <= limit) set(cap);
}

void CapCost(v1::CreateBankRequest* r) {
  Cap(kDimCap, core::kMaxDim, r->dim(), [&](uint32_t v) { r->set_dim(v); });
  Cap(kDimCap, core::kMaxDim, r->value_dim(), [&](uint32_t v) { r->set_value_dim(v); });
}

void CapCost(v1::RetrieveRequest* r) {
  auto* o = r->mutable_options();
  Cap(kStepCap, core::kMaxSteps, o->max_steps(), [&](uint32_t v) { o->set_max_steps(v); });
  if (o->max_steps() == 0) o->set_max_steps(kStepCap);
}

void CapCost(v1::SampleRequest* r) {
  auto* s = r->mutable_schedule();
  if (s->steps() == 0) s->set_steps(kScheduleCap);
  Cap(kScheduleCap, core::kMaxSampleSteps, s->steps(), [&](uint32_t v) { s->set_steps(v); });
  if (r->langevin_steps() == 0) r->set_langevin_steps(2);
  Cap(kInnerCap, core::kMaxSampleSteps, r->langevin_steps(),
      [&](uint32_t v) { r->set_langevin_steps(v); });
  Cap(kInnerCap, core::kMaxSampleSteps, r->am_iterations(),
      [&](uint32_t v) { r->set_am_iterations(v); });
}

class Fixture {
 public:
  Fixture() {
    // Parse failures are expected here; protobuf's log lines would drown
    // libFuzzer's output.
    google::protobuf::SetLogHandler(nullptr);
    if (std::getenv("ENGRAM_FUZZ_STATS") != nullptr) std::atexit(PrintCodeCounts);
    backup_dir_ = std::filesystem::temp_directory_path() /
                  ("engram_fuzz_backups_" + std::to_string(::getpid()));
    std::filesystem::create_directories(backup_dir_);
  }

  void RunOne(const uint8_t* data, size_t size) {
    auto storage = core::OpenSqliteStorage(":memory:");
    if (!storage.ok()) std::abort();
    core::RegistryOptions ropts;
    ropts.memory_budget_bytes = kMemoryBudget;
    auto registry = core::BankRegistry::Open(*std::move(storage), ropts);
    if (!registry.ok()) std::abort();
    ServiceLimits limits;
    limits.max_batch = kMaxBatch;
    limits.backup_dir = backup_dir_.string();
    MemoryServiceImpl service(registry->get(), std::make_shared<Metrics>(), limits);
    Preload(service);

    for (int rec = 0; rec < kMaxRecords && size >= 1; ++rec) {
      const int rpc = data[0] % kRpcCount;
      size_t len = size >= 3 ? (data[1] | (size_t{data[2]} << 8)) : 0;
      const size_t header = std::min<size_t>(size, 3);
      data += header;
      size -= header;
      len = std::min(len, size);
      Call(service, rpc, data, len);
      data += len;
      size -= len;
    }
    std::error_code ec;
    for (const auto& f : std::filesystem::directory_iterator(backup_dir_, ec)) {
      std::filesystem::remove(f.path(), ec);
    }
  }

 private:
  template <typename Req>
  static bool Parse(Req* req, const uint8_t* data, size_t len) {
    return req->ParseFromArray(data, static_cast<int>(len));
  }

  static void Preload(MemoryServiceImpl& service) {
    struct BankSeed {
      const char* name;
      uint32_t dim;
      v1::StateKind kind;
      v1::EnergyFamily family;
    };
    const BankSeed seeds[] = {
        {"bip", 16, v1::STATE_KIND_BIPOLAR, v1::ENERGY_FAMILY_POLYNOMIAL},
        {"cont", 8, v1::STATE_KIND_CONTINUOUS, v1::ENERGY_FAMILY_LSE},
    };
    for (const BankSeed& b : seeds) {
      v1::CreateBankRequest create;
      create.set_name(b.name);
      create.set_dim(b.dim);
      create.set_kind(b.kind);
      create.mutable_energy()->set_family(b.family);
      v1::BankInfo info;
      if (!service.CreateBankNow(nullptr, &create, &info).ok()) std::abort();
      v1::StoreRequest store;
      store.set_bank(b.name);
      for (uint32_t k = 0; k < 6; ++k) {
        store.add_ids(k + 1);
        store.add_payloads("p" + std::to_string(k + 1));
        for (uint32_t d = 0; d < b.dim; ++d) {
          const bool plus = ((k * 7 + d * 3 + (k * d) % 5) % 3) != 0;
          store.add_patterns(b.kind == v1::STATE_KIND_BIPOLAR ? (plus ? 1.f : -1.f)
                                                              : 0.25f * (plus ? k : -d));
        }
      }
      v1::StoreResponse stored;
      if (!service.StoreNow(nullptr, &store, &stored).ok()) std::abort();
    }
  }

  static void Unparsed(int rpc) { ++unparsed[rpc]; }

  void Call(MemoryServiceImpl& service, int rpc, const uint8_t* data, size_t len) {
    grpc::Status s;
    switch (rpc) {
      case kCreateBank: {
        v1::CreateBankRequest req;
        v1::BankInfo resp;
        if (!Parse(&req, data, len)) return Unparsed(rpc);
        CapCost(&req);
        s = service.CreateBankNow(nullptr, &req, &resp);
        break;
      }
      case kGetBank: {
        v1::GetBankRequest req;
        v1::BankInfo resp;
        if (!Parse(&req, data, len)) return Unparsed(rpc);
        s = service.GetBankNow(nullptr, &req, &resp);
        break;
      }
      case kListBanks: {
        v1::ListBanksRequest req;
        v1::ListBanksResponse resp;
        if (!Parse(&req, data, len)) return Unparsed(rpc);
        s = service.ListBanksNow(nullptr, &req, &resp);
        break;
      }
      case kDeleteBank: {
        v1::DeleteBankRequest req;
        v1::DeleteBankResponse resp;
        if (!Parse(&req, data, len)) return Unparsed(rpc);
        s = service.DeleteBankNow(nullptr, &req, &resp);
        break;
      }
      case kStore: {
        v1::StoreRequest req;
        v1::StoreResponse resp;
        if (!Parse(&req, data, len)) return Unparsed(rpc);
        s = service.StoreNow(nullptr, &req, &resp);
        if (s.ok()) CheckStoredBack(service, req, resp);
        break;
      }
      case kDeletePatterns: {
        v1::DeletePatternsRequest req;
        v1::DeletePatternsResponse resp;
        if (!Parse(&req, data, len)) return Unparsed(rpc);
        s = service.DeletePatternsNow(nullptr, &req, &resp);
        break;
      }
      case kGetPatterns: {
        v1::GetPatternsRequest req;
        v1::GetPatternsResponse resp;
        if (!Parse(&req, data, len)) return Unparsed(rpc);
        s = service.GetPatternsNow(nullptr, &req, &resp);
        if (s.ok() && req.ids_size() == 0) CheckPage(service, req, resp);
        break;
      }
      case kRetrieve: {
        v1::RetrieveRequest req;
        v1::RetrieveResponse resp;
        if (!Parse(&req, data, len)) return Unparsed(rpc);
        CapCost(&req);
        s = service.RetrieveNow(nullptr, &req, &resp);
        break;
      }
      case kEnergy: {
        v1::EnergyRequest req;
        v1::EnergyResponse resp;
        if (!Parse(&req, data, len)) return Unparsed(rpc);
        s = service.EnergyNow(nullptr, &req, &resp);
        break;
      }
      case kSample: {
        v1::SampleRequest req;
        v1::SampleResponse resp;
        if (!Parse(&req, data, len)) return Unparsed(rpc);
        CapCost(&req);
        s = service.SampleNow(nullptr, &req, &resp);
        break;
      }
      case kSampleStream: {
        // A reader that takes `seed % 4` frames and then stops: the sampler
        // must end RESOURCE_EXHAUSTED, never offer a frame after a refusal.
        v1::SampleRequest req;
        v1::SampleResponse resp;
        if (!Parse(&req, data, len)) return Unparsed(rpc);
        CapCost(&req);
        const uint64_t room = req.seed() % 4;
        uint64_t offered = 0;
        bool refused = false;
        s = service.SampleNow(nullptr, &req, &resp, [&](v1::SampleFrame frame) {
          if (refused) {
            std::fprintf(stderr, "SampleStream offered a frame after a refusal\n");
            std::abort();
          }
          refused = ++offered > room;
          return !refused;
        });
        if (refused && s.error_code() != grpc::StatusCode::RESOURCE_EXHAUSTED) {
          std::fprintf(stderr, "a refused stream ended with code %d\n", s.error_code());
          std::abort();
        }
        break;
      }
      case kAuth: {
        // The bearer check: OK exactly for the configured token.
        const std::string_view header(reinterpret_cast<const char*>(data), len);
        const bool ok = AuthorizeBearer("fuzz-token", header).ok();
        if (ok != (header == "Bearer fuzz-token")) {
          std::fprintf(stderr, "bearer check is %d for a header of %zu bytes\n", ok, len);
          std::abort();
        }
        if (!AuthorizeBearer("", header).ok()) std::abort();
        break;
      }
      case kBackup: {
        v1::BackupRequest req;
        v1::BackupResponse resp;
        if (!Parse(&req, data, len)) return Unparsed(rpc);
        s = service.BackupNow(nullptr, &req, &resp);
        break;
      }
    }
    CheckStatus(s, rpc);
  }

  // A page holds exactly the rows [min(start, K), min(start + size, K)) of
  // the bank: never rows past the end, whatever page_start is.
  static void CheckPage(MemoryServiceImpl& service, const v1::GetPatternsRequest& req,
                        const v1::GetPatternsResponse& resp) {
    v1::GetBankRequest get;
    get.set_name(req.bank());
    v1::BankInfo info;
    if (!service.GetBankNow(nullptr, &get, &info).ok()) return;
    const uint64_t k = info.patterns();
    const uint64_t size = req.page_size() == 0 ? 1000 : req.page_size();
    const uint64_t start = std::min<uint64_t>(req.page_start(), k);
    const uint64_t want = std::min<uint64_t>(size, k - start);
    if (static_cast<uint64_t>(resp.ids_size()) != want || resp.next_page_start() != start + want ||
        static_cast<uint64_t>(resp.patterns_size()) != want * resp.dim()) {
      std::fprintf(stderr, "page at %llu of %llu rows holds %d ids\n",
                   static_cast<unsigned long long>(req.page_start()),
                   static_cast<unsigned long long>(k), resp.ids_size());
      std::abort();
    }
  }

  // An acknowledged Store reads back bit for bit.
  static void CheckStoredBack(MemoryServiceImpl& service, const v1::StoreRequest& req,
                              const v1::StoreResponse& resp) {
    v1::GetPatternsRequest get;
    get.set_bank(req.bank());
    get.mutable_ids()->Add(resp.ids().begin(), resp.ids().end());
    v1::GetPatternsResponse got;
    grpc::Status s = service.GetPatternsNow(nullptr, &get, &got);
    if (!s.ok() || got.patterns_size() != req.patterns_size()) {
      std::fprintf(stderr, "stored batch does not read back: %s\n", s.error_message().c_str());
      std::abort();
    }
    if (std::memcmp(got.patterns().data(), req.patterns().data(),
                    sizeof(float) * req.patterns_size()) != 0) {
      std::fprintf(stderr, "stored batch reads back different bits\n");
      std::abort();
    }
    if (got.values_size() != req.values_size() ||
        (req.values_size() > 0 && std::memcmp(got.values().data(), req.values().data(),
                                              sizeof(float) * req.values_size()) != 0)) {
      std::fprintf(stderr, "stored values read back different bits\n");
      std::abort();
    }
    for (int i = 0; i < req.labels_size(); ++i) {
      const v1::Labels &want = req.labels(i), &have = got.labels(i);
      if (want.strings().size() != have.strings().size() ||
          want.ints().size() != have.ints().size()) {
        std::fprintf(stderr, "stored labels of pattern %d read back different\n", i);
        std::abort();
      }
      for (const auto& [k, v] : want.strings()) {
        auto it = have.strings().find(k);
        if (it == have.strings().end() || it->second != v) std::abort();
      }
      for (const auto& [k, v] : want.ints()) {
        auto it = have.ints().find(k);
        if (it == have.ints().end() || it->second != v) std::abort();
      }
    }
  }

  std::filesystem::path backup_dir_;
};

}  // namespace
}  // namespace engram::server

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static auto* fixture = new engram::server::Fixture();
  fixture->RunOne(data, size);
  return 0;
}
