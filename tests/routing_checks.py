"""Comparison of any backend with the reference, shared by the backend test files.

Tolerances per dtype against the float64 reference are those of ``capsrouting.tolerances``
(also used by ``python -m capsrouting.info``):

| dtype    | rule                                                                    |
| -------- | ----------------------------------------------------------------------- |
| float64  | rtol 1e-10, atol 1e-10                                                  |
| float32  | rtol 1e-4, atol 1e-5                                                    |
| float16, | max |error| at most 2x that of the reference computed natively in the  |
| bfloat16 | same dtype (plus 1e-6 for exact cases), output and gradients; and, on a |
|          | problem with long sums, at most 2x the error of float32 accumulation    |
|          | rounded once to the dtype (``assert_accumulates_in_float32``)           |
"""
import torch

import capsrouting
from capsrouting import reference
from capsrouting.tolerances import ACCUMULATION_ERROR_RATIO, HALF_ERROR_RATIO, TOLERANCES


def make_inputs(B, I, Din, J, Dout, dtype, device, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, I, Din, generator=g, dtype=torch.float64)
    # Scaled so that |u_hat| is O(1) whatever Din: routing neither saturates nor vanishes.
    W = torch.randn(I, J, Dout, Din, generator=g, dtype=torch.float64) / Din**0.5
    u, W = u.to(device=device, dtype=dtype), W.to(device=device, dtype=dtype)
    return u.requires_grad_(requires_grad), W.requires_grad_(requires_grad)


def _run(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    return [out, *grads]


def _compare(name, got, want64, native, dtype):
    labels = ["v", *(f"grad {k}" for k in range(len(got) - 1))]
    for label, g, w, n in zip(labels, got, want64, native or [None] * len(got), strict=True):
        assert g.dtype == dtype, f"{name} {label}: dtype {g.dtype}, expected {dtype}"
        if dtype in TOLERANCES:
            rtol, atol = TOLERANCES[dtype]
            torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol, msg=lambda m: f"{name} {label}: {m}")
        else:
            err = (g.double() - w).abs().max().item()
            ref_err = (n.double() - w).abs().max().item()
            assert err <= HALF_ERROR_RATIO * ref_err + 1e-6, (
                f"{name} {label}: max error {err:.3e} > {HALF_ERROR_RATIO} x native-{dtype} reference error {ref_err:.3e}"
            )


def routing_option_values(I, J, Dout, names, seed=2):
    """The routing options ``names`` (DESIGN.md §6) for a problem of these sizes, tensors in float64 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    values = dict(bias=0.1 + 0.3 * torch.randn(J, Dout, generator=g, dtype=torch.float64),
                  logit_prior=torch.randn(I, J, generator=g, dtype=torch.float64), leaky=True, detach_inner=True)
    return {name: values[name] for name in names}


def assert_matches_reference(backend, B, I, Din, J, Dout, R, *, dtype, device, entries=("capsule_routing", "route"),
                             options=None):
    """Forward and every gradient of ``backend`` against the float64 reference (CPU), for both entry points.

    ``options``: routing options (DESIGN.md §6); tensors among them are given in float64, rounded to ``dtype``
    (the reference then runs on exactly what the backend gets) and differentiated too.
    """
    u, W = make_inputs(B, I, Din, J, Dout, dtype, device)
    grad_out = torch.randn(B, J, Dout, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u64, W64 = u.double().cpu(), W.double().cpu()
    half = dtype not in TOLERANCES
    options = options or {}
    names = [k for k, v in options.items() if isinstance(v, torch.Tensor)]
    flags = {k: v for k, v in options.items() if k not in names}
    # The option tensors rounded to dtype first, as u and W are: the float64 reference then sees the very
    # inputs the backend gets (unrounded, a bfloat16 logit_prior alone puts 10% into du at Din = 8).
    opt64 = [options[k].to(dtype).double().cpu() for k in names]
    opt = [t.to(device=device, dtype=dtype) for t in opt64]
    opt_native = [t.to(dtype) for t in opt64]

    def runner(fn, n_inputs):
        return lambda *args: fn(*args[:n_inputs], R, **dict(zip(names, args[n_inputs:])), **flags)

    for entry, n_inputs in (("capsule_routing", 2), ("route", 1)):
        if entry not in entries:
            continue
        public = lambda *args, **kw: getattr(capsrouting, entry)(*args, backend=backend, **kw)  # noqa: E731
        ref = getattr(reference, entry)
        inputs = [u, W] if entry == "capsule_routing" else [reference.predictions(u.double(), W.double()).to(dtype)]
        got = _run(runner(public, n_inputs), [*inputs, *opt], grad_out.to(device))
        want = _run(runner(ref, n_inputs), [*(t.double().cpu() for t in inputs), *opt64], grad_out)
        native = _run(runner(ref, n_inputs), [*(t.cpu() for t in inputs), *opt_native], grad_out) if half else None
        _compare(f"{backend} {entry} {sorted(options)}", [t.cpu() for t in got], want, native, dtype)


def _routing(u, W, num_iterations=3):
    return lambda backend: capsrouting.capsule_routing(u, W, num_iterations, backend=backend)


def _route(u_hat, num_iterations=3):
    return lambda backend: capsrouting.route(u_hat, num_iterations, backend=backend)


_u, _W = torch.randn(2, 5, 3), torch.randn(5, 4, 6, 3)

# (id, call(backend), exception, message): every bad input of the API contract, for any backend.
BAD_INPUT_CASES = [
    ("u_rank", _routing(torch.randn(5), _W), ValueError, r"u must have shape \(\.\.\., I, Din\) \(at least 2 dims\)"),
    ("W_rank", _routing(_u, torch.randn(5, 4, 6)), ValueError, r"W must have shape \(I, J, Dout, Din\)"),
    ("I_mismatch", _routing(_u, torch.randn(6, 4, 6, 3)), ValueError, r"I = u.shape\[-2\] = 5"),
    ("Din_mismatch", _routing(_u, torch.randn(5, 4, 6, 2)), ValueError, r"Din = u.shape\[-1\] = 3"),
    ("int_u", _routing(torch.ones(2, 5, 3, dtype=torch.int64), _W), TypeError, "u must have dtype"),
    ("int_W", _routing(_u, torch.ones(5, 4, 6, 3, dtype=torch.int32)), TypeError, "W must have dtype"),
    ("mixed_dtype", _routing(_u, _W.double()), TypeError, "same dtype"),
    ("mixed_device", _routing(_u, torch.randn(5, 4, 6, 3, device="meta")), ValueError, "same device"),
    ("zero_iterations", _routing(_u, _W, 0), ValueError, "num_iterations must be >= 1"),
    ("float_iterations", _routing(_u, _W, 2.0), TypeError, "num_iterations must be an int"),
    ("empty_J", _routing(_u, torch.randn(5, 0, 6, 3)), ValueError, "every dimension but the batch"),
    ("u_not_a_tensor", _routing([[1.0]], _W), TypeError, "u must be a torch.Tensor"),
    ("route_rank", _route(torch.randn(5, 3)), ValueError, r"u_hat must have shape \(\.\.\., I, J, D\) \(at least 3 dims\)"),
    ("route_int", _route(torch.ones(2, 5, 3, 4, dtype=torch.int32)), TypeError, "u_hat must have dtype"),
    ("route_negative_iterations", _route(torch.randn(2, 5, 3, 4), -1), ValueError, "num_iterations"),
]


def assert_empty_batch_works(backend, device):
    """B = 0: empty outputs, zero dW, gradients of the right shapes."""
    u, W = make_inputs(0, 37, 8, 10, 16, torch.float32, device, requires_grad=True)
    v = capsrouting.capsule_routing(u, W, 3, backend=backend)
    assert v.shape == (0, 10, 16)
    v.sum().backward()
    assert torch.equal(W.grad, torch.zeros_like(W)) and u.grad.shape == u.shape
    u_hat = torch.zeros(0, 5, 3, 4, device=device, requires_grad=True)
    capsrouting.route(u_hat, 2, backend=backend).sum().backward()
    assert u_hat.grad.shape == u_hat.shape


def assert_non_contiguous_inputs_work(backend, device):
    """Transposed-then-restored views of u, W and u_hat give the reference's values and gradients (float64)."""
    u, W = make_inputs(3, 20, 8, 6, 4, torch.float64, device)
    u_nc = u.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    W_nc = W.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3).requires_grad_()
    assert not u_nc.is_contiguous() and not W_nc.is_contiguous()
    v = capsrouting.capsule_routing(u_nc, W_nc, 3, backend=backend)
    u_r, W_r = u.clone().requires_grad_(), W.clone().requires_grad_()
    v_ref = reference.capsule_routing(u_r, W_r, 3)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(v)
    for got, want in zip(torch.autograd.grad(v, (u_nc, W_nc), g), torch.autograd.grad(v_ref, (u_r, W_r), g)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    u_hat = reference.predictions(u, W).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not u_hat.is_contiguous()
    torch.testing.assert_close(capsrouting.route(u_hat, 3, backend=backend), reference.route(u_hat, 3), rtol=1e-10, atol=1e-10)


def assert_compiled_capsnet_step_matches_eager(backend, device, compile_backend="inductor"):
    """torch.compile(fullgraph=True) of a CapsNet forward and loss; gradients through the compiled backward."""
    from capsrouting.losses import capsnet_loss
    from capsrouting.models import CapsNet

    torch.manual_seed(0)
    model = CapsNet(input_size=20, backend=backend).to(device)  # 128 primary capsules: quick
    x = torch.rand(3, 1, 20, 20, device=device)
    labels = torch.tensor([1, 7, 3], device=device)

    def loss_and_lengths(m):
        out = m(x, labels)
        return capsnet_loss(out, x, labels), out.lengths

    def step(fn):
        # The backward of a compiled function is compiled too (AOTAutograd), so gradients
        # taken outside it still run through the traced backward ops.
        loss, lengths = fn(model)
        return loss, lengths, torch.autograd.grad(loss, list(model.parameters()))

    eager = step(loss_and_lengths)
    compiled = step(torch.compile(loss_and_lengths, fullgraph=True, backend=compile_backend))
    names = ["loss", "lengths"] + [f"grad {name}" for name, _ in model.named_parameters()]
    for name, got, want in zip(names, [compiled[0], compiled[1], *compiled[2]], [eager[0], eager[1], *eager[2]]):
        assert_close_relative(got, want, 1e-4, name)


def assert_close_relative(got, want, rtol, name=""):
    """max |got - want| <= rtol * max |want|: a tolerance relative to the tensor's own scale.

    Gradients of a CapsNet range from 1e-10 to 1e-2 between parameters, so one absolute
    tolerance would pass a gradient that is wrong by several percent.
    """
    scale = want.detach().abs().max().item()
    err = (got.detach() - want.detach()).abs().max().item()
    assert err <= rtol * scale, f"{name}: max |error| {err:.3e} > {rtol:g} x max |value| {scale:.3e}"


def assert_accumulates_in_float32(routing, dtype, device="cpu", entry="capsule_routing", I=2048, ratio=ACCUMULATION_ERROR_RATIO):
    """Half types: float32 accumulation, told apart from half-precision accumulation.

    ``routing(x[, W], num_iterations)`` runs the backend. The sums over the I input capsules
    (s in the forward, A in the backward) are long and their terms small, so summing them in
    the half dtype costs tens of units in the last place, while float32 sums rounded once to
    the dtype cost about half a unit. The backend's max error against the float64 reference,
    for v and each gradient, must be at most ``ratio`` (default ACCUMULATION_ERROR_RATIO) x that
    of the float32 computation rounded to ``dtype`` (inputs and the incoming gradient are exact
    in ``dtype``).
    """
    B, Din, J, Dout, R = 2, 4, 4, 8, 3
    g = torch.Generator().manual_seed(0)
    u = torch.randn(B, I, Din, generator=g, dtype=torch.float64).to(dtype)
    # |u_hat| ~ 0.5 / sqrt(I): the couplings' sums stay of order one, the squash unsaturated.
    W = (torch.randn(I, J, Dout, Din, generator=g, dtype=torch.float64) / (Din * I) ** 0.5).to(dtype)
    grad_out = torch.randn(B, J, Dout, generator=g, dtype=torch.float64).to(dtype).double()
    if entry == "capsule_routing":
        inputs, run_reference = [u, W], reference.capsule_routing
    else:
        inputs, run_reference = [reference.predictions(u.double(), W.double()).to(dtype)], reference.route
    want = _run(lambda *x: run_reference(*x, R), [t.double() for t in inputs], grad_out)
    float32_path = [t.to(dtype) for t in _run(lambda *x: run_reference(*x, R), [t.float() for t in inputs], grad_out)]
    got = _run(lambda *x: routing(*x, R), [t.to(device) for t in inputs], grad_out.to(device))
    for label, got_t, f32_t, want_t in zip(["v", "grad 0", "grad 1"], got, float32_path, want):
        assert got_t.dtype == dtype, f"{entry} {label}: dtype {got_t.dtype}, expected {dtype}"
        err = (got_t.double().cpu() - want_t).abs().max().item()
        f32_err = (f32_t.double() - want_t).abs().max().item()
        assert err <= ratio * f32_err, (
            f"{entry} {label}: max error {err:.3e} > {ratio} x {f32_err:.3e}, the error of float32 "
            f"accumulation rounded to {dtype}: not accumulated in float32"
        )


def assert_matches_reference_under_autocast(backend, B, I, Din, J, Dout, R, *, dtype, device, entries=("capsule_routing", "route")):
    """float32 inputs inside ``torch.autocast(dtype)``: v comes back in ``dtype``, gradients reach the
    float32 inputs in float32, and both are within the half-type rule of the float64 reference run
    on the inputs rounded to ``dtype`` (what autocast feeds the op)."""
    device_type = torch.device(device).type
    u, W = make_inputs(B, I, Din, J, Dout, torch.float32, device)
    grad_out = torch.randn(B, J, Dout, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    u_hat = reference.predictions(u.double(), W.double()).float()
    cases = {
        "capsule_routing": ([u, W], capsrouting.capsule_routing, reference.capsule_routing),
        "route": ([u_hat], capsrouting.route, reference.route),
    }
    for entry in entries:
        inputs, routing, run_reference = cases[entry]
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        with torch.autocast(device_type, dtype=dtype):
            v = routing(*leaves, R, backend=backend)
        assert v.dtype == dtype, f"{backend} {entry} under autocast: v has dtype {v.dtype}, expected {dtype}"
        grads = torch.autograd.grad(v, leaves, grad_out.to(v.device))
        assert all(g.dtype == torch.float32 for g in grads), f"{backend} {entry}: gradients {[g.dtype for g in grads]}"
        rounded = [t.detach().cpu().to(dtype) for t in inputs]
        want = _run(lambda *x: run_reference(*x, R), [t.double() for t in rounded], grad_out.double())
        native = _run(lambda *x: run_reference(*x, R), rounded, grad_out)
        for label, got_t, want_t, native_t in zip(["v", "grad 0", "grad 1"], [v, *grads], want, native):
            err = (got_t.detach().double().cpu() - want_t).abs().max().item()
            ref_err = (native_t.double() - want_t).abs().max().item()
            assert err <= HALF_ERROR_RATIO * ref_err + 1e-6, (
                f"{backend} {entry} {label} under autocast: max error {err:.3e} > {HALF_ERROR_RATIO} x native-{dtype} "
                f"reference error {ref_err:.3e}"
            )
