"""Which routing backend runs: the registry, availability probes and the automatic choice.

Every backend implements the same two entry points on validated input:
``capsule_routing(u, W, num_iterations)`` and ``route(u_hat, num_iterations)``, u (B, I, Din)
and u_hat (B, I, J, D) with one leading dim. A backend that supports routing options
(DESIGN.md §6) lists them in ``options`` and takes them as a further argument, a
:class:`~capsrouting.functional.RoutingOptions`, when any is on.
An automatic choice falls back quietly to the next backend (and warns once when
a preferred one is missing); an explicitly requested backend that cannot run
raises ``ValueError`` naming what is missing.
"""
import dataclasses
import logging
import warnings
from typing import Callable, FrozenSet, Optional, Tuple

import torch

logger = logging.getLogger("capsrouting")


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    description: str
    # Device types ("cpu", "cuda") whose tensors this backend accepts.
    device_types: Callable[[], Tuple[str, ...]]
    # None when usable, else the reason it is not.
    probe: Callable[[], Optional[str]]
    capsule_routing: Callable
    route: Callable
    # (x, W or None) -> None if this backend handles the shape, else why not.
    shape_reason: Callable = lambda x, W: None
    # The routing options (DESIGN.md §6) it runs; any other that is on sends the call elsewhere.
    options: FrozenSet[str] = frozenset()

    def options_reason(self, active: Tuple[str, ...]) -> Optional[str]:
        """None if this backend runs with the options ``active`` on, else why not."""
        missing = [name for name in active if name not in self.options]
        if not missing:
            return None
        return f"the {self.name} backend does not support {', '.join(missing)} (DESIGN.md §6) yet"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What every backend sums in for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_REGISTRY: dict = {}
# Automatic choice, fastest first, per device type.
_PREFERENCE = {"cuda": ["triton", "cuda", "torch"], "cpu": ["cpu", "torch"]}


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


_reasons: dict = {}


# Probed once per process and outside any graph: a first call inside torch.compile (which
# may load, or even compile, the C++ extension) runs for real and its answer is a constant.
@torch.compiler.assume_constant_result
def unavailable_reason(name: str) -> Optional[str]:
    """None if the backend can run here, else why not (probed once, then cached)."""
    if name not in _reasons:
        _reasons[name] = _probe(name)
    return _reasons[name]


def _probe(name: str) -> Optional[str]:
    if name not in _REGISTRY:
        return "unknown backend"
    try:
        return _REGISTRY[name].probe()
    except Exception as exc:  # a probe must never take the import down with it
        return f"probe failed: {type(exc).__name__}: {exc}"


def get(name: str) -> Backend:
    """The registered backend called ``name`` (KeyError if none is)."""
    return _REGISTRY[name]


def available_backends() -> list:
    """Names of the backends usable right now, in registration order."""
    return [name for name in _REGISTRY if unavailable_reason(name) is None]


def backend_report() -> dict:
    """{name: None if available else reason} for every registered backend."""
    return {name: unavailable_reason(name) for name in _REGISTRY}


def _describe_choices() -> str:
    parts = []
    for name, reason in backend_report().items():
        parts.append(f"'{name}' (available)" if reason is None else f"'{name}' (unavailable: {reason})")
    return "; ".join(parts)


_announced: set = set()


def _in_functorch_transform() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, ...) is running; never under torch.compile."""
    return not torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is not None


def _announce_once(key, message: str, warn: bool, stacklevel: int = 6) -> None:
    if key in _announced:
        return
    _announced.add(key)
    if warn:  # stacklevel: the caller of capsule_routing or route, from choose_automatically
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
    else:
        logger.info(message)


def _runnable(device_type: str, x: torch.Tensor, W: Optional[torch.Tensor], options: Tuple[str, ...]):
    """(backend, None) for each backend of the preference order that runs this problem, (name, why
    not) for each that does not, in that order."""
    for name in _PREFERENCE.get(device_type, ["torch"]):
        if name not in _REGISTRY:
            continue
        reason = unavailable_reason(name)
        if reason is None and device_type not in _REGISTRY[name].device_types():
            reason = f"does not run on {device_type} tensors"
        if reason is None:
            reason = _REGISTRY[name].shape_reason(x, W)
        if reason is None:
            reason = _REGISTRY[name].options_reason(options)
        yield (_REGISTRY[name], None) if reason is None else (name, reason)


def choose_automatically(device_type: str, x: torch.Tensor, W: Optional[torch.Tensor] = None,
                         options: Tuple[str, ...] = (), problem=None) -> Backend:
    """What ``backend="auto"`` runs for a problem shaped like ``x`` (u, or u_hat when ``W``
    is None) on tensors of ``device_type`` with the routing ``options`` on: the first backend of
    the preference order that is available, runs on that device type and covers the shape and
    options. Only shapes and dtypes of ``x`` and ``W`` are read, so meta tensors describe a
    problem without allocating it. With ``problem`` (an ``autotune.Problem``), every backend that
    runs it is a candidate and ``problem.choose`` picks one (by measuring, see ``autotune``).

    Skipping a backend that exists but cannot run here warns once per (device type, choice).
    """
    skipped, candidates = [], []
    for backend, reason in _runnable(device_type, x, W, options):
        if reason is not None:
            if not candidates:
                skipped.append((backend, reason))
            continue
        candidates.append(backend)
        if problem is None:
            break
    if not candidates:
        raise ValueError(f"no backend runs on {device_type} tensors; backends: {_describe_choices()}")
    first = candidates[0]
    if skipped:
        why = "; ".join(f"'{n}': {r}" for n, r in skipped)
        _announce_once((device_type, first.name), f"capsrouting: using backend '{first.name}' for {device_type} tensors ({why})", warn=True)
    if len(candidates) > 1:
        return problem.choose(candidates)
    if not skipped:
        _announce_once((device_type, first.name), f"capsrouting: using backend '{first.name}' for {device_type} tensors", warn=False)
    return first


def resolve(backend: str, x: torch.Tensor, W: Optional[torch.Tensor] = None, options: Tuple[str, ...] = (),
            problem=None) -> Backend:
    """The backend that runs for input ``x`` (u, or u_hat when ``W`` is None) with ``options`` on;
    ``problem`` (an ``autotune.Problem``): "auto" chooses among the candidates by measuring."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string such as 'auto' or 'torch', got {backend!r}")
    device = x.device
    if backend == "auto":
        if problem is not None and _in_functorch_transform():
            problem = None  # the transform runs "torch" whatever is chosen: nothing to measure
        return _unless_in_functorch_transform(backend, choose_automatically(device.type, x, W, options, problem))
    reason = unavailable_reason(backend)
    if reason is not None:
        raise ValueError(
            f"backend must be 'auto' or an available backend, got '{backend}'; backends: {_describe_choices()}"
        )
    selected = _REGISTRY[backend]
    if device.type not in selected.device_types():
        raise ValueError(
            f"backend '{backend}' runs on {', '.join(selected.device_types())} tensors, "
            f"got tensors on {device}; backends: {_describe_choices()}"
        )
    reason = selected.shape_reason(x, W) or selected.options_reason(options)
    if reason is not None:
        raise ValueError(f"backend '{backend}' cannot run this problem: {reason}")
    return _unless_in_functorch_transform(backend, selected)


def _unless_in_functorch_transform(asked: str, chosen: Backend) -> Backend:
    """``chosen``, or backend "torch" inside a torch.func transform: the fused ops have no functorch
    rules, the reference is plain PyTorch and composes with them. A backend asked for by name says so once."""
    if chosen.name == "torch" or not _in_functorch_transform():
        return chosen
    _announce_once(("functorch", asked), f"capsrouting: inside a torch.func transform, backend '{chosen.name}' "
                   "runs as 'torch' (the reference: the fused kernels have no functorch rules)", warn=asked != "auto",
                   stacklevel=6)
    return _REGISTRY["torch"]
