"""``python -m capsrouting.info``: versions, backends, a self-check of each, and their speed.

Each available backend runs a small routing problem (forward and gradients of both
entry points) against the float64 reference on every device it supports, within the
float32 tolerance of the tests (a failure exits non-zero). Then the paper's layer at
batch 32 is timed, forward+backward, for each fused backend against the eager
reference and ``torch.compile`` of it (``--no-timing`` skips this).
"""
import platform
import statistics
import sys
import time
from pathlib import Path

from typing import List, Optional, Tuple

import torch

from . import __version__, _extension, autotune, backends, reference
from ._cli import OneLineParser
from .functional import capsule_routing, route
from .tolerances import TOLERANCES, within_tolerance


def cpu_name() -> str:
    """The processor's model name (Linux), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> list:
    lines = [
        f"capsrouting {__version__}",
        f"python      {platform.python_version()} ({platform.machine()})",
        f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
    ]
    try:
        import triton

        lines.append(f"triton      {triton.__version__}")
    except ImportError:
        lines.append("triton      not installed")
    if torch.cuda.is_available():
        lines.append(f"GPU         {torch.cuda.get_device_name()}")
    else:
        lines.append("GPU         none visible")
    return lines


def _self_check(name: str, device: str) -> Tuple[bool, str]:
    """Forward and gradients of both entry points in float32 against the float64 reference.

    Returns (within the float32 tolerance of the tests, one line with the largest errors).
    """
    g = torch.Generator().manual_seed(0)
    u64 = torch.randn(3, 37, 8, generator=g, dtype=torch.float64)
    W64 = torch.randn(37, 10, 16, 8, generator=g, dtype=torch.float64) / 8**0.5
    grad64 = torch.randn(3, 10, 16, generator=g, dtype=torch.float64)
    u_hat64 = reference.predictions(u64, W64)
    cases = [
        ("capsule_routing", lambda a, b: capsule_routing(a, b, 3, backend=name), reference.capsule_routing, [u64, W64]),
        ("route", lambda a: route(a, 3, backend=name), reference.route, [u_hat64]),
    ]
    ok, parts = True, []
    for label, run, run_reference, inputs64 in cases:
        ref_inputs = [t.clone().requires_grad_() for t in inputs64]
        v_ref = run_reference(*ref_inputs, 3)
        wanted = [v_ref, *torch.autograd.grad(v_ref, ref_inputs, grad64)]
        inputs = [t.float().to(device).requires_grad_() for t in inputs64]
        v = run(*inputs)
        got = [v, *torch.autograd.grad(v, inputs, grad64.float().to(device))]
        ok &= all(within_tolerance(a, b, torch.float32) for a, b in zip(got, wanted))
        errors = " / ".join(f"{(a.double().cpu() - b).abs().max().item():.1e}" for a, b in zip(got, wanted))
        parts.append(f"{label} {errors}")
    rtol, atol = TOLERANCES[torch.float32]
    line = f"max |error| vs float64 reference (float32; v / gradients): {'; '.join(parts)}"
    if not ok:
        line += f"  OUTSIDE the float32 tolerance (rtol {rtol:g}, atol {atol:g})"
    return ok, line


# The paper's digit-capsule layer, as meta tensors: the automatic choice reads only shapes.
_PAPER_LAYER = dict(u=(1, 1152, 8), W=(1152, 10, 16, 8))


def auto_choices(device_types: List[str]) -> List[str]:
    """One line per device type: the backend ``backend="auto"`` runs for the paper's layer."""
    u = torch.empty(_PAPER_LAYER["u"], device="meta")
    W = torch.empty(_PAPER_LAYER["W"], device="meta")
    return [
        f"backend='auto' runs '{backends.choose_automatically(device, u, W).name}' for {device} tensors (paper layer)"
        for device in device_types
    ]


def _median_ms(step, budget_s: float = 0.5, max_runs: int = 20) -> float:
    step()  # warm-up (and, for torch.compile, the compilation)
    times = []
    while len(times) < 3 or (sum(times) < budget_s * 1e3 and len(times) < max_runs):
        start = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def speed_lines(device: str, batch: int = 32, backend_names: Optional[List[str]] = None) -> List[str]:
    """Forward+backward of the paper's layer at ``batch``: each fused backend available on
    ``device`` against the eager reference and ``torch.compile`` of it (medians, float32)."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, 1152, 8, generator=g).to(device).requires_grad_()
    W = (0.01 * torch.randn(1152, 10, 16, 8, generator=g)).to(device).requires_grad_()
    grad = torch.randn(batch, 10, 16, generator=g).to(device)

    def timed(run):
        def step():
            torch.autograd.grad(run(u, W), (u, W), grad)
            if device == "cuda":
                torch.cuda.synchronize()

        try:
            return _median_ms(step)
        except Exception as exc:  # e.g. torch.compile without a working compiler: say so, go on
            return f"not timed ({type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:120]})"

    def ratio(a, b):
        return f"{a / b:.1f}x" if isinstance(a, float) and isinstance(b, float) else "n/a"

    def ms(t):
        return f"{t:8.2f} ms" if isinstance(t, float) else t

    compiled = torch.compile(lambda a, b: reference.capsule_routing(a, b, 3))
    eager_ms = timed(lambda a, b: capsule_routing(a, b, 3, backend="torch"))
    compiled_ms = timed(compiled)
    lines = [f"speed on {device}, paper layer (B={batch}, 1152 x 8 -> 10 x 16, 3 iterations), forward+backward, float32:",
             f"  eager reference      {ms(eager_ms)}",
             f"  torch.compile of it  {ms(compiled_ms)}   ({ratio(eager_ms, compiled_ms)} eager)"]
    names = backend_names if backend_names is not None else backends.available_backends()
    for name in names:
        if name == "torch" or device not in backends.get(name).device_types():
            continue
        if name == "triton" and device == "cpu":  # the interpreter: a test tool, not a speed
            continue
        t = timed(lambda a, b, name=name: capsule_routing(a, b, 3, backend=name))
        lines.append(f"  backend {name:12s} {ms(t)}   ({ratio(eager_ms, t)} eager, {ratio(compiled_ms, t)} compiled)")
    if autotune.measures(device):  # its first call measures the candidates (autotune), then runs the fastest
        t = timed(lambda a, b: capsule_routing(a, b, 3))
        lines.append(f"  backend {'auto':12s} {ms(t)}   ({ratio(eager_ms, t)} eager, {ratio(compiled_ms, t)} compiled)")
    return lines


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m capsrouting.info", description=__doc__.splitlines()[0])
    parser.add_argument("--no-timing", action="store_true", help="skip the speed comparison")
    args = parser.parse_args(argv)
    print("\n".join(_versions()))
    print("\nbackends:")
    failures = 0
    for name, reason in backends.backend_report().items():
        if reason is not None:
            print(f"  {name:7s} unavailable: {reason}")
            continue
        print(f"  {name:7s} available: {backends.get(name).description}")
        if name == "cpu":
            try:
                print(f"          CPU kernels: {_extension.cpu_kernel_level()}")
            except RuntimeError as exc:  # a bad CAPSROUTING_CPU_ISA: the self-check below fails too
                print(f"          CPU kernels: {exc}")
        for device in backends.get(name).device_types():
            if device == "cuda" and not torch.cuda.is_available():
                continue
            try:
                ok, line = _self_check(name, device)
            except Exception as exc:  # report, keep checking the others
                ok, line = False, f"FAILED: {type(exc).__name__}: {exc}"
            failures += not ok
            print(f"          on {device}: {line}")
    print()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("\n".join(auto_choices(devices)))
    if not args.no_timing and not failures:
        for device in devices:
            print()
            print("\n".join(speed_lines(device)), flush=True)
    measured = autotune.describe_cache()
    if measured:
        print("\nbackend='auto' measured in this process:")
        print("\n".join(f"  {line}" for line in measured))
    if failures:
        print(f"\ninfo: {failures} self-check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
