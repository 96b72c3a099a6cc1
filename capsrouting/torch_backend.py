"""Backend "torch": the reference itself, with half types computed in float32; every routing option."""
import torch

from . import reference
from .backends import Backend, accumulation_dtype, register


def _options(options, dtype: torch.dtype) -> dict:
    """The reference's keyword options, tensors in the compute dtype (none when all are off)."""
    if options is None:
        return {}
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return dict(bias=cast(options.bias), logit_prior=cast(options.logit_prior), leaky=options.leaky,
                detach_inner=options.detach_inner, return_couplings=options.return_couplings)


def _to(out, dtype: torch.dtype):
    return tuple(t.to(dtype) for t in out) if isinstance(out, tuple) else out.to(dtype)


def capsule_routing(u: torch.Tensor, W: torch.Tensor, num_iterations: int, options=None):
    dtype = accumulation_dtype(u.dtype)
    return _to(reference.capsule_routing(u.to(dtype), W.to(dtype), num_iterations, **_options(options, dtype)), u.dtype)


def route(u_hat: torch.Tensor, num_iterations: int, options=None):
    dtype = accumulation_dtype(u_hat.dtype)
    return _to(reference.route(u_hat.to(dtype), num_iterations, **_options(options, dtype)), u_hat.dtype)


register(
    Backend(
        name="torch",
        description="pure-PyTorch reference (any device; defines correctness)",
        device_types=lambda: ("cpu", "cuda"),
        probe=lambda: None,
        capsule_routing=capsule_routing,
        route=route,
        options=frozenset({"bias", "logit_prior", "leaky", "detach_inner", "return_couplings"}),
    )
)
