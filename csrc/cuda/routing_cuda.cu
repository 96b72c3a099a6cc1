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

// acc_t copies of the option tensors on the device, kept alive for the launches.
struct OptionTensors {
  at::Tensor bias, logit_prior;
  OptionTensors(const RoutingOptions& options, at::ScalarType acc) {
    if (options.bias.defined()) bias = options.bias.to(acc).contiguous();
    if (options.logit_prior.defined()) logit_prior = options.logit_prior.to(acc).contiguous();
  }
  template <typename scalar_t, typename acc_t>
  Options<scalar_t, acc_t> kernel_options(const RoutingOptions& options) const {
    Options<scalar_t, acc_t> opt;
    opt.bias = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
    opt.prior = logit_prior.defined() ? logit_prior.data_ptr<acc_t>() : nullptr;
    opt.leaky = options.leaky;
    opt.detach_inner = options.detach_inner;
    opt.full = options.full_backward();
    return opt;
  }
};

ForwardResult forward(const at::Tensor& x_in, const at::Tensor* W_in, const RoutingOptions& options, int64_t R) {
  const Sizes sz = sizes_of(x_in, W_in, R);
  check_sizes(sz);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto W = W_in != nullptr ? W_in->contiguous() : at::Tensor();
  const auto acc = accumulate_type(x);
  at::Tensor v, c, s_saved, Vprev_saved;
  std::tie(v, c, s_saved, Vprev_saved) = allocate_forward_result(x, sz.I, sz.J, sz.D, R, options.return_couplings);
  if (sz.B == 0) return {v, c, s_saved, Vprev_saved};
  const OptionTensors option_tensors(options, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "capsrouting_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto opt = option_tensors.kernel_options<scalar_t, acc_t>(options);
    opt.couplings = c.defined() ? c.data_ptr<scalar_t>() : nullptr;
    run_forward<scalar_t, acc_t>(sz, StreamLauncher{}, opt, x.data_ptr<scalar_t>(),
                                 W.defined() ? W.data_ptr<scalar_t>() : nullptr, v.data_ptr<scalar_t>(),
                                 s_saved.data_ptr<acc_t>(), Vprev_saved.data_ptr<acc_t>());
  });
  return {v, c, s_saved, Vprev_saved};
}

BackwardResult backward(const at::Tensor& grad_v_in, const at::Tensor& x_in, const at::Tensor* W_in,
                        const RoutingOptions& options, const at::Tensor& s_in, const at::Tensor& Vprev_in, int64_t R) {
  const Sizes sz = sizes_of(x_in, W_in, R);
  check_sizes(sz);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto W = W_in != nullptr ? W_in->contiguous() : at::Tensor();
  const auto grad_v = grad_v_in.contiguous(), s_saved = s_in.contiguous(), Vprev_saved = Vprev_in.contiguous();
  const bool want_dbias = options.wants_dbias();
  const bool want_dprior = options.wants_dprior();
  const auto acc = accumulate_type(x);
  // backward_inputs writes every element of dx, dW and dprior; only an empty batch leaves them to be zeroed.
  auto dx = at::empty(x.sizes(), x.options());
  auto dW = W.defined() ? at::empty(W.sizes(), W.options()) : at::Tensor();
  auto dprior = want_dprior ? at::empty({sz.I, sz.J}, x.options().dtype(acc)) : at::Tensor();
  if (sz.B == 0) return empty_batch_gradients(x, W, options);
  auto gs_saved = at::empty_like(s_saved);
  const OptionTensors option_tensors(options, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "capsrouting_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto opt = option_tensors.kernel_options<scalar_t, acc_t>(options);
    opt.dprior = want_dprior ? dprior.data_ptr<acc_t>() : nullptr;
    run_backward<scalar_t, acc_t>(sz, StreamLauncher{}, opt, x.data_ptr<scalar_t>(),
                                  W.defined() ? W.data_ptr<scalar_t>() : nullptr, grad_v.data_ptr<scalar_t>(),
                                  s_saved.data_ptr<acc_t>(), Vprev_saved.data_ptr<acc_t>(), gs_saved.data_ptr<acc_t>(),
                                  dx.data_ptr<scalar_t>(), W.defined() ? dW.data_ptr<scalar_t>() : nullptr);
  });
  // dbias = sum of g_s(r) over the batch and the iterations (want_dbias implies the full backward:
  // every g_s(r) is written).
  auto dbias = want_dbias ? gs_saved.sum(at::IntArrayRef{0, 1}).to(options.bias.scalar_type()) : at::Tensor();
  return {dx, dW, dbias, want_dprior ? dprior.to(options.logit_prior.scalar_type()) : dprior};
}

}  // namespace

ForwardResult forward(const at::Tensor& x, const at::Tensor& W, const RoutingOptions& options, int64_t num_iterations) {
  return forward(x, W.defined() ? &W : nullptr, options, num_iterations);
}

BackwardResult backward(const at::Tensor& grad_v, const at::Tensor& x, const at::Tensor& W,
                        const RoutingOptions& options, const at::Tensor& s_saved, const at::Tensor& Vprev_saved,
                        int64_t num_iterations) {
  return backward(grad_v, x, W.defined() ? &W : nullptr, options, s_saved, Vprev_saved, num_iterations);
}

}  // namespace capsrouting::cuda
