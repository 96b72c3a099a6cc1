"""Build script: the package, and its C++/CUDA extension compiled against the installed torch.

Install with ``pip install --no-build-isolation .`` so that torch is importable here. The
extension (capsrouting._C) is built with ninja when a C++ compiler is present; with CUDA
kernels when torch has CUDA and nvcc is found (switches in capsrouting/_build_config.py:
FORCE_CUDA, FORCE_ONLY_CPU, MAX_JOBS, CAPSROUTING_NATIVE, CAPSROUTING_CXXFLAGS). If it
cannot be built, the package installs without it and compiles it on first use instead.

The build is portable by default: a wheel runs on any CPU of its architecture (the CPU kernels
pick their instruction-set level at run time). A wheel also carries the C++/CUDA sources, as
capsrouting/csrc/, so that the just-in-time build can still run where its library cannot load
(another torch version, say).
"""
import os
import runpy
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def extension_build() -> dict:
    if os.environ.get("CAPSROUTING_SKIP_BUILD", "0") == "1":
        print("capsrouting: CAPSROUTING_SKIP_BUILD=1, the extension will be compiled on first use")
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "capsrouting: torch is not importable, so the C++ extension is not built now "
            "(install torch first and use --no-build-isolation); it will be compiled on first use"
        )
        return {}
    config = runpy.run_path(str(ROOT / "capsrouting" / "_build_config.py"))
    with_cuda = config["want_cuda"]()
    os.environ.setdefault("MAX_JOBS", config["default_max_jobs"]())
    extension = (CUDAExtension if with_cuda else CppExtension)(
        name="capsrouting._C",
        sources=[os.path.relpath(s, ROOT) for s in config["sources"](ROOT, with_cuda)],
        extra_compile_args={"cxx": config["cxx_flags"](), "nvcc": config["nvcc_flags"]()},
        extra_link_args=config["link_flags"](),
        define_macros=[("WITH_CUDA", None)] if with_cuda else [],
    )

    class OptionalBuildExtension(BuildExtension):
        """A failed compile leaves a working package: the extension is then compiled on first use."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                print(f"capsrouting: WARNING: building the C++ extension failed ({exc}); "
                      "it will be compiled on first use, or the reference backend runs")

    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


class BuildPyWithSources(build_py):
    """Copies csrc/ into the built package (wheels); an editable install reads it where it is."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            shutil.copytree(ROOT / "csrc", Path(self.build_lib) / "capsrouting" / "csrc", dirs_exist_ok=True)


def setup_arguments() -> dict:
    arguments = extension_build()
    arguments.setdefault("cmdclass", {})["build_py"] = BuildPyWithSources
    return arguments


setup(**setup_arguments())
