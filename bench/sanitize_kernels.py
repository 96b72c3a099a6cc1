"""Run every fused GPU kernel once, small, for compute-sanitizer.

    compute-sanitizer --tool memcheck python3 bench/sanitize_kernels.py [--backend cuda|triton] [--case NAME]

For each backend (`cuda`, `triton`) and each case below: forward and backward of both entry
points, `capsule_routing(u, W)` and `route(u_hat)`. The cases are chosen to reach every launch
path (split input capsules and one launch per forward, batch-chunked weight gradients, masked
lanes, the largest sizes, each dtype); each case line says which Triton path it took. Every
result is also compared with the float64 reference, loosely (the test suite owns the exact
tolerances), so a kernel that writes the wrong places fails here even where the sanitizer
sees nothing. Exit status 0: every case ran and matched; 1: a case failed or a backend is
unavailable; 2: bad usage.

Without a GPU, `TRITON_INTERPRET=1 ... --backend triton --device cpu` runs the Triton cases
in Triton's interpreter: how CI keeps this script working.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from capsrouting import backends, capsule_routing, reference, route, triton_backend  # noqa: E402

# Largest |error| / largest |reference value| accepted per dtype: a kernel that reads or
# writes the wrong places is off by O(1), far beyond these.
RELATIVE_ERROR = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    B: int
    I: int  # noqa: E741  (the paper's name)
    Din: int
    J: int
    Dout: int
    R: int
    dtype: torch.dtype
    why: str

    @property
    def label(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return f"B{self.B} I{self.I} Din{self.Din} J{self.J} Dout{self.Dout} R{self.R} {dtype}"


def cases(device: torch.device) -> list:
    # The Triton forward splits the input capsules over several programs per batch tile until
    # the batch tiles alone give 4 programs per SM (triton_backend.launch_plan):
    # "one-launch" takes that many tiles of batch elements, so that its single-launch path runs too.
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    tile = triton_backend.launch_config(10, 16, 8, 4).BLOCK_B
    f32, f64 = torch.float32, torch.float64
    return [
        Case("paper", 3, 40, 8, 10, 16, 3, f32, "the paper's capsule sizes, a small batch"),
        Case("odd", 2, 17, 3, 5, 7, 2, f32, "no size a power of two: every masked lane"),
        Case("one-iteration", 2, 6, 4, 3, 4, 1, f32, "R = 1: no agreement step"),
        Case("largest", 2, 9, 16, 64, 32, 3, f32, "the largest J, Dout, Din the kernels take"),
        Case("largest-float64", 2, 9, 16, 64, 32, 3, f64, "float64 state past 48 KB of shared memory (cuda)"),
        Case("float64", 3, 40, 8, 10, 16, 3, f64, "float64 inputs and sums"),
        Case("bfloat16", 3, 40, 8, 10, 16, 3, torch.bfloat16, "bfloat16 inputs, float32 sums"),
        Case("float16", 3, 40, 8, 10, 16, 3, torch.float16, "float16 inputs, float32 sums"),
        Case("one-launch", 4 * sms * tile, 8, 8, 10, 16, 3, f32, "a batch that fills the GPU: one launch per forward"),
        Case("chunked-dW", 64, 5, 2, 3, 4, 2, f32, "few input capsules: the weight gradient in batch chunks"),
    ]


def triton_paths(case: Case, device: torch.device, with_weights: bool) -> dict:
    """How the Triton launchers split this case: input-capsule slices and weight-gradient chunks."""
    element_size = torch.empty(0, dtype=case.dtype).element_size()
    Din = case.Din if with_weights else 0
    plan = triton_backend.launch_plan(case.B, case.I, case.J, case.Dout, Din, element_size,
                                      triton_backend._program_target(device))
    return dict(splits=max(plan.splits, plan.reduce_splits), chunks=plan.chunks)


def relative_error(got: torch.Tensor, want64: torch.Tensor) -> float:
    got64 = got.detach().double().cpu()
    if not torch.isfinite(got64).all():
        return float("inf")
    return ((got64 - want64).abs().max() / want64.abs().max().clamp_min(1e-30)).item()


def run_case(backend: str, entry: str, case: Case, device: torch.device) -> tuple:
    """(ok, line): forward and gradients of one entry point against the float64 reference."""
    g = torch.Generator().manual_seed(0)
    u64 = torch.randn(case.B, case.I, case.Din, generator=g, dtype=torch.float64)
    W64 = torch.randn(case.I, case.J, case.Dout, case.Din, generator=g, dtype=torch.float64) / case.Din**0.5
    grad64 = torch.randn(case.B, case.J, case.Dout, generator=g, dtype=torch.float64)
    if entry == "capsule_routing":
        inputs64, run, run_reference = [u64, W64], capsule_routing, reference.capsule_routing
    else:
        inputs64, run, run_reference = [reference.predictions(u64, W64)], route, reference.route

    x, W = inputs64[0].to(case.dtype), (inputs64[1].to(case.dtype) if len(inputs64) == 2 else None)
    reason = backends.get(backend).shape_reason(x, W)
    if reason is not None:
        return True, f"skipped: {reason}"
    # The reference sees the inputs as the backend does: rounded to the case's dtype.
    ref_inputs = [t.to(case.dtype).double().requires_grad_() for t in inputs64]
    v_ref = run_reference(*ref_inputs, case.R)
    wanted = [v_ref.detach(), *torch.autograd.grad(v_ref, ref_inputs, grad64)]

    inputs = [t.to(device=device, dtype=case.dtype).requires_grad_() for t in inputs64]
    v = run(*inputs, case.R, backend=backend)
    got = [v, *torch.autograd.grad(v, inputs, grad64.to(device=device, dtype=case.dtype))]
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # an asynchronous kernel error surfaces at its own case
    errors = [relative_error(a, b) for a, b in zip(got, wanted)]
    ok = max(errors) <= RELATIVE_ERROR[case.dtype]
    text = " / ".join(f"{e:.1e}" for e in errors)
    return ok, f"{'ok' if ok else 'WRONG'}: relative error (v / gradients) {text}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", action="append", choices=["cuda", "triton"],
                        help="repeatable; default: both")
    parser.add_argument("--case", action="append", help="run only this case (repeatable); default: all")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for the Triton interpreter")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    chosen = cases(device)
    if args.case:
        unknown = sorted(set(args.case) - {c.name for c in chosen})
        if unknown:
            parser.error(f"unknown case(s) {', '.join(unknown)}; cases: {', '.join(c.name for c in chosen)}")
        chosen = [c for c in chosen if c.name in args.case]

    failures = 0
    for backend in args.backend or ["cuda", "triton"]:
        why_not = backends.unavailable_reason(backend)
        if why_not is None and device.type not in backends.get(backend).device_types():
            why_not = f"does not run on {device.type} tensors"
        if why_not is not None:
            print(f"{backend}: UNAVAILABLE: {why_not}", flush=True)
            failures += 1
            continue
        seen_paths = set()
        for case in chosen:
            for entry in ("capsule_routing", "route"):
                paths = ""
                if backend == "triton":
                    p = triton_paths(case, device, entry == "capsule_routing")
                    seen_paths.add(("splits>1" if p["splits"] > 1 else "splits=1", "chunks>1" if p["chunks"] > 1 else "chunks=1"))
                    paths = f" [input-capsule splits {p['splits']}, dW chunks {p['chunks']}]"
                print(f"{backend} {entry:15s} {case.name:16s} ({case.label}; {case.why}){paths}", flush=True)
                try:
                    ok, line = run_case(backend, entry, case, device)
                except Exception as exc:  # report and go on: the sanitizer log needs every case
                    ok, line = False, f"FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                failures += not ok
                print(f"    {line}", flush=True)
        if backend == "triton" and device.type == "cuda" and not args.case:
            # The cases must reach both forward paths and the chunked weight gradient.
            reached = {x for pair in seen_paths for x in pair}
            missing = {"splits>1", "splits=1", "chunks>1"} - reached
            if missing:
                print(f"triton: launch paths NOT reached by these cases: {', '.join(sorted(missing))}")
                failures += 1
    print(f"sanitize_kernels: {'all cases passed' if not failures else f'{failures} FAILED'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
