"""The public routing functions: validate, pick a backend, run it."""
import torch

from . import backends, reference
from ._validation import check_capsule_routing_args, check_route_args, check_squash_args


def capsule_routing(u: torch.Tensor, W: torch.Tensor, num_iterations: int = 3, *, backend: str = "auto") -> torch.Tensor:
    """Predictions ``u_hat[b,i,j] = W[i,j] @ u[b,i]`` and dynamic routing, in one op.

    Args:
        u: input capsules, (B, I, Din).
        W: transformation matrices, (I, J, Dout, Din), same dtype and device as ``u``.
        num_iterations: routing iterations R >= 1 (the paper uses 3).
        backend: "auto" or one of :func:`capsrouting.available_backends`.

    Returns:
        v: output capsules, (B, J, Dout), in the dtype of ``u``.
    """
    check_capsule_routing_args(u, W, num_iterations)
    return backends.resolve(backend, u, W).capsule_routing(u, W, num_iterations)


def route(u_hat: torch.Tensor, num_iterations: int = 3, *, backend: str = "auto") -> torch.Tensor:
    """Dynamic routing on given predictions ``u_hat`` (B, I, J, D); returns v (B, J, D)."""
    check_route_args(u_hat, num_iterations)
    return backends.resolve(backend, u_hat).route(u_hat, num_iterations)


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The capsule non-linearity ``|s|^2/(1+|s|^2) * s/sqrt(|s|^2 + 1e-8)`` along ``dim``."""
    check_squash_args(s, dim)
    return reference.squash(s, dim)
