// Scratch tensors of the CPU kernels, reused by the next call on the same thread.
//
// Why. A multi-megabyte buffer freshly allocated per call is mapped and zero-filled by the
// kernel page by page: at the paper's layer with 8 samples the small-batch kernels' scratch
// (predictions and kept couplings, about 14 MB per forward+backward) cost more in page faults
// than the arithmetic (measured: 3,800 page faults and 5-10 ms per forward+backward, against
// about 2.5 ms without them). A buffer kept per calling thread and slot is faulted in once.
//
// A slot also remembers what its contents were computed from (`scratch_written_from`), so that
// a backward can reuse its forward's predictions instead of reading W again (`scratch_holds`):
// at one sample, reading W is most of the work. The inputs are recognized by their storages,
// held weakly (a freed tensor never matches a new one that reuses its memory), offsets, sizes
// and version counters (an in-place change does not match either).
//
// Rules. A scratch tensor lives until the next request of the same slot on the same thread, so
// it must never leave the kernel (no result aliases it) and a call must not ask for one slot
// twice. Buffers above kMaxCachedBytes (a forced path on a large batch) are not kept: they are
// allocated per call as before, so the memory held stays bounded (a few slots of at most that).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

namespace capsrouting::cpu {

enum class Scratch { predictions, kept, count };

constexpr int64_t kMaxCachedBytes = int64_t(32) << 20;

namespace workspace_detail {

// One tensor as a scratch buffer's contents may depend on it.
struct TensorIdentity {
  std::optional<c10::weak_intrusive_ptr<c10::StorageImpl>> storage;  // empty: an undefined tensor
  const void* data = nullptr;
  std::vector<int64_t> sizes;
  uint32_t version = 0;

  static TensorIdentity of(const at::Tensor& t) {
    TensorIdentity id;
    if (!t.defined()) return id;
    id.storage = t.storage().getWeakStorageImpl();
    id.data = t.data_ptr();
    id.sizes = t.sizes().vec();
    id.version = t._version();
    return id;
  }

  bool is(const at::Tensor& t) const {
    if (!t.defined() || !storage.has_value()) return !t.defined() && !storage.has_value();
    const auto alive = storage->lock();
    return alive && alive.get() == t.storage().unsafeGetStorageImpl() && data == t.data_ptr() &&
           t.sizes().equals(sizes) && version == t._version();
  }
};

struct Slot {
  at::Tensor buffer;
  bool last_request_cached = false;          // the last scratch() returned a view of buffer
  std::vector<TensorIdentity> written_from;  // empty: contents of no known origin
};

inline Slot& slot_of(Scratch slot) {
  thread_local std::array<Slot, size_t(Scratch::count)> slots;
  return slots[size_t(slot)];
}

}  // namespace workspace_detail

// An uninitialized tensor of `sizes` and `dtype` on the CPU, from this thread's buffer for `slot`.
inline at::Tensor scratch(Scratch slot, at::IntArrayRef sizes, at::ScalarType dtype) {
  auto& s = workspace_detail::slot_of(slot);
  s.written_from.clear();
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  const int64_t bytes = c10::multiply_integers(sizes) * int64_t(c10::elementSize(dtype));
  s.last_request_cached = bytes <= kMaxCachedBytes;
  if (!s.last_request_cached) return at::empty(sizes, options);
  if (!s.buffer.defined() || s.buffer.numel() < bytes) s.buffer = at::empty({bytes}, options.dtype(at::kByte));
  // The CPU allocator aligns every buffer to 64 bytes, which the kernels' vector loads rely on.
  return s.buffer.narrow(0, 0, bytes).view(dtype).view(sizes);
}

// Records that the tensor last returned for `slot` now holds values computed from `from` alone.
inline void scratch_written_from(Scratch slot, std::initializer_list<at::Tensor> from) {
  auto& s = workspace_detail::slot_of(slot);
  s.written_from.clear();
  if (!s.last_request_cached) return;  // not kept: nothing to reuse
  for (const auto& t : from) s.written_from.push_back(workspace_detail::TensorIdentity::of(t));
}

// Whether the next scratch() of `slot` with the same sizes and dtype as the one recorded by
// scratch_written_from will still hold the values computed from exactly `from`.
inline bool scratch_holds(Scratch slot, std::initializer_list<at::Tensor> from) {
  const auto& s = workspace_detail::slot_of(slot);
  if (s.written_from.size() != from.size()) return false;
  size_t k = 0;
  for (const auto& t : from)
    if (!s.written_from[k++].is(t)) return false;
  return true;
}

}  // namespace capsrouting::cpu
