// The sizes of one call of the CPU kernels, as both of their paths read them.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "../routing_options.h"

namespace capsrouting::cpu {

// Din is padded to a multiple of this (zeros in u and W): whole blocks of columns in the batch
// kernels' backward, a length the compiler knows for the common Din in the small-batch kernels.
constexpr int64_t kPadK = 4;

struct ProblemSizes {
  int64_t B, I, J, D, K, R;  // K = 0: predictions given (route)
  int64_t L;                  // numbers per vector of the accumulation type: 16 floats or 8 doubles
  int64_t JD() const { return J * D; }
  int64_t Kp() const { return (K + kPadK - 1) / kPadK * kPadK; }
};

// x is u (B, I, Din) with W (I, J, Dout, Din), or u_hat (B, I, J, Dout) with W undefined (route).
inline ProblemSizes problem_sizes(const at::Tensor& x, const at::Tensor& W, int64_t R) {
  const int64_t L = 64 / int64_t(c10::elementSize(accumulate_type(x)));
  if (W.defined()) return {x.size(0), W.size(0), W.size(1), W.size(2), W.size(3), R, L};
  return {x.size(0), x.size(1), x.size(2), x.size(3), 0, R, L};
}

// The last dimension of t (Din) zero-padded to Kp, in the accumulation type acc (t itself when it
// already is: no copy for float32 or float64 with Din a multiple of kPadK).
inline at::Tensor padded_last_dim(const at::Tensor& t, int64_t Kp, at::ScalarType acc) {
  if (t.size(-1) == Kp && t.scalar_type() == acc) return t.contiguous();
  auto sizes = t.sizes().vec();
  sizes.back() = Kp;
  auto padded = at::zeros(sizes, t.options().dtype(acc));
  padded.narrow(-1, 0, t.size(-1)).copy_(t);
  return padded;
}

}  // namespace capsrouting::cpu
