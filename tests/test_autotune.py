"""backend="auto" chooses by measurement (capsrouting.autotune), tested on CPU tensors with stand-in
backends: one made slow on purpose, one fast, one broken; both working ones are the reference itself,
so every answer is checked too."""
import dataclasses
import logging

import pytest
import torch

import capsrouting
from capsrouting import autotune, backends, info, reference

# The slow stand-in repeats the reference this many times: far slower than the fast one, on any load.
SLOW_REPEATS = 20


def _stand_in(name, calls, repeats=1, broken=False):
    real = backends.get("torch")

    def capsule_routing(u, W, n, options=None):
        calls[name] += 1
        if broken:
            raise RuntimeError(f"{name} cannot run this (on purpose)")
        for _ in range(repeats - 1):
            real.capsule_routing(u, W, n, options)
        return real.capsule_routing(u, W, n, options)

    def route(u_hat, n, options=None):
        calls[name] += 1
        for _ in range(repeats - 1):
            real.route(u_hat, n, options)
        return real.route(u_hat, n, options)

    return dataclasses.replace(real, name=name, description=f"stand-in {name}", device_types=lambda: ("cpu",),
                               capsule_routing=capsule_routing, route=route)


@pytest.fixture
def stand_ins(monkeypatch):
    """Measured choice on CPU tensors among 'slow' (first in the fixed order), 'fast' and, where asked, 'broken'."""
    calls = {"slow": 0, "fast": 0, "broken": 0}
    registry = dict(backends._REGISTRY)
    registry.update(slow=_stand_in("slow", calls, SLOW_REPEATS), fast=_stand_in("fast", calls),
                    broken=_stand_in("broken", calls, broken=True))
    monkeypatch.setattr(backends, "_REGISTRY", registry)
    monkeypatch.setattr(backends, "_reasons", {**backends._reasons, "slow": None, "fast": None, "broken": None})
    monkeypatch.setitem(backends._PREFERENCE, "cpu", ["slow", "fast"])
    monkeypatch.setattr(backends, "_announced", set())
    monkeypatch.setattr(autotune, "MEASURED_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(autotune, "_cache", {})
    monkeypatch.setattr(autotune, "_announced", set())
    monkeypatch.delenv(autotune.ENV_SWITCH, raising=False)
    return calls


def _inputs(B=5, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, 30, 4, generator=g, dtype=torch.float64).requires_grad_(requires_grad)
    W = (0.5 * torch.randn(30, 5, 8, 4, generator=g, dtype=torch.float64)).requires_grad_(requires_grad)
    return u, W


def _choices():
    return {case.batch_bucket: (choice.backend, case.grad) for case, choice in autotune.cached_choices().items()}


def test_the_fastest_candidate_is_chosen_cached_and_announced_once(stand_ins, caplog):
    u, W = _inputs(B=5)
    with caplog.at_level(logging.INFO, logger="capsrouting"):
        v = capsrouting.capsule_routing(u, W, 3)
    torch.testing.assert_close(v, reference.capsule_routing(u, W, 3), rtol=1e-12, atol=1e-12)
    runs = autotune.WARMUP_RUNS + autotune.TIMED_RUNS
    assert stand_ins == {"slow": runs, "fast": runs + 1, "broken": 0}  # both measured, then the fast one ran the call
    [(case, choice)] = autotune.cached_choices().items()
    assert (case.batch_bucket, case.I, case.J, case.D, case.K, case.grad) == (8, 30, 5, 8, 4, False)
    assert choice.backend == "fast" and choice.times_ms["slow"] > choice.times_ms["fast"]
    [message] = [r.getMessage() for r in caplog.records if "measured" in r.getMessage()]
    assert "chose 'fast' (fast" in message and "slow" in message and "B<=8, I=30, Din=4 -> J=5, D=8" in message

    # The same case again (B = 7 rounds up to 8 too): the cache answers, nothing is timed or said.
    caplog.clear()
    u7, _ = _inputs(B=7, seed=1)
    with caplog.at_level(logging.INFO, logger="capsrouting"):
        v7 = capsrouting.capsule_routing(u7, W, 3)
    torch.testing.assert_close(v7, reference.capsule_routing(u7, W, 3), rtol=1e-12, atol=1e-12)
    assert stand_ins == {"slow": runs, "fast": runs + 2, "broken": 0}
    assert not [r for r in caplog.records if "measured" in r.getMessage()]


def test_another_batch_bucket_a_gradient_or_route_is_another_case(stand_ins):
    u, W = _inputs(B=5)
    capsrouting.capsule_routing(u, W, 3)
    capsrouting.capsule_routing(*_inputs(B=9), 3)
    assert _choices() == {8: ("fast", False), 16: ("fast", False)}
    # A gradient wanted: forward+backward measured, on copies: the caller's gradients are its own.
    u, W = _inputs(B=5, requires_grad=True)
    v = capsrouting.capsule_routing(u, W, 3)
    assert u.grad is None and W.grad is None
    grad_v = torch.randn_like(v)
    v.backward(grad_v)
    u_ref, W_ref = (t.detach().clone().requires_grad_() for t in (u, W))
    reference.capsule_routing(u_ref, W_ref, 3).backward(grad_v)
    torch.testing.assert_close(u.grad, u_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(W.grad, W_ref.grad, rtol=1e-12, atol=1e-12)
    assert len(autotune.cached_choices()) == 3
    u_hat = reference.predictions(*_inputs(B=5))
    torch.testing.assert_close(capsrouting.route(u_hat, 2), reference.route(u_hat, 2), rtol=1e-12, atol=1e-12)
    entries = sorted(case.entry for case in autotune.cached_choices())
    assert entries == ["capsule_routing"] * 3 + ["route"]


def test_options_are_part_of_the_case_and_reach_the_measured_runs(stand_ins):
    u, W = _inputs(B=3)
    bias = torch.full((5, 8), 0.1, dtype=torch.float64, requires_grad=True)
    v, c = capsrouting.capsule_routing(u, W, 3, bias=bias, leaky=True, return_couplings=True)
    v_ref, c_ref = reference.capsule_routing(u, W, 3, bias=bias, leaky=True, return_couplings=True)
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c, c_ref, rtol=1e-12, atol=1e-12)
    [case] = autotune.cached_choices()
    assert case.options == ("bias", "leaky", "return_couplings") and case.grad  # the bias wants a gradient
    assert bias.grad is None


def test_a_candidate_that_fails_is_never_chosen(stand_ins, monkeypatch):
    monkeypatch.setitem(backends._PREFERENCE, "cpu", ["broken", "slow"])
    u, W = _inputs()
    v = capsrouting.capsule_routing(u, W, 3)
    torch.testing.assert_close(v, reference.capsule_routing(u, W, 3), rtol=1e-12, atol=1e-12)
    [choice] = autotune.cached_choices().values()
    assert choice.backend == "slow" and "cannot run this (on purpose)" in choice.failures["broken"]
    assert stand_ins["broken"] == 1  # its warm-up raised; it was never run again
    assert "broken failed: RuntimeError" in autotune.describe_cache()[0]


def test_an_explicit_backend_is_never_overridden(stand_ins):
    u, W = _inputs()
    capsrouting.capsule_routing(u, W, 3, backend="slow")
    assert stand_ins["slow"] == 1 and stand_ins["fast"] == 0 and not autotune.cached_choices()


@pytest.mark.parametrize("how", ["switched off", "graph capture"])
def test_no_timing_when_switched_off_or_capturing_a_graph(stand_ins, monkeypatch, caplog, how):
    if how == "switched off":
        monkeypatch.setenv(autotune.ENV_SWITCH, "0")
        expected = "CAPSROUTING_AUTOTUNE=0, no timing runs: backend 'auto' uses 'slow' (the fixed order)"
    else:
        monkeypatch.setattr(autotune, "_capturing", lambda x: True)
        expected = "during CUDA graph capture, no timing runs: backend 'auto' uses 'slow' (the fixed order)"
    u, W = _inputs()
    with caplog.at_level(logging.INFO, logger="capsrouting"):
        for _ in range(2):
            capsrouting.capsule_routing(u, W, 3)
    assert stand_ins["slow"] == 2 and stand_ins["fast"] == 0 and not autotune.cached_choices()
    assert [r.getMessage() for r in caplog.records if "no timing" in r.getMessage()] == [
        f"capsrouting: {expected} for capsule_routing on cpu, float64, B<=8, I=30, Din=4 -> J=5, D=8, R=3, forward"]


def test_a_measured_choice_stays_even_when_measuring_is_then_off(stand_ins, monkeypatch):
    u, W = _inputs()
    capsrouting.capsule_routing(u, W, 3)
    monkeypatch.setattr(autotune, "_capturing", lambda x: True)  # e.g. a CUDA graph captured after a warm-up
    before = dict(stand_ins)
    capsrouting.capsule_routing(u, W, 3)
    assert stand_ins["fast"] == before["fast"] + 1 and stand_ins["slow"] == before["slow"]


def test_torch_compile_never_times_it_takes_the_cache_else_the_fixed_order(stand_ins, caplog):
    u, W = _inputs()
    compiled = torch.compile(lambda a, b: capsrouting.capsule_routing(a, b, 3), backend="eager", fullgraph=True)
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="capsrouting"):
        v = compiled(u, W)
    torch.testing.assert_close(v, reference.capsule_routing(u, W, 3), rtol=1e-12, atol=1e-12)
    assert not autotune.cached_choices() and stand_ins["fast"] == 0  # traced with the fixed order's first
    assert any("under torch.compile no timing runs: backend 'auto' uses 'slow' (the fixed order; nothing measured yet" in r.getMessage()
               for r in caplog.records)
    # Measured in eager first: the traced graph takes the measured backend.
    torch._dynamo.reset()
    capsrouting.capsule_routing(*_inputs(B=6), 3)
    assert _choices() == {8: ("fast", False)}
    slow_before, fast_before = stand_ins["slow"], stand_ins["fast"]
    with caplog.at_level(logging.INFO, logger="capsrouting"):
        torch.testing.assert_close(compiled(u, W), reference.capsule_routing(u, W, 3), rtol=1e-12, atol=1e-12)
    assert stand_ins["slow"] == slow_before and stand_ins["fast"] > fast_before
    assert any("under torch.compile no timing runs: backend 'auto' uses the measured 'fast'" in r.getMessage()
               for r in caplog.records)
    # Dynamic shapes (the sizes symbolic while tracing): the measured calls of the same kind answer.
    torch._dynamo.reset()
    dynamic = torch.compile(lambda a, b: capsrouting.capsule_routing(a, b, 3), backend="eager", fullgraph=True,
                            dynamic=True)
    fast_before = stand_ins["fast"]
    for B in (3, 11):
        u, _ = _inputs(B=B)
        torch.testing.assert_close(dynamic(u, W), reference.capsule_routing(u, W, 3), rtol=1e-12, atol=1e-12)
    assert stand_ins["slow"] == slow_before and stand_ins["fast"] > fast_before
    torch._dynamo.reset()


def test_device_types_that_are_not_measured_keep_the_fixed_order(stand_ins, monkeypatch):
    monkeypatch.setattr(autotune, "MEASURED_DEVICE_TYPES", ("cuda",))
    capsrouting.capsule_routing(*_inputs(), 3)
    assert stand_ins["slow"] == 1 and stand_ins["fast"] == 0 and not autotune.cached_choices()


def test_info_shows_the_measured_choices(stand_ins, capsys, monkeypatch):
    monkeypatch.setitem(backends._PREFERENCE, "cpu", ["slow", "fast"])
    capsrouting.capsule_routing(*_inputs(), 3)
    # Only the stand-ins and the reference are checked (the Triton interpreter is slow).
    monkeypatch.setattr(backends, "_reasons", {name: (None if name in ("slow", "fast", "torch") else "not here")
                                               for name in backends._REGISTRY})
    assert info.main(["--no-timing"]) == 0
    out = capsys.readouterr().out
    assert "backend='auto' measured in this process:" in out
    assert "capsule_routing on cpu, float64, B<=8, I=30, Din=4 -> J=5, D=8, R=3, forward: 'fast' (fast" in out


def test_time_ms_is_the_median_after_the_warm_up():
    calls = []
    assert autotune.time_ms(lambda: calls.append(1), torch.device("cpu"), warmup=2, runs=3) >= 0
    assert len(calls) == 5
