"""Backend "cpu" against the eager reference and torch.compile of it, at the paper's shape.

    python bench/cpu_speedup.py [--batch 128] [--repeats 10] [--out bench/results/cpu_speedup.json]

Checks the answer first (bench/cases.py), then times forward and forward+backward
(median of --repeats), measures the largest single allocation of each backend, and
prints the speed-up ratios; --out writes the figures with the machine and versions.
"""
import argparse
import dataclasses
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import capsrouting  # noqa: E402
from bench import cases, memory  # noqa: E402

BACKENDS = ("reference", "compiled", "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    shape = dataclasses.replace(cases.PAPER, B=args.batch)
    results = {}
    for backend in BACKENDS:
        cases.check(backend, shape, "cpu")
        runs = {p: cases.make_runner(backend, shape, p, "cpu") for p in cases.PASSES}
        results[backend] = {p: cases.median_ms(run, args.repeats) for p, run in runs.items()}
        results[backend]["largest_allocation_MB"] = memory.largest_allocation_bytes(runs["forward+backward"]) / 2**20

    print(f"paper shape, batch {shape.B}, float32, {torch.get_num_threads()} threads, {platform.machine()}")
    print(f"{'':12s} {'forward ms':>11s} {'fwd+bwd ms':>11s} {'largest alloc MB':>17s}")
    for name, r in results.items():
        print(f"{name:12s} {r['forward']:11.1f} {r['forward+backward']:11.1f} {r['largest_allocation_MB']:17.2f}")
    ours = results["cpu"]
    speedup = {base: {p: results[base][p] / ours[p] for p in cases.PASSES} for base in ("reference", "compiled")}
    for base, ratio in speedup.items():
        print(f"speed-up over {base}: forward {ratio['forward']:.1f}x, forward+backward {ratio['forward+backward']:.1f}x")
    u_hat_MB = shape.B * shape.I * shape.J * shape.Dout * 4 / 2**20
    print(f"u_hat (B*I*J*Dout float32) would be {u_hat_MB:.1f} MB; the cpu backend's largest allocation is "
          f"{ours['largest_allocation_MB']:.2f} MB")

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = dict(date=datetime.date.today().isoformat(), command="python bench/cpu_speedup.py " + " ".join(sys.argv[1:]),
                      machine=dict(cpu=platform.machine(), threads=torch.get_num_threads()),
                      versions=dict(torch=torch.__version__, capsrouting=capsrouting.__version__),
                      shape={k: v for k, v in vars(shape).items() if k != "dtype"}, results_ms=results, speedup=speedup)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
