"""Routing op benchmarks: every available backend x pass x shape of the sweep (bench/cases.py).

    pytest bench/ --benchmark-only [--benchmark-json out.json]

Each case is checked against the eager reference once, before it is timed; peak memory of
the case goes into the benchmark's extra_info.
"""
import os

import pytest

from bench import cases, memory
from bench.training import make_training_step


def test_routing(benchmark, backend, shape, pass_, device):
    reason = cases.skip_reason(backend, shape, device)
    if reason is not None:
        pytest.skip(reason)
    cases.check(backend, shape, device)
    run = cases.make_runner(backend, shape, pass_, device)
    run()  # warm-up: compilation, the extension's first load
    benchmark.extra_info["peak_memory_MB"] = memory.peak_bytes(run, device) / 2**20
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)


def test_routing_options(benchmark, backend, variant, pass_, device, fast):
    """The routing options (DESIGN.md §6) at the paper's layer, B = 32 (bench/options.py tabulates them)."""
    from bench.options import runs_variant

    shape = cases.sweep(device, fast=True)[0] if fast else cases.dataclasses.replace(cases.PAPER, B=32)
    if not runs_variant(backend, variant) or cases.skip_reason(backend, shape, device) is not None:
        pytest.skip(f"{backend} does not run {variant} at {shape.label}")
    cases.check(backend, shape, device, variant)
    run = cases.make_runner(backend, shape, pass_, device, variant)
    run()
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)


def test_training_step(benchmark, backend, device, fast):
    if fast and backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        # A paper-sized CapsNet step takes minutes in the interpreter; tests/test_triton.py checks
        # that step (compiled and eager) against the reference.
        pytest.skip("the quick check leaves the interpreted Triton training step to tests/test_triton.py")
    batch, rounds = (2, 1) if fast else ((32, 3) if device == "cpu" else (128, 10))
    step = make_training_step(backend, device, batch, compile_backend="aot_eager" if fast else "inductor")
    step()  # warm-up: compilation, the extension's first load
    benchmark.extra_info["batch"] = batch
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    if benchmark.stats is not None:  # None with --benchmark-disable
        benchmark.extra_info["images_per_second"] = batch / benchmark.stats.stats.median
