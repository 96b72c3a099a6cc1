"""Every Triton kernel variant the dispatch can launch compiles with no register spills.

Runs tests/triton_aot.py in a subprocess without TRITON_INTERPRET (the
interpreter replaces the compiler in the process that sets it) and prints its
per-variant table: registers, shared memory, spills. Here for sm_80 with the
current Triton; tests/test_triton_oldest.py does sm_90 with the oldest supported
Triton (the one on the GPU machines this project is measured on), so each
architecture and each version is checked once within the suite's time. Both
architectures with one Triton: ``python tests/triton_aot.py --arch 80 90``.
"""
import pytest

pytest.importorskip("triton", reason="triton is not installed")

from triton_aot import KERNELS, compile_in_subprocess, variants  # noqa: E402


def assert_every_variant_compiled_without_spills(proc, results, archs):
    print(proc.stdout)  # the per-variant table (pytest -s or -rA shows it)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert {r["arch"] for r in results} == {f"sm_{a}" for a in archs}
    assert {r["kernel"] for r in results} == set(KERNELS)
    assert len(results) == len(archs) * len(list(variants()))
    assert all(r["spill_bytes"] == 0 for r in results)


def test_every_kernel_variant_compiles_without_spills(tmp_path):
    proc, results = compile_in_subprocess(tmp_path / "aot.json", archs=(80,))
    assert_every_variant_compiled_without_spills(proc, results, (80,))
    # The paper's layer (J = 10, Dout = 16, Din = 8, float32) is among the compiled variants.
    from capsrouting.triton_backend import launch_config

    paper = launch_config(10, 16, 8, 4)
    assert any(r.get("BLOCK_K") == paper.BLOCK_K and r["BLOCK_J"] == paper.BLOCK_J and r["dtype"] == "fp32" for r in results)
