"""``backend="auto"`` on a GPU: the fastest backend for each case, chosen by measuring it.

The same idea as ``torch.backends.cudnn.benchmark``. The first call of a case (device, dtype,
entry point, problem sizes with the batch rounded up to a power of two, iterations, routing
options, whether a gradient is wanted) runs each backend that can run it a few times on copies
of its inputs (the forward, or forward+backward when a gradient is wanted), keeps the fastest
in a per-process cache and says once which it chose, with the times (the ``capsrouting``
logger). The candidates are the backends the fixed order considers (available, on this device
type, covering the shape and options), each of which passes the test suite: the choice changes
the speed, never the answer. A candidate that fails while measured is left out.

No timing runs under ``torch.compile`` or CUDA graph capture: there the cache answers, else the
fixed order, and it says so once. ``CAPSROUTING_AUTOTUNE=0`` turns measuring off (the fixed
order everywhere). An explicitly named backend is never overridden: only ``"auto"`` gets here.
"""
import dataclasses
import logging
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

logger = logging.getLogger("capsrouting")

ENV_SWITCH = "CAPSROUTING_AUTOTUNE"
# Device types whose "auto" choice is measured (tests add "cpu", with stand-in backends).
MEASURED_DEVICE_TYPES = ("cuda",)
# Runs per candidate: the first also compiles (Triton) or warms caches and is not timed.
WARMUP_RUNS, TIMED_RUNS = 1, 5


@dataclasses.dataclass(frozen=True)
class Case:
    """What one measured choice holds for."""

    device: str
    dtype: str
    entry: str  # "capsule_routing" or "route"
    batch_bucket: int  # B rounded up to a power of two
    I: int
    J: int
    D: int
    K: int  # 0: predictions given (route)
    num_iterations: int
    options: Tuple[str, ...]
    grad: bool

    def describe(self) -> str:
        sizes = f"B<={self.batch_bucket}, I={self.I}, " + (f"Din={self.K} -> " if self.K else "") + f"J={self.J}, D={self.D}"
        extras = [f"R={self.num_iterations}", "forward+backward" if self.grad else "forward"] + list(self.options)
        return f"{self.entry} on {self.device}, {self.dtype}, {sizes}, {', '.join(extras)}"


@dataclasses.dataclass(frozen=True)
class Choice:
    backend: str
    times_ms: Dict[str, float]  # median per measured candidate
    failures: Dict[str, str]  # candidates that raised while measured: why

    def describe(self) -> str:
        times = ", ".join(f"{name} {ms:.3g} ms" for name, ms in sorted(self.times_ms.items(), key=lambda kv: kv[1]))
        failed = "".join(f"; {name} failed: {why}" for name, why in self.failures.items())
        return f"'{self.backend}' ({times}{failed})"


_cache: Dict[Case, Choice] = {}
_announced: set = set()


def batch_bucket(B: int) -> int:
    """The batch size a measured choice holds for: B rounded up to a power of two (0 stays 0)."""
    return 1 << max(0, (B - 1).bit_length()) if B else 0


def enabled() -> bool:
    """Whether measuring is on (``CAPSROUTING_AUTOTUNE`` unset or anything but 0)."""
    return os.environ.get(ENV_SWITCH, "1").strip() != "0"


def measures(device_type: str) -> bool:
    """Whether the automatic choice on tensors of ``device_type`` is measured (else the fixed order)."""
    return device_type in MEASURED_DEVICE_TYPES


def cached_choices() -> Dict[Case, Choice]:
    """The choices measured so far in this process."""
    return dict(_cache)


def describe_cache() -> List[str]:
    """One line per measured choice, for ``python -m capsrouting.info``."""
    return [f"{case.describe()}: {choice.describe()}" for case, choice in _cache.items()]


def clear() -> None:
    """Forget every measured choice (and what was announced)."""
    _cache.clear()
    _announced.clear()


def _capturing(x: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream of x's device."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def time_ms(step: Callable[[], None], device: torch.device, warmup: int = WARMUP_RUNS, runs: int = TIMED_RUNS) -> float:
    """Median milliseconds of ``step`` on ``device`` after ``warmup`` untimed runs (CUDA events on a GPU)."""
    for _ in range(warmup):
        step()
    times = []
    if device.type == "cuda":
        with torch.cuda.device(device):
            for _ in range(runs):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
    else:
        for _ in range(runs):
            begin = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - begin))
    return statistics.median(times)


def _announce(key, message: str) -> None:
    if key not in _announced:
        _announced.add(key)
        logger.info(message)


# Under torch.compile this runs at tracing time with constant arguments, outside the graph: the cache
# is read as it is then and the answer is baked into the graph. The sizes are left out of what it is
# given, since under dynamic shapes they are symbolic: the measured choices of calls of the same kind
# (device, dtype, entry point, options, gradient) answer when they agree.
@torch.compiler.assume_constant_result
def _traced_choice(device_type: str, device_index, dtype: torch.dtype, entry: str, options: tuple, grad: bool,
                   names: tuple) -> str:
    device = str(torch.device(device_type, device_index) if device_index is not None else torch.device(device_type))
    kind = (device, str(dtype).replace("torch.", ""), entry, options, grad)
    measured = {choice.backend for case, choice in _cache.items()
                if (case.device, case.dtype, case.entry, case.options, case.grad) == kind}
    label = f"{entry} on {kind[0]}, {kind[1]}" + "".join(f", {o}" for o in options)
    if len(measured) == 1 and next(iter(measured)) in names:
        [name] = measured
        _announce(("traced", kind, name), "capsrouting: under torch.compile no timing runs: backend 'auto' uses "
                  f"the measured '{name}' for {label}")
        return name
    why = "nothing measured yet" if not measured else "the measured calls of this kind differ"
    _announce(("traced", kind, None), "capsrouting: under torch.compile no timing runs: backend 'auto' uses "
              f"'{names[0]}' (the fixed order; {why}) for {label}")
    return names[0]


class Problem:
    """One call of an entry point, as the automatic choice measures it: its case and a way to run
    any backend on copies of its inputs."""

    def __init__(self, entry: str, x: torch.Tensor, W: Optional[torch.Tensor], num_iterations: int, options):
        self.entry, self.x, self.W, self.num_iterations, self.options = entry, x, W, num_iterations, options
        tensors = (x, W, options.bias, options.logit_prior)
        self.grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

    def case(self) -> Case:
        x, W = self.x, self.W
        B = x.shape[0]
        I, J, D, K = W.shape if W is not None else (*x.shape[1:], 0)
        return Case(str(x.device), str(x.dtype).replace("torch.", ""), self.entry, batch_bucket(B), I, J, D, K,
                    self.num_iterations, self.options.active(), self.grad)

    def choose(self, candidates: Sequence) -> object:
        """The candidate (a Backend, in the fixed order) to run this call: measured, cached or the first."""
        names = tuple(b.name for b in candidates)
        by_name = dict(zip(names, candidates))
        if torch.compiler.is_compiling():
            x = self.x
            return by_name[_traced_choice(x.device.type, x.device.index, x.dtype, self.entry, self.options.active(),
                                          self.grad, names)]
        case = self.case()
        choice = _cache.get(case)
        if choice is not None and choice.backend in by_name:
            return by_name[choice.backend]
        why = self._why_not_measuring(case)
        if why is not None:
            _announce(("unmeasured", case), f"capsrouting: {why}, no timing runs: backend 'auto' uses "
                      f"'{names[0]}' (the fixed order) for {case.describe()}")
            return candidates[0]
        choice = self._measure(candidates)
        _cache[case] = choice
        _announce(("measured", case), f"capsrouting: backend 'auto' measured {case.describe()}: chose {choice.describe()}")
        return by_name[choice.backend]

    def _why_not_measuring(self, case: Case) -> Optional[str]:
        if not enabled():
            return f"{ENV_SWITCH}=0"
        if _capturing(self.x):
            return "during CUDA graph capture"
        if case.batch_bucket == 0:
            return "an empty batch"
        return None

    def _measure(self, candidates: Sequence) -> Choice:
        times, failures = {}, {}
        for backend in candidates:
            try:
                times[backend.name] = time_ms(self._step(backend), self.x.device)
            except Exception as exc:  # out of memory, a kernel that does not compile here: not a candidate
                failures[backend.name] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"
        if not times:  # every candidate failed: the fixed order's first runs the call, and raises as it would
            return Choice(candidates[0].name, times, failures)
        return Choice(min(times, key=times.get), times, failures)

    def _step(self, backend) -> Callable[[], None]:
        """One run of ``backend`` on detached copies of the inputs (their gradients, if wanted, are discarded)."""
        leaves = [t.detach().requires_grad_(self.grad and t.requires_grad) if t is not None else None
                  for t in (self.x, self.W, self.options.bias, self.options.logit_prior)]
        x, W, bias, prior = leaves
        options = dataclasses.replace(self.options, bias=bias, logit_prior=prior)
        args = (x, W, self.num_iterations) if W is not None else (x, self.num_iterations)
        if options.active():
            args = args + (options,)
        run = getattr(backend, self.entry)
        wanted = [t for t in leaves if t is not None and t.requires_grad]

        def step():
            with torch.autocast(x.device.type, enabled=False), torch.set_grad_enabled(self.grad):
                out = run(*args)
                v = out[0] if options.return_couplings else out
                if self.grad:
                    torch.autograd.grad(v, wanted, torch.ones_like(v))

        return step
