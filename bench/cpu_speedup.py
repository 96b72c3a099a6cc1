"""Backend "cpu" against the eager reference and torch.compile of it, at the paper's layer.

    python bench/cpu_speedup.py [--batch 1 2 4 8 16 32 128] [--threads 1 2] [--paths]
                                [--repeats 15] [--rounds 5] [--out bench/results/cpu_speedup.json] [--fast]

For each thread count and batch size: checks the answer first (bench/cases.py), then times
forward and forward+backward (medians of --rounds interleaved rounds, see ``measure``), and
prints the speed-up of "cpu" over the better of the two references. --paths also times each of the CPU kernels forced (CAPSROUTING_CPU_PATH:
"small-batch", vectorized over input capsules, and "batch", vectorized over the batch): the
figures the batch-size threshold between them is set from. --out writes everything as JSON
with the machine and versions. --fast: a tiny layer instead of the paper's, to check that the
script runs.
"""
import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import capsrouting  # noqa: E402
from bench import cases, memory  # noqa: E402

REFERENCES = ("reference", "compiled")
CPU_PATHS = ("small-batch", "batch")


def _layer(fast: bool):
    return cases.sweep("cpu", fast=True)[0] if fast else cases.PAPER


class _ForcedPath:
    """CAPSROUTING_CPU_PATH set to ``path`` (read by the extension on every call) while inside."""

    def __init__(self, path: Optional[str]):
        self.path = path

    def __enter__(self):
        if self.path is not None:
            os.environ["CAPSROUTING_CPU_PATH"] = self.path

    def __exit__(self, *exc):
        os.environ.pop("CAPSROUTING_CPU_PATH", None)


def measure(batch: int, repeats: int, paths: bool, fast: bool = False, rounds: int = 5) -> dict:
    """Medians per column (backend, or "cpu:<path>" forced) and pass, and the speed-ups.

    Interleaved: each of ``rounds`` rounds times every column once, and a column's figure is the
    median of its rounds, each speed-up the median of the rounds' own ratios. This machine's speed
    drifts by tens of percent over a minute (other tenants, frequency); timing one column after
    the other would put that drift into the ratios.
    """
    shape = dataclasses.replace(_layer(fast), B=batch)
    columns = {backend: (backend, None) for backend in (*REFERENCES, "cpu")}
    if paths:
        columns.update({f"cpu:{path}": ("cpu", path) for path in CPU_PATHS})
    runs = {}
    for column, (backend, path) in columns.items():
        with _ForcedPath(path):
            cases.check(backend, shape, "cpu")
        runs[column] = {p: cases.make_runner(backend, shape, p, "cpu") for p in cases.PASSES}
    times = {column: {p: [] for p in cases.PASSES} for column in columns}
    for _ in range(rounds):
        for column, (backend, path) in columns.items():
            with _ForcedPath(path):
                for p, run in runs[column].items():
                    times[column][p].append(cases.adaptive_median_ms(run, repeats))
    results = {column: {p: statistics.median(t) for p, t in by_pass.items()} for column, by_pass in times.items()}
    for backend in (*REFERENCES, "cpu"):
        results[backend]["largest_allocation_MB"] = memory.largest_allocation_bytes(runs[backend]["forward+backward"]) / 2**20
    ratios = {p: statistics.median(min(times[r][p][k] for r in REFERENCES) / times["cpu"][p][k] for k in range(rounds))
              for p in cases.PASSES}
    return dict(results=results, speedup=ratios, rounds=rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[128])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--paths", action="store_true", help="also time each CPU kernel path forced")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the columns (medians of them)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--fast", action="store_true", help="a tiny layer: checks that the script runs")
    args = parser.parse_args()
    if any(b < 1 for b in args.batch) or any(t < 1 for t in args.threads) or args.rounds < 1:
        parser.error("--batch, --threads and --rounds take positive integers")

    records = []
    columns = [*REFERENCES, "cpu", *(f"cpu:{p}" for p in CPU_PATHS if args.paths)]
    print(f"{'a tiny layer' if args.fast else 'paper layer'}, float32, {platform.machine()}; milliseconds, forward / forward+backward")
    print(f"{'threads':>7s} {'batch':>5s} " + " ".join(f"{c:>17s}" for c in columns) + "  cpu speed-up over the better reference")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batch:
            measured = measure(batch, args.repeats, args.paths, args.fast, args.rounds)
            results, ratio = measured["results"], measured["speedup"]
            records.append(dict(threads=threads, batch=batch, results_ms=results, speedup=ratio, rounds=args.rounds))
            cells = " ".join(f"{results[c]['forward']:8.3f}/{results[c]['forward+backward']:8.3f}" for c in columns)
            print(f"{threads:7d} {batch:5d} {cells}  {ratio['forward']:.1f}x / {ratio['forward+backward']:.1f}x", flush=True)

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = dict(date=datetime.date.today().isoformat(), command="python bench/cpu_speedup.py " + " ".join(sys.argv[1:]),
                      machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count()),
                      versions=dict(torch=torch.__version__, capsrouting=capsrouting.__version__),
                      shape={k: v for k, v in vars(_layer(args.fast)).items() if k not in ("dtype", "B")}, records=records)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
