"""A reader for the affNIST files as distributed (Tieleman, 2013): MATLAB ``.mat`` files holding
one struct ``affNISTdata`` whose field ``image`` is a 1600 x N uint8 matrix (one 40 x 40 image
per column, its pixels in row-major order) and ``label_int`` a 1 x N matrix of digits.

The test set comes as ``test.mat`` (320,000 images) or as ``test_batches/1.mat .. 32.mat``;
:func:`read_affnist` reads every ``.mat`` file of a directory in numeric order. Reading MATLAB
files needs scipy (``pip install scipy``, or the ``[experiments]`` extra).
"""
import re
from pathlib import Path
from typing import Optional, Tuple

import torch

SIDE = 40


class AffNISTError(ValueError):
    """A file that is not laid out as the affNIST files are."""


def _natural_key(path: Path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _loadmat():
    try:
        from scipy.io import loadmat
    except ImportError as exc:
        raise ImportError("reading affNIST .mat files needs scipy: pip install scipy "
                          "(or capsrouting[experiments])") from exc
    return loadmat


def read_affnist_file(path: Path) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 40, 40), labels int64 (N,)) of one affNIST ``.mat`` file."""
    loadmat = _loadmat()
    try:
        content = loadmat(str(path))
    except Exception as exc:  # scipy raises several types for files that are not MATLAB v5
        raise AffNISTError(f"{path}: not a readable MATLAB file ({type(exc).__name__}: {exc})") from exc
    if "affNISTdata" not in content:
        raise AffNISTError(f"{path}: no affNISTdata struct (holds {sorted(k for k in content if not k.startswith('__'))})")
    struct = content["affNISTdata"]
    fields = struct.dtype.names or ()
    if "image" not in fields or "label_int" not in fields:
        raise AffNISTError(f"{path}: affNISTdata lacks the image and label_int fields (has {list(fields)})")
    image, label = struct["image"][0, 0], struct["label_int"][0, 0]
    if image.ndim != 2 or image.shape[0] != SIDE * SIDE:
        raise AffNISTError(f"{path}: image must be 1600 x N (one 40 x 40 image per column), got {image.shape}")
    count = image.shape[1]
    labels = torch.from_numpy(label.reshape(-1).astype("int64"))
    if labels.numel() != count:
        raise AffNISTError(f"{path}: {count} images but {labels.numel()} labels")
    if count and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise AffNISTError(f"{path}: labels must be digits 0..9, got [{int(labels.min())}, {int(labels.max())}]")
    images = torch.from_numpy(image.T.astype("uint8").reshape(count, SIDE, SIDE).copy())
    return images, labels


def read_affnist(directory, limit: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every ``.mat`` file of ``directory`` (numeric order), concatenated; the first ``limit`` images."""
    directory = Path(directory)
    files = sorted(directory.glob("*.mat"), key=_natural_key)
    if not files:
        raise FileNotFoundError(f"no affNIST .mat files in {directory}")
    images, labels, count = [], [], 0
    for path in files:
        x, y = read_affnist_file(path)
        images.append(x)
        labels.append(y)
        count += len(y)
        if limit is not None and count >= limit:
            break
    images, labels = torch.cat(images), torch.cat(labels)
    return (images[:limit], labels[:limit]) if limit is not None else (images, labels)
