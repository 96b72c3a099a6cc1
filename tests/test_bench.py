"""The benchmark code runs (tiny shapes, nothing timed for real), so it cannot rot between GPU sessions."""
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _run(command, **kwargs):
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_benchmark_suite_runs_in_fast_mode():
    out = _run([sys.executable, "-m", "pytest", "bench", "--bench-fast", "--benchmark-disable", "-q", "-p", "no:cacheprovider"])
    assert " passed" in out and "failed" not in out


def test_report_writes_json_table_and_plots(tmp_path):
    _run([sys.executable, "-m", "bench.report", "--fast", "--repeats", "1", "--out-dir", str(tmp_path)])
    [record] = list(tmp_path.glob("*.json"))
    data = json.loads(record.read_text())
    assert data["device"] == ("cuda" if torch.cuda.is_available() else "cpu") and data["date"] and data["command"]
    backends = {r["backend"] for r in data["routing"]}
    assert {"reference", "compiled"} <= backends
    assert all(r["ms"] > 0 for r in data["routing"]) and all(t["images_per_second"] > 0 for t in data["training"])
    table = record.with_suffix(".md").read_text()
    assert "| shape (B, I, Din, J, Dout, R, dtype) |" in table and "images/s" in table
    for plot in ("time_vs_B", "time_vs_I", "speedup"):
        assert (tmp_path / f"{record.stem}-{plot}.png").stat().st_size > 1000


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, bench/gpu_suite.sh is the real run, not a test")
def test_gpu_suite_skips_cleanly_without_a_gpu():
    out = _run(["bash", "bench/gpu_suite.sh"], env=dict(os.environ))
    assert "gpu_suite: skipped: no CUDA device" in out


def test_gpu_suite_fails_when_a_stage_fails(tmp_path):
    """With a GPU claimed by a stand-in `python`, a failing `capsrouting.info` makes the suite exit non-zero."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "calls.log"
    # The stand-in answers the CUDA probe and the device name, fails capsrouting.info only.
    stand_in = f"""#!/usr/bin/env bash
echo "$(basename "$0") $*" >> {calls}
case "$*" in
    *capsrouting.info*) echo "self-check FAILED"; exit 1 ;;
    *get_device_name*) echo fake-gpu ;;
esac
exit 0
"""
    for name in ("python", "pip"):
        (fake_bin / name).write_text(stand_in)
        (fake_bin / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", CAPSROUTING_RESULTS_DIR=str(tmp_path / "results"))
    result = subprocess.run(["bash", "bench/gpu_suite.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0, result.stdout
    assert "stage 'capsrouting.info' failed (exit 1)" in result.stdout
    # Every stage still ran, and the report went to the results directory given.
    log = calls.read_text()
    assert "-m pytest" in log and f"--out-dir {tmp_path / 'results'}" in log and "pip install" in log
    assert (tmp_path / "results" / f"fake-gpu-{datetime.date.today()}-info.txt").exists()
