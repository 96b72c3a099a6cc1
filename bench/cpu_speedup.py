"""Backend "cpu" against the eager reference and torch.compile of it, at the paper's layer.

    python bench/cpu_speedup.py [--batch 1 2 4 8 16 32 128] [--threads 1 2] [--paths]
                                [--repeats 15] [--out bench/results/cpu_speedup.json] [--fast]

For each thread count and batch size: checks the answer first (bench/cases.py), then times
forward and forward+backward (medians), and prints the speed-up of "cpu" over the better of
the two references. --paths also times each of the CPU kernels forced (CAPSROUTING_CPU_PATH:
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
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import capsrouting  # noqa: E402
from bench import cases, memory  # noqa: E402

REFERENCES = ("reference", "compiled")
CPU_PATHS = ("small-batch", "batch")


def _median_ms(run, repeats: int) -> float:
    """Median over at least ``repeats`` runs, more for fast cases (about half a second of them)."""
    first = cases.median_ms(run, 3, warmup=1)
    return cases.median_ms(run, max(repeats, min(200, int(500 / max(first, 1e-3)))), warmup=0)


def _layer(fast: bool):
    return cases.sweep("cpu", fast=True)[0] if fast else cases.PAPER


def _time_cpu_path(path: str, shape, repeats: int) -> dict:
    os.environ["CAPSROUTING_CPU_PATH"] = path  # read by the extension on every call
    try:
        cases.check("cpu", shape, "cpu")
        return {p: _median_ms(cases.make_runner("cpu", shape, p, "cpu"), repeats) for p in cases.PASSES}
    finally:
        os.environ.pop("CAPSROUTING_CPU_PATH")


def measure(batch: int, repeats: int, paths: bool, fast: bool = False) -> dict:
    shape = dataclasses.replace(_layer(fast), B=batch)
    results = {}
    for backend in (*REFERENCES, "cpu"):
        cases.check(backend, shape, "cpu")
        runs = {p: cases.make_runner(backend, shape, p, "cpu") for p in cases.PASSES}
        results[backend] = {p: _median_ms(run, repeats) for p, run in runs.items()}
        results[backend]["largest_allocation_MB"] = memory.largest_allocation_bytes(runs["forward+backward"]) / 2**20
    if paths:
        for path in CPU_PATHS:
            results[f"cpu:{path}"] = _time_cpu_path(path, shape, repeats)
    return results


def speedup(results: dict) -> dict:
    """cpu's speed-up over the better of the eager reference and torch.compile of it, per pass."""
    return {p: min(results[r][p] for r in REFERENCES) / results["cpu"][p] for p in cases.PASSES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[128])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--paths", action="store_true", help="also time each CPU kernel path forced")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--fast", action="store_true", help="a tiny layer: checks that the script runs")
    args = parser.parse_args()
    if any(b < 1 for b in args.batch) or any(t < 1 for t in args.threads):
        parser.error("--batch and --threads take positive integers")

    records = []
    columns = [*REFERENCES, "cpu", *(f"cpu:{p}" for p in CPU_PATHS if args.paths)]
    print(f"{'a tiny layer' if args.fast else 'paper layer'}, float32, {platform.machine()}; milliseconds, forward / forward+backward")
    print(f"{'threads':>7s} {'batch':>5s} " + " ".join(f"{c:>17s}" for c in columns) + "  cpu speed-up over the better reference")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batch:
            results = measure(batch, args.repeats, args.paths, args.fast)
            ratio = speedup(results)
            records.append(dict(threads=threads, batch=batch, results_ms=results, speedup=ratio))
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
