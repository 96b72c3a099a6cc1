"""Every Triton kernel variant the dispatch can launch compiles for sm_80 and sm_90 with no register spills.

Runs tests/triton_aot.py in a subprocess without TRITON_INTERPRET (the
interpreter replaces the compiler in the process that sets it) and prints its
per-variant table: registers, shared memory, spills.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")


def test_every_kernel_variant_compiles_without_spills(tmp_path):
    script = Path(__file__).with_name("triton_aot.py")
    report = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(script.parent.parent), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(script), "--arch", "80", "90", "--json", str(report)], env=env, capture_output=True, text=True, timeout=1200
    )
    print(proc.stdout)  # the per-variant table (pytest -s or -rA shows it)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(report.read_text())
    assert {r["arch"] for r in results} == {"sm_80", "sm_90"}
    kernels = {r["kernel"] for r in results}
    assert kernels == {"_routing_forward_kernel", "_routing_backward_reduce_kernel", "_routing_backward_inputs_kernel"}
    assert all(r["spill_bytes"] == 0 for r in results)
    # The paper's layer (J = 10, Dout = 16, Din = 8, float32) is among the compiled variants.
    from capsrouting.triton_backend import launch_config

    paper = launch_config(10, 16, 8, 4)
    assert any(r.get("BLOCK_K") == paper.BLOCK_K and r["BLOCK_J"] == paper.BLOCK_J and r["dtype"] == "fp32" for r in results)
