// CPU kernels of the routing ops: DESIGN.md §2-§3 on a multicore CPU.
//
// Layout. Batch elements are processed L at a time (a "chunk": 16 for float32 and the
// half types, 8 for float64 -- one 64-byte SIMD vector). Every per-element
// quantity (a row of predictions, V, s, logits, couplings) is stored lane-minor,
// x[row][lane], so each inner loop is a vertical loop over the L elements of a
// chunk: no reduction runs along the vectorized dimension and the compiler emits plain
// SIMD multiply-adds. Padded lanes (B not a multiple of L) carry zeros throughout.
//
// Forward, parallel over groups of kGroup chunks. Per routing iteration, one pass over
// the input capsules i; for each i and chunk the predictions are rebuilt from W[i] into
// a (J*Dout, L) tile -- never u_hat as a whole -- followed by the logits against V,
// the softmax over j and the accumulation of s. A group shares each read of W[i]
// (J*Dout*Din numbers): one stream of W per group and iteration, not per element.
// State per chunk between iterations: V and s, J*Dout*L numbers each.
//
// Backward phase 1, parallel over groups of chunks: passes r = R-1..1 over the input
// capsules that only reduce A(r), giving g_s(r) for every r (lane-minor buffers, B*R*J*Dout).
// Phase 2, parallel over input capsules: for each i, every chunk in batch order rebuilds
// its tile and sums du_hat over the iterations (kept for all chunks: B*J*Dout per thread);
// du follows from W[i]. dW[i] is then formed in registers, kBlockK columns of Din at a
// time, one vector per column summing the chunks in order, and its lanes are added by a
// fixed tree. Each dW[i] belongs to one thread, so dW has the same bits whatever the
// number of threads.
//
// Routing options (DESIGN.md §6, OptionValues): a bias is added to s(r) after each pass (and
// saved with it); a logit prior enters every softmax (then the first iteration's couplings are
// no longer 1/J, nor with leaky routing, whose extra zero logit each softmax also takes); the
// forward can store the last iteration's couplings; phase 2 sums g_b into d logit_prior[i] (one
// thread per i, chunks in order, then the lanes: thread-independent bits) and, with detach_inner,
// keeps only c(R) g_s(R) in du_hat. With detach_inner and no bias or prior gradient wanted,
// phase 1 stops after g_s(R) and phase 2 visits only r = R: one pass.
//
// Registers: one vector per accumulator (a row dot, a column of du or of dW); tiles
// (J*Dout vectors) and the state of a group stay in L1/L2.
//
// Accumulation type acc_t: float for float/half/bfloat16 input, double for double.
#include "routing_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../routing_math.h"
#include "problem.h"
#include "routing_cpu_small_batch.h"
#include "simd.h"

namespace capsrouting::cpu {
namespace {

using simd::add_scaled_rows;
using simd::coupling_gradients;
using simd::couplings;
using simd::Lanes;
using simd::lanes_sum;
using simd::OptionValues;

// Batch elements per chunk: one 64-byte vector of the accumulation type (16 floats or
// 8 doubles), the SIMD dimension of every inner loop.
template <typename acc_t>
constexpr int64_t kLanes = simd::kLanes<acc_t>;
// Chunks that share one read of W[i] in a pass; their state (2 tiles each) stays in L2.
constexpr int64_t kGroup = 4;

// Columns of Din handled together in the backward: one accumulator register each. Din is padded
// to whole blocks of them (problem.h): the padded columns of W and u are zero.
constexpr int64_t kBlockK = kPadK;

// L lanes per chunk.
struct Sizes : ProblemSizes {
  int64_t chunks() const { return (B + L - 1) / L; }
  int64_t lanes(int64_t chunk) const { return std::min(L, B - chunk * L); }
};

// Rebuilds the predictions tile uh[jd] (one Lanes per row) of input capsule i for one chunk.
template <typename scalar_t, typename acc_t>
struct Predictions {
  using Vec = Lanes<acc_t>;
  Sizes sz;
  const acc_t* W = nullptr;        // (I, J*Dout, Kp) when the op has weights, Din zero-padded to Kp
  const Vec* u_lanes = nullptr;    // (chunks, I, Kp): input capsules, lane-minor, zero-padded
  const scalar_t* u_hat = nullptr; // (B, I, J*D): given predictions (route)

  void load(int64_t chunk, int64_t i, Vec* uh) const {
    const int64_t JD = sz.JD();
    if (W != nullptr) {
      const int64_t K = sz.K, Kp = sz.Kp();
      const acc_t* w = W + i * JD * Kp;
      const Vec* u = u_lanes + (chunk * sz.I + i) * Kp;
      int64_t jd = 0;
      for (; jd + 4 <= JD; jd += 4) {  // four rows at a time: independent chains share each u[k]
        Vec a0 = {}, a1 = {}, a2 = {}, a3 = {};
        const acc_t* w0 = w + jd * Kp;
        for (int64_t k = 0; k < K; ++k) {
          const Vec u_k = u[k];
          a0 += w0[k] * u_k;
          a1 += w0[Kp + k] * u_k;
          a2 += w0[2 * Kp + k] * u_k;
          a3 += w0[3 * Kp + k] * u_k;
        }
        uh[jd] = a0;
        uh[jd + 1] = a1;
        uh[jd + 2] = a2;
        uh[jd + 3] = a3;
      }
      for (; jd < JD; ++jd) {
        Vec acc = {};
        for (int64_t k = 0; k < K; ++k) acc += w[jd * Kp + k] * u[k];
        uh[jd] = acc;
      }
      return;
    }
    const int64_t lanes = sz.lanes(chunk);
    for (int64_t jd = 0; jd < JD; ++jd) uh[jd] = Vec{};
    for (int64_t l = 0; l < lanes; ++l) {
      const scalar_t* row = u_hat + ((chunk * sz.L + l) * sz.I + i) * JD;
      for (int64_t jd = 0; jd < JD; ++jd) uh[jd][l] = static_cast<acc_t>(row[jd]);
    }
  }
};

template <typename scalar_t, typename acc_t, bool kOptions>
struct Routing {
  using Vec = Lanes<acc_t>;
  Predictions<scalar_t, acc_t> pred;
  Sizes sz;
  OptionValues<acc_t, kOptions> opt;

  // The couplings of chunk's elements for input capsule i, stored to c_out (B, I, J).
  void store_couplings(int64_t chunk, int64_t i, const Vec* c, scalar_t* c_out) const {
    for (int64_t l = 0; l < sz.lanes(chunk); ++l)
      for (int64_t j = 0; j < sz.J; ++j)
        c_out[((chunk * sz.L + l) * sz.I + i) * sz.J + j] = static_cast<scalar_t>(c[j][l]);
  }

  // Forward of chunks [begin, end): writes v, s(r) and V(r-1) of their elements, and the last
  // iteration's couplings to c_out unless it is null.
  void forward(int64_t begin, int64_t end, scalar_t* v_out, acc_t* s_saved, acc_t* Vprev_saved,
               scalar_t* c_out) const {
    const int64_t n = end - begin, J = sz.J, D = sz.D, JD = sz.JD(), R = sz.R;
    std::vector<Vec> V(n * JD, Vec{}), s(n * JD), uh(JD), c(J);
    const acc_t uniform = acc_t(1) / acc_t(J);
    for (int64_t r = 0; r < R; ++r) {
      std::fill(s.begin(), s.end(), Vec{});
      scalar_t* c_store = kOptions && r == R - 1 ? c_out : nullptr;
      for (int64_t i = 0; i < sz.I; ++i) {
        for (int64_t g = 0; g < n; ++g) {
          pred.load(begin + g, i, uh.data());
          Vec* s_g = s.data() + g * JD;
          if (r == 0 && opt.uniform_start()) {  // every coupling is 1/J
            for (int64_t e = 0; e < JD; ++e) s_g[e] += uniform * uh[e];
            if (c_store != nullptr) {
              std::fill(c.begin(), c.end(), Vec{} + uniform);
              store_couplings(begin + g, i, c.data(), c_store);
            }
          } else {
            couplings(uh.data(), V.data() + g * JD, J, D, opt.prior_row(i, J), opt.leaky, c.data());
            add_scaled_rows(c.data(), uh.data(), J, D, s_g);
            if (c_store != nullptr) store_couplings(begin + g, i, c.data(), c_store);
          }
        }
      }
      for (int64_t g = 0; g < n; ++g) {
        const int64_t chunk = begin + g;
        Vec* s_g = s.data() + g * JD;
        Vec* V_g = V.data() + g * JD;
        if (opt.bias != nullptr)  // DESIGN.md §6: s(r) is saved with the bias in it
          for (int64_t jd = 0; jd < JD; ++jd) s_g[jd] += opt.bias[jd];
        for (int64_t l = 0; l < sz.lanes(chunk); ++l) {
          const int64_t b = chunk * sz.L + l;
          for (int64_t jd = 0; jd < JD; ++jd) {
            s_saved[(b * R + r) * JD + jd] = s_g[jd][l];
            Vprev_saved[(b * R + r) * JD + jd] = V_g[jd][l];
          }
        }
        for (int64_t j = 0; j < J; ++j) {  // v = squash(s); V += v
          Vec n2 = {};
          for (int64_t d = 0; d < D; ++d) n2 += s_g[j * D + d] * s_g[j * D + d];
          Vec f = {};
          for (int64_t l = 0; l < kLanes<acc_t>; ++l) f[l] = squash_factor(n2[l]);
          for (int64_t d = 0; d < D; ++d) {
            const Vec v = f * s_g[j * D + d];
            V_g[j * D + d] += v;
            if (r == R - 1)
              for (int64_t l = 0; l < sz.lanes(chunk); ++l)
                v_out[(chunk * sz.L + l) * JD + j * D + d] = static_cast<scalar_t>(v[l]);
          }
        }
      }
    }
  }

  // Backward phase 1 for chunks [begin, end): g_s(r) and V(r-1) of every r, lane-minor,
  // into gs_lanes and Vprev_lanes (chunks, R, J*D). Not full (detach_inner, no option gradient):
  // g_s(R) alone, from grad_v.
  void reduce_backward(int64_t begin, int64_t end, const scalar_t* grad_v, const acc_t* s_saved,
                       const acc_t* Vprev_saved, Vec* gs_lanes, Vec* Vprev_lanes, bool full) const {
    const int64_t n = end - begin, J = sz.J, D = sz.D, JD = sz.JD(), R = sz.R;
    std::vector<Vec> A_suffix(n * JD, Vec{}), A(n * JD), uh(JD), c(J), gb(J), s(JD), gv(JD);
    for (int64_t g = 0; g < n; ++g) {  // V(r-1) lane-minor; padded lanes stay zero
      const int64_t chunk = begin + g;
      for (int64_t l = 0; l < sz.lanes(chunk); ++l)
        for (int64_t r = 0; r < R; ++r)
          for (int64_t jd = 0; jd < JD; ++jd)
            Vprev_lanes[(chunk * R + r) * JD + jd][l] = Vprev_saved[((chunk * sz.L + l) * R + r) * JD + jd];
    }
    for (int64_t r = R - 1; r >= 0; --r) {
      for (int64_t g = 0; g < n; ++g) {  // g_s(r) = squash_backward(s(r), g_v(r))
        const int64_t chunk = begin + g;
        std::fill(s.begin(), s.end(), Vec{});
        std::copy(A_suffix.begin() + g * JD, A_suffix.begin() + (g + 1) * JD, gv.begin());
        for (int64_t l = 0; l < sz.lanes(chunk); ++l) {
          const int64_t b = chunk * sz.L + l;
          for (int64_t jd = 0; jd < JD; ++jd) {
            s[jd][l] = s_saved[(b * R + r) * JD + jd];
            if (r == R - 1) gv[jd][l] += static_cast<acc_t>(grad_v[b * JD + jd]);
          }
        }
        Vec* gs = gs_lanes + (chunk * R + r) * JD;
        for (int64_t j = 0; j < J; ++j) {
          Vec n2 = {}, sg = {};
          for (int64_t d = 0; d < D; ++d) {
            n2 += s[j * D + d] * s[j * D + d];
            sg += s[j * D + d] * gv[j * D + d];
          }
          Vec f = {}, df2 = {};
          for (int64_t l = 0; l < kLanes<acc_t>; ++l) {
            f[l] = squash_factor(n2[l]);
            df2[l] = squash_backward_df2(n2[l]) * sg[l];
          }
          for (int64_t d = 0; d < D; ++d) gs[j * D + d] = f * gv[j * D + d] + df2 * s[j * D + d];
        }
      }
      if (r == 0 || (kOptions && !full)) break;
      // A(r) = sum_i g_b[i, j] u_hat[i, j]: flows into g_v of the iterations before r.
      std::fill(A.begin(), A.end(), Vec{});
      for (int64_t i = 0; i < sz.I; ++i) {
        for (int64_t g = 0; g < n; ++g) {
          const int64_t chunk = begin + g;
          pred.load(chunk, i, uh.data());
          couplings(uh.data(), Vprev_lanes + (chunk * R + r) * JD, J, D, opt.prior_row(i, J), opt.leaky, c.data());
          coupling_gradients(uh.data(), gs_lanes + (chunk * R + r) * JD, J, D, c.data(), gb.data());
          add_scaled_rows(gb.data(), uh.data(), J, D, A.data() + g * JD);
        }
      }
      for (int64_t e = 0; e < n * JD; ++e) A_suffix[e] += A[e];
    }
  }

  // Backward phase 2 for input capsules [begin, end): du (or du_hat), dW[i], and dprior[i] (the sum of
  // g_b(r) over the batch and the iterations) unless dprior is null. Not full: the last iteration alone.
  void input_backward(int64_t begin, int64_t end, const Vec* gs_lanes, const Vec* Vprev_lanes, scalar_t* dx,
                      scalar_t* dW, acc_t* dprior, bool full) const {
    const int64_t J = sz.J, D = sz.D, JD = sz.JD(), K = sz.K, Kp = sz.Kp(), R = sz.R, I = sz.I;
    std::vector<Vec> uh(JD), du_hat(sz.chunks() * JD), c(J), gb(J), dprior_i(J);
    const acc_t uniform = acc_t(1) / acc_t(J);
    if constexpr (!kOptions) {  // compile-time: the plain op's loops
      dprior = nullptr;
      full = true;
    }
    for (int64_t i = begin; i < end; ++i) {
      std::fill(dprior_i.begin(), dprior_i.end(), Vec{});
      for (int64_t chunk = 0; chunk < sz.chunks(); ++chunk) {
        pred.load(chunk, i, uh.data());
        Vec* duh = du_hat.data() + chunk * JD;
        std::fill(duh, duh + JD, Vec{});
        for (int64_t r = full ? 0 : R - 1; r < R; ++r) {
          const Vec* gs = gs_lanes + (chunk * R + r) * JD;
          const Vec* Vp = Vprev_lanes + (chunk * R + r) * JD;
          // DESIGN.md §6: with detach_inner only the last iteration's c g_s reaches u_hat; V(0) = 0
          // cancels the first iteration's g_b V term in any case.
          const bool takes_c = r == R - 1 || !opt.detach_inner;
          const bool takes_gb = r > 0 && !opt.detach_inner;
          if (r == 0 && opt.uniform_start() && dprior == nullptr) {  // uniform couplings
            if (takes_c)
              for (int64_t e = 0; e < JD; ++e) duh[e] += uniform * gs[e];
            continue;
          }
          if (!takes_c && !takes_gb && dprior == nullptr) continue;
          couplings(uh.data(), Vp, J, D, opt.prior_row(i, J), opt.leaky, c.data());
          if (takes_c) add_scaled_rows(c.data(), gs, J, D, duh);
          if (!takes_gb && dprior == nullptr) continue;
          coupling_gradients(uh.data(), gs, J, D, c.data(), gb.data());
          if (takes_gb) add_scaled_rows(gb.data(), Vp, J, D, duh);
          if (dprior != nullptr)  // padded lanes have g_s = 0, so g_b = 0 there
            for (int64_t j = 0; j < J; ++j) dprior_i[j] += gb[j];
        }
        const int64_t lanes = sz.lanes(chunk);
        if (pred.W == nullptr) {  // route: du_hat is the answer
          for (int64_t l = 0; l < lanes; ++l) {
            scalar_t* row = dx + ((chunk * sz.L + l) * I + i) * JD;
            for (int64_t jd = 0; jd < JD; ++jd) row[jd] = static_cast<scalar_t>(duh[jd][l]);
          }
          continue;
        }
        const acc_t* w = pred.W + i * JD * Kp;
        for (int64_t kb = 0; kb < K; kb += kBlockK) {  // du[b, i, k] = sum_jd W[i, jd, k] du_hat[b, i, jd]
          Vec du[kBlockK] = {};
          for (int64_t jd = 0; jd < JD; ++jd)
            for (int64_t q = 0; q < kBlockK; ++q) du[q] += w[jd * Kp + kb + q] * duh[jd];
          for (int64_t q = 0; q < kBlockK && kb + q < K; ++q)
            for (int64_t l = 0; l < lanes; ++l)
              dx[((chunk * sz.L + l) * I + i) * K + kb + q] = static_cast<scalar_t>(du[q][l]);
        }
      }
      if (dprior != nullptr)  // over the chunks in order, then the lanes by a fixed tree: thread-independent bits
        for (int64_t j = 0; j < J; ++j) dprior[i * J + j] = lanes_sum(dprior_i[j]);
      if (pred.W == nullptr) continue;
      // dW[i, jd, k] = sum_b du_hat[b, i, jd] u[b, i, k]: per lane over the chunks in order,
      // then across the lanes in a fixed tree, so the bits never depend on the threads.
      for (int64_t jd = 0; jd < JD; ++jd) {
        for (int64_t kb = 0; kb < K; kb += kBlockK) {
          Vec acc[kBlockK] = {};
          for (int64_t chunk = 0; chunk < sz.chunks(); ++chunk) {
            const Vec g = du_hat[chunk * JD + jd];
            const Vec* u = pred.u_lanes + (chunk * I + i) * Kp + kb;
            for (int64_t q = 0; q < kBlockK; ++q) acc[q] += g * u[q];
          }
          for (int64_t q = 0; q < kBlockK && kb + q < K; ++q)
            dW[(i * JD + jd) * K + kb + q] = static_cast<scalar_t>(lanes_sum(acc[q]));
        }
      }
    }
  }
};

// A lane-minor tensor (..., L) as Lanes; torch's CPU allocations are 64-byte aligned.
template <typename acc_t>
Lanes<acc_t>* lanes_of(const at::Tensor& t) {
  return reinterpret_cast<Lanes<acc_t>*>(t.data_ptr<acc_t>());
}

// Input capsules u (B, I, Din) as (chunks, I, Kp, L) in the accumulation type, zero-padded.
at::Tensor lane_minor(const at::Tensor& u, const Sizes& sz) {
  auto padded = at::zeros({sz.chunks() * sz.L, sz.I, sz.Kp()}, u.options().dtype(accumulate_type(u)));
  padded.narrow(0, 0, sz.B).narrow(2, 0, sz.K).copy_(u);
  return padded.view({sz.chunks(), sz.L, sz.I, sz.Kp()}).permute({0, 2, 3, 1}).contiguous();
}

Sizes sizes_of(const at::Tensor& x, const at::Tensor* W, int64_t R) {
  return {problem_sizes(x, W != nullptr ? *W : at::Tensor(), R)};
}

// Tensors whose pointers a Routing<> reads; kept alive for the duration of a call.
struct Prepared {
  at::Tensor x, W, u_lanes, bias, logit_prior;
};

template <typename scalar_t, typename acc_t, bool kOptions>
Routing<scalar_t, acc_t, kOptions> make_routing(const at::Tensor& x, const at::Tensor* W, int64_t R,
                                                const RoutingOptions& options, Prepared& keep) {
  Routing<scalar_t, acc_t, kOptions> routing;
  routing.sz = sizes_of(x, W, R);
  routing.pred.sz = routing.sz;
  keep.x = x.contiguous();
  if (W != nullptr) {
    keep.W = padded_last_dim(*W, routing.sz.Kp(), accumulate_type(*W));
    keep.u_lanes = lane_minor(keep.x, routing.sz);
    routing.pred.W = keep.W.data_ptr<acc_t>();
    routing.pred.u_lanes = reinterpret_cast<const Lanes<acc_t>*>(keep.u_lanes.data_ptr<acc_t>());
  } else {
    routing.pred.u_hat = keep.x.data_ptr<scalar_t>();
  }
  if constexpr (kOptions) {  // acc_t copies of the option tensors, kept alive for the call
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    if (options.bias.defined()) {
      keep.bias = options.bias.to(acc).contiguous();
      routing.opt.bias = keep.bias.data_ptr<acc_t>();
    }
    if (options.logit_prior.defined()) {
      keep.logit_prior = options.logit_prior.to(acc).contiguous();
      routing.opt.prior = keep.logit_prior.data_ptr<acc_t>();
    }
    routing.opt.leaky = options.leaky;
    routing.opt.detach_inner = options.detach_inner;
  }
  return routing;
}

// The kernels that run a call. A chunk of the batch kernels holds kLanes samples and runs on one thread:
// below a few chunks per thread most lanes idle, or threads do. The small-batch kernels vectorize
// over the input capsules and share them among the threads, and cost in proportion to B.
// Measured (bench/cpu_speedup.py --paths, paper layer, float32; Intel Xeon 2026-11-26 and AMD EPYC
// 2026-11-27, README "Performance"): the forward is faster on the small-batch kernels up to about
// 8 samples per thread (at B = 16 with 1 thread the batch kernels win, 2.5 against 3.0 ms), the
// backward on the small-batch kernels up to B = 32 with 1 or 2 threads (their predictions and kept
// couplings stay in scratch that fits the caches; at B = 128 they lose 2x). A backward's kernels
// need not be its forward's: both save s(r) and V(r-1) in one layout. CAPSROUTING_CPU_PATH forces
// one or the other for both passes (benchmarks, tests).
enum class Pass { forward, backward };

bool use_small_batch_kernels(int64_t B, Pass pass) {
  const char* forced = std::getenv("CAPSROUTING_CPU_PATH");
  if (forced == nullptr || *forced == '\0' || std::strcmp(forced, "auto") == 0)
    return B <= (pass == Pass::forward ? std::min<int64_t>(8 * at::get_num_threads(), 16) : 32);
  if (std::strcmp(forced, "small-batch") == 0) return true;
  if (std::strcmp(forced, "batch") == 0) return false;
  TORCH_CHECK(false, "CAPSROUTING_CPU_PATH must be 'auto', 'small-batch' or 'batch', got '", forced, "'");
}

}  // namespace

ForwardResult forward(const at::Tensor& x, const at::Tensor& W_in, const RoutingOptions& options, int64_t R) {
  if (use_small_batch_kernels(x.size(0), Pass::forward)) return small_batch::forward(x, W_in, options, R);
  const at::Tensor* W = W_in.defined() ? &W_in : nullptr;
  const Sizes sz = sizes_of(x, W, R);
  at::Tensor v, c, s_saved, Vprev_saved;
  std::tie(v, c, s_saved, Vprev_saved) = allocate_forward_result(x, sz.I, sz.J, sz.D, R, options.return_couplings);
  if (sz.B == 0) return {v, c, s_saved, Vprev_saved};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "capsrouting_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_options_or_not(options.forward_reads_options(), [&](auto kOptions) {
      Prepared keep;
      const auto routing = make_routing<scalar_t, acc_t, decltype(kOptions)::value>(x, W, R, options, keep);
      scalar_t* c_out = c.defined() ? c.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, sz.chunks(), 1, [&](int64_t begin, int64_t end) {
        for (int64_t g = begin; g < end; g += kGroup)
          routing.forward(g, std::min(end, g + kGroup), v.data_ptr<scalar_t>(), s_saved.data_ptr<acc_t>(),
                          Vprev_saved.data_ptr<acc_t>(), c_out);
      });
    });
  });
  return {v, c, s_saved, Vprev_saved};
}

BackwardResult backward(const at::Tensor& grad_v, const at::Tensor& x, const at::Tensor& W_in,
                        const RoutingOptions& options, const at::Tensor& s_saved, const at::Tensor& Vprev_saved,
                        int64_t R) {
  if (use_small_batch_kernels(x.size(0), Pass::backward)) return small_batch::backward(grad_v, x, W_in, options, s_saved, Vprev_saved, R);
  const at::Tensor* W = W_in.defined() ? &W_in : nullptr;
  const Sizes sz = sizes_of(x, W, R);
  const bool full = options.full_backward();
  const bool want_dbias = options.wants_dbias();
  const bool want_dprior = options.wants_dprior();
  // Phase 2 writes every element of dx, dW and dprior; only an empty batch leaves them to be zeroed.
  auto dx = at::empty(x.sizes(), x.options());
  auto dW = W != nullptr ? at::empty(W->sizes(), W->options()) : at::Tensor();
  const auto acc = accumulate_type(x);
  auto dprior = want_dprior ? at::empty({sz.I, sz.J}, x.options().dtype(acc)) : at::Tensor();
  if (sz.B == 0) return empty_batch_gradients(x, W_in, options);
  auto gs_lanes = at::empty({sz.chunks(), R, sz.JD(), sz.L}, x.options().dtype(acc));
  auto Vprev_lanes = at::zeros_like(gs_lanes);
  const auto grad = grad_v.contiguous();
  const auto s_c = s_saved.contiguous();
  const auto Vprev_c = Vprev_saved.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "capsrouting_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_options_or_not(options.backward_reads_options(), [&](auto kOptions) {
      Prepared keep;
      const auto routing = make_routing<scalar_t, acc_t, decltype(kOptions)::value>(x, W, R, options, keep);
      at::parallel_for(0, sz.chunks(), 1, [&](int64_t begin, int64_t end) {
        for (int64_t g = begin; g < end; g += kGroup)
          routing.reduce_backward(g, std::min(end, g + kGroup), grad.data_ptr<scalar_t>(), s_c.data_ptr<acc_t>(),
                                  Vprev_c.data_ptr<acc_t>(), lanes_of<acc_t>(gs_lanes), lanes_of<acc_t>(Vprev_lanes),
                                  full);
      });
      at::parallel_for(0, sz.I, 1, [&](int64_t begin, int64_t end) {
        routing.input_backward(begin, end, lanes_of<acc_t>(gs_lanes), lanes_of<acc_t>(Vprev_lanes),
                               dx.data_ptr<scalar_t>(), W != nullptr ? dW.data_ptr<scalar_t>() : nullptr,
                               want_dprior ? dprior.data_ptr<acc_t>() : nullptr, full);
      });
    });
  });
  // dbias = sum of g_s(r) over the batch (padded lanes hold zeros) and the iterations.
  auto dbias = want_dbias ? gs_lanes.sum({0, 1, 3}).view({sz.J, sz.D}).to(options.bias.scalar_type()) : at::Tensor();
  return {dx, dW, dbias, want_dprior ? dprior.to(options.logit_prior.scalar_type()) : dprior};
}

}  // namespace capsrouting::cpu
