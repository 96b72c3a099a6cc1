"""The GPU playbook without a GPU: bench/gpu_suite.sh's dry run and errors, its skip, the
stage runner (bench/gpu.py) on stand-in stages, and bench/sanitize_kernels.py in Triton's
interpreter. The stages themselves run only on a GPU machine."""
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import gpu  # noqa: E402

EXPECTED_STAGES = ["check", "tests", "bench", "train", "affine-capsnet", "affine-baseline",
                   "data-efficiency-capsnet-small", "data-efficiency-capsnet-large", "data-efficiency-baseline",
                   "multimnist-capsnet", "multimnist-baseline"]


def suite(*args, env=None):
    environment = dict(os.environ if env is None else env)
    environment.pop("CAPSROUTING_RESULTS_DIR", None)
    return subprocess.run(["bash", "bench/gpu_suite.sh", *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=300)


def stage_blocks(text: str) -> dict:
    """The dry run's text per stage: from its 'stage NAME:' line to the next blank line."""
    blocks = {}
    for block in text.split("\n\n"):
        match = re.match(r"stage (\S+):", block)
        if match:
            blocks[match.group(1)] = block
    return blocks


def field(block: str, name: str) -> str:
    [line] = [line for line in block.splitlines() if line.startswith(f"  {name}:")]
    return line.split(":", 1)[1].strip()


def test_dry_run_shows_every_stage_with_its_commands_carry_and_minutes():
    result = suite("--dry-run")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    blocks = stage_blocks(result.stdout)
    assert list(blocks) == EXPECTED_STAGES == list(gpu.STAGES)
    for name, block in blocks.items():
        assert field(block, "run") == f"CAPSROUTING_RESULTS_DIR=$OUT bash bench/gpu_suite.sh {name}"
        minutes, stop = map(int, re.fullmatch(r"(\d+) minutes \(stopped cleanly at (\d+) minutes\)",
                                              field(block, "expected")).groups())
        assert 0 < minutes < 10 and minutes <= stop < 10, (name, minutes, stop)
        assert len(field(block, "returns").split(", ")) <= gpu.MAX_RETURNED_FILES
        assert field(block, "carry") in ("nothing", "data/mnist", "data/mnist (optional: its tests skip without it)")
    total = int(re.search(r"all 11 stages: about (\d+) minutes", result.stdout).group(1))
    assert total == sum(stage.minutes for stage in gpu.STAGES.values())

    check = blocks["check"]
    assert "FORCE_CUDA=1 python3 -m pip install --no-build-isolation --no-deps" in check
    assert "python3 -m capsrouting.info" in check
    for tool in ("memcheck", "racecheck"):
        assert re.search(rf"compute-sanitizer --tool {tool} .*python3 bench/sanitize_kernels.py", check), tool
    assert field(check, "carry") == "nothing" and field(blocks["bench"], "carry") == "nothing"
    assert "python3 -m pytest" in blocks["tests"] and "CAPSROUTING_REQUIRE_EXTENSION=1" in blocks["tests"]
    assert "python3 -m bench.report --out-dir" in blocks["bench"]
    assert "<gpu>-<date>-time_vs_B.png" in field(blocks["bench"], "returns")
    train = blocks["train"]
    assert re.search(r"CAPSROUTING_DATA=data/mnist python3 -m capsrouting.train .*--epochs \d+ --patience \d+", train)
    assert field(train, "carry") == "data/mnist" and "<gpu>-<date>-train-run.tar.gz" in field(train, "returns")
    # Every experiment, at the GPU preset, for both models.
    for experiment in ("affine", "data-efficiency", "multimnist"):
        for model in ("capsnet", "baseline"):
            assert any(re.search(rf"capsrouting.experiments {experiment} --preset gpu --models {model}\b", block)
                       and field(block, "carry") == "data/mnist" for block in blocks.values()), (experiment, model)


def test_dry_run_of_one_stage_shows_that_stage_alone():
    result = suite("--dry-run", "train")
    assert result.returncode == 0
    assert list(stage_blocks(result.stdout)) == ["train"]
    assert "all 11 stages" not in result.stdout


@pytest.mark.parametrize("args, message", [
    (["no-such-stage"], "unknown stage 'no-such-stage'; stages: check, tests, bench, train"),
    (["--dry-run", "no-such-stage"], "unknown stage 'no-such-stage'"),
    (["--no-such-option"], "unknown option '--no-such-option'"),
    (["check", "bench"], "one stage per command"),
    ([], "name a stage"),
])
def test_bad_usage_is_one_error_line(args, message):
    result = suite(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("gpu_suite: error: ") and message in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU a stage runs for real")
@pytest.mark.parametrize("stage", ["check", "train"])
def test_without_a_gpu_a_stage_skips_and_exits_0(tmp_path, stage):
    env = dict(os.environ)
    result = subprocess.run(["bash", "bench/gpu_suite.sh", stage], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(env, CAPSROUTING_RESULTS_DIR=str(tmp_path / "results")))
    assert result.returncode == 0, result.stderr
    assert f"gpu_suite: skipped stage {stage}: no CUDA device visible to torch" in result.stdout
    assert not (tmp_path / "results").exists()  # nothing was run, nothing written


def test_shell_script_parses():
    assert subprocess.run(["bash", "-n", "bench/gpu_suite.sh"], cwd=ROOT).returncode == 0
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", "bench/gpu_suite.sh"], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def test_every_stage_fits_a_command_and_its_folders_are_ignored():
    for stage in gpu.STAGES.values():
        assert stage.minutes * 60 <= gpu.DEFAULT_STAGE_SECONDS < gpu.COMMAND_LIMIT_MINUTES * 60, stage.name
        assert len(stage.returned_files()) <= gpu.MAX_RETURNED_FILES, stage.name
        if stage.run_dir:
            assert stage.run_dir.startswith(gpu.RUNS + "/"), stage.name
    # The MNIST folder travels only when carried, the run folders never: neither is committed.
    ignored = subprocess.run(["git", "check-ignore", f"{gpu.MNIST_DIR}/train-images-idx3-ubyte.gz",
                              f"{gpu.RUNS}/train/best.pt", gpu.STAMP_FILE], cwd=ROOT, capture_output=True, text=True)
    assert len(ignored.stdout.splitlines()) == 3, ignored.stdout + ignored.stderr


def test_readme_table_gives_every_stage_its_minutes():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## On a GPU: the playbook"):]
    table = {}
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip("|").split("|")] if row.startswith("| `") else []
        if cells:
            names, minutes = re.findall(r"`([a-z-]+)`", cells[0]), [int(m) for m in cells[-1].split(",")]
            assert len(names) == len(minutes), row
            table.update(zip(names, minutes))
    assert table == {name: stage.minutes for name, stage in gpu.STAGES.items()}
    assert f"About {sum(table.values())} minutes in all" in section


# ---------------------------------------------------------------------------------------------
# The runner, on stand-in stages of quick commands
# ---------------------------------------------------------------------------------------------

def py(code: str):
    return ("python3", "-c", code)


def run_fake(tmp_path, steps, **kwargs):
    stage = gpu.Stage("fake", "a stand-in stage", tuple(steps), **kwargs)
    code = gpu.run_stage(stage, tmp_path / "results", "Fake GPU 80GB", "torch x", deadline_seconds=60)
    stamp = f"fake-gpu-80gb-{datetime.date.today().isoformat()}"
    log = (tmp_path / "results" / f"{stamp}-fake.log").read_text()
    summary = json.loads((tmp_path / "results" / f"{stamp}-fake.json").read_text())
    return code, log, summary


def test_runner_logs_every_step_and_a_failing_step_fails_the_stage(tmp_path):
    code, log, summary = run_fake(tmp_path, [
        gpu.Step("says hello", py("print('hello from the step')"), seconds=1),
        gpu.Step("fails", py("import sys; sys.exit(3)"), seconds=1),
        gpu.Step("runs anyway", py("print('still ran')"), seconds=1),
    ])
    assert code == 1
    assert "hello from the step" in log and "still ran" in log and "step failed (exit 3)" in log
    assert [s["status"] for s in summary["steps"]] == ["passed", "failed", "passed"]
    assert summary["steps"][1]["exit"] == 3 and summary["passed"] is False
    assert summary["files"] == [f"fake-gpu-80gb-{datetime.date.today().isoformat()}-fake.{ext}" for ext in ("log", "json")]


def test_runner_passes_when_every_step_passes(tmp_path):
    code, _, summary = run_fake(tmp_path, [gpu.Step("fine", py("pass"), seconds=1)])
    assert code == 0 and summary["passed"] is True and summary["expected_minutes"] == 1


def test_runner_interrupts_a_step_at_the_deadline_and_keeps_the_time_of_the_next(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "MIN_STEP_SECONDS", 1)
    sleeper = "import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('interrupted cleanly')\n    raise"
    stage = gpu.Stage("fake", "a stand-in stage", (gpu.Step("sleeps", py(sleeper), seconds=1),
                                                   gpu.Step("after it", py("print('the next step ran')"), seconds=3)))
    code = gpu.run_stage(stage, tmp_path, "Fake GPU", deadline_seconds=6)
    log = next(tmp_path.glob("*-fake.log")).read_text()
    summary = json.loads(next(tmp_path.glob("*-fake.json")).read_text())
    assert code == 1
    assert [s["status"] for s in summary["steps"]] == ["stopped", "passed"]
    # It got the deadline less the next step's 3 s, and SIGINT reached it as KeyboardInterrupt.
    assert 2 <= summary["steps"][0]["seconds"] < 5
    assert "interrupted cleanly" in log and "stopped after" in log and "the next step ran" in log


def test_runner_skips_a_step_whose_package_or_program_is_missing(tmp_path):
    code, log, summary = run_fake(tmp_path, [
        gpu.Step("needs a package", py("print('must' + ' not run')"), seconds=1, modules=("no_such_package_for_gpu_suite",)),
        gpu.Step("needs a program", py("print('must' + ' not run')"), seconds=1, programs=("no-such-program-for-gpu-suite",)),
        gpu.Step("needs nothing", py("print('ran')"), seconds=1),
    ])
    assert code == 1
    assert [s["status"] for s in summary["steps"]] == ["skipped", "skipped", "passed"]
    assert "missing: no_such_package_for_gpu_suite" in log  # reported up front
    assert "missing Python package(s) no_such_package_for_gpu_suite" in summary["steps"][0]["reason"]
    assert "program(s) not found: no-such-program-for-gpu-suite" in summary["steps"][1]["reason"]
    assert "must not run" not in log


def test_runner_packs_the_run_directory_without_checkpoints(tmp_path, monkeypatch):
    root = tmp_path / "checkout"
    monkeypatch.setattr(gpu, "ROOT", root)
    run_dir = root / "runs" / "gpu" / "fake"
    (run_dir / "pictures").mkdir(parents=True)
    (run_dir / "best.pt").write_bytes(b"0" * 1000)
    (run_dir / "last.pt.tmp").write_bytes(b"0")
    (run_dir / "pictures" / "curves.png").write_bytes(b"png")
    epochs = [dict(epoch=e, val_error=v, test_error=t, images_per_second=5000.0) for e, v, t in
              [(1, 0.010, 0.012), (2, 0.006, 0.007), (3, 0.008, 0.006)]]
    (run_dir / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    code, log, summary = run_fake(tmp_path, [gpu.Step("nothing", py("pass"), seconds=1)], run_dir="runs/gpu/fake")
    assert code == 0
    [tarball] = (tmp_path / "results").glob("*-fake-run.tar.gz")
    with tarfile.open(tarball) as tar:
        names = sorted(m.name for m in tar.getmembers() if m.isfile())
    assert names == ["fake/log.jsonl", "fake/pictures/curves.png"]
    # The headline picks the epoch by validation error, never by test error.
    assert "best validation error 0.60% at epoch 2, its test error 0.70%" in log
    assert tarball.name in summary["files"]


def test_a_stage_needing_mnist_says_how_to_fill_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu, "ROOT", tmp_path)  # no data/mnist there
    monkeypatch.setattr(gpu, "gpu_name", lambda: ("Fake GPU", "torch x"))
    assert gpu.main(["train"]) == 2
    err = capsys.readouterr().err
    assert "stage train needs MNIST, and data/mnist/ lacks train-images-idx3-ubyte" in err
    assert "copy the four MNIST IDX files" in err and "name data/mnist in carry" in err
    # With the four files there, the stage would read them through CAPSROUTING_DATA.
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    for name in gpu.MNIST_FILES:
        (tmp_path / "data" / "mnist" / f"{name}.gz").write_bytes(b"")
    assert gpu.missing_mnist_files() == []
    _, env = gpu.step_command(gpu.STAGES["train"].steps[0], gpu.STAGES["train"], "python3", {}, present=lambda m: True)
    assert env == {"CAPSROUTING_DATA": str(tmp_path / "data" / "mnist")}


def test_build_is_skipped_only_for_the_same_sources_and_torch(tmp_path):
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "capsrouting").mkdir()
    (tmp_path / "csrc" / "cuda" / "kernels.cu").write_text("// v1")
    (tmp_path / "setup.py").write_text("")
    (tmp_path / "capsrouting" / "_build_config.py").write_text("")
    assert not gpu.extension_built(tmp_path, "2.11.0")
    (tmp_path / "capsrouting" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}").write_bytes(b"")
    (tmp_path / "build").mkdir()
    (tmp_path / gpu.STAMP_FILE).write_text(gpu.source_digest(tmp_path, "2.11.0"))
    assert gpu.extension_built(tmp_path, "2.11.0")
    assert not gpu.extension_built(tmp_path, "2.12.0")
    (tmp_path / "csrc" / "cuda" / "kernels.cu").write_text("// v2")
    assert not gpu.extension_built(tmp_path, "2.11.0")


# ---------------------------------------------------------------------------------------------
# bench/sanitize_kernels.py
# ---------------------------------------------------------------------------------------------

def test_sanitize_script_runs_the_triton_kernels_in_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "bench/sanitize_kernels.py", "--backend", "triton", "--device", "cpu",
                             "--case", "odd"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert sum(line.strip().startswith("ok: relative error") for line in lines) == 2  # both entry points
    assert any(line.startswith("triton capsule_routing odd") for line in lines)
    assert any(line.startswith("triton route") for line in lines)
    assert lines[-1] == "sanitize_kernels: all cases passed"


def test_sanitize_script_fails_when_a_backend_cannot_run():
    result = subprocess.run([sys.executable, "bench/sanitize_kernels.py", "--backend", "cuda", "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "cuda: UNAVAILABLE:" in result.stdout and "1 FAILED" in result.stdout
