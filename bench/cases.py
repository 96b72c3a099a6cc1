"""What the benchmarks measure, shared by the pytest-benchmark suite and the report.

A case is (backend, shape, pass). Backends: "reference" (the eager pure-PyTorch op,
backend "torch"), "compiled" (``torch.compile`` of it), and every fused backend that runs
on the device ("cpu", "cuda", "triton"). Passes: "forward" (no autograd) and
"forward+backward" (gradients of u and W).
"""
import dataclasses
import time
from typing import Callable, List, Optional

import torch

import capsrouting
from capsrouting import backends, torch_backend

PASSES = ("forward", "forward+backward")
# Compared against the eager reference in the same dtype before timing: a sanity check of
# the benchmarked code (accuracy itself is the test suite's job, with tighter tolerances).
CHECK_TOLERANCE = {torch.float32: dict(rtol=1e-3, atol=1e-4), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


@dataclasses.dataclass(frozen=True)
class Shape:
    B: int
    I: int  # noqa: E741  (the paper's name)
    Din: int
    J: int
    Dout: int
    R: int
    dtype: torch.dtype = torch.float32
    # How "compiled" compiles the reference: Inductor, or aot_eager in the quick check (--fast), where
    # the timings mean nothing and Inductor's code generation would only cost minutes of CI.
    compile_backend: str = "inductor"

    @property
    def label(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return f"B{self.B}-I{self.I}-Din{self.Din}-J{self.J}-Dout{self.Dout}-R{self.R}-{dtype}"


PAPER = Shape(128, 1152, 8, 10, 16, 3)


def sweep(device: str, fast: bool = False, paper_layer_only: bool = False) -> List[Shape]:
    """The paper's layer over batch sizes, then I, J and iterations varied one at a time (B = 32).

    ``paper_layer_only``: the batch sizes alone (the cases the speed targets are set on)."""
    if fast:  # tiny shapes: keeps the benchmark code exercised in CI
        return [Shape(2, 16, 3, 4, 5, 2, compile_backend="aot_eager")]
    shapes = [dataclasses.replace(PAPER, B=B) for B in (1, 2, 4, 8, 16, 32, 128, 512)]
    if paper_layer_only:
        return shapes
    base = dataclasses.replace(PAPER, B=32)
    shapes += [dataclasses.replace(base, I=I) for I in (4608, 18432)]
    shapes += [dataclasses.replace(base, J=J) for J in (32, 64)]
    shapes += [dataclasses.replace(base, R=R) for R in (1, 5)]
    if device == "cpu" or torch.cuda.is_bf16_supported():  # bfloat16 where the device has it
        shapes.append(dataclasses.replace(PAPER, dtype=torch.bfloat16))
    return shapes


def available_backends(device: str) -> List[str]:
    fused = [name for name in ("triton", "cuda", "cpu") if backends.unavailable_reason(name) is None
             and device in backends.get(name).device_types()]
    return ["reference", "compiled"] + fused


def skip_reason(backend: str, shape: Shape, device: str):
    """None if this backend can run this shape here, else why not."""
    if backend in ("reference", "compiled"):
        return None
    x = torch.empty(shape.B, shape.I, shape.Din, dtype=shape.dtype, device="meta")
    W = torch.empty(shape.I, shape.J, shape.Dout, shape.Din, dtype=shape.dtype, device="meta")
    return backends.get(backend).shape_reason(x, W)


def _compiled(fn: Callable, shape: Shape) -> Callable:
    # A fresh compile per case: dynamo caches per code object, and a sweep of shapes and
    # passes would otherwise hit its recompile limit and silently run the eager code.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False, backend=shape.compile_backend)


# The routing options of DESIGN.md §6 as benchmark variants, as public CapsNets use them (README): the
# official code's bias, XifengGuo's detach_inner (a one-pass backward), naturomics' both, adambielski's
# learned prior, and leaky routing.
OPTION_VARIANTS = ("none", "bias", "detach_inner", "bias+detach_inner", "logit_prior+leaky")


def option_kwargs(variant: str, shape: Shape, device: str) -> dict:
    """The routing options of ``variant``; their tensors are learned parameters (they require gradients)."""
    kwargs = {}
    names = () if variant == "none" else variant.split("+")
    g = torch.Generator().manual_seed(2)
    if "bias" in names:
        kwargs["bias"] = torch.full((shape.J, shape.Dout), 0.1)
    if "logit_prior" in names:
        kwargs["logit_prior"] = 0.1 * torch.randn(shape.I, shape.J, generator=g)
    for flag in ("leaky", "detach_inner"):
        if flag in names:
            kwargs[flag] = True
    return {k: v.to(device=device, dtype=shape.dtype).requires_grad_() if isinstance(v, torch.Tensor) else v
            for k, v in kwargs.items()}


def routing_fn(backend: str, shape: Shape, options: Optional[dict] = None) -> Callable:
    """``fn(u, W, **option_tensors)`` of one backend; ``options`` are the flags (the tensors are passed in)."""
    R = shape.R
    flags = {k: v for k, v in (options or {}).items() if not isinstance(v, torch.Tensor)}
    if backend in ("reference", "compiled"):
        if options:
            eager = lambda u, W, **t: capsrouting.capsule_routing(u, W, R, backend="torch", **t, **flags)  # noqa: E731
        else:
            eager = lambda u, W: torch_backend.capsule_routing(u, W, R)  # noqa: E731
        return eager if backend == "reference" else _compiled(eager, shape)
    return lambda u, W, **tensors: capsrouting.capsule_routing(u, W, R, backend=backend, **tensors, **flags)


def make_inputs(shape: Shape, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape.B, shape.I, shape.Din, generator=g)
    W = torch.randn(shape.I, shape.J, shape.Dout, shape.Din, generator=g) / shape.Din**0.5 / shape.I**0.25
    grad_v = torch.randn(shape.B, shape.J, shape.Dout, generator=g)
    cast = dict(device=device, dtype=shape.dtype)
    return u.to(**cast).requires_grad_(), W.to(**cast).requires_grad_(), grad_v.to(**cast)


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_runner(backend: str, shape: Shape, pass_: str, device: str, variant: str = "none") -> Callable[[], None]:
    """A no-argument callable that runs one pass of one case (and waits for the device); forward+backward
    takes the gradients of u, W and the option tensors of ``variant``."""
    options = option_kwargs(variant, shape, device)
    fn = routing_fn(backend, shape, options)
    tensors = {k: v for k, v in options.items() if isinstance(v, torch.Tensor)}
    u, W, grad_v = make_inputs(shape, device)

    def forward():
        with torch.no_grad():
            fn(u, W, **tensors)
        _synchronize(device)

    def forward_backward():
        torch.autograd.grad(fn(u, W, **tensors), (u, W, *tensors.values()), grad_v)
        _synchronize(device)

    return forward if pass_ == "forward" else forward_backward


def check(backend: str, shape: Shape, device: str, variant: str = "none") -> None:
    """Forward and every gradient of ``backend`` against the eager reference, same inputs."""
    if backend == "reference":
        return
    u, W, grad_v = make_inputs(shape, device)
    options = option_kwargs(variant, shape, device)
    tensors = {k: v for k, v in options.items() if isinstance(v, torch.Tensor)}
    results = []
    for name in (backend, "reference"):
        v = routing_fn(name, shape, options)(u, W, **tensors)
        results.append([v, *torch.autograd.grad(v, (u, W, *tensors.values()), grad_v)])
    for label, got, want in zip(["v", "du", "dW", *(f"d{k}" for k in tensors)], *results):
        torch.testing.assert_close(got.float(), want.float(), **CHECK_TOLERANCE[shape.dtype],
                                   msg=lambda m: f"{backend} {shape.label} {label}: {m}")


def adaptive_median_ms(run: Callable[[], None], repeats: int) -> float:
    """Median over at least ``repeats`` runs, more for fast cases (about half a second of them)."""
    first = median_ms(run, 3, warmup=1)
    return median_ms(run, max(repeats, min(200, int(500 / max(first, 1e-3)))), warmup=0)


def median_ms(run: Callable[[], None], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * times[len(times) // 2]
