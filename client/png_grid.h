// Writes images (e.g. samples of a 28x28 image bank) as one grayscale PNG
// grid, each tile scaled from its own min..max to 0..255.
//
//   WritePngGrid("samples.png", tiles, /*height=*/28, /*width=*/28, /*columns=*/8);
#ifndef ENGRAM_CLIENT_PNG_GRID_H_
#define ENGRAM_CLIENT_PNG_GRID_H_

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace engram::client {

// Every tile has height * width values, row-major. INVALID_ARGUMENT when a
// tile has another size; UNAVAILABLE when the file cannot be written.
absl::Status WritePngGrid(const std::string& path, const std::vector<std::vector<float>>& tiles,
                          int height, int width, int columns, int scale = 2);

// "28x28" -> (28, 28); a bare dimension N that is a perfect square -> its root.
absl::Status ParseImageShape(const std::string& spec, int dim, int* height, int* width);

}  // namespace engram::client

#endif  // ENGRAM_CLIENT_PNG_GRID_H_
