"""The reference routing equals an independent naive loop, in value and in gradient (float64)."""
import pytest
import torch

from capsrouting import reference

from naive import naive_capsule_routing, naive_route

# (B, I, Din, J, Dout): odd sizes, J = 1, B = 1
SHAPES = [(2, 3, 2, 2, 3), (1, 5, 3, 1, 2), (3, 4, 1, 3, 1), (2, 7, 4, 5, 3)]


def _inputs(B, I, Din, J, Dout, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, I, Din, generator=g, dtype=torch.float64)
    W = torch.randn(I, J, Dout, Din, generator=g, dtype=torch.float64) * 0.5
    return u, W


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_iterations", [1, 2, 3, 4, 5])
def test_reference_equals_naive_loop(shape, num_iterations):
    u, W = _inputs(*shape, seed=num_iterations)
    u.requires_grad_(True)
    W.requires_grad_(True)
    v_ref = reference.capsule_routing(u, W, num_iterations)
    v_naive = naive_capsule_routing(u, W, num_iterations)
    torch.testing.assert_close(v_ref, v_naive, rtol=1e-12, atol=1e-12)

    g = torch.randn_like(v_ref)
    du_ref, dW_ref = torch.autograd.grad(v_ref, (u, W), g)
    du_naive, dW_naive = torch.autograd.grad(v_naive, (u, W), g)
    torch.testing.assert_close(du_ref, du_naive, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dW_ref, dW_naive, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("num_iterations", [1, 3, 5])
def test_route_equals_naive_loop(num_iterations):
    g = torch.Generator().manual_seed(1)
    u_hat = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v_ref = reference.route(u_hat, num_iterations)
    v_naive = naive_route(u_hat, num_iterations)
    torch.testing.assert_close(v_ref, v_naive, rtol=1e-12, atol=1e-12)
    g_out = torch.randn_like(v_ref)
    torch.testing.assert_close(
        torch.autograd.grad(v_ref, u_hat, g_out)[0], torch.autograd.grad(v_naive, u_hat, g_out)[0], rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("num_iterations", [1, 3])
def test_reference_gradcheck(shape, num_iterations):
    u, W = _inputs(*shape)
    u.requires_grad_(True)
    W.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: reference.capsule_routing(a, b, num_iterations), (u, W))



def test_softmax_runs_over_output_capsules():
    # With one iteration the couplings are uniform 1/J, so s = mean over j's share: s_j = sum_i u_hat_ij / J.
    u_hat = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    v = reference.route(u_hat, 1)
    torch.testing.assert_close(v, reference.squash(u_hat.sum(1) / 4))


def test_squash_matches_formula_and_is_shorter_than_one():
    s = torch.randn(5, 7, 16, dtype=torch.float64) * 3
    n = s.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(reference.squash(s), n**2 / (1 + n**2) * s / torch.sqrt(n**2 + 1e-8))
    assert (reference.squash(s).norm(dim=-1) < 1).all()
    assert torch.isfinite(reference.squash(torch.zeros(3, 4))).all()
