#include "server/router.h"

#include "server/write_log.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <functional>
#include <optional>
#include <random>
#include <thread>
#include <utility>

#include <grpc/grpc.h>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "engram/core/dynamics.h"
#include "engram/core/energy.h"
#include "engram/core/novelty.h"
#include "engram/core/partials.h"
#include "engram/core/sampler.h"
#include "engram/core/status_macros.h"
#include "server/convert.h"
#include "server/status_mapping.h"
#include "server/write_log.h"

namespace engram::server {
namespace {


core::StepPartial PartialFromProto(const shard::v1::Partial& p) {
  core::StepPartial out;
  out.log_domain = p.log_domain();
  out.log_scale = p.log_scale();
  out.scale = p.scale();
  out.wsum = p.wsum();
  out.hsum = p.hsum();
  out.energy_terms = p.energy_terms();
  out.rows = p.rows();
  out.sq_x = p.sq_x();
  out.sum.assign(p.sum().begin(), p.sum().end());
  out.value.assign(p.value().begin(), p.value().end());
  out.value_log_norm = p.value_log_norm();
  // An unknown form (a newer shard) merges as no other: MergeStepPartials
  // refuses partials of different forms.
  out.form = p.form() >= 0 && p.form() <= static_cast<int>(core::PartialForm::kEntmax15)
                 ? static_cast<core::PartialForm>(p.form())
                 : core::PartialForm::kSums;
  out.top = p.top();
  out.candidates.assign(p.candidates().begin(), p.candidates().end());
  out.sign_sum.assign(p.sign_sum().begin(), p.sign_sum().end());
  return out;
}

// Checks a packed batch of vectors against dimension `dim` as a node does;
// returns B.
absl::StatusOr<int64_t> CheckVectors(const google::protobuf::RepeatedField<float>& v, int dim,
                                     const char* field, bool bipolar) {
  if (v.empty()) return absl::InvalidArgumentError(absl::StrCat(field, " must not be empty"));
  if (dim <= 0 || v.size() % dim != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, " has ", v.size(), " floats, not a multiple of the bank's dimension ", dim));
  }
  for (int i = 0; i < v.size(); ++i) {
    if (!std::isfinite(v[i])) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, " vector ", i / dim, " coordinate ", i % dim, " is not finite"));
    }
    if (bipolar && v[i] != 1.f && v[i] != -1.f) {
      return absl::InvalidArgumentError(absl::StrCat(
          "bank is bipolar but ", field, " vector ", i / dim, " coordinate ", i % dim, " is ",
          v[i], " (expected +1 or -1)"));
    }
  }
  return v.size() / dim;
}

// splitmix64's finaliser: a fixed, well-mixed hash of an id.
uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// What makes two shards' banks of one name the same bank.
std::string SpecOf(const v1::BankInfo& b) {
  v1::BankInfo spec;
  spec.set_dim(b.dim());
  spec.set_kind(b.kind());
  *spec.mutable_energy() = b.energy();
  spec.set_precision(b.precision());
  spec.set_value_dim(b.value_dim());
  spec.set_ttl_seconds(b.ttl_seconds());
  spec.set_decay_half_life_seconds(b.decay_half_life_seconds());
  return spec.ShortDebugString();
}


}  // namespace

int ShardOf(uint64_t id, int shards) {
  return static_cast<int>(Mix(id) % static_cast<uint64_t>(shards));
}

absl::StatusOr<std::vector<std::string>> ParseShardList(const std::string& flag) {
  std::vector<std::string> out;
  const size_t open = flag.find("{0..");
  if (open != std::string::npos) {
    const size_t close = flag.find('}', open);
    int last = -1;
    if (close == std::string::npos ||
        !absl::SimpleAtoi(flag.substr(open + 4, close - open - 4), &last) || last < 0 ||
        last > 4095) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--shards '", flag, "': expected name-{0..N}.service:port with 0 <= N < 4096"));
    }
    for (int i = 0; i <= last; ++i) {
      out.push_back(absl::StrCat(flag.substr(0, open), i, flag.substr(close + 1)));
    }
    return out;
  }
  for (absl::string_view s : absl::StrSplit(flag, ',', absl::SkipWhitespace())) {
    std::string shard(absl::StripAsciiWhitespace(s));
    // "ip:port|ip:port|...": the replicas of one shard, as one target.
    if (shard.find('|') != std::string::npos) {
      shard = absl::StrCat("ipv4:", absl::StrJoin(absl::StrSplit(shard, '|'), ","));
    }
    out.push_back(std::move(shard));
  }
  if (out.empty()) return absl::InvalidArgumentError("--shards names no shard");
  return out;
}

// One Steps stream to every shard for one call, opened on the first Step.
class RouterService::StepStreams {
 public:
  // The streams carry `ctx`'s deadline, cancellation and authorization;
  // with a null `ctx`, the deadline `detached_until` and the authorization
  // header `authorization` (for a batch of several calls, which no one
  // caller may cancel).
  StepStreams(RouterService* router, grpc::ServerContext* ctx, shard::v1::StepRequest first,
              std::chrono::system_clock::time_point detached_until = {},
              std::string authorization = {})
      : router_(router),
        ctx_(ctx),
        first_(std::move(first)),
        detached_until_(detached_until),
        authorization_(std::move(authorization)) {}
  ~StepStreams() {
    for (size_t i = 0; i < streams_.size(); ++i) {
      if (streams_[i] == nullptr) continue;
      // After a failure elsewhere the shard may be mid-step: cancel it.
      // Otherwise its stream ends as the router's writes do.
      if (failed_) contexts_[i]->TryCancel();
      streams_[i]->WritesDone();
      const grpc::Status end = streams_[i]->Finish();
      // A stream the router cancelled is not counted against its shard.
      if (!failed_) (void)router_->FromShard(static_cast<int>(i), end);
    }
  }

  // The merged partial of each of `b` states x (b x dim) over every shard,
  // with `with_nearest` each state's nearest memory (unset when no shard
  // holds a passing row), and with `drives` each state's merged bipolar
  // drive partial.
  absl::Status Step(const float* x, int64_t b, int dim, bool with_sum, bool with_value,
                    bool with_nearest, std::vector<core::StepPartial>* merged,
                    std::vector<v1::Memory>* nearest, std::vector<double>* nearest_norms = nullptr,
                    double level_beta = 0.0, std::vector<core::StepPartial>* drives = nullptr) {
    // A failed stream stays failed: later steps get the same error.
    all_current_ = false;
    if (!failure_.ok()) return failure_;
    ++requests_;
    return StepFrom(Open(), x, b, dim, with_sum, with_value, with_nearest, merged, nearest,
                    nearest_norms, level_beta, drives);
  }

  // The TINYBRAIN memory layer's merged partial at each of b visible states
  // (b x dim), started (`start`) or moved on, and each state's largest
  // memory step from there over every shard.
  absl::Status TinyBrainStep(const float* x, int64_t b, int dim, bool start, double rh,
                             std::vector<core::StepPartial>* merged,
                             std::vector<double>* step_max) {
    if (!failure_.ok()) return failure_;
    shard::v1::StepRequest req = Open();
    req.mutable_states()->Add(x, x + b * dim);
    req.mutable_tinybrain()->set_start(start);
    req.mutable_tinybrain()->set_rh(rh);
    std::vector<shard::v1::StepReply> replies;
    ENGRAM_RETURN_IF_ERROR(Exchange(req, b, dim, false, &replies));
    const int s = router_->shards();
    merged->resize(b);
    step_max->assign(b, 0.0);
    std::vector<core::StepPartial> parts(s);
    for (int64_t j = 0; j < b; ++j) {
      for (int i = 0; i < s; ++i) {
        if (replies[i].memory_step_max_size() != b) {
          return absl::InternalError(absl::StrCat("shard ", i, " answered no memory steps"));
        }
        parts[i] = PartialFromProto(replies[i].partials(static_cast<int>(j)));
        const double m = replies[i].memory_step_max(static_cast<int>(j));
        (*step_max)[j] = std::isnan(m) ? INFINITY : std::max((*step_max)[j], m);
      }
      ENGRAM_ASSIGN_OR_RETURN((*merged)[j], core::MergeStepPartials(parts));
    }
    return absl::OkStatus();
  }

  // Steps' plumbing: the streams opened on the first request, which
  // carries the call's first fields (bank, energy, filter, time).
  shard::v1::StepRequest Open() {
    shard::v1::StepRequest req;
    if (streams_.empty()) {
      req = first_;
      // One time for every shard of the call (decay with age); a batch's
      // calls share its streams' time, as the calls of a node's batch
      // share its pinned bank.
      req.set_now_unix_ms(router_->NowMs());
      for (int i = 0; i < router_->shards(); ++i) {
        if (ctx_ != nullptr) {
          contexts_.push_back(router_->Forward(ctx_, false, i));
        } else {
          contexts_.push_back(std::make_unique<grpc::ClientContext>());
          contexts_.back()->set_deadline(detached_until_);
          if (!authorization_.empty()) {
            contexts_.back()->AddMetadata("authorization", authorization_);
          }
          if (router_->Seen(i) > 0) {
            contexts_.back()->AddMetadata(kMinSequenceHeader, absl::StrCat(router_->Seen(i)));
          }
        }
        streams_.push_back(router_->shards_[i].steps->Steps(contexts_.back().get()));
      }
    }
    return req;
  }

  // Step's request after Open: the states and what to answer.
  absl::Status StepFrom(shard::v1::StepRequest req, const float* x, int64_t b, int dim,
                        bool with_sum, bool with_value, bool with_nearest,
                        std::vector<core::StepPartial>* merged, std::vector<v1::Memory>* nearest,
                        std::vector<double>* nearest_norms, double level_beta,
                        std::vector<core::StepPartial>* drives) {
    req.mutable_states()->Add(x, x + b * dim);
    req.set_with_sum(with_sum);
    req.set_with_value(with_value);
    req.set_with_nearest(with_nearest);
    req.set_level_beta(level_beta);
    req.set_with_drive(drives != nullptr);
    std::vector<shard::v1::StepReply> replies;
    ENGRAM_RETURN_IF_ERROR(Exchange(req, b, dim, drives != nullptr, &replies));
    bool current = true;
    for (const shard::v1::StepReply& r : replies) current = current && r.current();
    const int s = router_->shards();
    merged->resize(b);
    if (nearest != nullptr) nearest->assign(b, v1::Memory());
    if (nearest_norms != nullptr) nearest_norms->assign(b, 0.0);
    std::vector<core::StepPartial> parts(s);
    bool candidates = false;
    for (int64_t j = 0; j < b; ++j) {
      double best = -INFINITY;
      for (int i = 0; i < s; ++i) {
        const shard::v1::Partial& p = replies[i].partials(static_cast<int>(j));
        parts[i] = PartialFromProto(p);
        if (nearest != nullptr && p.has_nearest() && p.nearest_key() > best) {
          best = p.nearest_key();
          (*nearest)[j] = p.nearest();
          if (nearest_norms != nullptr) (*nearest_norms)[j] = p.nearest_norm();
        }
      }
      ENGRAM_ASSIGN_OR_RETURN((*merged)[j], core::MergeStepPartials(parts));
      const core::PartialForm form = (*merged)[j].form;
      candidates |= form == core::PartialForm::kSparsemax || form == core::PartialForm::kEntmax15;
    }
    if (candidates) {
      // Sparsemax / 1.5-entmax: the whole bank's threshold of each state,
      // then every shard's sums at it (the same Step: one request counted).
      std::vector<core::SparseThreshold> thresholds(b);
      shard::v1::StepRequest second;
      second.mutable_states()->Add(x, x + b * dim);
      second.set_with_sum(with_sum);
      second.set_with_value(with_value);
      second.set_level_beta(level_beta);
      for (int64_t j = 0; j < b; ++j) {
        ENGRAM_ASSIGN_OR_RETURN(thresholds[j], core::ThresholdOf((*merged)[j]));
        shard::v1::Threshold* t = second.add_thresholds();
        t->set_tau(thresholds[j].tau);
        t->set_shift(thresholds[j].shift);
      }
      ENGRAM_RETURN_IF_ERROR(Exchange(second, b, dim, false, &replies));
      for (const shard::v1::StepReply& r : replies) current = current && r.current();
      for (int64_t j = 0; j < b; ++j) {
        for (int i = 0; i < s; ++i) {
          parts[i] = PartialFromProto(replies[i].partials(static_cast<int>(j)));
        }
        ENGRAM_ASSIGN_OR_RETURN((*merged)[j], core::MergeStepPartials(parts));
        (*merged)[j].psi = thresholds[j].psi;
      }
    }
    if (drives != nullptr) {
      drives->resize(b);
      for (int64_t j = 0; j < b; ++j) {
        for (int i = 0; i < s; ++i) {
          parts[i] = PartialFromProto(replies[i].drives(static_cast<int>(j)));
        }
        ENGRAM_ASSIGN_OR_RETURN((*drives)[j], core::MergeStepPartials(parts));
      }
    }
    all_current_ = current;  // only for a step that succeeded
    return absl::OkStatus();
  }

  // The rows of the novelty reference over every shard (after a Step has
  // opened the streams): the kNoveltySamples passing rows of the smallest
  // NoveltyKey, as a node takes them from the whole bank, `dim` floats each.
  absl::Status ReferenceRows(int dim, std::vector<float>* rows) {
    if (!failure_.ok()) return failure_;
    shard::v1::StepRequest req;
    req.set_reference_rows(static_cast<uint32_t>(core::kNoveltySamples));
    std::vector<shard::v1::StepReply> replies;
    ENGRAM_RETURN_IF_ERROR(Exchange(req, 0, dim, false, &replies));
    std::vector<std::pair<uint64_t, const float*>> keyed;
    for (const shard::v1::StepReply& r : replies) {
      if (r.reference_rows_size() != r.reference_keys_size() * dim) {
        return absl::InternalError("a shard answered reference rows of another length");
      }
      for (int i = 0; i < r.reference_keys_size(); ++i) {
        keyed.emplace_back(r.reference_keys(i), r.reference_rows().data() + int64_t{i} * dim);
      }
    }
    const size_t take = std::min<size_t>(keyed.size(), core::kNoveltySamples);
    std::partial_sort(keyed.begin(), keyed.begin() + take, keyed.end());
    rows->clear();
    for (size_t i = 0; i < take; ++i) rows->insert(rows->end(), keyed[i].second, keyed[i].second + dim);
    return absl::OkStatus();
  }

  // Sends `req` (b states) to every shard and reads each one's reply into
  // `replies`, checked: the bank's dimension, b partials (and b drives
  // with `drives`).
  absl::Status Exchange(const shard::v1::StepRequest& req, int64_t b, int dim, bool drives,
                        std::vector<shard::v1::StepReply>* replies) {
    const int s = router_->shards();
    replies->assign(s, shard::v1::StepReply());
    for (int i = 0; i < s; ++i) {
      if (!streams_[i]->Write(req)) return Failed(i);
    }
    for (int i = 0; i < s; ++i) {
      shard::v1::StepReply& r = (*replies)[i];
      if (!streams_[i]->Read(&r)) return Failed(i);
      if (r.dim() != static_cast<uint32_t>(dim)) {
        failed_ = true;
        (void)router_->FromShard(
            i, grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "another dimension"));
        return failure_ = absl::FailedPreconditionError(absl::StrCat(
            "shard ", i, " (", router_->shards_[i].address, ") holds bank '", first_.bank(),
            "' with dimension ", r.dim(), " and shard 0 with ", dim,
            "; the shards disagree: DeleteBank it and create it again"));
      }
      if (r.partials_size() != b || (drives && r.drives_size() != b)) {
        failed_ = true;
        (void)router_->FromShard(i, grpc::Status(grpc::StatusCode::INTERNAL, "partials"));
        return failure_ = absl::InternalError(absl::StrCat("shard ", i, " (", router_->shards_[i].address,
                                                ") answered ", r.partials_size(),
                                                " partials for ", b, " states"));
      }
    }
    return absl::OkStatus();
  }

  // Requests sent so far (one per Step).
  int64_t requests() const { return requests_; }
  // No stream has failed.
  bool ok() const { return failure_.ok(); }
  // Whether the last Step succeeded and every shard answered it with its
  // bank as the stream pinned it (StepReply.current).
  bool all_current() const { return all_current_ && failure_.ok(); }

 private:
  // The status that ended shard i's stream.
  absl::Status Failed(int i) {
    failed_ = true;
    grpc::Status s = streams_[i]->Finish();
    streams_[i].reset();
    if (s.ok()) s = grpc::Status(grpc::StatusCode::UNAVAILABLE, "the stream ended early");
    const grpc::Status named = router_->FromShard(i, s);
    return failure_ = absl::Status(static_cast<absl::StatusCode>(named.error_code()),
                                   named.error_message());
  }

  RouterService* router_;
  grpc::ServerContext* ctx_;
  shard::v1::StepRequest first_;
  std::chrono::system_clock::time_point detached_until_;
  std::string authorization_;
  bool failed_ = false;
  absl::Status failure_;
  int64_t requests_ = 0;
  bool all_current_ = false;
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts_;
  std::vector<std::unique_ptr<grpc::ClientReaderWriter<shard::v1::StepRequest, shard::v1::StepReply>>>
      streams_;
};

RouterService::~RouterService() = default;

absl::StatusOr<std::unique_ptr<RouterService>> RouterService::Create(RouterOptions options) {
  if (options.shards.empty()) return absl::InvalidArgumentError("a router needs shards");
  return std::unique_ptr<RouterService>(new RouterService(std::move(options)));
}

RouterService::RouterService(RouterOptions options) : options_(std::move(options)) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options_.max_message_bytes);
  args.SetMaxSendMessageSize(options_.max_message_bytes);
  // A shard that restarts is dialled again within a second, not after
  // gRPC's default backoff of up to two minutes; until then its calls fail
  // fast as UNAVAILABLE naming it.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
  if (!options_.shard_tls_ca_pem.empty()) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = options_.shard_tls_ca_pem;
    creds = grpc::SslCredentials(ssl);
  }
  // A shard may be a replica group (engramd --log): calls spread over every
  // address its target names or resolves to.
  args.SetLoadBalancingPolicyName("round_robin");
  seen_ = std::make_unique<std::atomic<uint64_t>[]>(options_.shards.size());
  for (const std::string& address : options_.shards) {
    auto channel = grpc::CreateCustomChannel(address, creds, args);
    shards_.push_back({address, v1::MemoryService::NewStub(channel),
                       shard::v1::Shard::NewStub(channel)});
  }
  std::random_device rd;
  rng_state_ = (uint64_t{rd()} << 32) ^ rd();
  runners_ = std::make_unique<Runners>(kRunnerThreads);
}

std::unique_ptr<grpc::ClientContext> RouterService::Forward(grpc::ServerContext* ctx,
                                                           bool detached, int shard) const {
  const auto now = std::chrono::system_clock::now();
  std::unique_ptr<grpc::ClientContext> c;
  if (detached) {
    c = std::make_unique<grpc::ClientContext>();
    c->set_deadline(now + absl::ToChronoMilliseconds(options_.default_timeout));
  } else {
    c = grpc::ClientContext::FromServerContext(*ctx);
    if (ctx->deadline() > now + std::chrono::hours(24 * 365)) {  // the caller set none
      c->set_deadline(now + absl::ToChronoMilliseconds(options_.default_timeout));
    }
  }
  auto auth = ctx->client_metadata().equal_range("authorization");
  if (auth.first != auth.second) {
    c->AddMetadata("authorization",
                   std::string(auth.first->second.data(), auth.first->second.size()));
  }
  if (shard >= 0 && Seen(shard) > 0) c->AddMetadata(kMinSequenceHeader, absl::StrCat(Seen(shard)));
  return c;
}

void RouterService::Saw(int i, const grpc::ClientContext& c) {
  const auto& trailers = c.GetServerTrailingMetadata();
  auto it = trailers.find(kSequenceTrailer);
  uint64_t seq = 0;
  if (it == trailers.end() ||
      !absl::SimpleAtoi(absl::string_view(it->second.data(), it->second.size()), &seq)) {
    return;
  }
  uint64_t prev = seen_[i].load();
  while (prev < seq && !seen_[i].compare_exchange_weak(prev, seq)) {
  }
}

int64_t RouterService::NowMs() const {
  if (options_.clock_ms) return options_.clock_ms();
  return absl::ToUnixMillis(absl::Now());
}

std::string RouterService::SeenKey() const {
  std::string key;
  for (int i = 0; i < shards(); ++i) absl::StrAppend(&key, Seen(i), ",");
  return key;
}

grpc::Status RouterService::FromShard(int i, const grpc::Status& s) const {
  if (options_.metrics != nullptr) {
    options_.metrics->RecordShardCall(shards_[i].address, static_cast<int>(s.error_code()));
  }
  if (s.ok()) return s;
  return grpc::Status(s.error_code(), absl::StrCat("shard ", i, " (", shards_[i].address,
                                                   "): ", s.error_message()));
}

std::vector<int> RouterService::AllShards() const {
  std::vector<int> all(shards_.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int>(i);
  return all;
}

std::vector<grpc::Status> RouterService::FanOut(grpc::ServerContext* ctx,
                                                const std::vector<int>& which,
                                                const ShardCall& start, bool detached) {
  // What the calls' callbacks (on gRPC's threads) report, shared with them:
  // it outlives this function if a callback is still returning.
  struct Pending {
    core::Mutex mu;
    core::CondVar cv;
    int left = 0;
    std::vector<grpc::Status> out;
  };
  auto pending = std::make_shared<Pending>();
  pending->out.resize(shards_.size());
  pending->left = static_cast<int>(which.size());
  // The caller's metadata map is filled on first use: fill it here, once,
  // before the contexts below copy from it.
  (void)ctx->client_metadata();
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts(shards_.size());
  for (int i : which) contexts[i] = Forward(ctx, detached, i);
  for (int i : which) {
    auto done = [pending, i](grpc::Status s) {
      core::MutexLock lock(&pending->mu);
      pending->out[i] = std::move(s);
      if (--pending->left == 0) pending->cv.SignalAll();
    };
    try {
      start(i, contexts[i].get(), done);
    } catch (const std::exception& e) {
      done(grpc::Status(grpc::StatusCode::INTERNAL,
                        absl::StrCat("calling shard ", i, ": ", e.what())));
    }
  }
  std::vector<grpc::Status> out;
  {
    core::MutexLock lock(&pending->mu);
    while (pending->left > 0) pending->cv.Wait(&pending->mu);
    out = std::move(pending->out);
  }
  for (int i : which) {
    if (out[i].ok()) Saw(i, *contexts[i]);
    out[i] = FromShard(i, out[i]);
  }
  return out;
}

std::vector<uint64_t> RouterService::FreshIds(int64_t count) {
  std::vector<uint64_t> ids(count);
  absl::MutexLock lock(&rng_mu_);
  for (uint64_t& id : ids) {
    // Ids below 2^53 stay exact as JSON numbers; 0 is never used.
    do {
      rng_state_ += 0x9e3779b97f4a7c15ULL;
      id = Mix(rng_state_) >> 11;
    } while (id == 0);
  }
  return ids;
}

absl::StatusOr<v1::BankInfo> RouterService::Describe(grpc::ServerContext* ctx,
                                                      const std::string& bank) {
  v1::GetBankRequest req;
  req.set_name(bank);
  v1::BankInfo info;
  std::unique_ptr<grpc::ClientContext> c = Forward(ctx, false, 0);
  const grpc::Status s = FromShard(0, shards_[0].memory->GetBank(c.get(), req, &info));
  if (!s.ok()) return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
  return info;
}

// --- Banks ------------------------------------------------------------------

grpc::Status RouterService::CreateBank(grpc::ServerContext* ctx, const v1::CreateBankRequest* req,
                                       v1::BankInfo* resp) {
  std::vector<v1::BankInfo> infos(shards_.size());
  std::vector<grpc::Status> st = FanOut(ctx, AllShards(), [&](int i, grpc::ClientContext* c, ShardDone done) {
    shards_[i].memory->async()->CreateBank(c, req, &infos[i], std::move(done));
  });
  int existed = 0, created = 0;
  for (const grpc::Status& s : st) {
    if (s.ok()) ++created;
    if (s.error_code() == grpc::StatusCode::ALREADY_EXISTS) ++existed;
  }
  for (const grpc::Status& s : st) {
    if (s.ok() || s.error_code() == grpc::StatusCode::ALREADY_EXISTS) continue;
    if (created + existed == 0) return s;  // refused everywhere: nothing changed
    return grpc::Status(s.error_code(),
                        absl::StrCat(s.error_message(), "; the bank exists on the other shards: "
                                     "repeat the call to finish creating it, or DeleteBank it"));
  }
  if (existed == static_cast<int>(st.size())) return st[0];
  if (existed > 0) {
    // Shards that had the bank (an earlier call's) count as created when
    // they hold the same bank as the ones that created it now.
    v1::GetBankRequest get;
    get.set_name(req->name());
    std::vector<grpc::Status> got =
        FanOut(ctx, AllShards(), [&](int i, grpc::ClientContext* c, ShardDone done) {
          shards_[i].memory->async()->GetBank(c, &get, &infos[i], std::move(done));
        });
    for (const grpc::Status& s : got) {
      if (!s.ok()) return s;
    }
    for (int i = 1; i < shards(); ++i) {
      if (SpecOf(infos[i]) != SpecOf(infos[0])) {
        return grpc::Status(grpc::StatusCode::ALREADY_EXISTS,
                            absl::StrCat("shard ", i, " (", shards_[i].address, ") holds another "
                                         "bank named '", req->name(), "' than shard 0 (",
                                         SpecOf(infos[i]), " vs ", SpecOf(infos[0]),
                                         "); DeleteBank it and create it again"));
      }
    }
  }
  v1::GetBankRequest get;
  get.set_name(req->name());
  return GetBank(ctx, &get, resp);
}

grpc::Status RouterService::GetBank(grpc::ServerContext* ctx, const v1::GetBankRequest* req,
                                    v1::BankInfo* resp) {
  std::vector<v1::BankInfo> infos(shards_.size());
  std::vector<grpc::Status> st = FanOut(ctx, AllShards(), [&](int i, grpc::ClientContext* c, ShardDone done) {
    shards_[i].memory->async()->GetBank(c, req, &infos[i], std::move(done));
  });
  for (const grpc::Status& s : st) {
    if (!s.ok()) return s;
  }
  *resp = infos[0];
  uint64_t patterns = 0, bytes = 0;
  for (const v1::BankInfo& i : infos) {
    patterns += i.patterns();
    bytes += i.bytes();
  }
  resp->set_patterns(patterns);
  resp->set_bytes(bytes);
  resp->set_load(resp->dim() > 0 ? static_cast<double>(patterns) / resp->dim() : 0.0);
  resp->mutable_capacity()->set_over_capacity(static_cast<double>(patterns) >
                                              resp->capacity().patterns());
  return grpc::Status::OK;
}

grpc::Status RouterService::ListBanks(grpc::ServerContext* ctx, const v1::ListBanksRequest* req,
                                      v1::ListBanksResponse* resp) {
  std::vector<v1::ListBanksResponse> lists(shards_.size());
  std::vector<grpc::Status> st = FanOut(ctx, AllShards(), [&](int i, grpc::ClientContext* c, ShardDone done) {
    shards_[i].memory->async()->ListBanks(c, req, &lists[i], std::move(done));
  });
  for (const grpc::Status& s : st) {
    if (!s.ok()) return s;
  }
  absl::flat_hash_map<std::string, std::pair<uint64_t, uint64_t>> sums;
  for (const v1::ListBanksResponse& l : lists) {
    for (const v1::BankInfo& b : l.banks()) {
      sums[b.name()].first += b.patterns();
      sums[b.name()].second += b.bytes();
    }
  }
  // Every name any shard holds (a half-created or half-deleted bank shows).
  absl::flat_hash_set<std::string> listed;
  std::vector<v1::BankInfo> firsts;
  for (const v1::ListBanksResponse& l : lists) {
    for (const v1::BankInfo& b : l.banks()) {
      if (listed.insert(b.name()).second) firsts.push_back(b);
    }
  }
  std::sort(firsts.begin(), firsts.end(),
            [](const v1::BankInfo& a, const v1::BankInfo& b) { return a.name() < b.name(); });
  for (const v1::BankInfo& b : firsts) {
    v1::BankInfo* out = resp->add_banks();
    *out = b;
    out->set_patterns(sums[b.name()].first);
    out->set_bytes(sums[b.name()].second);
    out->set_load(b.dim() > 0 ? static_cast<double>(out->patterns()) / b.dim() : 0.0);
    out->mutable_capacity()->set_over_capacity(static_cast<double>(out->patterns()) >
                                               b.capacity().patterns());
  }
  return grpc::Status::OK;
}

grpc::Status RouterService::DeleteBank(grpc::ServerContext* ctx, const v1::DeleteBankRequest* req,
                                       v1::DeleteBankResponse*) {
  std::vector<v1::DeleteBankResponse> unused(shards_.size());
  std::vector<grpc::Status> st = FanOut(ctx, AllShards(), [&](int i, grpc::ClientContext* c, ShardDone done) {
    shards_[i].memory->async()->DeleteBank(c, req, &unused[i], std::move(done));
  });
  int missing = 0;
  for (const grpc::Status& s : st) {
    if (s.error_code() == grpc::StatusCode::NOT_FOUND) {
      ++missing;
    } else if (!s.ok()) {
      return grpc::Status(s.error_code(),
                          absl::StrCat(s.error_message(),
                                       "; the other shards may have deleted the bank: repeat "
                                       "the call to finish"));
    }
  }
  return missing == static_cast<int>(st.size()) ? st[0] : grpc::Status::OK;
}

// --- Patterns ---------------------------------------------------------------

grpc::Status RouterService::Store(grpc::ServerContext* ctx, const v1::StoreRequest* req,
                                  v1::StoreResponse* resp) {
  absl::StatusOr<v1::BankInfo> info = Describe(ctx, req->bank());
  if (!info.ok()) return ToGrpcStatus(info.status());
  const int n = static_cast<int>(info->dim());
  const int m = static_cast<int>(info->value_dim());
  absl::StatusOr<int64_t> k =
      CheckVectors(req->patterns(), n, "patterns", info->kind() == v1::STATE_KIND_BIPOLAR);
  if (!k.ok()) return ToGrpcStatus(k.status());
  if (*k > options_.max_batch) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("patterns holds ", *k, " vectors; the limit per call is ",
                                     options_.max_batch));
  }
  auto count_is = [&](int64_t got, int64_t per, const char* field) -> grpc::Status {
    if (got != 0 && got != *k * per) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat(field, " has ", got, " entries; expected 0 or ", *k * per));
    }
    return grpc::Status::OK;
  };
  for (const grpc::Status& s :
       {count_is(req->ids_size(), 1, "ids"), count_is(req->payloads_size(), 1, "payloads"),
        count_is(req->labels_size(), 1, "labels"), count_is(req->values_size(), m, "values")}) {
    if (!s.ok()) return s;
  }
  std::vector<uint64_t> ids(req->ids().begin(), req->ids().end());
  if (ids.empty()) ids = FreshIds(*k);
  std::vector<v1::StoreRequest> parts(shards_.size());
  std::vector<int> which;
  for (int64_t r = 0; r < *k; ++r) {
    const int i = ShardOf(ids[r], shards());
    v1::StoreRequest& p = parts[i];
    if (p.bank().empty()) {
      p.set_bank(req->bank());
      p.set_ttl_seconds(req->ttl_seconds());
      which.push_back(i);
    }
    p.mutable_patterns()->Add(req->patterns().begin() + r * n, req->patterns().begin() + (r + 1) * n);
    p.add_ids(ids[r]);
    if (req->payloads_size() > 0) p.add_payloads(req->payloads(static_cast<int>(r)));
    if (req->labels_size() > 0) *p.add_labels() = req->labels(static_cast<int>(r));
    if (m > 0 && req->values_size() > 0) {
      p.mutable_values()->Add(req->values().begin() + r * m, req->values().begin() + (r + 1) * m);
    }
  }
  std::vector<v1::StoreResponse> answers(shards_.size());
  std::vector<grpc::Status> st = FanOut(ctx, which, [&](int i, grpc::ClientContext* c, ShardDone done) {
    shards_[i].memory->async()->Store(c, &parts[i], &answers[i], std::move(done));
  });
  for (int i : which) {
    if (st[i].ok()) continue;
    // Undo every shard's part: a node stores all of a call's rows or none,
    // so a shard that failed either holds its part (it committed as the
    // call's deadline passed) or none of it (NOT_FOUND here). The undo
    // runs on contexts of its own: the caller's may be what ended.
    std::vector<v1::DeletePatternsRequest> dels(shards_.size());
    std::vector<v1::DeletePatternsResponse> deleted(shards_.size());
    for (int j : which) {
      dels[j].set_bank(req->bank());
      *dels[j].mutable_ids() = parts[j].ids();
    }
    std::vector<grpc::Status> undone = FanOut(
        ctx, which,
        [&](int j, grpc::ClientContext* c, ShardDone done) {
          shards_[j].memory->async()->DeletePatterns(c, &dels[j], &deleted[j], std::move(done));
        },
        /*detached=*/true);
    std::string left;
    for (int j : which) {
      const bool none_there = !st[j].ok() && undone[j].error_code() == grpc::StatusCode::NOT_FOUND;
      if (undone[j].ok() || none_there) continue;
      absl::StrAppend(&left, left.empty() ? "" : "; ", "shard ", j, " (", shards_[j].address,
                      ") may keep ", parts[j].ids_size(), " rows (ids ",
                      absl::StrJoin(parts[j].ids().begin(),
                                    parts[j].ids().begin() + std::min(parts[j].ids_size(), 8),
                                    ", "),
                      parts[j].ids_size() > 8 ? ", ..." : "", "): ", undone[j].error_message());
    }
    if (!left.empty()) {
      return grpc::Status(st[i].error_code(),
                          absl::StrCat(st[i].error_message(), "; undoing the other parts failed: ",
                                       left, "; delete them with DeletePatterns"));
    }
    return st[i];
  }
  resp->mutable_ids()->Add(ids.begin(), ids.end());
  v1::GetBankRequest get;
  get.set_name(req->bank());
  v1::BankInfo total;
  if (GetBank(ctx, &get, &total).ok()) resp->set_bank_patterns(total.patterns());
  return grpc::Status::OK;
}

grpc::Status RouterService::DeletePatterns(grpc::ServerContext* ctx,
                                           const v1::DeletePatternsRequest* req,
                                           v1::DeletePatternsResponse* resp) {
  if (req->ids_size() > options_.max_batch) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("ids holds ", req->ids_size(), " ids; the limit per call is ",
                                     options_.max_batch));
  }
  std::vector<v1::DeletePatternsRequest> parts(shards_.size());
  std::vector<int> which;
  absl::flat_hash_set<uint64_t> seen;
  for (uint64_t id : req->ids()) {
    if (!seen.insert(id).second) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat("id ", id, " appears twice; ids must be distinct"));
    }
    const int i = ShardOf(id, shards());
    if (parts[i].bank().empty()) {
      parts[i].set_bank(req->bank());
      which.push_back(i);
    }
    parts[i].add_ids(id);
  }
  if (which.empty()) which.push_back(0);  // shard 0's own answer to no ids
  parts[which[0]].set_bank(req->bank());
  // Every id must be present before any shard deletes (a node deletes all
  // or none of a call's ids).
  std::vector<v1::GetPatternsRequest> gets(shards_.size());
  std::vector<v1::GetPatternsResponse> got(shards_.size());
  for (int i : which) {
    gets[i].set_bank(req->bank());
    *gets[i].mutable_ids() = parts[i].ids();
  }
  std::vector<grpc::Status> st = FanOut(ctx, which, [&](int i, grpc::ClientContext* c,
                                                        ShardDone done) {
    if (parts[i].ids().empty()) return done(grpc::Status::OK);
    shards_[i].memory->async()->GetPatterns(c, &gets[i], &got[i], std::move(done));
  });
  for (int i : which) {
    if (!st[i].ok()) return st[i];
  }
  std::vector<v1::DeletePatternsResponse> answers(shards_.size());
  st = FanOut(ctx, which, [&](int i, grpc::ClientContext* c, ShardDone done) {
    shards_[i].memory->async()->DeletePatterns(c, &parts[i], &answers[i], std::move(done));
  });
  uint64_t deleted = 0;
  std::string done;
  for (int i : which) {
    if (st[i].ok()) absl::StrAppend(&done, done.empty() ? "" : ", ", i);
  }
  for (int i : which) {
    if (st[i].ok()) {
      deleted += answers[i].deleted();
      continue;
    }
    return grpc::Status(st[i].error_code(),
                        done.empty() ? st[i].error_message()
                                     : absl::StrCat(st[i].error_message(),
                                                    "; the ids on shards ", done,
                                                    " were deleted: repeat the call with the "
                                                    "ids of shard ", i, " only"));
  }
  resp->set_deleted(deleted);
  v1::GetBankRequest get;
  get.set_name(req->bank());
  v1::BankInfo total;
  if (GetBank(ctx, &get, &total).ok()) resp->set_bank_patterns(total.patterns());
  return grpc::Status::OK;
}

grpc::Status RouterService::GetPatterns(grpc::ServerContext* ctx,
                                        const v1::GetPatternsRequest* req,
                                        v1::GetPatternsResponse* resp) {
  if (req->ids_size() > options_.max_batch || req->page_size() > options_.max_batch) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("ids or page_size exceed the limit per call of ",
                                     options_.max_batch));
  }
  if (req->ids().empty()) {
    // Rows are numbered shard after shard: the page comes from the shard
    // holding row page_start, up to that shard's last row (or the next
    // shard's rows, when rows deleted meanwhile left that page empty).
    std::vector<v1::BankInfo> infos(shards_.size());
    v1::GetBankRequest get;
    get.set_name(req->bank());
    std::vector<grpc::Status> st =
        FanOut(ctx, AllShards(), [&](int i, grpc::ClientContext* c, ShardDone done) {
          shards_[i].memory->async()->GetBank(c, &get, &infos[i], std::move(done));
        });
    for (const grpc::Status& s : st) {
      if (!s.ok()) return s;
    }
    uint64_t first = 0;
    int i = 0;
    while (i + 1 < shards() && req->page_start() >= first + infos[i].patterns()) {
      first += infos[i].patterns();
      ++i;
    }
    uint64_t start = req->page_start();
    for (;; ++i) {
      v1::GetPatternsRequest local = *req;
      local.set_page_start(start - first);
      resp->Clear();
      std::unique_ptr<grpc::ClientContext> c = Forward(ctx, false, i);
      grpc::Status s = FromShard(i, shards_[i].memory->GetPatterns(c.get(), local, resp));
      if (!s.ok()) return s;
      if (resp->ids_size() > 0 || i + 1 >= shards()) {
        resp->set_next_page_start(first + resp->next_page_start());
        return grpc::Status::OK;
      }
      first += infos[i].patterns();
      start = std::max(start, first);
    }
  }
  std::vector<v1::GetPatternsRequest> parts(shards_.size());
  std::vector<int> which;
  for (uint64_t id : req->ids()) {
    const int i = ShardOf(id, shards());
    if (parts[i].bank().empty()) {
      parts[i] = *req;
      parts[i].clear_ids();
      which.push_back(i);
    }
    parts[i].add_ids(id);
  }
  std::vector<v1::GetPatternsResponse> answers(shards_.size());
  std::vector<grpc::Status> st = FanOut(ctx, which, [&](int i, grpc::ClientContext* c, ShardDone done) {
    shards_[i].memory->async()->GetPatterns(c, &parts[i], &answers[i], std::move(done));
  });
  for (int i : which) {
    if (!st[i].ok()) return st[i];
  }
  // Each shard answers its ids in the order asked; the request's order is
  // rebuilt from them.
  std::vector<int> next(shards_.size(), 0);
  for (uint64_t id : req->ids()) {
    const int i = ShardOf(id, shards());
    const v1::GetPatternsResponse& a = answers[i];
    const int r = next[i]++;
    const int n = static_cast<int>(a.dim());
    const int m = a.ids_size() > 0 ? a.values_size() / a.ids_size() : 0;
    resp->set_dim(a.dim());
    resp->add_ids(a.ids(r));
    resp->mutable_patterns()->Add(a.patterns().begin() + r * n,
                                  a.patterns().begin() + (r + 1) * n);
    if (r < a.payloads_size()) resp->add_payloads(a.payloads(r));
    if (m > 0) {
      resp->mutable_values()->Add(a.values().begin() + r * m, a.values().begin() + (r + 1) * m);
    }
    if (r < a.labels_size()) *resp->add_labels() = a.labels(r);
    if (r < a.expires_unix_ms_size()) resp->add_expires_unix_ms(a.expires_unix_ms(r));
    if (r < a.stored_unix_ms_size()) resp->add_stored_unix_ms(a.stored_unix_ms(r));
  }
  return grpc::Status::OK;
}

// --- Compute ----------------------------------------------------------------

namespace {

// The call's energy override, or the bank's own, for `kind`.
absl::StatusOr<core::EnergyConfig> ResolveEnergy(bool has_override, const v1::EnergyConfig& p,
                                                 const v1::BankInfo& info, core::StateKind kind) {
  const v1::EnergyConfig& use =
      has_override && p.family() != v1::ENERGY_FAMILY_UNSPECIFIED ? p : info.energy();
  ENGRAM_ASSIGN_OR_RETURN(core::EnergyConfig cfg, EnergyFromProto(use, kind));
  ENGRAM_RETURN_IF_ERROR(core::ValidateEnergyConfig(cfg, kind));
  return cfg;
}

// An energy over no rows of dimension n: what finishes merged partials.
core::EnergyFunction Finisher(const core::EnergyConfig& cfg, int n) {
  core::PatternView none;
  none.dim = n;
  return core::EnergyFunction(cfg, none);
}

// The first request of a call's streams. The energy the router resolved
// is sent explicitly, so every shard computes with the config the router
// finishes with.
shard::v1::StepRequest FirstStep(const std::string& bank, const core::EnergyConfig& energy,
                                 const v1::Filter& filter) {
  shard::v1::StepRequest first;
  first.set_bank(bank);
  *first.mutable_energy() = EnergyToProto(energy);
  *first.mutable_filter() = filter;
  return first;
}

// A little before the caller's deadline: when dynamics and samplers stop,
// so that their last step (nearest memories, readouts) still reaches the
// shards in time.
// `default_timeout` is the deadline of a caller that sets none (as the
// shard calls get it).
std::chrono::system_clock::time_point StopBefore(const grpc::ServerContext* ctx,
                                                 absl::Duration default_timeout) {
  const auto now = std::chrono::system_clock::now();
  auto stop_at = ctx->deadline();
  if (stop_at > now + std::chrono::hours(24 * 365)) {
    stop_at = now + absl::ToChronoMilliseconds(default_timeout);
  }
  if (stop_at > now) {
    stop_at -= std::min<std::chrono::system_clock::duration>((stop_at - now) / 10,
                                                             std::chrono::seconds(1));
  }
  return stop_at;
}

absl::Status WithinBatch(int64_t count, int64_t max_batch, const char* field) {
  if (count <= max_batch) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(field, " holds ", count, " vectors; the limit per call is ", max_batch));
}

}  // namespace

grpc::Status RouterService::Energy(grpc::ServerContext* ctx, const v1::EnergyRequest* req,
                                   v1::EnergyResponse* resp) {
  return Guarded(resp, [&]() -> absl::Status {
    ENGRAM_ASSIGN_OR_RETURN(v1::BankInfo info, Describe(ctx, req->bank()));
    ENGRAM_ASSIGN_OR_RETURN(core::StateKind kind, KindFromProto(info.kind()));
    const int n = static_cast<int>(info.dim());
    const int m = static_cast<int>(info.value_dim());
    ENGRAM_ASSIGN_OR_RETURN(int64_t b, CheckVectors(req->states(), n, "states", false));
    ENGRAM_RETURN_IF_ERROR(WithinBatch(b, options_.max_batch, "states"));
    ENGRAM_ASSIGN_OR_RETURN(core::EnergyConfig cfg,
                            ResolveEnergy(req->has_energy(), req->energy(), info, kind));
    StepStreams streams(this, ctx, FirstStep(req->bank(), cfg, req->filter()));
    std::vector<core::StepPartial> merged;
    ENGRAM_RETURN_IF_ERROR(streams.Step(req->states().data(), b, n, req->return_gradient(),
                                        m > 0, false, &merged, nullptr));
    const core::EnergyFunction f = Finisher(cfg, n);
    // Novelty: the reference patterns' energies on the same streams, so at
    // the same time and pins as the states' (a decaying bank's every energy
    // moves by the same amount with time: ranks and z-scores are those of a
    // node's reference taken at its newest store).
    std::optional<core::StoredEnergies> reference;
    if (req->return_novelty()) {
      std::vector<float> rows;
      ENGRAM_RETURN_IF_ERROR(streams.ReferenceRows(n, &rows));
      const int64_t k = static_cast<int64_t>(rows.size()) / n;
      std::vector<double> energies(k);
      if (k > 0) {
        std::vector<core::StepPartial> parts;
        ENGRAM_RETURN_IF_ERROR(streams.Step(rows.data(), k, n, false, false, false, &parts,
                                            nullptr));
        for (int64_t r = 0; r < k; ++r) {
          ENGRAM_ASSIGN_OR_RETURN(energies[r],
                                  f.FinishPartial(parts[r], rows.data() + r * n, nullptr, nullptr));
        }
      }
      reference = core::StoredEnergiesOf(std::move(energies));
    }
    std::vector<float> grad(n);
    for (int64_t j = 0; j < b; ++j) {
      const float* x = req->states().data() + j * n;
      ENGRAM_ASSIGN_OR_RETURN(
          double e, f.FinishPartial(merged[j], x, nullptr,
                                    req->return_gradient() ? grad.data() : nullptr));
      resp->add_energies(e);
      if (reference.has_value()) {
        resp->add_novelty(core::Novelty(*reference, e));
        resp->add_novelty_z(reference->ZScore(e));
      }
      if (req->return_gradient()) resp->mutable_gradients()->Add(grad.begin(), grad.end());
      if (m > 0) {
        if (static_cast<int>(merged[j].value.size()) == m) {
          resp->mutable_values()->Add(merged[j].value.begin(), merged[j].value.end());
        } else {
          for (int v = 0; v < m; ++v) resp->add_values(0.f);  // no rows: the empty readout
        }
      }
    }
    return absl::OkStatus();
  });
}

struct RouterService::SyncCall {
  grpc::ServerContext* ctx = nullptr;
  int64_t count = 0;
  const float* queries = nullptr;  // count x n
  std::function<absl::Span<const bool>(int64_t)> clamp_of;
  const core::RetrieveOptions* opts = nullptr;
  std::chrono::system_clock::time_point stop_at;  // when its dynamics stop
  // Filled by the batch: each query's trajectory (or error), nearest
  // memory and value readout; `status` is an error of the whole call (the
  // final step's, or why it never ran), checked before `results`.
  std::vector<absl::StatusOr<core::Trajectory>> results;
  std::vector<v1::Memory> nearest;
  std::vector<std::vector<float>> values;
  absl::Status status;
  int64_t left = 0;  // queries not yet answered
  // Guarded by batch_mu_: answered (after which nothing touches the call);
  // taken by a running batch (it can no longer leave); the step count of
  // the batch it joined when it came.
  bool done = false;
  bool admitted = false;
  int64_t seen = 0;
};

// A fixed set of threads that run Retrieve batches, so that no caller's
// thread runs other callers' queries (each call waits for its own answer).
class RouterService::Runners {
 public:
  explicit Runners(int threads) {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Loop(); });
  }
  ~Runners() {
    {
      core::MutexLock lock(&mu_);
      stop_ = true;
      cv_.SignalAll();
    }
    for (std::thread& t : threads_) t.join();
  }
  void Run(std::function<void()> task) {
    core::MutexLock lock(&mu_);
    tasks_.push_back(std::move(task));
    cv_.SignalAll();
  }

 private:
  void Loop() {
    while (true) {
      std::function<void()> task;
      {
        core::MutexLock lock(&mu_);
        while (tasks_.empty() && !stop_) cv_.Wait(&mu_);
        if (tasks_.empty()) return;
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      try {
        task();
      } catch (...) {
        // A task answers its calls on its own errors; a runner outlives it.
      }
    }
  }

  core::Mutex mu_;
  core::CondVar cv_;
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};


grpc::Status RouterService::Retrieve(grpc::ServerContext* ctx, const v1::RetrieveRequest* req,
                                     v1::RetrieveResponse* resp) {
  return Guarded(resp, [&]() -> absl::Status {
    ENGRAM_ASSIGN_OR_RETURN(core::RetrieveOptions opts, OptionsFromProto(req->options()));
    const auto stop_at = StopBefore(ctx, options_.default_timeout);
    opts.should_stop = [ctx, stop_at] {
      return ctx->IsCancelled() || std::chrono::system_clock::now() > stop_at;
    };
    ENGRAM_ASSIGN_OR_RETURN(v1::BankInfo info, Describe(ctx, req->bank()));
    ENGRAM_ASSIGN_OR_RETURN(core::StateKind kind, KindFromProto(info.kind()));
    const int n = static_cast<int>(info.dim());
    const int m = static_cast<int>(info.value_dim());
    ENGRAM_ASSIGN_OR_RETURN(int64_t count, CheckVectors(req->queries(), n, "queries",
                                                        kind == core::StateKind::kBipolar));
    ENGRAM_RETURN_IF_ERROR(WithinBatch(count, options_.max_batch, "queries"));
    const int64_t mask = req->clamp_size();
    if (mask != 0 && mask != n && mask != count * n) {
      return absl::InvalidArgumentError(absl::StrCat(
          "clamp has ", mask, " entries; expected 0, ", n, " (one mask for all queries) or ",
          count * n, " (one per query)"));
    }
    ENGRAM_ASSIGN_OR_RETURN(core::EnergyConfig cfg,
                            ResolveEnergy(req->has_energy(), req->energy(), info, kind));
    ENGRAM_RETURN_IF_ERROR(core::ValidateRetrieveOptions(opts, kind));
    {
      // An empty bank is FAILED_PRECONDITION before anything else, as on a
      // node (the dynamics would otherwise refuse first).
      v1::GetBankRequest get;
      get.set_name(req->bank());
      v1::BankInfo total;
      if (grpc::Status s = GetBank(ctx, &get, &total); !s.ok()) {
        return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
      }
      if (total.patterns() == 0) {
        return absl::FailedPreconditionError(
            absl::StrCat("bank '", req->bank(), "' is empty; store patterns first"));
      }
    }
    const shard::v1::StepRequest first = FirstStep(req->bank(), cfg, req->filter());
    const std::vector<char> clamp(req->clamp().begin(), req->clamp().end());
    const bool* clamp_data = reinterpret_cast<const bool*>(clamp.data());
    auto clamp_of = [&](int64_t q) {
      if (mask == n) return absl::MakeConstSpan(clamp_data, n);
      if (mask == count * n) return absl::MakeConstSpan(clamp_data + q * n, n);
      return absl::Span<const bool>();
    };
    // One query's result, with its nearest memory and value readout (m
    // floats, or none: the empty readout).
    auto emit = [&](int64_t q, const core::Trajectory& t, const v1::Memory& nearest,
                    const std::vector<float>& value) -> absl::Status {
      v1::RetrieveResult* out = resp->add_results();
      RetrievalToProto(t, core::NearestMemory{}, std::string(), out);
      if (nearest.ByteSizeLong() > 0) *out->mutable_nearest() = nearest;
      if (m > 0) {
        if (static_cast<int>(value.size()) == m) {
          out->mutable_value()->Add(value.begin(), value.end());
        } else {
          for (int v = 0; v < m; ++v) out->add_value(0.f);
        }
      }
      if (t.stop_reason == core::StopReason::kDeadline &&
          !req->options().partial_on_deadline()) {
        return absl::DeadlineExceededError(absl::StrCat(
            "deadline passed after ", t.steps, " steps of query ", q, " of ", count,
            "; set options.partial_on_deadline to receive partial states"));
      }
      return absl::OkStatus();
    };
    if (opts.dynamics == core::Dynamics::kSync) {
      SyncCall call;
      call.ctx = ctx;
      call.count = count;
      call.queries = req->queries().data();
      call.clamp_of = clamp_of;
      call.opts = &opts;
      call.stop_at = stop_at;
      auto auth = ctx->client_metadata().equal_range("authorization");
      const std::string authorization =
          auth.first != auth.second ? std::string(auth.first->second.data(),
                                                  auth.first->second.size())
                                    : std::string();
      // What a batch of this call's key computes with.
      SyncGroup shape;
      shape.first = first;
      shape.cfg = cfg;
      shape.kind = kind;
      shape.n = n;
      shape.m = m;
      shape.authorization = authorization;
      if (options_.batching && count <= options_.max_batch_queries &&
          count * n * int64_t{4} <= options_.max_message_bytes / 4) {
        // The key: everything the batch's streams and finish depend on.
        const std::string key = absl::StrCat(first.SerializeAsString(), "\x1f", n, "\x1f", m,
                                             "\x1f", static_cast<int>(kind), "\x1f",
                                             authorization, "\x1f", SeenKey());
        RunSyncGrouped(key, shape, &call);
      } else {
        // Alone, on this thread, with the call's own deadline and
        // cancellation on its streams.
        shape.calls = {&call};
        shape.queries = count;
        RunSyncGroup(shape, ctx);
      }
      ENGRAM_RETURN_IF_ERROR(call.status);
      for (int64_t q = 0; q < count; ++q) ENGRAM_RETURN_IF_ERROR(call.results[q].status());
      for (int64_t q = 0; q < count; ++q) {
        ENGRAM_RETURN_IF_ERROR(emit(q, *call.results[q], call.nearest[q], call.values[q]));
      }
      return absl::OkStatus();
    }
    // GRADIENT, ASYNC and TINYBRAIN, as on a node: one query after
    // another, each evaluation (GRADIENT: energy and gradient per step;
    // ASYNC: the energy of each neuron's flip; TINYBRAIN: the memory
    // layer's sums per step) merged from the shards; no query starts once
    // the deadline has passed.
    StepStreams streams(this, ctx, first);
    const core::EnergyFunction f = Finisher(cfg, n);
    std::vector<core::StepPartial> merged;
    std::vector<absl::StatusOr<core::Trajectory>> results(count, absl::UnknownError("not run"));
    // The merged partial at x, of some rows.
    auto evaluate = [&](const float* x, bool with_sum) -> absl::Status {
      ENGRAM_RETURN_IF_ERROR(streams.Step(x, 1, n, with_sum, false, false, &merged, nullptr));
      if (merged[0].rows == 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            "bank '", req->bank(), "' holds no pattern that passes the call's filter (or "
            "none at all); store patterns first"));
      }
      return absl::OkStatus();
    };
    auto value_and_gradient = [&](const float* x, float* grad) -> absl::StatusOr<double> {
      ENGRAM_RETURN_IF_ERROR(evaluate(x, true));
      return f.FinishPartial(merged[0], x, nullptr, grad);
    };
    // ASYNC: every flip's energy from the shards (a request per neuron).
    class ShardFlips : public core::FlipOracle {
     public:
      ShardFlips(const decltype(evaluate)& eval, const core::EnergyFunction& f,
                 const std::vector<core::StepPartial>& merged)
          : eval_(eval), f_(f), merged_(merged) {}
      absl::StatusOr<core::KeyedEnergy> Evaluate(const float* x, int) override {
        ENGRAM_RETURN_IF_ERROR(eval_(x, false));
        core::KeyedEnergy out;
        ENGRAM_ASSIGN_OR_RETURN(out.energy, f_.FinishPartial(merged_[0], x, nullptr, nullptr));
        out.key = out.energy;
        if (f_.config().family == core::EnergyFamily::kExponential) {
          // -lse(beta S), which never overflows (E = -exp(lse)).
          out.key = -(merged_[0].log_scale + std::log(merged_[0].wsum));
        }
        return out;
      }
      void Accept(int) override {}

     private:
      const decltype(evaluate)& eval_;
      const core::EnergyFunction& f_;
      const std::vector<core::StepPartial>& merged_;
    };
    ShardFlips flips(evaluate, f, merged);
    // TINYBRAIN: each shard keeps its rows' memory layer on its stream.
    std::vector<double> step_max;
    auto memory = [&](const float* v, bool start, core::StepPartial* out,
                      double* max) -> absl::Status {
      ENGRAM_RETURN_IF_ERROR(
          streams.TinyBrainStep(v, 1, n, start, opts.dt / opts.tau_h, &merged, &step_max));
      if (merged[0].rows == 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            "bank '", req->bank(), "' holds no pattern that passes the call's filter (or "
            "none at all); store patterns first"));
      }
      *out = merged[0];
      *max = step_max[0];
      return absl::OkStatus();
    };
    int64_t ran = count;
    for (int64_t q = 0; q < count; ++q) {
      const auto query = absl::MakeConstSpan(req->queries().data() + q * n, n);
      switch (opts.dynamics) {
        case core::Dynamics::kAsync:
          results[q] = core::RunAsyncDynamics(n, query, clamp_of(q), opts, flips);
          break;
        case core::Dynamics::kTinyBrain:
          results[q] =
              core::RunTinyBrainDynamics(n, kind, cfg, query, clamp_of(q), opts, memory);
          break;
        default:
          results[q] = core::RunGradientDynamics(n, cfg, query, clamp_of(q), opts,
                                                 value_and_gradient);
          break;
      }
      if (!results[q].ok() || results[q]->stop_reason == core::StopReason::kDeadline) {
        ran = q + 1;
        break;
      }
    }
    std::vector<float> finals;
    for (int64_t q = 0; q < ran; ++q) {
      ENGRAM_RETURN_IF_ERROR(results[q].status());
      finals.insert(finals.end(), results[q]->state.begin(), results[q]->state.end());
    }
    // The final states' nearest memories and value readouts: one more step.
    std::vector<v1::Memory> nearest;
    ENGRAM_RETURN_IF_ERROR(
        streams.Step(finals.data(), ran, n, false, m > 0, true, &merged, &nearest));
    for (int64_t q = 0; q < ran; ++q) {
      ENGRAM_RETURN_IF_ERROR(emit(q, *results[q], nearest[q], merged[q].value));
    }
    return absl::OkStatus();
  });
}


namespace {

// Margin of a batch's stream deadline past its calls' own.
constexpr auto kBatchMargin = std::chrono::seconds(2);

}  // namespace

std::shared_ptr<RouterService::SyncGroup> RouterService::EmptyLike(const SyncGroup& shape,
                                                                  const std::string& key) {
  auto g = std::make_shared<SyncGroup>();
  g->key = key;
  g->first = shape.first;
  g->cfg = shape.cfg;
  g->kind = shape.kind;
  g->n = shape.n;
  g->m = shape.m;
  g->authorization = shape.authorization;
  return g;
}

void RouterService::RunSyncGrouped(const std::string& key, const SyncGroup& shape,
                                   SyncCall* call) {
  const int64_t row_bytes = int64_t{4} * shape.n;
  auto fits = [&](const SyncGroup& g) {
    const int64_t q = g.queries + call->count;
    return q <= options_.max_batch_queries && q * row_bytes <= options_.max_message_bytes / 4;
  };
  auto fresh = [&] { return EmptyLike(shape, key); };
  bool alone = false;
  {
    core::MutexLock lock(&batch_mu_);
    KeyGroups& k = sync_groups_[key];
    bool placed = false;
    for (const std::shared_ptr<SyncGroup>& g : k.running) {
      // A running batch takes a call that fits in it and its deadline; the
      // call starts once a step sent after it came finds every shard's bank
      // unchanged (RunSyncGroupSteps).
      if (g->open && fits(*g) && call->stop_at + kBatchMargin / 2 <= g->until) {
        call->seen = g->step_seq;
        g->joining.push_back(call);
        g->queries += call->count;
        placed = true;
        break;
      }
    }
    if (!placed && static_cast<int>(k.running.size()) < kSyncGroupsPerKey) {
      std::shared_ptr<SyncGroup> g = fresh();
      g->calls.push_back(call);
      g->queries = call->count;
      k.running.push_back(g);
      StartGroup(key, std::move(g));
    } else if (!placed && (k.forming == nullptr || fits(*k.forming))) {
      if (k.forming == nullptr) k.forming = fresh();
      k.forming->calls.push_back(call);
      k.forming->queries += call->count;
    } else if (!placed) {
      alone = true;  // the next batch is full: this call runs by itself
    }
    // Wait to be answered; a call not yet taken by a batch leaves when its
    // deadline passes or it is cancelled.
    while (!alone && !call->done) {
      const auto now = std::chrono::system_clock::now();
      if (!call->admitted && (now >= call->stop_at || call->ctx->IsCancelled())) {
        auto drop = [&](std::vector<SyncCall*>& v, SyncGroup& g) {
          auto it = std::find(v.begin(), v.end(), call);
          if (it == v.end()) return false;
          v.erase(it);
          g.queries -= call->count;
          return true;
        };
        // It waits in the forming batch, in a running one's joiners, or in
        // a batch queued for a runner and not yet begun.
        KeyGroups& kk = sync_groups_[key];
        if (kk.forming == nullptr || !drop(kk.forming->calls, *kk.forming)) {
          for (const std::shared_ptr<SyncGroup>& g : kk.running) {
            if (drop(g->joining, *g) || (!g->started && drop(g->calls, *g))) break;
          }
        }
        if (kk.forming != nullptr && kk.forming->calls.empty()) kk.forming = nullptr;
        if (kk.running.empty() && kk.forming == nullptr) sync_groups_.erase(key);
        call->status = call->ctx->IsCancelled()
                           ? absl::CancelledError("the call was cancelled before it ran")
                           : absl::DeadlineExceededError(
                                 "deadline passed while the call waited for a Retrieve batch");
        return;
      }
      auto wake = now + std::chrono::milliseconds(100);
      if (!call->admitted) wake = std::min(wake, call->stop_at);
      batch_cv_.WaitWithDeadline(&batch_mu_, absl::FromChrono(wake));
    }
  }
  if (alone) {
    SyncGroup g = *fresh();
    g.key.clear();
    g.calls = {call};
    g.queries = call->count;
    RunSyncGroup(g, call->ctx);
  }
}

void RouterService::StartGroup(const std::string& key, std::shared_ptr<SyncGroup> group) {
  runners_->Run([this, key, group] {
    bool any = false;
    {
      // Its calls are those still waiting when a runner takes it (a call
      // may leave while it is queued); from here they run.
      core::MutexLock lock(&batch_mu_);
      group->started = true;
      any = !group->calls.empty();
      group->until = any ? group->calls.front()->stop_at : std::chrono::system_clock::now();
      for (SyncCall* c : group->calls) {
        group->until = std::max(group->until, c->stop_at);
        c->admitted = true;
      }
      group->until += kBatchMargin;
      group->open = any;
    }
    if (any) RunSyncGroup(*group);
    if (options_.metrics != nullptr && group->calls_run > 0) {
      options_.metrics->RecordBatch(group->queries_run, group->calls_run);
    }
    core::MutexLock lock(&batch_mu_);
    KeyGroups& k = sync_groups_[key];
    k.running.erase(std::find(k.running.begin(), k.running.end(), group));
    CloseGroup(*group);
    if (k.forming != nullptr && static_cast<int>(k.running.size()) < kSyncGroupsPerKey) {
      std::shared_ptr<SyncGroup> next = std::move(k.forming);
      k.running.push_back(next);
      StartGroup(key, std::move(next));
    }
    if (k.running.empty() && k.forming == nullptr) sync_groups_.erase(key);
    batch_cv_.SignalAll();
  });
}

void RouterService::CloseGroup(SyncGroup& group) {
  group.open = false;
  if (group.joining.empty() || group.key.empty()) return;
  // Calls that had not joined yet go first in the key's next batch, which
  // starts at once if a slot is free.
  KeyGroups& k = sync_groups_[group.key];
  if (k.forming == nullptr) k.forming = EmptyLike(group, group.key);
  for (SyncCall* c : group.joining) {
    group.queries -= c->count;
    k.forming->queries += c->count;
  }
  k.forming->calls.insert(k.forming->calls.begin(), group.joining.begin(), group.joining.end());
  group.joining.clear();
  if (static_cast<int>(k.running.size()) < kSyncGroupsPerKey) {
    std::shared_ptr<SyncGroup> next = std::move(k.forming);
    k.running.push_back(next);
    StartGroup(group.key, std::move(next));
  }
  batch_cv_.SignalAll();
}

void RouterService::RunSyncGroup(SyncGroup& group, grpc::ServerContext* attached) {
  // Its calls not yet answered (joiners are added as they are admitted).
  std::vector<SyncCall*> taken = group.calls;
  try {
    RunSyncGroupSteps(group, attached, &taken);
  } catch (...) {
    // Every call of the batch is answered, never left waiting (those in
    // `taken` are not answered yet, so alive).
    core::MutexLock lock(&batch_mu_);
    for (SyncCall* c : taken) {
      c->status = absl::InternalError("the Retrieve batch failed");
      c->done = true;
    }
    CloseGroup(group);
    batch_cv_.SignalAll();
  }
}

void RouterService::RunSyncGroupSteps(SyncGroup& group, grpc::ServerContext* attached,
                                      std::vector<SyncCall*>* taken) {
  const int n = group.n;
  const int m = group.m;
  std::chrono::system_clock::time_point until;
  {
    core::MutexLock lock(&batch_mu_);
    until = group.until;
  }
  // A batch's streams outlive any one call's cancellation: they end by the
  // latest deadline of its calls (plus a margin). A call alone on its own
  // thread gives its streams its deadline and cancellation.
  std::optional<StepStreams> streams;
  if (attached != nullptr) {
    streams.emplace(this, attached, group.first);
  } else {
    streams.emplace(this, nullptr, group.first, until, group.authorization);
  }
  const core::EnergyFunction f = Finisher(group.cfg, n);
  // A bipolar bank under a non-general family steps on each neuron's
  // drive (merged from the shards' drive partials); the others on the
  // update target of the merged partial.
  const bool drive = core::UsesBipolarDrive(group.cfg, group.kind);
  std::vector<core::StepPartial> merged, drives;
  auto evaluate = [&](const float* x, int64_t b, float* targets, double* energies,
                      int64_t* nearest_rows) -> absl::Status {
    const bool target_from_sum = targets != nullptr && !drive;
    ENGRAM_RETURN_IF_ERROR(streams->Step(x, b, n, target_from_sum, false, false, &merged,
                                         nullptr, nullptr, 0.0,
                                         targets != nullptr && drive ? &drives : nullptr));
    if (b > 0 && merged[0].rows == 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "bank '", group.first.bank(), "' holds no pattern that passes the call's filter (or "
          "none at all); store patterns first"));
    }
    for (int64_t j = 0; j < b; ++j) {
      ENGRAM_ASSIGN_OR_RETURN(
          energies[j], f.FinishPartial(merged[j], x + j * n,
                                       target_from_sum ? targets + j * n : nullptr, nullptr));
      if (targets != nullptr && drive) {
        core::FinishDrive(group.cfg, drives[j], x + j * n, targets + j * n);
      }
      nearest_rows[j] = -1;
    }
    return absl::OkStatus();
  };
  std::vector<std::pair<SyncCall*, int64_t>> owner;  // by tag
  std::vector<uint64_t> finished;                    // tags since the last settle
  core::SyncBatch sync(
      f, group.kind,
      [&](uint64_t tag, absl::StatusOr<core::Trajectory> r) {
        owner[tag].first->results[owner[tag].second] = std::move(r);
        finished.push_back(tag);
      },
      evaluate);
  // After this the call's thread may return: nothing touches `c` again.
  auto answered = [&](SyncCall* c) {
    taken->erase(std::find(taken->begin(), taken->end(), c));
    core::MutexLock lock(&batch_mu_);
    group.queries -= c->count;  // room for joiners
    c->done = true;
    batch_cv_.SignalAll();
  };
  auto admit = [&](SyncCall* c) {
    c->results.assign(c->count, absl::UnknownError("not run"));
    c->nearest.assign(c->count, v1::Memory());
    c->values.assign(c->count, {});
    c->left = c->count;
    ++group.calls_run;
    group.queries_run += c->count;
    const int64_t count = c->count;
    const uint64_t first_tag = owner.size();
    for (int64_t q = 0; q < count; ++q) owner.push_back({c, q});
    if (count == 0) return answered(c);
    // An invalid query finishes at once (on_finished); the call stays
    // unanswered until settle.
    for (int64_t q = 0; q < count; ++q) {
      sync.Admit(first_tag + q, {absl::MakeConstSpan(c->queries + q * n, n), c->clamp_of(q),
                                 c->opts});
    }
  };
  // The finished queries' nearest memories and value readouts (one more
  // request), then their calls are answered once all of their queries are.
  auto settle = [&] {
    if (finished.empty()) return;
    std::vector<float> finals;
    std::vector<uint64_t> moved;
    for (uint64_t tag : finished) {
      const auto& r = owner[tag].first->results[owner[tag].second];
      if (!r.ok()) continue;
      finals.insert(finals.end(), r->state.begin(), r->state.end());
      moved.push_back(tag);
    }
    absl::Status s;
    std::vector<v1::Memory> nearest;
    if (!moved.empty()) {
      s = streams->Step(finals.data(), static_cast<int64_t>(moved.size()), n, false, m > 0, true,
                        &merged, &nearest);
    }
    for (size_t j = 0; s.ok() && j < moved.size(); ++j) {
      auto [c, q] = owner[moved[j]];
      c->nearest[q] = nearest[j];
      c->values[q] = merged[j].value;
    }
    if (!s.ok()) {
      core::MutexLock lock(&batch_mu_);
      CloseGroup(group);  // no one joins failed streams
    }
    for (uint64_t tag : finished) {
      SyncCall* c = owner[tag].first;
      if (!s.ok() && c->status.ok()) c->status = s;
      if (--c->left == 0) answered(c);
    }
    finished.clear();
  };
  for (SyncCall* c : std::vector<SyncCall*>(group.calls)) admit(c);
  settle();
  // The last step whose requests every shard answered with its bank
  // unchanged since the streams pinned it (0: none yet).
  int64_t confirmed = 0;
  while (true) {
    std::vector<SyncCall*> take;
    int64_t seq = 0;
    {
      core::MutexLock lock(&batch_mu_);
      if (group.open && confirmed > 0 && streams->ok()) {
        // A call that came before step `confirmed` was sent sees every
        // write acknowledged before it: it may run on these streams.
        auto keep = std::stable_partition(group.joining.begin(), group.joining.end(),
                                          [&](SyncCall* c) { return c->seen >= confirmed; });
        take.assign(keep, group.joining.end());
        group.joining.erase(keep, group.joining.end());
        for (SyncCall* c : take) {
          c->admitted = true;
          taken->push_back(c);
        }
      }
      if (sync.empty() && take.empty()) {
        CloseGroup(group);  // calls still joining run in the next batch
        break;
      }
      seq = ++group.step_seq;
    }
    for (SyncCall* c : take) admit(c);
    settle();
    if (sync.empty()) continue;
    const int64_t sent = streams->requests();
    sync.Step();
    if (streams->requests() > sent) {
      if (streams->all_current()) {
        confirmed = seq;
      } else {
        // A write came (or a step failed): later calls need a new pin.
        core::MutexLock lock(&batch_mu_);
        CloseGroup(group);
      }
    }
    settle();
  }
}

absl::StatusOr<core::SampleBatch> RouterService::RunSample(
    grpc::ServerContext* ctx, const v1::SampleRequest* req, const FrameSink& on_frame,
    absl::flat_hash_map<uint64_t, std::string>* payloads) {
  ENGRAM_ASSIGN_OR_RETURN(v1::BankInfo info, Describe(ctx, req->bank()));
  ENGRAM_ASSIGN_OR_RETURN(core::StateKind kind, KindFromProto(info.kind()));
  const int n = static_cast<int>(info.dim());
  const int64_t count = req->count() == 0 ? 1 : req->count();
  ENGRAM_RETURN_IF_ERROR(WithinBatch(count, options_.max_batch, "count"));
  if (!req->query().empty()) {
    ENGRAM_ASSIGN_OR_RETURN(int64_t rows, CheckVectors(req->query(), n, "query",
                                                       kind == core::StateKind::kBipolar));
    (void)rows;
  }
  ENGRAM_ASSIGN_OR_RETURN(core::EnergyConfig cfg,
                          ResolveEnergy(req->has_energy(), req->energy(), info, kind));
  ENGRAM_ASSIGN_OR_RETURN(core::SampleOptions o, SampleOptionsFromProto(*req, kind));
  const auto stop_at = StopBefore(ctx, options_.default_timeout);
  bool sink_full = false;
  o.should_stop = [ctx, stop_at, &sink_full] {
    return sink_full || ctx->IsCancelled() || std::chrono::system_clock::now() > stop_at;
  };
  const int every = std::max(1, o.trajectory_every);
  if (on_frame) {
    o.on_step = [&](int step, double sigma, const std::vector<std::vector<float>>& xs) {
      if (step % every != 0 || sink_full) return;
      sink_full = !on_frame(SampleFrameToProto(step, sigma, xs));
    };
  }
  StepStreams streams(this, ctx, FirstStep(req->bank(), cfg, req->filter()));
  std::vector<core::StepPartial> merged;
  core::SampleEvaluator evaluator;
  evaluator.evaluate = [&](const core::EnergyConfig& at, const float* x, int64_t b,
                           float* targets, float* grads, double* energies) -> absl::Status {
    ENGRAM_RETURN_IF_ERROR(
        streams.Step(x, b, n, true, false, false, &merged, nullptr, nullptr, at.beta));
    if (b > 0 && merged[0].rows == 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "no pattern of bank '", req->bank(), "' passes the filter"));
    }
    const core::EnergyFunction f = Finisher(at, n);
    for (int64_t j = 0; j < b; ++j) {
      ENGRAM_ASSIGN_OR_RETURN(
          energies[j], f.FinishPartial(merged[j], x + j * n,
                                       targets != nullptr ? targets + j * n : nullptr,
                                       grads != nullptr ? grads + j * n : nullptr));
    }
    return absl::OkStatus();
  };
  evaluator.nearest = [&](const float* x, int64_t b, std::vector<core::NearestMemory>* nearest,
                          std::vector<double>* norms) -> absl::Status {
    std::vector<v1::Memory> found;
    ENGRAM_RETURN_IF_ERROR(streams.Step(x, b, n, false, false, true, &merged, &found, norms));
    nearest->assign(b, core::NearestMemory{});
    for (int64_t j = 0; j < b; ++j) {
      if (found[j].ByteSizeLong() == 0) continue;  // no row anywhere
      core::NearestMemory& m = (*nearest)[j];
      m.row = 0;  // some row of some shard: the id names it
      m.id = found[j].id();
      m.distance = found[j].distance();
      m.similarity = found[j].similarity();
      (*payloads)[m.id] = found[j].payload();
    }
    return absl::OkStatus();
  };
  // Bipolar banks: each Glauber flip's energy key at the call's own beta
  // (a level's beta set on the streams stays until another is sent).
  evaluator.key = [&](const float* x) -> absl::StatusOr<double> {
    ENGRAM_RETURN_IF_ERROR(
        streams.Step(x, 1, n, false, false, false, &merged, nullptr, nullptr, cfg.beta));
    if (merged[0].rows == 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "no pattern of bank '", req->bank(), "' passes the filter"));
    }
    const core::EnergyFunction f = Finisher(cfg, n);
    ENGRAM_ASSIGN_OR_RETURN(double e, f.FinishPartial(merged[0], x, nullptr, nullptr));
    if (cfg.family != core::EnergyFamily::kExponential) return e;
    return -(merged[0].log_scale + std::log(merged[0].wsum));  // -lse(beta S)
  };
  core::BankSpec spec;
  spec.name = req->bank();
  spec.dim = n;
  spec.kind = kind;
  // The emptiness a node checks first: the bank's size here, a filter's
  // passing rows at the first evaluation.
  v1::GetBankRequest get;
  get.set_name(req->bank());
  v1::BankInfo total;
  if (grpc::Status s = GetBank(ctx, &get, &total); !s.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
  }
  const std::vector<char> clamp(req->clamp().begin(), req->clamp().end());
  ENGRAM_ASSIGN_OR_RETURN(
      core::SampleBatch batch,
      core::SampleWith(evaluator, spec, static_cast<int64_t>(total.patterns()), cfg,
                       static_cast<int>(count),
                       absl::MakeConstSpan(req->query().data(), req->query_size()),
                       absl::MakeConstSpan(reinterpret_cast<const bool*>(clamp.data()),
                                           clamp.size()),
                       o));
  if (sink_full) return absl::CancelledError("the client closed the stream");
  if (batch.deadline) {
    return absl::DeadlineExceededError(absl::StrCat(
        "deadline passed after ", batch.steps, " of ", batch.sigmas.size() - 1,
        " sampling steps"));
  }
  return batch;
}

void RouterService::SampleToProto(const core::SampleBatch& batch,
                                  const absl::flat_hash_map<uint64_t, std::string>& payloads,
                                  v1::SampleResponse* resp) {
  SampleBatchToProto(batch, resp);
  for (int i = 0; i < resp->samples_size(); ++i) {
    const core::SampleResult& r = batch.samples[i];
    if (r.nearest.row < 0) continue;
    auto it = payloads.find(r.nearest.id);
    MemoryToProto(r.nearest, it == payloads.end() ? std::string() : it->second,
                  resp->mutable_samples(i)->mutable_nearest());
  }
}

grpc::Status RouterService::Sample(grpc::ServerContext* ctx, const v1::SampleRequest* req,
                                   v1::SampleResponse* resp) {
  return Guarded(resp, [&]() -> absl::Status {
    absl::flat_hash_map<uint64_t, std::string> payloads;
    ENGRAM_ASSIGN_OR_RETURN(core::SampleBatch batch, RunSample(ctx, req, nullptr, &payloads));
    SampleToProto(batch, payloads, resp);
    return absl::OkStatus();
  });
}

grpc::Status RouterService::SampleStream(grpc::ServerContext* ctx, const v1::SampleRequest* req,
                                         grpc::ServerWriter<v1::SampleFrame>* writer) {
  return Guarded(nullptr, [&]() -> absl::Status {
    absl::flat_hash_map<uint64_t, std::string> payloads;
    // Frames go out as the levels are taken; Write waits for the client
    // (flow control), so a slow reader slows only its own call.
    ENGRAM_ASSIGN_OR_RETURN(
        core::SampleBatch batch,
        RunSample(ctx, req, [&](const v1::SampleFrame& f) { return writer->Write(f); },
                  &payloads));
    v1::SampleResponse result;
    SampleToProto(batch, payloads, &result);
    if (!writer->Write(LastSampleFrame(std::move(result)))) {
      return absl::CancelledError("the client closed the stream");
    }
    return absl::OkStatus();
  });
}

grpc::Status RouterService::Backup(grpc::ServerContext* ctx, const v1::BackupRequest* req,
                                   v1::BackupResponse* resp) {
  // Each shard writes its own snapshot under its data directory; each is
  // consistent alone, and together they hold every write acknowledged
  // before the call (writes during it may be in some and not others).
  std::vector<v1::BackupResponse> parts(shards_.size());
  std::vector<grpc::Status> st = FanOut(ctx, AllShards(), [&](int i, grpc::ClientContext* c, ShardDone done) {
    shards_[i].memory->async()->Backup(c, req, &parts[i], std::move(done));
  });
  std::string written;
  for (int i = 0; i < shards(); ++i) {
    if (st[i].ok()) absl::StrAppend(&written, written.empty() ? "" : ", ", i);
  }
  for (int i = 0; i < shards(); ++i) {
    if (st[i].ok()) continue;
    return grpc::Status(st[i].error_code(),
                        written.empty()
                            ? st[i].error_message()
                            : absl::StrCat(st[i].error_message(), "; shards ", written,
                                           " wrote their snapshot: back up again under a new "
                                           "file name"));
  }
  uint64_t bytes = 0;
  std::string paths;
  for (int i = 0; i < shards(); ++i) {
    bytes += parts[i].bytes();
    absl::StrAppend(&paths, i == 0 ? "" : "; ", "shard ", i, " (", shards_[i].address,
                    "): ", parts[i].path());
  }
  resp->set_path(paths);
  resp->set_bytes(bytes);
  resp->set_banks(parts[0].banks());
  return grpc::Status::OK;
}

}  // namespace engram::server
