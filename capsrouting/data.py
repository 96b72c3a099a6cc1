"""MNIST for the CapsNet experiments, read straight from the IDX files.

Plain torch and the standard library (no torchvision), so the package keeps a
single heavy dependency. Every file is checked on load: magic number, item
count, image size, byte length against the header, gzip integrity and label
range, and problems are raised as :class:`MNISTError` naming the file, so a
bad download fails loudly instead of training on garbage.

Where the files come from:

* ``load_mnist(root)`` / ``MNIST(root)`` read ``root``, else the directory in
  the environment variable ``CAPSROUTING_DATA``. Each file may be raw or
  gzipped (``.gz``).
* Nothing is downloaded unless ``download=True`` is passed. Files then go to
  ``cache_dir`` (default ``$CAPSROUTING_CACHE`` or ``~/.cache/capsrouting/mnist``)
  and are verified by the md5 of their *decompressed* content: mirrors serve
  different ``.gz`` archives of the same data, so archive checksums would
  reject good downloads.

Augmentations from the paper (Sabour, Frosst & Hinton, 2017), as callables on
a float image tensor (1, H, W):

* :class:`RandomShift` -- random integer shift by up to 2 pixels, zero-filled
  (the MNIST training augmentation); :func:`shift_batch` does the same for a
  whole (B, 1, H, W) batch at once, for use in the training loop.
* :class:`RandomCanvas` / :class:`CenterCanvas` -- the digit on a larger zero
  canvas, at a random position (affNIST training) or centered (the "expanded
  MNIST" test set).
"""
import gzip
import hashlib
import math
import os
import shutil
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from torch.utils.data import Dataset

__all__ = [
    "MNISTError",
    "MNIST_MD5",
    "MIRRORS",
    "resolve_data_dir",
    "load_mnist",
    "file_md5",
    "verify_checksum",
    "verify_file",
    "MNIST",
    "RandomShift",
    "RandomCanvas",
    "CenterCanvas",
    "shift_batch",
]

PathLike = Union[str, os.PathLike]

# md5 of the decompressed files, as published with the original data set.
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

# Tried in order; each serves "<name>.gz". The original yann.lecun.com site
# now often refuses scripted downloads, so it is not listed.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

# split -> (images file, labels file, number of items)
_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}

_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (N, rows, cols)
_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (N,)
_IMAGE_SIZE = 28
_NUM_CLASSES = 10


class MNISTError(ValueError):
    """An MNIST file is malformed, corrupt or fails its checksum."""


# --------------------------------------------------------------------------
# Locating files
# --------------------------------------------------------------------------

def resolve_data_dir(root: Optional[PathLike] = None) -> Path:
    """The MNIST directory: ``root`` if given, else ``$CAPSROUTING_DATA``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("CAPSROUTING_DATA")
    if env:
        return Path(env).expanduser()
    raise FileNotFoundError(
        "no MNIST directory given: pass root=<directory holding the IDX files>, "
        "set the environment variable CAPSROUTING_DATA, or call with download=True"
    )


def _default_cache_dir() -> Path:
    env = os.environ.get("CAPSROUTING_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "capsrouting" / "mnist"


def _existing_file(directory: Path, name: str) -> Optional[Path]:
    # Raw files read faster than gzipped ones, so they win when both exist.
    for candidate in (directory / name, directory / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _find_file(directory: Path, name: str) -> Path:
    path = _existing_file(directory, name)
    if path is None:
        raise FileNotFoundError(f"MNIST file {name} (or {name}.gz) not found in directory {directory}")
    return path


# --------------------------------------------------------------------------
# Reading and checking IDX files
# --------------------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when it ends in .gz."""
    raw = path.read_bytes()
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:  # bad header, truncated archive, bad CRC
        raise MNISTError(f"{path}: corrupt gzip archive ({exc})") from exc


def _read_idx(path: PathLike, expected_count: Optional[int] = None, expected_magic: Optional[int] = None) -> torch.Tensor:
    """Read one MNIST IDX file into a uint8 tensor, (N, 28, 28) or (N,).

    ``expected_count`` (None: any) is the number of items the header must
    announce; ``expected_magic`` (None: images or labels) the magic number.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise MNISTError(f"{path}: {len(data)} bytes, too short for an IDX header")
    (magic,) = struct.unpack(">I", data[:4])
    allowed = (expected_magic,) if expected_magic is not None else (_IMAGES_MAGIC, _LABELS_MAGIC)
    if magic not in allowed:
        raise MNISTError(
            f"{path}: bad magic number {magic}, expected {' or '.join(map(str, allowed))} "
            "(not an MNIST IDX file, or a compressed file without the .gz suffix)"
        )
    ndim = magic & 0xFF  # the low byte of the magic number is the number of dimensions
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise MNISTError(f"{path}: truncated header, expected {header_len} bytes, got {len(data)}")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])

    if dims[1:] and dims[1:] != (_IMAGE_SIZE, _IMAGE_SIZE):
        raise MNISTError(f"{path}: images are {dims[1]}x{dims[2]}, expected {_IMAGE_SIZE}x{_IMAGE_SIZE}")
    if expected_count is not None and dims[0] != expected_count:
        raise MNISTError(f"{path}: header announces {dims[0]} items, expected {expected_count}")
    expected_len = header_len + math.prod(dims)
    if len(data) != expected_len:
        what = "truncated" if len(data) < expected_len else "has trailing bytes"
        raise MNISTError(
            f"{path}: file {what}: the header ({' x '.join(map(str, dims))}) implies "
            f"{expected_len} bytes, got {len(data)} bytes"
        )

    if expected_len == header_len:  # no items: frombuffer rejects an empty buffer
        return torch.empty(dims, dtype=torch.uint8)
    # One copy into a writable buffer (torch warns on read-only bytes).
    values = torch.frombuffer(bytearray(memoryview(data)[header_len:]), dtype=torch.uint8)
    values = values.view(*dims)
    if magic == _LABELS_MAGIC and values.numel() and int(values.max()) >= _NUM_CLASSES:
        raise MNISTError(f"{path}: label {int(values.max())} out of range 0..{_NUM_CLASSES - 1}")
    return values


def _read_pair(images_path: PathLike, labels_path: PathLike, expected_count: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 from a matching pair of files."""
    images = _read_idx(images_path, expected_count, _IMAGES_MAGIC)
    labels = _read_idx(labels_path, expected_count, _LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise MNISTError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels"
        )
    return images, labels.long()


def load_mnist(
    root: Optional[PathLike] = None,
    split: str = "train",
    *,
    download: bool = False,
    cache_dir: Optional[PathLike] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Load one MNIST split: images uint8 (N, 28, 28) and labels int64 (N,).

    ``split`` is "train" (60000 items) or "test" (10000). Files are read from
    ``root`` or ``$CAPSROUTING_DATA``. With ``download=True`` that directory
    is used if it already holds the split; otherwise the split is read from
    ``cache_dir`` (default ``$CAPSROUTING_CACHE`` or
    ``~/.cache/capsrouting/mnist``), downloading whatever is missing there.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images_name, labels_name, count = _SPLITS[split]

    if download:
        directory = _download_dir(root, (images_name, labels_name), cache_dir)
    else:
        directory = resolve_data_dir(root)
    return _read_pair(_find_file(directory, images_name), _find_file(directory, labels_name), count)


# --------------------------------------------------------------------------
# Checksums and download
# --------------------------------------------------------------------------

def _md5_of(path: Path, compressed: bool) -> str:
    # Streamed, so checking the 47 MB training images costs no extra memory.
    digest = hashlib.md5()
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise MNISTError(f"{path}: corrupt gzip archive ({exc})") from exc
    return digest.hexdigest()


def file_md5(path: PathLike) -> str:
    """md5 (hex) of a file's decompressed content; ``.gz`` files are decompressed."""
    path = Path(path)
    return _md5_of(path, path.suffix == ".gz")


def _expected_md5(name: str) -> str:
    try:
        return MNIST_MD5[name]
    except KeyError:
        raise ValueError(f"name must be one of {sorted(MNIST_MD5)}, got {name!r}") from None


def verify_checksum(data: bytes, name: str) -> None:
    """Raise MNISTError unless ``data`` (decompressed) has the published md5 of file ``name``."""
    expected = _expected_md5(name)
    actual = hashlib.md5(data).hexdigest()
    if actual != expected:
        raise MNISTError(f"{name}: md5 mismatch, expected {expected}, got {actual}")


def verify_file(path: PathLike) -> None:
    """Raise MNISTError unless the file (raw or .gz) has the published md5 for its name."""
    path = Path(path)
    name = path.name[:-3] if path.suffix == ".gz" else path.name
    expected = _expected_md5(name)
    actual = file_md5(path)
    if actual != expected:
        raise MNISTError(f"{path}: md5 of the decompressed content is {actual}, expected {expected}")


def _download_dir(root: Optional[PathLike], names, cache_dir: Optional[PathLike]) -> Path:
    # A configured directory that already holds the files needs no download.
    try:
        directory = resolve_data_dir(root)
    except FileNotFoundError:
        directory = None
    if directory is not None and all(_existing_file(directory, n) for n in names):
        return directory

    cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    for name in names:
        if _existing_file(cache, name) is None:
            _download(name, cache)
    return cache


def mirror_urls() -> Tuple[str, ...]:
    """Where downloads come from: ``$CAPSROUTING_MNIST_MIRRORS`` (comma-separated base URLs), else MIRRORS."""
    env = os.environ.get("CAPSROUTING_MNIST_MIRRORS")
    if env:
        return tuple(url if url.endswith("/") else url + "/" for url in env.split(",") if url.strip())
    return MIRRORS


def _download(name: str, directory: Path, mirrors: Optional[Tuple[str, ...]] = None, timeout: float = 60.0) -> Path:
    """Fetch ``<name>.gz`` into ``directory``, trying each mirror, verified by md5."""
    mirrors = mirrors if mirrors is not None else mirror_urls()
    target = directory / (name + ".gz")
    failures = []
    checksum_failed = False
    for mirror in mirrors:
        url = mirror + name + ".gz"
        # Download next to the target, then rename: an interrupted download
        # never leaves a partial file under the real name.
        fd, tmp_name = tempfile.mkstemp(prefix=name + ".", suffix=".part", dir=directory)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                request = urllib.request.Request(url, headers={"User-Agent": "capsrouting"})
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    shutil.copyfileobj(response, out)
            actual = _md5_of(tmp, compressed=True)
            if actual != MNIST_MD5[name]:
                raise MNISTError(f"md5 of the decompressed content is {actual}, expected {MNIST_MD5[name]}")
            os.replace(tmp, target)
            return target
        except MNISTError as exc:
            checksum_failed = True
            failures.append(f"{url}: {exc}")
        except (urllib.error.URLError, OSError) as exc:
            failures.append(f"{url}: {exc}")
        finally:
            tmp.unlink(missing_ok=True)  # no-op after a successful rename
    details = "\n  ".join(failures)
    if checksum_failed:
        raise MNISTError(f"could not download a valid {name}:\n  {details}")
    raise OSError(f"could not download {name} from any mirror:\n  {details}")


# --------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------

class MNIST(Dataset):
    """MNIST as a Dataset of (image float32 (1, 28, 28) in [0, 1], label int).

    The whole split is held in memory as uint8 (47 MB for training) and
    converted per item. ``transform`` receives the float image tensor.
    """

    def __init__(self, root: Optional[PathLike] = None, split: str = "train", *, transform=None, download: bool = False):
        self.split = split
        self.transform = transform
        self.images, self.labels = load_mnist(root, split, download=download)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        image = self.images[index].unsqueeze(0).to(torch.float32).div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


# --------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------

def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_image(image) -> None:
    if not isinstance(image, torch.Tensor) or image.dim() < 2:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a tensor of shape (C, H, W), got {shape}")


def _shift(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., y + dy, x + dx] = image[..., y, x]; pixels moved past the edge are lost, new ones are 0."""
    h, w = image.shape[-2:]
    out = torch.zeros_like(image)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def _place(image: torch.Tensor, size: int, top: int, left: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    canvas = image.new_zeros(*image.shape[:-2], size, size)
    canvas[..., top:top + h, left:left + w] = image
    return canvas


class RandomShift:
    """Shift the image by integers dy, dx drawn uniformly from [-max_shift, max_shift], zero-filled.

    The paper's only MNIST augmentation (max_shift=2). ``generator`` (here or
    per call) makes the draws reproducible. Note: a generator given here is
    copied into every DataLoader worker, which then all draw the same shifts.
    """

    def __init__(self, max_shift: int = 2, *, generator: Optional[torch.Generator] = None):
        _check_int("max_shift", max_shift, 0)
        self.max_shift = max_shift
        self.generator = generator

    def __call__(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        _check_image(image)
        g = generator if generator is not None else self.generator
        m = self.max_shift
        dy, dx = torch.randint(-m, m + 1, (2,), generator=g).tolist()
        return _shift(image, dy, dx)

    def __repr__(self) -> str:
        return f"RandomShift(max_shift={self.max_shift})"


class RandomCanvas:
    """Place the image at a uniformly random position on a zero ``size`` x ``size`` canvas.

    With size=40 this is the paper's affNIST training set: MNIST digits put at
    random on a 40x40 background.
    """

    def __init__(self, size: int = 40, *, generator: Optional[torch.Generator] = None):
        _check_int("size", size, 1)
        self.size = size
        self.generator = generator

    def __call__(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        _check_image(image)
        h, w = image.shape[-2:]
        _check_canvas(self.size, h, w)
        g = generator if generator is not None else self.generator
        top = int(torch.randint(0, self.size - h + 1, (), generator=g))
        left = int(torch.randint(0, self.size - w + 1, (), generator=g))
        return _place(image, self.size, top, left)

    def __repr__(self) -> str:
        return f"RandomCanvas(size={self.size})"


class CenterCanvas:
    """Place the image at the center of a zero ``size`` x ``size`` canvas (the "expanded MNIST" test set).

    An odd margin puts the extra pixel below / right. ``generator`` is
    accepted, and ignored, so all transforms share one call signature.
    """

    def __init__(self, size: int = 40):
        _check_int("size", size, 1)
        self.size = size

    def __call__(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        _check_image(image)
        h, w = image.shape[-2:]
        _check_canvas(self.size, h, w)
        return _place(image, self.size, (self.size - h) // 2, (self.size - w) // 2)

    def __repr__(self) -> str:
        return f"CenterCanvas(size={self.size})"


def _check_canvas(size: int, h: int, w: int) -> None:
    if size < h or size < w:
        raise ValueError(f"size must be at least the image size {h}x{w}, got {size}")


def shift_batch(images: torch.Tensor, max_shift: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """RandomShift for a batch (B, C, H, W): every image gets its own (dy, dx), in one vectorised step.

    The batch is zero-padded by ``max_shift`` on each side and every output
    pixel gathered from the padded input at (y - dy, x - dx): each image is
    transformed exactly as RandomShift would with that offset, and the offsets
    have the same distribution (uniform integers in [-max_shift, max_shift]).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor of shape (B, C, H, W), got {shape}")
    _check_int("max_shift", max_shift, 0)
    b, _, h, w = images.shape
    if max_shift == 0 or b == 0:
        return images.clone()
    m = max_shift
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor).
    draw_device = generator.device if generator is not None else images.device
    offsets = torch.randint(-m, m + 1, (2, b), generator=generator, device=draw_device).to(images.device)
    dy, dx = offsets[0], offsets[1]

    padded = torch.nn.functional.pad(images, (m, m, m, m))
    # Padded row read by each output row, (B, H); with |dy| <= m it always
    # lies in [0, H + 2m), so no clamping is needed, even when m >= H.
    rows = torch.arange(h, device=images.device) + m - dy[:, None]
    cols = torch.arange(w, device=images.device) + m - dx[:, None]  # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    # Advanced indices around a slice: the result comes out (B, H, W, C).
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
