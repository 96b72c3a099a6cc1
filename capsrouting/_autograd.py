"""One autograd registration for every fused backend's routing ops.

A fused backend defines two custom ops per entry point:

* forward ``(x, [W,] num_iterations) -> (v, s_saved, Vprev_saved)``, where the
  two saved tensors (B, R, J, D) hold s(r) and V(r-1) of DESIGN.md §3;
* backward ``(grad_v, x, [W,] s_saved, Vprev_saved, num_iterations) -> dx[, dW]``.

``forward_op`` is the op itself or its qualified name ("capsrouting::..."), ``backward_op``
a callable. This module connects them, so the backward of every backend is itself an op
that ``torch.compile`` traces without a graph break.
"""
import torch


def register_routing_autograd(forward_op, backward_op, has_weights: bool) -> None:
    def setup_context(ctx, inputs, output):
        _, s_saved, Vprev_saved = output
        ctx.num_iterations = inputs[-1]
        ctx.save_for_backward(*inputs[:-1], s_saved, Vprev_saved)
        ctx.mark_non_differentiable(s_saved, Vprev_saved)

    def backward(ctx, grad_v, _grad_s_saved, _grad_Vprev_saved):
        saved = ctx.saved_tensors
        grads = backward_op(grad_v.contiguous(), *saved, ctx.num_iterations)
        if has_weights:
            du, dW = grads
            return du, dW, None
        return grads, None

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
