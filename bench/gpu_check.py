"""``python -m bench.gpu_check --results-dir DIR``: the one prepared check of a machine with a GPU.

On a bare machine with a GPU, torch and Triton installed and no package index, in at most
8 minutes (``--seconds``: 450 s of steps by default), three steps, each with its own time cap; the check ends on time with
what it has:

1. build the extension with its CUDA kernels in place (skipped when this checkout already holds a
   build of these sources);
2. ``python -m capsrouting.info --no-timing``: versions and every backend's self-check;
3. the paper layer (I = 1152, Din = 8 -> J = 10, Dout = 16, R = 3) at B = 1, 32, 128, 512, float32
   and bfloat16, forward and forward+backward: the eager reference, ``torch.compile`` of it,
   ``triton`` (each of its candidate configurations and the one it chooses itself), ``cuda`` and
   ``auto`` (and what it chose); each checked against the eager reference, then timed (median) with
   its peak memory. The most telling cases (float32, B = 128) come first, so a cut-short run has them.

Writes ``DIR/<gpu>-<date>-check.json`` (every measurement, the steps, versions, the targets) and
``DIR/<gpu>-<date>-check.md`` (the table), and prints the table last. ``--dry-run`` shows the
steps, their caps and the cases without running anything (no GPU needed). Without a GPU the check
says so and exits 0. Exit status 1 when a step failed or was stopped at its cap.
"""
import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from bench import gpu

ROOT = gpu.ROOT
# The whole check: 7.5 minutes of steps, then at most a stopped step's grace period and the report: within 8.
TOTAL_SECONDS = 450
BATCHES = (128, 32, 1, 512)  # measured in this order: the paper's training batch first
DTYPES = ("float32", "bfloat16")
PASSES = ("forward", "forward+backward")
PAPER_LAYER = dict(I=1152, Din=8, J=10, Dout=16, R=3)
# The implementations measured on a device, in order (triton's candidate configurations follow "triton").
IMPLS = {"cuda": ("reference", "triton", "cuda", "auto", "compiled"), "cpu": ("reference", "cpu", "auto", "compiled")}
REPEATS = 10


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    argv: Sequence[str]
    cap: int  # seconds; the last step gets what is left of the total instead, when that is less
    env: Dict[str, str] = dataclasses.field(default_factory=dict)


def steps(results: Path, measure_args: Sequence[str], build: bool = True) -> List[Step]:
    python = sys.executable
    planned = []
    if build:
        planned.append(Step("build the extension with its CUDA kernels",
                            (python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."),
                            cap=150, env={"FORCE_CUDA": "1"}))
    planned.append(Step("capsrouting.info: versions, every backend's self-check", (python, "-m", "capsrouting.info",
                                                                                     "--no-timing"), cap=60))
    planned.append(Step("the paper layer: every implementation, checked, timed, peak memory",
                        (python, "-m", "bench.gpu_check", "--measure", str(results), *measure_args), cap=TOTAL_SECONDS))
    return planned


def run_steps(planned: Sequence[Step], log, total_seconds: float, min_seconds: float = gpu.MIN_STEP_SECONDS) -> List[dict]:
    """Run each step within its cap and within what is left of ``total_seconds`` (not started when less
    than ``min_seconds`` is left); one record per step."""
    began = time.monotonic()
    records = []
    for step in planned:
        left = total_seconds - (time.monotonic() - began)
        limit = min(step.cap, left)
        if left < min_seconds:
            records.append(dict(step=step.name, status="not started: no time left", seconds=0.0))
            continue
        log.write(f"\n== {step.name} (cap {limit:.0f} s)\n")
        log.flush()
        print(f"gpu_check: {step.name} (cap {limit:.0f} s)", flush=True)
        start = time.monotonic()
        code, stopped = gpu.run_command(list(step.argv), {**os.environ, **step.env}, log, limit)
        status = "stopped at its cap" if stopped else ("passed" if code == 0 else f"failed (exit status {code})")
        records.append(dict(step=step.name, status=status, seconds=round(time.monotonic() - start, 1),
                            command=" ".join(step.argv)))
    return records


# ---- step 3: the measurements, one JSON line each as they come (a stopped step keeps them) ----------


def _cases(device: str, batches, dtypes, impls) -> List[tuple]:
    return [(dtype, B, pass_, impl) for dtype in dtypes for B in batches for pass_ in PASSES for impl in impls]


def _triton_candidates(layer: dict):
    """The Triton backend (for forcing a configuration) and its candidate configurations for ``layer``
    by element size, where it has them."""
    from capsrouting import triton_backend

    if not hasattr(triton_backend, "candidate_configs"):
        return None, None
    return triton_backend, lambda element_size: triton_backend.candidate_configs(layer["J"], layer["Dout"], layer["Din"],
                                                                               element_size)


def measure(out: Path, device: str, batches, dtypes, impls, layer: dict) -> None:
    import torch

    from bench import cases, memory
    from capsrouting import autotune

    triton_backend, candidates = _triton_candidates(layer) if "triton" in impls else (None, None)

    def record(**fields):
        with out.open("a") as f:
            f.write(json.dumps(fields) + "\n")

    for dtype_name, B, pass_, impl in _cases(device, batches, dtypes, impls):
        dtype = getattr(torch, dtype_name)
        shape = cases.Shape(B, layer["I"], layer["Din"], layer["J"], layer["Dout"], layer["R"], dtype)
        variants = [(impl, None)]
        if impl == "triton" and candidates is not None:
            variants += [(f"triton config {i}", i) for i in range(len(candidates(torch.empty((), dtype=dtype).element_size())))]
        for label, forced in variants:
            base = dict(dtype=dtype_name, B=B, pass_=pass_, impl=label)
            try:
                backend = {"reference": "reference", "compiled": "compiled"}.get(impl, impl)
                context = triton_backend.forced_config(forced) if forced is not None else _nothing()
                with context:
                    if backend != "compiled":  # the compiled reference is the reference
                        cases.check(backend, shape, device)
                    run = cases.make_runner(backend, shape, pass_, device)
                    ms = cases.median_ms(run, REPEATS)
                    peak = memory.peak_bytes(run, device)
                chose = _auto_choice(autotune, shape, pass_) if impl == "auto" else None
                tuned = _tuned(triton_backend) if impl == "triton" and forced is None else None
                record(**base, ms=round(ms, 4), peak_MB=round(peak / 2**20, 2), auto_chose=chose, triton_tuned=tuned)
            except Exception as exc:  # one case failing must not stop the others
                record(**base, error=f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}")


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _auto_choice(autotune, shape, pass_) -> Optional[str]:
    """What "auto" chose for this case (None where it did not measure: the fixed order ran)."""
    for case, choice in autotune.cached_choices().items():
        if (case.I, case.J, case.D, case.K, case.grad) == (shape.I, shape.J, shape.Dout, shape.Din,
                                                          pass_ != "forward") and \
                case.batch_bucket == autotune.batch_bucket(shape.B) and case.dtype == str(shape.dtype)[6:]:
            return choice.describe()
    return None


def _tuned(triton_backend) -> Optional[str]:
    if triton_backend is None or not hasattr(triton_backend, "tuned_configs"):
        return None
    return "; ".join(f"{case}: {choice}" for case, choice in triton_backend.tuned_configs().items())[:2000] or None


# ---- the report ---------------------------------------------------------------------------------------


def read_measurements(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(rows: List[dict]) -> str:
    """The Markdown table: one row per measurement, times over the eager reference and the compiled one."""
    by_case = {(r["dtype"], r["B"], r["pass_"], r["impl"]): r for r in rows}

    def ratio(r, base):
        other = by_case.get((r["dtype"], r["B"], r["pass_"], base))
        if "ms" not in r or not other or "ms" not in other:
            return "n/a"
        return f"{other['ms'] / r['ms']:.2f}"

    lines = ["| dtype | B | pass | implementation | time (ms) | × eager | × compiled | peak memory (MB) | auto chose |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['dtype']} | {r['B']} | {r['pass_']} | {r['impl']} | failed: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['dtype']} | {r['B']} | {r['pass_']} | {r['impl']} | {r['ms']:.3f} | {ratio(r, 'reference')} | "
                     f"{ratio(r, 'compiled')} | {r['peak_MB']:.1f} | {r.get('auto_chose') or ''} |")
    return "\n".join(lines)


def targets(rows: List[dict]) -> List[dict]:
    """Issue 30's targets, each met, missed or not measured, with the figures."""
    ms = {(r["dtype"], r["B"], r["pass_"], r["impl"]): r for r in rows if "ms" in r}

    def speedup(B, pass_, impl, base, dtype="float32"):
        a, b = ms.get((dtype, B, pass_, impl)), ms.get((dtype, B, pass_, base))
        return None if a is None or b is None else b["ms"] / a["ms"]

    found = []

    def target(name, value, wanted, higher=True):
        status = "not measured" if value is None else ("met" if (value >= wanted if higher else value <= wanted) else "missed")
        found.append(dict(target=name, value=None if value is None else round(value, 3), wanted=wanted, status=status))

    target("triton forward / torch.compile, B = 128, float32", speedup(128, "forward", "triton", "compiled"), 3)
    target("triton forward / eager, B = 128, float32", speedup(128, "forward", "triton", "reference"), 10)
    target("triton forward+backward / torch.compile, B = 128, float32",
           speedup(128, "forward+backward", "triton", "compiled"), 2)
    target("triton forward+backward / eager, B = 128, float32", speedup(128, "forward+backward", "triton", "reference"), 5)
    t, e = ms.get(("float32", 128, "forward+backward", "triton")), ms.get(("float32", 128, "forward+backward", "reference"))
    target("triton peak memory / eager, forward+backward, B = 128, float32",
           None if t is None or e is None or not e["peak_MB"] else t["peak_MB"] / e["peak_MB"], 0.10, higher=False)
    for impl in ("cuda", "auto"):
        worst = [speedup(r["B"], r["pass_"], impl, "reference", r["dtype"]) for r in rows if r["impl"] == impl and "ms" in r]
        worst = [w for w in worst if w is not None]
        target(f"{impl} / eager at every B measured (the slowest)", min(worst) if worst else None, 1.0)
    return found


def write_report(results: Path, stamp: str, about: dict, step_records: List[dict], rows: List[dict]) -> str:
    found = targets(rows)
    markdown = "\n".join([
        f"# GPU check: {about.get('gpu')}, {about.get('date')}",
        "",
        f"{about.get('versions')}; command: `{about.get('command')}`",
        "",
        "Steps: " + "; ".join(f"{s['step']}: {s['status']} ({s['seconds']} s)" for s in step_records),
        "",
        "Paper layer (I = 1152, Din = 8 -> J = 10, Dout = 16, R = 3); medians; × eager and × compiled are "
        "speed-ups over the eager reference and `torch.compile` of it (same dtype, B and pass).",
        "",
        table(rows),
        "",
        "Targets: " + "; ".join(f"{t['target']}: {t['status']} ({t['value']} against {t['wanted']})" for t in found),
    ])
    (results / f"{stamp}-check.md").write_text(markdown + "\n")
    (results / f"{stamp}-check.json").write_text(json.dumps(dict(**about, steps=step_records, measurements=rows,
                                                                 targets=found), indent=1) + "\n")
    return markdown


# ---- command line --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from capsrouting._cli import OneLineParser

    parser = OneLineParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="where the JSON and Markdown files go (default: $CAPSROUTING_RESULTS_DIR or bench/results)")
    parser.add_argument("--dry-run", action="store_true", help="show the steps, caps and cases; run nothing")
    parser.add_argument("--seconds", type=int, default=TOTAL_SECONDS, help=f"the steps' time in all (default {TOTAL_SECONDS})")
    parser.add_argument("--no-build", action="store_true", help="use the extension as it is")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the same steps on the CPU (a test of the check itself; no GPU needed)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--impls", nargs="+", default=None, help="which implementations (default: all on the device)")
    parser.add_argument("--layer", type=int, nargs=5, metavar=("I", "DIN", "J", "DOUT", "R"), default=None,
                        help="another layer than the paper's (tests)")
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)  # step 3, in its own process
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    impls = tuple(args.impls or IMPLS[args.device])
    unknown = [i for i in impls if i not in IMPLS[args.device]]
    if unknown:
        parser.error(f"--impls: {unknown[0]!r} is not measured on {args.device}; choose from {', '.join(IMPLS[args.device])}")
    if any(b < 1 for b in args.batches):
        parser.error("--batches: every batch size must be at least 1")
    layer = dict(zip(("I", "Din", "J", "Dout", "R"), args.layer)) if args.layer else PAPER_LAYER
    if args.measure is not None:
        measure(args.measure, args.device, args.batches, args.dtypes, impls, layer)
        return 0
    measure_args = ["--device", args.device, "--batches", *map(str, args.batches), "--dtypes", *args.dtypes,
                    "--impls", *impls] + (["--layer", *map(str, args.layer)] if args.layer else [])
    results = (args.results_dir or Path(os.environ.get("CAPSROUTING_RESULTS_DIR") or ROOT / "bench" / "results")).resolve()
    partial = results / "gpu_check-measurements.jsonl"
    planned = steps(partial, measure_args, build=not args.no_build)
    if args.dry_run:
        print(f"gpu_check: at most {args.seconds} s in all; files go to {results}")
        for i, step in enumerate(planned, 1):
            env = "".join(f"{k}={v} " for k, v in step.env.items())
            print(f"  {i}. {step.name} (cap {min(step.cap, args.seconds)} s): {env}{' '.join(step.argv)}")
        n = len(_cases(args.device, args.batches, args.dtypes, impls))
        print(f"  step 3 measures {n} cases ({', '.join(args.dtypes)} x B = {', '.join(map(str, args.batches))} x "
              f"{' / '.join(PASSES)} x {', '.join(impls)}), triton's candidate configurations besides")
        return 0
    if args.device == "cuda":
        name, versions = gpu.gpu_name()
        if name is None:
            print(f"gpu_check: no CUDA device visible to torch ({versions}): nothing to check here "
                  "(--dry-run shows what it would run)")
            return 0
    else:
        name, versions = "cpu", gpu._torch_version()
    results.mkdir(parents=True, exist_ok=True)
    partial.unlink(missing_ok=True)
    date = datetime.date.today().isoformat()
    stamp = f"{gpu.slug(name)}-{date}"
    with (results / f"{stamp}-check.log").open("w") as log:
        step_records = run_steps(planned, log, args.seconds)
    rows = read_measurements(partial)
    partial.unlink(missing_ok=True)
    about = dict(gpu=name, date=date, versions=versions, command="python -m bench.gpu_check " + " ".join(argv or sys.argv[1:]))
    print(write_report(results, stamp, about, step_records, rows))
    return 0 if all(s["status"] == "passed" for s in step_records) else 1


if __name__ == "__main__":
    sys.exit(main())
