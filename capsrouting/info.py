"""``python -m capsrouting.info``: versions, backends and a quick self-check of each.

Each available backend runs a small routing problem (forward and gradients)
against the float64 reference on every device it supports, so a user sees at
once which backends work on this machine and how exactly.
"""
import platform
import sys

from typing import List, Tuple

import torch

from . import __version__, backends, reference
from .functional import capsule_routing, route
from .tolerances import TOLERANCES, within_tolerance


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


def main() -> int:
    print("\n".join(_versions()))
    print("\nbackends:")
    failures = 0
    for name, reason in backends.backend_report().items():
        if reason is not None:
            print(f"  {name:7s} unavailable: {reason}")
            continue
        print(f"  {name:7s} available: {backends.get(name).description}")
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
    print("\n".join(auto_choices(["cpu"] + (["cuda"] if torch.cuda.is_available() else []))))
    if failures:
        print(f"\ninfo: {failures} self-check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
