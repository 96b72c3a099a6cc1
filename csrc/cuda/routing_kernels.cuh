// CUDA kernels of the routing ops: DESIGN.md §2-§3 for GPUs without Triton.
//
// The kernels alone: no ATen or CUDA-runtime include, so that the same source also compiles
// for the CPU under csrc/emulation/cuda_emulation.h (tests/cpp/test_routing_cuda_emulated.cpp).
// routing_cuda.cu holds the ATen launchers; both launch through run_forward / run_backward
// below, so the emulated test runs the exact grids and shared-memory sizes of the real ones.
//
// Three kernels, each a block of kThreads threads that works on one J x Dout tile at a
// time. Element e = j*Dout + d of a tile belongs to thread e % kThreads ("owned"
// elements, at most kOwned per thread since J*Dout <= 2048): what a thread accumulates
// over the input capsules or the batch lives in its registers, and the tiles the whole
// block reads (u_hat, V, g_s) live in shared memory.
//
// The routing options of DESIGN.md §6 arrive as one Options struct of device pointers and
// flags: bias and logit_prior (acc_t copies) are read from global memory where used (bias
// once per iteration, the prior row of i with its logits), leaky changes the softmax of
// warp 0; the couplings are stored from shared memory, dprior from one register per j.
// Each kernel is instantiated twice (kWithOptions); the plain one, which run_forward / run_backward
// pick when no option the op reads is on, compiles every option out: the code from before the options.
//
// forward           grid (B): per routing iteration, one pass over the input capsules.
//                   Per i the block rebuilds the u_hat tile from W[i] and u[b, i] in
//                   shared memory, threads j take the logits (prior + dot against V),
//                   warp 0 the softmax over j, and each thread adds c * u_hat to its owned
//                   s; the bias joins s after the pass. The last iteration's threads j
//                   also write c[b, i, j] when the couplings are asked for.
//                   Registers: s (owned); shared: u_hat tile, V, couplings.
// backward_reduce   grid (B): phase 1 of §3; passes r = R-1..1 reduce A(r) over the input
//                   capsules, which gives g_s(r) for every r (written out, B*R*J*Dout).
//                   One pass (detach_inner, no option gradient): g_s(R) alone, no A.
//                   Registers: s(r), g_v(r), g_s(r), A(r), sum of A (owned).
// backward_inputs   grid (I, K chunks): phase 2; the block owns input capsule i and loops
//                   over the batch in order: rebuild the tile, sum du_hat over the
//                   iterations (detach_inner: c g_s of the last one alone), write du[b, i]
//                   (or du_hat), and add du_hat (x) u[b, i] to the dW[i] elements each
//                   thread owns, in registers. Threads j < J also sum g_b(r)[i, j] over the
//                   iterations and the batch in one register each: dprior[i, j], written by
//                   the K-chunk 0 block. No atomics: each dW and dprior element has one
//                   owner, summed in batch order -- the same bits every run. When
//                   J*Dout*Din exceeds the registers, blocks split Din (K chunks).
//                   dbias, the sum of g_s(r) over the batch and the iterations, is left to the
//                   launcher (a reduction of the g_s scratch).
//
// One batch element per block leaves a large GPU idle when B is small; this kernel is
// the portable fallback, the Triton backend is the fast path.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "../routing_math.h"

// Dynamic shared memory of a block; the emulation defines its own.
#ifndef CAPSROUTING_DYNAMIC_SHARED
#define CAPSROUTING_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace capsrouting::cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Largest J*Dout (64 * 32) over the threads of a block: owned elements per thread.
constexpr int kMaxTile = 2048;
constexpr int kOwned = kMaxTile / kThreads;

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename T>
__device__ __forceinline__ T warp_max(T x) {
  for (int offset = 16; offset > 0; offset /= 2) x = max(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

struct Sizes {
  int64_t B, I, J, D, K, R;  // K = 0: predictions given (route)
  __host__ __device__ int64_t JD() const { return J * D; }
};

// The routing options of DESIGN.md §6 as the kernels read them: device pointers (null: the
// option is off or the output not wanted) and flags. All null / false: the plain op.
template <typename scalar_t, typename acc_t>
struct Options {
  const acc_t* bias = nullptr;   // (J*Dout), added to s(r) in every iteration
  const acc_t* prior = nullptr;  // (I, J), the first iteration's logits
  bool leaky = false;            // an extra zero logit in every softmax
  bool detach_inner = false;     // backward: u_hat gets c(R) g_s(R) alone
  bool full = true;              // backward: g_s(r) and g_b(r) of every iteration (RoutingOptions::full_backward)
  scalar_t* couplings = nullptr; // forward out: the last iteration's couplings (B, I, J)
  acc_t* dprior = nullptr;       // backward out: sum of g_b(r) over the batch and the iterations (I, J)

  __host__ __device__ const acc_t* prior_row(int64_t i, int64_t J) const {
    return prior != nullptr ? prior + i * J : nullptr;
  }
  // The first iteration's couplings are 1/J: its logits are all zero and nothing leaks.
  __host__ __device__ bool uniform_start() const { return prior == nullptr && !leaky; }

  // Whether the forward / the backward kernels read any of them (else their plain instantiation
  // runs): the backward reads neither the bias nor the couplings, the forward none of the rest.
  bool in_forward() const { return bias != nullptr || prior != nullptr || leaky || couplings != nullptr; }
  bool in_backward() const { return prior != nullptr || leaky || detach_inner || !full || dprior != nullptr; }
};

// The options as a kernel instantiation sees them. kWithOptions: a copy of Options behind
// accessors. Plain (below): no members, every accessor a constexpr null / false / true, so that
// each option's branch, pointer and register is compiled out.
template <typename scalar_t, typename acc_t, bool kWithOptions>
struct KernelOptions {
  static constexpr bool with_options = true;
  Options<scalar_t, acc_t> opt;
  __host__ __device__ const acc_t* bias() const { return opt.bias; }
  __host__ __device__ const acc_t* prior_row(int64_t i, int64_t J) const { return opt.prior_row(i, J); }
  __host__ __device__ bool leaky() const { return opt.leaky; }
  __host__ __device__ bool detach_inner() const { return opt.detach_inner; }
  __host__ __device__ bool full() const { return opt.full; }
  __host__ __device__ scalar_t* couplings() const { return opt.couplings; }
  __host__ __device__ acc_t* dprior() const { return opt.dprior; }
  __host__ __device__ bool uniform_start() const { return opt.uniform_start(); }
};

template <typename scalar_t, typename acc_t>
struct KernelOptions<scalar_t, acc_t, false> {
  static constexpr bool with_options = false;
  __host__ __device__ static constexpr const acc_t* bias() { return nullptr; }
  __host__ __device__ static constexpr const acc_t* prior_row(int64_t, int64_t) { return nullptr; }
  __host__ __device__ static constexpr bool leaky() { return false; }
  __host__ __device__ static constexpr bool detach_inner() { return false; }
  __host__ __device__ static constexpr bool full() { return true; }
  __host__ __device__ static constexpr scalar_t* couplings() { return nullptr; }
  __host__ __device__ static constexpr acc_t* dprior() { return nullptr; }
  __host__ __device__ static constexpr bool uniform_start() { return true; }
};

// The u_hat tile of (b, i) into shared memory: from W[i] and u[b, i], or read when given.
template <typename scalar_t, typename acc_t>
__device__ void load_predictions(const Sizes& sz, const scalar_t* x, const scalar_t* W, int64_t b, int64_t i,
                                 acc_t* uh) {
  const int64_t JD = sz.JD();
  if (W != nullptr) {
    const scalar_t* u = x + (b * sz.I + i) * sz.K;
    const scalar_t* w = W + i * JD * sz.K;
    for (int64_t e = threadIdx.x; e < JD; e += kThreads) {
      acc_t acc = 0;
      for (int64_t k = 0; k < sz.K; ++k) acc += static_cast<acc_t>(w[e * sz.K + k]) * static_cast<acc_t>(u[k]);
      uh[e] = acc;
    }
  } else {
    const scalar_t* row = x + (b * sz.I + i) * JD;
    for (int64_t e = threadIdx.x; e < JD; e += kThreads) uh[e] = static_cast<acc_t>(row[e]);
  }
}

// out[j] = plus[j] + dot(X[j], Y[j]) over Dout (plus null: 0), for j = thread, thread + kThreads, ...
template <typename acc_t>
__device__ void row_dots(const Sizes& sz, const acc_t* X, const acc_t* Y, acc_t* out,
                         const acc_t* plus = nullptr) {
  for (int64_t j = threadIdx.x; j < sz.J; j += kThreads) {
    acc_t dot = 0;
    for (int64_t d = 0; d < sz.D; ++d) dot += X[j * sz.D + d] * Y[j * sz.D + d];
    out[j] = plus != nullptr ? plus[j] + dot : dot;
  }
}

// Warp 0: c = softmax over j of the logits in c (J <= 64, two per lane at most); leaky: with
// an extra zero logit, c[j] = exp(c[j] - m) / (exp(-m) + sum_k exp(c[k] - m)), m = max(0, max_k c[k]).
// When g is given, g[j] becomes the coupling gradient c[j] * (g[j] - sum_k c[k] g[k]) -- the
// same form with the leak, whose logit is a constant.
template <typename acc_t>
__device__ void softmax_warp0(const Sizes& sz, bool leaky, acc_t* c, acc_t* g) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  acc_t m = leaky ? acc_t(0) : c[0];
  for (int64_t j = lane; j < sz.J; j += 32) m = max(m, c[j]);
  m = warp_max(m);
  acc_t sum = 0;
  for (int64_t j = lane; j < sz.J; j += 32) {
    c[j] = exp_of(c[j] - m);
    sum += c[j];
  }
  sum = warp_sum(sum);
  if (leaky) sum += exp_of(-m);  // once, after the lanes are summed
  acc_t weighted = 0;
  for (int64_t j = lane; j < sz.J; j += 32) {
    c[j] /= sum;
    if (g != nullptr) weighted += c[j] * g[j];
  }
  if (g == nullptr) return;
  weighted = warp_sum(weighted);
  for (int64_t j = lane; j < sz.J; j += 32) g[j] = c[j] * (g[j] - weighted);
}

// The whole block: c = couplings of the tile uh of input capsule i against V(r-1) = Vp (with
// the prior and the leak of opt), and, unless g is null, g = their gradients c * (g_c - sum c g_c)
// with g_c = dot(g_s, uh), g_s = gs. Ends synchronized.
template <typename Opt, typename acc_t>
__device__ void couplings_and_gradients(const Sizes& sz, const Opt& opt, int64_t i, const acc_t* uh, const acc_t* Vp,
                                        const acc_t* gs, acc_t* c, acc_t* g) {
  row_dots(sz, uh, Vp, c, opt.prior_row(i, sz.J));
  // Only an option leaves g null (backward_inputs without g_b); the plain op does not check, so
  // that the two loops over j fuse as they did before the options.
  if (!Opt::with_options || g != nullptr) row_dots(sz, uh, gs, g);
  __syncthreads();
  softmax_warp0(sz, opt.leaky(), c, g);
  __syncthreads();
}

// The options come last: the plain instantiation's empty KernelOptions moves no other parameter.
template <typename scalar_t, typename acc_t, bool kWithOptions>
__global__ void __launch_bounds__(kThreads, 1)
    forward_kernel(Sizes sz, const scalar_t* __restrict__ x, const scalar_t* __restrict__ W, scalar_t* __restrict__ v,
                   acc_t* __restrict__ s_saved, acc_t* __restrict__ Vprev_saved,
                   KernelOptions<scalar_t, acc_t, kWithOptions> opt) {
  CAPSROUTING_DYNAMIC_SHARED(shared_bytes);
  const int64_t JD = sz.JD(), R = sz.R, b = blockIdx.x;
  acc_t* uh = reinterpret_cast<acc_t*>(shared_bytes);
  acc_t* V = uh + JD;
  acc_t* c = V + JD;
  for (int64_t e = threadIdx.x; e < JD; e += kThreads) V[e] = 0;
  const acc_t uniform = acc_t(1) / acc_t(sz.J);
  for (int64_t r = 0; r < R; ++r) {
    const bool uniform_now = r == 0 && opt.uniform_start();
    scalar_t* c_out = r == R - 1 ? opt.couplings() : nullptr;
    acc_t s[kOwned] = {};
    for (int64_t i = 0; i < sz.I; ++i) {
      __syncthreads();  // the previous tile is consumed
      load_predictions(sz, x, W, b, i, uh);
      __syncthreads();
      if (!uniform_now) {  // r = 0: V = 0, so the logits are the prior
        row_dots(sz, uh, V, c, opt.prior_row(i, sz.J));
        __syncthreads();
        softmax_warp0(sz, opt.leaky(), c, static_cast<acc_t*>(nullptr));
        __syncthreads();
      }
      if (c_out != nullptr)
        for (int64_t j = threadIdx.x; j < sz.J; j += kThreads)
          c_out[(b * sz.I + i) * sz.J + j] = static_cast<scalar_t>(uniform_now ? uniform : c[j]);
#pragma unroll
      for (int q = 0; q < kOwned; ++q) {
        const int64_t e = threadIdx.x + q * kThreads;
        if (e < JD) s[q] += (uniform_now ? uniform : c[e / sz.D]) * uh[e];
      }
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kOwned; ++q) {
      const int64_t e = threadIdx.x + q * kThreads;
      if (e < JD) {
        if (opt.bias() != nullptr) s[q] += opt.bias()[e];  // DESIGN.md §6: s(r) is saved with the bias in it
        s_saved[(b * R + r) * JD + e] = s[q];
        Vprev_saved[(b * R + r) * JD + e] = V[e];
        uh[e] = s[q];
      }
    }
    __syncthreads();
    row_dots(sz, uh, uh, c);  // |s_j|^2
    __syncthreads();
    for (int64_t j = threadIdx.x; j < sz.J; j += kThreads) c[j] = squash_factor(c[j]);
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kOwned; ++q) {
      const int64_t e = threadIdx.x + q * kThreads;
      if (e < JD) {
        const acc_t out = c[e / sz.D] * s[q];
        V[e] += out;
        if (r == R - 1) v[b * JD + e] = static_cast<scalar_t>(out);
      }
    }
  }
}

template <typename scalar_t, typename acc_t, bool kWithOptions>
__global__ void __launch_bounds__(kThreads, 1)
    backward_reduce_kernel(Sizes sz, const scalar_t* __restrict__ x, const scalar_t* __restrict__ W,
                           const scalar_t* __restrict__ grad_v, const acc_t* __restrict__ s_saved,
                           const acc_t* __restrict__ Vprev_saved, acc_t* __restrict__ gs_saved,
                           KernelOptions<scalar_t, acc_t, kWithOptions> opt) {
  CAPSROUTING_DYNAMIC_SHARED(shared_bytes);
  const int64_t JD = sz.JD(), R = sz.R, b = blockIdx.x;
  acc_t* uh = reinterpret_cast<acc_t*>(shared_bytes);  // also s(r) while g_s(r) is formed
  acc_t* gs = uh + JD;                                 // also g_v(r) while g_s(r) is formed
  acc_t* Vp = gs + JD;
  acc_t* c = Vp + JD;
  acc_t* g = c + sz.J;
  acc_t A_suffix[kOwned] = {};
  for (int64_t r = R - 1; r >= 0; --r) {
    acc_t s[kOwned], gv[kOwned];
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kOwned; ++q) {
      const int64_t e = threadIdx.x + q * kThreads;
      if (e < JD) {
        s[q] = s_saved[(b * R + r) * JD + e];
        gv[q] = A_suffix[q] + (r == R - 1 ? static_cast<acc_t>(grad_v[b * JD + e]) : acc_t(0));
        uh[e] = s[q];
        gs[e] = gv[q];
        Vp[e] = Vprev_saved[(b * R + r) * JD + e];
      }
    }
    __syncthreads();
    row_dots(sz, uh, uh, c);  // |s_j|^2
    row_dots(sz, uh, gs, g);  // dot(s_j, g_v_j)
    __syncthreads();
    for (int64_t j = threadIdx.x; j < sz.J; j += kThreads) {
      g[j] = squash_backward_df2(c[j]) * g[j];
      c[j] = squash_factor(c[j]);
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kOwned; ++q) {  // g_s(r) = f g_v + f2' dot(s, g_v) s
      const int64_t e = threadIdx.x + q * kThreads;
      if (e < JD) {
        const acc_t out = c[e / sz.D] * gv[q] + g[e / sz.D] * s[q];
        gs[e] = out;
        gs_saved[(b * R + r) * JD + e] = out;
      }
    }
    if (r == 0 || !opt.full()) break;  // not full: phase 2 reads g_s(R) alone
    acc_t A[kOwned] = {};
    for (int64_t i = 0; i < sz.I; ++i) {
      __syncthreads();
      load_predictions(sz, x, W, b, i, uh);
      __syncthreads();
      couplings_and_gradients(sz, opt, i, uh, Vp, gs, c, g);
#pragma unroll
      for (int q = 0; q < kOwned; ++q) {
        const int64_t e = threadIdx.x + q * kThreads;
        if (e < JD) A[q] += g[e / sz.D] * uh[e];
      }
    }
#pragma unroll
    for (int q = 0; q < kOwned; ++q) A_suffix[q] += A[q];
  }
}

template <typename scalar_t, typename acc_t, bool kWithOptions>
__global__ void __launch_bounds__(kThreads, 1)
    backward_inputs_kernel(Sizes sz, int64_t k_per_block, const scalar_t* __restrict__ x,
                           const scalar_t* __restrict__ W, const acc_t* __restrict__ gs_saved,
                           const acc_t* __restrict__ Vprev_saved, scalar_t* __restrict__ dx,
                           scalar_t* __restrict__ dW, KernelOptions<scalar_t, acc_t, kWithOptions> opt) {
  CAPSROUTING_DYNAMIC_SHARED(shared_bytes);
  const int64_t JD = sz.JD(), R = sz.R, I = sz.I, K = sz.K, i = blockIdx.x;
  const int64_t k_begin = blockIdx.y * k_per_block;
  const int64_t k_count = W != nullptr ? min(k_per_block, K - k_begin) : 0;
  acc_t* uh = reinterpret_cast<acc_t*>(shared_bytes);
  acc_t* gs = uh + JD;  // also du_hat once the iterations are summed
  acc_t* Vp = gs + JD;
  acc_t* c = Vp + JD;
  acc_t* g = c + sz.J;
  acc_t* u = g + sz.J;  // u[b, i, :], K numbers
  const acc_t uniform = acc_t(1) / acc_t(sz.J);
  acc_t dW_owned[kOwned] = {};  // dW[i, e, k] for (e, k) = divmod(thread + q*kThreads, k_count)
  acc_t dprior_owned = 0;       // dprior[i, thread] for the threads j < J (J <= 64 < kThreads)
  const int64_t r_begin = opt.full() ? 0 : R - 1;
  for (int64_t b = 0; b < sz.B; ++b) {
    __syncthreads();
    if (W != nullptr)
      for (int64_t k = threadIdx.x; k < K; k += kThreads) u[k] = static_cast<acc_t>(x[(b * I + i) * K + k]);
    load_predictions(sz, x, W, b, i, uh);
    acc_t duh[kOwned] = {};
    for (int64_t r = r_begin; r < R; ++r) {
      // DESIGN.md §6: with detach_inner only the last iteration's c g_s reaches u_hat; V(0) = 0
      // cancels the first iteration's g_b V term in any case. Block-uniform, as the barriers need.
      const bool takes_c = r == R - 1 || !opt.detach_inner();
      const bool takes_gb = r > 0 && !opt.detach_inner();
      const bool wants_gb = takes_gb || opt.dprior() != nullptr;
      if (!takes_c && !wants_gb) continue;  // only dbias needs this g_s(r): the launcher sums it
      __syncthreads();
      for (int64_t e = threadIdx.x; e < JD; e += kThreads) {
        gs[e] = gs_saved[(b * R + r) * JD + e];
        Vp[e] = Vprev_saved[(b * R + r) * JD + e];
      }
      __syncthreads();
      // Uniform couplings need no softmax, unless g_b is wanted for dprior.
      const bool uniform_now = r == 0 && opt.uniform_start() && !wants_gb;
      if (!uniform_now) couplings_and_gradients(sz, opt, i, uh, Vp, gs, c, wants_gb ? g : nullptr);
#pragma unroll
      for (int q = 0; q < kOwned; ++q) {
        const int64_t e = threadIdx.x + q * kThreads;
        if (e >= JD) continue;
        acc_t term = 0;
        if (takes_c) term = (uniform_now ? uniform : c[e / sz.D]) * gs[e];
        if (takes_gb) term += g[e / sz.D] * Vp[e];
        duh[q] += term;
      }
      if (opt.dprior() != nullptr && threadIdx.x < sz.J) dprior_owned += g[threadIdx.x];
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kOwned; ++q) {
      const int64_t e = threadIdx.x + q * kThreads;
      if (e < JD) {
        if (W == nullptr)
          dx[(b * I + i) * JD + e] = static_cast<scalar_t>(duh[q]);
        else
          gs[e] = duh[q];
      }
    }
    if (W == nullptr) continue;
    __syncthreads();
    if (blockIdx.y == 0) {  // du[b, i, k] = sum_e W[i, e, k] du_hat[e]: one warp per k
      const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
      for (int64_t k = warp; k < K; k += kWarps) {
        acc_t partial = 0;
        for (int64_t e = lane; e < JD; e += 32) partial += static_cast<acc_t>(W[(i * JD + e) * K + k]) * gs[e];
        partial = warp_sum(partial);
        if (lane == 0) dx[(b * I + i) * K + k] = static_cast<scalar_t>(partial);
      }
    }
#pragma unroll
    for (int q = 0; q < kOwned; ++q) {
      const int64_t idx = threadIdx.x + q * kThreads;
      if (idx < JD * k_count) dW_owned[q] += gs[idx / k_count] * u[k_begin + idx % k_count];
    }
  }
  if (opt.dprior() != nullptr && blockIdx.y == 0 && threadIdx.x < sz.J)
    opt.dprior()[i * sz.J + threadIdx.x] = dprior_owned;
  if (W == nullptr) return;
#pragma unroll
  for (int q = 0; q < kOwned; ++q) {
    const int64_t idx = threadIdx.x + q * kThreads;
    if (idx < JD * k_count) dW[(i * JD + idx / k_count) * K + k_begin + idx % k_count] = static_cast<scalar_t>(dW_owned[q]);
  }
}

// The launch sequence of each op, for any launcher: launch(kernel, grid, shared_bytes, args...)
// runs `kernel` on `grid` blocks of kThreads threads (routing_cuda.cu: the CUDA stream;
// the tests: the CPU emulation).
// opt.couplings, when set, receives the last iteration's couplings. Each op runs the kernels'
// plain instantiation unless an option it reads is on (Options::in_forward, in_backward).
template <typename scalar_t, typename acc_t, typename Launcher>
void run_forward(const Sizes& sz, Launcher&& launch, const Options<scalar_t, acc_t>& opt, const scalar_t* x,
                 const scalar_t* W, scalar_t* v, acc_t* s_saved, acc_t* Vprev_saved) {
  const size_t bytes = (2 * sz.JD() + sz.J) * sizeof(acc_t);
  if (opt.in_forward())
    launch(forward_kernel<scalar_t, acc_t, true>, dim3(unsigned(sz.B)), bytes, sz, x, W, v, s_saved, Vprev_saved,
           KernelOptions<scalar_t, acc_t, true>{opt});
  else
    launch(forward_kernel<scalar_t, acc_t, false>, dim3(unsigned(sz.B)), bytes, sz, x, W, v, s_saved, Vprev_saved,
           KernelOptions<scalar_t, acc_t, false>{});
}

template <bool kWithOptions, typename scalar_t, typename acc_t, typename Launcher>
void run_backward_kernels(const Sizes& sz, Launcher&& launch, const KernelOptions<scalar_t, acc_t, kWithOptions>& opt,
                          const scalar_t* x, const scalar_t* W, const scalar_t* grad_v, const acc_t* s_saved,
                          const acc_t* Vprev_saved, acc_t* gs_saved, scalar_t* dx, scalar_t* dW) {
  launch(backward_reduce_kernel<scalar_t, acc_t, kWithOptions>, dim3(unsigned(sz.B)),
         (3 * sz.JD() + 2 * sz.J) * sizeof(acc_t), sz, x, W, grad_v, s_saved, Vprev_saved, gs_saved, opt);
  // dW elements per block are capped by the registers: kOwned per thread.
  const int64_t k_per_block = W != nullptr ? std::max<int64_t>(1, std::min<int64_t>(sz.K, kMaxTile / sz.JD())) : 1;
  const int64_t k_blocks = W != nullptr ? (sz.K + k_per_block - 1) / k_per_block : 1;
  launch(backward_inputs_kernel<scalar_t, acc_t, kWithOptions>, dim3(unsigned(sz.I), unsigned(k_blocks)),
         (3 * sz.JD() + 2 * sz.J + sz.K) * sizeof(acc_t), sz, k_per_block, x, W, gs_saved, Vprev_saved, dx, dW, opt);
}

// dx is du (W given) or du_hat; dW is written only when W is given, opt.dprior when set.
// gs_saved: B*R*J*Dout scratch, g_s(r) on return (g_s(R) alone when !opt.full): dbias is its sum
// over the batch and the iterations.
template <typename scalar_t, typename acc_t, typename Launcher>
void run_backward(const Sizes& sz, Launcher&& launch, const Options<scalar_t, acc_t>& opt, const scalar_t* x,
                  const scalar_t* W, const scalar_t* grad_v, const acc_t* s_saved, const acc_t* Vprev_saved,
                  acc_t* gs_saved, scalar_t* dx, scalar_t* dW) {
  if (opt.in_backward())
    run_backward_kernels(sz, launch, KernelOptions<scalar_t, acc_t, true>{opt}, x, W, grad_v, s_saved, Vprev_saved,
                         gs_saved, dx, dW);
  else
    run_backward_kernels(sz, launch, KernelOptions<scalar_t, acc_t, false>{}, x, W, grad_v, s_saved, Vprev_saved,
                         gs_saved, dx, dW);
}

// J <= 64, Dout <= 32, Din <= 16: what the tiles and registers above are sized for.
inline bool sizes_supported(const Sizes& sz) { return sz.JD() <= kMaxTile && sz.J <= 64 && sz.D <= 32 && sz.K <= 16; }

}  // namespace capsrouting::cuda
