"""Loads the C++/CUDA extension once: the library built at install time, else a just-in-time build.

``CAPSROUTING_EXTENSION`` chooses: ``auto`` (default: the installed library if there is
one, else compile now), ``jit`` (always compile now, cached by torch in
``TORCH_EXTENSIONS_DIR``), or ``off``. Any failure becomes the reason the "cpu" and
"cuda" backends are unavailable; ``backend="auto"`` then warns once and runs the reference.
"""
import functools
import importlib.util
import os
import re
from pathlib import Path
from typing import Optional

import torch

# Where csrc/ lives: the project root of a source checkout (or an editable install), or the
# package itself when installed from a wheel (setup.py copies the sources into it).
_PACKAGE = Path(__file__).resolve().parent
_ROOT = _PACKAGE if (_PACKAGE / "csrc").is_dir() else _PACKAGE.parent
_OPS = ("capsule_routing_ext", "capsule_routing_ext_backward", "route_ext", "route_ext_backward", "cpu_isa")


def _mode() -> str:
    mode = os.environ.get("CAPSROUTING_EXTENSION", "auto")
    if mode not in ("auto", "jit", "off"):
        raise ValueError(f"CAPSROUTING_EXTENSION must be 'auto', 'jit' or 'off', got {mode!r}")
    return mode


def _installed_library() -> Optional[str]:
    spec = importlib.util.find_spec("capsrouting._C")
    return spec.origin if spec is not None else None


def _compile_now() -> None:
    from torch.utils import cpp_extension

    from . import _build_config as config

    if not (_ROOT / config.CPU_SOURCES[0]).exists():
        raise RuntimeError(
            "the extension was not built when capsrouting was installed, and its C++ sources (csrc/) "
            "are not here to compile it now; reinstall from a source checkout with a C++ compiler"
        )
    with_cuda = config.want_cuda()
    os.environ.setdefault("MAX_JOBS", config.default_max_jobs())
    cpp_extension.load(
        name="capsrouting_ext" + ("_cuda" if with_cuda else ""),
        sources=config.sources(_ROOT, with_cuda),
        extra_cflags=config.cxx_flags() + (["-DWITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=config.nvcc_flags() + ["-DWITH_CUDA"],
        extra_ldflags=config.link_flags(),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=False,
    )


# A compiler's or linker's diagnostic: "x.cpp:3:1: error: ...", "c++: error: ...", "x.cu(3): error: ...",
# "fatal error: ...", "nvcc fatal : ...", "ld: ... undefined reference". Not "-Werror=..." in a command line.
_DIAGNOSTIC = re.compile(r"\b(?:fatal error|error|fatal)\s*:|undefined reference|cannot find -l", re.IGNORECASE)


def first_error_line(message: str) -> str:
    """The line of a failed build's output that says what went wrong, not the command that ran.

    cpp_extension's exception starts with ninja's command lines; the compiler's own first
    diagnostic is what a user needs to read. Falls back to the first line.
    """
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    for line in lines:
        if _DIAGNOSTIC.search(line) and not line.startswith("Error building extension"):
            return line
    return lines[0] if lines else ""


@functools.lru_cache(maxsize=None)
def load() -> Optional[str]:
    """None once the extension's ops are registered, else why they cannot be (tried once)."""
    mode = _mode()
    if mode == "off":
        return "disabled by CAPSROUTING_EXTENSION=off"
    library = _installed_library() if mode == "auto" else None
    try:
        if library is not None:
            torch.ops.load_library(library)
        else:
            _compile_now()
    except Exception as exc:  # a broken build must leave the reference backend working
        how = "loading the installed C++ extension" if library else "compiling the C++ extension just in time"
        return f"{how} failed ({type(exc).__name__}: {first_error_line(str(exc))})"
    missing = [op for op in _OPS if not hasattr(torch.ops.capsrouting, op)]
    if missing:
        return f"the C++ extension loaded but lacks the ops {missing}; rebuild it"
    return None


def cpu_kernel_level() -> str:
    """Which instruction-set level the CPU kernels run at, and why, in one line (extension loaded).

    Raises RuntimeError, naming the variable, on a bad ``CAPSROUTING_CPU_ISA``.
    """
    level, runnable, native = torch.ops.capsrouting.cpu_isa()
    forced = os.environ.get("CAPSROUTING_CPU_ISA", "auto") not in ("", "auto")
    why = "forced by CAPSROUTING_CPU_ISA" if forced else "the best this CPU runs"
    line = f"{level} ({why}; levels this CPU runs: {', '.join(runnable)})"
    return line + (", built with -march=native" if native else "")


def has_cuda_kernels() -> bool:
    """Whether the loaded extension was compiled with its CUDA kernels."""
    return load() is None and torch._C._dispatch_has_kernel_for_dispatch_key("capsrouting::capsule_routing_ext", "CUDA")
