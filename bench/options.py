"""The routing options (DESIGN.md §6) at the paper's layer: what each costs on every backend.

    python -m bench.options [--batch 32] [--repeats 5] [--compiled] [--fast] [--out-dir bench/results]

For each variant of ``cases.OPTION_VARIANTS`` (the routings of the public CapsNets, README) and
each backend that runs it, the case is checked against the eager reference, then forward and
forward+backward are timed (median of --repeats). The backward takes the gradients of u, W and
of the option tensors (learned parameters). ``detach_inner`` without a bias or prior is the
one-pass backward (du_hat = c(R) g_s(R)); the table gives its forward+backward time beside the
full one ("none"). Writes <device>-<date>-options.json and .md.
"""
import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import torch

from bench import cases
from bench.report import device_name, slug, versions
from capsrouting import backends


def runs_variant(backend: str, variant: str) -> bool:
    if backend in ("reference", "compiled") or variant == "none":
        return True
    names = {"bias", "logit_prior", "leaky", "detach_inner"} & set(variant.split("+"))
    return names <= backends.get(backend).options


def measure(device: str, shape: cases.Shape, repeats: int, compiled: bool) -> list:
    records = []
    names = [b for b in cases.available_backends(device) if compiled or b != "compiled"]
    for variant in cases.OPTION_VARIANTS:
        for backend in names:
            if not runs_variant(backend, variant) or cases.skip_reason(backend, shape, device) is not None:
                continue
            cases.check(backend, shape, device, variant)
            record = dict(variant=variant, backend=backend)
            for pass_ in cases.PASSES:
                run = cases.make_runner(backend, shape, pass_, device, variant)
                run()  # compilation, first load
                record[pass_] = cases.median_ms(run, repeats)
            print(f"  {variant:18s} {backend:10s} forward {record['forward']:9.2f} ms   "
                  f"forward+backward {record['forward+backward']:9.2f} ms", flush=True)
            records.append(record)
    for r in records:  # against the eager reference of the same variant
        ref = next(x for x in records if x["variant"] == r["variant"] and x["backend"] == "reference")
        r["speedup_vs_reference"] = {p: ref[p] / r[p] for p in cases.PASSES}
    return records


def markdown(meta: dict, records: list) -> str:
    s = meta["shape"]
    lines = [f"# Routing options: {meta['device_name']}", "",
             f"{meta['date']}, `{meta['command']}`, torch {meta['versions']['torch']}, {meta['threads']} CPU threads; "
             f"B = {s['B']}, I = {s['I']}, Din = {s['Din']}, J = {s['J']}, Dout = {s['Dout']}, R = {s['R']}, "
             f"{s['dtype']}. Medians; the backward takes the gradients of u, W and the option tensors.", "",
             "| options | backend | forward (ms) | × eager | forward+backward (ms) | × eager |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in records:
        up = r["speedup_vs_reference"]
        lines.append(f"| {r['variant']} | {r['backend']} | {r['forward']:.2f} | {up['forward']:.1f} | "
                     f"{r['forward+backward']:.2f} | {up['forward+backward']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 32 on a CPU, 128 on a GPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compiled", action="store_true", help="also torch.compile of the reference (slow to compile)")
    parser.add_argument("--fast", action="store_true", help="a tiny shape: checks that the script runs")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = args.batch or (32 if device == "cpu" else 128)
    shape = cases.sweep(device, fast=True)[0] if args.fast else dataclasses.replace(cases.PAPER, B=batch)
    meta = dict(device=device, device_name=device_name(device), date=datetime.date.today().isoformat(),
                command="python -m bench.options " + " ".join(argv if argv is not None else sys.argv[1:]),
                versions=versions(), threads=torch.get_num_threads(),
                shape=dict(vars(shape), dtype=str(shape.dtype).replace("torch.", "")))
    print(f"{meta['device_name']} ({device}), {shape.label}", flush=True)
    records = measure(device, shape, args.repeats, args.compiled)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    prefix = args.out_dir / f"{slug(meta['device_name'])}-{meta['date']}-options"
    prefix.with_suffix(".json").write_text(json.dumps(dict(meta, records=records), indent=2) + "\n")
    prefix.with_suffix(".md").write_text(markdown(meta, records))
    print(f"wrote {prefix.with_suffix('.json')}, {prefix.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
