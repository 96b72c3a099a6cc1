// The extension's op schema, defined once, and its kernels registered per device.
//
// Four ops, the contract of capsrouting/_autograd.py:
//   capsule_routing_ext(u, W, R)                                  -> (v, s_saved, Vprev_saved)
//   capsule_routing_ext_backward(grad_v, u, W, s_saved, Vprev_saved, R) -> (du, dW)
//   route_ext(u_hat, R)                                           -> (v, s_saved, Vprev_saved)
//   route_ext_backward(grad_v, u_hat, s_saved, Vprev_saved, R)    -> du_hat
// s_saved and Vprev_saved, (B, R, J, Dout) in float32 (float64 for float64 input), hold
// s(r) and V(r-1) of DESIGN.md §3. Fake-tensor and autograd registrations live in Python.
#include <torch/library.h>

#include "checks.h"
#include "cpu/routing_cpu.h"
#ifdef WITH_CUDA
#include "cuda/routing_cuda.h"
#endif

namespace capsrouting {
namespace {

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Each wrapper checks the arguments, then runs the device's kernel.
template <Forward (*kernel)(const at::Tensor&, const at::Tensor&, int64_t)>
Forward capsule_routing(const at::Tensor& u, const at::Tensor& W, int64_t R) {
  check_capsule_routing_args(u, W, R);
  return kernel(u, W, R);
}

template <std::tuple<at::Tensor, at::Tensor> (*kernel)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&, const at::Tensor&, int64_t)>
std::tuple<at::Tensor, at::Tensor> capsule_routing_backward(const at::Tensor& grad_v, const at::Tensor& u,
                                                            const at::Tensor& W, const at::Tensor& s_saved,
                                                            const at::Tensor& Vprev_saved, int64_t R) {
  check_capsule_routing_args(u, W, R);
  check_backward_args(grad_v, u, s_saved, Vprev_saved, u.size(0), W.size(1), W.size(2), R);
  return kernel(grad_v, u, W, s_saved, Vprev_saved, R);
}

template <Forward (*kernel)(const at::Tensor&, int64_t)>
Forward route(const at::Tensor& u_hat, int64_t R) {
  check_route_args(u_hat, R);
  return kernel(u_hat, R);
}

template <at::Tensor (*kernel)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>
at::Tensor route_backward(const at::Tensor& grad_v, const at::Tensor& u_hat, const at::Tensor& s_saved,
                          const at::Tensor& Vprev_saved, int64_t R) {
  check_route_args(u_hat, R);
  check_backward_args(grad_v, u_hat, s_saved, Vprev_saved, u_hat.size(0), u_hat.size(2), u_hat.size(3), R);
  return kernel(grad_v, u_hat, s_saved, Vprev_saved, R);
}

}  // namespace

TORCH_LIBRARY(capsrouting, m) {
  m.def("capsule_routing_ext(Tensor u, Tensor W, int num_iterations) -> (Tensor, Tensor, Tensor)");
  m.def(
      "capsule_routing_ext_backward(Tensor grad_v, Tensor u, Tensor W, Tensor s_saved, Tensor Vprev_saved, "
      "int num_iterations) -> (Tensor, Tensor)");
  m.def("route_ext(Tensor u_hat, int num_iterations) -> (Tensor, Tensor, Tensor)");
  m.def(
      "route_ext_backward(Tensor grad_v, Tensor u_hat, Tensor s_saved, Tensor Vprev_saved, int num_iterations) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(capsrouting, CPU, m) {
  m.impl("capsule_routing_ext", &capsule_routing<cpu::capsule_routing_forward>);
  m.impl("capsule_routing_ext_backward", &capsule_routing_backward<cpu::capsule_routing_backward>);
  m.impl("route_ext", &route<cpu::route_forward>);
  m.impl("route_ext_backward", &route_backward<cpu::route_backward>);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(capsrouting, CUDA, m) {
  m.impl("capsule_routing_ext", &capsule_routing<cuda::capsule_routing_forward>);
  m.impl("capsule_routing_ext_backward", &capsule_routing_backward<cuda::capsule_routing_backward>);
  m.impl("route_ext", &route<cuda::route_forward>);
  m.impl("route_ext_backward", &route_backward<cuda::route_backward>);
}
#endif

}  // namespace capsrouting
