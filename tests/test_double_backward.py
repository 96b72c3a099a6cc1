"""Gradients of gradients through every backend equal the reference's (gradient penalties).

PyTorch warns ("an autograd kernel was not registered ...") when it backpropagates through
an op without a derivative and returns wrong numbers; here every warning is an error.
"""
import pytest
import torch

import capsrouting
from capsrouting import reference
from capsrouting.backends import unavailable_reason
from capsrouting.losses import capsnet_loss
from capsrouting.models import CapsNet

from routing_checks import make_inputs

pytestmark = pytest.mark.filterwarnings("error")


def _backends():
    cases = []
    for name in ("torch", "cpu", "triton", "cuda"):
        device = "cuda" if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else "cpu"
        reason = unavailable_reason(name)
        cases.append(pytest.param(name, device, id=name, marks=pytest.mark.skipif(reason is not None, reason=f"{name}: {reason}")))
    return cases


@pytest.mark.parametrize("backend,device", _backends())
def test_gradgradcheck_both_entry_points(backend, device):
    # Small: gradgradcheck perturbs every element (and the Triton interpreter is slow).
    u, W = make_inputs(2, 3, 2, 3, 2, torch.float64, device, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: capsrouting.capsule_routing(a, b, 3, backend=backend), (u, W))
    u_hat = reference.predictions(u, W).detach().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: capsrouting.route(x, 2, backend=backend), (u_hat,))


@pytest.mark.parametrize("backend,device", _backends())
def test_second_derivative_equals_the_reference(backend, device):
    """d/dW of |dL/du|^2 (input penalty), and d/dW of |dL/dW|^2 with u data that needs no gradient."""
    u, W = make_inputs(4, 7, 3, 5, 4, torch.float64, device)
    W.requires_grad_()
    penalties, weight_penalties = [], []
    for name in (backend, "torch"):
        u_in = u.clone().requires_grad_()
        v = capsrouting.capsule_routing(u_in, W, 3, backend=name)
        (du,) = torch.autograd.grad(v.square().sum(), u_in, create_graph=True)
        penalties.append(torch.autograd.grad(du.square().sum(), W)[0])
        v = capsrouting.capsule_routing(u, W, 3, backend=name)  # u does not require grad
        (dW,) = torch.autograd.grad(v.square().sum(), W, create_graph=True)
        weight_penalties.append(torch.autograd.grad(dW.square().sum(), W)[0])
    torch.testing.assert_close(penalties[0], penalties[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weight_penalties[0], weight_penalties[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend,device", [p for p in _backends() if p.id != "torch"])
def test_gradient_graph_under_autocast_matches_backend_torch(backend, device):
    """create_graph inside bfloat16 autocast: the reference's gradient is computed in float32 too."""
    u, W = make_inputs(4, 37, 8, 10, 16, torch.float32, device)
    # A fixed direction, so that rounding differences in v (bfloat16) do not enter the gradient.
    g = torch.randn(4, 10, 16, generator=torch.Generator().manual_seed(2)).to(device)
    results = []
    for name in (backend, "torch"):
        u_in = u.clone().requires_grad_()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            v = capsrouting.capsule_routing(u_in, W, 3, backend=name)
            (du,) = torch.autograd.grad((v.float() * g).sum(), u_in, create_graph=True)
        results.append(du)
    scale = results[1].abs().max()
    assert (results[0] - results[1]).abs().max() <= 1e-2 * scale


@pytest.mark.parametrize("backend,device", [p for p in _backends() if p.id in ("cpu", "cuda")])
def test_first_order_backward_never_takes_the_reference_path(backend, device, monkeypatch):
    """Eager and compiled backward run the fused op; only a graph of the gradient needs the reference."""
    from capsrouting import _autograd

    def refuse(*args, **kwargs):
        raise AssertionError("the reference gradient ran in a first-order backward")

    monkeypatch.setattr(_autograd, "reference_gradients", refuse)
    u, W = make_inputs(3, 9, 4, 5, 6, torch.float32, device, requires_grad=True)
    run = lambda a, b: capsrouting.capsule_routing(a, b, 3, backend=backend)  # noqa: E731
    torch.autograd.grad(run(u, W).sum(), (u, W))
    torch._dynamo.reset()
    torch.autograd.grad(torch.compile(run, backend="aot_eager", fullgraph=True)(u, W).sum(), (u, W))
    with pytest.raises(AssertionError, match="reference gradient ran"):
        torch.autograd.grad(run(u, W).sum(), (u, W), create_graph=True)


@pytest.mark.parametrize("backend,device", [p for p in _backends() if p.id in ("cpu", "cuda")])
def test_gradient_penalty_step_of_a_capsnet_matches_backend_torch(backend, device):
    """One step of loss + |d loss / d image|^2, the shape of a gradient penalty, in float64."""
    grads = {}
    for name in (backend, "torch"):
        torch.manual_seed(0)
        model = CapsNet(input_size=20, backend=name).double().to(device)
        x = torch.rand(3, 1, 20, 20, dtype=torch.float64, device=device, requires_grad=True)
        labels = torch.tensor([1, 7, 3], device=device)
        loss = capsnet_loss(model(x, labels), x, labels)
        (dx,) = torch.autograd.grad(loss, x, create_graph=True)
        total = loss + 10.0 * dx.square().sum()
        grads[name] = torch.autograd.grad(total, list(model.parameters()))
    for got, want in zip(grads[backend], grads["torch"]):
        scale = want.abs().max()
        assert (got - want).abs().max() <= 1e-9 * scale, (got - want).abs().max() / scale


@pytest.mark.parametrize("backend,device", [p for p in _backends() if p.id != "torch"])
def test_differentiating_a_backward_op_directly_raises_a_clear_error(backend, device):
    ops = torch.ops.capsrouting
    op = {"triton": ops.route_triton_backward, "cpu": ops.route_ext_backward, "cuda": ops.route_ext_backward}[backend]
    forward = {"triton": ops.route_triton, "cpu": ops.route_ext, "cuda": ops.route_ext}[backend]
    u_hat = torch.randn(2, 5, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    # The ops take the routing options: bias, logit_prior, leaky, detach_inner, and return_couplings or
    # option_grads (all off here).
    *_, s_saved, V_saved = forward(u_hat.detach(), None, None, False, False, False, 2)
    grad_v = torch.randn(2, 3, 4, dtype=torch.float64, device=device)
    du_hat = op(grad_v, u_hat, None, None, False, False, True, s_saved, V_saved, 2)
    du_hat = du_hat[0] if isinstance(du_hat, (tuple, list)) else du_hat
    with pytest.raises(RuntimeError, match="has no derivative of its own; differentiate capsrouting"):
        du_hat.sum().backward()


@pytest.mark.parametrize("backend,device", [p for p in _backends() if p.id != "torch"])
def test_torch_func_transforms_run_the_reference(backend, device, monkeypatch):
    """torch.func.grad, jacrev and vmap: the fused ops have no functorch rules, so inside a transform
    every backend runs as "torch"; an explicitly named one says so once, "auto" quietly."""
    from capsrouting import backends

    monkeypatch.setattr(backends, "_announced", set())
    u, W = make_inputs(3, 7, 4, 5, 6, torch.float64, device)
    run = lambda name: lambda W: capsrouting.capsule_routing(u, W, 3, backend=name).square().sum()  # noqa: E731
    want = torch.func.grad(run("torch"))(W)
    with pytest.warns(RuntimeWarning, match=f"backend '{backend}' runs as 'torch'"):
        got = torch.func.grad(run(backend))(W)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.func.grad(run("auto"))(W), want, rtol=1e-12, atol=0)  # no warning
    jac = torch.func.jacrev(lambda x: capsrouting.route(x, 2, backend=backend))(u[0, :, :4].reshape(1, 7, 1, 4))
    assert jac.shape == (1, 1, 4, 1, 7, 1, 4)
    with pytest.raises(ValueError, match="backend must be 'auto' or an available backend"):
        torch.func.grad(run("no-such-backend"))(W)
    v = torch.vmap(lambda x: capsrouting.capsule_routing(x, W, 3, backend=backend))(u.unsqueeze(1))
    torch.testing.assert_close(v.squeeze(1), capsrouting.capsule_routing(u, W, 3, backend=backend), rtol=1e-12, atol=1e-14)
