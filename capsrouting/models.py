"""The two MNIST models of Sabour, Frosst & Hinton (2017), "Dynamic Routing Between Capsules".

``CapsNet`` (paper §4, Fig. 1 and 2), for a 1 x S x S input (S = 28 for MNIST):

====================  ==============================================  ====================
layer                 what it is                                       output (S = 28)
====================  ==============================================  ====================
``conv1``             Conv 1 -> 256, 9x9, stride 1, ReLU               (B, 256, 20, 20)
``primary_caps``      Conv 256 -> 32*8, 9x9, stride 2, no ReLU         (B, 256, 6, 6)
(reshape, squash)     32 capsule channels x 6 x 6 capsules of 8 dims   (B, 1152, 8)
``digit_caps``        ``CapsuleLayer(1152, 8, 10, 16)``, 3 iterations  (B, 10, 16)
(length)              |v_j|: the probability that class j is present   (B, 10)
``decoder``           FC 160 -> 512 ReLU -> 1024 ReLU -> S*S sigmoid   (B, 784)
====================  ==============================================  ====================

The spatial size of the primary capsule grid is ``((S - 8) - 9) // 2 + 1``: 6 at
S = 28 (1152 capsules), 12 at S = 40 (4608 capsules, the affNIST setting).

Parameter counts at S = 28: 8,215,568 with the decoder, 6,804,224 without
(``reconstruction=False`` does not build the decoder at all).

``BaselineCNN`` is the paper's CNN baseline: three 5x5 'same' convolutions of
256, 256 and 128 channels (ReLU, no pooling), then FC 328 ReLU, FC 192 ReLU,
dropout and FC num_classes; 35,445,522 parameters at S = 28.

``AffineBaselineCNN`` is the paper's affNIST baseline, which the paper describes only as
"a traditional convolutional model with a similar number of parameters" with max-pooling
and dropout. Ours: conv 128 5x5 'same' ReLU, 2x2 max-pool, conv 256 5x5 'same' ReLU, 2x2
max-pool, FC 512 ReLU, dropout, FC num_classes: 13,935,626 parameters at S = 40, against
CapsNet-40's 13,475,648 (+3.4%).

``MultiMNISTBaselineCNN`` is the paper's MultiMNIST baseline (§6): conv 512 9x9, 2x2
max-pool, conv 256 5x5, 2x2 max-pool, FC 1024, FC num_classes, ReLU, trained with sigmoid
cross-entropy and read out top-2. 'Same' padding on 36 x 36 gives the paper's 24.56 M
parameters (24,563,978).
"""
from typing import NamedTuple, Optional

import torch
from torch import nn

from ._validation import check_labels, check_num_iterations
from .functional import squash
from .layer import CapsuleLayer

__all__ = ["CapsNet", "CapsNetOutput", "BaselineCNN", "AffineBaselineCNN", "MultiMNISTBaselineCNN"]

# Primary capsules: 32 capsule channels ("types") of 8-D capsules.
PRIMARY_CHANNELS = 32
PRIMARY_DIM = 8
# Digit capsules are 16-D.
DIGIT_DIM = 16


class CapsNetOutput(NamedTuple):
    """What :class:`CapsNet` returns.

    lengths: (B, num_classes), the digit capsule lengths |v_j| in [0, 1).
    reconstructions: (B, S*S) decoder output in (0, 1), or None without a decoder.
    digit_caps: (B, num_classes, 16), the digit capsules v_j themselves.
    """

    lengths: torch.Tensor
    reconstructions: Optional[torch.Tensor]
    digit_caps: torch.Tensor


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_images(x, input_size: int) -> None:
    """x must be a floating-point tensor of shape (B, 1, input_size, input_size)."""
    layout = f"(B, 1, {input_size}, {input_size})"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, input_size, input_size):
        raise ValueError(f"x must have shape {layout}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        # uint8 pixels would also silently change the scale the decoder is trained against.
        raise TypeError(f"x must have a floating-point dtype (pixels in [0, 1]), got {x.dtype}")


def primary_grid_size(input_size: int) -> int:
    """Side of the primary capsule grid: conv1 (9x9, stride 1), then 9x9 stride 2, no padding."""
    return ((input_size - 8) - 9) // 2 + 1


class CapsNet(nn.Module):
    """The three-layer CapsNet with reconstruction decoder (Sabour et al., 2017).

    Args:
        input_size: side S of the square single-channel input, >= 17 (28 for MNIST).
        num_classes: number of digit capsules (10 for MNIST).
        num_iterations: routing iterations between primary and digit capsules.
        reconstruction: build the decoder and return reconstructions.
        backend: routing backend passed to :class:`~capsrouting.layer.CapsuleLayer`.
        routing_bias: the digit capsules' routing adds a learned bias to ``s`` in every
            iteration, initialised to 0.1, as the official TensorFlow code does (DESIGN.md §6).

    ``forward(x, labels=None)`` takes x (B, 1, S, S) floating point with pixels in
    [0, 1] and optional labels (B,) int64, and returns a :class:`CapsNetOutput`.

    The decoder input is the digit capsules with all but one masked to zero. In
    training mode with labels, the kept capsule is the true class (paper §4.1);
    otherwise (eval mode, or no labels) it is the longest capsule, i.e. the
    prediction. Labels given in eval mode are validated but do not affect the
    output.

    Several digits per image (MultiMNIST, paper §6): labels (B, L) with L distinct
    classes per row give reconstructions (B, L, S*S), one per label in training mode
    and one per each of the L longest capsules (longest first) in eval mode.
    """

    def __init__(
        self,
        input_size: int = 28,
        num_classes: int = 10,
        num_iterations: int = 3,
        reconstruction: bool = True,
        backend: str = "auto",
        routing_bias: bool = False,
    ):
        super().__init__()
        # Two unpadded 9x9 convolutions need at least 17 pixels for a 1x1 capsule grid.
        _check_positive_int("input_size", input_size, minimum=17)
        _check_positive_int("num_classes", num_classes)
        check_num_iterations(num_iterations)
        if not isinstance(reconstruction, bool):
            raise TypeError(f"reconstruction must be a bool, got {type(reconstruction).__name__}")
        if not isinstance(routing_bias, bool):
            raise TypeError(f"routing_bias must be a bool, got {type(routing_bias).__name__}")

        self.input_size = input_size
        self.num_classes = num_classes
        self.primary_grid = primary_grid_size(input_size)
        self.num_primary_caps = PRIMARY_CHANNELS * self.primary_grid * self.primary_grid

        self.conv1 = nn.Conv2d(1, 256, kernel_size=9, stride=1)
        # One convolution computes all 32 capsule channels at once; no ReLU, the
        # squash is the non-linearity of this layer.
        self.primary_caps = nn.Conv2d(256, PRIMARY_CHANNELS * PRIMARY_DIM, kernel_size=9, stride=2)
        self.digit_caps = CapsuleLayer(
            self.num_primary_caps, PRIMARY_DIM, num_classes, DIGIT_DIM, num_iterations=num_iterations, backend=backend,
            bias=routing_bias,
        )
        if reconstruction:
            self.decoder = nn.Sequential(
                nn.Linear(DIGIT_DIM * num_classes, 512),
                nn.ReLU(inplace=True),
                nn.Linear(512, 1024),
                nn.ReLU(inplace=True),
                nn.Linear(1024, input_size * input_size),
                nn.Sigmoid(),
            )
        else:
            # Not built at all, so it holds no parameters and no optimizer state.
            self.decoder = None

    @property
    def reconstruction(self) -> bool:
        return self.decoder is not None

    def primary_capsules(self, x: torch.Tensor) -> torch.Tensor:
        """The squashed primary capsules, (B, num_primary_caps, 8), of a validated x.

        Reshape order: the primary conv has 32*8 output channels, and conv
        channels ``8c .. 8c+7`` form the 8 components of the capsules of capsule
        channel ``c``. The conv output (B, 256, H, W) is viewed as
        (B, 32, 8, H, W), permuted to (B, 32, H, W, 8) and flattened to
        (B, 32*H*W, 8), so capsule ``n = c*H*W + h*W + w`` is the capsule of
        channel ``c`` at grid position (h, w), and its component ``d`` is conv
        channel ``8c + d`` there.
        """
        h = torch.relu(self.conv1(x))
        p = self.primary_caps(h)  # (B, 32*8, H, W)
        B, _, H, W = p.shape
        p = p.view(B, PRIMARY_CHANNELS, PRIMARY_DIM, H, W).permute(0, 1, 3, 4, 2)
        u = p.reshape(B, PRIMARY_CHANNELS * H * W, PRIMARY_DIM)
        return squash(u, dim=-1)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> CapsNetOutput:
        _check_images(x, self.input_size)
        if labels is not None:
            check_labels(labels, x.shape[0], self.num_classes, allow_sets=True)

        v = self.digit_caps(self.primary_capsules(x))  # (B, num_classes, 16)
        lengths = torch.linalg.vector_norm(v, dim=-1)  # (B, num_classes), < 1 by the squash

        reconstructions = None
        if self.decoder is not None:
            if self.training and labels is not None:
                kept = labels
            elif labels is not None and labels.dim() == 2:
                kept = lengths.topk(labels.shape[1], dim=-1).indices  # the L longest, longest first
            else:
                kept = lengths.argmax(dim=-1)
            reconstructions = self.reconstruct(v, kept)
        return CapsNetOutput(lengths=lengths, reconstructions=reconstructions, digit_caps=v)

    def reconstruct(self, v: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Decode digit capsules v (B, num_classes, 16) keeping one capsule per row of ``kept``.

        kept (B,) int64 gives (B, S*S); kept (B, L) gives (B, L, S*S), the l-th image decoded
        from capsule ``kept[:, l]`` alone (the two digits of a MultiMNIST image).
        """
        if self.decoder is None:
            raise RuntimeError("this CapsNet was built with reconstruction=False: it has no decoder")
        mask = nn.functional.one_hot(kept, self.num_classes).to(v.dtype)  # (B, [L,] num_classes)
        if kept.dim() == 2:
            v = v.unsqueeze(1)  # (B, 1, num_classes, 16) against the mask's (B, L, num_classes, 1)
        # Zero every capsule but the kept one, so the decoder (and its gradient)
        # sees only that capsule's instantiation parameters.
        return self.decoder((v * mask.unsqueeze(-1)).flatten(-2))

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, num_classes={self.num_classes}, "
            f"num_primary_caps={self.num_primary_caps}, reconstruction={self.reconstruction}"
        )


class BaselineCNN(nn.Module):
    """The paper's CNN baseline for MNIST (Sabour et al., 2017, §5).

    Three 5x5 stride-1 convolutions with 'same' padding (256, 256, 128 channels,
    each followed by ReLU, no pooling, so the map stays S x S); flatten; FC 328
    ReLU; FC 192 ReLU; dropout; FC num_classes. ``forward(x)`` takes x
    (B, 1, S, S) floating point and returns logits (B, num_classes).
    35,445,522 parameters at S = 28, almost all of them in the first FC layer.
    """

    def __init__(self, input_size: int = 28, num_classes: int = 10, dropout: float = 0.5):
        super().__init__()
        _check_positive_int("input_size", input_size)
        _check_positive_int("num_classes", num_classes)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        self.input_size = input_size
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(1, 256, kernel_size=5, stride=1, padding=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=5, stride=1, padding=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 128, kernel_size=5, stride=1, padding=2),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Linear(128 * input_size * input_size, 328),
            nn.ReLU(inplace=True),
            nn.Linear(328, 192),
            nn.ReLU(inplace=True),
            nn.Dropout(p=float(dropout)),
            nn.Linear(192, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.input_size)
        return self.classifier(self.features(x).flatten(1))

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, num_classes={self.num_classes}"


def _check_dropout(dropout) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    return float(dropout)


class _PooledCNN(nn.Module):
    """Two 'same' convolutions, each followed by ReLU and a 2x2 max-pool, then an MLP head."""

    def __init__(self, input_size: int, num_classes: int, convs, hidden: int, dropout: float):
        super().__init__()
        _check_positive_int("input_size", input_size, minimum=4)
        _check_positive_int("num_classes", num_classes)
        self.input_size, self.num_classes = input_size, num_classes
        layers, channels = [], 1
        for out_channels, kernel in convs:
            layers += [nn.Conv2d(channels, out_channels, kernel, padding=kernel // 2), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            channels = out_channels
        self.features = nn.Sequential(*layers)
        side = input_size // 2 // 2
        self.classifier = nn.Sequential(
            nn.Linear(channels * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=_check_dropout(dropout)),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of x (B, 1, S, S)."""
        _check_images(x, self.input_size)
        return self.classifier(self.features(x).flatten(1))

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, num_classes={self.num_classes}"


class AffineBaselineCNN(_PooledCNN):
    """The affNIST baseline: conv 128 5x5, pool, conv 256 5x5, pool, FC 512, dropout, FC.

    13,935,626 parameters at S = 40 ("a similar number of parameters" to CapsNet-40's 13.5 M).
    """

    def __init__(self, input_size: int = 40, num_classes: int = 10, dropout: float = 0.5):
        super().__init__(input_size, num_classes, convs=[(128, 5), (256, 5)], hidden=512, dropout=dropout)


class MultiMNISTBaselineCNN(_PooledCNN):
    """The paper's MultiMNIST baseline: conv 512 9x9, pool, conv 256 5x5, pool, FC 1024, FC.

    No dropout (the paper names none); 24,563,978 parameters at S = 36. Train it with
    :func:`~capsrouting.losses.multilabel_cross_entropy` and read the top-2 logits.
    """

    def __init__(self, input_size: int = 36, num_classes: int = 10, dropout: float = 0.0):
        super().__init__(input_size, num_classes, convs=[(512, 9), (256, 5)], hidden=1024, dropout=dropout)
