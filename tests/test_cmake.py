"""The CMake build for C++ users: configure against the installed torch, build, run ctest."""
import shutil
import subprocess

import pytest
import torch

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None, reason="cmake/ctest not installed")
def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "build"

    def run(*command):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    run("cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}")
    run("cmake", "--build", str(build), "-j", "2")
    out = run("ctest", "--test-dir", str(build), "--output-on-failure", "--verbose")
    print(out)
    assert "100% tests passed" in out and "FAIL" not in out
    assert out.count("ok   ") == 4  # every case of tests/cpp/test_routing_cpu.cpp reported
