"""CapsuleLayer: a fully connected capsule layer with dynamic routing."""
import torch
from torch import nn

from .functional import capsule_routing

# The official TensorFlow CapsNet's initial bias on s: every digit capsule starts a little long.
OFFICIAL_BIAS_INIT = 0.1


class CapsuleLayer(nn.Module):
    """Maps ``in_caps`` capsules of size ``in_dim`` to ``out_caps`` capsules of size ``out_dim``.

    ``weight`` has shape (in_caps, out_caps, out_dim, in_dim): one matrix per
    (input, output) capsule pair. It is initialised from N(0, 0.01^2), the
    scale most CapsNet implementations use; with the paper's 1152 8-D inputs it
    gives initial output capsules of moderate length, so routing starts in the
    non-saturated part of the squash.

    Routing options (DESIGN.md §6, :func:`capsrouting.capsule_routing`): ``bias`` learns a
    (out_caps, out_dim) ``bias`` added to ``s`` in every iteration, initialised to 0.1 as in the
    official TensorFlow code; ``learn_logit_prior`` learns the initial routing logits
    ``logit_prior`` (in_caps, out_caps), initialised to 0 (the paper's start); ``leaky`` and
    ``detach_inner`` are passed on. Without them ``bias`` and ``logit_prior`` are None.
    """

    def __init__(self, in_caps: int, in_dim: int, out_caps: int, out_dim: int, num_iterations: int = 3,
                 backend: str = "auto", *, bias: bool = False, learn_logit_prior: bool = False, leaky: bool = False,
                 detach_inner: bool = False):
        super().__init__()
        for name, value in (("in_caps", in_caps), ("in_dim", in_dim), ("out_caps", out_caps), ("out_dim", out_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name, value in (("bias", bias), ("learn_logit_prior", learn_logit_prior), ("leaky", leaky),
                            ("detach_inner", detach_inner)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        self.in_caps, self.in_dim, self.out_caps, self.out_dim = in_caps, in_dim, out_caps, out_dim
        self.num_iterations = num_iterations
        self.backend = backend
        self.leaky, self.detach_inner = leaky, detach_inner
        self.weight = nn.Parameter(torch.empty(in_caps, out_caps, out_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(out_caps, out_dim)) if bias else None
        self.logit_prior = nn.Parameter(torch.empty(in_caps, out_caps)) if learn_logit_prior else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.01)
        if self.bias is not None:
            nn.init.constant_(self.bias, OFFICIAL_BIAS_INIT)
        if self.logit_prior is not None:
            nn.init.zeros_(self.logit_prior)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u (..., in_caps, in_dim) -> v (..., out_caps, out_dim)."""
        return capsule_routing(u, self.weight, self.num_iterations, bias=self.bias, logit_prior=self.logit_prior,
                               leaky=self.leaky, detach_inner=self.detach_inner, backend=self.backend)

    def extra_repr(self) -> str:
        options = "".join(f", {name}=True" for name, on in (
            ("bias", self.bias is not None), ("learn_logit_prior", self.logit_prior is not None),
            ("leaky", self.leaky), ("detach_inner", self.detach_inner)) if on)
        return (
            f"in_caps={self.in_caps}, in_dim={self.in_dim}, out_caps={self.out_caps}, "
            f"out_dim={self.out_dim}, num_iterations={self.num_iterations}, backend={self.backend!r}{options}"
        )
