"""Compile the extension's CUDA kernels with nvcc for sm_80 and sm_90 and read ptxas's report.

Needs only nvcc and torch's headers, no GPU: ``python tests/cuda_compile.py`` prints the
registers, shared memory and spills of every kernel and exits non-zero on any spill.
A CPU-only torch wheel ships the c10/ATen CUDA headers but not one header that its CUDA
build generates (c10/cuda/impl/cuda_cmake_macros.h); a stand-in is written to a temporary
include directory when it is missing.
"""
import argparse
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch.utils.cpp_extension as cpp_extension

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "cuda" / "routing_cuda.cu"
_GENERATED = "c10/cuda/impl/cuda_cmake_macros.h"


def nvcc() -> str:
    found = shutil.which("nvcc")
    if found:
        return found
    home = cpp_extension.CUDA_HOME
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    raise FileNotFoundError("nvcc not found on PATH or in CUDA_HOME")


def compile_report(archs, workdir: Path) -> str:
    includes = [str(workdir)] + cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    if not any((Path(p) / _GENERATED).exists() for p in includes[1:]):
        stand_in = workdir / _GENERATED
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    command = [nvcc(), "-c", str(SOURCE), "-o", str(workdir / "routing_cuda.o"), "-std=c++17", "-O3",
               "--expt-relaxed-constexpr", "-DWITH_CUDA", "-Xptxas", "-v"]
    for arch in archs:
        command += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    for path in includes:
        command += ["-I", path]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result.stderr


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse(report: str) -> list:
    """[(kernel, arch, registers, spill store bytes, spill load bytes)] from ptxas -v output."""
    rows, current = [], None
    for line in report.splitlines():
        if m := _ENTRY.search(line):
            current = {"kernel": _demangled_name(m.group(1)), "arch": m.group(2), "spill": None, "registers": None}
            rows.append(current)
        elif current is not None and (m := _SPILLS.search(line)):
            current["spill"] = (int(m.group(1)), int(m.group(2)))
        elif current is not None and (m := _USED.search(line)):
            current["registers"] = int(m.group(1))
    return rows


# Template arguments <scalar_t, acc_t, kWithOptions> as they appear in the mangled kernel names.
_TYPES = {"N3c108BFloat16Ef": "bfloat16", "N3c104HalfEf": "float16", "ff": "float32", "dd": "float64"}
_INSTANTIATIONS = {"0": "plain", "1": "options"}


def _demangled_name(mangled: str) -> str:
    kernel = re.search(r"(forward_kernel|backward_reduce_kernel|backward_inputs_kernel)I(N3c108BFloat16Ef|N3c104HalfEf|ff|dd)Lb([01])E", mangled)
    return f"{kernel.group(1)}<{_TYPES[kernel.group(2)]}, {_INSTANTIATIONS[kernel.group(3)]}>" if kernel else mangled


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["80", "90"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = parse(compile_report(args.arch, Path(tmp)))
    bad = 0
    for row in sorted(rows, key=lambda row: (row["arch"], row["kernel"])):  # each kernel's plain and options together
        stores, loads = row["spill"]
        bad += stores + loads > 0
        print(f"{row['arch']}  {row['kernel']:48s} registers {row['registers']:4d}  spills {stores}/{loads} bytes")
    print(f"{len(rows)} kernels, {bad} with spills")
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
