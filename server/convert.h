// Conversions between engram.v1 protos and core types, with the request
// validation that belongs to the wire format (enum ranges, packed sizes).
//
//   absl::StatusOr<core::EnergyConfig> cfg = EnergyFromProto(req.energy(), kind);
//
// Thread-safety: pure functions.
#ifndef ENGRAM_SERVER_CONVERT_H_
#define ENGRAM_SERVER_CONVERT_H_

#include "absl/status/statusor.h"
#include "engram/core/dynamics.h"
#include "engram/core/filter.h"
#include "engram/core/registry.h"
#include "engram/core/sampler.h"
#include "engram/v1/engram.pb.h"

namespace engram::server {

// INVALID_ARGUMENT for an UNSPECIFIED or unknown kind.
absl::StatusOr<core::StateKind> KindFromProto(int kind);
v1::StateKind KindToProto(core::StateKind kind);

// INVALID_ARGUMENT for an unknown precision; UNSPECIFIED is F32.
absl::StatusOr<core::Precision> PrecisionFromProto(int precision);

// Fills defaults (family by kind, degree 3, beta 1) and range-checks enums.
// Does not check the config against the bank kind (core does).
absl::StatusOr<core::EnergyConfig> EnergyFromProto(const v1::EnergyConfig& p,
                                                   core::StateKind kind);
v1::EnergyConfig EnergyToProto(const core::EnergyConfig& c);

// Fills option defaults and range-checks the dynamics enum.
absl::StatusOr<core::RetrieveOptions> OptionsFromProto(const v1::RetrieveOptions& p);

v1::StopReason StopReasonToProto(core::StopReason r);

// Sample options with defaults filled; INVALID_ARGUMENT on unknown enums.
// `kind` picks the default sampler.
absl::StatusOr<core::SampleOptions> SampleOptionsFromProto(const v1::SampleRequest& p,
                                                           core::StateKind kind);
void SampleBatchToProto(const core::SampleBatch& b, v1::SampleResponse* out);

void SummaryToProto(const core::BankSummary& s, v1::BankInfo* out);

// Seconds (as the proto carries them) to milliseconds; INVALID_ARGUMENT
// above core::kMaxTtlMs, naming `field`.
absl::StatusOr<int64_t> TtlFromProto(uint64_t seconds, const char* field);

// A pattern's labels, not yet normalized (core checks them).
core::Labels LabelsFromProto(const v1::Labels& p);
void LabelsToProto(const core::Labels& l, v1::Labels* out);

// A filter's conditions; INVALID_ARGUMENT for a condition without a test
// or one core::ValidateFilter rejects.
absl::StatusOr<core::Filter> FilterFromProto(const v1::Filter& p);

// The nearest stored memory with its payload (row -1: left unset).
void MemoryToProto(const core::NearestMemory& m, const std::string& payload, v1::Memory* out);
// One query's retrieval: final state, nearest memory, energies, steps.
void RetrievalToProto(const core::Trajectory& t, const core::NearestMemory& m,
                      const std::string& payload, v1::RetrieveResult* out);
// A SampleStream frame of the states at one step.
v1::SampleFrame SampleFrameToProto(int step, double sigma,
                                   const std::vector<std::vector<float>>& states);
// The last frame of a SampleStream: the whole response.
v1::SampleFrame LastSampleFrame(v1::SampleResponse result);

}  // namespace engram::server

#endif  // ENGRAM_SERVER_CONVERT_H_
