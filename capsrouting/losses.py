"""CapsNet training losses (Sabour, Frosst & Hinton, 2017, §3 and §4.1).

* Margin loss (eq. 4), per class k:
  ``L_k = T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2``
  with T_k = 1 iff k is the true class; summed over classes, averaged over the batch.
  The down-weighting lambda of absent classes stops the initial learning from
  shrinking every capsule.
* Reconstruction loss: the sum of squared pixel errors per image, averaged over
  the batch and scaled by 0.0005 so it does not dominate the margin loss.
* ``capsnet_loss``: their sum, for a :class:`~capsrouting.models.CapsNetOutput`.

Half-type inputs (as ``torch.autocast`` produces them) are computed and returned in
float32, as autocast does for PyTorch's own losses: a sum of 784 squared pixel errors
in bfloat16 would lose most of its digits.
"""
import torch

from ._validation import check_labels

__all__ = ["margin_loss", "multilabel_cross_entropy", "reconstruction_loss", "capsnet_loss"]


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_float_tensor(name: str, t, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")


def margin_loss(
    lengths: torch.Tensor,
    labels: torch.Tensor,
    m_plus: float = 0.9,
    m_minus: float = 0.1,
    lam: float = 0.5,
) -> torch.Tensor:
    """Margin loss of capsule lengths (B, K) against int64 labels in [0, K); a scalar.

    labels (B,): one class present per image; (B, L): the L different classes present in
    each image (MultiMNIST's two digits), each with T_k = 1.
    """
    _check_float_tensor("lengths", lengths, "(B, num_classes)")
    if lengths.dim() != 2:
        raise ValueError(f"lengths must have shape (B, num_classes), got shape {tuple(lengths.shape)}")
    B, K = lengths.shape
    check_labels(labels, B, K, allow_sets=True)
    lengths = _at_least_float32(lengths)

    targets = _present(labels, K).to(lengths.dtype)  # T_k
    present = torch.clamp(m_plus - lengths, min=0.0) ** 2
    absent = torch.clamp(lengths - m_minus, min=0.0) ** 2
    per_class = targets * present + lam * (1.0 - targets) * absent
    return per_class.sum(dim=1).mean()


def _present(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, K) 0/1: which classes labels (B,) or (B, L) of distinct classes name."""
    one_hot = torch.nn.functional.one_hot(labels, num_classes)
    return one_hot if labels.dim() == 1 else one_hot.sum(dim=1)


def multilabel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sigmoid cross-entropy of logits (B, K) against the classes present, labels (B, L),
    summed over classes and averaged over the batch (the paper's MultiMNIST baseline loss)."""
    _check_float_tensor("logits", logits, "(B, num_classes)")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (B, num_classes), got shape {tuple(logits.shape)}")
    check_labels(labels, logits.shape[0], logits.shape[1], allow_sets=True)
    logits = _at_least_float32(logits)
    targets = _present(labels, logits.shape[1]).to(logits.dtype)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]


def reconstruction_loss(reconstructions: torch.Tensor, images: torch.Tensor, weight: float = 0.0005) -> torch.Tensor:
    """``weight`` times the batch mean of the per-image sum of squared errors; a scalar.

    reconstructions: (B, P); images: (B, ...) floating point with P values per
    image, e.g. (B, 1, S, S) with P = S*S. Images are flattened to (B, P).
    """
    _check_float_tensor("reconstructions", reconstructions, "(B, S*S)")
    if reconstructions.dim() != 2:
        raise ValueError(f"reconstructions must have shape (B, S*S), got shape {tuple(reconstructions.shape)}")
    B, P = reconstructions.shape
    _check_float_tensor("images", images, f"(B, ...) with {P} pixels per image")
    pixels = images.shape[1:].numel() if images.dim() >= 2 else -1
    if images.dim() < 2 or images.shape[0] != B or pixels != P:
        raise ValueError(
            f"images must have shape (B, ...) with B = {B} and {P} pixels per image to match "
            f"reconstructions of shape {tuple(reconstructions.shape)}, got shape {tuple(images.shape)}"
        )
    reconstructions = _at_least_float32(reconstructions)
    target = images.reshape(B, P).to(reconstructions.dtype)
    return weight * ((reconstructions - target) ** 2).sum(dim=1).mean()


def capsnet_loss(output, images: torch.Tensor, labels: torch.Tensor, reconstruction_weight: float = 0.0005) -> torch.Tensor:
    """Total CapsNet loss of a :class:`~capsrouting.models.CapsNetOutput`; a scalar.

    ``margin_loss(output.lengths, labels)`` plus
    ``reconstruction_loss(output.reconstructions, images, reconstruction_weight)``,
    or the margin loss alone when ``output.reconstructions`` is None.

    Several digits per image (MultiMNIST): labels (B, L), reconstructions (B, L, S*S) as
    CapsNet returns them for such labels, and images (B, L, ...) the L digits each on its
    own; every digit's reconstruction loss counts, so the total is the sum over the L.
    """
    if not hasattr(output, "lengths") or not hasattr(output, "reconstructions"):
        raise TypeError(
            f"output must be a CapsNetOutput (with lengths and reconstructions), got {type(output).__name__}"
        )
    loss = margin_loss(output.lengths, labels)
    recon = output.reconstructions
    if recon is not None and labels.dim() == 2:
        B, L = labels.shape
        _check_float_tensor("images", images, f"(B, L, ...) = ({B}, {L}, ...), one image per digit")
        if recon.dim() != 3 or recon.shape[:2] != (B, L) or images.dim() < 3 or images.shape[:2] != (B, L):
            raise ValueError(
                f"with labels of shape (B, L) = ({B}, {L}), reconstructions must have shape (B, L, S*S) and images "
                f"(B, L, ...), got {tuple(recon.shape)} and {tuple(images.shape)}"
            )
        for digit in range(L):
            loss = loss + reconstruction_loss(recon[:, digit], images[:, digit], weight=reconstruction_weight)
    elif recon is not None:
        loss = loss + reconstruction_loss(recon, images, weight=reconstruction_weight)
    return loss
