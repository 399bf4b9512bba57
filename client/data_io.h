// Reading and writing pattern matrices: NumPy .npy (v1-v3, C order, any
// numeric dtype), CSV (one pattern per line) and IDX (MNIST / Fashion-MNIST
// format, optionally gzip-compressed), plus the preprocessing a user wants
// before storing images (binarise, normalise, row ranges).
//
//   ENGRAM_ASSIGN_OR_RETURN(Matrix m, LoadMatrix("train-images-idx3-ubyte.gz"));
//   Binarize(&m);   // sign(pixel - image mean), the bipolar images of the survey
//
// Thread-safety: pure functions.
#ifndef ENGRAM_CLIENT_DATA_IO_H_
#define ENGRAM_CLIENT_DATA_IO_H_

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace engram::client {

// rows x cols floats, row-major. A 3-d IDX/npy array (n, 28, 28) becomes
// rows = n, cols = 28 * 28.
struct Matrix {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<float> data;
  const float* row(int64_t r) const { return data.data() + r * cols; }
  float* row(int64_t r) { return data.data() + r * cols; }
};

// Chooses the reader by extension: .npy, .csv / .txt, otherwise IDX (.gz or
// raw). INVALID_ARGUMENT on a malformed file, NOT_FOUND if it cannot be
// opened.
absl::StatusOr<Matrix> LoadMatrix(const std::string& path);
absl::StatusOr<Matrix> LoadNpy(const std::string& path);
absl::StatusOr<Matrix> LoadCsv(const std::string& path);
absl::StatusOr<Matrix> LoadIdx(const std::string& path);

// Writes float32 .npy (shape rows x cols).
absl::Status SaveNpy(const std::string& path, const Matrix& m);

// Keeps rows [offset, offset + limit) (limit < 0: to the end).
absl::Status SliceRows(Matrix* m, int64_t offset, int64_t limit);

// Each row -> sign(x - mean(row)), ties to +1.
void Binarize(Matrix* m);
// Each row -> row / |row| (rows of zeros unchanged).
void NormalizeRows(Matrix* m);
// Each row -> (row - mean(row)) / std(row).
void StandardizeRows(Matrix* m);

// Corruptions for trying out retrieval. Flip: a fraction of coordinates
// negated (exactly round(fraction * cols) per row). Noise: add N(0, sigma^2).
// Mask: a fraction of coordinates hidden (set to `fill`, or to random +-1 when
// `bipolar`), and the returned clamp mask marks the known (kept) coordinates.
void FlipFraction(Matrix* m, double fraction, std::mt19937_64& rng);
void AddNoise(Matrix* m, double sigma, std::mt19937_64& rng);
std::vector<bool> MaskFraction(Matrix* m, double fraction, bool bipolar,
                               std::mt19937_64& rng);

}  // namespace engram::client

#endif  // ENGRAM_CLIENT_DATA_IO_H_
