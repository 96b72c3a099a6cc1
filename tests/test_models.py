"""CapsNet / BaselineCNN (capsrouting.models) and the CapsNet losses (capsrouting.losses).

Parameter counts are the paper's architectures exactly; forward and masking are
checked against manual computations; the losses against hand-written loops; and
one optimizer step on a fixed batch of real MNIST must lower the loss.
"""

import pytest
import torch
import torch.nn.functional as F

from capsrouting.data import load_mnist
from capsrouting.losses import capsnet_loss, margin_loss, reconstruction_loss
from capsrouting.models import BaselineCNN, CapsNet, CapsNetOutput

from conftest import DEVICES


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def capsnet():
    torch.manual_seed(0)
    return CapsNet()


def _images(B, S=28, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 1, S, S, generator=g).to(device)


# ---------------------------------------------------------------- parameter counts


def test_capsnet_parameter_count_with_decoder():
    assert _num_params(CapsNet()) == 8_215_568


def test_capsnet_parameter_count_without_decoder():
    model = CapsNet(reconstruction=False)
    assert _num_params(model) == 6_804_224
    assert model.decoder is None
    assert not any(name.startswith("decoder") for name, _ in model.named_parameters())


def test_baseline_parameter_count():
    assert _num_params(BaselineCNN()) == 35_445_522


def test_capsnet_primary_caps_count():
    assert CapsNet().num_primary_caps == 1152
    model = CapsNet(input_size=40, reconstruction=False)
    assert model.num_primary_caps == 4608
    assert model.digit_caps.in_caps == 4608
    assert model.primary_capsules(_images(1, S=40)).shape == (1, 4608, 8)


def test_capsnet_input_size_40_forward():
    torch.manual_seed(0)
    out = CapsNet(input_size=40)(_images(2, S=40))
    assert out.lengths.shape == (2, 10)
    assert out.reconstructions.shape == (2, 40 * 40)


# ---------------------------------------------------------------- forward


def test_primary_capsule_reshape_order(capsnet):
    """Capsule n = c*H*W + h*W + w holds conv channels 8c .. 8c+7 at (h, w), squashed."""
    x = _images(2)
    with torch.no_grad():
        conv = capsnet.primary_caps(torch.relu(capsnet.conv1(x)))  # (2, 256, 6, 6)
        u = capsnet.primary_capsules(x)
    assert conv.shape == (2, 256, 6, 6) and u.shape == (2, 1152, 8)
    H = W = 6
    for b, c, h, w in [(0, 0, 0, 0), (0, 0, 0, 1), (1, 0, 1, 0), (1, 5, 2, 3), (0, 31, 5, 5), (1, 17, 4, 0)]:
        s = conv[b, 8 * c : 8 * c + 8, h, w]
        n2 = (s * s).sum()
        expected = n2 / (1 + n2) * s / torch.sqrt(n2 + 1e-8)
        torch.testing.assert_close(u[b, c * H * W + h * W + w], expected)


@pytest.mark.parametrize("device", DEVICES)
def test_capsnet_forward_shapes_and_lengths(device):
    torch.manual_seed(0)
    model = CapsNet().to(device)
    x = _images(4, device=device)
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, CapsNetOutput)
    assert out.lengths.shape == (4, 10)
    assert out.reconstructions.shape == (4, 784)
    assert out.digit_caps.shape == (4, 10, 16)
    assert torch.all(out.lengths >= 0) and torch.all(out.lengths < 1)
    torch.testing.assert_close(out.lengths, out.digit_caps.norm(dim=-1))
    assert torch.all(out.reconstructions > 0) and torch.all(out.reconstructions < 1)


def test_capsnet_without_decoder_returns_no_reconstructions():
    torch.manual_seed(0)
    model = CapsNet(reconstruction=False)
    x = _images(2)
    labels = torch.tensor([3, 7])
    out = model(x, labels)
    assert out.reconstructions is None
    assert out.lengths.shape == (2, 10) and out.digit_caps.shape == (2, 10, 16)
    torch.testing.assert_close(capsnet_loss(out, x, labels), margin_loss(out.lengths, labels))


def _decode_masked(model, digit_caps, kept):
    mask = torch.zeros(digit_caps.shape[:2])
    mask[torch.arange(digit_caps.shape[0]), kept] = 1.0
    return model.decoder((digit_caps * mask.unsqueeze(-1)).reshape(digit_caps.shape[0], -1))


def test_masking_uses_labels_in_training(capsnet):
    capsnet.train()
    x = _images(4, seed=1)
    with torch.no_grad():
        predicted = capsnet(x).lengths.argmax(dim=1)
        labels = (predicted + 1) % 10  # never the longest capsule, so the two maskings differ
        out = capsnet(x, labels)
        expected = _decode_masked(capsnet, out.digit_caps, labels)
        by_longest = _decode_masked(capsnet, out.digit_caps, predicted)
    torch.testing.assert_close(out.reconstructions, expected)
    assert not torch.allclose(out.reconstructions, by_longest)


def test_masking_uses_longest_capsule_without_labels(capsnet):
    capsnet.train()
    x = _images(4, seed=2)
    with torch.no_grad():
        out = capsnet(x)
        expected = _decode_masked(capsnet, out.digit_caps, out.digit_caps.norm(dim=-1).argmax(dim=1))
    torch.testing.assert_close(out.reconstructions, expected)


def test_masking_uses_longest_capsule_in_eval_even_with_labels(capsnet):
    x = _images(4, seed=3)
    capsnet.eval()
    try:
        with torch.no_grad():
            out = capsnet(x)
            labels = (out.lengths.argmax(dim=1) + 1) % 10
            with_labels = capsnet(x, labels)
    finally:
        capsnet.train()
    torch.testing.assert_close(with_labels.reconstructions, out.reconstructions)
    expected = _decode_masked(capsnet, out.digit_caps, out.lengths.argmax(dim=1))
    torch.testing.assert_close(out.reconstructions, expected)


def test_baseline_forward_and_dropout():
    torch.manual_seed(0)
    model = BaselineCNN()
    x = _images(2)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert a.shape == (2, 10)
    torch.testing.assert_close(a, b)  # no dropout in eval mode
    model.train()
    with torch.no_grad():
        c, d = model(x), model(x)
    assert not torch.allclose(c, d)  # dropout is active in training


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("shape", [(2, 28, 28), (2, 1, 27, 27), (2, 3, 28, 28), (2, 1, 28, 40), (784,)])
def test_capsnet_rejects_bad_x_shape(capsnet, shape):
    with pytest.raises(ValueError, match=r"^x must have shape \(B, 1, 28, 28\)"):
        capsnet(torch.zeros(shape))


def test_baseline_rejects_bad_x_shape():
    model = BaselineCNN(input_size=28)
    with pytest.raises(ValueError, match=r"^x must have shape \(B, 1, 28, 28\)"):
        model(torch.zeros(2, 1, 32, 32))


def test_capsnet_rejects_bad_x_dtype_and_labels(capsnet):
    x = _images(2)
    with pytest.raises(TypeError, match=r"^x must have a floating-point dtype"):
        capsnet(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"^x must be a torch.Tensor"):
        capsnet(x.numpy())
    with pytest.raises(ValueError, match=r"^labels must lie in \[0, 10\)"):
        capsnet(x, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"^labels must lie in \[0, 10\)"):
        capsnet(x, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match=r"^labels must have shape"):
        capsnet(x, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match=r"^labels must have dtype torch.int64"):
        capsnet(x, torch.tensor([1, 2], dtype=torch.int32))


def test_constructor_validation():
    with pytest.raises(ValueError, match="input_size"):
        CapsNet(input_size=16)
    with pytest.raises(ValueError, match="num_classes"):
        CapsNet(num_classes=0)
    with pytest.raises(ValueError, match="dropout"):
        BaselineCNN(dropout=1.0)


# ---------------------------------------------------------------- losses


def test_margin_loss_matches_loop():
    g = torch.Generator().manual_seed(0)
    B, K = 7, 10
    lengths = torch.rand(B, K, generator=g, dtype=torch.float64)
    labels = torch.randint(0, K, (B,), generator=g)
    for m_plus, m_minus, lam in [(0.9, 0.1, 0.5), (0.8, 0.2, 0.25)]:
        total = 0.0
        for b in range(B):
            for k in range(K):
                v = float(lengths[b, k])
                if k == int(labels[b]):
                    total += max(0.0, m_plus - v) ** 2
                else:
                    total += lam * max(0.0, v - m_minus) ** 2
        expected = total / B
        got = margin_loss(lengths, labels, m_plus=m_plus, m_minus=m_minus, lam=lam)
        assert got.dim() == 0
        assert got.item() == pytest.approx(expected, rel=1e-12)
    # defaults are the paper's m+ = 0.9, m- = 0.1, lambda = 0.5
    torch.testing.assert_close(margin_loss(lengths, labels), margin_loss(lengths, labels, 0.9, 0.1, 0.5))


def test_margin_loss_zero_when_perfect():
    labels = torch.tensor([0, 3, 9, 5])
    lengths = torch.full((4, 10), 0.05)
    lengths[0, :] = 0.1  # exactly at m- for the absent classes
    lengths[torch.arange(4), labels] = torch.tensor([0.9, 0.95, 1.0, 0.999])
    assert margin_loss(lengths, labels).item() == 0.0


def test_margin_loss_gradient_is_finite():
    lengths = torch.rand(3, 10, requires_grad=True)
    margin_loss(lengths, torch.tensor([1, 2, 3])).backward()
    assert torch.isfinite(lengths.grad).all()


def test_reconstruction_loss_matches_manual():
    g = torch.Generator().manual_seed(0)
    B, S = 5, 28
    images = torch.rand(B, 1, S, S, generator=g, dtype=torch.float64)
    recon = torch.rand(B, S * S, generator=g, dtype=torch.float64)
    expected = 0.0
    for b in range(B):
        expected += float(((recon[b] - images[b].flatten()) ** 2).sum())
    expected /= B
    assert reconstruction_loss(recon, images, weight=1.0).item() == pytest.approx(expected, rel=1e-12)
    assert reconstruction_loss(recon, images).item() == pytest.approx(0.0005 * expected, rel=1e-12)
    # flattened or (B, S, S) images give the same value
    torch.testing.assert_close(reconstruction_loss(recon, images.reshape(B, -1)), reconstruction_loss(recon, images))
    torch.testing.assert_close(reconstruction_loss(recon, images[:, 0]), reconstruction_loss(recon, images))


def test_capsnet_loss_is_margin_plus_weighted_reconstruction(capsnet):
    capsnet.train()
    x = _images(3, seed=4)
    labels = torch.tensor([2, 4, 6])
    with torch.no_grad():
        out = capsnet(x, labels)
    expected = margin_loss(out.lengths, labels) + 0.0005 * ((out.reconstructions - x.flatten(1)) ** 2).sum(1).mean()
    torch.testing.assert_close(capsnet_loss(out, x, labels), expected)
    expected = margin_loss(out.lengths, labels) + 0.01 * ((out.reconstructions - x.flatten(1)) ** 2).sum(1).mean()
    torch.testing.assert_close(capsnet_loss(out, x, labels, reconstruction_weight=0.01), expected)


def test_loss_validation():
    lengths = torch.rand(2, 10)
    with pytest.raises(ValueError, match=r"^lengths must have shape"):
        margin_loss(lengths.flatten(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^labels must have shape"):
        margin_loss(lengths, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"^labels must lie in"):
        margin_loss(lengths, torch.tensor([0, 10]))
    with pytest.raises(TypeError, match=r"^labels must have dtype"):
        margin_loss(lengths, torch.tensor([0.0, 1.0]))
    recon = torch.rand(2, 784)
    with pytest.raises(ValueError, match=r"^reconstructions must have shape"):
        reconstruction_loss(recon.reshape(2, 28, 28), torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"^images must have shape"):
        reconstruction_loss(recon, torch.rand(2, 1, 27, 27))
    with pytest.raises(ValueError, match=r"^images must have shape"):
        reconstruction_loss(recon, torch.rand(3, 1, 28, 28))
    with pytest.raises(TypeError, match=r"^output must be a CapsNetOutput"):
        capsnet_loss(lengths, torch.rand(2, 1, 28, 28), torch.tensor([0, 1]))


# ---------------------------------------------------------------- one training step on real MNIST

N_BATCH = 32


@pytest.fixture(scope="module")
def mnist_batch(mnist_dir):
    """The first 32 training images as float (32, 1, 28, 28) in [0, 1], labels int64 (32,)."""
    images, labels = load_mnist(mnist_dir, split="train")
    images, labels = images[:N_BATCH], labels[:N_BATCH]
    assert images.shape == (N_BATCH, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (N_BATCH,) and labels.dtype == torch.int64
    assert labels.tolist()[:8] == [5, 0, 4, 1, 9, 2, 1, 3]  # the well-known start of MNIST train
    return images.float().div(255.0).unsqueeze(1), labels


def _loss_before_and_after_one_adam_step(model, loss_fn, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    before = loss_fn(model)
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss_fn(model)
    assert torch.isfinite(before) and torch.isfinite(after)
    return before.item(), after.item()


def test_capsnet_one_step_lowers_loss(mnist_batch):
    images, labels = mnist_batch
    torch.manual_seed(0)
    model = CapsNet()
    # CapsNet has no dropout, so train mode (labels used for the masking) is
    # deterministic; the loss before, the step and the loss after all use it.
    model.train()
    before, after = _loss_before_and_after_one_adam_step(
        model, lambda m: capsnet_loss(m(images, labels), images, labels), lr=1e-3
    )
    assert after < before


def test_baseline_one_step_lowers_loss(mnist_batch):
    images, labels = mnist_batch
    torch.manual_seed(0)
    model = BaselineCNN()
    # Eval mode throughout (dropout off) so the step optimises exactly the loss measured.
    # lr 1e-4, not 1e-3: Adam's first step moves every weight by about lr, and on
    # the 32.9M-weight first FC layer 1e-3 overshoots (the loss rises on this batch).
    model.eval()
    before, after = _loss_before_and_after_one_adam_step(model, lambda m: F.cross_entropy(m(images), labels), lr=1e-4)
    assert after < before
