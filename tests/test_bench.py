"""The benchmark code runs (tiny shapes, nothing timed for real), so it cannot rot between GPU sessions."""
import json
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


def test_options_report_times_every_variant_on_every_backend_that_runs_it(tmp_path):
    _run([sys.executable, "-m", "bench.options", "--fast", "--repeats", "1", "--out-dir", str(tmp_path)])
    [record] = list(tmp_path.glob("*-options.json"))
    data = json.loads(record.read_text())
    from bench.cases import OPTION_VARIANTS

    for variant in OPTION_VARIANTS:  # the reference runs every variant; so does every fused backend listed
        assert {"reference"} <= {r["backend"] for r in data["records"] if r["variant"] == variant}
    assert all(r["forward"] > 0 and r["forward+backward"] > 0 for r in data["records"])
    assert "| options | backend |" in record.with_suffix(".md").read_text()


def test_cpu_speedup_times_every_batch_thread_count_and_kernel_path(tmp_path):
    out = tmp_path / "cpu.json"
    _run([sys.executable, "bench/cpu_speedup.py", "--fast", "--batch", "1", "3", "--threads", "1", "2", "--paths",
          "--repeats", "1", "--out", str(out)])
    records = json.loads(out.read_text())["records"]
    assert [(r["threads"], r["batch"]) for r in records] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    for r in records:
        assert set(r["results_ms"]) == {"reference", "compiled", "cpu", "cpu:small-batch", "cpu:batch"}
        assert all(r["results_ms"][b]["forward+backward"] > 0 for b in r["results_ms"])


def test_cpu_isa_times_every_level_and_another_build(tmp_path):
    import torch

    from capsrouting import _extension

    if _extension.load() is not None or _extension._installed_library() is None:
        pytest.skip("needs the extension built into the package (its library is timed again as another build)")
    out = tmp_path / "isa.json"
    library = _extension._installed_library()
    _run([sys.executable, "bench/cpu_isa.py", "--fast", "--rounds", "1", "--repeats", "1",
          "--library", f"again={library}", "--out", str(out)])
    record = json.loads(out.read_text())
    levels = list(torch.ops.capsrouting.cpu_isa()[1])
    assert list(record["median_ms"]) == levels + ["again"]
    assert record["columns"]["again"]["level"] == record["default_level"] == levels[-1]
    assert all(len(t) == 1 and min(t) > 0 for by_pass in record["rounds_ms"].values() for t in by_pass.values())
    assert "| again | " in out.with_suffix(".md").read_text() and "/" not in record["command"].split("again=")[1].split()[0]
