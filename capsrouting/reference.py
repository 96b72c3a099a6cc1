"""Pure-PyTorch dynamic routing: the definition of "correct" for every backend.

Written for clarity, not speed. It follows DESIGN.md §1 literally: logits start
at zero, the softmax runs over the output capsules j, the logits grow by the
agreement after every iteration but the last, and gradients flow through every
iteration (nothing is detached). It computes in the dtype it is given; the
public API upcasts half types before calling it.
"""
import torch

SQUASH_EPS = 1e-8


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """|s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps): shrink to length < 1, keep direction."""
    norm_sq = (s * s).sum(dim=dim, keepdim=True)
    return norm_sq / (1.0 + norm_sq) * s / torch.sqrt(norm_sq + SQUASH_EPS)


def predictions(u: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """u_hat[b, i, j] = W[i, j] @ u[b, i]: (B, I, Din), (I, J, Dout, Din) -> (B, I, J, Dout)."""
    return torch.einsum("ijdk,bik->bijd", W, u)


def route(u_hat: torch.Tensor, num_iterations: int = 3) -> torch.Tensor:
    """Routing by agreement on predictions u_hat (B, I, J, D); returns v (B, J, D)."""
    B, I, J, _ = u_hat.shape
    logits = u_hat.new_zeros(B, I, J)
    for r in range(num_iterations):
        c = torch.softmax(logits, dim=2)  # over the output capsules j
        s = (c.unsqueeze(-1) * u_hat).sum(dim=1)  # (B, J, D)
        v = squash(s)
        if r < num_iterations - 1:
            logits = logits + (u_hat * v.unsqueeze(1)).sum(dim=-1)
    return v


def capsule_routing(u: torch.Tensor, W: torch.Tensor, num_iterations: int = 3) -> torch.Tensor:
    """Predictions then routing: (B, I, Din), (I, J, Dout, Din) -> (B, J, Dout)."""
    return route(predictions(u, W), num_iterations)
