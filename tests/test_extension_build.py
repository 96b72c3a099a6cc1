"""How the extension gets built when it was not built at install time, and what a failed build does.

Each case runs in a fresh interpreter with its own TORCH_EXTENSIONS_DIR, so nothing is
cached between cases or from the installed library.
"""
import os
import subprocess
import sys

import pytest

# Routes on CPU tensors with the automatic choice, checks the answer against the reference,
# and reports the capsrouting warnings and the backend that ran.
SCRIPT = """
import warnings
import torch
import capsrouting
from capsrouting import reference

u = torch.randn(19, 7, 5, dtype=torch.float64, requires_grad=True)
W = torch.randn(7, 5, 6, 5, dtype=torch.float64, requires_grad=True)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    v = capsrouting.capsule_routing(u, W, 3)
    capsrouting.capsule_routing(u, W, 3)
v_ref = reference.capsule_routing(u, W, 3)
torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-10)
for got, want in zip(torch.autograd.grad(v.sum(), (u, W)), torch.autograd.grad(v_ref.sum(), (u, W))):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
messages = [str(w.message) for w in caught if "capsrouting" in str(w.message)]
print("BACKEND", capsrouting.backends.resolve("auto", u, W).name)
print("WARNINGS", len(messages))
for m in messages:
    print("WARNING", m)
"""


def _run(tmp_path, **env):
    environment = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"), **env)
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result.stdout


def test_broken_build_falls_back_to_the_reference_with_one_warning(tmp_path):
    out = _run(tmp_path, CAPSROUTING_EXTENSION="jit", CAPSROUTING_CXXFLAGS="--no-such-compiler-flag")
    assert "BACKEND torch" in out
    assert "WARNINGS 1" in out, out
    assert "using backend 'torch' for cpu tensors" in out
    assert "compiling the C++ extension just in time failed" in out
    # The warning names the compiler's own error, not the command line ninja ran.
    [warning] = [line for line in out.splitlines() if line.startswith("WARNING ")]
    assert "error: unrecognized command-line option" in warning and "--no-such-compiler-flag" in warning, warning
    assert "-MMD" not in warning, warning


def test_disabled_extension_says_so(tmp_path):
    out = _run(tmp_path, CAPSROUTING_EXTENSION="off")
    assert "BACKEND torch" in out and "WARNINGS 1" in out
    assert "disabled by CAPSROUTING_EXTENSION=off" in out


@pytest.mark.skipif(os.environ.get("CAPSROUTING_EXTENSION") == "off", reason="extension disabled")
def test_first_use_compiles_the_extension_just_in_time(tmp_path):
    # The default, portable flags (every instruction-set level compiled, the best one picked).
    out = _run(tmp_path, CAPSROUTING_EXTENSION="jit", CAPSROUTING_NATIVE="0")
    assert "BACKEND cpu" in out and "WARNINGS 0" in out, out
    assert any(p.name.startswith("capsrouting_ext") for p in (tmp_path / "extensions").iterdir())


def test_info_names_the_reason(tmp_path):
    environment = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"), CAPSROUTING_EXTENSION="off")
    result = subprocess.run([sys.executable, "-m", "capsrouting.info", "--no-timing"], env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cpu     unavailable: disabled by CAPSROUTING_EXTENSION=off" in result.stdout
    assert "backend='auto' runs 'torch' for cpu tensors" in result.stdout


def test_first_error_line_picks_the_diagnostic():
    from capsrouting._extension import first_error_line

    ninja = (
        "Error building extension 'capsrouting_ext': [1/3] c++ -MMD -Werror=return-type -c routing.cpp -o routing.o\n"
        "FAILED: routing.o\nc++ -MMD -Werror=return-type -c routing.cpp -o routing.o\n"
        "routing.cpp:3:1: error: 'foo' was not declared in this scope\nninja: build stopped: subcommand failed."
    )
    assert first_error_line(ninja) == "routing.cpp:3:1: error: 'foo' was not declared in this scope"
    assert first_error_line("x.cu(7): error: identifier \"bar\" is undefined") == 'x.cu(7): error: identifier "bar" is undefined'
    assert first_error_line("nvcc fatal   : Unsupported gpu architecture 'compute_99'") == "nvcc fatal   : Unsupported gpu architecture 'compute_99'"
    assert first_error_line("undefined symbol: _ZN3fooEv") == "undefined symbol: _ZN3fooEv"  # no diagnostic: first line
