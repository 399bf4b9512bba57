#include "client/data_io.h"

#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <numeric>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace engram::client {
namespace {

absl::StatusOr<std::string> ReadAll(const std::string& path) {
  // gzread reads gzip and plain files alike.
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr) {
    return absl::NotFoundError(absl::StrCat("cannot open '", path, "'"));
  }
  std::string out;
  char buf[1 << 16];
  int n;
  while ((n = gzread(f, buf, sizeof(buf))) > 0) out.append(buf, n);
  const bool error = n < 0;
  gzclose(f);
  if (error) return absl::InvalidArgumentError(absl::StrCat("cannot read '", path, "'"));
  return out;
}

template <typename T>
T LoadLE(const char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

uint32_t LoadBE32(const unsigned char* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
}

// Converts `count` elements of the given numpy dtype descriptor to float.
absl::Status ConvertNpy(const std::string& descr, const char* src, int64_t count,
                        float* dst) {
  if (descr.size() < 3) return absl::InvalidArgumentError("npy: bad dtype " + descr);
  const char order = descr[0];
  const char kind = descr[1];
  const int size = std::atoi(descr.c_str() + 2);
  if (order == '>' && size > 1) {
    return absl::InvalidArgumentError("npy: big-endian arrays are not supported");
  }
  auto each = [&](auto tag) {
    using T = decltype(tag);
    for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<float>(LoadLE<T>(src + i * sizeof(T)));
  };
  if (kind == 'f' && size == 4) each(float{});
  else if (kind == 'f' && size == 8) each(double{});
  else if (kind == 'u' && size == 1) each(uint8_t{});
  else if (kind == 'i' && size == 1) each(int8_t{});
  else if (kind == 'u' && size == 2) each(uint16_t{});
  else if (kind == 'i' && size == 2) each(int16_t{});
  else if (kind == 'i' && size == 4) each(int32_t{});
  else if (kind == 'u' && size == 4) each(uint32_t{});
  else if (kind == 'i' && size == 8) each(int64_t{});
  else if (kind == 'b' && size == 1) each(uint8_t{});
  else return absl::InvalidArgumentError("npy: unsupported dtype " + descr);
  return absl::OkStatus();
}

// Value of key `key` in a numpy header dict like
// {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
std::string HeaderField(const std::string& header, const std::string& key) {
  const std::string pat = "'" + key + "'";
  size_t p = header.find(pat);
  if (p == std::string::npos) return "";
  p = header.find(':', p);
  if (p == std::string::npos) return "";
  ++p;
  while (p < header.size() && header[p] == ' ') ++p;
  if (header[p] == '(') {
    size_t e = header.find(')', p);
    return header.substr(p, e - p + 1);
  }
  if (header[p] == '\'') {
    size_t e = header.find('\'', p + 1);
    return header.substr(p + 1, e - p - 1);
  }
  size_t e = header.find_first_of(",}", p);
  return std::string(absl::StripAsciiWhitespace(header.substr(p, e - p)));
}

}  // namespace

absl::StatusOr<Matrix> LoadNpy(const std::string& path) {
  auto bytes = ReadAll(path);
  if (!bytes.ok()) return bytes.status();
  const std::string& b = *bytes;
  if (b.size() < 10 || std::memcmp(b.data(), "\x93NUMPY", 6) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("'", path, "' is not a .npy file"));
  }
  const int major = static_cast<unsigned char>(b[6]);
  size_t header_len, offset;
  if (major == 1) {
    header_len = LoadLE<uint16_t>(b.data() + 8);
    offset = 10;
  } else {
    if (b.size() < 12) return absl::InvalidArgumentError("npy: truncated header");
    header_len = LoadLE<uint32_t>(b.data() + 8);
    offset = 12;
  }
  if (offset + header_len > b.size()) return absl::InvalidArgumentError("npy: truncated header");
  const std::string header = b.substr(offset, header_len);
  const std::string descr = HeaderField(header, "descr");
  if (HeaderField(header, "fortran_order") == "True") {
    return absl::InvalidArgumentError("npy: Fortran-order arrays are not supported");
  }
  std::string shape = HeaderField(header, "shape");
  shape = std::string(absl::StripSuffix(absl::StripPrefix(shape, "("), ")"));
  std::vector<int64_t> dims;
  for (absl::string_view part : absl::StrSplit(shape, ',', absl::SkipWhitespace())) {
    int64_t d;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(part), &d) || d < 0) {
      return absl::InvalidArgumentError("npy: bad shape (" + shape + ")");
    }
    dims.push_back(d);
  }
  Matrix m;
  if (dims.empty()) {
    m.rows = 1;
    m.cols = 1;
  } else if (dims.size() == 1) {
    m.rows = 1;
    m.cols = dims[0];
  } else {
    m.rows = dims[0];
    m.cols = 1;
    for (size_t i = 1; i < dims.size(); ++i) m.cols *= dims[i];
  }
  const int64_t count = m.rows * m.cols;
  const int item = std::atoi(descr.c_str() + 2);
  const size_t data_off = offset + header_len;
  if (item <= 0 || data_off + count * static_cast<size_t>(item) > b.size()) {
    return absl::InvalidArgumentError("npy: file shorter than its shape says");
  }
  m.data.resize(count);
  if (auto s = ConvertNpy(descr, b.data() + data_off, count, m.data.data()); !s.ok()) return s;
  return m;
}

absl::StatusOr<Matrix> LoadCsv(const std::string& path) {
  auto bytes = ReadAll(path);
  if (!bytes.ok()) return bytes.status();
  Matrix m;
  int64_t line_no = 0;
  for (absl::string_view line : absl::StrSplit(*bytes, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    std::vector<float> row;
    bool header = false;
    for (absl::string_view cell : absl::StrSplit(line, absl::ByAnyChar(", \t;"), absl::SkipEmpty())) {
      float v;
      if (!absl::SimpleAtof(cell, &v)) {
        if (m.rows == 0 && row.empty()) {  // a header row before any data
          header = true;
          break;
        }
        return absl::InvalidArgumentError(absl::StrCat(
            path, ":", line_no, ": not a number: '", std::string(cell), "'"));
      }
      row.push_back(v);
    }
    if (header) continue;
    if (m.rows == 0) m.cols = static_cast<int64_t>(row.size());
    if (static_cast<int64_t>(row.size()) != m.cols) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ":", line_no, ": ", row.size(), " values; earlier rows have ", m.cols));
    }
    m.data.insert(m.data.end(), row.begin(), row.end());
    ++m.rows;
  }
  if (m.rows == 0) return absl::InvalidArgumentError(absl::StrCat("'", path, "' has no rows"));
  return m;
}

absl::StatusOr<Matrix> LoadIdx(const std::string& path) {
  auto bytes = ReadAll(path);
  if (!bytes.ok()) return bytes.status();
  const auto* b = reinterpret_cast<const unsigned char*>(bytes->data());
  const size_t size = bytes->size();
  if (size < 4 || b[0] != 0 || b[1] != 0) {
    return absl::InvalidArgumentError(absl::StrCat("'", path, "' is not an IDX file"));
  }
  const int type = b[2];
  const int ndim = b[3];
  if (ndim < 1 || size < 4 + 4 * static_cast<size_t>(ndim)) {
    return absl::InvalidArgumentError("idx: truncated header");
  }
  std::vector<int64_t> dims(ndim);
  for (int i = 0; i < ndim; ++i) dims[i] = LoadBE32(b + 4 + 4 * i);
  Matrix m;
  m.rows = dims[0];
  m.cols = 1;
  for (int i = 1; i < ndim; ++i) m.cols *= dims[i];
  const int64_t count = m.rows * m.cols;
  int item;
  switch (type) {
    case 0x08: case 0x09: item = 1; break;
    case 0x0B: item = 2; break;
    case 0x0C: case 0x0D: item = 4; break;
    case 0x0E: item = 8; break;
    default: return absl::InvalidArgumentError(absl::StrCat("idx: unknown type 0x", type));
  }
  const size_t off = 4 + 4 * ndim;
  if (off + count * static_cast<size_t>(item) > size) {
    return absl::InvalidArgumentError("idx: file shorter than its dimensions say");
  }
  m.data.resize(count);
  const unsigned char* p = b + off;
  for (int64_t i = 0; i < count; ++i, p += item) {
    switch (type) {
      case 0x08: m.data[i] = p[0]; break;
      case 0x09: m.data[i] = static_cast<int8_t>(p[0]); break;
      case 0x0B: m.data[i] = static_cast<int16_t>((p[0] << 8) | p[1]); break;
      case 0x0C: m.data[i] = static_cast<int32_t>(LoadBE32(p)); break;
      case 0x0D: {
        uint32_t u = LoadBE32(p);
        float f;
        std::memcpy(&f, &u, 4);
        m.data[i] = f;
        break;
      }
      case 0x0E: {
        uint64_t u = (uint64_t{LoadBE32(p)} << 32) | LoadBE32(p + 4);
        double d;
        std::memcpy(&d, &u, 8);
        m.data[i] = static_cast<float>(d);
        break;
      }
    }
  }
  return m;
}

absl::StatusOr<Matrix> LoadMatrix(const std::string& path) {
  std::string lower = absl::AsciiStrToLower(path);
  if (absl::EndsWith(lower, ".npy")) return LoadNpy(path);
  if (absl::EndsWith(lower, ".csv") || absl::EndsWith(lower, ".txt") ||
      absl::EndsWith(lower, ".csv.gz")) {
    return LoadCsv(path);
  }
  return LoadIdx(path);
}

absl::Status SaveNpy(const std::string& path, const Matrix& m) {
  std::string header = absl::StrCat("{'descr': '<f4', 'fortran_order': False, 'shape': (",
                                    m.rows, ", ", m.cols, "), }");
  // Total header (magic 10 bytes + dict + newline) padded to 64 bytes.
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::ofstream out(path, std::ios::binary);
  if (!out) return absl::UnavailableError(absl::StrCat("cannot write '", path, "'"));
  out.write("\x93NUMPY\x01\x00", 8);
  const uint16_t len = static_cast<uint16_t>(header.size());
  out.write(reinterpret_cast<const char*>(&len), 2);
  out.write(header.data(), header.size());
  out.write(reinterpret_cast<const char*>(m.data.data()), m.data.size() * sizeof(float));
  if (!out) return absl::UnavailableError(absl::StrCat("cannot write '", path, "'"));
  return absl::OkStatus();
}

absl::Status SliceRows(Matrix* m, int64_t offset, int64_t limit) {
  if (offset < 0 || offset > m->rows) {
    return absl::InvalidArgumentError(absl::StrCat(
        "offset ", offset, " is outside the file's ", m->rows, " rows"));
  }
  int64_t end = limit < 0 ? m->rows : std::min(m->rows, offset + limit);
  std::vector<float> data(m->data.begin() + offset * m->cols, m->data.begin() + end * m->cols);
  m->data = std::move(data);
  m->rows = end - offset;
  return absl::OkStatus();
}

void Binarize(Matrix* m) {
  for (int64_t r = 0; r < m->rows; ++r) {
    float* row = m->row(r);
    double mean = 0;
    for (int64_t i = 0; i < m->cols; ++i) mean += row[i];
    mean /= std::max<int64_t>(1, m->cols);
    for (int64_t i = 0; i < m->cols; ++i) row[i] = row[i] >= mean ? 1.f : -1.f;
  }
}

void NormalizeRows(Matrix* m) {
  for (int64_t r = 0; r < m->rows; ++r) {
    float* row = m->row(r);
    double sq = 0;
    for (int64_t i = 0; i < m->cols; ++i) sq += double{row[i]} * row[i];
    if (sq <= 0) continue;
    const float inv = static_cast<float>(1.0 / std::sqrt(sq));
    for (int64_t i = 0; i < m->cols; ++i) row[i] *= inv;
  }
}

void StandardizeRows(Matrix* m) {
  for (int64_t r = 0; r < m->rows; ++r) {
    float* row = m->row(r);
    double mean = 0, sq = 0;
    for (int64_t i = 0; i < m->cols; ++i) mean += row[i];
    mean /= std::max<int64_t>(1, m->cols);
    for (int64_t i = 0; i < m->cols; ++i) sq += (row[i] - mean) * (row[i] - mean);
    const double sd = std::sqrt(sq / std::max<int64_t>(1, m->cols));
    for (int64_t i = 0; i < m->cols; ++i) {
      row[i] = static_cast<float>(sd > 0 ? (row[i] - mean) / sd : 0.0);
    }
  }
}

void FlipFraction(Matrix* m, double fraction, std::mt19937_64& rng) {
  const int64_t flips = std::llround(fraction * m->cols);
  std::vector<int64_t> idx(m->cols);
  for (int64_t r = 0; r < m->rows; ++r) {
    std::iota(idx.begin(), idx.end(), 0);
    std::shuffle(idx.begin(), idx.end(), rng);
    for (int64_t j = 0; j < flips; ++j) m->row(r)[idx[j]] = -m->row(r)[idx[j]];
  }
}

void AddNoise(Matrix* m, double sigma, std::mt19937_64& rng) {
  std::normal_distribution<float> g(0.f, static_cast<float>(sigma));
  for (float& v : m->data) v += g(rng);
}

std::vector<bool> MaskFraction(Matrix* m, double fraction, bool bipolar,
                               std::mt19937_64& rng) {
  std::vector<bool> known(m->rows * m->cols, true);
  const int64_t hide = std::llround(fraction * m->cols);
  std::vector<int64_t> idx(m->cols);
  std::bernoulli_distribution coin(0.5);
  for (int64_t r = 0; r < m->rows; ++r) {
    std::iota(idx.begin(), idx.end(), 0);
    std::shuffle(idx.begin(), idx.end(), rng);
    for (int64_t j = 0; j < hide; ++j) {
      const int64_t i = idx[j];
      m->row(r)[i] = bipolar ? (coin(rng) ? 1.f : -1.f) : 0.f;
      known[r * m->cols + i] = false;
    }
  }
  return known;
}

}  // namespace engram::client
