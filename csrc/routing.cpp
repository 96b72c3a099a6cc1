// The extension's op schema, defined once, and its kernels registered per device.
//
// Four ops, the contract of capsrouting/_autograd.py with routing options (DESIGN.md §6):
//   capsule_routing_ext(u, W, bias?, logit_prior?, leaky, detach_inner, return_couplings, R)
//       -> (v, c, s_saved, Vprev_saved)
//   capsule_routing_ext_backward(grad_v, u, W, bias?, logit_prior?, leaky, detach_inner, option_grads,
//                                s_saved, Vprev_saved, R) -> (du, dW, dbias, dprior)
//   route_ext(u_hat, bias?, logit_prior?, leaky, detach_inner, return_couplings, R) -> (v, c, s_saved, Vprev_saved)
//   route_ext_backward(grad_v, u_hat, bias?, logit_prior?, leaky, detach_inner, option_grads,
//                      s_saved, Vprev_saved, R) -> (du_hat, dbias, dprior)
// s_saved and Vprev_saved, (B, R, J, Dout) in float32 (float64 for float64 input), hold
// s(r) and V(r-1) of DESIGN.md §3. c (the last iteration's couplings, (B, I, J)), dbias and
// dprior are empty tensors where not asked for. Fake-tensor and autograd registrations live in Python.
//
// And one op that describes the build: cpu_isa() -> (the CPU kernels' instruction-set level in this
// process, the levels this CPU runs, whether the build used -march=native).
#include <torch/library.h>

#include "checks.h"
#include "cpu/routing_cpu.h"
#include "routing_options.h"
#ifdef WITH_CUDA
#include "cuda/routing_cuda.h"
#endif

namespace capsrouting {
namespace {

using ForwardKernel = ForwardResult (*)(const at::Tensor&, const at::Tensor&, const RoutingOptions&, int64_t);
using BackwardKernel = BackwardResult (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const RoutingOptions&, const at::Tensor&, const at::Tensor&, int64_t);

RoutingOptions make_options(const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& logit_prior,
                            bool leaky, bool detach_inner) {
  RoutingOptions options;
  if (bias.has_value()) options.bias = *bias;
  if (logit_prior.has_value()) options.logit_prior = *logit_prior;
  options.leaky = leaky;
  options.detach_inner = detach_inner;
  return options;
}

// An op cannot return an undefined tensor: absent results are empty.
at::Tensor or_empty(const at::Tensor& t, const at::Tensor& like) { return t.defined() ? t : like.new_empty({0}); }

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardResult run_forward(ForwardKernel kernel, const at::Tensor& x, const at::Tensor& W, RoutingOptions options,
                          bool return_couplings, int64_t R) {
  options.return_couplings = return_couplings;
  auto [v, c, s_saved, Vprev_saved] = kernel(x, W, options, R);
  return {v, or_empty(c, x), s_saved, Vprev_saved};
}

// Each wrapper checks the arguments, then runs the device's kernel.
template <ForwardKernel kernel>
Forward capsule_routing(const at::Tensor& u, const at::Tensor& W, const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& logit_prior, bool leaky, bool detach_inner,
                        bool return_couplings, int64_t R) {
  check_capsule_routing_args(u, W, R);
  check_routing_options(u, bias, logit_prior, W.size(0), W.size(1), W.size(2));
  return run_forward(kernel, u, W, make_options(bias, logit_prior, leaky, detach_inner), return_couplings, R);
}

template <BackwardKernel kernel>
Forward capsule_routing_backward(const at::Tensor& grad_v, const at::Tensor& u, const at::Tensor& W,
                                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& logit_prior,
                                 bool leaky, bool detach_inner, bool option_grads, const at::Tensor& s_saved,
                                 const at::Tensor& Vprev_saved, int64_t R) {
  check_capsule_routing_args(u, W, R);
  check_routing_options(u, bias, logit_prior, W.size(0), W.size(1), W.size(2));
  check_backward_args(grad_v, u, s_saved, Vprev_saved, u.size(0), W.size(1), W.size(2), R);
  auto options = make_options(bias, logit_prior, leaky, detach_inner);
  options.option_grads = option_grads;
  auto [du, dW, dbias, dprior] = kernel(grad_v, u, W, options, s_saved, Vprev_saved, R);
  return {du, dW, or_empty(dbias, u), or_empty(dprior, u)};
}

template <ForwardKernel kernel>
Forward route(const at::Tensor& u_hat, const c10::optional<at::Tensor>& bias,
              const c10::optional<at::Tensor>& logit_prior, bool leaky, bool detach_inner, bool return_couplings,
              int64_t R) {
  check_route_args(u_hat, R);
  check_routing_options(u_hat, bias, logit_prior, u_hat.size(1), u_hat.size(2), u_hat.size(3));
  return run_forward(kernel, u_hat, at::Tensor(), make_options(bias, logit_prior, leaky, detach_inner),
                     return_couplings, R);
}

template <BackwardKernel kernel>
std::tuple<at::Tensor, at::Tensor, at::Tensor> route_backward(
    const at::Tensor& grad_v, const at::Tensor& u_hat, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& logit_prior, bool leaky, bool detach_inner, bool option_grads,
    const at::Tensor& s_saved, const at::Tensor& Vprev_saved, int64_t R) {
  check_route_args(u_hat, R);
  check_routing_options(u_hat, bias, logit_prior, u_hat.size(1), u_hat.size(2), u_hat.size(3));
  check_backward_args(grad_v, u_hat, s_saved, Vprev_saved, u_hat.size(0), u_hat.size(2), u_hat.size(3), R);
  auto options = make_options(bias, logit_prior, leaky, detach_inner);
  options.option_grads = option_grads;
  auto [du_hat, dW, dbias, dprior] = kernel(grad_v, u_hat, at::Tensor(), options, s_saved, Vprev_saved, R);
  return {du_hat, or_empty(dbias, u_hat), or_empty(dprior, u_hat)};
}

std::tuple<std::string, std::vector<std::string>, bool> cpu_isa() {
#ifdef CAPSROUTING_NATIVE_BUILD
  constexpr bool native = true;
#else
  constexpr bool native = false;
#endif
  return {cpu::isa(), cpu::runnable_isas(), native};
}

}  // namespace

TORCH_LIBRARY(capsrouting, m) {
  m.def(
      "capsule_routing_ext(Tensor u, Tensor W, Tensor? bias, Tensor? logit_prior, bool leaky, bool detach_inner, "
      "bool return_couplings, int num_iterations) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "capsule_routing_ext_backward(Tensor grad_v, Tensor u, Tensor W, Tensor? bias, Tensor? logit_prior, "
      "bool leaky, bool detach_inner, bool option_grads, Tensor s_saved, Tensor Vprev_saved, int num_iterations) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "route_ext(Tensor u_hat, Tensor? bias, Tensor? logit_prior, bool leaky, bool detach_inner, "
      "bool return_couplings, int num_iterations) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "route_ext_backward(Tensor grad_v, Tensor u_hat, Tensor? bias, Tensor? logit_prior, bool leaky, "
      "bool detach_inner, bool option_grads, Tensor s_saved, Tensor Vprev_saved, int num_iterations) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("cpu_isa() -> (str, str[], bool)", &cpu_isa);
}

TORCH_LIBRARY_IMPL(capsrouting, CPU, m) {
  m.impl("capsule_routing_ext", &capsule_routing<cpu::forward>);
  m.impl("capsule_routing_ext_backward", &capsule_routing_backward<cpu::backward>);
  m.impl("route_ext", &route<cpu::forward>);
  m.impl("route_ext_backward", &route_backward<cpu::backward>);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(capsrouting, CUDA, m) {
  m.impl("capsule_routing_ext", &capsule_routing<cuda::forward>);
  m.impl("capsule_routing_ext_backward", &capsule_routing_backward<cuda::backward>);
  m.impl("route_ext", &route<cuda::forward>);
  m.impl("route_ext_backward", &route_backward<cuda::backward>);
}
#endif

}  // namespace capsrouting
