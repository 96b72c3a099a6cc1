"""One autograd registration for every fused backend's routing ops.

A fused backend defines two custom ops per entry point:

* forward ``(x, [W,] [bias,] num_iterations) -> (v, s_saved, Vprev_saved)``, where the
  two saved tensors hold s(r) and V(r-1) of DESIGN.md §3 in the backend's own layout
  ((B, R, J, D) for the C++/CUDA extension, (R, B, J, D) for Triton);
* backward ``(grad_v, x, [W,] [bias,] s_saved, Vprev_saved, num_iterations) -> dx[, dW][, dbias]``.

``bias`` (the routing option of DESIGN.md §6, ``has_bias``) may be None; the backward op then
returns an empty ``dbias``.

``forward_op`` is the op itself or its qualified name ("capsrouting::..."), ``backward_op``
a callable. This module connects them, so the backward of every backend is itself an op
that ``torch.compile`` traces without a graph break.

Double backward (``create_graph=True``, as gradient penalties use): the fused backward op
has no derivative of its own, so when a graph of the gradient is being built the gradient
is computed instead by differentiating the reference (plain PyTorch autograd, the same
values up to rounding), whose graph then carries the second derivatives exactly. The
first-order path, eager or compiled, always runs the fused backward. (``torch.compile``
itself does not support double backward; ``torch.func.grad`` builds a graph of the
gradient, so it takes the reference path.)
"""
import torch

from . import reference
from .backends import accumulation_dtype


def reference_gradients(inputs, grad_v: torch.Tensor, num_iterations: int, has_weights: bool, bias=None):
    """Gradients of the reference routing at ``inputs`` ((u, W) or (u_hat,)) and ``bias`` (if not
    None, its gradient last), with a graph of their own."""
    tensors = [*inputs, *([bias] if bias is not None else [])]
    leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in tensors]
    acc = accumulation_dtype(leaves[0].dtype)
    run = reference.capsule_routing if has_weights else reference.route
    args = [t.to(acc) for t in leaves]
    options = dict(bias=args.pop()) if bias is not None else {}
    # Inside an autocast region the reference's own ops would be cast back to half precision.
    with torch.enable_grad(), torch.autocast(leaves[0].device.type, enabled=False):
        v = run(*args, num_iterations, **options)
        return torch.autograd.grad(v, leaves, grad_v.to(acc), create_graph=True)


def register_routing_autograd(forward_op, backward_op, has_weights: bool, has_bias: bool = False) -> None:
    def setup_context(ctx, inputs, output):
        _, s_saved, Vprev_saved = output
        ctx.num_iterations = inputs[-1]
        ctx.save_for_backward(*inputs[:-1], s_saved, Vprev_saved)
        ctx.mark_non_differentiable(s_saved, Vprev_saved)

    def backward(ctx, grad_v, _grad_s_saved, _grad_Vprev_saved):
        saved = ctx.saved_tensors
        inputs = saved[:-2]
        bias = None
        if has_bias:
            *inputs, bias = inputs
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable
            grads = reference_gradients(inputs, grad_v, ctx.num_iterations, has_weights, bias)
        else:
            grads = backward_op(grad_v.contiguous(), *saved, ctx.num_iterations)
        grads = list(grads) if isinstance(grads, (tuple, list)) else [grads]
        if has_bias:  # the op returns an empty dbias without a bias; the reference returns none
            grads = grads[: len(inputs)] + [grads[len(inputs)] if bias is not None else None]
        return (*grads, None)

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def register_backward_op_autograd(backward_op, qualified_name: str) -> None:
    """The fused backward op has no derivative of its own: differentiating it directly (not through
    the forward op's autograd, which handles ``create_graph``) raises a clear error instead of
    PyTorch's warning and silently wrong second derivatives."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{qualified_name} has no derivative of its own; differentiate capsrouting.capsule_routing or "
            "capsrouting.route with create_graph=True instead (they switch to an exact differentiable gradient)"
        )

    torch.library.register_autograd(backward_op, backward, setup_context=setup_context)
