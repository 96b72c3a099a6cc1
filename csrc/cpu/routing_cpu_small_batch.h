// CPU kernels for small batches, vectorized over the input capsules (see routing_cpu_small_batch.cpp).
// Same arguments, results and saved tensors as capsrouting::cpu::forward/backward.
#pragma once

#include <ATen/core/Tensor.h>

#include "../routing_options.h"

namespace capsrouting::cpu::small_batch {

ForwardResult forward(const at::Tensor& x, const at::Tensor& W, const RoutingOptions& options, int64_t num_iterations);
BackwardResult backward(const at::Tensor& grad_v, const at::Tensor& x, const at::Tensor& W,
                        const RoutingOptions& options, const at::Tensor& s_saved, const at::Tensor& Vprev_saved,
                        int64_t num_iterations);

}  // namespace capsrouting::cpu::small_batch
