// ATen launchers of the CUDA kernels in routing_kernels.cuh (which describes them).
#include "routing_cuda.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "routing_kernels.cuh"

namespace capsrouting::cuda {
namespace {

at::ScalarType accumulate_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

Sizes sizes_of(const at::Tensor& x, const at::Tensor* W, int64_t R) {
  if (W != nullptr) return {x.size(0), W->size(0), W->size(1), W->size(2), W->size(3), R};
  return {x.size(0), x.size(1), x.size(2), x.size(3), 0, R};
}

void check_sizes(const Sizes& sz) {
  TORCH_CHECK_VALUE(sizes_supported(sz), "the cuda backend supports J <= 64, Dout <= 32, Din <= 16; got J = ", sz.J,
                    ", Dout = ", sz.D, ", Din = ", sz.K);
}

// Launches on the current stream with `bytes` of dynamic shared memory, opting in beyond the
// default 48 KB.
struct StreamLauncher {
  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, dim3 grid, size_t bytes, Args... args) const {
    if (bytes > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    kernel<<<grid, kThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x_in, const at::Tensor* W_in, int64_t R) {
  const Sizes sz = sizes_of(x_in, W_in, R);
  check_sizes(sz);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto W = W_in != nullptr ? W_in->contiguous() : at::Tensor();
  auto v = at::empty({sz.B, sz.J, sz.D}, x.options());
  auto s_saved = at::empty({sz.B, R, sz.J, sz.D}, x.options().dtype(accumulate_type(x)));
  auto Vprev_saved = at::empty_like(s_saved);
  if (sz.B == 0) return {v, s_saved, Vprev_saved};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "capsrouting_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    run_forward<scalar_t, acc_t>(sz, StreamLauncher{}, x.data_ptr<scalar_t>(),
                                 W.defined() ? W.data_ptr<scalar_t>() : nullptr, v.data_ptr<scalar_t>(),
                                 s_saved.data_ptr<acc_t>(), Vprev_saved.data_ptr<acc_t>());
  });
  return {v, s_saved, Vprev_saved};
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_v_in, const at::Tensor& x_in, const at::Tensor* W_in,
                                            const at::Tensor& s_in, const at::Tensor& Vprev_in, int64_t R) {
  const Sizes sz = sizes_of(x_in, W_in, R);
  check_sizes(sz);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto W = W_in != nullptr ? W_in->contiguous() : at::Tensor();
  const auto grad_v = grad_v_in.contiguous(), s_saved = s_in.contiguous(), Vprev_saved = Vprev_in.contiguous();
  // backward_inputs writes every element of dx and dW; only an empty batch leaves dW to be zeroed.
  auto dx = at::empty(x.sizes(), x.options());
  auto dW = W.defined() ? at::empty(W.sizes(), W.options()) : at::Tensor();
  if (sz.B == 0) return {dx, W.defined() ? dW.zero_() : dW};
  auto gs_saved = at::empty_like(s_saved);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "capsrouting_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    run_backward<scalar_t, acc_t>(sz, StreamLauncher{}, x.data_ptr<scalar_t>(),
                                  W.defined() ? W.data_ptr<scalar_t>() : nullptr, grad_v.data_ptr<scalar_t>(),
                                  s_saved.data_ptr<acc_t>(), Vprev_saved.data_ptr<acc_t>(), gs_saved.data_ptr<acc_t>(),
                                  dx.data_ptr<scalar_t>(), W.defined() ? dW.data_ptr<scalar_t>() : nullptr);
  });
  return {dx, dW};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> capsule_routing_forward(const at::Tensor& u, const at::Tensor& W,
                                                                       int64_t num_iterations) {
  return forward(u, &W, num_iterations);
}

std::tuple<at::Tensor, at::Tensor> capsule_routing_backward(const at::Tensor& grad_v, const at::Tensor& u,
                                                            const at::Tensor& W, const at::Tensor& s_saved,
                                                            const at::Tensor& Vprev_saved, int64_t num_iterations) {
  return backward(grad_v, u, &W, s_saved, Vprev_saved, num_iterations);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_forward(const at::Tensor& u_hat, int64_t num_iterations) {
  return forward(u_hat, nullptr, num_iterations);
}

at::Tensor route_backward(const at::Tensor& grad_v, const at::Tensor& u_hat, const at::Tensor& s_saved,
                          const at::Tensor& Vprev_saved, int64_t num_iterations) {
  return std::get<0>(backward(grad_v, u_hat, nullptr, s_saved, Vprev_saved, num_iterations));
}

}  // namespace capsrouting::cuda
