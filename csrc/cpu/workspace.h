// Scratch tensors of the CPU kernels, reused by the next call on the same thread.
//
// Why. A multi-megabyte buffer freshly allocated per call is mapped and zero-filled by the
// kernel page by page: at the paper's layer with 8 samples the small-batch kernels' scratch
// (predictions and kept couplings, about 14 MB per forward+backward) cost more in page faults
// than the arithmetic (measured: 3,800 page faults and 5-10 ms per forward+backward, against
// about 2.5 ms without them). A buffer kept per calling thread and slot is faulted in once.
//
// Rules. A scratch tensor lives until the next request of the same slot on the same thread, so
// it must never leave the kernel (no result aliases it) and a call must not ask for one slot
// twice. Buffers above kMaxCachedBytes (a forced path on a large batch) are not kept: they are
// allocated per call as before, so the memory held stays bounded (a few slots of at most that).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>

namespace capsrouting::cpu {

enum class Scratch { predictions, kept, count };

constexpr int64_t kMaxCachedBytes = int64_t(32) << 20;

// An uninitialized tensor of `sizes` and `dtype` on the CPU, from this thread's buffer for `slot`.
inline at::Tensor scratch(Scratch slot, at::IntArrayRef sizes, at::ScalarType dtype) {
  thread_local std::array<at::Tensor, size_t(Scratch::count)> buffers;
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  const int64_t bytes = c10::multiply_integers(sizes) * int64_t(c10::elementSize(dtype));
  if (bytes > kMaxCachedBytes) return at::empty(sizes, options);
  at::Tensor& buffer = buffers[size_t(slot)];
  if (!buffer.defined() || buffer.numel() < bytes) buffer = at::empty({bytes}, options.dtype(at::kByte));
  // The CPU allocator aligns every buffer to 64 bytes, which the kernels' vector loads rely on.
  return buffer.narrow(0, 0, bytes).view(dtype).view(sizes);
}

}  // namespace capsrouting::cpu
