"""The GPU playbook behind ``bash bench/gpu_suite.sh``: the GPU work cut into stages of one command each.

    bash bench/gpu_suite.sh --dry-run [STAGE]   each stage's commands, what must travel, expected minutes
    bash bench/gpu_suite.sh STAGE               run one stage (without a GPU: says so and exits 0)

Made for a lent GPU machine that runs one command at a time for at most 10 minutes, starts
bare (nothing built or installed by an earlier command is there, unless the machine was kept
warm), receives the checkout plus a few ignored folders named to travel with it ("carry"),
and returns at most 8 files from the folder its command writes to. So every stage:

* ends well inside 10 minutes: the stage has a deadline (CAPSROUTING_STAGE_SECONDS, default
  540 s) and its long step is interrupted cleanly (SIGINT) when the deadline nears, keeping
  the time the steps after it need; what it wrote so far is kept;
* builds the extension itself when it needs it (skipped when this machine already holds a
  build of the same sources), and reads MNIST from ``data/mnist/`` (ignored by git: copy the
  four IDX files there and name the folder among those that travel);
* writes at most 8 small files to CAPSROUTING_RESULTS_DIR (default bench/results/), named
  ``<gpu>-<date>-<stage>.*``: the log of every step, a JSON summary (each step's command,
  exit status and seconds: the estimates below are guesses until these replace them) and, for
  training stages, the run directory without its checkpoints as a .tar.gz. Run directories
  stay under runs/gpu/, so a stage interrupted at its deadline continues where it stopped
  when started again on the same (still warm) machine.

Exit status: 0 when every step passed (or no GPU is visible: nothing to do), 1 when a step
failed, was skipped for a missing package or program, or was stopped at the deadline, 2 for
bad usage or missing MNIST files.
"""
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
MNIST_DIR = "data/mnist"  # relative to ROOT; ignored by git, travels when named in carry
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
RUNS = "runs/gpu"  # run directories of the training stages (ignored by git)
COMMAND_LIMIT_MINUTES = 10  # what a lent machine allows one command
MAX_RETURNED_FILES = 8  # what it sends back
DEFAULT_STAGE_SECONDS = 540  # the deadline: a minute of margin for start-up and packing
GRACE_SECONDS = 20  # after SIGINT, before SIGKILL
MIN_STEP_SECONDS = 10  # a step given less time than this before the deadline is not started
STAMP_FILE = "build/gpu_suite-extension.sha256"  # which sources the in-place build was made from
PACKAGES = {"xdist": "pytest-xdist", "pytest_timeout": "pytest-timeout"}  # import name -> package name, where they differ


@dataclasses.dataclass(frozen=True)
class Step:
    title: str
    argv: Tuple[str, ...]  # "python3" is this interpreter; "{results}" and "{stamp}" are filled in
    seconds: int  # expected on one H100 from a bare machine (a guess until measured)
    env: Tuple[Tuple[str, str], ...] = ()
    modules: Tuple[str, ...] = ()  # Python packages it cannot run without
    uses: Tuple[str, ...] = ()  # packages some of it needs: missing ones are reported, the step runs
    programs: Tuple[str, ...] = ()  # executables it cannot run without
    optional_args: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()  # (module, args added when it is installed)
    build: bool = False  # the extension build: skipped when up to date; later steps rely on it


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    what: str
    steps: Tuple[Step, ...]
    mnist: str = ""  # "required", "optional" (used when present) or "" (not read)
    run_dir: Optional[str] = None  # packed without checkpoints into <stamp>-<stage>-run.tar.gz
    report_files: Tuple[str, ...] = ()  # files the step commands themselves write to the results directory

    @property
    def minutes(self) -> int:
        return math.ceil(sum(step.seconds for step in self.steps) / 60)

    def returned_files(self) -> List[str]:
        files = [f"{{stamp}}-{self.name}.log", f"{{stamp}}-{self.name}.json", *self.report_files]
        if self.run_dir:
            files.append(f"{{stamp}}-{self.name}-run.tar.gz")
        return files


BUILD = Step("build the extension with its CUDA kernels (skipped when this machine holds a build of these sources)",
             ("python3", "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."),
             seconds=150, env=(("FORCE_CUDA", "1"),), modules=("pip", "setuptools"), uses=("ninja",), build=True)


def _sanitizer(tool: str, seconds: int) -> Step:
    # Without PyTorch's caching allocator every tensor is its own cudaMalloc, so an access past
    # a tensor's end is outside any allocation, where memcheck sees it.
    return Step(f"compute-sanitizer {tool}: both backends' kernels, forward and backward of both entry points",
                ("compute-sanitizer", "--tool", tool, "--error-exitcode", "1", "--target-processes", "application-only",
                 "python3", "bench/sanitize_kernels.py"),
                seconds=seconds, env=(("PYTORCH_NO_CUDA_MEMORY_CACHING", "1"),), uses=("triton",),
                programs=("compute-sanitizer",))


def _train_stage() -> Stage:
    out = f"{RUNS}/train"
    return Stage(
        "train", "CapsNet on MNIST, bfloat16 autocast, the Triton kernels: up to 20 epochs, stopping after 5 "
                 "without a better validation error; then its curves and the pictures of its best epoch",
        (Step("train CapsNet (resumes from the last epoch when run again on the same machine)",
              ("python3", "-m", "capsrouting.train", "--out-dir", out, "--epochs", "20", "--patience", "5",
               "--amp", "bf16", "--backend", "triton", "--resume", "--no-progress"), seconds=330, modules=("tqdm",)),
         Step("training curves", ("python3", "-m", "capsrouting.evaluate", "--curves", out), seconds=20,
              modules=("matplotlib",)),
         Step("test error and pictures of the best epoch",
              ("python3", "-m", "capsrouting.evaluate", f"{out}/best.pt", "--pictures", f"{out}/pictures"), seconds=40,
              modules=("matplotlib",))),
        mnist="required", run_dir=out)


def _experiment(name: str, experiment: str, models: str, seconds: int, what: str, extra: Tuple[str, ...] = ()) -> Stage:
    out = f"{RUNS}/{name}"
    argv = ("python3", "-m", "capsrouting.experiments", experiment, "--preset", "gpu", "--models", models,
            *(("--backend", "triton") if models == "capsnet" else ()), *extra, "--out-dir", out)
    return Stage(name, what, (Step(f"{experiment} experiment, {models} (resumes its runs when run again on the same machine)",
                                   argv, seconds=seconds, uses=("matplotlib",)),),
                 mnist="required", run_dir=out)


STAGES: Dict[str, Stage] = {stage.name: stage for stage in [
    Stage("check", "build the extension with CUDA; capsrouting.info (versions, every backend's self-check, speed); "
                   "every kernel once without and then under compute-sanitizer memcheck and racecheck",
          (BUILD,
           Step("capsrouting.info", ("python3", "-m", "capsrouting.info"), seconds=60),
           Step("the kernels once, unsanitized: values against the float64 reference (and the Triton cache warmed)",
                ("python3", "bench/sanitize_kernels.py"), seconds=40, uses=("triton",)),
           _sanitizer("memcheck", 90),
           _sanitizer("racecheck", 90))),
    Stage("tests", "build the extension with CUDA; the whole test suite, every backend on CUDA "
                   "(the MNIST tests too when data/mnist travels)",
          (BUILD,
           Step("test suite",
                ("python3", "-m", "pytest", "-ra", "--durations=25", "--continue-on-collection-errors",
                 "--junitxml={results}/{stamp}-tests.xml"),
                seconds=300, env=(("CAPSROUTING_REQUIRE_EXTENSION", "1"),), modules=("pytest",),
                uses=("hypothesis", "scipy", "matplotlib", "tensorboard", "triton"),
                optional_args=(("xdist", ("-n", "4", "--dist", "loadfile")), ("pytest_timeout", ("--timeout", "300"))))),
          mnist="optional", report_files=("{stamp}-tests.xml",)),
    Stage("bench", "build the extension with CUDA; the benchmark report (every backend against the eager "
                   "reference and torch.compile, peak memory, training images/s)",
          (BUILD,
           Step("benchmark report", ("python3", "-m", "bench.report", "--out-dir", "{results}"), seconds=330,
                uses=("matplotlib",))),
          report_files=("{stamp}.json", "{stamp}.md", "{stamp}-time_vs_B.png", "{stamp}-time_vs_I.png",
                        "{stamp}-speedup.png")),
    _train_stage(),
    _experiment("affine-capsnet", "affine", "capsnet", 270,
                "affine robustness, CapsNet on the 40x40 canvas (--preset gpu: up to 6000 steps of 128)"),
    _experiment("affine-baseline", "affine", "baseline", 180,
                "affine robustness, the CNN baseline on the 40x40 canvas (--preset gpu)"),
    _experiment("data-efficiency-capsnet-small", "data-efficiency", "capsnet", 240,
                "data efficiency, CapsNet on 100 and 300 training images, 3 seeds each (--preset gpu: 2000 steps a run)",
                ("--sizes", "100,300")),
    _experiment("data-efficiency-capsnet-large", "data-efficiency", "capsnet", 240,
                "data efficiency, CapsNet on 1000 (3 seeds), 3000, 10000 and all training images (--preset gpu)",
                ("--sizes", "1000,3000,10000,all")),
    _experiment("data-efficiency-baseline", "data-efficiency", "baseline", 270,
                "data efficiency, the CNN baseline on every size of --preset gpu"),
    _experiment("multimnist-capsnet", "multimnist", "capsnet", 330,
                "MultiMNIST, CapsNet (--preset gpu: 10000 steps of 128 overlapping pairs)"),
    _experiment("multimnist-baseline", "multimnist", "baseline", 210,
                "MultiMNIST, the CNN baseline (--preset gpu)"),
]}


def python_command() -> str:
    """What runs the steps: "python3" when that is this interpreter (as bench/gpu_suite.sh starts
    it), else this interpreter's path, so that every step sees the same packages."""
    found = shutil.which("python3")
    if found and os.path.abspath(found) == os.path.abspath(sys.executable):
        return "python3"
    return sys.executable


def mnist_env(stage: Stage, absolute: bool) -> Dict[str, str]:
    """CAPSROUTING_DATA for the stages that read MNIST: absolute when run (tests run commands
    in other folders), relative to the checkout when shown."""
    if not absolute and stage.mnist:
        return {"CAPSROUTING_DATA": MNIST_DIR}
    if stage.mnist == "required" or (stage.mnist == "optional" and not missing_mnist_files()):
        return {"CAPSROUTING_DATA": str(ROOT / MNIST_DIR)}
    return {}


def missing_mnist_files() -> List[str]:
    folder = ROOT / MNIST_DIR
    return [name for name in MNIST_FILES if not (folder / name).is_file() and not (folder / f"{name}.gz").is_file()]


def step_command(step: Step, stage: Stage, python: str, fill: Dict[str, str], present=None) -> Tuple[List[str], Dict[str, str]]:
    """(argv, extra environment) of a step. ``present(module)`` says which optional
    packages are installed (None: all, as the dry run shows it)."""
    argv = [python if a == "python3" else a.format(**fill) for a in step.argv]
    for module, args in step.optional_args:
        if present is None or present(module):
            argv += list(args)
    data = {} if step.build else mnist_env(stage, absolute=present is not None)
    return argv, {**data, **dict(step.env)}


def shell_text(argv: List[str], env: Dict[str, str]) -> str:
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.quote(a) for a in argv])


# ---------------------------------------------------------------------------------------------
# The dry run
# ---------------------------------------------------------------------------------------------

def dry_run(names: List[str]) -> str:
    fill = dict(results="<results>", stamp="<gpu>-<date>")
    python = python_command()
    lines = ["gpu_suite: dry run (nothing is run). One stage per command, each well inside a lent machine's "
             f"{COMMAND_LIMIT_MINUTES}-minute limit; its files go to $CAPSROUTING_RESULTS_DIR (else bench/results/), "
             f"at most {MAX_RETURNED_FILES} a stage. Minutes are guesses for one H100 from a bare machine, until "
             "measured (each stage's .json records its real seconds).", ""]
    for name in names:
        stage = STAGES[name]
        carry = MNIST_DIR if stage.mnist == "required" else (
            f"{MNIST_DIR} (optional: its tests skip without it)" if stage.mnist == "optional" else "nothing")
        lines += [f"stage {name}: {stage.what}",
                  f"  run:      CAPSROUTING_RESULTS_DIR=$OUT bash bench/gpu_suite.sh {name}",
                  f"  carry:    {carry}",
                  f"  expected: {stage.minutes} minutes (stopped cleanly at {stage_seconds() // 60} minutes)",
                  "  commands:"]
        for step in stage.steps:
            argv, env = step_command(step, stage, python, fill)
            lines.append(f"    {shell_text(argv, env)}")
            notes = (["skipped when this machine already holds a build of these sources"] if step.build else []) + \
                    [f"{' '.join(args)} only when {PACKAGES.get(module, module)} is installed" for module, args in step.optional_args] + \
                    ([f"CAPSROUTING_DATA only when {MNIST_DIR} holds the files"] if stage.mnist == "optional" and not step.build else [])
            if notes:
                lines.append(f"      ({'; '.join(notes)})")
        lines.append(f"  returns:  {', '.join(f.format(**fill) for f in stage.returned_files())} "
                     f"(in <results>)")
        lines.append("")
    needing = [n for n in names if STAGES[n].mnist == "required"]
    if needing and missing_mnist_files():
        lines += [f"note: {MNIST_DIR}/ lacks MNIST files here: before running {', '.join(needing)}, {how_to_fill_mnist()}.", ""]
    if len(names) > 1:
        total = sum(STAGES[n].minutes for n in names)
        lines.append(f"all {len(names)} stages: about {total} minutes of commands, more than one session's GPU time "
                     "(15 to 30 minutes so far): spread them over several sessions, in the order above.")
    return "\n".join(lines).rstrip() + "\n"


def how_to_fill_mnist() -> str:
    return (f"copy the four MNIST IDX files ({', '.join(f + '.gz' for f in MNIST_FILES)}) into {MNIST_DIR}/ "
            f"(ignored by git) and name {MNIST_DIR} in carry, so that it travels with the checkout")


def stage_seconds() -> int:
    return int(os.environ.get("CAPSROUTING_STAGE_SECONDS", DEFAULT_STAGE_SECONDS))


# ---------------------------------------------------------------------------------------------
# Running a stage
# ---------------------------------------------------------------------------------------------

def gpu_name() -> Tuple[Optional[str], str]:
    """(the visible GPU's name or None, a line on torch and CUDA). Asked in a child process, so
    that this one holds no CUDA context while the steps run."""
    probe = ("import json, torch; print(json.dumps([torch.cuda.get_device_name() if torch.cuda.is_available() else None, "
             "f'torch {torch.__version__}, CUDA {torch.version.cuda or \"none\"}']))")
    result = subprocess.run([python_command(), "-c", probe], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"torch does not import: {last}"
    name, about = json.loads(result.stdout.strip().splitlines()[-1])
    return name, about


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def source_digest(root: Path, torch_version: str) -> str:
    """Digest of what the extension is built from (and the torch it is built against)."""
    digest = hashlib.sha256(torch_version.encode())
    paths = sorted(p for p in (root / "csrc").rglob("*") if p.is_file())
    for path in paths + [root / "setup.py", root / "capsrouting" / "_build_config.py"]:
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def extension_built(root: Path, torch_version: str) -> bool:
    """Whether root holds an in-place build of these sources for this Python (a warm machine)."""
    stamp = root / STAMP_FILE
    library = root / "capsrouting" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    return library.is_file() and stamp.is_file() and stamp.read_text().strip() == source_digest(root, torch_version)


def find_program(name: str) -> Optional[str]:
    """An executable on PATH, else in the CUDA toolkit's bin (often not on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / name).is_file():
            return str(Path(home) / "bin" / name)
    return None


def module_present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _default_sigint() -> None:
    """In the child, before it runs: SIGINT back to its default. A shell starts background jobs
    (``nohup ... &``) with SIGINT ignored, children inherit that, and Python then never raises
    KeyboardInterrupt: the step would run on to SIGKILL and lose its summary."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_command(argv: List[str], env: Dict[str, str], log, limit: float) -> Tuple[int, bool]:
    """Run argv in ROOT, its output shown and logged; interrupt it (SIGINT to its process group,
    then SIGKILL) after ``limit`` seconds. Returns (exit status, stopped at the limit)."""
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True, preexec_fn=_default_sigint)

    def copy():  # in a thread, so that the main thread can keep the deadline
        for raw in iter(process.stdout.readline, b""):
            text = raw.decode(errors="replace")
            sys.stdout.write(text)
            sys.stdout.flush()
            log.write(text)
            log.flush()

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    stopped = False
    try:
        code = process.wait(timeout=max(limit, 0.1))
    except subprocess.TimeoutExpired:
        # SIGINT: Python raises KeyboardInterrupt and pytest prints its summary; files written so far stay.
        stopped = True
        os.killpg(process.pid, signal.SIGINT)
        try:
            code = process.wait(timeout=GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
    reader.join(timeout=5)
    return code, stopped


def pack_run_dir(run_dir: Path, tarball: Path) -> List[str]:
    """run_dir as a .tar.gz without checkpoints (*.pt are large, and come back from no lent machine)."""
    packed = []

    def keep(info: tarfile.TarInfo):
        if info.isfile() and (info.name.endswith(".pt") or info.name.endswith(".tmp")):
            return None
        if info.isfile():
            packed.append(info.name)
        return info

    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(run_dir, arcname=run_dir.name, filter=keep)
    return packed


def headline(stage: Stage) -> str:
    """What a run directory says in a few lines: an experiment's table, or a training run's best epoch."""
    if not stage.run_dir:
        return ""
    run_dir = ROOT / stage.run_dir
    if (run_dir / "table.md").is_file():
        return (run_dir / "table.md").read_text()
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return ""
    epochs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    epochs = [e for e in epochs if "epoch" in e]
    if not epochs:
        return ""
    lines = [f"{len(epochs)} epochs, {epochs[-1]['images_per_second']:.0f} images/s in the last"]
    chosen = [e for e in epochs if e.get("val_error") is not None]
    if chosen:
        best = min(chosen, key=lambda e: e["val_error"])
        lines.append(f"best validation error {100 * best['val_error']:.2f}% at epoch {best['epoch']}, "
                     f"its test error {100 * best['test_error']:.2f}%")
    lines.append(f"last epoch's test error {100 * epochs[-1]['test_error']:.2f}%")
    return "\n".join(lines) + "\n"


def run_stage(stage: Stage, results: Path, gpu: str, about: str = "", deadline_seconds: Optional[float] = None) -> int:
    """Run every step of ``stage``; write its log, summary and packed run directory to ``results``."""
    started = time.monotonic()
    deadline = started + (stage_seconds() if deadline_seconds is None else deadline_seconds)
    results.mkdir(parents=True, exist_ok=True)
    stamp = f"{slug(gpu)}-{datetime.date.today().isoformat()}"
    fill = dict(results=str(results), stamp=stamp)
    python = python_command()
    log_path = results / f"{stamp}-{stage.name}.log"
    records, extension_ok = [], True
    with log_path.open("w") as log:
        def say(text: str) -> None:
            print(text, flush=True)
            log.write(text + "\n")
            log.flush()

        say(f"gpu_suite: stage {stage.name} on {gpu} ({about}): {stage.what}")
        wanted = sorted({m for s in stage.steps for m in s.modules + s.uses + tuple(a for a, _ in s.optional_args)})
        missing = [m for m in wanted if not module_present(m)]
        say(f"gpu_suite: Python packages used: {', '.join(wanted) or 'none'}; missing: {', '.join(missing) or 'none'}")
        if stage.mnist == "optional" and missing_mnist_files():
            say(f"gpu_suite: {MNIST_DIR}/ holds no MNIST files: the tests that need them skip")
        for index, step in enumerate(stage.steps):
            argv, extra = step_command(step, stage, python, fill, present=module_present)
            env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
            if not extension_ok:  # no just-in-time build of a failed one: it would take the time of the rest
                env["CAPSROUTING_EXTENSION"] = "off"
            record = dict(step=step.title, command=shell_text(argv, extra), expected_seconds=step.seconds)
            records.append(record)
            say(f"\n== {step.title}\n$ {record['command']}")
            limit = deadline - time.monotonic() - sum(s.seconds for s in stage.steps[index + 1:])
            lacking = [m for m in step.modules if not module_present(m)]
            programs = {p: find_program(p) for p in step.programs}
            absent = [p for p, where in programs.items() if where is None]
            torch_version = _torch_version() if step.build else ""
            why_not = None
            if lacking:
                why_not = (f"missing Python package(s) {', '.join(lacking)}: nothing can be installed on a machine without "
                           "a package index; carry their wheels and install them with pip --no-index first")
            elif absent:
                why_not = f"program(s) not found: {', '.join(absent)} (not on PATH, nor in the CUDA toolkit's bin)"
            elif limit < MIN_STEP_SECONDS:
                why_not = "no time left before the stage's deadline"
            if why_not:
                record.update(status="skipped", reason=why_not, seconds=0)
                say(f"gpu_suite: skipped: {why_not}")
                extension_ok = extension_ok and not step.build
                continue
            if step.build and extension_built(ROOT, torch_version):
                record.update(status="passed", reason="this machine holds a build of these sources", seconds=0)
                say("gpu_suite: already built from these sources on this machine: not built again")
                continue
            for program, where in programs.items():  # a program found outside PATH: its folder goes first
                if where != shutil.which(program):
                    env["PATH"] = f"{Path(where).parent}{os.pathsep}{env.get('PATH', '')}"
            begun = time.monotonic()
            code, stopped = run_command(argv, env, log, limit)
            seconds = round(time.monotonic() - begun, 1)
            status = "stopped" if stopped else ("passed" if code == 0 else "failed")
            record.update(status=status, exit=code, seconds=seconds)
            if stopped:
                say(f"gpu_suite: stopped after {seconds:.0f} s to keep the stage's deadline; what it wrote is kept")
            elif code != 0:
                say(f"gpu_suite: step failed (exit {code}) after {seconds:.0f} s")
            if step.build:
                extension_ok = code == 0 and not stopped
                if extension_ok:
                    (ROOT / STAMP_FILE).parent.mkdir(parents=True, exist_ok=True)
                    (ROOT / STAMP_FILE).write_text(source_digest(ROOT, torch_version) + "\n")
                else:
                    say("gpu_suite: the steps after a failed build run with CAPSROUTING_EXTENSION=off")

        files = [log_path]
        if stage.run_dir and (ROOT / stage.run_dir).is_dir():
            tarball = results / f"{stamp}-{stage.name}-run.tar.gz"
            packed = pack_run_dir(ROOT / stage.run_dir, tarball)
            files.append(tarball)
            say(f"\ngpu_suite: packed {len(packed)} files of {stage.run_dir} (checkpoints left out) into {tarball}")
            if tarball.stat().st_size > 16 * 2**20:
                say(f"gpu_suite: WARNING: {tarball.name} is over 16 MiB: a lent machine does not send it back")
        summary_text = headline(stage)
        if summary_text:
            say("\n" + summary_text.rstrip())

        elapsed = round(time.monotonic() - started, 1)
        passed = all(r["status"] == "passed" for r in records)
        summary_path = results / f"{stamp}-{stage.name}.json"
        files += [summary_path] + [results / f.format(**fill) for f in stage.report_files if (results / f.format(**fill)).exists()]
        summary = dict(stage=stage.name, gpu=gpu, about=about, date=datetime.date.today().isoformat(), passed=passed,
                       seconds=elapsed, expected_minutes=stage.minutes, steps=records, headline=summary_text,
                       files=[f.name for f in files])
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        say(f"\ngpu_suite: stage {stage.name}: {'PASSED' if passed else 'NOT PASSED'} in {elapsed:.0f} s "
            f"(expected {stage.minutes} min)")
        for r in records:
            say(f"  {r['status']:8s} {r.get('seconds', 0):6.0f} s  {r['step']}")
        say(f"gpu_suite: files: {', '.join(str(f) for f in files)}")
    return 0 if passed else 1


def _torch_version() -> str:
    result = subprocess.run([python_command(), "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    return result.stdout.strip() or "none"


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

USAGE = "usage: bash bench/gpu_suite.sh [--dry-run] STAGE, or --dry-run alone for every stage"


def fail(message: str) -> int:
    print(f"gpu_suite: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\n" + USAGE + f"\nstages: {', '.join(STAGES)}")
        return 0
    dry = "--dry-run" in argv
    rest = [a for a in argv if a != "--dry-run"]
    options = [a for a in rest if a.startswith("-")]
    if options:
        return fail(f"unknown option {options[0]!r}; {USAGE}")
    if len(rest) > 1:
        return fail(f"one stage per command (a lent machine runs a command for at most {COMMAND_LIMIT_MINUTES} minutes), "
                    f"got {' '.join(rest)}")
    if rest and rest[0] not in STAGES:
        return fail(f"unknown stage {rest[0]!r}; stages: {', '.join(STAGES)}")
    if dry:
        sys.stdout.write(dry_run(rest or list(STAGES)))
        return 0
    if not rest:
        return fail(f"name a stage ({', '.join(STAGES)}), or --dry-run to see them all")
    stage = STAGES[rest[0]]
    gpu, about = gpu_name()
    if gpu is None:
        print(f"gpu_suite: skipped stage {stage.name}: no CUDA device visible to torch ({about}); "
              f"nothing to do here (bash bench/gpu_suite.sh --dry-run {stage.name} shows what it would run)")
        return 0
    if stage.mnist == "required" and missing_mnist_files():
        print(f"gpu_suite: stage {stage.name} needs MNIST, and {MNIST_DIR}/ lacks "
              f"{', '.join(missing_mnist_files())} (or .gz): {how_to_fill_mnist()}", file=sys.stderr)
        return 2
    results = Path(os.environ.get("CAPSROUTING_RESULTS_DIR") or ROOT / "bench" / "results")
    return run_stage(stage, results.resolve(), gpu, about)


if __name__ == "__main__":
    sys.exit(main())
