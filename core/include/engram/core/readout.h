// The value readout of a hetero-associative (key -> value) bank: each
// stored pattern xi_mu carries a value v_mu of its own dimension M, and a
// state x reads out
//
//   r(x) = sum_mu p_mu(x) v_mu,
//
// with p the separation weights of the energy at x:
//   - LSE, GAUSSIAN, EXPONENTIAL and GENERAL/SOFTMAX: p = softmax(beta S(xi, x)),
//     attention with the patterns as keys (Ramsauer et al.'s pattern
//     projection; Nadaraya-Watson kernel regression);
//   - GENERAL/SPARSEMAX and GENERAL/ENTMAX15: p = sparsemax(beta S) or
//     1.5-entmax(beta S), exactly zero outside a support;
//   - GENERAL/LOG_SUM_RELU: p uniform over the patterns whose support
//     holds x (Epanechnikov kernel regression; zeros outside every support);
//   - GENERAL/MAX: p is one-hot on the most similar pattern (first on ties);
//   - CLASSICAL, POLYNOMIAL, GENERAL/IDENTITY and GENERAL/POLYNOMIAL: the
//     unnormalised weights p_mu = F'(S(xi_mu, x)) (the linear associator /
//     bidirectional associative memory readout).
// After one step from a query this is one attention layer; at a fixed point
// of a sharp softmax it is the value of the memory found.
//
//   std::vector<float> r(bank.spec().value_dim);
//   ValueReadout(energy, bank.value(0), bank.spec().value_dim, x, r.data());
//
// Numerics: the similarities are computed first (f32 dot products, the
// weights in double), so every thread's partial sum is relative to the same
// maximum and no rescaling is needed to merge them: the partials (f32 sums
// over contiguous row ranges) are added in double in range order.
#ifndef ENGRAM_CORE_READOUT_H_
#define ENGRAM_CORE_READOUT_H_

#include "engram/core/energy.h"

namespace engram::core {

// `values` holds energy.patterns().rows x value_dim floats (row-major, the
// value of pattern mu at values + mu * value_dim); `out` receives
// value_dim floats (zeros for an empty bank). x has energy.dim() floats.
// With `log_norm`, a softmax readout also gives log sum_mu exp(beta S_mu),
// the log of its normaliser (what merging readouts over parts of a bank
// needs, see partials.h); the other readouts give 0.
void ValueReadout(const EnergyFunction& energy, const float* values, int value_dim,
                  const float* x, float* out, double* log_norm = nullptr);

// A part of a bank's readout for merging (partials.h): the readout over
// energy's rows into partial->value (value_dim floats) and, for the softmax
// readouts, the log of its normaliser into partial->value_log_norm; for a
// log-sum-ReLU partial (EnergyFunction::Partial's, at the same x) the log
// of its support's size. Not for a sparse separation's candidates: their
// readout comes with EnergyFunction::ThresholdPartial.
void ValueReadoutPartial(const EnergyFunction& energy, const float* values, int value_dim,
                         const float* x, StepPartial* partial);

// The normalised or unnormalised weights p_mu(x) described above;
// `p` has energy.patterns().rows slots.
void ReadoutWeights(const EnergyFunction& energy, const float* x, double* p,
                    double* log_norm = nullptr);

}  // namespace engram::core

#endif  // ENGRAM_CORE_READOUT_H_
