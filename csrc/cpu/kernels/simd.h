// What both CPU paths vectorize with: a 64-byte vector of the accumulation type, its exp,
// max and fixed-order lane sum, the routing options as the loops read them, and the
// per-input-capsule routing math (couplings, their gradients) written on whole vectors.
//
// Which dimension a vector's lanes run over is the caller's: batch elements
// (routing_cpu.cpp) or input capsules (routing_cpu_small_batch.cpp). The math below is
// vertical, lane by lane, so it serves either.
//
// Part of one instruction-set level's translation unit (kernels/unit.inc), which has already
// included the standard headers this one uses: they must not be first read under the level's
// target pragma, or their inline functions would be compiled for it (see unit.inc).
#pragma once

#ifndef CAPSROUTING_ISA
#error "kernels/simd.h is included by kernels/unit.inc only"
#endif

namespace capsrouting::cpu::CAPSROUTING_ISA::simd {

// Numbers per vector: 16 floats or 8 doubles.
template <typename acc_t>
constexpr int64_t kLanes = 64 / sizeof(acc_t);

// The compiler's vector of 64 bytes, and of the CPU's own width at this level
// (CAPSROUTING_ISA_VECTOR_BYTES: 16 for SSE2 and NEON, 32 for AVX2, 64 for AVX-512).
template <typename T>
struct Vector64;
template <>
struct Vector64<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct Vector64<double> {
  typedef double type __attribute__((vector_size(64)));
};
template <typename T>
using Native64 = typename Vector64<T>::type;
constexpr int kNativeBytes = CAPSROUTING_ISA_VECTOR_BYTES;

// A 64-byte vector held as 64 / kNativeBytes vectors of the CPU's own width, with the arithmetic
// of the compiler's vectors (lane by lane, scalars broadcast). Why not the compiler's 64-byte type
// at every level: below AVX-512, GCC keeps that type in memory and moves it through general
// registers (measured: the AVX2 level slower than SSE2), while a struct of native vectors stays
// in registers. Same size and lane order: the layouts are the same at every level.
template <typename T>
struct Wide {
  typedef T Part __attribute__((vector_size(kNativeBytes)));
  static constexpr int kParts = 64 / kNativeBytes;
  Part part[kParts];

  Wide() : part{} {}
  Wide(T x) {  // NOLINT: implicit, as the compiler's vectors take scalars
    for (auto& p : part) p = Part{} + x;
  }
  // Lane l (GCC and Clang let a vector's element type alias it).
  T& operator[](int64_t l) { return reinterpret_cast<T*>(part)[l]; }
  T operator[](int64_t l) const { return reinterpret_cast<const T*>(part)[l]; }

#define CAPSROUTING_WIDE_OPERATOR(op)                                           \
  Wide& operator op##=(const Wide& b) {                                         \
    for (int k = 0; k < kParts; ++k) part[k] op## = b.part[k];                 \
    return *this;                                                               \
  }                                                                             \
  friend Wide operator op(Wide a, const Wide& b) { return a op## = b; }
  CAPSROUTING_WIDE_OPERATOR(+)
  CAPSROUTING_WIDE_OPERATOR(-)
  CAPSROUTING_WIDE_OPERATOR(*)
  CAPSROUTING_WIDE_OPERATOR(/)
#undef CAPSROUTING_WIDE_OPERATOR
};

// The kLanes numbers of one vector: 64 bytes, so any row of a lane-minor tensor is aligned
// (torch's CPU allocations are 64-byte aligned).
template <typename T>
using Lanes = std::conditional_t<kNativeBytes == 64, Native64<T>, Wide<T>>;

// f applied to each native vector of x (a native 64-byte vector is one).
template <typename V, typename F>
V each_part(V x, F f) {
  return f(x);
}
template <typename T, typename F>
Wide<T> each_part(Wide<T> x, F f) {
  for (auto& p : x.part) p = f(p);
  return x;
}
template <typename V, typename F>
V each_part(V a, const V& b, F f) {
  return f(a, b);
}
template <typename T, typename F>
Wide<T> each_part(Wide<T> a, const Wide<T>& b, F f) {
  for (int k = 0; k < Wide<T>::kParts; ++k) a.part[k] = f(a.part[k], b.part[k]);
  return a;
}

// n zero-initialized vectors (or scalars), 64-byte aligned. Not std::vector: its allocator is
// instantiated for the baseline (unit.inc), where a 64-byte vector type is only 16-byte aligned,
// so it may hand out memory that this level's aligned vector stores fault on.
template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t n)
      : size_(n), data_(static_cast<T*>(::operator new(sizeof(T) * size_t(n > 0 ? n : 1), std::align_val_t(64)))) {
    for (int64_t k = 0; k < n; ++k) data_[k] = T{};
  }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer() { ::operator delete(data_, std::align_val_t(64)); }

  T* data() { return data_; }
  const T* data() const { return data_; }
  T* begin() { return data_; }
  T* end() { return data_ + size_; }
  T& operator[](int64_t k) { return data_[k]; }
  const T& operator[](int64_t k) const { return data_[k]; }

 private:
  int64_t size_;
  T* data_;
};

template <typename V>
V lanes_max(const V& a, const V& b) {
  return each_part(a, b, [](auto x, auto y) { return x > y ? x : y; });
}

// exp of every lane of a vector of floats of any width, x <= 0: the polynomial of routing_math.h,
// written on whole vectors so that it stays SIMD.
template <typename V>
V exp_nonpositive_floats(V x) {
  typedef int32_t Ints __attribute__((vector_size(sizeof(V))));
  x = x < -87.0f ? V{} - 87.0f : x;
  const Ints n_int = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, Ints);  // round(x / ln2)
  const V n = __builtin_convertvector(n_int, V);
  const V f = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  V p = f * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  const Ints bits = (n_int + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// exp of every lane, x <= 0. float: the polynomial; double (the accuracy reference): the library exp.
inline Lanes<float> lanes_exp(Lanes<float> x) {
  return each_part(x, [](auto part) { return exp_nonpositive_floats(part); });
}

inline Lanes<double> lanes_exp(Lanes<double> x) {
  for (int64_t l = 0; l < kLanes<double>; ++l) x[l] = std::exp(x[l]);
  return x;
}

// Sum of the lanes by a fixed pairwise tree of vector halves (the same bits every call, and at
// every level): lanes l and l + 8, then l and l + 4, then (0 + 2) + (1 + 3).
inline float lanes_sum(const Native64<float>& x) {
  typedef float Half8 __attribute__((vector_size(32)));
  typedef float Half4 __attribute__((vector_size(16)));
  const Half8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  const Half4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

inline double lanes_sum(const Native64<double>& x) {
  typedef double Half4 __attribute__((vector_size(32)));
  const Half4 a = __builtin_shufflevector(x, x, 0, 1, 2, 3) + __builtin_shufflevector(x, x, 4, 5, 6, 7);
  return (a[0] + a[2]) + (a[1] + a[3]);
}

template <typename T>
T lanes_sum(const Wide<T>& x) {
  constexpr int n = 64 / sizeof(T);
  T t[n];
  std::memcpy(t, x.part, sizeof(t));
  for (int h = n / 2; h > 2; h /= 2)
    for (int l = 0; l < h; ++l) t[l] += t[l + h];
  return (t[0] + t[2]) + (t[1] + t[3]);
}

// The routing options of DESIGN.md §6 as the loops read them (acc_t copies of the tensors). Two
// kinds: with kOptions the values of a call; without, compile-time nothing, so that the loops of the
// plain op compile as if the options did not exist.
template <typename acc_t, bool kOptions>
struct OptionValues {
  const acc_t* bias = nullptr;   // (J*D), added to s(r); null: none
  const acc_t* prior = nullptr;  // (I, J), the initial logits; null: zeros
  bool leaky = false;            // an extra zero logit in every softmax
  bool detach_inner = false;     // backward: u_hat gets the last iteration's c g_s alone

  const acc_t* prior_row(int64_t i, int64_t J) const { return prior != nullptr ? prior + i * J : nullptr; }
  // The first iteration's couplings are 1/J: its logits are all zero and nothing leaks.
  bool uniform_start() const { return prior == nullptr && !leaky; }
};

template <typename acc_t>
struct OptionValues<acc_t, false> {
  static constexpr const acc_t* bias = nullptr;
  static constexpr bool leaky = false;
  static constexpr bool detach_inner = false;
  static constexpr const acc_t* prior_row(int64_t, int64_t) { return nullptr; }
  static constexpr bool uniform_start() { return true; }
};

// c[j] = softmax over j of prior[j] + dot(uh[j], V[j]): the couplings of one input capsule
// (prior null: no prior). leaky: an extra zero logit, c[j] = exp(b_j - m) / (exp(-m) + sum_k exp(b_k - m))
// with m = max(0, max_k b_k).
// prior: one number per j (shared by the lanes) or one vector per j. V (and gs, x below): vectors, or
// numbers shared by the lanes (a broadcast load, as cheap as a vector load).
template <typename Vec, typename Shared, typename Prior>
void couplings(const Vec* uh, const Shared* V, int64_t J, int64_t D, const Prior* prior, bool leaky, Vec* c) {
  for (int64_t j = 0; j < J; ++j) {
    Vec dot = {};
    for (int64_t d = 0; d < D; ++d) dot += uh[j * D + d] * V[j * D + d];
    c[j] = prior != nullptr ? dot + prior[j] : dot;
  }
  Vec max = c[0];
  for (int64_t j = 1; j < J; ++j) max = lanes_max(max, c[j]);
  if (leaky) max = lanes_max(max, Vec{});
  Vec sum = leaky ? lanes_exp(Vec{} - max) : Vec{};
  for (int64_t j = 0; j < J; ++j) {
    c[j] = lanes_exp(c[j] - max);
    sum += c[j];
  }
  const Vec inverse = 1 / sum;
  for (int64_t j = 0; j < J; ++j) c[j] *= inverse;
}

// g_b[j] = c[j] * (g_c[j] - sum_k c[k] g_c[k]), with g_c[j] = dot(g_s[j], uh[j]).
template <typename Vec, typename Shared>
void coupling_gradients(const Vec* uh, const Shared* gs, int64_t J, int64_t D, const Vec* c, Vec* gb) {
  Vec weighted = {};
  for (int64_t j = 0; j < J; ++j) {
    Vec dot = {};
    for (int64_t d = 0; d < D; ++d) dot += uh[j * D + d] * gs[j * D + d];
    gb[j] = dot;
    weighted += c[j] * dot;
  }
  for (int64_t j = 0; j < J; ++j) gb[j] = c[j] * (gb[j] - weighted);
}

// out[j*D + d] += c[j] * x[j*D + d]
template <typename Vec, typename Shared>
void add_scaled_rows(const Vec* c, const Shared* x, int64_t J, int64_t D, Vec* out) {
  for (int64_t j = 0; j < J; ++j)
    for (int64_t d = 0; d < D; ++d) out[j * D + d] += c[j] * x[j * D + d];
}

}  // namespace capsrouting::cpu::CAPSROUTING_ISA::simd
