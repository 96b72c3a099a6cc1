"""MultiMNIST (Sabour, Frosst & Hinton, 2017, §6): two overlapping digits of different classes.

As in the paper and its official code: each 28 x 28 digit is padded to 36 x 36 and shifted by
up to ``max_shift`` (4) pixels along each axis, paired with a digit of a *different* class
from the same split, and the two are merged by a clipped sum, ``min(a + b, 255)``. Both
labels and both shifted single digits are kept (the CapsNet reconstructs each one).

:class:`MultiMNIST` fixes every pair of a split up front from its seed, ``pairs_per_image``
pairs per base digit (the paper used 1,000 for training), and builds the images of any batch
of pairs on demand, so even millions of pairs cost a few bytes each.
"""
from typing import NamedTuple

import torch

SIDE = 36
MAX_SHIFT = 4
NUM_CLASSES = 10


class PairBatch(NamedTuple):
    images: torch.Tensor  # (B, 36, 36) uint8, the merged image
    labels: torch.Tensor  # (B, 2) int64, the base digit's class first
    singles: torch.Tensor  # (B, 2, 36, 36) uint8, each digit alone, shifted as in the merged image


def place(digits: torch.Tensor, shifts: torch.Tensor, side: int = SIDE) -> torch.Tensor:
    """Digits (B, H, W) centered on a side x side canvas, then moved by shifts (B, 2) = (dy, dx)
    pixels; every pixel of the digit must stay on the canvas."""
    b, h, w = digits.shape
    top, left = (side - h) // 2, (side - w) // 2
    margin = max(top, left, side - h - top, side - w - left)
    if shifts.numel() and int(shifts.abs().max()) > min(top, left, side - h - top, side - w - left):
        raise ValueError(f"shifts must keep the digit on the {side} x {side} canvas, got up to {int(shifts.abs().max())}")
    pad = margin + side  # enough zeros around the digit for any read below
    padded = torch.nn.functional.pad(digits, (pad, pad, pad, pad))
    # Output pixel (r, c) shows digit pixel (r - top - dy, c - left - dx), at padded (r - top - dy + pad, ...).
    rows = torch.arange(side) - top + pad - shifts[:, 0:1].long()  # (B, side)
    cols = torch.arange(side) - left + pad - shifts[:, 1:2].long()
    return padded[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


class MultiMNIST:
    """``pairs_per_image`` pairs for every digit of (images uint8 (N, 28, 28), labels (N,)).

    Pair ``p`` has base digit ``p // pairs_per_image``; its partner (a digit of another class,
    drawn uniformly among the 9 other classes, then uniformly within that class) and the two
    shifts (uniform integers in [-max_shift, max_shift] per axis) are drawn once from ``seed``.
    ``batch(indices)`` returns a :class:`PairBatch`.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, pairs_per_image: int = 1, seed: int = 0,
                 max_shift: int = MAX_SHIFT):
        if images.dim() != 3 or images.dtype != torch.uint8 or labels.shape != images.shape[:1]:
            raise ValueError(f"images must be uint8 (N, 28, 28) with labels (N,), got {tuple(images.shape)} "
                             f"{images.dtype} and {tuple(labels.shape)}")
        if pairs_per_image < 1:
            raise ValueError(f"pairs_per_image must be >= 1, got {pairs_per_image}")
        counts = torch.bincount(labels, minlength=NUM_CLASSES)
        if int((counts > 0).sum()) < 2:
            raise ValueError("MultiMNIST needs digits of at least two classes")
        self.images, self.labels = images, labels
        self.pairs_per_image, self.max_shift = pairs_per_image, max_shift
        g = torch.Generator().manual_seed(seed)
        count = len(labels) * pairs_per_image
        self.base = torch.arange(len(labels)).repeat_interleave(pairs_per_image)
        # Another class: the base class plus 1..9 (mod 10), redrawn where that class has no digit.
        partner_class = (labels[self.base] + torch.randint(1, NUM_CLASSES, (count,), generator=g)) % NUM_CLASSES
        while bool((counts[partner_class] == 0).any()):
            empty = counts[partner_class] == 0
            redraw = torch.randint(1, NUM_CLASSES, (int(empty.sum()),), generator=g)
            partner_class[empty] = (labels[self.base[empty]] + redraw) % NUM_CLASSES
        by_class = torch.argsort(labels, stable=True)  # digits grouped by class
        starts = torch.cumsum(counts, 0) - counts
        within = (torch.rand(count, generator=g, dtype=torch.float64) * counts[partner_class]).long()
        self.partner = by_class[starts[partner_class] + within]
        self.shifts = torch.randint(-max_shift, max_shift + 1, (count, 2, 2), generator=g, dtype=torch.int8)

    def __len__(self) -> int:
        return len(self.base)

    def batch(self, indices: torch.Tensor) -> PairBatch:
        indices = torch.as_tensor(indices, dtype=torch.long)
        first, second = self.base[indices], self.partner[indices]
        a = place(self.images[first], self.shifts[indices, 0])
        b = place(self.images[second], self.shifts[indices, 1])
        merged = (a.to(torch.int16) + b.to(torch.int16)).clamp_(max=255).to(torch.uint8)
        labels = torch.stack([self.labels[first], self.labels[second]], dim=1)
        return PairBatch(merged, labels, torch.stack([a, b], dim=1))


def both_right(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the two highest scores (B, K) are exactly the two labels (B, 2), in any order."""
    top2 = scores.topk(2, dim=1).indices.sort(dim=1).values
    return (top2 == labels.sort(dim=1).values).all(dim=1)


def bounding_box_overlap(singles: torch.Tensor) -> dict:
    """How much the two digits of each pair overlap, from their bounding boxes (nonzero pixels) in
    singles (B, 2, H, W): mean intersection over union, and mean intersection over the smaller box."""

    def boxes(x):  # (B, H, W) -> top, bottom (exclusive), left, right, each (B,)
        rows, cols = x.any(dim=2), x.any(dim=1)
        ar_r, ar_c = torch.arange(x.shape[1]), torch.arange(x.shape[2])
        top = torch.where(rows, ar_r, x.shape[1]).min(1).values
        bottom = torch.where(rows, ar_r + 1, 0).max(1).values
        left = torch.where(cols, ar_c, x.shape[2]).min(1).values
        right = torch.where(cols, ar_c + 1, 0).max(1).values
        return top, bottom, left, right

    t1, b1, l1, r1 = boxes(singles[:, 0] > 0)
    t2, b2, l2, r2 = boxes(singles[:, 1] > 0)
    inter = ((torch.minimum(b1, b2) - torch.maximum(t1, t2)).clamp(min=0)
             * (torch.minimum(r1, r2) - torch.maximum(l1, l2)).clamp(min=0)).double()
    area1, area2 = ((b1 - t1) * (r1 - l1)).double(), ((b2 - t2) * (r2 - l2)).double()
    union = area1 + area2 - inter
    return dict(iou=float((inter / union.clamp(min=1)).mean()),
                over_smaller=float((inter / torch.minimum(area1, area2).clamp(min=1)).mean()))
