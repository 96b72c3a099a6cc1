"""The CMake build for C++ users: configure against the installed torch, build, run ctest."""
import re
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

    # -O1: the build system and the C++ tests are under test here, not the optimizer; the kernels,
    # compiled once per instruction-set level, build in half the time.
    configured = run("cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                     "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG")
    run("cmake", "--build", str(build), "-j", "2")
    out = run("ctest", "--test-dir", str(build), "--output-on-failure", "--verbose", "-j", "2")
    print(out)
    assert "100% tests passed" in out and "    FAIL" not in out
    expected = ["routing_cpu_matches_naive_loop", "cuda_kernels_emulated_match_references",
                "cuda_emulation_stops_at_a_divergent_barrier"]
    # The ThreadSanitizer tests need a compiler that has it (CMake says so when it has not).
    if "cannot build with -fsanitize=thread" not in configured:
        expected += ["cuda_kernels_emulated_race_free", "thread_sanitizer_catches_a_planted_race"]
        # The planted race fails for the right reason: ThreadSanitizer saw it.
        assert "WARNING: ThreadSanitizer: data race" in out and "planted_race_kernel" in out
    for name in expected:
        assert re.search(rf"Test +#\d+: {name} \.+ +Passed", out), f"ctest did not pass {name}"
    # The divergent barrier stopped the emulation with its message, not some other crash.
    assert "threads wait at a barrier that others never reach" in out
    # Every case of the C++ tests reported: 4 of the CPU kernel's; the emulated kernels' once
    # in full and once on the quick cases.
    assert len(re.findall(r"^\d+: ok   ", out, flags=re.M)) == 4
    assert out.count("all cases passed") == (2 if len(expected) == 5 else 1)
