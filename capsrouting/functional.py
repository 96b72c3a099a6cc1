"""The public routing functions: validate, pick a backend, run it.

Inside ``torch.autocast`` every entry point casts its float32 and half inputs to the
autocast dtype of their device type (float64 is left alone, as PyTorch's autocast does)
and returns its result in that dtype: half types are
computed with float32 accumulation by every backend, so this is the precision autocast
asks for at no loss of accuracy in the sums. The cast is differentiable, so gradients
reach float32 parameters in float32. Outside autocast, mixed dtypes raise ``TypeError``.
"""
from typing import Tuple

import torch

from . import backends, reference
from ._validation import check_capsule_routing_args, check_route_args, check_squash_args


def autocast_dtype(t: torch.Tensor):
    """The dtype autocast asks for on ``t``'s device type, or None outside an autocast region."""
    device_type = t.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _cast_for_autocast(*tensors) -> Tuple[Tuple[torch.Tensor, ...], bool]:
    """Floating tensors cast to the autocast dtype of the first one's device; (tensors, cast?)."""
    first = tensors[0]
    dtype = autocast_dtype(first) if isinstance(first, torch.Tensor) else None
    if dtype is None:
        return tensors, False
    # As PyTorch's autocast: float64 is left alone (a float64 problem stays exact).
    castable = (torch.float32, torch.float16, torch.bfloat16)
    cast = tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in castable else t for t in tensors)
    return cast, True


def _no_autocast(t: torch.Tensor):
    # The backends choose their own precision (float32 sums for half types); autocast must not
    # re-cast the reference's einsum to half inside them.
    return torch.autocast(t.device.type, enabled=False)


def capsule_routing(u: torch.Tensor, W: torch.Tensor, num_iterations: int = 3, *, backend: str = "auto") -> torch.Tensor:
    """Predictions ``u_hat[b,i,j] = W[i,j] @ u[b,i]`` and dynamic routing, in one op.

    Args:
        u: input capsules, (B, I, Din).
        W: transformation matrices, (I, J, Dout, Din), same dtype and device as ``u``
            (inside ``torch.autocast`` both are cast to the autocast dtype).
        num_iterations: routing iterations R >= 1 (the paper uses 3).
        backend: "auto" or one of :func:`capsrouting.available_backends`.

    Returns:
        v: output capsules, (B, J, Dout), in the dtype of ``u`` (the autocast dtype inside autocast).
    """
    (u, W), autocasting = _cast_for_autocast(u, W)
    check_capsule_routing_args(u, W, num_iterations)
    chosen = backends.resolve(backend, u, W)
    if autocasting:
        with _no_autocast(u):
            return chosen.capsule_routing(u, W, num_iterations)
    return chosen.capsule_routing(u, W, num_iterations)


def route(u_hat: torch.Tensor, num_iterations: int = 3, *, backend: str = "auto") -> torch.Tensor:
    """Dynamic routing on given predictions ``u_hat`` (B, I, J, D); returns v (B, J, D).

    Inside ``torch.autocast``, ``u_hat`` is cast to the autocast dtype, as is the result.
    """
    (u_hat,), autocasting = _cast_for_autocast(u_hat)
    check_route_args(u_hat, num_iterations)
    chosen = backends.resolve(backend, u_hat)
    if autocasting:
        with _no_autocast(u_hat):
            return chosen.route(u_hat, num_iterations)
    return chosen.route(u_hat, num_iterations)


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The capsule non-linearity ``|s|^2/(1+|s|^2) * s/sqrt(|s|^2 + 1e-8)`` along ``dim``.

    Half types (and autocast, which casts ``s`` to its dtype) are computed in float32 and
    returned in the half type.
    """
    (s,), _ = _cast_for_autocast(s)
    check_squash_args(s, dim)
    if s.dtype in (torch.float16, torch.bfloat16):
        return reference.squash(s.float(), dim).to(s.dtype)
    return reference.squash(s, dim)
