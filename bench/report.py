"""One command for the numbers: a sweep sized for the device, as JSON, a Markdown table and PNG plots.

    python -m bench.report [--fast] [--repeats 5] [--out-dir bench/results]

Every case (bench/cases.py) is checked against the eager reference, then timed (median
of --repeats) and its peak memory measured (bench/memory.py); then the images/s of a
CapsNet training step per backend (bench/training.py). Files are named after the device
and the date: <device>-<date>.json / .md / -time_vs_batch.png / -time_vs_I.png /
-speedup.png.
"""
import argparse
import datetime
import json
import platform
import re
import sys
from pathlib import Path

import torch

import capsrouting
import capsrouting.info
from bench import cases, memory
from bench.training import training_images_per_second


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return capsrouting.info.cpu_name()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "capsrouting": capsrouting.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def run_sweep(device: str, fast: bool, repeats: int, paper_layer_only: bool = False) -> list:
    records = []
    for shape in cases.sweep(device, fast, paper_layer_only):
        for backend in cases.available_backends(device):
            reason = cases.skip_reason(backend, shape, device)
            if reason is not None:
                print(f"  skip {backend} {shape.label}: {reason}", flush=True)
                continue
            cases.check(backend, shape, device)
            for pass_ in cases.PASSES:
                run = cases.make_runner(backend, shape, pass_, device)
                run()  # compilation, first load
                record = dict(backend=backend, pass_=pass_, **{k: v for k, v in vars(shape).items() if k != "dtype"},
                              dtype=str(shape.dtype).replace("torch.", ""),
                              ms=cases.median_ms(run, repeats), peak_MB=memory.peak_bytes(run, device) / 2**20)
                records.append(record)
                print(f"  {backend:10s} {pass_:17s} {shape.label:40s} {record['ms']:9.2f} ms {record['peak_MB']:9.1f} MB", flush=True)
    for rec in records:  # speed-ups over the eager reference and over torch.compile of it
        for base in ("reference", "compiled"):
            match = [r for r in records if r["backend"] == base and _same_case(r, rec)]
            rec[f"speedup_vs_{base}"] = match[0]["ms"] / rec["ms"] if match else None
    return records


def _same_case(a: dict, b: dict) -> bool:
    keys = ("pass_", "B", "I", "Din", "J", "Dout", "R", "dtype")
    return all(a[k] == b[k] for k in keys)


def run_training(device: str, fast: bool) -> list:
    """Every backend in float32 at a small batch; then the fastest fused backend at the paper's
    batch of 128, in float32 and under autocast (bfloat16; also float16 on a GPU), as trained."""
    batch, steps = (2, 1) if fast else ((32, 3) if device == "cpu" else (128, 20))
    # On a CPU the Triton backend is its interpreter: a test tool, not timed here (a training
    # step through it takes minutes even at batch 2).
    available = [b for b in cases.available_backends(device) if not (b == "triton" and device == "cpu")]
    runs = [(backend, batch, steps, None) for backend in available]
    fused = [b for b in available if b not in ("reference", "compiled")]
    if fused:
        paper_batch, paper_steps = (2, 1) if fast else (128, 3 if device == "cpu" else 20)
        amps = [None, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
        runs += [(fused[0], paper_batch, paper_steps, amp) for amp in amps]
    out = []
    for backend, b, n, amp in runs:
        ips = training_images_per_second(backend, device, b, n, compile_backend="aot_eager" if fast else "inductor", amp=amp)
        precision = "float32" if amp is None else f"autocast {str(amp).replace('torch.', '')}"
        out.append(dict(backend=backend, batch=b, steps=n, precision=precision, images_per_second=ips))
        print(f"  training step {backend:10s} batch {b:4d} {precision:18s}: {ips:8.1f} images/s", flush=True)
    return out


def _fmt(x, spec):
    return "–" if x is None else format(x, spec)


def markdown(meta: dict, records: list, training: list) -> str:
    lines = [f"# capsrouting benchmarks: {meta['device_name']}", "",
             f"{meta['date']}, `{meta['command']}`, torch {meta['versions']['torch']}, {meta['threads']} CPU threads.", "",
             "Times are medians; speed-ups are over the eager reference and over `torch.compile` of it; "
             "peak memory is what one call allocates beyond what was live before it.", "",
             "| shape (B, I, Din, J, Dout, R, dtype) | pass | backend | time (ms) | × eager | × compiled | peak memory (MB) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in records:
        shape = f"{r['B']}, {r['I']}, {r['Din']}, {r['J']}, {r['Dout']}, {r['R']}, {r['dtype']}"
        lines.append(f"| {shape} | {r['pass_']} | {r['backend']} | {r['ms']:.2f} | {_fmt(r['speedup_vs_reference'], '.1f')} | "
                     f"{_fmt(r['speedup_vs_compiled'], '.1f')} | {r['peak_MB']:.1f} |")
    if training:
        lines += ["", "CapsNet training step (forward, margin + reconstruction loss, backward, Adam), 28×28 MNIST-sized input:", "",
                  "| backend | batch | precision | images/s |", "| --- | ---: | --- | ---: |"]
        lines += [f"| {t['backend']} | {t['batch']} | {t.get('precision', 'float32')} | {t['images_per_second']:.1f} |"
                  for t in training]
    return "\n".join(lines) + "\n"


def plots(records: list, prefix: Path, sweeps=("B", "I")) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    paper = dict(Din=8, J=10, Dout=16, R=3, dtype="float32")
    for axis, fixed, title in [("B", dict(paper, I=1152), "time vs batch (paper layer)"),
                               ("I", dict(paper, B=32), "time vs input capsules I (B = 32)")]:
        if axis not in sweeps:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, pass_ in zip(axes, cases.PASSES):
            for backend in sorted({r["backend"] for r in records}):
                points = sorted((r[axis], r["ms"]) for r in records if r["backend"] == backend and r["pass_"] == pass_
                                and all(r[k] == v for k, v in fixed.items()))
                if len(points) > 1:
                    ax.plot(*zip(*points), marker="o", label=backend)
            ax.set(xscale="log", yscale="log", xlabel=axis, ylabel="ms", title=pass_)
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend()
        fig.suptitle(title)
        path = prefix.with_name(prefix.name + f"-time_vs_{axis}.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    fused = [r for r in records if r["backend"] not in ("reference", "compiled") and r["speedup_vs_reference"]]
    labels = [f"{r['backend']}\n{r['pass_']}\nB={r['B']} I={r['I']} J={r['J']} R={r['R']}" for r in fused]
    if fused:
        x = range(len(fused))
        ax.bar([i - 0.2 for i in x], [r["speedup_vs_reference"] for r in fused], width=0.4, label="over eager reference")
        ax.bar([i + 0.2 for i in x], [r["speedup_vs_compiled"] or 0 for r in fused], width=0.4, label="over torch.compile")
        ax.set_xticks(list(x), labels, fontsize=5, rotation=90)
    ax.set(ylabel="speed-up (×)", yscale="log", title="speed-up per backend and case")
    ax.grid(True, axis="y", alpha=0.3)
    if fused:
        ax.legend()
    path = prefix.with_name(prefix.name + "-speedup.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="tiny shapes and few steps: checks that the report runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--paper-layer", action="store_true",
                        help="only the paper's layer at B = 1, 32, 128, 512 and no training step: the cases the "
                             "speed targets are set on, in a few minutes on a GPU")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = dict(device=device, device_name=device_name(device), date=datetime.date.today().isoformat(),
                command="python -m bench.report " + " ".join(argv if argv is not None else sys.argv[1:]),
                versions=versions(), threads=torch.get_num_threads(), backends=cases.available_backends(device))
    print(f"{meta['device_name']} ({device}), backends {meta['backends']}", flush=True)
    records = run_sweep(device, args.fast, args.repeats, args.paper_layer)
    training = [] if args.paper_layer else run_training(device, args.fast)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    prefix = args.out_dir / f"{slug(meta['device_name'])}-{meta['date']}"
    prefix.with_suffix(".json").write_text(json.dumps(dict(meta, routing=records, training=training), indent=2) + "\n")
    prefix.with_suffix(".md").write_text(markdown(meta, records, training))
    written = [prefix.with_suffix(".json"), prefix.with_suffix(".md")] + plots(records, prefix, ("B",) if args.paper_layer else ("B", "I"))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
