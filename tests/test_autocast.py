"""Every public entry point inside torch.autocast: the op casts to the autocast dtype, computes
with float32 sums, and gradients reach float32 parameters in float32."""
import pytest
import torch

import capsrouting
from capsrouting import reference
from capsrouting.backends import unavailable_reason
from capsrouting.losses import capsnet_loss, margin_loss, reconstruction_loss
from capsrouting.models import CapsNet

from conftest import DEVICES
from routing_checks import assert_matches_reference_under_autocast

HALF_TYPES = [torch.bfloat16, torch.float16]


def _available(name):
    return pytest.mark.skipif(unavailable_reason(name) is not None, reason=f"{name} backend: {unavailable_reason(name)}")


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("backend,device", [
    *[pytest.param("torch", device, id=f"torch-{device}") for device in DEVICES],
    pytest.param("cpu", "cpu", id="cpu", marks=_available("cpu")),
    pytest.param("cuda", "cuda", id="cuda", marks=_available("cuda")),
])
def test_backends_under_autocast_match_the_reference(backend, device, dtype):
    assert_matches_reference_under_autocast(backend, 5, 37, 8, 10, 16, 3, dtype=dtype, device=device)


@_available("triton")
@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_triton_under_autocast_matches_the_reference(dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert_matches_reference_under_autocast("triton", 2, 37, 8, 10, 16, 3, dtype=dtype, device=device)


def test_float64_is_left_alone_by_autocast():
    u, W = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(5, 4, 6, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = capsrouting.capsule_routing(u, W, backend="torch")
    assert v.dtype == torch.float64
    torch.testing.assert_close(v, reference.capsule_routing(u, W), rtol=1e-12, atol=1e-12)


def test_mixed_dtypes_outside_autocast_still_raise():
    u, W = torch.randn(2, 5, 3, dtype=torch.bfloat16), torch.randn(5, 4, 6, 3)
    with pytest.raises(TypeError, match="same dtype"):
        capsrouting.capsule_routing(u, W)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert capsrouting.capsule_routing(u, W).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_squash_and_layer_under_autocast(dtype):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 10, 16, generator=g)
    layer = capsrouting.CapsuleLayer(20, 8, 10, 16)
    u = torch.randn(3, 20, 8, generator=g).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        squashed = capsrouting.squash(s)
        v = layer(u)
    assert squashed.dtype == dtype and v.dtype == dtype
    # The input rounded to the autocast dtype, squashed in float32, rounded once: exactly.
    assert torch.equal(squashed, reference.squash(s.to(dtype).float()).to(dtype))
    v.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and u.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_losses_under_autocast_are_float32(dtype):
    lengths = torch.rand(4, 10).to(dtype)
    labels = torch.tensor([0, 3, 9, 1])
    recon, images = torch.rand(4, 784).to(dtype), torch.rand(4, 1, 28, 28)
    with torch.autocast("cpu", dtype=dtype):
        m, r = margin_loss(lengths, labels), reconstruction_loss(recon, images)
    assert m.dtype == torch.float32 and r.dtype == torch.float32
    torch.testing.assert_close(m, margin_loss(lengths.float(), labels))
    torch.testing.assert_close(r, reconstruction_loss(recon.float(), images))


def test_capsnet_bfloat16_autocast_training_step_lowers_the_loss(mnist_dir):
    from capsrouting import data

    images, labels = data.load_mnist(mnist_dir, "train")
    x, y = images[:32].unsqueeze(1).float() / 255, labels[:32]
    torch.manual_seed(0)
    model = CapsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, y)
            assert out.digit_caps.dtype == torch.bfloat16
            return capsnet_loss(out, x, y)

    before = loss()
    optimizer.zero_grad()
    before.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after < before, (float(before), float(after))


def test_compiled_autocast_capsnet_step_has_no_graph_break():
    torch.manual_seed(0)
    model = CapsNet(input_size=20)
    x, y = torch.rand(3, 1, 20, 20), torch.tensor([1, 7, 3])

    def step(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return capsnet_loss(model(x, y), x, y)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(x, y)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, y)
    eager = step(x, y)
    torch.testing.assert_close(loss, eager, rtol=1e-2, atol=0)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert all(g.dtype == torch.float32 for g in grads)
