"""Peak memory of one call: what the call itself allocates beyond what was live before it.

On CUDA, ``torch.cuda.max_memory_allocated``. On CPU, torch has no allocator statistics,
so the profiler's memory events (every allocation and free, in order) are replayed and
the running total's maximum is taken: the op's own allocations, outputs included.
"""
from typing import Callable

import torch


def _cpu_allocation_events(run: Callable[[], None]) -> list:
    """(time, bytes) of every CPU allocation (positive) and free (negative) during run(), in order."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    tree = prof.profiler.kineto_results.experimental_event_tree()
    return sorted((n.start_time_ns, n.extra_fields.alloc_size) for n in walk(tree)
                  if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu")


def _cpu_peak_bytes(run: Callable[[], None]) -> int:
    live = peak = 0
    for _, size in _cpu_allocation_events(run):
        live += size
        peak = max(peak, live)
    return peak


def largest_allocation_bytes(run: Callable[[], None]) -> int:
    """The largest single CPU allocation of run(): shows whether a B*I*J*D tensor was made."""
    return max((size for _, size in _cpu_allocation_events(run)), default=0)


def peak_bytes(run: Callable[[], None], device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return _cpu_peak_bytes(run)
