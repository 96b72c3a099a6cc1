"""pytest-benchmark suite options: ``pytest bench/ --benchmark-only`` times every case.

``--bench-fast`` swaps the sweep for tiny shapes (CI runs it with ``--benchmark-disable``
so the benchmark code cannot rot without taking CI's time).
"""
import pytest
import torch

from bench import cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_addoption(parser):
    parser.addoption("--bench-fast", action="store_true", help="tiny shapes, for a quick check that the suite runs")


def pytest_generate_tests(metafunc):
    fast = metafunc.config.getoption("--bench-fast")
    if "shape" in metafunc.fixturenames:
        metafunc.parametrize("shape", cases.sweep(DEVICE, fast), ids=lambda s: s.label)
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", cases.available_backends(DEVICE))
    if "variant" in metafunc.fixturenames:
        metafunc.parametrize("variant", cases.OPTION_VARIANTS)
    if "pass_" in metafunc.fixturenames:
        metafunc.parametrize("pass_", cases.PASSES)


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def fast(request):
    return request.config.getoption("--bench-fast")
