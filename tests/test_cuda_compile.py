"""The extension's CUDA kernels compile with nvcc for sm_80 and sm_90 without register spills."""
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _nvcc_reason():
    try:
        sys.path.insert(0, str(HERE))
        from cuda_compile import nvcc

        nvcc()
    except FileNotFoundError as exc:
        return str(exc)
    finally:
        sys.path.remove(str(HERE))
    return None


@pytest.mark.skipif(_nvcc_reason() is not None, reason=f"{_nvcc_reason()}")
def test_cuda_kernels_compile_for_sm80_sm90_without_spills():
    result = subprocess.run([sys.executable, str(HERE / "cuda_compile.py"), "--arch", "80", "90"], capture_output=True, text=True)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    # 3 kernels x 4 dtypes x 2 instantiations (plain: every option compiled out; options) x 2 architectures
    assert "48 kernels, 0 with spills" in result.stdout
    for arch in ("sm_80", "sm_90"):
        for kernel in ("forward_kernel", "backward_reduce_kernel", "backward_inputs_kernel"):
            for dtype in ("float16", "bfloat16", "float32", "float64"):
                for instantiation in ("plain", "options"):
                    assert f"{arch}  {kernel}<{dtype}, {instantiation}> " in result.stdout, (arch, kernel, dtype, instantiation)
