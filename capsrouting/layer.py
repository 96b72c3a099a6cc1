"""CapsuleLayer: a fully connected capsule layer with dynamic routing."""
import torch
from torch import nn

from .functional import capsule_routing


class CapsuleLayer(nn.Module):
    """Maps ``in_caps`` capsules of size ``in_dim`` to ``out_caps`` capsules of size ``out_dim``.

    ``weight`` has shape (in_caps, out_caps, out_dim, in_dim): one matrix per
    (input, output) capsule pair. It is initialised from N(0, 0.01^2), the
    scale most CapsNet implementations use; with the paper's 1152 8-D inputs it
    gives initial output capsules of moderate length, so routing starts in the
    non-saturated part of the squash.
    """

    def __init__(self, in_caps: int, in_dim: int, out_caps: int, out_dim: int, num_iterations: int = 3, backend: str = "auto"):
        super().__init__()
        for name, value in (("in_caps", in_caps), ("in_dim", in_dim), ("out_caps", out_caps), ("out_dim", out_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.in_caps, self.in_dim, self.out_caps, self.out_dim = in_caps, in_dim, out_caps, out_dim
        self.num_iterations = num_iterations
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(in_caps, out_caps, out_dim, in_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.01)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u (B, in_caps, in_dim) -> v (B, out_caps, out_dim)."""
        return capsule_routing(u, self.weight, self.num_iterations, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"in_caps={self.in_caps}, in_dim={self.in_dim}, out_caps={self.out_caps}, "
            f"out_dim={self.out_dim}, num_iterations={self.num_iterations}, backend={self.backend!r}"
        )
