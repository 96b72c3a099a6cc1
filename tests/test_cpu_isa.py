"""The CPU kernels' instruction-set levels: the choice, forcing one, agreement, and a safe link.

A process picks its level once (CAPSROUTING_CPU_ISA or the best the CPU runs), so every level is
exercised in a fresh interpreter. CI also runs the CPU kernel tests at each lower level
(.ci/run); here each level is checked against the others and the reference on both kernel paths.
"""
import json
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

from capsrouting import _build_config, _extension

pytestmark = pytest.mark.skipif(_extension.load() is not None, reason=f"C++ extension unavailable: {_extension.load()}")

# Both kernel paths at a small layer (I past one group of 16 lanes, Din not a multiple of 4), and the
# paired Din = 8 path; forward and both gradients, float32 and float64, printed as JSON.
SCRIPT = r"""
import json, os, sys
import torch
from capsrouting import _extension
assert _extension.load() is None
ops = torch.ops.capsrouting
level = ops.cpu_isa()[0]
results = {"level": level}
for path in ("small-batch", "batch"):
    os.environ["CAPSROUTING_CPU_PATH"] = path
    for Din in (5, 8):
        for dtype in (torch.float32, torch.float64):
            g = torch.Generator().manual_seed(Din)
            u = torch.randn(19, 37, Din, generator=g, dtype=dtype)
            W = 0.3 * torch.randn(37, 4, 6, Din, generator=g, dtype=dtype)
            gv = torch.randn(19, 4, 6, generator=g, dtype=dtype)
            v, _, s, Vp = ops.capsule_routing_ext(u, W, None, None, False, False, False, 3)
            du, dW, _, _ = ops.capsule_routing_ext_backward(gv, u, W, None, None, False, False, True, s, Vp, 3)
            results[f"{path}|{Din}|{dtype}"] = [t.double().flatten().tolist() for t in (v, du, dW)]
print(json.dumps(results))
"""


def _python(code_or_args, level=None, **env):
    environment = dict(os.environ, **env)
    environment.pop("CAPSROUTING_CPU_ISA", None)
    if level is not None:
        environment["CAPSROUTING_CPU_ISA"] = level
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], env=environment, capture_output=True, text=True, timeout=600)


def _runnable():
    return list(torch.ops.capsrouting.cpu_isa()[1])


def test_default_is_the_best_level_the_cpu_runs():
    level, runnable, _ = torch.ops.capsrouting.cpu_isa()
    if os.environ.get("CAPSROUTING_CPU_ISA", "auto") in ("", "auto"):
        assert level == runnable[-1]
    assert runnable[0] == "baseline" and set(runnable) <= {"baseline", "avx2", "avx512"}
    if platform.machine() in ("x86_64", "AMD64"):  # every x86-64 CPU of the last decade has AVX2 and FMA
        flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        assert ("avx2" in runnable) == (" avx2" in flags and " fma" in flags)
        assert ("avx512" in runnable) == all(f" avx512{x}" in flags for x in ("f", "vl", "bw", "dq"))


@pytest.mark.parametrize("level", ["baseline", "avx2", "avx512"])
def test_the_variable_forces_a_level(level):
    if level not in _runnable():
        pytest.skip(f"this CPU cannot run {level}")
    code = "from capsrouting import _extension\nassert _extension.load() is None\nprint(_extension.cpu_kernel_level())"
    done = _python(code, level=level)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{level} (forced by CAPSROUTING_CPU_ISA"), done.stdout


def test_info_names_a_forced_level():
    done = _python(["-m", "capsrouting.info", "--no-timing"], level="baseline")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CPU kernels: baseline (forced by CAPSROUTING_CPU_ISA" in done.stdout, done.stdout


def test_default_choice_shows_in_info():
    done = _python(["-m", "capsrouting.info", "--no-timing"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"CPU kernels: {_runnable()[-1]} (the best this CPU runs; levels this CPU runs: {', '.join(_runnable())}" in done.stdout


def test_a_bad_level_is_a_clear_error_not_a_crash():
    code = "import torch, capsrouting\nu = torch.randn(2, 3, 4)\nW = torch.randn(3, 2, 5, 4)\ncapsrouting.capsule_routing(u, W, 3, backend='cpu')"
    done = _python(code, level="avx3")
    assert done.returncode == 1, done.stderr
    assert "RuntimeError: CAPSROUTING_CPU_ISA must be 'auto', 'baseline', 'avx2' or 'avx512', got 'avx3'" in done.stderr
    missing = [level for level in ("avx2", "avx512") if level not in _runnable()]
    if platform.machine() in ("x86_64", "AMD64") and missing:  # a level this CPU lacks: refused, named
        done = _python(code, level=missing[-1])
        assert done.returncode == 1 and "this CPU cannot run that level" in done.stderr, done.stderr


def test_every_level_agrees_with_the_others_and_the_reference():
    from capsrouting import reference

    results = {}
    for level in _runnable():
        done = _python(SCRIPT, level=level)
        assert done.returncode == 0, done.stderr[-3000:]
        results[level] = json.loads(done.stdout.strip().splitlines()[-1])
        assert results[level].pop("level") == level
    first = results[_runnable()[0]]
    for key in first:
        _, Din, dtype = key.split("|")
        tolerance = dict(rtol=1e-10, atol=1e-10) if dtype == "torch.float64" else dict(rtol=1e-4, atol=1e-5)
        # Reference: float64, same inputs as the script.
        g = torch.Generator().manual_seed(int(Din))
        dt = torch.float64 if dtype == "torch.float64" else torch.float32
        u = torch.randn(19, 37, int(Din), generator=g, dtype=dt).double().requires_grad_()
        W = (0.3 * torch.randn(37, 4, 6, int(Din), generator=g, dtype=dt)).double().requires_grad_()
        gv = torch.randn(19, 4, 6, generator=g, dtype=dt).double()
        v = reference.capsule_routing(u, W, 3)
        want = [v.detach(), *torch.autograd.grad(v, (u, W), gv)]
        for level, by_key in results.items():
            for name, got, expected in zip(("v", "du", "dW"), by_key[key], want):
                torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), expected.flatten(), **tolerance,
                                           msg=lambda m: f"{level} {key} {name}: {m}")


def _library_path():
    library = _extension._installed_library()
    if library is None:  # compiled just in time: the library torch built and loaded
        loaded = [line.split()[-1] for line in open("/proc/self/maps") if "capsrouting_ext" in line and ".so" in line]
        library = loaded[0] if loaded else None
    return library


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None,
                    reason="checks x86-64 machine code with objdump")
def test_no_avx_instruction_outside_the_avx_levels():
    """The linker keeps one copy of each inline function shared by the levels' units: that copy must be
    baseline code, or the baseline level would run AVX on a CPU without it (csrc/cpu/kernels/unit.inc)."""
    if torch.ops.capsrouting.cpu_isa()[2]:
        pytest.skip("a -march=native build is for its own CPU")
    library = _library_path()
    assert library is not None and os.path.exists(library)
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", library], capture_output=True, text=True,
                             check=True).stdout
    avx = re.compile(r"\tv[a-z0-9]+\s|%[yz]mm\d|%k[0-7]\b")  # VEX/EVEX-encoded instructions, their registers
    function, offenders, in_levels = None, {}, 0
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
            continue
        if function is None or not avx.search(line):
            continue
        if "capsrouting::cpu::avx2::" in function or "capsrouting::cpu::avx512::" in function:
            in_levels += 1
        else:
            offenders.setdefault(function, line.strip())
    assert in_levels > 1000, "the avx2 and avx512 levels hold no AVX code: were they compiled for their targets?"
    assert not offenders, f"{len(offenders)} functions outside the levels hold AVX code, e.g. {list(offenders.items())[:3]}"


def test_portable_build_by_default_native_by_request(monkeypatch):
    monkeypatch.delenv("CAPSROUTING_NATIVE", raising=False)
    assert "-march=native" not in _build_config.cxx_flags()
    monkeypatch.setenv("CAPSROUTING_NATIVE", "1")
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        assert "-march=native" in _build_config.cxx_flags()
