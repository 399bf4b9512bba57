#include "client/png_grid.h"

#include <png.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace engram::client {

absl::Status ParseImageShape(const std::string& spec, int dim, int* height, int* width) {
  if (spec.empty()) {
    const int r = static_cast<int>(std::lround(std::sqrt(dim)));
    if (r * r != dim) {
      return absl::InvalidArgumentError(absl::StrCat(
          "dimension ", dim, " is not a square; give --image-shape HxW"));
    }
    *height = *width = r;
    return absl::OkStatus();
  }
  std::vector<std::string> parts = absl::StrSplit(spec, 'x');
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], height) ||
      !absl::SimpleAtoi(parts[1], width) || *height < 1 || *width < 1 ||
      *height * *width != dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--image-shape must be HxW with H*W = ", dim, ", got '", spec, "'"));
  }
  return absl::OkStatus();
}

absl::Status WritePngGrid(const std::string& path, const std::vector<std::vector<float>>& tiles,
                          int height, int width, int columns, int scale) {
  if (tiles.empty()) return absl::InvalidArgumentError("no images to write");
  columns = std::max(1, std::min<int>(columns, tiles.size()));
  scale = std::max(1, scale);
  const int rows = static_cast<int>((tiles.size() + columns - 1) / columns);
  const int pad = 2;
  const int img_w = columns * (width * scale + pad) + pad;
  const int img_h = rows * (height * scale + pad) + pad;
  std::vector<unsigned char> pixels(static_cast<size_t>(img_w) * img_h, 64);
  for (size_t t = 0; t < tiles.size(); ++t) {
    const auto& tile = tiles[t];
    if (static_cast<int>(tile.size()) != height * width) {
      return absl::InvalidArgumentError(absl::StrCat(
          "image ", t, " has ", tile.size(), " values, not ", height, "x", width));
    }
    const auto [lo_it, hi_it] = std::minmax_element(tile.begin(), tile.end());
    const float lo = *lo_it, hi = *hi_it;
    const float range = hi > lo ? hi - lo : 1.f;
    const int x0 = pad + static_cast<int>(t % columns) * (width * scale + pad);
    const int y0 = pad + static_cast<int>(t / columns) * (height * scale + pad);
    for (int y = 0; y < height * scale; ++y) {
      for (int x = 0; x < width * scale; ++x) {
        const float v = (tile[(y / scale) * width + x / scale] - lo) / range;
        pixels[static_cast<size_t>(y0 + y) * img_w + x0 + x] =
            static_cast<unsigned char>(std::clamp(v, 0.f, 1.f) * 255.f + 0.5f);
      }
    }
  }
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return absl::UnavailableError(absl::StrCat("cannot write '", path, "'"));
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (png == nullptr || info == nullptr || setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    std::fclose(f);
    return absl::InternalError(absl::StrCat("libpng failed writing '", path, "'"));
  }
  png_init_io(png, f);
  png_set_IHDR(png, info, img_w, img_h, 8, PNG_COLOR_TYPE_GRAY, PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  for (int y = 0; y < img_h; ++y) png_write_row(png, pixels.data() + static_cast<size_t>(y) * img_w);
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  if (std::fclose(f) != 0) return absl::UnavailableError(absl::StrCat("cannot write '", path, "'"));
  return absl::OkStatus();
}

}  // namespace engram::client
