"""python -m capsrouting.info: it passes on this machine and fails when a backend is wrong."""
import dataclasses

import pytest
import torch

from capsrouting import backends, info

# The broken-backend tests leave only 'torch' available, so the automatic choice warns.
pytestmark = pytest.mark.filterwarnings("ignore:capsrouting. using backend 'torch':RuntimeWarning")


def test_info_passes_names_the_choice_and_times_the_backends(capsys):
    assert info.main([]) == 0
    out = capsys.readouterr().out
    assert "backend='auto' runs" in out and "for cpu tensors (paper layer)" in out
    assert "OUTSIDE" not in out and "FAILED" not in out
    assert "speed on cpu, paper layer (B=32" in out and "torch.compile of it" in out
    for name in backends.available_backends():
        if name not in ("torch", "triton"):  # the Triton interpreter is not timed
            assert f"backend {name}" in out


def _with_broken_torch_backend(monkeypatch, capsule_routing=None, route=None):
    real = backends.get("torch")
    broken = dataclasses.replace(real, capsule_routing=capsule_routing or real.capsule_routing, route=route or real.route)
    monkeypatch.setitem(backends._REGISTRY, "torch", broken)
    # Only the broken backend matters here; the others (the Triton interpreter is slow) sit out.
    reasons = {name: "not checked in this test" for name in backends.backend_report() if name != "torch"}
    monkeypatch.setattr(backends, "_reasons", reasons)


def test_a_backend_off_by_half_fails_the_self_check(monkeypatch, capsys):
    real = backends.get("torch")
    _with_broken_torch_backend(monkeypatch, capsule_routing=lambda u, W, n: real.capsule_routing(u, W, n) + 0.5)
    assert info.main(["--no-timing"]) == 1
    out = capsys.readouterr().out
    assert "OUTSIDE the float32 tolerance" in out and "self-check(s) failed" in out


def test_a_wrong_gradient_in_route_fails_the_self_check(monkeypatch, capsys):
    real = backends.get("torch")

    class ScaledGradient(torch.autograd.Function):  # right value, gradient 1% too large
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return 1.01 * g

    _with_broken_torch_backend(monkeypatch, route=lambda u_hat, n: real.route(ScaledGradient.apply(u_hat), n))
    assert info.main(["--no-timing"]) == 1
    assert "OUTSIDE the float32 tolerance" in capsys.readouterr().out


def test_a_backend_that_raises_fails_the_self_check(monkeypatch, capsys):
    def boom(u, W, n):
        raise RuntimeError("kernel exploded")

    _with_broken_torch_backend(monkeypatch, capsule_routing=boom)
    assert info.main(["--no-timing"]) == 1
    assert "FAILED: RuntimeError: kernel exploded" in capsys.readouterr().out
