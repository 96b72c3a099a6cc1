"""Backend "cpu" against the eager reference and torch.compile of it, at the paper's shape.

    python bench/cpu_speedup.py [--batch 128] [--repeats 10] [--out bench/results/cpu_speedup.json]

Checks the answer first (forward and gradients against the reference, float32 tolerances),
then times forward and forward+backward (median of --repeats after warm-up), measures the
largest single allocation of each, and prints the speed-up ratios. Writes the figures,
with the machine and versions, as JSON.
"""
import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import capsrouting
from capsrouting import reference

PAPER = dict(I=1152, Din=8, J=10, Dout=16, R=3)


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation, for torch.compile)
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def largest_allocation_bytes(fn) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    tree = prof.profiler.kineto_results.experimental_event_tree()
    return max((n.extra_fields.alloc_size for n in walk(tree) if n.tag == _EventType.Allocation), default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    B, I, Din, J, Dout, R = args.batch, *PAPER.values()
    g = torch.Generator().manual_seed(0)
    u = torch.randn(B, I, Din, generator=g).requires_grad_()
    W = (0.05 * torch.randn(I, J, Dout, Din, generator=g)).requires_grad_()
    grad_v = torch.randn(B, J, Dout, generator=g)

    eager = lambda a, b: reference.capsule_routing(a, b, R)  # noqa: E731
    compiled = torch.compile(eager)
    fused = lambda a, b: capsrouting.capsule_routing(a, b, R, backend="cpu")  # noqa: E731

    # Correctness before timing.
    want = [eager(u, W)] + list(torch.autograd.grad(eager(u, W), (u, W), grad_v))
    got = [fused(u, W)] + list(torch.autograd.grad(fused(u, W), (u, W), grad_v))
    for name, a, b in zip(["v", "du", "dW"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"cpu backend {name}: {m}")

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(u, W)
        return run

    def forward_backward(fn):
        def run():
            torch.autograd.grad(fn(u, W), (u, W), grad_v)
        return run

    results = {}
    for name, fn in [("eager reference", eager), ("torch.compile(reference)", compiled), ("cpu backend", fused)]:
        results[name] = {
            "forward_ms": median_ms(forward(fn), args.repeats),
            "forward_backward_ms": median_ms(forward_backward(fn), args.repeats),
            "largest_allocation_MB": largest_allocation_bytes(forward_backward(fn)) / 2**20,
        }

    u_hat_MB = B * I * J * Dout * 4 / 2**20
    print(f"paper shape, batch {B}, float32, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'':26s} {'forward ms':>11s} {'fwd+bwd ms':>11s} {'largest alloc MB':>17s}")
    for name, r in results.items():
        print(f"{name:26s} {r['forward_ms']:11.1f} {r['forward_backward_ms']:11.1f} {r['largest_allocation_MB']:17.2f}")
    ours = results["cpu backend"]
    ratios = {}
    for base in ["eager reference", "torch.compile(reference)"]:
        ratios[base] = {
            "forward": results[base]["forward_ms"] / ours["forward_ms"],
            "forward_backward": results[base]["forward_backward_ms"] / ours["forward_backward_ms"],
        }
        print(f"speed-up over {base}: forward {ratios[base]['forward']:.1f}x, forward+backward {ratios[base]['forward_backward']:.1f}x")
    print(f"u_hat (B*I*J*Dout float32) would be {u_hat_MB:.1f} MB; the cpu backend's largest allocation is {ours['largest_allocation_MB']:.2f} MB")

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "date": datetime.date.today().isoformat(),
            "command": "python bench/cpu_speedup.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
            "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
            "versions": {"torch": torch.__version__, "capsrouting": capsrouting.__version__},
            "shape": dict(B=B, **PAPER),
            "results": results,
            "speedup": ratios,
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
