"""python -m bench.gpu_check: its dry run, its step caps, its targets, and the whole check run on the CPU
(the same steps and files, a small layer) so that its logic is tested without a GPU."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_the_dry_run_shows_every_step_with_its_cap_and_the_cases(capsys):
    assert gpu_check.main(["--dry-run", "--results-dir", "out"]) == 0
    out = capsys.readouterr().out
    assert f"at most {gpu_check.TOTAL_SECONDS} s in all" in out
    assert "1. build the extension with its CUDA kernels (cap 150 s): FORCE_CUDA=1 " in out
    assert "2. capsrouting.info: versions, every backend's self-check (cap 60 s)" in out
    assert "3. the paper layer: every implementation, checked, timed, peak memory (cap 450 s)" in out
    # float32 and bfloat16 x 4 batch sizes x 2 passes x 5 implementations
    assert "step 3 measures 80 cases (float32, bfloat16 x B = 128, 32, 1, 512 x forward / forward+backward x " \
           "reference, triton, cuda, auto, compiled)" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the check would run")
def test_without_a_gpu_the_check_says_so_and_passes(capsys, tmp_path):
    assert gpu_check.main(["--results-dir", str(tmp_path)]) == 0
    assert "no CUDA device visible to torch" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_bad_arguments_get_one_line_and_status_2():
    for args in (["--impls", "triton", "--device", "cpu"], ["--batches", "0"], ["--dtypes", "float16"]):
        result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", *args], cwd=ROOT,
                                capture_output=True, text=True)
        assert result.returncode == 2, args
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


def test_a_step_past_its_cap_is_stopped_and_the_check_goes_on(tmp_path):
    python = sys.executable
    planned = [gpu_check.Step("sleeps", (python, "-c", "import time; time.sleep(60)"), cap=2),
               gpu_check.Step("quick", (python, "-c", "print('done')"), cap=20),
               gpu_check.Step("fails", (python, "-c", "raise SystemExit(3)"), cap=20),
               gpu_check.Step("sleeps on", (python, "-c", "import time; time.sleep(60)"), cap=60),
               gpu_check.Step("too late", (python, "-c", "print('never')"), cap=20)]
    began = time.monotonic()
    with (tmp_path / "log").open("w") as log:
        # 8 s in all: the fourth step gets what is left, the fifth nothing
        records = gpu_check.run_steps(planned, log, total_seconds=8, min_seconds=1)
    assert time.monotonic() - began < 8 + 5  # SIGINT ends a sleeping Python at once
    assert [r["status"] for r in records] == ["stopped at its cap", "passed", "failed (exit status 3)",
                                              "stopped at its cap", "not started: no time left"]
    assert 1.5 < records[0]["seconds"] < 4
    assert "done" in (tmp_path / "log").read_text()


def _row(B, pass_, impl, ms, peak=1.0, dtype="float32"):
    return dict(dtype=dtype, B=B, pass_=pass_, impl=impl, ms=ms, peak_MB=peak)


def test_targets_are_met_missed_or_not_measured_by_the_figures():
    rows = [_row(128, "forward", "reference", 10.0), _row(128, "forward", "compiled", 3.0),
            _row(128, "forward", "triton", 0.5), _row(128, "forward+backward", "reference", 30.0, peak=100.0),
            _row(128, "forward+backward", "compiled", 10.0), _row(128, "forward+backward", "triton", 6.0, peak=20.0),
            _row(1, "forward", "reference", 1.0), _row(1, "forward", "cuda", 2.0),
            _row(128, "forward", "cuda", 5.0), _row(1, "forward", "auto", 0.9)]
    found = {t["target"]: (t["status"], t["value"]) for t in gpu_check.targets(rows)}
    assert found["triton forward / torch.compile, B = 128, float32"] == ("met", 6.0)
    assert found["triton forward / eager, B = 128, float32"] == ("met", 20.0)
    assert found["triton forward+backward / torch.compile, B = 128, float32"] == ("missed", 1.667)
    assert found["triton forward+backward / eager, B = 128, float32"] == ("met", 5.0)
    assert found["triton peak memory / eager, forward+backward, B = 128, float32"] == ("missed", 0.2)
    assert found["cuda / eager at every B measured (the slowest)"] == ("missed", 0.5)  # slower at B = 1
    assert found["auto / eager at every B measured (the slowest)"] == ("met", 1.111)
    assert gpu_check.targets([])[0]["status"] == "not measured"


def test_the_whole_check_on_the_cpu_writes_its_table_and_json(tmp_path, monkeypatch, capsys):
    # The self-check step without the Triton interpreter (slow, and not what this test is about).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = ["--device", "cpu", "--no-build", "--results-dir", str(tmp_path), "--batches", "3", "--dtypes", "float32",
            "--impls", "reference", "cpu", "auto", "--layer", "37", "8", "10", "16", "3"]
    assert gpu_check.main(args) == 0
    out = capsys.readouterr().out
    [report] = tmp_path.glob("cpu-*-check.json")
    [markdown] = tmp_path.glob("cpu-*-check.md")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([report.name, markdown.name, report.name[:-4] + "log"])
    result = json.loads(report.read_text())
    assert [s["status"] for s in result["steps"]] == ["passed", "passed"]
    rows = {(r["B"], r["pass_"], r["impl"]): r for r in result["measurements"]}
    assert set(rows) == {(3, p, i) for p in ("forward", "forward+backward") for i in ("reference", "cpu", "auto")}
    assert all(r["ms"] > 0 and "error" not in r for r in rows.values())
    assert "| float32 | 3 | forward+backward | cpu |" in markdown.read_text()
    assert out.rstrip().endswith(markdown.read_text().rstrip().splitlines()[-1])  # the table (and targets) last
    statuses = {t["target"].split(" ")[0]: t["status"] for t in result["targets"]}
    assert statuses["triton"] == statuses["cuda"] == "not measured"  # neither runs on a CPU
    assert statuses["auto"] in ("met", "missed")
