"""Pure-PyTorch dynamic routing: the definition of "correct" for every backend.

Written for clarity, not speed. With every option off it follows DESIGN.md §1
literally: logits start at zero, the softmax runs over the output capsules j, the
logits grow by the agreement after every iteration but the last, and gradients flow
through every iteration (nothing is detached). The options are DESIGN.md §6. It computes in the dtype it is given; the
public API upcasts half types before calling it.
"""
from typing import Optional

import torch

SQUASH_EPS = 1e-8


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """|s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps): shrink to length < 1, keep direction."""
    norm_sq = (s * s).sum(dim=dim, keepdim=True)
    return norm_sq / (1.0 + norm_sq) * s / torch.sqrt(norm_sq + SQUASH_EPS)


def predictions(u: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """u_hat[b, i, j] = W[i, j] @ u[b, i]: (B, I, Din), (I, J, Dout, Din) -> (B, I, J, Dout)."""
    return torch.einsum("ijdk,bik->bijd", W, u)


def leaky_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim with an extra zero logit, dropped from the result: exp(b) / (1 + sum exp(b))."""
    padded = torch.cat([logits, logits.new_zeros(logits.shape[:-1] + (1,))], dim=-1)
    return torch.softmax(padded, dim=-1)[..., :-1]


def route(
    u_hat: torch.Tensor,
    num_iterations: int = 3,
    *,
    bias: Optional[torch.Tensor] = None,
    logit_prior: Optional[torch.Tensor] = None,
    leaky: bool = False,
    detach_inner: bool = False,
    return_couplings: bool = False,
):
    """Routing by agreement on predictions u_hat (B, I, J, D); returns v (B, J, D).

    The options (DESIGN.md §6; all off is §1): ``bias`` (J, D) added to s in every iteration,
    ``logit_prior`` (I, J) the initial logits, ``leaky`` an extra zero logit in every softmax,
    ``detach_inner`` the predictions detached in every iteration but the last. With
    ``return_couplings`` it returns (v, c), c (B, I, J) the last iteration's couplings, detached.
    """
    B, I, J, _ = u_hat.shape
    logits = u_hat.new_zeros(B, I, J) if logit_prior is None else logit_prior.expand(B, I, J)
    for r in range(num_iterations):
        last = r == num_iterations - 1
        c = leaky_softmax(logits) if leaky else torch.softmax(logits, dim=2)  # over the output capsules j
        x = u_hat if last or not detach_inner else u_hat.detach()
        s = (c.unsqueeze(-1) * x).sum(dim=1)  # (B, J, D)
        if bias is not None:
            s = s + bias
        v = squash(s)
        if not last:
            logits = logits + (x * v.unsqueeze(1)).sum(dim=-1)
    return (v, c.detach()) if return_couplings else v


def capsule_routing(u: torch.Tensor, W: torch.Tensor, num_iterations: int = 3, **options):
    """Predictions then routing: (B, I, Din), (I, J, Dout, Din) -> (B, J, Dout); options as ``route``."""
    return route(predictions(u, W), num_iterations, **options)
