"""Backend "torch": the reference itself, with half types computed in float32."""
import torch

from . import reference
from .backends import Backend, accumulation_dtype, register


def capsule_routing(u: torch.Tensor, W: torch.Tensor, num_iterations: int) -> torch.Tensor:
    dtype = accumulation_dtype(u.dtype)
    return reference.capsule_routing(u.to(dtype), W.to(dtype), num_iterations).to(u.dtype)


def route(u_hat: torch.Tensor, num_iterations: int) -> torch.Tensor:
    dtype = accumulation_dtype(u_hat.dtype)
    return reference.route(u_hat.to(dtype), num_iterations).to(u_hat.dtype)


register(
    Backend(
        name="torch",
        description="pure-PyTorch reference (any device; defines correctness)",
        device_types=lambda: ("cpu", "cuda"),
        probe=lambda: None,
        capsule_routing=capsule_routing,
        route=route,
    )
)
