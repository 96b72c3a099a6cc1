"""The CPU kernels at each instruction-set level, and against other builds, at the paper's layer.

    python bench/cpu_isa.py [--batch 128] [--library NAME=PATH ...] [--threads N]
                            [--repeats 10] [--rounds 5] [--out bench/results/cpu_isa.json] [--fast]

(--out also writes the table as Markdown beside the JSON, same name, .md.)

Columns: every level of the CPU kernels this build has and this CPU runs (``CAPSROUTING_CPU_ISA``
forced: baseline, avx2, avx512), and each ``--library NAME=PATH``, another build of the extension
(for example one compiled with ``CAPSROUTING_NATIVE=1``) at the level it picks itself. Each column
runs in a process of its own (a process loads one build and picks its level once); the columns are
timed in interleaved rounds and each figure is the median of its rounds (this machine drifts by
tens of percent over a minute). Every process first checks its answer against the float64
reference. Times are the extension's ops alone (forward; forward then backward), float32.
"""
import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

PAPER = dict(I=1152, Din=8, J=10, Dout=16, R=3)
TINY = dict(I=40, Din=5, J=3, Dout=4, R=2)
PASSES = ("forward", "forward+backward")


def worker(library: str, batch: int, repeats: int, fast: bool) -> dict:
    """In this process: load the build, check it against the reference, time its two passes."""
    from bench import cases
    from capsrouting import _extension, reference

    if library:
        torch.ops.load_library(library)
    else:
        reason = _extension.load()
        if reason is not None:
            raise SystemExit(f"the C++ extension is not available: {reason}")
    ops = torch.ops.capsrouting
    if hasattr(ops, "cpu_isa"):
        level, runnable, native = ops.cpu_isa()
    else:  # a build from before the levels: compiled for its build machine with -march=native
        level, runnable, native = "one level", [], True
    shape = TINY if fast else PAPER
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(batch, shape["I"], shape["Din"], generator=gen)
    W = 0.1 * torch.randn(shape["I"], shape["J"], shape["Dout"], shape["Din"], generator=gen)
    R = shape["R"]
    v, _, s_saved, Vprev_saved = ops.capsule_routing_ext(u, W, None, None, False, False, False, R)
    grad_v = torch.randn(v.shape, generator=gen)
    du, dW, _, _ = ops.capsule_routing_ext_backward(grad_v, u, W, None, None, False, False, True, s_saved, Vprev_saved, R)
    # The answer first: float32 against the float64 reference (tolerances of the benchmarks' check).
    u64, W64 = u.double().requires_grad_(), W.double().requires_grad_()
    v64 = reference.capsule_routing(u64, W64, R)
    du64, dW64 = torch.autograd.grad(v64, (u64, W64), grad_v.double())
    for name, got, want in (("v", v, v64), ("du", du, du64), ("dW", dW, dW64)):
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-3, atol=1e-4, msg=lambda m: f"{name} at {level}: {m}")

    def forward():
        ops.capsule_routing_ext(u, W, None, None, False, False, False, R)

    def forward_backward():
        _, _, s, Vp = ops.capsule_routing_ext(u, W, None, None, False, False, False, R)
        ops.capsule_routing_ext_backward(grad_v, u, W, None, None, False, False, True, s, Vp, R)

    times = {"forward": cases.adaptive_median_ms(forward, repeats), "forward+backward": cases.adaptive_median_ms(forward_backward, repeats)}
    return dict(level=level, runnable=runnable, native=native, threads=torch.get_num_threads(), ms=times)


def markdown(record: dict) -> str:
    """The record as a table: each column's milliseconds and its ratio to the build's default level."""
    default = record["median_ms"][record["default_level"]]
    layer = ", ".join(f"{k} = {v}" for k, v in record["layer"].items())
    lines = [
        f"# CPU kernels per instruction-set level, {record['machine']['cpu']}, {record['date']}",
        "",
        f"`{record['command']}`",
        "",
        f"Layer {layer}, B = {record['batch']}, float32, {record['threads']} threads, torch {record['versions']['torch']}; "
        f"milliseconds, medians of {record['rounds']} interleaved rounds; ratio: time / time of this build's "
        f"default level ({record['default_level']}).",
        "",
        "| column | level | forward | ratio | forward+backward | ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, ms in record["median_ms"].items():
        picked = record["columns"][name]
        level = picked["level"] + (", -march=native" if picked["native"] else "")
        lines.append(f"| {name} | {level} | {ms['forward']:.2f} | {ms['forward'] / default['forward']:.2f} | "
                     f"{ms['forward+backward']:.2f} | {ms['forward+backward'] / default['forward+backward']:.2f} |")
    return "\n".join(lines) + "\n"


def run_column(column: dict, args) -> dict:
    env = dict(os.environ)
    env.pop("CAPSROUTING_CPU_ISA", None)
    if column["level"]:
        env["CAPSROUTING_CPU_ISA"] = column["level"]
    command = [sys.executable, __file__, "--worker", "--batch", str(args.batch), "--repeats", str(args.repeats),
               "--threads", str(args.threads), "--library-path", column["library"]] + (["--fast"] if args.fast else [])
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"column {column['name']} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--library", action="append", default=[], metavar="NAME=PATH",
                        help="another build of the extension (its _C*.so) to time beside the levels; repeatable")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the columns (medians of them)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here, and a table beside (.md)")
    parser.add_argument("--fast", action="store_true", help="a tiny layer: checks that the script runs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--library-path", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.threads < 1 or args.rounds < 1 or args.repeats < 1:
        parser.error("--batch, --threads, --repeats and --rounds take positive integers")
    torch.set_num_threads(args.threads)
    from capsrouting.info import cpu_name

    if args.worker:
        print(json.dumps(worker(args.library_path, args.batch, args.repeats, args.fast)))
        return 0

    libraries = []
    for item in args.library:
        name, _, path = item.partition("=")
        if not name or not path or not Path(path).is_file():
            parser.error(f"--library takes NAME=PATH with PATH a built extension library, got {item!r}")
        libraries.append(dict(name=name, level="", library=str(Path(path).resolve())))
    probe = run_column(dict(name="this build", level="", library=""), args)
    columns = [dict(name=level, level=level, library="") for level in probe["runnable"]] + libraries

    times = {c["name"]: {p: [] for p in PASSES} for c in columns}
    picked = {}
    for _ in range(args.rounds):
        for column in columns:
            result = run_column(column, args)
            picked[column["name"]] = dict(level=result["level"], native=result["native"])
            for p in PASSES:
                times[column["name"]][p].append(result["ms"][p])
    medians = {name: {p: statistics.median(t) for p, t in by_pass.items()} for name, by_pass in times.items()}

    layer = "a tiny layer" if args.fast else "paper layer"
    print(f"{layer}, B = {args.batch}, float32, {args.threads} threads, {platform.machine()}; "
          f"milliseconds (median of {args.rounds} interleaved rounds); this build picks {probe['level']}")
    print(f"{'column':>24s} {'forward':>9s} {'fwd+bwd':>9s}")
    for name, ms in medians.items():
        what = name if name in probe["runnable"] else f"{name} ({picked[name]['level']}{', -march=native' if picked[name]['native'] else ''})"
        print(f"{what:>24s} {ms['forward']:9.2f} {ms['forward+backward']:9.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # Libraries by file name only: the command as run, without this machine's paths.
        words = [re.sub(r"=.*/", "=", w) if w.count("=") == 1 and "/" in w else w for w in (sys.argv[1:] if argv is None else argv)]
        record = dict(date=datetime.date.today().isoformat(), command="python bench/cpu_isa.py " + " ".join(words),
                      machine=dict(cpu=cpu_name(), cores=os.cpu_count()),
                      versions=dict(torch=torch.__version__), batch=args.batch, threads=args.threads, rounds=args.rounds,
                      layer=TINY if args.fast else PAPER, default_level=probe["level"], columns=picked,
                      median_ms=medians, rounds_ms=times)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(record))
        print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
