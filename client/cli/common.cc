#include <google/protobuf/util/json_util.h>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "client/cli/commands.h"
#include "engram/core/status_macros.h"

namespace engram::cli {

const std::set<std::string> kEnergyOptions = {"energy", "beta", "degree", "rectified",
                                              "similarity", "separation"};

absl::Status ParseFilter(const std::string& expr, v1::Filter* out) {
  for (absl::string_view cond : absl::StrSplit(expr, ',', absl::SkipWhitespace())) {
    const size_t eq = cond.find('=');
    if (eq == absl::string_view::npos || eq == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--filter condition '", cond, "' is not KEY=V, KEY=V1|V2, KEY#=N, KEY#=N1|N2 or KEY#=LO..HI"));
    }
    const bool integer = cond[eq - 1] == '#';
    v1::Condition* c = out->add_conditions();
    c->set_key(std::string(absl::StripAsciiWhitespace(cond.substr(0, integer ? eq - 1 : eq))));
    const absl::string_view rhs = cond.substr(eq + 1);
    if (!integer) {
      std::vector<std::string> values = absl::StrSplit(rhs, '|');
      if (values.size() == 1) {
        c->set_equals(values[0]);
      } else {
        for (auto& v : values) c->mutable_any_of()->add_values(v);
      }
      continue;
    }
    auto integer_of = [&](absl::string_view t, int64_t* v) -> absl::Status {
      if (absl::SimpleAtoi(absl::StripAsciiWhitespace(t), v)) return absl::OkStatus();
      return absl::InvalidArgumentError(
          absl::StrCat("--filter condition '", cond, "': '", t, "' is not an integer"));
    };
    if (const size_t dots = rhs.find(".."); dots != absl::string_view::npos) {
      int64_t lo = 0, hi = 0;
      ENGRAM_RETURN_IF_ERROR(integer_of(rhs.substr(0, dots), &lo));
      ENGRAM_RETURN_IF_ERROR(integer_of(rhs.substr(dots + 2), &hi));
      c->mutable_int_range()->set_min(lo);
      c->mutable_int_range()->set_max(hi);
      continue;
    }
    std::vector<absl::string_view> values = absl::StrSplit(rhs, '|');
    for (absl::string_view t : values) {
      int64_t v = 0;
      ENGRAM_RETURN_IF_ERROR(integer_of(t, &v));
      if (values.size() == 1) c->set_int_equals(v);
      else c->mutable_int_any_of()->add_values(v);
    }
  }
  if (out->conditions_size() == 0) return absl::InvalidArgumentError("--filter is empty");
  return absl::OkStatus();
}

absl::StatusOr<v1::StateKind> ParseKind(const std::string& s) {
  const std::string k = absl::AsciiStrToLower(s);
  if (k == "bipolar") return v1::STATE_KIND_BIPOLAR;
  if (k == "continuous") return v1::STATE_KIND_CONTINUOUS;
  return absl::InvalidArgumentError(
      absl::StrCat("--kind must be bipolar or continuous, got '", s, "'"));
}

absl::StatusOr<v1::Dynamics> ParseDynamics(const std::string& s) {
  const std::string d = absl::AsciiStrToLower(s);
  if (d == "sync") return v1::DYNAMICS_SYNC;
  if (d == "async") return v1::DYNAMICS_ASYNC;
  if (d == "gradient") return v1::DYNAMICS_GRADIENT;
  if (d == "tinybrain") return v1::DYNAMICS_TINYBRAIN;
  return absl::InvalidArgumentError(absl::StrCat(
      "--dynamics must be sync, async, gradient or tinybrain, got '", s, "'"));
}

absl::Status ParseEnergy(const Args& args, v1::EnergyConfig* out, bool* set) {
  *set = args.Has("energy");
  if (!*set) {
    for (const auto& o : kEnergyOptions) {
      if (args.Has(o)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--", o, " needs --energy to say which family it applies to"));
      }
    }
    return absl::OkStatus();
  }
  const std::string f = absl::AsciiStrToLower(args.Get("energy"));
  static const std::map<std::string, v1::EnergyFamily> kFamilies = {
      {"classical", v1::ENERGY_FAMILY_CLASSICAL}, {"polynomial", v1::ENERGY_FAMILY_POLYNOMIAL},
      {"exponential", v1::ENERGY_FAMILY_EXPONENTIAL}, {"lse", v1::ENERGY_FAMILY_LSE},
      {"gaussian", v1::ENERGY_FAMILY_GAUSSIAN}, {"general", v1::ENERGY_FAMILY_GENERAL}};
  auto it = kFamilies.find(f);
  if (it == kFamilies.end()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--energy must be classical, polynomial, exponential, lse, gaussian or general, "
        "got '", f, "'"));
  }
  out->set_family(it->second);
  ENGRAM_ASSIGN_OR_RETURN(double beta, args.GetDouble("beta", 0));
  ENGRAM_ASSIGN_OR_RETURN(int64_t degree, args.GetInt("degree", 0));
  if (degree < 0) return absl::InvalidArgumentError("--degree must be >= 1");
  out->set_beta(beta);
  out->set_degree(static_cast<uint32_t>(degree));
  out->set_rectified(args.Has("rectified"));
  if (args.Has("similarity")) {
    const std::string s = absl::AsciiStrToLower(args.Get("similarity"));
    if (s == "dot") out->set_similarity(v1::SIMILARITY_DOT);
    else if (s == "l2") out->set_similarity(v1::SIMILARITY_NEG_HALF_SQ_L2);
    else if (s == "l1") out->set_similarity(v1::SIMILARITY_NEG_L1);
    else return absl::InvalidArgumentError("--similarity must be dot, l2 or l1");
  }
  if (args.Has("separation")) {
    const std::string s = absl::AsciiStrToLower(args.Get("separation"));
    if (s == "identity") out->set_separation(v1::SEPARATION_IDENTITY);
    else if (s == "polynomial") out->set_separation(v1::SEPARATION_POLYNOMIAL);
    else if (s == "softmax") out->set_separation(v1::SEPARATION_SOFTMAX);
    else if (s == "max") out->set_separation(v1::SEPARATION_MAX);
    else if (s == "sparsemax") out->set_separation(v1::SEPARATION_SPARSEMAX);
    else if (s == "entmax15") out->set_separation(v1::SEPARATION_ENTMAX15);
    else if (s == "log_sum_relu") out->set_separation(v1::SEPARATION_LOG_SUM_RELU);
    else return absl::InvalidArgumentError(
        "--separation must be identity, polynomial, softmax, max, sparsemax, entmax15 or "
        "log_sum_relu");
  }
  return absl::OkStatus();
}

absl::StatusOr<client::Matrix> LoadData(const std::string& path, const Args& args) {
  ENGRAM_ASSIGN_OR_RETURN(client::Matrix m, client::LoadMatrix(path));
  ENGRAM_ASSIGN_OR_RETURN(int64_t offset, args.GetInt("offset", 0));
  ENGRAM_ASSIGN_OR_RETURN(int64_t limit, args.GetInt("limit", -1));
  ENGRAM_RETURN_IF_ERROR(client::SliceRows(&m, offset, limit));
  ENGRAM_ASSIGN_OR_RETURN(double scale, args.GetDouble("scale", 1.0));
  if (scale != 1.0) {
    for (float& v : m.data) v = static_cast<float>(v * scale);
  }
  if (args.Has("binarize")) client::Binarize(&m);
  if (args.Has("standardize")) client::StandardizeRows(&m);
  if (args.Has("normalize")) client::NormalizeRows(&m);
  return m;
}

std::string ToJson(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions opts;
  opts.always_print_primitive_fields = true;
  opts.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, opts);
  return out;
}

std::string EnergyName(const v1::EnergyConfig& e) {
  std::string name = absl::AsciiStrToLower(
      v1::EnergyFamily_Name(e.family()).substr(std::string("ENERGY_FAMILY_").size()));
  switch (e.family()) {
    case v1::ENERGY_FAMILY_POLYNOMIAL:
      return absl::StrCat(name, " n=", e.degree(), e.rectified() ? " rectified" : "");
    case v1::ENERGY_FAMILY_EXPONENTIAL:
    case v1::ENERGY_FAMILY_LSE:
    case v1::ENERGY_FAMILY_GAUSSIAN:
      return absl::StrCat(name, " beta=", e.beta());
    case v1::ENERGY_FAMILY_GENERAL:
      return absl::StrCat(name, " ", v1::Similarity_Name(e.similarity()), " ",
                          v1::Separation_Name(e.separation()), " beta=", e.beta());
    default:
      return name;
  }
}

}  // namespace engram::cli
