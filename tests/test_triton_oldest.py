"""The oldest supported Triton (the lower bound in pyproject.toml) compiles the kernels and runs them exactly.

Needs that Triton installed in a directory of its own, named by CAPSROUTING_OLDEST_TRITON
(``pip install --no-deps --target DIR triton==3.6.0``; .ci/run installs it from the local
package index). Skips when the variable is unset; fails when it names no such Triton, so
that CI cannot pass without the check. The directory goes first on the path of subprocesses
that compile every kernel variant for sm_90 (the project's GPU; for sm_80 too, run
``PYTHONPATH=DIR:. python tests/triton_aot.py``) and run a few tests of tests/test_triton.py.
"""
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_triton_aot import assert_every_variant_compiled_without_spills
from triton_aot import compile_in_subprocess

ROOT = Path(__file__).resolve().parent.parent
OLDEST_TRITON_VARIABLE = "CAPSROUTING_OLDEST_TRITON"

# Every kernel with weights and without, float32 and float64, and the small-batch launch paths
# (input capsules split across programs, dW in batch chunks): under a minute in the interpreter.
TRITON_TESTS = [
    "test_float32_matches_reference[odd_I_37_R1]",
    "test_float64_matches_reference[B1]",
    "test_small_batch_split_paths[route]",
    "test_batch_chunked_weight_gradient",
]


@dataclasses.dataclass
class OldestTriton:
    path: str
    version: str
    env: dict  # for subprocesses: the oldest Triton first on the path


def _version_tuple(version: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def _lower_bound() -> tuple:
    bounds = set(re.findall(r"triton\s*>=\s*([0-9.]+)", (ROOT / "pyproject.toml").read_text()))
    assert len(bounds) == 1, f"pyproject.toml names several lower bounds for triton: {bounds}"
    return _version_tuple(bounds.pop())


@pytest.fixture(scope="module")
def oldest_triton() -> OldestTriton:
    path = os.environ.get(OLDEST_TRITON_VARIABLE)
    if not path:
        pytest.skip(
            f"the oldest supported Triton is not configured: set {OLDEST_TRITON_VARIABLE} to a directory "
            "holding it (pip install --no-deps --target DIR triton==3.6.0), as .ci/run does"
        )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([path, str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    probe = subprocess.run(
        [sys.executable, "-c", "import triton; print(triton.__version__, triton.__file__)"], env=env, capture_output=True, text=True
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    version, location = probe.stdout.split()
    assert Path(location).resolve().is_relative_to(Path(path).resolve()), (
        f"{OLDEST_TRITON_VARIABLE}={path} holds no triton (the one imported is {location}); .ci/run installs it "
        "there from the local package index before the tests: see its output"
    )
    assert _version_tuple(version) == _lower_bound(), f"triton {version} in {path} is not pyproject.toml's lower bound"
    return OldestTriton(path, version, env)


def test_every_kernel_variant_compiles_without_spills_with_the_oldest_triton(oldest_triton, tmp_path):
    proc, results = compile_in_subprocess(tmp_path / "aot.json", archs=(90,), path_prefix=[oldest_triton.path])
    assert f"with triton {oldest_triton.version}," in proc.stdout, proc.stdout[-2000:]
    assert_every_variant_compiled_without_spills(proc, results, (90,))


def test_kernels_match_the_reference_with_the_oldest_triton(oldest_triton):
    """In that Triton's interpreter without a GPU (conftest.py), compiled on CUDA tensors with one."""
    test_file = Path(__file__).with_name("test_triton.py")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(f"{test_file}::{name}" for name in TRITON_TESTS)],
        env=oldest_triton.env, cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    outcomes = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|x\w+)", summary)}
    assert outcomes == {"passed": len(TRITON_TESTS)}, summary  # none skipped
