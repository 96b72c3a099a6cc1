// The routing options of DESIGN.md §6 as the kernels receive them, what the ops return, and what
// every backend's launchers share around their kernels.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <type_traits>

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
  // Whether the backward returns dbias / dprior.
  bool wants_dbias() const { return bias.defined() && option_grads; }
  bool wants_dprior() const { return logit_prior.defined() && option_grads; }
  // Whether a kernel needs its instantiation with the options: the forward for any of them, the
  // backward for those its loops read (the bias is in s(r), which the backward is given).
  bool forward_reads_options() const { return bias.defined() || logit_prior.defined() || leaky || return_couplings; }
  bool backward_reads_options() const { return logit_prior.defined() || leaky || detach_inner; }
};

// (v (B, J, Dout), couplings (B, I, J) or undefined, s_saved (B, R, J, Dout), Vprev_saved (B, R, J, Dout)).
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// (dx, dW or undefined (route), dbias or undefined, dprior or undefined).
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The accumulation type of an input: double for double, float for float and the half types.
inline at::ScalarType accumulate_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A forward's results, allocated for input x with I input and J x D output capsules: v, the couplings
// when asked for, and s(r), V(r-1) of every iteration in the accumulation type.
inline ForwardResult allocate_forward_result(const at::Tensor& x, int64_t I, int64_t J, int64_t D, int64_t R,
                                             bool return_couplings) {
  const int64_t B = x.size(0);
  auto s_saved = at::empty({B, R, J, D}, x.options().dtype(accumulate_type(x)));
  return {at::empty({B, J, D}, x.options()), return_couplings ? at::empty({B, I, J}, x.options()) : at::Tensor(),
          s_saved, at::empty_like(s_saved)};
}

// A backward's results for an empty batch, where no kernel runs to write them: zeros.
inline BackwardResult empty_batch_gradients(const at::Tensor& x, const at::Tensor& W, const RoutingOptions& options) {
  return {at::zeros_like(x), W.defined() ? at::zeros_like(W) : at::Tensor(),
          options.wants_dbias() ? at::zeros_like(options.bias) : at::Tensor(),
          options.wants_dprior() ? at::zeros_like(options.logit_prior) : at::Tensor()};
}

// Runs body(std::true_type) when an option is on, else body(std::false_type): the plain op's loops are
// compiled apart, without the options.
template <typename Body>
void with_options_or_not(bool on, Body&& body) {
  if (on)
    body(std::true_type{});
  else
    body(std::false_type{});
}

}  // namespace capsrouting
