// Per-capsule math shared by the CPU and CUDA kernels: squash, its backward, the softmax exp.
//
// squash(s) = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps)   (DESIGN.md §1)
// Both backends write it as v = f(|s|^2) * s, so only the scalar factor lives here.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define CAPS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CAPS_HOST_DEVICE inline
#endif

namespace capsrouting {

// Must equal capsrouting.reference.SQUASH_EPS.
constexpr double kSquashEps = 1e-8;

// f in v = f * s, from n2 = |s|^2.
template <typename T>
CAPS_HOST_DEVICE T squash_factor(T n2) {
  return n2 / ((T(1) + n2) * std::sqrt(n2 + T(kSquashEps)));
}

// Gradient of squash: g_s = f * g + df2 * dot(s, g) * s, with df2 = 2 f'(n2).
template <typename T>
CAPS_HOST_DEVICE T squash_backward_df2(T n2) {
  const T eps = T(kSquashEps);
  const T root = std::sqrt(n2 + eps);
  const T one_plus = T(1) + n2;
  return T(2) * ((n2 + eps) - T(0.5) * n2 * one_plus) / (one_plus * one_plus * (n2 + eps) * root);
}

// exp(x) for x <= 0 (softmax after subtracting the maximum), written so a compiler can
// vectorize a loop of it: Cody-Waite reduction to [-ln2/2, ln2/2], a degree-6 polynomial
// (max relative error ~2 ulp in float), and the power of two built from the exponent bits.
CAPS_HOST_DEVICE float exp_nonpositive(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);  // the GPU has a fast, accurate exp of its own
#else
  x = x < -87.0f ? -87.0f : x;
  const float n = float(int(x * 1.44269504088896341f - 0.5f));  // round(x / ln2), x <= 0
  const float f = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
#endif
}

// float64 is the accuracy reference: the library exp.
CAPS_HOST_DEVICE double exp_nonpositive(double x) { return std::exp(x); }

}  // namespace capsrouting
