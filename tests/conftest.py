"""Shared test fixtures: where the real MNIST files are, and the device list."""
import os
from pathlib import Path

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The
# variable must be set before capsrouting imports triton, hence here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--mnist-dir",
        default=None,
        help="directory holding the MNIST IDX files (default: $CAPSROUTING_DATA)",
    )


@pytest.fixture(scope="session")
def mnist_dir(request) -> Path:
    """The real MNIST directory; tests that need it skip when it is absent."""
    root = request.config.getoption("--mnist-dir") or os.environ.get("CAPSROUTING_DATA")
    if not root:
        pytest.skip("MNIST data not configured: set CAPSROUTING_DATA or pass --mnist-dir")
    path = Path(root)
    if not (path / "train-labels-idx1-ubyte.gz").exists() and not (path / "train-labels-idx1-ubyte").exists():
        pytest.skip(f"MNIST files not found in the configured directory {path}")
    return path


def _devices():
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


DEVICES = _devices()
