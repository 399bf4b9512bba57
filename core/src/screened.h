// The screened softmax pass (see FusedPass on screened views).
#ifndef ENGRAM_CORE_SRC_SCREENED_H_
#define ENGRAM_CORE_SRC_SCREENED_H_

#include "fused.h"

namespace engram::core::internal {

// The screened softmax pass (see FusedPass): false when too many rows can be
// significant for the screen to save reads.
bool ScreenedPass(const PatternView& view, SimilarityKind similarity, const float* x,
                  double beta, float* acc, bool track_nearest, FusedSums* out);

}  // namespace engram::core::internal

#endif  // ENGRAM_CORE_SRC_SCREENED_H_
