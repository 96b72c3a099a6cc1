"""How the C++/CUDA extension is compiled: one place for setup.py and the just-in-time build.

Read by ``setup.py`` through ``runpy`` (the package itself cannot be imported while it is
being built), so this module imports only the standard library and, inside functions, torch.

Environment switches:

* ``FORCE_CUDA=1`` builds the CUDA kernels even when no GPU is visible (torch must have CUDA);
  ``FORCE_ONLY_CPU=1`` builds the CPU kernels only.
* ``MAX_JOBS`` caps ninja's parallel compile jobs (default: cores, at most one per 2 GB of RAM).
* ``CAPSROUTING_NATIVE=1`` compiles everything with ``-march=native``: a build for this CPU alone.
  By default the build is portable: the CPU kernels are compiled once per instruction-set level
  (``csrc/cpu/isa.h``) and the best level the running CPU supports is picked at run time.
* ``CAPSROUTING_CXXFLAGS`` / ``CAPSROUTING_NVCCFLAGS``: extra compiler flags, appended.
"""
import os
import platform
import shlex
from pathlib import Path

# Sources relative to the project root: the op schema, then the kernels per device.
CPU_SOURCES = [
    "csrc/routing.cpp",
    "csrc/cpu/routing_cpu.cpp",
    # The CPU kernels, once per instruction-set level (the x86-64 levels compile to nothing elsewhere).
    "csrc/cpu/kernels_baseline.cpp",
    "csrc/cpu/kernels_avx2.cpp",
    "csrc/cpu/kernels_avx512.cpp",
]
CUDA_SOURCES = ["csrc/cuda/routing_cuda.cu"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def want_cuda() -> bool:
    """Build the CUDA kernels? Needs a CUDA build of torch and nvcc; FORCE_* decide when set."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if _flag("FORCE_ONLY_CPU"):
        return False
    if _flag("FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()


def sources(root: Path, with_cuda: bool) -> list:
    return [str(root / s) for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])]


def _uses_openmp() -> bool:
    import torch

    return "OpenMP" in torch.__config__.parallel_info() and platform.system() != "Darwin"


def cxx_flags() -> list:
    # -Wno-psabi: the SIMD helpers pass vectors by value; they are internal, their ABI is moot.
    # -g0: no debug information (Python's build flags ask for it): a third less compile time for the
    # kernels, compiled once per instruction-set level, and a library a quarter of the size.
    # CAPSROUTING_CXXFLAGS=-g brings it back.
    flags = ["-O3", "-g0", "-Wno-psabi"]
    # at::parallel_for only runs threads when the extension itself is compiled with OpenMP;
    # at run time it shares the OpenMP runtime torch has already loaded.
    if _uses_openmp():
        flags.append("-fopenmp")
    if native():
        flags += ["-march=native", "-DCAPSROUTING_NATIVE_BUILD"]  # for this CPU alone, by request
    return flags + shlex.split(os.environ.get("CAPSROUTING_CXXFLAGS", ""))


def native() -> bool:
    """Whether to compile with -march=native (opt-in: such a build may not run on another CPU)."""
    return _flag("CAPSROUTING_NATIVE") and platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64")


def link_flags() -> list:
    return ["-fopenmp"] if _uses_openmp() else []


def nvcc_flags() -> list:
    return ["-O3", "-lineinfo"] + shlex.split(os.environ.get("CAPSROUTING_NVCCFLAGS", ""))


def default_max_jobs() -> str:
    """Parallel compile jobs: one per core, at most one per 2 GB of memory."""
    cores = os.cpu_count() or 1
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return str(cores)
    return str(max(1, min(cores, int(memory_gb // 2))))
