"""The routing options of DESIGN.md §6 (bias, logit_prior, leaky, detach_inner, return_couplings) and
leading dimensions, through the public API, against the naive loops of tests/naive.py.

Every combination of the four options that change the routing is checked in float64, values
and the gradients of every differentiable input. Backends that do not run an option yet are
skipped by "auto" and refuse it when asked for; the fused kernels' support comes per backend.
"""
import dataclasses
import itertools
import warnings

import pytest
import torch

import capsrouting
from capsrouting import CapsuleLayer, backends
from capsrouting.models import CapsNet

from naive import naive_capsule_routing, naive_route

OPTION_NAMES = ("bias", "logit_prior", "leaky", "detach_inner")
COMBINATIONS = list(itertools.product((False, True), repeat=4))
# (B, I, Din, J, Dout, R): odd sizes, one iteration (only the last, undetached) and three.
SHAPES = [(2, 3, 2, 2, 3, 1), (2, 4, 3, 3, 2, 3)]
# The fused backends that run on CPU tensors here (Triton under its interpreter).
FUSED_ON_CPU = [n for n in ("cpu", "triton") if n in capsrouting.available_backends() and "cpu" in backends.get(n).device_types()]
ALL_ON_CPU = ["torch", *FUSED_ON_CPU]
# The kernels of a fused backend: Triton's two launch paths (one launch, and input capsules split over
# programs), the CPU kernels for small batches and for large (CAPSROUTING_CPU_PATH).
KERNEL_PATHS = {"triton": ["one_launch", "split"], "cpu": ["small-batch", "batch"]}


def _ids(combination):
    return "+".join(name for name, on in zip(OPTION_NAMES, combination) if on) or "none"


def make_problem(B, I, Din, J, Dout, combination, seed=0):
    """u, W, u_hat and the option tensors, float64, all requiring gradients."""
    g = torch.Generator().manual_seed(seed)
    bias_on, prior_on, leaky, detach_inner = combination
    u = torch.randn(B, I, Din, generator=g, dtype=torch.float64)
    W = 0.5 * torch.randn(I, J, Dout, Din, generator=g, dtype=torch.float64)
    u_hat = torch.randn(B, I, J, Dout, generator=g, dtype=torch.float64)
    bias = 0.1 + 0.3 * torch.randn(J, Dout, generator=g, dtype=torch.float64) if bias_on else None
    prior = torch.randn(I, J, generator=g, dtype=torch.float64) if prior_on else None
    tensors = [t.requires_grad_() for t in (u, W, u_hat, bias, prior) if t is not None]
    options = dict(bias=bias, logit_prior=prior, leaky=leaky, detach_inner=detach_inner)
    return u, W, u_hat, options, tensors


def values_and_grads(fn, inputs):
    """fn's output and the gradients of a fixed random projection of it wrt inputs (None where unreached).

    An output (v, c) (return_couplings) gives ((v, c), grads); c must carry no gradient.
    """
    out = fn()
    if isinstance(out, tuple):
        (v, c), grads = out, values_and_grads(lambda: out[0], inputs)[1]
        assert not c.requires_grad and c.grad_fn is None
        return (v, c), grads
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * weights).sum(), inputs, allow_unused=True)
    return out, grads


def assert_same(actual, expected, what):
    out, grads = actual
    naive_out, naive_grads = expected
    torch.testing.assert_close(out, naive_out, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: value\n{m}")  # (v[, c])
    for n, (g, ng) in enumerate(zip(grads, naive_grads)):
        if ng is None:
            assert g is None or torch.count_nonzero(g) == 0, f"{what}: input {n} gets a gradient the naive loop does not"
            continue
        torch.testing.assert_close(g, ng, rtol=1e-9, atol=1e-12, msg=lambda m: f"{what}: gradient of input {n}\n{m}")


@pytest.mark.parametrize("shape", SHAPES, ids=[f"R{s[-1]}" for s in SHAPES])
@pytest.mark.parametrize("combination", COMBINATIONS, ids=[_ids(c) for c in COMBINATIONS])
def test_every_combination_matches_the_naive_loop_float64(combination, shape):
    B, I, Din, J, Dout, R = shape
    u, W, u_hat, options, _ = make_problem(B, I, Din, J, Dout, combination)
    extra = [options[k] for k in ("bias", "logit_prior") if options[k] is not None]
    assert_same(
        values_and_grads(lambda: capsrouting.capsule_routing(u, W, R, backend="torch", **options), [u, W, *extra]),
        values_and_grads(lambda: naive_capsule_routing(u, W, R, **options), [u, W, *extra]),
        f"capsule_routing {_ids(combination)}",
    )
    assert_same(
        values_and_grads(lambda: capsrouting.route(u_hat, R, backend="torch", **options), [u_hat, *extra]),
        values_and_grads(lambda: naive_route(u_hat, R, **options), [u_hat, *extra]),
        f"route {_ids(combination)}",
    )


def test_detach_inner_leaves_only_the_last_iterations_gradient():
    """DESIGN.md §6: with detach_inner and no bias or prior, du_hat = c(R) g_s(R) exactly."""
    u_hat = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    v, c = capsrouting.route(u_hat, 3, detach_inner=True, return_couplings=True, backend="torch")
    g_v = torch.randn_like(v)
    (du_hat,) = torch.autograd.grad(v, u_hat, g_v)
    s = (c.unsqueeze(-1) * u_hat.detach()).sum(1)
    s.requires_grad_()
    (g_s,) = torch.autograd.grad(capsrouting.squash(s), s, g_v)
    torch.testing.assert_close(du_hat, c.unsqueeze(-1) * g_s.unsqueeze(1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("leaky", [False, True])
def test_couplings_are_the_last_iterations_and_carry_no_gradient(leaky):
    u, W, u_hat, options, _ = make_problem(2, 4, 3, 3, 2, (True, True, leaky, False))
    v, c = capsrouting.capsule_routing(u, W, 3, return_couplings=True, backend="torch", **options)
    naive_v, naive_c = naive_capsule_routing(u, W, 3, return_couplings=True, **options)
    torch.testing.assert_close(v, naive_v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c, naive_c, rtol=1e-10, atol=1e-12)
    assert c.shape == (2, 4, 3) and not c.requires_grad
    rows = c.sum(-1)
    assert bool((rows < 1).all()) if leaky else torch.allclose(rows, torch.ones_like(rows))


@pytest.mark.parametrize("backend", ALL_ON_CPU)
def test_gradcheck_with_every_option(backend):
    u, W, u_hat, options, _ = make_problem(2, 3, 2, 2, 3, (True, True, True, False))
    bias, prior = options["bias"], options["logit_prior"]
    fast = backend == "triton"  # the interpreter: directional derivatives along random vectors only
    torch.autograd.gradcheck(
        lambda u, W, b, p: capsrouting.capsule_routing(u, W, 3, bias=b, logit_prior=p, leaky=True, backend=backend),
        (u, W, bias, prior), fast_mode=fast,
    )
    # Not detach_inner: by design its gradient is not the derivative of the value (the naive loop checks it).
    torch.autograd.gradcheck(
        lambda x, b, p: capsrouting.route(x, 2, bias=b, logit_prior=p, backend=backend), (u_hat, bias, prior),
        fast_mode=fast,
    )


@pytest.mark.parametrize("backend", ALL_ON_CPU)
@pytest.mark.parametrize("entry", ["capsule_routing", "route"])
def test_leading_dimensions_route_each_position_separately(entry, backend, monkeypatch):
    """A (B, H, W, I, ...) input equals routing each (b, h, w) on its own; no leading dims gives one sample.

    Bit for bit, so the CPU backend runs one kernel path for both batch sizes (each path separately):
    the small-batch and the batch kernels sum in different orders."""
    for path in KERNEL_PATHS["cpu"] if backend == "cpu" else [None]:
        if path is not None:
            monkeypatch.setenv("CAPSROUTING_CPU_PATH", path)
        _check_leading_dimensions(entry, backend)


def _check_leading_dimensions(entry, backend):
    g = torch.Generator().manual_seed(3)
    I, Din, J, Dout = 5, 3, 4, 2
    W = torch.randn(I, J, Dout, Din, generator=g, dtype=torch.float64)
    x = torch.randn(2, 3, 2, I, Din, generator=g, dtype=torch.float64)
    if entry == "route":
        x = torch.einsum("ijdk,...ik->...ijd", W, x)
    bias = torch.randn(J, Dout, generator=g, dtype=torch.float64)

    def call(t):
        args = (t, W) if entry == "capsule_routing" else (t,)
        return getattr(capsrouting, entry)(*args, 3, bias=bias, return_couplings=True, backend=backend)

    v, c = call(x)
    assert v.shape == (2, 3, 2, J, Dout) and c.shape == (2, 3, 2, I, J)
    for b, h, w in itertools.product(range(2), range(3), range(2)):
        v_one, c_one = call(x[b, h, w : w + 1])
        torch.testing.assert_close(v[b, h, w], v_one[0], rtol=0, atol=0)
        torch.testing.assert_close(c[b, h, w], c_one[0], rtol=0, atol=0)
    v_single, _ = call(x[0, 0, 0])  # (I, Din): no leading dims at all
    assert v_single.shape == (J, Dout)
    torch.testing.assert_close(v_single, v[0, 0, 0], rtol=0, atol=0)


_u, _W = torch.randn(2, 5, 3), torch.randn(5, 4, 6, 3)
BAD_OPTIONS = [
    (dict(bias=torch.randn(6, 4)), ValueError, r"bias must have shape \(J, Dout\) = \(4, 6\), got shape \(6, 4\)"),
    (dict(bias=torch.randn(4, 6, 1)), ValueError, r"bias must have shape \(J, Dout\) \(2 dims\)"),
    (dict(bias=torch.randn(4, 6, dtype=torch.float64)), TypeError, "bias must have the dtype of the routed input, torch.float32"),
    (dict(bias=torch.randn(4, 6, device="meta")), ValueError, "bias must be on the device of the routed input"),
    (dict(bias=[[0.1] * 6] * 4), TypeError, "bias must be a torch.Tensor"),
    (dict(logit_prior=torch.randn(4, 5)), ValueError, r"logit_prior must have shape \(I, J\) = \(5, 4\)"),
    (dict(logit_prior=torch.zeros(5, 4, dtype=torch.int64)), TypeError, "logit_prior must have dtype"),
    (dict(leaky=1), TypeError, "leaky must be a bool, got 1"),
    (dict(detach_inner="yes"), TypeError, "detach_inner must be a bool"),
    (dict(return_couplings=None), TypeError, "return_couplings must be a bool"),
]


@pytest.mark.parametrize("options,error,message", BAD_OPTIONS, ids=[str(i) for i in range(len(BAD_OPTIONS))])
@pytest.mark.parametrize("entry", ["capsule_routing", "route"])
def test_bad_options_raise_clear_errors(entry, options, error, message):
    args = (_u, _W) if entry == "capsule_routing" else (torch.einsum("ijdk,bik->bijd", _W, _u),)
    with pytest.raises(error, match=message):
        getattr(capsrouting, entry)(*args, 2, backend="torch", **options)


OPTION_VALUES = dict(bias=torch.full((4, 6), 0.1), logit_prior=torch.zeros(5, 4), leaky=True, detach_inner=True,
                     return_couplings=True)


@pytest.mark.parametrize("option", list(OPTION_VALUES))
def test_a_backend_without_an_option_refuses_it_and_auto_falls_back_once(monkeypatch, option):
    """The cpu backend runs every option, so it is made to lack ``option`` here."""
    monkeypatch.setattr(backends, "_announced", set())
    name = "cpu"
    if name not in capsrouting.available_backends():
        pytest.skip(f"the {name} backend is unavailable: {backends.unavailable_reason(name)}")
    monkeypatch.setitem(backends._REGISTRY, name, dataclasses.replace(backends.get(name),
                                                                      options=backends.get(name).options - {option}))
    u, W = torch.randn(2, 5, 3), torch.randn(5, 4, 6, 3)
    kwargs = {option: OPTION_VALUES[option]}
    with pytest.raises(ValueError, match=rf"backend '{name}' cannot run this problem: the {name} backend does not support {option}"):
        capsrouting.capsule_routing(u, W, 2, backend=name, **kwargs)
    # auto, asked for every option: whichever fused backend lacks one is passed over, with one warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        v = capsrouting.capsule_routing(u, W, 2, **OPTION_VALUES)
        capsrouting.capsule_routing(u, W, 2, **OPTION_VALUES)
    messages = [str(w.message) for w in caught if "capsrouting" in str(w.message)]
    assert len(messages) == 1 and "using backend 'torch'" in messages[0] and "does not support" in messages[0]
    assert caught[0].filename == __file__  # the warning points at the caller
    expected = capsrouting.capsule_routing(u, W, 2, backend="torch", **OPTION_VALUES)
    torch.testing.assert_close(v, expected)


def test_capsule_layer_options_initialise_as_documented_and_learn():
    layer = CapsuleLayer(6, 3, 4, 5, num_iterations=2, backend="torch", bias=True, learn_logit_prior=True, leaky=True,
                         detach_inner=True)
    assert torch.equal(layer.bias, torch.full((4, 5), 0.1)) and torch.equal(layer.logit_prior, torch.zeros(6, 4))
    u = torch.randn(2, 7, 6, 3)  # leading dims: a batch of 2 by 7 positions
    v = layer(u)
    assert v.shape == (2, 7, 4, 5)
    torch.testing.assert_close(v, capsrouting.capsule_routing(u, layer.weight, 2, bias=layer.bias, logit_prior=layer.logit_prior,
                                                             leaky=True, detach_inner=True, backend="torch"))
    v.square().sum().backward()
    assert layer.bias.grad.abs().sum() > 0 and layer.logit_prior.grad.abs().sum() > 0
    assert "bias=True, learn_logit_prior=True, leaky=True, detach_inner=True" in repr(layer)
    plain = CapsuleLayer(6, 3, 4, 5)
    assert plain.bias is None and plain.logit_prior is None and len(list(plain.parameters())) == 1
    with pytest.raises(TypeError, match="leaky must be a bool"):
        CapsuleLayer(6, 3, 4, 5, leaky="no")


def test_capsnet_with_the_official_digit_bias_is_one_argument():
    model = CapsNet(backend="torch", routing_bias=True)
    assert torch.equal(model.digit_caps.bias, torch.full((10, 16), 0.1))
    assert "digit_caps.bias" in model.state_dict() and "digit_caps.bias" not in CapsNet(backend="torch").state_dict()
    with pytest.raises(TypeError, match="routing_bias must be a bool"):
        CapsNet(routing_bias=1)


@pytest.mark.parametrize("backend", ALL_ON_CPU)
def test_compiled_layer_with_options_matches_eager(backend):
    layer = CapsuleLayer(6, 3, 4, 5, num_iterations=3, backend=backend, bias=True, learn_logit_prior=True, leaky=True)
    u = torch.randn(3, 6, 3)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(u), layer(u))
    (g_compiled,) = torch.autograd.grad(compiled(u).sum(), layer.bias)
    (g_eager,) = torch.autograd.grad(layer(u).sum(), layer.bias)
    torch.testing.assert_close(g_compiled, g_eager)


@pytest.mark.parametrize("backend", [n for n in ("cpu", "triton") if n in capsrouting.available_backends()
                                     and "cpu" in backends.get(n).device_types()])
def test_fused_backends_take_leading_dimensions(backend):
    """Leading dims are flattened into the batch before any backend runs: values and gradients equal a flat call."""
    g = torch.Generator().manual_seed(5)
    u = torch.randn(2, 3, 7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(7, 3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = capsrouting.capsule_routing(u, W, 2, backend=backend)
    assert v.shape == (2, 3, 3, 5)
    du, dW = torch.autograd.grad(v.square().sum(), (u, W))
    v_flat = capsrouting.capsule_routing(u.reshape(6, 7, 4), W, 2, backend="torch")
    du_flat, dW_flat = torch.autograd.grad(v_flat.square().sum(), (u, W))
    torch.testing.assert_close(v, v_flat.reshape(2, 3, 3, 5), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(du, du_flat, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dW, dW_flat, rtol=1e-10, atol=1e-12)



@pytest.mark.parametrize("path", ["one_launch", "split", "small-batch", "batch"])
@pytest.mark.parametrize("backend", FUSED_ON_CPU)
def test_fused_backends_match_the_reference_on_the_options_they_run(backend, path, monkeypatch):
    """Every combination of the options a fused backend lists, float64 values and gradients against the
    torch backend, through each of its kernel paths. Every other combination also returns the couplings
    (when the backend lists return_couplings)."""
    if path not in KERNEL_PATHS.get(backend, []):
        pytest.skip(f"{backend} has no kernel path {path}")
    if backend == "triton":
        from capsrouting import triton_backend

        monkeypatch.setattr(triton_backend, "_program_target", lambda device: 1 if path == "one_launch" else 64)
    else:
        monkeypatch.setenv("CAPSROUTING_CPU_PATH", path)
    supported = backends.get(backend).options
    combinations = [c for c in COMBINATIONS if any(c) and all(n in supported for n, on in zip(OPTION_NAMES, c) if on)]
    if not combinations:
        pytest.skip(f"the {backend} backend runs no routing option yet")
    for k, combination in enumerate(combinations):
        for B, I, Din, J, Dout, R in SHAPES:
            u, W, u_hat, options, _ = make_problem(B, I, Din, J, Dout, combination)
            options["return_couplings"] = k % 2 == 1 and "return_couplings" in supported
            extra = [options[k] for k in ("bias", "logit_prior") if options[k] is not None]
            for entry, args, inputs in (("capsule_routing", (u, W), [u, W, *extra]), ("route", (u_hat,), [u_hat, *extra])):
                routing = getattr(capsrouting, entry)
                assert_same(
                    values_and_grads(lambda: routing(*args, R, backend=backend, **options), inputs),
                    values_and_grads(lambda: routing(*args, R, backend="torch", **options), inputs),
                    f"{backend} {entry} {_ids(combination)} R={R} return_couplings={options['return_couplings']}",
                )


@pytest.mark.parametrize("backend", [n for n in FUSED_ON_CPU if "bias" in backends.get(n).options])
def test_double_backward_with_options_equals_the_references(backend):
    """create_graph=True through a fused op with every option it lists on: second derivatives (a gradient
    penalty) as the reference's."""
    supported = backends.get(backend).options
    combination = tuple(name in supported for name in OPTION_NAMES)
    results = {}
    for name in (backend, "torch"):
        u, W, _, options, _ = make_problem(2, 4, 3, 3, 2, combination)
        extra = [options[k] for k in ("bias", "logit_prior") if options[k] is not None]
        v = capsrouting.capsule_routing(u, W, 3, backend=name, **options)
        (du,) = torch.autograd.grad(v.square().sum(), u, create_graph=True)
        results[name] = torch.autograd.grad(du.square().sum(), (W, *extra))
    for got, want in zip(results[backend], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", FUSED_ON_CPU)
def test_options_under_autocast_reach_float32_parameters(backend):
    """Inside torch.autocast(bfloat16) the options are cast with the inputs: v in bfloat16 as the torch
    backend's, and the gradients of float32 bias and prior come back in float32."""
    g = torch.Generator().manual_seed(4)
    u, W = torch.randn(3, 9, 4, generator=g), 0.5 * torch.randn(9, 5, 6, 4, generator=g)
    results = {}
    for name in (backend, "torch"):
        bias = torch.full((5, 6), 0.1, requires_grad=True)
        prior = (0.3 * torch.randn(9, 5, generator=torch.Generator().manual_seed(5))).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = capsrouting.capsule_routing(u, W, 3, bias=bias, logit_prior=prior, leaky=True, backend=name)
        assert v.dtype == torch.bfloat16
        grads = torch.autograd.grad(v.float().square().sum(), (bias, prior))
        assert all(t.dtype == torch.float32 for t in grads)
        results[name] = (v, *grads)
    # The same bfloat16 inputs and float32 sums in both: v may differ by one bfloat16 rounding (2**-7), and
    # the gradients through it as much.
    for got, want in zip(results[backend], results["torch"]):
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-7)


@pytest.mark.parametrize("entry", ["capsule_routing", "route"])
def test_docstrings_document_every_option(entry):
    doc = getattr(capsrouting, entry).__doc__
    assert doc and all(f"{name}:" in doc for name in (*OPTION_NAMES, "return_couplings", "backend"))
    assert "carries no gradient" in doc
