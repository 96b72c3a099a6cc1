// CPU kernels of the routing ops for small batches: DESIGN.md §2-§3 vectorized over the input
// capsules, each sample's work split over the threads.
//
// Why. The batch kernels (routing_cpu.cpp) put kLanes batch elements in a vector: below a
// full chunk most lanes idle, and one chunk runs on one thread. Here a vector holds L input
// capsules of one sample (L = 16 floats or 8 doubles), and the threads share the input capsules.
//
// Layout and tiling. Input capsules are taken L at a time (a "group", lane l = capsule
// group * L + l; lanes past I hold zero predictions, which add nothing anywhere), and groups
// kSliceGroups at a time (a "slice"). Every parallel loop runs over slices, each slice handling
// every sample. The predictions of every sample are built once per call into
// u_hat[b][group][jd][lane], in the accumulation type (B*I*J*Dout numbers: 737 KB a sample at
// the paper's layer; they stay in L2/L3 for the later passes). With Din = 8 in float (the paper's)
// whole groups take the paired path below; otherwise a row u_hat[b, i] = W[i] u[b, i] is J*Dout dot
// products of length Din, written for a compile-time padded Din (4, 8, 12, 16), and scattered into
// the lanes. W[i] is read once per call for all the samples.
//
// Forward: one parallel pass over the slices per iteration. Per group and sample: the logits
// against V(r-1) (the same for every lane), the softmax over j, and s summed per lane; at the end
// of the slice its lanes are added by a fixed tree: one partial s per (sample, slice). Between
// passes one thread adds the partials in slice order, then the bias, and squashes.
//
// Backward: the forward's predictions if this thread's scratch still holds them (workspace.h: the
// usual forward-then-backward on one thread), else built again. Phase 1 (g_s of every iteration): per r = R-1..1 a
// parallel pass that reduces A(r) into partials per (sample, slice), added in slice order, and keeps
// c(r) and g_b(r) (B*R*I*J numbers each). Phase 2, parallel over slices: per group, du_hat of every
// sample (vertical over the lanes), then du from W[i], and dW[i] and d logit_prior[i] summed over the
// samples in order.
//
// Determinism: the slicing, not the threads, fixes every order of summation (partials in slice
// order, dW[i] and dprior[i] each owned by one slice), so results have the same bits whatever
// the number of threads.
//
// Registers: one vector per accumulator (a logit, a coupling, a row of s or A); in the paired path
// also a row's 8 transposed W vectors, or per pair the u and du of up to 8 samples. A group's
// predictions (J*Dout vectors a sample) and du_hat stay in L1/L2.
#include "routing_cpu_small_batch.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../routing_math.h"
#include "problem.h"
#include "simd.h"
#include "workspace.h"

namespace capsrouting::cpu::small_batch {
namespace {

using simd::add_scaled_rows;
using simd::coupling_gradients;
using simd::couplings;
using simd::Lanes;
using simd::lanes_sum;
using simd::OptionValues;

// Groups of L input capsules per slice, the unit of work of a thread and of every partial sum:
// 64 float capsules (18 slices at the paper's I = 1152).
constexpr int64_t kSliceGroups = 4;

// L lanes per group, kSliceGroups groups per slice.
struct Sizes : ProblemSizes {
  int64_t groups() const { return (I + L - 1) / L; }
  int64_t slices() const { return (groups() + kSliceGroups - 1) / kSliceGroups; }
  int64_t group_begin(int64_t slice) const { return slice * kSliceGroups; }
  int64_t group_end(int64_t slice) const { return std::min(groups(), (slice + 1) * kSliceGroups); }
  int64_t lanes(int64_t group) const { return std::min(L, I - group * L); }
};

// row[jd] = sum_k w[jd * kK + k] * u[k]: one prediction row of an input capsule.
template <int64_t kK, typename acc_t>
void predict_row(const acc_t* w, const acc_t* u, int64_t JD, acc_t* row) {
  for (int64_t jd = 0; jd < JD; ++jd) {
    acc_t acc = 0;
    for (int64_t k = 0; k < kK; ++k) acc += w[jd * kK + k] * u[k];
    row[jd] = acc;
  }
}

template <typename acc_t>
void predict_row(const acc_t* w, const acc_t* u, int64_t JD, int64_t Kp, acc_t* row) {
  switch (Kp) {
    case 4: return predict_row<4>(w, u, JD, row);
    case 8: return predict_row<8>(w, u, JD, row);
    case 12: return predict_row<12>(w, u, JD, row);
    case 16: return predict_row<16>(w, u, JD, row);
    default:
      for (int64_t jd = 0; jd < JD; ++jd) {
        acc_t acc = 0;
        for (int64_t k = 0; k < Kp; ++k) acc += w[jd * Kp + k] * u[k];
        row[jd] = acc;
      }
  }
}

// ---- Din = 8 in float: two input capsules' rows of W fill one 16-float vector ----------------------------
// A group's 16 capsules are 8 pairs; pair m holds capsules 2m (lanes 0-7) and 2m+1 (lanes 8-15) of the
// group. The predictions transpose each row jd's pairs into one vector per k over the 16 capsules
// (transpose_pairs, 24 shuffles, shared by all the samples) and take 8 multiply-adds per sample: they
// come out vectorized over the capsules with no scatter. du and dW use the pairs as they are, with
// du_hat broadcast per half (broadcast_pair): no reduction across lanes at all.
using Floats8 = float __attribute__((vector_size(32)));
using Floats16 = Lanes<float>;

inline Floats8 load8(const float* p) {
  Floats8 x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

inline void store8(float* p, Floats8 x) { std::memcpy(p, &x, sizeof(x)); }

inline Floats16 join(Floats8 a, Floats8 b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

// A 16 x 8 block held as 8 pairs of rows (x[m] = rows 2m, 2m+1) -> its 8 columns (x[k][l] = row l, column
// k). Three unzips of the 128-number sequence (evens, then odds), 8 two-vector shuffles each.
inline void transpose_pairs(Floats16* x) {
  for (int stage = 0; stage < 3; ++stage) {
    Floats16 y[8];
    for (int h = 0; h < 4; ++h) {
      y[h] = __builtin_shufflevector(x[2 * h], x[2 * h + 1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
      y[h + 4] = __builtin_shufflevector(x[2 * h], x[2 * h + 1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    }
    for (int h = 0; h < 8; ++h) x[h] = y[h];
  }
}

// Lane 2m in lanes 0-7 and lane 2m+1 in lanes 8-15.
template <int m>
Floats16 broadcast_pair(Floats16 x) {
  constexpr int a = 2 * m, b = 2 * m + 1;
  return __builtin_shufflevector(x, x, a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b);
}

template <typename F, int... m>
void for_each_pair_impl(F&& f, std::integer_sequence<int, m...>) {
  (f(std::integral_constant<int, m>{}), ...);
}

// f(std::integral_constant<int, m>) for the 8 pairs of a group, unrolled.
template <typename F>
void for_each_pair(F&& f) {
  for_each_pair_impl(f, std::make_integer_sequence<int, 8>{});
}

// Whether phase 2 adds each iteration's c g_s and g_b V(r-1) to du_hat (DESIGN.md §6): with
// detach_inner only the last iteration's c g_s reaches u_hat; V(0) = 0 cancels g_b V anyway at r = 0.
struct Terms {
  bool c, gb;
};

template <typename scalar_t, typename acc_t, bool kOptions>
struct SmallBatchRouting {
  using Vec = Lanes<acc_t>;
  Sizes sz;
  const acc_t* W = nullptr;         // (I, J*D, Kp), Din zero-padded; null: route
  const acc_t* u = nullptr;         // (B, I, Kp), zero-padded
  const scalar_t* u_hat = nullptr;  // (B, I, J*D): given predictions (route)
  Vec* predictions = nullptr;       // (B, groups, J*D) vectors: u_hat[b][group][jd][lane]
  const Vec* prior_lanes = nullptr; // (groups, J) vectors: logit_prior[group*L + lane, j]; null: none
  OptionValues<acc_t, kOptions> opt;

  Vec* predictions_of(int64_t b, int64_t group) const { return predictions + (b * sz.groups() + group) * sz.JD(); }
  const Vec* prior_of(int64_t group) const {
    if constexpr (kOptions) return prior_lanes != nullptr ? prior_lanes + group * sz.J : nullptr;
    return nullptr;
  }

  // Whether group g takes the Din = 8 float path: a whole group, float weights with Din = 8 unpadded.
  bool paired(int64_t g) const {
    if constexpr (std::is_same_v<scalar_t, float>) return W != nullptr && sz.K == 8 && sz.lanes(g) == sz.L;
    return false;
  }

  // Predictions of every sample for a whole group g, Din = 8, float: per row jd the group's W rows are
  // loaded once and transposed (transpose_pairs) into one vector per k over the 16 capsules; each
  // sample's predictions are then 8 multiply-adds with its u, transposed the same way once per group.
  void build_paired(int64_t g) const {
    if constexpr (std::is_same_v<scalar_t, float>) {
      const int64_t JD = sz.JD(), i0 = g * sz.L;
      const float* rows = W + i0 * JD * 8;  // capsule i0 + l's row jd: rows + (l * JD + jd) * 8
      std::vector<Floats16> u_columns(sz.B * 8);  // u[b, i0 + l, k] at [b * 8 + k][l]
      for (int64_t b = 0; b < sz.B; ++b) {
        Floats16* U = u_columns.data() + b * 8;
        for (int m = 0; m < 8; ++m)
          U[m] = join(load8(u + (b * sz.I + i0 + 2 * m) * 8), load8(u + (b * sz.I + i0 + 2 * m + 1) * 8));
        transpose_pairs(U);
      }
      for (int64_t jd = 0; jd < JD; ++jd) {
        Floats16 w[8];
        for (int m = 0; m < 8; ++m)
          w[m] = join(load8(rows + (2 * m * JD + jd) * 8), load8(rows + ((2 * m + 1) * JD + jd) * 8));
        transpose_pairs(w);
        for (int64_t b = 0; b < sz.B; ++b) {
          const Floats16* U = u_columns.data() + b * 8;
          Floats16 acc = w[0] * U[0];
          for (int k = 1; k < 8; ++k) acc += w[k] * U[k];
          predictions_of(b, g)[jd] = acc;
        }
      }
    }
  }

  // du and dW of a whole group g for every sample, Din = 8, float; du_hat: (B, J*D) vectors. Per pair and
  // row jd, W's two rows are loaded once for a block of up to kSampleBlock samples, whose du and u stay
  // in registers; dW[i] sums the samples in order (block after block), whatever the threads.
  static constexpr int kSampleBlock = 8;

  void inputs_paired(int64_t g, const Vec* du_hat, scalar_t* dx, scalar_t* dW) const {
    if constexpr (std::is_same_v<scalar_t, float>) {
      for_each_pair([&](auto pair) {
        for (int64_t b0 = 0; b0 < sz.B; b0 += kSampleBlock) {
          switch (std::min<int64_t>(kSampleBlock, sz.B - b0)) {
            case 1: pair_block<decltype(pair)::value, 1>(g, b0, du_hat, dx, dW); break;
            case 2: pair_block<decltype(pair)::value, 2>(g, b0, du_hat, dx, dW); break;
            case 3: pair_block<decltype(pair)::value, 3>(g, b0, du_hat, dx, dW); break;
            case 4: pair_block<decltype(pair)::value, 4>(g, b0, du_hat, dx, dW); break;
            case 5: pair_block<decltype(pair)::value, 5>(g, b0, du_hat, dx, dW); break;
            case 6: pair_block<decltype(pair)::value, 6>(g, b0, du_hat, dx, dW); break;
            case 7: pair_block<decltype(pair)::value, 7>(g, b0, du_hat, dx, dW); break;
            default: pair_block<decltype(pair)::value, 8>(g, b0, du_hat, dx, dW); break;
          }
        }
      });
    }
  }

  // Pair m of group g, samples b0 .. b0 + kB - 1.
  template <int m, int kB>
  void pair_block(int64_t g, int64_t b0, const Vec* du_hat, scalar_t* dx, scalar_t* dW) const {
    if constexpr (std::is_same_v<scalar_t, float>) {
      const int64_t JD = sz.JD(), ia = g * sz.L + 2 * m, ic = ia + 1;  // the pair's two capsules
      const float *w_a = W + ia * JD * 8, *w_c = W + ic * JD * 8;
      float *dW_a = dW + ia * JD * 8, *dW_c = dW + ic * JD * 8;
      Floats16 U[kB], du[kB];
      for (int q = 0; q < kB; ++q) {
        U[q] = join(load8(u + ((b0 + q) * sz.I + ia) * 8), load8(u + ((b0 + q) * sz.I + ic) * 8));
        du[q] = Floats16{};
      }
      for (int64_t jd = 0; jd < JD; ++jd) {
        const Floats16 w = join(load8(w_a + jd * 8), load8(w_c + jd * 8));
        Floats16 d = b0 == 0 ? Floats16{} : join(load8(dW_a + jd * 8), load8(dW_c + jd * 8));
        for (int q = 0; q < kB; ++q) {
          const Floats16 G = broadcast_pair<m>(du_hat[(b0 + q) * JD + jd]);
          du[q] += w * G;
          d += G * U[q];
        }
        store8(dW_a + jd * 8, __builtin_shufflevector(d, d, 0, 1, 2, 3, 4, 5, 6, 7));
        store8(dW_c + jd * 8, __builtin_shufflevector(d, d, 8, 9, 10, 11, 12, 13, 14, 15));
      }
      for (int q = 0; q < kB; ++q) {
        store8(dx + ((b0 + q) * sz.I + ia) * 8, __builtin_shufflevector(du[q], du[q], 0, 1, 2, 3, 4, 5, 6, 7));
        store8(dx + ((b0 + q) * sz.I + ic) * 8, __builtin_shufflevector(du[q], du[q], 8, 9, 10, 11, 12, 13, 14, 15));
      }
    }
  }

  // Writes the predictions of every sample for the groups of a slice.
  void build(int64_t slice) const {
    const int64_t JD = sz.JD(), Kp = sz.Kp();
    std::vector<acc_t> row(JD);
    for (int64_t g = sz.group_begin(slice); g < sz.group_end(slice); ++g) {
      if (paired(g)) {
        build_paired(g);
        continue;
      }
      for (int64_t b = 0; b < sz.B; ++b) std::fill(predictions_of(b, g), predictions_of(b, g) + JD, Vec{});
      for (int64_t l = 0; l < sz.lanes(g); ++l) {
        const int64_t i = g * sz.L + l;
        for (int64_t b = 0; b < sz.B; ++b) {  // W[i] stays in L1 across the samples
          Vec* uh = predictions_of(b, g);
          if (W != nullptr) {
            predict_row(W + i * JD * Kp, u + (b * sz.I + i) * Kp, JD, Kp, row.data());
            for (int64_t jd = 0; jd < JD; ++jd) uh[jd][l] = row[jd];
          } else {
            const scalar_t* given = u_hat + (b * sz.I + i) * JD;
            for (int64_t jd = 0; jd < JD; ++jd) uh[jd][l] = static_cast<acc_t>(given[jd]);
          }
        }
      }
    }
  }

  // The couplings of sample b's input capsules in group g against V(r-1) (J*D numbers, shared by
  // the lanes). uniform: the first iteration's 1/J.
  void group_couplings(int64_t g, const Vec* uh, const acc_t* V, bool uniform, Vec* c) const {
    if (uniform) {
      std::fill(c, c + sz.J, Vec{} + acc_t(1) / acc_t(sz.J));
      return;
    }
    couplings(uh, V, sz.J, sz.D, prior_of(g), opt.leaky, c);
  }

  // One forward pass of iteration r over a slice: s_partial[b] (J*D) for every sample, and the
  // couplings into c_out (B, I, J) unless it is null. V: V(r-1) of every sample, (B, J*D).
  void forward_pass(int64_t slice, int64_t r, const acc_t* V, acc_t* s_partial, int64_t s_stride,
                    scalar_t* c_out) const {
    const int64_t JD = sz.JD(), J = sz.J;
    std::vector<Vec> s(JD), c(J);
    const bool uniform = r == 0 && opt.uniform_start();
    for (int64_t b = 0; b < sz.B; ++b) {
      std::fill(s.begin(), s.end(), Vec{});
      for (int64_t g = sz.group_begin(slice); g < sz.group_end(slice); ++g) {
        const Vec* uh = predictions_of(b, g);
        group_couplings(g, uh, V + b * JD, uniform, c.data());
        add_scaled_rows(c.data(), uh, J, sz.D, s.data());
        if (kOptions && c_out != nullptr)
          for (int64_t l = 0; l < sz.lanes(g); ++l)
            for (int64_t j = 0; j < J; ++j) c_out[(b * sz.I + g * sz.L + l) * J + j] = static_cast<scalar_t>(c[j][l]);
      }
      for (int64_t jd = 0; jd < JD; ++jd) s_partial[b * s_stride + jd] = lanes_sum(s[jd]);
    }
  }

  // A(r) of a slice (DESIGN.md §3) for every sample: sum_i g_b[i, j] u_hat[i, j], into A_partial[b].
  // c(r) and g_b(r) are kept for phase 2 in c_kept and gb_kept ((B, R, groups, J) vectors each).
  // Vprev and gs: V(r-1) and g_s(r) of every sample and iteration, (B, R, J*D).
  void reduce_pass(int64_t slice, int64_t r, const acc_t* Vprev, const acc_t* gs, acc_t* A_partial,
                   int64_t A_stride, Vec* c_kept, Vec* gb_kept) const {
    const int64_t JD = sz.JD(), J = sz.J;
    std::vector<Vec> A(JD);
    for (int64_t b = 0; b < sz.B; ++b) {
      std::fill(A.begin(), A.end(), Vec{});
      for (int64_t g = sz.group_begin(slice); g < sz.group_end(slice); ++g) {
        const Vec* uh = predictions_of(b, g);
        Vec* c = c_kept + ((b * sz.R + r) * sz.groups() + g) * J;
        Vec* gb = gb_kept + ((b * sz.R + r) * sz.groups() + g) * J;
        couplings(uh, Vprev + (b * sz.R + r) * JD, J, sz.D, prior_of(g), opt.leaky, c);
        coupling_gradients(uh, gs + (b * sz.R + r) * JD, J, sz.D, c, gb);
        add_scaled_rows(gb, uh, J, sz.D, A.data());
      }
      for (int64_t jd = 0; jd < JD; ++jd) A_partial[b * A_stride + jd] = lanes_sum(A[jd]);
    }
  }

  // Phase 2 of a slice: dx (du or du_hat) of its input capsules for every sample, dW[i] and
  // dprior[i] (unless null). gs and Vprev: (B, R, J*D). Not full: r = R-1 alone.
  // du_hat of sample b in group g from phase 1's c(r), g_b(r) (r >= 1) without a prior gradient: the same
  // terms, in the same order, as the general loop of input_pass, each row summed in a register and
  // stored once. c: room for r = 0's couplings (1/J, or from the prior and the leak alone: V(0) = 0).
  void kept_terms(int64_t g, int64_t b, const Vec* uh, const acc_t* gs, const acc_t* Vprev, const Vec* c_kept,
                  const Vec* gb_kept, Vec* c, Vec* du_hat) const {
    const int64_t JD = sz.JD(), J = sz.J, D = sz.D, R = sz.R;
    const bool take_c0 = !opt.detach_inner;  // R > 1 here: r = 0 is not the last iteration
    if (take_c0) {
      if (opt.uniform_start())
        std::fill(c, c + J, Vec{} + acc_t(1) / acc_t(J));
      else
        couplings(uh, Vprev + b * R * JD, J, D, prior_of(g), opt.leaky, c);
    }
    const acc_t* gs_b = gs + b * R * JD;
    const acc_t* Vp_b = Vprev + b * R * JD;
    const Vec* c_b = c_kept + b * R * sz.groups() * J + g * J;  // + r * groups * J: iteration r
    const Vec* gb_b = gb_kept + b * R * sz.groups() * J + g * J;
    for (int64_t j = 0; j < J; ++j)
      for (int64_t d = 0; d < D; ++d) {
        const int64_t jd = j * D + d;
        Vec sum = take_c0 ? c[j] * gs_b[jd] : Vec{};
        for (int64_t r = 1; r < R; ++r) {
          const int64_t at = r * sz.groups() * J + j;
          if (r == R - 1 || !opt.detach_inner) sum += c_b[at] * gs_b[r * JD + jd];
          if (!opt.detach_inner) sum += gb_b[at] * Vp_b[r * JD + jd];
        }
        du_hat[jd] = sum;
      }
  }

  // c_kept, gb_kept: c(r) and g_b(r) of phase 1 for r >= 1 ((B, R, groups, J) vectors each), or null.
  void input_pass(int64_t slice, const acc_t* gs_all, const acc_t* Vprev_all, const Vec* c_kept, const Vec* gb_kept,
                  scalar_t* dx, scalar_t* dW, acc_t* dprior, bool full) const {
    const int64_t JD = sz.JD(), J = sz.J, D = sz.D, R = sz.R, K = sz.K, Kp = sz.Kp(), L = sz.L;
    if constexpr (!kOptions) {  // compile-time: the plain op's loops
      dprior = nullptr;
      full = true;
    }
    std::vector<Vec> du_hat_all(sz.B * JD), c(J), gb(J), dprior_lanes(J);
    std::vector<acc_t> dW_group(W != nullptr ? L * JD * Kp : 0), du(Kp);
    const acc_t uniform = acc_t(1) / acc_t(J);
    for (int64_t g = sz.group_begin(slice); g < sz.group_end(slice); ++g) {
      const int64_t lanes = sz.lanes(g);
      const bool pairs = paired(g);  // dW accumulates in place, in dW itself
      if (!pairs) std::fill(dW_group.begin(), dW_group.end(), acc_t(0));
      std::fill(dprior_lanes.begin(), dprior_lanes.end(), Vec{});
      for (int64_t b = 0; b < sz.B; ++b) {
        const Vec* uh = predictions_of(b, g);
        Vec* du_hat = du_hat_all.data() + b * JD;
        if (c_kept != nullptr && dprior == nullptr) {  // the common case, every term summed in registers
          kept_terms(g, b, uh, gs_all, Vprev_all, c_kept, gb_kept, c.data(), du_hat);
          if (pairs) continue;
        } else {
        std::fill(du_hat, du_hat + JD, Vec{});
        for (int64_t r = full ? 0 : R - 1; r < R; ++r) {
          const acc_t* gs = gs_all + (b * R + r) * JD;
          const acc_t* Vp = Vprev_all + (b * R + r) * JD;
          const Terms take{r == R - 1 || !opt.detach_inner, r > 0 && !opt.detach_inner};
          if (r == 0 && opt.uniform_start() && dprior == nullptr) {  // uniform couplings, g_b V(0) = 0
            if (take.c)
              for (int64_t jd = 0; jd < JD; ++jd) du_hat[jd] += uniform * gs[jd];
            continue;
          }
          if (!take.c && !take.gb && dprior == nullptr) continue;
          if (r > 0 && c_kept != nullptr) {  // phase 1 computed them
            const int64_t at = ((b * R + r) * sz.groups() + g) * J;
            if (take.c) add_scaled_rows(c_kept + at, gs, J, D, du_hat);
            if (take.gb) add_scaled_rows(gb_kept + at, Vp, J, D, du_hat);
            if (dprior != nullptr)
              for (int64_t j = 0; j < J; ++j) dprior_lanes[j] += gb_kept[at + j];
            continue;
          }
          couplings(uh, Vp, J, D, prior_of(g), opt.leaky, c.data());
          if (take.c) add_scaled_rows(c.data(), gs, J, D, du_hat);
          if (!take.gb && dprior == nullptr) continue;
          coupling_gradients(uh, gs, J, D, c.data(), gb.data());
          if (take.gb) add_scaled_rows(gb.data(), Vp, J, D, du_hat);
          if (dprior != nullptr)  // lanes past I have zero predictions, so g_b = 0 there
            for (int64_t j = 0; j < J; ++j) dprior_lanes[j] += gb[j];
        }
        }
        if (pairs) continue;  // after every sample's du_hat
        for (int64_t l = 0; l < lanes; ++l) {
          const int64_t i = g * L + l;
          if (W == nullptr) {  // route: du_hat is the answer
            scalar_t* row = dx + (b * sz.I + i) * JD;
            for (int64_t jd = 0; jd < JD; ++jd) row[jd] = static_cast<scalar_t>(du_hat[jd][l]);
            continue;
          }
          // du[k] = sum_jd W[i, jd, k] du_hat[jd]; dW[i, jd, k] += du_hat[jd] u[b, i, k], samples in order.
          const acc_t* w = W + i * JD * Kp;
          const acc_t* u_i = u + (b * sz.I + i) * Kp;
          acc_t* dW_i = dW_group.data() + l * JD * Kp;
          std::fill(du.begin(), du.end(), acc_t(0));
          for (int64_t jd = 0; jd < JD; ++jd) {
            const acc_t g_jd = du_hat[jd][l];
            for (int64_t k = 0; k < Kp; ++k) {
              du[k] += w[jd * Kp + k] * g_jd;
              dW_i[jd * Kp + k] += g_jd * u_i[k];
            }
          }
          for (int64_t k = 0; k < K; ++k) dx[(b * sz.I + i) * K + k] = static_cast<scalar_t>(du[k]);
        }
      }
      if (pairs) inputs_paired(g, du_hat_all.data(), dx, dW);
      for (int64_t l = 0; l < lanes; ++l) {
        const int64_t i = g * L + l;
        if (dprior != nullptr)
          for (int64_t j = 0; j < J; ++j) dprior[i * J + j] = dprior_lanes[j][l];
        if (W != nullptr && !pairs)
          for (int64_t jd = 0; jd < JD; ++jd)
            for (int64_t k = 0; k < K; ++k)
              dW[(i * JD + jd) * K + k] = static_cast<scalar_t>(dW_group[(l * JD + jd) * Kp + k]);
      }
    }
  }
};

Sizes sizes_of(const at::Tensor& x, const at::Tensor& W, int64_t R) { return {problem_sizes(x, W, R)}; }

template <typename acc_t>
Lanes<acc_t>* lanes_of(const at::Tensor& t) {
  return reinterpret_cast<Lanes<acc_t>*>(t.data_ptr<acc_t>());
}

// Tensors whose pointers a SmallBatchRouting reads; kept alive for the duration of a call.
struct Prepared {
  at::Tensor x, W, u, predictions, prior_lanes, bias;
};

template <typename scalar_t, typename acc_t, bool kOptions>
SmallBatchRouting<scalar_t, acc_t, kOptions> make_routing(const at::Tensor& x, const at::Tensor& W, int64_t R,
                                                          const RoutingOptions& options, Prepared& keep) {
  SmallBatchRouting<scalar_t, acc_t, kOptions> routing;
  const Sizes sz = sizes_of(x, W, R);
  routing.sz = sz;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  keep.x = x.contiguous();
  if (W.defined()) {
    keep.W = padded_last_dim(W, sz.Kp(), acc);
    keep.u = padded_last_dim(keep.x, sz.Kp(), acc);
    routing.W = keep.W.data_ptr<acc_t>();
    routing.u = keep.u.data_ptr<acc_t>();
  } else {
    routing.u_hat = keep.x.data_ptr<scalar_t>();
  }
  keep.predictions = scratch(Scratch::predictions, {sz.B, sz.groups(), sz.JD(), sz.L}, acc);
  routing.predictions = lanes_of<acc_t>(keep.predictions);
  if constexpr (kOptions) {
    if (options.bias.defined()) {
      keep.bias = options.bias.to(acc).contiguous();
      routing.opt.bias = keep.bias.data_ptr<acc_t>();
    }
    if (options.logit_prior.defined()) {  // (groups, J, L): the prior of each lane's input capsule
      auto padded = at::zeros({sz.groups() * sz.L, sz.J}, x.options().dtype(acc));
      padded.narrow(0, 0, sz.I).copy_(options.logit_prior);
      keep.prior_lanes = padded.view({sz.groups(), sz.L, sz.J}).transpose(1, 2).contiguous();
      routing.prior_lanes = lanes_of<acc_t>(keep.prior_lanes);
      routing.opt.prior = keep.prior_lanes.data_ptr<acc_t>();  // marks "a prior" for uniform_start()
    }
    routing.opt.leaky = options.leaky;
    routing.opt.detach_inner = options.detach_inner;
  }
  return routing;
}

// Over the slices, one or more per task: the order of summation is the slices', not the threads'.
template <typename Body>
void for_each_slice(const Sizes& sz, Body&& body) {
  at::parallel_for(0, sz.slices(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t slice = begin; slice < end; ++slice) body(slice);
  });
}

// v = squash(s) for one sample: returns the squashed J*D numbers into v.
template <typename acc_t>
void squash_into(const acc_t* s, int64_t J, int64_t D, acc_t* v) {
  for (int64_t j = 0; j < J; ++j) {
    acc_t n2 = 0;
    for (int64_t d = 0; d < D; ++d) n2 += s[j * D + d] * s[j * D + d];
    const acc_t f = squash_factor(n2);
    for (int64_t d = 0; d < D; ++d) v[j * D + d] = f * s[j * D + d];
  }
}

// g_s = squash_backward(s, g_v) for one sample.
template <typename acc_t>
void squash_backward_into(const acc_t* s, const acc_t* gv, int64_t J, int64_t D, acc_t* gs) {
  for (int64_t j = 0; j < J; ++j) {
    acc_t n2 = 0, sg = 0;
    for (int64_t d = 0; d < D; ++d) {
      n2 += s[j * D + d] * s[j * D + d];
      sg += s[j * D + d] * gv[j * D + d];
    }
    const acc_t f = squash_factor(n2), df2 = squash_backward_df2(n2) * sg;
    for (int64_t d = 0; d < D; ++d) gs[j * D + d] = f * gv[j * D + d] + df2 * s[j * D + d];
  }
}

// out[b, jd] = sum over the slices in order of partial[b, slice, jd].
template <typename acc_t>
void add_partials(const acc_t* partial, int64_t B, int64_t slices, int64_t JD, acc_t* out) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t jd = 0; jd < JD; ++jd) {
      acc_t sum = 0;
      for (int64_t slice = 0; slice < slices; ++slice) sum += partial[(b * slices + slice) * JD + jd];
      out[b * JD + jd] = sum;
    }
}

}  // namespace

ForwardResult forward(const at::Tensor& x, const at::Tensor& W, const RoutingOptions& options, int64_t R) {
  const Sizes sz = sizes_of(x, W, R);
  at::Tensor v, c, s_saved, Vprev_saved;
  std::tie(v, c, s_saved, Vprev_saved) = allocate_forward_result(x, sz.I, sz.J, sz.D, R, options.return_couplings);
  if (sz.B == 0) return {v, c, s_saved, Vprev_saved};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "capsrouting_forward_cpu_small_batch", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_options_or_not(options.forward_reads_options(), [&](auto kOptions) {
      Prepared keep;
      const auto routing = make_routing<scalar_t, acc_t, decltype(kOptions)::value>(x, W, R, options, keep);
      const int64_t JD = sz.JD(), slices = sz.slices();
      std::vector<acc_t> s_partial(sz.B * slices * JD), s(sz.B * JD), V(sz.B * JD, acc_t(0)), v_r(JD);
      acc_t* const s_saved_data = s_saved.data_ptr<acc_t>();
      acc_t* const Vprev_saved_data = Vprev_saved.data_ptr<acc_t>();
      for (int64_t r = 0; r < R; ++r) {
        scalar_t* c_out = c.defined() && r == R - 1 ? c.data_ptr<scalar_t>() : nullptr;
        for_each_slice(sz, [&](int64_t slice) {
          if (r == 0) routing.build(slice);
          routing.forward_pass(slice, r, V.data(), s_partial.data() + slice * JD, slices * JD, c_out);
        });
        add_partials(s_partial.data(), sz.B, slices, JD, s.data());
        for (int64_t b = 0; b < sz.B; ++b) {
          acc_t* s_b = s.data() + b * JD;
          acc_t* V_b = V.data() + b * JD;
          if (routing.opt.bias != nullptr)  // DESIGN.md §6: s(r) is saved with the bias in it
            for (int64_t jd = 0; jd < JD; ++jd) s_b[jd] += routing.opt.bias[jd];
          std::copy(s_b, s_b + JD, s_saved_data + (b * R + r) * JD);
          std::copy(V_b, V_b + JD, Vprev_saved_data + (b * R + r) * JD);
          squash_into(s_b, sz.J, sz.D, v_r.data());
          for (int64_t jd = 0; jd < JD; ++jd) V_b[jd] += v_r[jd];
          if (r == R - 1)
            for (int64_t jd = 0; jd < JD; ++jd) v.data_ptr<scalar_t>()[b * JD + jd] = static_cast<scalar_t>(v_r[jd]);
        }
      }
    });
  });
  // For this call's backward, if it runs next on this thread (s_saved tells this forward from another).
  scratch_written_from(Scratch::predictions, {x, W, s_saved});
  return {v, c, s_saved, Vprev_saved};
}

BackwardResult backward(const at::Tensor& grad_v, const at::Tensor& x, const at::Tensor& W,
                        const RoutingOptions& options, const at::Tensor& s_saved, const at::Tensor& Vprev_saved,
                        int64_t R) {
  const Sizes sz = sizes_of(x, W, R);
  const bool full = options.full_backward();
  const bool want_dbias = options.wants_dbias();
  const bool want_dprior = options.wants_dprior();
  const auto acc = accumulate_type(x);
  auto dx = at::empty(x.sizes(), x.options());
  auto dW = W.defined() ? at::empty(W.sizes(), W.options()) : at::Tensor();
  auto dprior = want_dprior ? at::empty({sz.I, sz.J}, x.options().dtype(acc)) : at::Tensor();
  if (sz.B == 0) return empty_batch_gradients(x, W, options);
  const int64_t JD = sz.JD(), slices = sz.slices();
  // g_s(r) of every sample and iteration, (B, R, J*D); only g_s(R-1) when not full.
  auto gs = at::zeros({sz.B, R, JD}, x.options().dtype(acc));
  const auto grad = grad_v.to(acc).contiguous();
  const auto s_c = s_saved.contiguous();
  const auto Vprev_c = Vprev_saved.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "capsrouting_backward_cpu_small_batch", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_options_or_not(options.backward_reads_options(), [&](auto kOptions) {
      // The forward's predictions, when they are still in this thread's scratch: no W to read for them.
      const bool built = scratch_holds(Scratch::predictions, {x, W, s_saved});
      Prepared keep;
      const auto routing = make_routing<scalar_t, acc_t, decltype(kOptions)::value>(x, W, R, options, keep);
      // Phase 1: g_v(r) = [r = R-1] grad_v + A_suffix; g_s(r) = squash_backward(s(r), g_v(r)).
      const acc_t* const s_data = s_c.data_ptr<acc_t>();
      const acc_t* const Vprev_data = Vprev_c.data_ptr<acc_t>();
      acc_t* const gs_data = gs.data_ptr<acc_t>();
      std::vector<acc_t> A_partial(sz.B * slices * JD), A(sz.B * JD);
      std::vector<acc_t> gv(grad.data_ptr<acc_t>(), grad.data_ptr<acc_t>() + sz.B * JD);  // g_v(r) of every sample
      // c(r) and g_b(r), r >= 1, from phase 1's passes for phase 2: (B, R, groups, J) vectors each.
      auto kept = scratch(Scratch::kept, {2, sz.B, R, sz.groups(), sz.J, sz.L}, acc);
      for (int64_t r = R - 1; r >= 0; --r) {
        for (int64_t b = 0; b < sz.B; ++b)
          squash_backward_into(s_data + (b * R + r) * JD, gv.data() + b * JD, sz.J, sz.D, gs_data + (b * R + r) * JD);
        if (r == 0 || (kOptions && !full)) break;
        for_each_slice(sz, [&](int64_t slice) {
          if (r == R - 1 && !built) routing.build(slice);  // while the slice's predictions are at hand
          routing.reduce_pass(slice, r, Vprev_data, gs_data, A_partial.data() + slice * JD,
                              slices * JD, lanes_of<acc_t>(kept[0]), lanes_of<acc_t>(kept[1]));
        });
        add_partials(A_partial.data(), sz.B, slices, JD, A.data());
        // A_suffix: g_v(r-1) is the sum of A(r') over r' >= r (grad_v reaches the last iteration alone).
        if (r == R - 1) std::fill(gv.begin(), gv.end(), acc_t(0));
        for (int64_t e = 0; e < sz.B * JD; ++e) gv[e] += A[e];
      }
      if (!built && (R == 1 || !full)) for_each_slice(sz, [&](int64_t slice) { routing.build(slice); });  // no pass built them
      for_each_slice(sz, [&](int64_t slice) {
        routing.input_pass(slice, gs_data, Vprev_data,
                           full && R > 1 ? lanes_of<acc_t>(kept[0]) : nullptr, lanes_of<acc_t>(kept[1]), dx.data_ptr<scalar_t>(),
                           W.defined() ? dW.data_ptr<scalar_t>() : nullptr,
                           want_dprior ? dprior.data_ptr<acc_t>() : nullptr, full);
      });
    });
  });
  scratch_written_from(Scratch::predictions, {x, W, s_saved});  // a second backward (retain_graph) reuses them
  // dbias = sum of g_s(r) over the batch and the iterations.
  auto dbias = want_dbias ? gs.sum({0, 1}).view({sz.J, sz.D}).to(options.bias.scalar_type()) : at::Tensor();
  return {dx, dW, dbias, want_dprior ? dprior.to(options.logit_prior.scalar_type()) : dprior};
}

}  // namespace capsrouting::cpu::small_batch
