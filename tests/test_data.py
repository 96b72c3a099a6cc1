"""MNIST loading, file checks, checksums, (offline) download and the augmentations.

Tests that need the real files use the ``mnist_dir`` fixture and skip without
it; every malformed-file test builds its own small files in tmp_path. Nothing
here touches the network: the download test replaces urlopen with local bytes.
"""
import gzip
import io
import shutil
import struct
import urllib.error

import pytest
import torch

from capsrouting import data
from capsrouting.data import (
    MNIST,
    MNIST_MD5,
    CenterCanvas,
    MNISTError,
    RandomCanvas,
    RandomShift,
    file_md5,
    load_mnist,
    resolve_data_dir,
    shift_batch,
    verify_checksum,
    verify_file,
)

TEST_LABELS = "t10k-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def idx_bytes(values: torch.Tensor, magic: int) -> bytes:
    """A small IDX file: big-endian magic, one uint32 per dimension, then the bytes."""
    header = struct.pack(">I", magic) + struct.pack(f">{values.dim()}I", *values.shape)
    return header + bytes(values.to(torch.uint8).flatten().tolist())


def labels_file(values, magic=2049) -> bytes:
    return idx_bytes(torch.tensor(values, dtype=torch.uint8), magic)


def images_file(n, rows=28, cols=28, magic=2051) -> bytes:
    return idx_bytes(torch.arange(n * rows * cols).remainder(256).view(n, rows, cols), magic)


def real_bytes(mnist_dir, name) -> bytes:
    """Decompressed content of a real MNIST file."""
    return data._read_bytes(data._find_file(mnist_dir, name))


def coded_image(h=28, w=28):
    """(1, H, W) image whose pixel values 1..H*W say where each pixel came from."""
    return torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w)


def reference_shift(image, dy, dx):
    """Independent reference: roll, then zero whatever wrapped around."""
    h, w = image.shape[-2:]
    rolled = torch.roll(image, shifts=(dy, dx), dims=(-2, -1))
    ys = torch.arange(h)[:, None] - dy
    xs = torch.arange(w)[None, :] - dx
    valid = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    return rolled * valid


def recover_offset(shifted, w=28):
    """(dy, dx) of a shifted coded_image, read from its first nonzero pixel."""
    y, x = (shifted[0] != 0).nonzero()[0].tolist()
    sy, sx = divmod(int(shifted[0, y, x]) - 1, w)
    return y - sy, x - sx


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def train_set(mnist_dir):
    return load_mnist(mnist_dir, "train")


@pytest.fixture(scope="module")
def test_set(mnist_dir):
    return load_mnist(mnist_dir, "test")


# --------------------------------------------------------------------------
# the real files
# --------------------------------------------------------------------------

@pytest.mark.parametrize("split, count", [("train", 60000), ("test", 10000)])
def test_real_files_load(split, count, train_set, test_set):
    images, labels = train_set if split == "train" else test_set
    assert images.shape == (count, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (count,) and labels.dtype == torch.int64
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    assert torch.bincount(labels, minlength=10).min() > 0  # all ten classes present
    assert int(images.max()) == 255 and int(images.min()) == 0


@pytest.mark.parametrize("name", sorted(MNIST_MD5))
def test_real_files_match_checksums(mnist_dir, name):
    path = data._find_file(mnist_dir, name)
    verify_file(path)  # raises on mismatch
    assert file_md5(path) == MNIST_MD5[name]


def test_env_var_gives_the_directory(mnist_dir, monkeypatch, test_set):
    monkeypatch.setenv("CAPSROUTING_DATA", str(mnist_dir))
    assert resolve_data_dir() == mnist_dir
    images, labels = load_mnist(split="test")
    assert torch.equal(images, test_set[0]) and torch.equal(labels, test_set[1])


# --------------------------------------------------------------------------
# malformed files
# --------------------------------------------------------------------------

@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "gz"])
def test_truncated_file(mnist_dir, tmp_path, compressed):
    shutil.copy(data._find_file(mnist_dir, TEST_IMAGES), tmp_path)
    content = real_bytes(mnist_dir, TEST_LABELS)
    truncated = content[:-100]
    name = TEST_LABELS + (".gz" if compressed else "")
    (tmp_path / name).write_bytes(gzip.compress(truncated) if compressed else truncated)
    with pytest.raises(MNISTError, match="truncated") as info:
        load_mnist(tmp_path, "test")
    message = str(info.value)
    assert name in message
    assert str(len(content)) in message and str(len(truncated)) in message  # expected vs actual bytes


def test_truncated_archive(mnist_dir, tmp_path):
    archive = gzip.compress(real_bytes(mnist_dir, TEST_LABELS))
    path = tmp_path / (TEST_LABELS + ".gz")
    path.write_bytes(archive[: len(archive) // 2])
    with pytest.raises(MNISTError, match="gzip") as info:
        data._read_idx(path)
    assert path.name in str(info.value)


@pytest.mark.parametrize("damage", ["garbage", "flipped"])
def test_corrupt_gzip(tmp_path, damage):
    archive = bytearray(gzip.compress(labels_file([i % 10 for i in range(2000)])))
    if damage == "garbage":
        archive = b"this is not a gzip archive"
    else:
        for i in range(20, 40):  # inside the deflate stream
            archive[i] ^= 0xFF
    path = tmp_path / "labels.gz"
    path.write_bytes(bytes(archive))
    with pytest.raises(MNISTError, match="gzip") as info:
        data._read_idx(path)
    assert "labels.gz" in str(info.value)


def test_synthetic_files_read_back(tmp_path):
    (tmp_path / "labels").write_bytes(labels_file([3, 1, 4, 1, 5]))
    (tmp_path / "images.gz").write_bytes(gzip.compress(images_file(3)))
    labels = data._read_idx(tmp_path / "labels")
    images = data._read_idx(tmp_path / "images.gz", expected_count=3)
    assert labels.tolist() == [3, 1, 4, 1, 5]
    assert images.shape == (3, 28, 28) and images.dtype == torch.uint8
    assert images.flatten()[:300].tolist() == [i % 256 for i in range(300)]


@pytest.mark.parametrize(
    "content, match",
    [
        (labels_file([1, 2, 3], magic=2050), "magic"),
        (b"\x1f\x8b\x08\x00" + bytes(20), "magic"),  # a gzip archive saved without .gz
        (labels_file([1, 2, 3]) + b"\x00", "trailing"),
        (labels_file([1, 2, 10]), "label 10"),
        (images_file(2, rows=27), "27x28"),
        (b"\x00\x00", "too short"),
        (struct.pack(">II", 2051, 5), "header"),
    ],
    ids=["bad-magic", "gzip-without-suffix", "trailing-bytes", "label-out-of-range", "wrong-size", "tiny", "short-header"],
)
def test_malformed_file(tmp_path, content, match):
    path = tmp_path / "broken-idx"
    path.write_bytes(content)
    with pytest.raises(MNISTError, match=match) as info:
        data._read_idx(path)
    assert "broken-idx" in str(info.value)


def test_wrong_count(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(labels_file([0] * 5))
    with pytest.raises(MNISTError, match="5 items, expected 10"):
        data._read_idx(path, expected_count=10)


def test_pair_checks(tmp_path):
    (tmp_path / "images").write_bytes(images_file(3))
    (tmp_path / "labels").write_bytes(labels_file([0, 1]))
    with pytest.raises(MNISTError, match="3 images but .* 2 labels"):
        data._read_pair(tmp_path / "images", tmp_path / "labels")
    # a labels file where the images belong is caught by the magic number
    with pytest.raises(MNISTError, match="magic"):
        data._read_pair(tmp_path / "labels", tmp_path / "labels")
    (tmp_path / "labels3").write_bytes(labels_file([0, 1, 2]))
    images, labels = data._read_pair(tmp_path / "images", tmp_path / "labels3")
    assert images.shape == (3, 28, 28) and labels.dtype == torch.int64


def test_raw_file_preferred_over_gz(tmp_path):
    (tmp_path / TEST_LABELS).write_bytes(b"raw")
    (tmp_path / (TEST_LABELS + ".gz")).write_bytes(b"gz")
    assert data._find_file(tmp_path, TEST_LABELS) == tmp_path / TEST_LABELS
    (tmp_path / TEST_LABELS).unlink()
    assert data._find_file(tmp_path, TEST_LABELS) == tmp_path / (TEST_LABELS + ".gz")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(tmp_path, "test")
    assert TEST_IMAGES in str(info.value) and str(tmp_path) in str(info.value)


def test_no_root_and_no_env(monkeypatch):
    monkeypatch.delenv("CAPSROUTING_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="CAPSROUTING_DATA"):
        resolve_data_dir()
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_mnist()
    with pytest.raises(FileNotFoundError):
        MNIST(split="test")


def test_bad_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_mnist(tmp_path, "validation")


# --------------------------------------------------------------------------
# checksums and download (offline)
# --------------------------------------------------------------------------

def test_verify_checksum_on_bytes(mnist_dir):
    content = real_bytes(mnist_dir, TEST_LABELS)
    verify_checksum(content, TEST_LABELS)  # the real content passes
    damaged = bytearray(content)
    damaged[100] ^= 1
    with pytest.raises(MNISTError, match="md5"):
        verify_checksum(bytes(damaged), TEST_LABELS)
    with pytest.raises(MNISTError, match="md5"):
        verify_checksum(b"", TEST_LABELS)
    with pytest.raises(ValueError, match="name"):
        verify_checksum(content, "labels.bin")


def test_verify_file_rejects_wrong_content(tmp_path):
    # gzipped, valid IDX, wrong data: only the checksum can tell
    path = tmp_path / (TEST_LABELS + ".gz")
    path.write_bytes(gzip.compress(labels_file([0] * 10000)))
    with pytest.raises(MNISTError, match="md5"):
        verify_file(path)


class FakeMirrors:
    """Stands in for urllib.request.urlopen: serves "<mirror><name>.gz" from a dict."""

    def __init__(self, files):
        self.files = files  # url -> bytes, or an exception to raise
        self.requested = []

    def __call__(self, request, timeout=None):
        url = request.full_url
        self.requested.append(url)
        served = self.files.get(url, urllib.error.URLError("not found"))
        if isinstance(served, Exception):
            raise served
        return io.BytesIO(served)


def test_download_verifies_and_falls_back(mnist_dir, tmp_path, monkeypatch):
    good = gzip.compress(real_bytes(mnist_dir, TEST_LABELS))
    fake = FakeMirrors({"http://b/" + TEST_LABELS + ".gz": good})
    monkeypatch.setattr(data.urllib.request, "urlopen", fake)
    target = data._download(TEST_LABELS, tmp_path, mirrors=("http://a/", "http://b/"))
    assert fake.requested == ["http://a/" + TEST_LABELS + ".gz", "http://b/" + TEST_LABELS + ".gz"]
    assert target == tmp_path / (TEST_LABELS + ".gz")
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temp file left
    verify_file(target)


def test_download_checksum_mismatch_deletes(tmp_path, monkeypatch):
    wrong = gzip.compress(labels_file([0] * 10000))
    fake = FakeMirrors({"http://a/" + TEST_LABELS + ".gz": wrong})
    monkeypatch.setattr(data.urllib.request, "urlopen", fake)
    with pytest.raises(MNISTError, match="md5"):
        data._download(TEST_LABELS, tmp_path, mirrors=("http://a/",))
    assert list(tmp_path.iterdir()) == []


def test_download_all_mirrors_unreachable(tmp_path, monkeypatch):
    monkeypatch.setattr(data.urllib.request, "urlopen", FakeMirrors({}))
    with pytest.raises(OSError, match="any mirror"):
        data._download(TEST_LABELS, tmp_path, mirrors=("http://a/", "http://b/"))
    assert list(tmp_path.iterdir()) == []


def test_load_with_download_uses_cache(mnist_dir, tmp_path, monkeypatch, test_set):
    mirror = data.MIRRORS[0]
    files = {mirror + n + ".gz": gzip.compress(real_bytes(mnist_dir, n), compresslevel=1) for n in (TEST_IMAGES, TEST_LABELS)}
    fake = FakeMirrors(files)
    monkeypatch.setattr(data.urllib.request, "urlopen", fake)
    monkeypatch.delenv("CAPSROUTING_DATA", raising=False)
    monkeypatch.setenv("CAPSROUTING_CACHE", str(tmp_path / "cache"))

    images, labels = load_mnist(split="test", download=True)
    assert torch.equal(images, test_set[0]) and torch.equal(labels, test_set[1])
    assert len(fake.requested) == 2
    load_mnist(split="test", download=True)  # cached now: no new request
    assert len(fake.requested) == 2
    # a directory that already holds the files is used as is
    load_mnist(mnist_dir, "test", download=True, cache_dir=tmp_path / "unused")
    assert len(fake.requested) == 2 and not (tmp_path / "unused").exists()


# --------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------

def test_dataset_items(mnist_dir, test_set):
    ds = MNIST(mnist_dir, "test")
    assert len(ds) == 10000
    image, label = ds[7]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert isinstance(label, int) and label == int(test_set[1][7])
    assert torch.equal((image * 255).round().to(torch.uint8)[0], test_set[0][7])

    batch, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert batch.shape == (8, 1, 28, 28) and labels.dtype == torch.int64


def test_dataset_transform(mnist_dir):
    ds = MNIST(mnist_dir, "test", transform=CenterCanvas(40))
    image, _ = ds[0]
    assert image.shape == (1, 40, 40) and image.dtype == torch.float32
    with pytest.raises(ValueError, match="split"):
        MNIST(mnist_dir, "val")


# --------------------------------------------------------------------------
# RandomShift and shift_batch
# --------------------------------------------------------------------------

def test_random_shift_moves_content_with_zero_fill():
    image = coded_image()
    shift = RandomShift(2)
    g = gen(1)
    seen = set()
    for _ in range(60):
        out = shift(image, generator=g)
        assert out.shape == image.shape and out.dtype == image.dtype
        dy, dx = recover_offset(out)
        assert abs(dy) <= 2 and abs(dx) <= 2
        assert torch.equal(out, reference_shift(image, dy, dx))  # moved, no wrap-around
        seen.add((dy, dx))
    assert len(seen) > 10


def test_random_shift_keeps_digit_inside(train_set):
    # real digits have a blank margin of >= 2 pixels almost always: pick some that do
    images = train_set[0][:200].float().div(255).unsqueeze(1)
    margin = images[..., :2, :].sum((1, 2, 3)) + images[..., -2:, :].sum((1, 2, 3)) \
        + images[..., :, :2].sum((1, 2, 3)) + images[..., :, -2:].sum((1, 2, 3))
    inside = images[margin == 0][:50]
    assert len(inside) == 50
    shift, g = RandomShift(2), gen(2)
    for image in inside:
        assert torch.allclose(shift(image, generator=g).sum(), image.sum())
    assert torch.allclose(shift_batch(inside, 2, gen(3)).sum((1, 2, 3)), inside.sum((1, 2, 3)))


def test_random_shift_distribution():
    # a single pixel in the middle: where it lands is the offset
    image = torch.zeros(1, 28, 28)
    image[0, 14, 14] = 1
    shift, g = RandomShift(2), gen(3)
    counts = torch.zeros(5, 5)
    for _ in range(2500):
        y, x = shift(image, generator=g)[0].nonzero()[0].tolist()
        counts[y - 12, x - 12] += 1
    assert counts.min() > 50 and counts.max() < 150  # 25 offsets, 100 expected each


def test_random_shift_determinism_and_generator_in_constructor():
    image = torch.rand(1, 28, 28, generator=gen(0))
    a = [RandomShift(2)(image, generator=gen(5)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    shift = RandomShift(2, generator=gen(5))
    assert torch.equal(shift(image), a[0])


def test_random_shift_edge_cases():
    image = torch.rand(3, 10, 12, generator=gen(0))
    assert torch.equal(RandomShift(0)(image), image)
    out = RandomShift(50)(image, generator=gen(1))  # offsets can exceed the image
    assert out.shape == image.shape
    # channels move together
    coded = torch.cat([coded_image(10, 12), 1000 + coded_image(10, 12)])
    out = RandomShift(3)(coded, generator=gen(2))
    dy, dx = recover_offset(out, w=12)
    assert torch.equal(out, reference_shift(coded, dy, dx))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_random_shift_bad_arguments(bad):
    with pytest.raises(ValueError, match="max_shift"):
        RandomShift(bad)
    with pytest.raises(ValueError, match="max_shift"):
        shift_batch(torch.zeros(2, 1, 28, 28), bad)


def test_shift_batch_matches_random_shift_semantics():
    images = coded_image().expand(256, 1, 28, 28).clone()
    out = shift_batch(images, 2, generator=gen(4))
    assert out.shape == images.shape and out.dtype == images.dtype
    offsets = set()
    for b in range(images.shape[0]):
        dy, dx = recover_offset(out[b])
        assert abs(dy) <= 2 and abs(dx) <= 2
        assert torch.equal(out[b], reference_shift(images[b], dy, dx))
        offsets.add((dy, dx))
    assert len(offsets) == 25  # each image has its own offset


def test_shift_batch_distribution():
    images = torch.zeros(10000, 1, 28, 28)
    images[:, 0, 14, 14] = 1
    out = shift_batch(images, 2, generator=gen(6))
    pos = out[:, 0].flatten(1).argmax(1)
    counts = torch.bincount((pos // 28 - 12) * 5 + (pos % 28 - 12), minlength=25)
    assert counts.sum() == 10000 and counts.numel() == 25
    assert counts.min() > 300 and counts.max() < 500  # 400 expected each


def test_shift_batch_determinism_channels_and_edge_cases():
    images = torch.rand(16, 3, 20, 24, generator=gen(0))
    a = shift_batch(images, 3, generator=gen(7))
    assert torch.equal(a, shift_batch(images, 3, generator=gen(7)))
    assert not torch.equal(a, shift_batch(images, 3, generator=gen(8)))
    # every channel of an image moves by the same offset
    coded = torch.stack([coded_image(20, 24), 1000 + coded_image(20, 24)], dim=1).expand(8, 2, 20, 24).clone()
    out = shift_batch(coded, 3, generator=gen(9))
    for b in range(8):
        dy, dx = recover_offset(out[b, :1], w=24)
        assert torch.equal(out[b], reference_shift(coded[b], dy, dx).view(2, 20, 24))
    assert torch.equal(shift_batch(images, 0), images)
    assert shift_batch(images[:0], 2).shape == (0, 3, 20, 24)
    big = shift_batch(images, 40, generator=gen(1))  # offsets larger than the image
    assert big.shape == images.shape
    with pytest.raises(ValueError, match="images"):
        shift_batch(torch.zeros(1, 28, 28), 2)


# --------------------------------------------------------------------------
# canvases
# --------------------------------------------------------------------------

def placement(canvas, image):
    """(top, left) where image sits on canvas, checking everything else is zero."""
    h, w = image.shape[-2:]
    ys, xs = (canvas[0] != 0).nonzero(as_tuple=True)
    top, left = int(ys.min()), int(xs.min())
    assert torch.equal(canvas[..., top:top + h, left:left + w], image)
    assert canvas.sum() == image.sum()  # nothing else on the canvas
    return top, left


def test_random_canvas():
    image = coded_image()
    canvas = RandomCanvas(40)
    g = gen(0)
    tops, lefts = set(), set()
    for _ in range(300):
        out = canvas(image, generator=g)
        assert out.shape == (1, 40, 40) and out.dtype == torch.float32
        top, left = placement(out, image)
        assert 0 <= top <= 12 and 0 <= left <= 12
        tops.add(top)
        lefts.add(left)
    assert tops == set(range(13)) and lefts == set(range(13))  # every position reachable
    assert torch.equal(canvas(image, generator=gen(3)), RandomCanvas(40, generator=gen(3))(image))
    assert torch.equal(RandomCanvas(28)(image), image)


def test_center_canvas():
    image = coded_image()
    out = CenterCanvas(40)(image)
    assert out.shape == (1, 40, 40)
    assert placement(out, image) == (6, 6)
    assert placement(CenterCanvas(41)(image), image) == (6, 6)  # odd margin: extra pixel below/right
    assert torch.equal(CenterCanvas(28)(image), image)


@pytest.mark.parametrize("cls", [RandomCanvas, CenterCanvas])
def test_canvas_bad_arguments(cls):
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="size"):
            cls(bad)
    with pytest.raises(ValueError, match="size"):
        cls(20)(coded_image())  # canvas smaller than the image
