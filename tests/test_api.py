"""Public API: names, dtypes, empty batches, backend choice and the errors for bad input."""
import re

import pytest
import torch

import capsrouting
from capsrouting import reference

from conftest import DEVICES


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
    u, W = _uW(dtype=dtype, device=device)
    v = capsrouting.capsule_routing(u, W, 3, backend="torch")
    assert v.dtype == dtype and v.shape == (2, 4, 6) and v.device == u.device
    # half types are computed in float32: the result is the float32 reference rounded once
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    expected = reference.capsule_routing(u.to(compute), W.to(compute), 3).to(dtype)
    torch.testing.assert_close(v, expected, rtol=0, atol=0)
    u_hat = reference.predictions(u, W)
    assert capsrouting.route(u_hat, 3, backend="torch").shape == (2, 4, 6)


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
    layer = capsrouting.CapsuleLayer(5, 3, 4, 6, num_iterations=2)
    assert layer.weight.shape == (5, 4, 6, 3)
    u = torch.randn(7, 5, 3)
    torch.testing.assert_close(layer(u), reference.capsule_routing(u, layer.weight, 2))
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


BAD_CAPSULE_ROUTING = [
    # (description, u, W, num_iterations, exception, message fragment)
    ("u rank", torch.randn(2, 5), torch.randn(5, 4, 6, 3), 3, ValueError, r"u must have shape \(B, I, Din\)"),
    ("W rank", torch.randn(2, 5, 3), torch.randn(5, 4, 6), 3, ValueError, r"W must have shape \(I, J, Dout, Din\)"),
    ("I mismatch", torch.randn(2, 5, 3), torch.randn(6, 4, 6, 3), 3, ValueError, r"I = u.shape\[1\] = 5"),
    ("Din mismatch", torch.randn(2, 5, 3), torch.randn(5, 4, 6, 2), 3, ValueError, r"Din = u.shape\[2\] = 3"),
    ("integer u", torch.ones(2, 5, 3, dtype=torch.int64), torch.randn(5, 4, 6, 3), 3, TypeError, "u must have dtype"),
    ("integer W", torch.randn(2, 5, 3), torch.ones(5, 4, 6, 3, dtype=torch.int32), 3, TypeError, "W must have dtype"),
    ("dtype mismatch", torch.randn(2, 5, 3), torch.randn(5, 4, 6, 3, dtype=torch.float64), 3, TypeError, "same dtype"),
    ("zero iterations", torch.randn(2, 5, 3), torch.randn(5, 4, 6, 3), 0, ValueError, "num_iterations must be >= 1"),
    ("float iterations", torch.randn(2, 5, 3), torch.randn(5, 4, 6, 3), 2.0, TypeError, "num_iterations must be an int"),
    ("empty J", torch.randn(2, 5, 3), torch.randn(5, 0, 6, 3), 3, ValueError, "every dimension but the batch"),
    ("not a tensor", [[1.0]], torch.randn(5, 4, 6, 3), 3, TypeError, "u must be a torch.Tensor"),
]


@pytest.mark.parametrize("case", BAD_CAPSULE_ROUTING, ids=[c[0] for c in BAD_CAPSULE_ROUTING])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_bad_capsule_routing_input(case, backend):
    _, u, W, iters, exc, msg = case
    with pytest.raises(exc, match=msg):
        capsrouting.capsule_routing(u, W, iters, backend=backend)


def test_different_devices_rejected():
    u, W = _uW()
    W = W.to("meta")
    with pytest.raises(ValueError, match="same device"):
        capsrouting.capsule_routing(u, W)


@pytest.mark.parametrize(
    "u_hat, iters, exc, msg",
    [
        (torch.randn(2, 5, 3), 3, ValueError, r"u_hat must have shape \(B, I, J, D\)"),
        (torch.ones(2, 5, 3, 4, dtype=torch.int64), 3, TypeError, "u_hat must have dtype"),
        (torch.randn(2, 5, 3, 4), -1, ValueError, "num_iterations"),
    ],
)
def test_bad_route_input(u_hat, iters, exc, msg):
    with pytest.raises(exc, match=msg):
        capsrouting.route(u_hat, iters)


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
