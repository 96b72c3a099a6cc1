// CUDA kernels of the extension's routing ops (see routing_cuda.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace capsrouting::cuda {

// Forward: (v (B, J, Dout), s_saved (B, R, J, Dout), Vprev_saved (B, R, J, Dout)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> capsule_routing_forward(const at::Tensor& u, const at::Tensor& W,
                                                                       int64_t num_iterations);
std::tuple<at::Tensor, at::Tensor> capsule_routing_backward(const at::Tensor& grad_v, const at::Tensor& u,
                                                            const at::Tensor& W, const at::Tensor& s_saved,
                                                            const at::Tensor& Vprev_saved, int64_t num_iterations);
std::tuple<at::Tensor, at::Tensor, at::Tensor> route_forward(const at::Tensor& u_hat, int64_t num_iterations);
at::Tensor route_backward(const at::Tensor& grad_v, const at::Tensor& u_hat, const at::Tensor& s_saved,
                          const at::Tensor& Vprev_saved, int64_t num_iterations);

}  // namespace capsrouting::cuda
