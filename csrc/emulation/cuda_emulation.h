// A CPU emulation of the slice of CUDA that csrc/cuda/routing_kernels.cuh uses, so that the
// CUDA kernels' own source runs (and is tested, under ThreadSanitizer too) without a GPU.
//
// For correctness only, never for speed: every thread of a block is a real OS thread.
//
// * launch(kernel, grid, shared_bytes, args...) runs the blocks of `grid` one after another,
//   each by kBlockThreads threads that persist over the launch; threadIdx, blockIdx,
//   blockDim and gridDim are per thread.
// * __syncthreads() is a barrier of the block; __shfl_xor_sync exchanges values through a
//   per-warp buffer between two barriers of the warp's 32 threads (every lane must take
//   part, as the kernels' full masks say).
// * Dynamic shared memory (CAPSROUTING_DYNAMIC_SHARED) is one buffer per block, filled with
//   0xFF bytes (NaN as float or double) before every block, so that a read of shared memory
//   no thread of the block wrote shows up in the results. Static __shared__ arrays are not
//   emulated: the kernels have none.
// * Include this header before the kernels; it needs C++20 (std::atomic wait/notify).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cuda_emulation {

constexpr int kWarpSize = 32;

// A reusable barrier of `count` threads. The last thread to arrive resets the count and
// publishes a new generation with release order; the others wait (futex-backed atomic wait)
// for it with acquire order, so everything written before the barrier is visible after it,
// to ThreadSanitizer as well.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void arrive_and_wait() {
    const unsigned generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == count_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_acq_rel);
      generation_.notify_all();
      return;
    }
    while (generation_.load(std::memory_order_acquire) == generation) generation_.wait(generation, std::memory_order_acquire);
  }

 private:
  const int count_;
  std::atomic<int> arrived_{0};
  std::atomic<unsigned> generation_{0};
};

struct Warp {
  Barrier barrier{kWarpSize};
  double slots[kWarpSize];  // float and double values pass through a double unchanged
};

struct Block {
  explicit Block(int threads) : barrier(threads), warps(threads / kWarpSize) {}
  Barrier barrier;
  std::vector<Warp> warps;
  std::vector<unsigned char> shared;
};

// What a thread of the emulated GPU knows about itself.
struct ThreadContext {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  Block* block = nullptr;
};

inline ThreadContext& context() {
  thread_local ThreadContext ctx;
  return ctx;
}

// Runs `kernel(args...)` on every block of `grid`, `threads` threads per block (a multiple of
// the warp size), with `shared_bytes` of dynamic shared memory per block.
template <typename Kernel, typename... Args>
void launch(int threads, Kernel kernel, dim3 grid, size_t shared_bytes, Args... args) {
  if (threads <= 0 || threads % kWarpSize != 0) {
    std::fprintf(stderr, "cuda_emulation: %d threads per block: must be a positive multiple of %d\n", threads, kWarpSize);
    std::abort();
  }
  Block block(threads);
  block.shared.resize(shared_bytes);
  const unsigned blocks = grid.x * grid.y * grid.z;
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      ThreadContext& ctx = context();
      ctx.thread_idx = dim3(unsigned(t));
      ctx.block_dim = dim3(unsigned(threads));
      ctx.grid_dim = grid;
      ctx.block = &block;
      for (unsigned n = 0; n < blocks; ++n) {
        // Thread 0 refills shared memory between two barriers: no thread of the previous
        // block still reads it, none of this block reads it yet.
        block.barrier.arrive_and_wait();
        if (t == 0) std::memset(block.shared.data(), 0xFF, block.shared.size());
        block.barrier.arrive_and_wait();
        ctx.block_idx = dim3(n % grid.x, (n / grid.x) % grid.y, n / (grid.x * grid.y));
        kernel(args...);
      }
      ctx.block = nullptr;
    });
  }
  for (auto& worker : workers) worker.join();
}

inline unsigned char* dynamic_shared() { return context().block->shared.data(); }

inline void syncthreads() { context().block->barrier.arrive_and_wait(); }

template <typename T>
T shfl_xor(unsigned mask, T value, int lane_mask) {
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "cuda_emulation: __shfl_xor_sync emulates full warps only (mask 0x%x)\n", mask);
    std::abort();
  }
  ThreadContext& ctx = context();
  Warp& warp = ctx.block->warps[ctx.thread_idx.x / kWarpSize];
  const unsigned lane = ctx.thread_idx.x % kWarpSize;
  warp.slots[lane] = static_cast<double>(value);
  warp.barrier.arrive_and_wait();  // every lane's value is in
  const T other = static_cast<T>(warp.slots[lane ^ unsigned(lane_mask)]);
  warp.barrier.arrive_and_wait();  // every lane has read before any slot is written again
  return other;
}

}  // namespace cuda_emulation

// The CUDA names the kernels use.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (::cuda_emulation::context().thread_idx)
#define blockIdx (::cuda_emulation::context().block_idx)
#define blockDim (::cuda_emulation::context().block_dim)
#define gridDim (::cuda_emulation::context().grid_dim)
#define __syncthreads() ::cuda_emulation::syncthreads()
#define __shfl_xor_sync(mask, value, lane_mask) ::cuda_emulation::shfl_xor(mask, value, lane_mask)
#define CAPSROUTING_DYNAMIC_SHARED(name) unsigned char* name = ::cuda_emulation::dynamic_shared()

// CUDA's device max/min overloads, found by unqualified calls in the kernels.
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }
template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
