"""Comparison of any backend with the reference, shared by the backend test files.

Tolerances, per dtype, against the float64 reference:

| dtype    | rule                                                               |
| -------- | ------------------------------------------------------------------ |
| float64  | rtol 1e-10, atol 1e-10                                             |
| float32  | rtol 1e-4, atol 1e-5                                               |
| float16, | max |error| at most 2x that of the reference computed natively in |
| bfloat16 | the same dtype (plus 1e-6 for exact cases), output and gradients   |
"""
import torch

import capsrouting
from capsrouting import reference

TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-5)}
HALF_ERROR_RATIO = 2.0


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
    for label, g, w, n in zip(["v", "grad 0", "grad 1"], got, want64, native or [None] * len(got)):
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


def assert_matches_reference(backend, B, I, Din, J, Dout, R, *, dtype, device, entries=("capsule_routing", "route")):
    """Forward and every gradient of ``backend`` against the float64 reference (CPU), for both entry points."""
    u, W = make_inputs(B, I, Din, J, Dout, dtype, device)
    grad_out = torch.randn(B, J, Dout, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u64, W64 = u.double().cpu(), W.double().cpu()
    half = dtype not in TOLERANCES
    if "capsule_routing" in entries:
        got = _run(lambda a, b: capsrouting.capsule_routing(a, b, R, backend=backend), [u, W], grad_out.to(device))
        want = _run(lambda a, b: reference.capsule_routing(a, b, R), [u64, W64], grad_out)
        native = _run(lambda a, b: reference.capsule_routing(a, b, R), [u.cpu(), W.cpu()], grad_out) if half else None
        _compare(f"{backend} capsule_routing", [t.cpu() for t in got], want, native, dtype)
    if "route" in entries:
        u_hat = reference.predictions(u.double(), W.double()).to(dtype)
        got = _run(lambda x: capsrouting.route(x, R, backend=backend), [u_hat], grad_out.to(device))
        want = _run(lambda x: reference.route(x, R), [u_hat.double().cpu()], grad_out)
        native = _run(lambda x: reference.route(x, R), [u_hat.cpu()], grad_out) if half else None
        _compare(f"{backend} route", [t.cpu() for t in got], want, native, dtype)


def _routing(u, W, num_iterations=3):
    return lambda backend: capsrouting.capsule_routing(u, W, num_iterations, backend=backend)


def _route(u_hat, num_iterations=3):
    return lambda backend: capsrouting.route(u_hat, num_iterations, backend=backend)


_u, _W = torch.randn(2, 5, 3), torch.randn(5, 4, 6, 3)

# (id, call(backend), exception, message): every bad input of the API contract, for any backend.
BAD_INPUT_CASES = [
    ("u_rank", _routing(torch.randn(2, 5), _W), ValueError, r"u must have shape \(B, I, Din\)"),
    ("W_rank", _routing(_u, torch.randn(5, 4, 6)), ValueError, r"W must have shape \(I, J, Dout, Din\)"),
    ("I_mismatch", _routing(_u, torch.randn(6, 4, 6, 3)), ValueError, r"I = u.shape\[1\] = 5"),
    ("Din_mismatch", _routing(_u, torch.randn(5, 4, 6, 2)), ValueError, r"Din = u.shape\[2\] = 3"),
    ("int_u", _routing(torch.ones(2, 5, 3, dtype=torch.int64), _W), TypeError, "u must have dtype"),
    ("int_W", _routing(_u, torch.ones(5, 4, 6, 3, dtype=torch.int32)), TypeError, "W must have dtype"),
    ("mixed_dtype", _routing(_u, _W.double()), TypeError, "same dtype"),
    ("mixed_device", _routing(_u, torch.randn(5, 4, 6, 3, device="meta")), ValueError, "same device"),
    ("zero_iterations", _routing(_u, _W, 0), ValueError, "num_iterations must be >= 1"),
    ("float_iterations", _routing(_u, _W, 2.0), TypeError, "num_iterations must be an int"),
    ("empty_J", _routing(_u, torch.randn(5, 0, 6, 3)), ValueError, "every dimension but the batch"),
    ("u_not_a_tensor", _routing([[1.0]], _W), TypeError, "u must be a torch.Tensor"),
    ("route_rank", _route(torch.randn(2, 5, 3)), ValueError, r"u_hat must have shape \(B, I, J, D\)"),
    ("route_int", _route(torch.ones(2, 5, 3, 4, dtype=torch.int32)), TypeError, "u_hat must have dtype"),
    ("route_negative_iterations", _route(torch.randn(2, 5, 3, 4), -1), ValueError, "num_iterations"),
]
