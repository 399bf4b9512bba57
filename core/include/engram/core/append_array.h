// The building blocks that let versions of a bank share their rows: an
// array that copies of it grow without copying (AppendArray), and an id ->
// row map whose copies share all but their recent entries (IdRowMap).
//
//   AppendArray<float> a;
//   a.Append(rows.data(), rows.size());
//   AppendArray<float> b = a;   // shares a's elements; O(1)
//   b.Append(more.data(), more.size());  // a still sees only its own
//
// An AppendArray is a length over a shared buffer with spare capacity. The
// elements below a copy's length never change once written, so copies read
// them without any lock. Growing claims the buffer's next free slots with
// one compare-and-swap: the first copy to grow from the buffer's end writes
// in place (O(appended)); any other copy, or a buffer without room, moves to
// a new buffer of twice the length (amortised O(1) per element). The
// buffer goes when its last copy does.
//
// Thread-safety: concurrent const calls are safe, as are concurrent calls
// on distinct copies (including ones that grow); one object needs exclusive
// access to change.
#ifndef ENGRAM_CORE_APPEND_ARRAY_H_
#define ENGRAM_CORE_APPEND_ARRAY_H_

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/types/span.h"

namespace engram::core {

template <typename T>
class AppendArray {
 public:
  AppendArray() = default;
  AppendArray(const AppendArray&) = default;
  AppendArray& operator=(const AppendArray&) = default;
  // A moved-from array is empty.
  AppendArray(AppendArray&& other) noexcept
      : buf_(std::move(other.buf_)), size_(std::exchange(other.size_, 0)) {}
  AppendArray& operator=(AppendArray&& other) noexcept {
    buf_ = std::move(other.buf_);
    size_ = std::exchange(other.size_, 0);
    return *this;
  }

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  const T* data() const { return buf_ ? buf_->items.get() : nullptr; }
  const T& operator[](size_t i) const { return buf_->items[i]; }
  const T* begin() const { return data(); }
  const T* end() const { return data() + size_; }
  operator absl::Span<const T>() const { return absl::Span<const T>(data(), size_); }
  // Whether this array and `other` read the same buffer (no copy between
  // them).
  bool SharesBufferWith(const AppendArray& other) const {
    return buf_ != nullptr && buf_ == other.buf_;
  }

  // Adds m value-initialised elements at the end and returns them, writable
  // until this array is next copied or grown.
  T* Grow(size_t m) {
    if (m == 0) return buf_ ? buf_->items.get() + size_ : nullptr;
    size_t expected = size_;
    if (buf_ == nullptr || buf_->capacity - size_ < m ||
        !buf_->used.compare_exchange_strong(expected, size_ + m, std::memory_order_acq_rel)) {
      Reallocate(std::max({size_ + m, 2 * size_, size_t{16}}));
      buf_->used.store(size_ + m, std::memory_order_relaxed);
    }
    T* out = buf_->items.get() + size_;
    std::fill(out, out + m, T{});
    size_ += m;
    return out;
  }
  void Append(const T* p, size_t m) { std::copy(p, p + m, Grow(m)); }
  void push_back(T v) { *Grow(1) = std::move(v); }

  // Empty, releasing this copy's share of the buffer.
  void clear() {
    buf_.reset();
    size_ = 0;
  }

 private:
  struct Buffer {
    explicit Buffer(size_t cap) : items(new T[cap]), capacity(cap) {}
    std::unique_ptr<T[]> items;
    size_t capacity;
    // Slots [0, used) are claimed by some copy; only grows.
    std::atomic<size_t> used{0};
  };

  // A new buffer of `capacity` slots holding this array's elements (moved
  // when no other copy reads the old buffer).
  void Reallocate(size_t capacity) {
    auto fresh = std::make_shared<Buffer>(capacity);
    if (size_ > 0 && buf_.use_count() == 1) {
      std::move(buf_->items.get(), buf_->items.get() + size_, fresh->items.get());
    } else if (size_ > 0) {
      std::copy(begin(), end(), fresh->items.get());
    }
    buf_ = std::move(fresh);
  }

  std::shared_ptr<Buffer> buf_;
  size_t size_ = 0;
};

// id -> row for rows that are only appended: this copy's recent entries
// and a stack of shared, immutable levels, each more than twice the size of
// the one above it (a new level merges into those not that much larger, as
// a binary counter carries). A copy costs O(kRecent + levels); an insert
// is amortised O(log size); a lookup tries the recent entries and at most
// log2(size / kRecent) + 1 levels.
class IdRowMap {
 public:
  std::optional<int64_t> Find(uint64_t id) const {
    if (auto it = recent_.find(id); it != recent_.end()) return it->second;
    for (auto level = levels_.rbegin(); level != levels_.rend(); ++level) {
      if (auto it = (*level)->find(id); it != (*level)->end()) return it->second;
    }
    return std::nullopt;
  }
  bool contains(uint64_t id) const { return Find(id).has_value(); }

  // Maps a new id (not present) to `row`.
  void Insert(uint64_t id, int64_t row) {
    recent_.emplace(id, row);
    if (recent_.size() >= kRecent) Spill();
  }

 private:
  static constexpr size_t kRecent = 1024;
  using Map = absl::flat_hash_map<uint64_t, int64_t>;

  void Spill() {
    auto level = std::make_shared<Map>(std::move(recent_));
    recent_ = Map();
    while (!levels_.empty() && levels_.back()->size() <= 2 * level->size()) {
      // A level no other copy holds is merged into in place.
      auto merged = levels_.back().use_count() == 1
                        ? std::const_pointer_cast<Map>(levels_.back())
                        : std::make_shared<Map>(*levels_.back());
      merged->insert(level->begin(), level->end());
      levels_.pop_back();
      level = std::move(merged);
    }
    levels_.push_back(std::move(level));
  }

  std::vector<std::shared_ptr<const Map>> levels_;  // oldest (largest) first
  Map recent_;
};

}  // namespace engram::core

#endif  // ENGRAM_CORE_APPEND_ARRAY_H_
