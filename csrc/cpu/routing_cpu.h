// CPU kernels of the extension's routing ops: two paths (kernels/batch.inc, kernels/small_batch.inc),
// each compiled per instruction-set level (isa.h), chosen per call by routing_cpu.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "../routing_options.h"

namespace capsrouting::cpu {

// x is u (B, I, Din) with W (I, J, Dout, Din), or u_hat (B, I, J, Dout) with W undefined (route).
ForwardResult forward(const at::Tensor& x, const at::Tensor& W, const RoutingOptions& options, int64_t num_iterations);
BackwardResult backward(const at::Tensor& grad_v, const at::Tensor& x, const at::Tensor& W,
                        const RoutingOptions& options, const at::Tensor& s_saved, const at::Tensor& Vprev_saved,
                        int64_t num_iterations);

// The instruction-set level the kernels run at in this process ("baseline", "avx2", "avx512"):
// CAPSROUTING_CPU_ISA if set, else the best this CPU runs. Raises on a bad CAPSROUTING_CPU_ISA.
std::string isa();
// The levels this build has and this CPU runs, lowest first.
std::vector<std::string> runnable_isas();

}  // namespace capsrouting::cpu
