"""``python -m capsrouting.info``: versions, backends and a quick self-check of each.

Each available backend runs a small routing problem (forward and gradients)
against the float64 reference on every device it supports, so a user sees at
once which backends work on this machine and how exactly.
"""
import platform
import sys

import torch

from . import __version__, backends, reference
from .functional import capsule_routing


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


def _self_check(name: str, device: str) -> str:
    """Largest error of forward and gradients against the float64 reference."""
    g = torch.Generator().manual_seed(0)
    u64 = torch.randn(3, 37, 8, generator=g, dtype=torch.float64)
    W64 = 0.1 * torch.randn(37, 10, 16, 8, generator=g, dtype=torch.float64)
    grad64 = torch.randn(3, 10, 16, generator=g, dtype=torch.float64)
    ref_inputs = [u64.clone().requires_grad_(), W64.clone().requires_grad_()]
    v_ref = reference.capsule_routing(*ref_inputs, 3)
    ref_grads = torch.autograd.grad(v_ref, ref_inputs, grad64)

    u = u64.float().to(device).requires_grad_()
    W = W64.float().to(device).requires_grad_()
    v = capsule_routing(u, W, 3, backend=name)
    grads = torch.autograd.grad(v, (u, W), grad64.float().to(device))
    errors = [(v.double().cpu() - v_ref).abs().max().item()]
    errors += [(gr.double().cpu() - rg).abs().max().item() for gr, rg in zip(grads, ref_grads)]
    return f"max |error| vs float64 reference (float32, forward / du / dW): {errors[0]:.1e} / {errors[1]:.1e} / {errors[2]:.1e}"


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
                print(f"          on {device}: {_self_check(name, device)}")
            except Exception as exc:  # report, keep checking the others
                failures += 1
                print(f"          on {device}: FAILED: {type(exc).__name__}: {exc}")
    print()
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        chosen = backends.resolve("auto", torch.empty(1, 1, 1, device=device)).name
        print(f"backend='auto' runs '{chosen}' for {device} tensors")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
