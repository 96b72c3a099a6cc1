"""One autograd registration for every fused backend's routing ops.

A fused backend defines two custom ops per entry point, with the routing options of
DESIGN.md §6:

* forward ``(x, [W,] bias, logit_prior, leaky, detach_inner, return_couplings, num_iterations)
  -> (v, c, s_saved, Vprev_saved)``; ``bias`` and ``logit_prior`` may be None, ``c`` (the last
  iteration's couplings) is empty unless ``return_couplings`` and carries no gradient; the two
  saved tensors hold s(r) and V(r-1) of DESIGN.md §3 in the backend's own layout ((B, R, J, D)
  for the C++/CUDA extension, (R, B, J, D) for Triton);
* backward ``(grad_v, x, [W,] bias, logit_prior, leaky, detach_inner, option_grads, s_saved,
  Vprev_saved, num_iterations) -> (dx, [dW,] dbias, dprior)``, ``dbias`` and ``dprior`` empty
  where there is no such input or ``option_grads`` is false (neither needs a gradient: with
  ``detach_inner`` the backward is then one pass, §6).

``FusedRouting(forward_op, backward_op, has_weights)`` connects them (``forward_op`` the op
itself, ``backward_op`` a callable), so the backward of every backend is itself an op that
``torch.compile`` traces without a graph break; the backend calls the ``FusedRouting``.

Double backward (``create_graph=True``, as gradient penalties use): the fused backward op
has no derivative of its own, so when a graph of the gradient is being built the gradient
is computed instead by differentiating the reference (plain PyTorch autograd, the same
values up to rounding), whose graph then carries the second derivatives exactly. The
first-order path, eager or compiled, always runs the fused backward. (``torch.compile``
itself does not support double backward. Inside ``torch.func`` transforms the public
functions run backend "torch" instead: see ``backends.resolve``.)
"""
import torch

from . import reference
from .backends import accumulation_dtype


def reference_gradients(inputs, grad_v: torch.Tensor, num_iterations: int, has_weights: bool, bias=None,
                        logit_prior=None, leaky: bool = False, detach_inner: bool = False):
    """Gradients of the reference routing at ``inputs`` ((u, W) or (u_hat,)), then of ``bias`` and
    ``logit_prior`` (None for an absent one), with a graph of their own."""
    options = dict(bias=bias, logit_prior=logit_prior)
    present = [name for name, t in options.items() if t is not None]
    tensors = [*inputs, *(options[name] for name in present)]
    leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in tensors]
    acc = accumulation_dtype(leaves[0].dtype)
    run = reference.capsule_routing if has_weights else reference.route
    args = [t.to(acc) for t in leaves]
    options.update(zip(present, args[len(inputs):]))
    # Inside an autocast region the reference's own ops would be cast back to half precision.
    with torch.enable_grad(), torch.autocast(leaves[0].device.type, enabled=False):
        v = run(*args[: len(inputs)], num_iterations, leaky=leaky, detach_inner=detach_inner, **options)
        grads = torch.autograd.grad(v, leaves, grad_v.to(acc), create_graph=True)
    by_name = dict(zip(present, grads[len(inputs):]))
    return (*grads[: len(inputs)], by_name.get("bias"), by_name.get("logit_prior"))


class FusedRouting:
    """A fused backend's forward op and backward op, connected for autograd; call it as the forward op.

    Two routes to the same backward (``_backward``): the forward op's own autograd registration
    (``torch.library.register_autograd``), which ``torch.compile`` traces and a direct call of the op
    uses, and, in eager mode, ``_EagerRouting``, a ``torch.autograd.Function`` over the op called
    below the autograd layer: the same formula without PyTorch's Python wrapper of a custom op's
    autograd (about 60 us a forward+backward, a tenth of a one-sample forward+backward on CPU).
    """

    def __init__(self, forward_op, backward_op, has_weights: bool):
        self.forward_op = forward_op
        self.backward_op = backward_op
        self.n_inputs = 2 if has_weights else 1
        torch.library.register_autograd(
            forward_op, lambda ctx, grad_v, *_: (*self._backward(ctx, grad_v, first=0), None, None, None, None),
            setup_context=lambda ctx, inputs, output: self._setup_context(ctx, inputs, output))

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.forward_op(*args)
        if not torch.is_grad_enabled():  # inference: autograd would record nothing anyway
            with torch._C._AutoDispatchBelowAutograd():
                return self.forward_op(*args)
        return _EagerRouting.apply(self, *args)

    def _setup_context(self, ctx, inputs, output):
        v, c, s_saved, Vprev_saved = output
        ctx.num_iterations = inputs[-1]
        bias, logit_prior, ctx.leaky, ctx.detach_inner, _ = inputs[self.n_inputs:-1]
        ctx.save_for_backward(*inputs[: self.n_inputs], bias, logit_prior, s_saved, Vprev_saved)
        ctx.mark_non_differentiable(c, s_saved, Vprev_saved)

    def _backward(self, ctx, grad_v, first: int):
        """(dx, [dW,] dbias, dprior); ``first``: the index of x among the inputs ``ctx`` saw."""
        *inputs, bias, logit_prior, s_saved, Vprev_saved = ctx.saved_tensors
        R = ctx.num_iterations
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable
            return reference_gradients(inputs, grad_v, R, self.n_inputs == 2, bias, logit_prior, ctx.leaky,
                                       ctx.detach_inner)
        option_grads = any(ctx.needs_input_grad[first + self.n_inputs:first + self.n_inputs + 2])
        # Below the autograd layer: nothing is recorded here (grad mode is off), and the backward op's
        # own registration (which only refuses a derivative) would cost a Python call.
        with torch._C._AutoDispatchBelowAutograd():
            grads = self.backward_op(grad_v.contiguous(), *inputs, bias, logit_prior, ctx.leaky, ctx.detach_inner,
                                     option_grads, s_saved, Vprev_saved, R)
        # Empty dbias / dprior: no such input, or no gradient wanted.
        return [g if g.numel() or i < self.n_inputs else None for i, g in enumerate(grads)]


class _EagerRouting(torch.autograd.Function):
    """``FusedRouting``'s eager autograd: the forward op below the autograd layer, ``_backward`` after.
    (No ``setup_context``: with one, every ``apply`` binds its arguments by ``inspect.signature``;
    functorch transforms, which would need it, never reach here: see ``backends.resolve``.)"""

    @staticmethod
    def forward(ctx, fused, *args):
        with torch._C._AutoDispatchBelowAutograd():
            output = fused.forward_op(*args)
        ctx.fused = fused
        fused._setup_context(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx, grad_v, *_unused):
        return None, *ctx.fused._backward(ctx, grad_v, first=1), None, None, None, None


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


# ---- what every fused backend's op registration shares -----------------------------------------


def fake_forward(x: torch.Tensor, saved_shape, I: int, J: int, D: int, return_couplings: bool):
    """The fake (meta) result of a forward op: v, c (empty unless ``return_couplings``), and the two
    saved tensors in the backend's layout ``saved_shape``, in the accumulation type."""
    saved = x.new_empty(saved_shape, dtype=accumulation_dtype(x.dtype))
    c = x.new_empty((x.shape[0], I, J) if return_couplings else (0,))
    return x.new_empty(x.shape[0], J, D), c, saved, torch.empty_like(saved)


def fake_option_grads(x: torch.Tensor, bias, logit_prior, option_grads: bool):
    """The fake (dbias, dprior) of a backward op: empty where there is no such input or no gradient wanted."""
    fake = lambda t: torch.empty_like(t) if t is not None and option_grads else x.new_empty(0)  # noqa: E731
    return fake(bias), fake(logit_prior)


def op_options(options) -> tuple:
    """``RoutingOptions`` (or None) as the forward ops take them: (bias, logit_prior, leaky, detach_inner,
    return_couplings), the tensors contiguous."""
    if options is None:
        return None, None, False, False, False
    contiguous = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return (contiguous(options.bias), contiguous(options.logit_prior), options.leaky, options.detach_inner,
            options.return_couplings)


def op_result(out, options):
    """What a backend entry point returns from a forward op's outputs: v, or (v, couplings)."""
    return (out[0], out[1]) if options is not None and options.return_couplings else out[0]
