// A CPU emulation of the slice of CUDA that csrc/cuda/routing_kernels.cuh uses, so that the
// CUDA kernels' own source runs (and is tested, under ThreadSanitizer too) without a GPU.
//
// For correctness only, never for speed.
//
// * launch(threads, kernel, grid, shared_bytes, args...) runs the blocks of `grid` one after
//   another. A block's threads are fibers (ucontext) of the calling OS thread: each runs until
//   it reaches a barrier or ends, then the next runs, in thread order; a barrier opens when
//   every thread it waits for has arrived. threadIdx, blockIdx, blockDim and gridDim are per
//   fiber. Fibers instead of OS threads: a block of 256 threads is 256 cheap context switches
//   per barrier, not 256 wake-ups by the OS scheduler.
// * __syncthreads() is a barrier of the block; __shfl_xor_sync exchanges values through a
//   per-warp buffer between two barriers of the warp's 32 threads (every lane must take part,
//   as the kernels' full masks say). A barrier some threads never reach (threads that diverge
//   around __syncthreads) stops the program with a message, where a GPU would hang.
// * Dynamic shared memory (CAPSROUTING_DYNAMIC_SHARED) is one buffer per block, filled with
//   0xFF bytes (NaN as float or double) before every block, so that a read of shared memory
//   no thread of the block wrote shows up in the results. Static __shared__ arrays are not
//   emulated: the kernels have none.
// * Under ThreadSanitizer (-fsanitize=thread) every fiber is a thread to it, fiber switches
//   carry no ordering, and the barriers alone order one thread's accesses before another's
//   (release on arrival, acquire on leaving): two threads touching the same shared-memory
//   word, one of them writing, with no barrier between them, is reported as a data race,
//   whatever order the fibers happened to run in.
// * Include this header before the kernels; it needs C++17 and POSIX ucontext.
#pragma once

#include <ucontext.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <tuple>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#define CUDA_EMULATION_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define CUDA_EMULATION_TSAN 1
#endif
#endif

#ifdef CUDA_EMULATION_TSAN
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
#endif

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cuda_emulation {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;  // the kernels keep a few small arrays per thread

// The happens-before edges ThreadSanitizer is told about (no-ops in a normal build).
inline void release(void* address) {
#ifdef CUDA_EMULATION_TSAN
  __tsan_release(address);
#else
  (void)address;
#endif
}
inline void acquire(void* address) {
#ifdef CUDA_EMULATION_TSAN
  __tsan_acquire(address);
#else
  (void)address;
#endif
}

// A barrier of `count` threads: arrivals are counted; the scheduler opens it when all are in.
struct Barrier {
  explicit Barrier(int count_) : count(count_) {}
  const int count;
  // Written by the fibers and read by the scheduler: atomics, so that this bookkeeping gives
  // ThreadSanitizer neither a race to report nor an ordering that would hide one.
  std::atomic<int> arrived{0};
  std::atomic<unsigned> generation{0};
};

struct Warp {
  Barrier barrier{kWarpSize};
  double slots[kWarpSize];  // float and double values pass through a double unchanged
};

struct Block;

// What a thread of the emulated GPU knows about itself, and its fiber.
struct ThreadContext {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  Block* block = nullptr;
  ucontext_t fiber;
  void* tsan_fiber = nullptr;
  std::atomic<const Barrier*> waiting_on{nullptr};  // the barrier it waits at, if any
  std::atomic<unsigned> waiting_generation{0};
  std::atomic<bool> done{false};
};

struct Block {
  explicit Block(int threads) : barrier(threads), warps(threads / kWarpSize) {}
  Barrier barrier;
  std::vector<Warp> warps;
  std::vector<unsigned char> shared;
  ucontext_t scheduler;
  void* tsan_scheduler = nullptr;
  int start_edge = 0;  // its address: the ordering of the block's set-up before its threads
};

// The fiber running now (one OS thread runs them all); set by the scheduler, read by the fiber.
inline std::atomic<ThreadContext*>& current() {
  static std::atomic<ThreadContext*> running{nullptr};
  return running;
}
inline ThreadContext& context() { return *current().load(std::memory_order_relaxed); }

// From a fiber back to the scheduler. Only a finished thread's last switch orders what it did
// before what the scheduler does next (reading the results, freeing the block).
inline void yield_to_scheduler(bool finished = false) {
  ThreadContext& ctx = context();
#ifdef CUDA_EMULATION_TSAN
  __tsan_switch_to_fiber(ctx.block->tsan_scheduler, finished ? 0 : 1 /* __tsan_switch_to_fiber_no_sync */);
#else
  (void)finished;
#endif
  swapcontext(&ctx.fiber, &ctx.block->scheduler);
}

inline void arrive_and_wait(Barrier& barrier) {
  ThreadContext& ctx = context();
  release(&barrier);
  const unsigned generation = barrier.generation.load(std::memory_order_relaxed);
  ctx.waiting_generation.store(generation, std::memory_order_relaxed);
  ctx.waiting_on.store(&barrier, std::memory_order_relaxed);
  barrier.arrived.fetch_add(1, std::memory_order_relaxed);
  while (barrier.generation.load(std::memory_order_relaxed) == generation) yield_to_scheduler();
  acquire(&barrier);
}

template <typename Kernel, typename... Args>
struct FiberStart {
  Kernel kernel;
  std::tuple<Args...> args;
  static void entry(unsigned high, unsigned low) {  // makecontext passes int arguments only
    auto* self = reinterpret_cast<FiberStart*>((uintptr_t(high) << 32) | uintptr_t(low));
    ThreadContext& ctx = context();
    acquire(&ctx.block->start_edge);
    std::apply(self->kernel, self->args);
    ctx.done.store(true, std::memory_order_relaxed);
    yield_to_scheduler(true);  // never resumed
  }
};

// Runs `kernel(args...)` on every block of `grid`, `threads` threads per block (a multiple of
// the warp size), with `shared_bytes` of dynamic shared memory per block.
template <typename Kernel, typename... Args>
void launch(int threads, Kernel kernel, dim3 grid, size_t shared_bytes, Args... args) {
  if (threads <= 0 || threads % kWarpSize != 0) {
    std::fprintf(stderr, "cuda_emulation: %d threads per block: must be a positive multiple of %d\n", threads, kWarpSize);
    std::abort();
  }
  FiberStart<Kernel, Args...> start{kernel, std::make_tuple(args...)};
  const uintptr_t start_address = reinterpret_cast<uintptr_t>(&start);
  std::vector<std::unique_ptr<unsigned char[]>> stacks(threads);
  for (auto& stack : stacks) stack.reset(new unsigned char[kStackBytes]);
  const unsigned blocks = grid.x * grid.y * grid.z;
  for (unsigned n = 0; n < blocks; ++n) {
    Block block(threads);
    block.shared.assign(shared_bytes, 0xFF);
#ifdef CUDA_EMULATION_TSAN
    block.tsan_scheduler = __tsan_get_current_fiber();
#endif
    std::vector<ThreadContext> contexts(threads);
    for (int t = 0; t < threads; ++t) {
      ThreadContext& ctx = contexts[t];
      ctx.thread_idx = dim3(unsigned(t));
      ctx.block_idx = dim3(n % grid.x, (n / grid.x) % grid.y, n / (grid.x * grid.y));
      ctx.block_dim = dim3(unsigned(threads));
      ctx.grid_dim = grid;
      ctx.block = &block;
      getcontext(&ctx.fiber);
      ctx.fiber.uc_stack.ss_sp = stacks[t].get();
      ctx.fiber.uc_stack.ss_size = kStackBytes;
      ctx.fiber.uc_link = nullptr;
      makecontext(&ctx.fiber, reinterpret_cast<void (*)()>(&FiberStart<Kernel, Args...>::entry), 2,
                  unsigned(start_address >> 32), unsigned(start_address & 0xFFFFFFFFu));
#ifdef CUDA_EMULATION_TSAN
      ctx.tsan_fiber = __tsan_create_fiber(0);
#endif
    }
    release(&block.start_edge);  // arguments, contexts and shared memory, before any thread reads them
    std::vector<Barrier*> barriers = {&block.barrier};
    for (auto& warp : block.warps) barriers.push_back(&warp.barrier);
    for (int finished = 0; finished < threads;) {
      bool progress = false;
      for (auto& ctx : contexts) {
        if (ctx.done.load(std::memory_order_relaxed)) continue;
        const Barrier* waiting = ctx.waiting_on.load(std::memory_order_relaxed);
        if (waiting && waiting->generation.load(std::memory_order_relaxed) == ctx.waiting_generation.load(std::memory_order_relaxed))
          continue;  // its barrier is still closed
        ctx.waiting_on.store(nullptr, std::memory_order_relaxed);
        current().store(&ctx, std::memory_order_relaxed);
#ifdef CUDA_EMULATION_TSAN
        __tsan_switch_to_fiber(ctx.tsan_fiber, 1 /* __tsan_switch_to_fiber_no_sync */);
#endif
        swapcontext(&block.scheduler, &ctx.fiber);
        current().store(nullptr, std::memory_order_relaxed);
        progress = true;
        finished += ctx.done.load(std::memory_order_relaxed);
      }
      for (Barrier* barrier : barriers) {  // open every barrier all its threads have reached
        if (barrier->arrived.load(std::memory_order_relaxed) == barrier->count) {
          barrier->arrived.store(0, std::memory_order_relaxed);
          barrier->generation.fetch_add(1, std::memory_order_relaxed);
          progress = true;
        }
      }
      if (!progress) {
        std::fprintf(stderr, "cuda_emulation: block %u: threads wait at a barrier that others never reach "
                     "(a __syncthreads or __shfl_xor_sync not executed by every thread)\n", n);
        std::exit(1);  // a failure, not a crash: what a GPU would do is hang
      }
    }
#ifdef CUDA_EMULATION_TSAN
    for (auto& ctx : contexts) __tsan_destroy_fiber(ctx.tsan_fiber);
#endif
  }
}

inline unsigned char* dynamic_shared() { return context().block->shared.data(); }

inline void syncthreads() { arrive_and_wait(context().block->barrier); }

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
  arrive_and_wait(warp.barrier);  // every lane's value is in
  const T other = static_cast<T>(warp.slots[lane ^ unsigned(lane_mask)]);
  arrive_and_wait(warp.barrier);  // every lane has read before any slot is written again
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
