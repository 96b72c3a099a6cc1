// The routing options of DESIGN.md §6 as the kernels receive them, and what the ops return.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace capsrouting {

struct RoutingOptions {
  at::Tensor bias;           // (J, Dout) in the input's dtype, added to s(r) in every iteration; undefined: none
  at::Tensor logit_prior;    // (I, J) in the input's dtype, the initial logits; undefined: zeros
  bool leaky = false;        // an extra zero logit in every softmax
  bool detach_inner = false; // backward: u_hat gets only the last iteration's c(R) g_s(R)
  bool return_couplings = false;  // forward: also return the last iteration's couplings
  bool option_grads = true;  // backward: compute dbias and dprior (with detach_inner and neither wanted, one pass)

  // Whether the backward needs g_s(r) and g_b(r) of every iteration (phase 1 of DESIGN.md §3).
  bool full_backward() const { return !detach_inner || (option_grads && (bias.defined() || logit_prior.defined())); }
};

// (v (B, J, Dout), couplings (B, I, J) or undefined, s_saved (B, R, J, Dout), Vprev_saved (B, R, J, Dout)).
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// (dx, dW or undefined (route), dbias or undefined, dprior or undefined).
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

}  // namespace capsrouting
