// CPU kernels of the extension's routing ops (see routing_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include "../routing_options.h"

namespace capsrouting::cpu {

// x is u (B, I, Din) with W (I, J, Dout, Din), or u_hat (B, I, J, Dout) with W undefined (route).
ForwardResult forward(const at::Tensor& x, const at::Tensor& W, const RoutingOptions& options, int64_t num_iterations);
BackwardResult backward(const at::Tensor& grad_v, const at::Tensor& x, const at::Tensor& W,
                        const RoutingOptions& options, const at::Tensor& s_saved, const at::Tensor& Vprev_saved,
                        int64_t num_iterations);

}  // namespace capsrouting::cpu
