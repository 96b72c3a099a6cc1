"""Public API: names, dtypes, empty batches, backend choice and the errors for bad input."""
import re

import pytest
import torch

import capsrouting
from capsrouting import reference
from capsrouting.tolerances import TOLERANCES

from conftest import DEVICES
from naive import naive_capsule_routing, naive_route
from routing_checks import BAD_INPUT_CASES, assert_close_relative


def _uW(B=2, I=5, Din=3, J=4, Dout=6, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(B, I, Din, generator=g).to(dtype=dtype, device=device)
    W = (0.5 * torch.randn(I, J, Dout, Din, generator=g)).to(dtype=dtype, device=device)
    return u, W


def test_public_names():
    for name in ("capsule_routing", "route", "squash", "CapsuleLayer", "available_backends"):
        assert hasattr(capsrouting, name)
    assert "torch" in capsrouting.available_backends()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_output_dtype_shape_and_value(dtype, device):
    """Backend "torch" against the independent naive loops (tests/naive.py), both entry points."""
    u, W = _uW(dtype=dtype, device=device)
    u_hat = reference.predictions(u.double(), W.double()).to(dtype)
    # The naive loops in float64 on the same (rounded) inputs; half types are computed in
    # float32 and rounded once, so they may be off by half a unit in the last place.
    cases = [
        (capsrouting.capsule_routing(u, W, 3, backend="torch"), naive_capsule_routing(u.double().cpu(), W.double().cpu(), 3)),
        (capsrouting.route(u_hat, 3, backend="torch"), naive_route(u_hat.double().cpu(), 3)),
    ]
    for v, want in cases:
        assert v.dtype == dtype and v.shape == (2, 4, 6) and v.device == u.device
        if dtype in TOLERANCES:
            rtol, atol = TOLERANCES[dtype]
        else:
            rtol, atol = torch.finfo(dtype).eps, 1e-6  # half a unit of rounding, plus float32's error
        torch.testing.assert_close(v.cpu().double(), want, rtol=rtol, atol=atol)


def test_empty_batch_gives_empty_result_and_gradients():
    u, W = _uW(B=0)
    W.requires_grad_(True)
    u.requires_grad_(True)
    v = capsrouting.capsule_routing(u, W)
    assert v.shape == (0, 4, 6)
    v.sum().backward()
    assert torch.equal(W.grad, torch.zeros_like(W))
    assert capsrouting.route(torch.zeros(0, 3, 2, 4)).shape == (0, 2, 4)


def test_capsule_layer():
    layer = capsrouting.CapsuleLayer(5, 3, 4, 6, num_iterations=2).double()
    assert layer.weight.shape == (5, 4, 6, 3)
    u = torch.randn(7, 5, 3, dtype=torch.float64)
    # With weights of N(0, 0.01^2) the outputs are below 1e-3: compare relative to their scale.
    v = layer(u)
    assert_close_relative(v, naive_capsule_routing(u, layer.weight.detach(), 2), 1e-10, "CapsuleLayer output")
    assert 0 < v.abs().max() < 1e-2
    assert abs(layer.weight.std().item() - 0.01) < 0.005
    with pytest.raises(ValueError, match="in_caps"):
        capsrouting.CapsuleLayer(0, 3, 4, 6)


def test_squash_public():
    s = torch.randn(3, 4, 5)
    torch.testing.assert_close(capsrouting.squash(s, dim=1), reference.squash(s, dim=1))
    with pytest.raises(TypeError, match="s must"):
        capsrouting.squash(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="dim"):
        capsrouting.squash(s, dim=3)


@pytest.mark.parametrize("case", BAD_INPUT_CASES, ids=[c[0] for c in BAD_INPUT_CASES])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_bad_input(case, backend):
    _, call, exc, msg = case
    with pytest.raises(exc, match=msg):
        call(backend)


def test_unknown_and_unavailable_backends_explain_themselves():
    u, W = _uW()
    with pytest.raises(ValueError, match=r"'nope'.*'torch' \(available\)"):
        capsrouting.capsule_routing(u, W, backend="nope")
    from capsrouting.backends import backend_report

    for name, reason in backend_report().items():
        if reason is not None:
            with pytest.raises(ValueError, match=re.escape(f"unavailable: {reason}")):
                capsrouting.capsule_routing(u, W, backend=name)
    with pytest.raises(TypeError, match="backend must be a string"):
        capsrouting.capsule_routing(u, W, backend=None)
