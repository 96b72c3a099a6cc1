"""Backends "cpu" and "cuda": the C++/CUDA extension's ops (csrc/), loaded on first use.

Both backends call the same four ops, ``capsrouting::capsule_routing_ext`` and friends;
the dispatcher picks the CPU or the CUDA kernel from the tensors' device. The schema
comes from C++ (``TORCH_LIBRARY``); the fake-tensor functions and the one shared
autograd registration (``_autograd.py``) are added here once the library is loaded,
so ``torch.compile(fullgraph=True)`` and ``opcheck`` work as for the Triton ops.
"""
import functools
from typing import Optional

import torch

from . import _extension
from ._autograd import (FusedRouting, fake_forward, fake_option_grads, op_options, op_result,
                        register_backward_op_autograd)
from ._validation import check_capsule_routing_args, check_route_args, check_routing_options
from .backends import Backend, accumulation_dtype, register

# Sizes the CUDA kernel is compiled for (one warp covers a Dout vector; see routing_cuda.cu).
CUDA_MAX_J, CUDA_MAX_DOUT, CUDA_MAX_DIN = 64, 32, 16


# The routing options of DESIGN.md §6 that each backend's kernels run.
CPU_OPTIONS = frozenset({"bias", "logit_prior", "leaky", "detach_inner", "return_couplings"})
CUDA_OPTIONS = frozenset({"bias", "logit_prior", "leaky", "detach_inner", "return_couplings"})


@functools.lru_cache(maxsize=None)
def _ops_ready() -> Optional[str]:
    """Loads the extension and registers the Python side of its ops, once; None or why not."""
    reason = _extension.load()
    if reason is not None:
        return reason
    ops = torch.ops.capsrouting
    # The fake (meta) kernels check their arguments like the real ones: a direct call with a
    # meta tensor among CPU ones dispatches here and must not return a result on the wrong device.
    @torch.library.register_fake("capsrouting::capsule_routing_ext")
    def _(u, W, bias, logit_prior, leaky, detach_inner, return_couplings, num_iterations):
        check_capsule_routing_args(u, W, num_iterations, leading_dims=False)
        I, J, D, _ = W.shape
        check_routing_options(u, I, J, D, bias, logit_prior, leaky, detach_inner, return_couplings)
        return fake_forward(u, (u.shape[0], num_iterations, J, D), I, J, D, return_couplings)

    @torch.library.register_fake("capsrouting::route_ext")
    def _(u_hat, bias, logit_prior, leaky, detach_inner, return_couplings, num_iterations):
        check_route_args(u_hat, num_iterations, leading_dims=False)
        _, I, J, D = u_hat.shape
        check_routing_options(u_hat, I, J, D, bias, logit_prior, leaky, detach_inner, return_couplings)
        return fake_forward(u_hat, (u_hat.shape[0], num_iterations, J, D), I, J, D, return_couplings)

    torch.library.register_fake("capsrouting::capsule_routing_ext_backward")(
        lambda grad_v, u, W, bias, prior, leaky, detach, option_grads, s, V, n: (
            torch.empty_like(u), torch.empty_like(W), *fake_option_grads(u, bias, prior, option_grads))
    )
    torch.library.register_fake("capsrouting::route_ext_backward")(
        lambda grad_v, u_hat, bias, prior, leaky, detach, option_grads, s, V, n: (
            torch.empty_like(u_hat), *fake_option_grads(u_hat, bias, prior, option_grads))
    )
    _fused["capsule_routing"] = FusedRouting(ops.capsule_routing_ext.default, ops.capsule_routing_ext_backward,
                                             has_weights=True)
    _fused["route"] = FusedRouting(ops.route_ext.default, ops.route_ext_backward, has_weights=False)
    for name in ("capsrouting::capsule_routing_ext_backward", "capsrouting::route_ext_backward"):
        register_backward_op_autograd(name, name)
    return None


_fused = {}  # entry point -> its FusedRouting, once the extension is loaded


def _probe_cpu() -> Optional[str]:
    return _ops_ready()


def _probe_cuda() -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA device"
    reason = _ops_ready()
    if reason is not None:
        return reason
    if not _extension.has_cuda_kernels():
        return "the C++ extension was built without its CUDA kernels (torch without CUDA, no nvcc, or FORCE_ONLY_CPU)"
    return None


# Inputs are made contiguous here, once: the op then saves the contiguous tensors for its
# backward, instead of each kernel copying a strided input again.
def capsule_routing(u: torch.Tensor, W: torch.Tensor, num_iterations: int, options=None):
    out = _fused["capsule_routing"](u.contiguous(), W.contiguous(), *op_options(options), num_iterations)
    return op_result(out, options)


def route(u_hat: torch.Tensor, num_iterations: int, options=None):
    out = _fused["route"](u_hat.contiguous(), *op_options(options), num_iterations)
    return op_result(out, options)


def _cuda_shape_reason(x: torch.Tensor, W: Optional[torch.Tensor]) -> Optional[str]:
    J, D = (W.shape[1], W.shape[2]) if W is not None else (x.shape[2], x.shape[3])
    K = W.shape[3] if W is not None else 0
    if J > CUDA_MAX_J or D > CUDA_MAX_DOUT or K > CUDA_MAX_DIN:
        return (
            f"the cuda backend supports J <= {CUDA_MAX_J}, Dout <= {CUDA_MAX_DOUT}, Din <= {CUDA_MAX_DIN}; "
            f"got J = {J}, Dout = {D}, Din = {K}"
        )
    return None


register(
    Backend(
        name="cpu",
        description="C++ extension: multithreaded, vectorized one-pass routing on the CPU, exact backward",
        device_types=lambda: ("cpu",),
        probe=_probe_cpu,
        capsule_routing=capsule_routing,
        route=route,
        options=CPU_OPTIONS,
    )
)
register(
    Backend(
        name="cuda",
        description="C++/CUDA extension: one-pass routing kernel for GPUs without Triton, exact backward",
        device_types=lambda: ("cuda",),
        probe=_probe_cuda,
        capsule_routing=capsule_routing,
        route=route,
        shape_reason=_cuda_shape_reason,
        options=CUDA_OPTIONS,
    )
)
