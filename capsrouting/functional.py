"""The public routing functions: validate, pick a backend, run it.

Inside ``torch.autocast`` every entry point casts its float32 and half inputs to the
autocast dtype of their device type (float64 is left alone, as PyTorch's autocast does)
and returns its result in that dtype: half types are
computed with float32 accumulation by every backend, so this is the precision autocast
asks for at no loss of accuracy in the sums. The cast is differentiable, so gradients
reach float32 parameters in float32. Outside autocast, mixed dtypes raise ``TypeError``.
"""
import contextlib
import dataclasses
from typing import Optional, Tuple

import torch

from . import autotune, backends, reference
from ._validation import check_capsule_routing_args, check_route_args, check_routing_options, check_squash_args


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


@dataclasses.dataclass(frozen=True, eq=False)
class RoutingOptions:
    """The routing options of DESIGN.md §6, as a backend that supports them receives them."""

    bias: Optional[torch.Tensor] = None
    logit_prior: Optional[torch.Tensor] = None
    leaky: bool = False
    detach_inner: bool = False
    return_couplings: bool = False

    def active(self) -> Tuple[str, ...]:
        """Names of the options that are on."""
        return tuple(name for name in _OPTION_NAMES if getattr(self, name) is not None and getattr(self, name) is not False)


_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(RoutingOptions))


_OPTIONS_DOC = """
        bias: (J, Dout), added to ``s`` before the squash in every iteration (the official
            TensorFlow code's); differentiable. Same dtype and device as the input.
        logit_prior: (I, J), the initial routing logits, shared by the batch (adambielski's
            learned ``b``); differentiable.
        leaky: an extra zero logit in every softmax, ``c = exp(b) / (1 + sum_k exp(b_k))``
            (the official code's leaky routing).
        detach_inner: the predictions are detached in every iteration but the last, so
            gradients reach them only through it (XifengGuo's, danielhavir's, naturomics').
        return_couplings: also return ``c``, the last iteration's coupling coefficients,
            (..., I, J) in the dtype of ``v``. ``c`` carries no gradient: it is detached.
        backend: "auto" or one of :func:`capsrouting.available_backends`. A backend that does
            not support an option that is on is skipped by "auto" (with one warning) and
            raises ``ValueError`` when asked for."""


def _checked_options(x: torch.Tensor, I: int, J: int, D: int, *options) -> RoutingOptions:
    """The options (bias, logit_prior, leaky, detach_inner, return_couplings) of a call routing I inputs
    to J capsules of D dims, checked (clear errors naming the option)."""
    check_routing_options(x, I, J, D, *options)
    return RoutingOptions(*options)


def _run(backend: str, entry: str, x: torch.Tensor, W, num_iterations: int, options: RoutingOptions, autocasting: bool):
    """Resolve the backend and run ``entry`` on x with its leading dims flattened into one batch dim."""
    inner = 2 if W is not None else 3  # (I, Din) or (I, J, D)
    lead = x.shape[:-inner]
    flat = x.reshape(-1, *x.shape[-inner:])
    active = options.active()
    # "auto" on a GPU measures the candidates on the first call of each case (autotune).
    problem = None
    if backend == "auto" and autotune.measures(flat.device.type):
        problem = autotune.Problem(entry, flat, W, num_iterations, options)
    chosen = backends.resolve(backend, flat, W, active, problem)
    args = (flat, W, num_iterations) if W is not None else (flat, num_iterations)
    if active:
        args = args + (options,)
    with _no_autocast(x) if autocasting else contextlib.nullcontext():
        out = getattr(chosen, entry)(*args)
    if options.return_couplings:
        v, c = out
        return v.reshape(*lead, *v.shape[1:]), c.reshape(*lead, *c.shape[1:])
    return out.reshape(*lead, *out.shape[1:])


def capsule_routing(
    u: torch.Tensor,
    W: torch.Tensor,
    num_iterations: int = 3,
    *,
    bias: Optional[torch.Tensor] = None,
    logit_prior: Optional[torch.Tensor] = None,
    leaky: bool = False,
    detach_inner: bool = False,
    return_couplings: bool = False,
    backend: str = "auto",
):
    (u, W, bias, logit_prior), autocasting = _cast_for_autocast(u, W, bias, logit_prior)
    check_capsule_routing_args(u, W, num_iterations)
    options = _checked_options(u, *W.shape[:3], bias, logit_prior, leaky, detach_inner, return_couplings)
    return _run(backend, "capsule_routing", u, W, num_iterations, options, autocasting)


def route(
    u_hat: torch.Tensor,
    num_iterations: int = 3,
    *,
    bias: Optional[torch.Tensor] = None,
    logit_prior: Optional[torch.Tensor] = None,
    leaky: bool = False,
    detach_inner: bool = False,
    return_couplings: bool = False,
    backend: str = "auto",
):
    (u_hat, bias, logit_prior), autocasting = _cast_for_autocast(u_hat, bias, logit_prior)
    check_route_args(u_hat, num_iterations)
    options = _checked_options(u_hat, *u_hat.shape[-3:], bias, logit_prior, leaky, detach_inner, return_couplings)
    return _run(backend, "route", u_hat, None, num_iterations, options, autocasting)


# The two entry points share the options' documentation, so their docstrings are assembled here.
capsule_routing.__doc__ = """Predictions ``u_hat[..., i, j] = W[i, j] @ u[..., i]`` and dynamic routing, in one op.

    Args:
        u: input capsules, (..., I, Din): any leading dims (a batch, the positions of a
            convolutional capsule layer), each routed independently.
        W: transformation matrices, (I, J, Dout, Din), same dtype and device as ``u``
            (inside ``torch.autocast`` both are cast to the autocast dtype, as are the options).
        num_iterations: routing iterations R >= 1 (the paper uses 3).""" + _OPTIONS_DOC + """

    Returns:
        v: output capsules, (..., J, Dout), in the dtype of ``u`` (the autocast dtype inside
        autocast); ``(v, c)`` with ``return_couplings``.
    """

route.__doc__ = """Dynamic routing on given predictions ``u_hat`` (..., I, J, D); returns v (..., J, D).

    Args:
        u_hat: predictions, (..., I, J, D), any leading dims, each routed independently.
            Inside ``torch.autocast`` it is cast to the autocast dtype, as are the result and
            the options.
        num_iterations: routing iterations R >= 1.""" + _OPTIONS_DOC.replace("(J, Dout)", "(J, D)") + """

    Returns:
        v (..., J, D), or ``(v, c)`` with ``return_couplings``.
    """


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
