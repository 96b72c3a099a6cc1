// CUDA kernels of the extension's routing ops (see routing_cuda.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include "../routing_options.h"

namespace capsrouting::cuda {

// As capsrouting::cpu::forward and backward (routing_cpu.h).
ForwardResult forward(const at::Tensor& x, const at::Tensor& W, const RoutingOptions& options, int64_t num_iterations);
BackwardResult backward(const at::Tensor& grad_v, const at::Tensor& x, const at::Tensor& W,
                        const RoutingOptions& options, const at::Tensor& s_saved, const at::Tensor& Vprev_saved,
                        int64_t num_iterations);

}  // namespace capsrouting::cuda
