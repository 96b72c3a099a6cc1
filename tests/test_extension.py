"""Backends "cpu" and "cuda" (the C++/CUDA extension) against the reference.

Values, gradients, edge cases, memory, determinism, registration and errors. The "cuda"
cases run only where a GPU and the extension's CUDA kernels are present.
"""
import concurrent.futures
import os

import pytest
import torch

import capsrouting
from capsrouting import backends, reference
from capsrouting.backends import resolve, unavailable_reason

from routing_checks import (
    BAD_INPUT_CASES,
    assert_accumulates_in_float32,
    assert_compiled_capsnet_step_matches_eager,
    assert_empty_batch_works,
    assert_matches_reference,
    assert_non_contiguous_inputs_work,
    make_inputs,
    routing_option_values,
)
from test_triton import allocation_sizes


@pytest.mark.skipif(
    os.environ.get("CAPSROUTING_REQUIRE_EXTENSION") != "1",
    reason="the extension is optional here (CI sets CAPSROUTING_REQUIRE_EXTENSION=1 to require it)",
)
def test_the_extension_is_present_where_it_is_required():
    # Without this, a build that fails to load would turn every cpu-backend test into a skip.
    assert unavailable_reason("cpu") is None, f"backend 'cpu' is required but unavailable: {unavailable_reason('cpu')}"


BACKENDS = [
    pytest.param(name, device, id=name, marks=pytest.mark.skipif(unavailable_reason(name) is not None, reason=f"{name} backend: {unavailable_reason(name)}"))
    for name, device in [("cpu", "cpu"), ("cuda", "cuda")]
]

# (B, I, Din, J, Dout, R). The CPU kernel handles 16 batch elements per chunk and 4 chunks
# per group: B = 35 pads the last chunk, B = 70 spans two groups; Din = 5 is not a multiple
# of its 4-column blocks.
SHAPES = {
    "paper_B2": (2, 1152, 8, 10, 16, 3),
    "paper_B35": (35, 1152, 8, 10, 16, 3),
    "two_groups_B70": (70, 37, 8, 10, 16, 3),
    "odd_I_1153": (1, 1153, 2, 3, 4, 2),
    "odd_I_37_R1": (3, 37, 8, 10, 16, 1),
    "J1_R5": (2, 37, 3, 1, 5, 5),
    "B1_R10": (1, 45, 8, 10, 16, 10),
    "largest": (2, 19, 16, 64, 32, 2),
    "non_pow2": (17, 23, 5, 33, 17, 3),
}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", list(SHAPES))
def test_float32_matches_reference(backend, device, name):
    assert_matches_reference(backend, *SHAPES[name], dtype=torch.float32, device=device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", ["paper_B35", "two_groups_B70", "J1_R5", "B1_R10", "non_pow2", "largest"])
def test_float64_matches_reference(backend, device, name):
    assert_matches_reference(backend, *SHAPES[name], dtype=torch.float64, device=device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["two_groups_B70", "non_pow2"])
def test_half_types_within_twice_the_reference_error(backend, device, name, dtype):
    assert_matches_reference(backend, *SHAPES[name], dtype=dtype, device=device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("entry", ["capsule_routing", "route"])
def test_half_types_accumulate_in_float32(backend, device, dtype, entry):
    routing = getattr(capsrouting, entry)
    assert_accumulates_in_float32(lambda *x: routing(*x, backend=backend), dtype, device, entry)


@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="cpu backend unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_runs_sizes_beyond_the_gpu_kernels(dtype):
    # J = 70 > 64, Dout = 40 > 32, Din = 20 > 16: the CPU kernel has no size limits.
    assert_matches_reference("cpu", 3, 11, 20, 70, 40, 2, dtype=dtype, device="cpu")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck_float64(backend, device):
    u, W = make_inputs(18, 7, 3, 4, 5, torch.float64, device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: capsrouting.capsule_routing(a, b, 3, backend=backend), (u, W))
    u_hat = reference.predictions(u, W).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: capsrouting.route(x, 2, backend=backend), (u_hat,))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    assert_empty_batch_works(backend, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    assert_non_contiguous_inputs_work(backend, device)


CPU_PATHS = ["small-batch", "batch"]  # CAPSROUTING_CPU_PATH: which CPU kernels run, whatever the batch size


@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="cpu backend unavailable")
@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("with_prior", [False, True], ids=["plain", "logit_prior"])
def test_cpu_weight_gradient_bits_do_not_depend_on_threads(with_prior, path, monkeypatch):
    """Each dW[i] (and d logit_prior[i]) is summed over the batch in a fixed order by one thread; the
    small-batch kernels' partial sums over slices of input capsules are added in slice order."""
    monkeypatch.setenv("CAPSROUTING_CPU_PATH", path)
    B, I = (5, 150) if path == "small-batch" else (50, 30)  # small batch: 3 slices of input capsules
    u, W = make_inputs(B, I, 5, 10, 4, torch.float32, "cpu", requires_grad=True)
    prior = torch.randn(I, 10, requires_grad=True) if with_prior else None
    inputs = (u, W, prior) if with_prior else (u, W)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            v = capsrouting.capsule_routing(u, W, 3, logit_prior=prior, backend="cpu")
            results.append((v, *torch.autograd.grad(v.square().sum(), inputs)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# Odd sizes for the small-batch kernels: I = 1153 is 72 whole float groups of 16 capsules and one
# capsule more (a partial group in a partial slice), Din = 5 is padded to 8; J = 1 (every coupling 1)
# and J = 10 with Dout = 16 (the paper's output capsules).
SMALL_BATCH_SHAPES = {"I1153_J1_Din5": (1153, 5, 1, 3, 3), "I37_J10_Din5": (37, 5, 10, 16, 3)}


@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="cpu backend unavailable")
@pytest.mark.parametrize("shape", list(SMALL_BATCH_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("B", range(1, 18))
def test_cpu_small_batch_kernels_match_reference(B, dtype, shape, monkeypatch):
    """Forced at every B from 1 to 17 (auto runs them only below the measured threshold): values and gradients."""
    monkeypatch.setenv("CAPSROUTING_CPU_PATH", "small-batch")
    I, Din, J, Dout, R = SMALL_BATCH_SHAPES[shape]
    assert_matches_reference("cpu", B, I, Din, J, Dout, R, dtype=dtype, device="cpu")


@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="cpu backend unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("option_set", ["none", "bias+prior+leaky", "detach_inner"])
def test_cpu_small_batch_kernels_with_options_and_half_types(dtype, option_set, monkeypatch):
    """Din = 8: float32 takes the paired-rows path for two whole groups of 16 capsules (I = 37 leaves a
    partial one); the half types take the generic path. Values and every gradient, the options' included."""
    monkeypatch.setenv("CAPSROUTING_CPU_PATH", "small-batch")
    B, I, Din, J, Dout, R = 5, 37, 8, 10, 16, 3
    options = routing_option_values(I, J, Dout, OPTION_SETS[option_set]) if option_set != "none" else None
    assert_matches_reference("cpu", B, I, Din, J, Dout, R, dtype=dtype, device="cpu", options=options)


@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="cpu backend unavailable")
def test_cpu_scratch_memory_is_safe_across_calls_and_threads():
    """The small-batch kernels keep their scratch per calling thread between calls (csrc/cpu/workspace.h):
    calls of different sizes interleaved, two layers' forwards before both backwards, and several Python
    threads at once give the same bits as each problem alone."""
    problems = [make_inputs(B, I, 8, 10, 16, torch.float32, "cpu", requires_grad=True)
                for B, I in [(1, 1152), (7, 300), (16, 1152), (3, 37)]]
    grad_v = [torch.randn(u.shape[0], 10, 16, generator=torch.Generator().manual_seed(B)) for B, (u, _) in enumerate(problems)]

    def run(k):
        u, W = problems[k]
        v = capsrouting.capsule_routing(u, W, 3, backend="cpu")
        return (v, *torch.autograd.grad(v, (u, W), grad_v[k]))

    alone = [run(k) for k in range(len(problems))]
    # Two forwards, then the backwards in reverse order, as a model with two routing layers runs them.
    u0, W0 = problems[0]
    u2, W2 = problems[2]
    v0 = capsrouting.capsule_routing(u0, W0, 3, backend="cpu")
    v2 = capsrouting.capsule_routing(u2, W2, 3, backend="cpu")
    got2 = torch.autograd.grad(v2, (u2, W2), grad_v[2])
    got0 = torch.autograd.grad(v0, (u0, W0), grad_v[0])
    assert all(torch.equal(a, b) for a, b in zip((v0, *got0), alone[0]))
    assert all(torch.equal(a, b) for a, b in zip((v2, *got2), alone[2]))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, [k % len(problems) for k in range(16)]))
    for k, result in enumerate(results):
        assert all(torch.equal(a, b) for a, b in zip(result, alone[k % len(problems)])), k


@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="cpu backend unavailable")
def test_cpu_backward_reuses_predictions_only_of_the_same_inputs(monkeypatch):
    """The backward reuses its forward's predictions from scratch only while u, W and the forward's
    saved tensor are the very ones, unchanged: W changed in place must be built again."""
    monkeypatch.setenv("CAPSROUTING_CPU_PATH", "small-batch")
    ops = torch.ops.capsrouting
    u, W = make_inputs(2, 40, 8, 10, 16, torch.float32, "cpu")
    grad_v = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(1))
    backward = lambda s, V: ops.capsule_routing_ext_backward(grad_v, u, W, None, None, False, False, False, s, V, 3)  # noqa: E731
    _, _, s, V = ops.capsule_routing_ext(u, W, None, None, False, False, False, 3)
    W_before = W.clone()
    W.mul_(2.0)  # same storage, new version
    got = backward(s, V)
    ops.capsule_routing_ext(u[:1], W_before, None, None, False, False, False, 3)  # takes the scratch
    want = backward(s, V)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="cpu backend unavailable")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpu_forward_and_backward_on_different_kernels(dtype):
    """B = 24 under auto: the forward on the batch kernels (B > 16), the backward on the small-batch
    kernels (B <= 32), which read the forward's saved s(r) and V(r-1) in the same layout."""
    assert_matches_reference("cpu", 24, 37, 5, 10, 16, 3, dtype=dtype, device="cpu")


@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="cpu backend unavailable")
@pytest.mark.parametrize("B", [1, 3])
def test_cpu_batch_kernels_still_match_reference_at_small_batches(B, monkeypatch):
    monkeypatch.setenv("CAPSROUTING_CPU_PATH", "batch")
    assert_matches_reference("cpu", B, 37, 5, 10, 16, 3, dtype=torch.float64, device="cpu")


@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="cpu backend unavailable")
def test_a_bad_cpu_path_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CAPSROUTING_CPU_PATH", "fastest")
    u, W = make_inputs(2, 5, 3, 4, 5, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="CAPSROUTING_CPU_PATH must be 'auto', 'small-batch' or 'batch', got 'fastest'"):
        capsrouting.capsule_routing(u, W, 3, backend="cpu")


# The routing options of DESIGN.md §6: those that change the forward together, and detach_inner alone
# (the one-pass backward).
OPTION_SETS = {"bias+prior+leaky": ("bias", "logit_prior", "leaky"), "detach_inner": ("detach_inner",)}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_routing_options_within_the_tolerance_table(backend, device, option_set, dtype):
    """A padded last chunk (B = 35), odd sizes; values and every gradient, the options' included."""
    if "bias" not in backends.get(backend).options:
        pytest.skip(f"the {backend} backend runs no routing option")
    B, I, Din, J, Dout, R = 35, 37, 5, 10, 16, 3
    options = routing_option_values(I, J, Dout, OPTION_SETS[option_set])
    assert_matches_reference(backend, B, I, Din, J, Dout, R, dtype=dtype, device=device, options=options)


def test_cpu_never_allocates_B_I_J_elements():
    # J >= Din padded to 4, so that the lane-minor copy of u is smaller than B*I*J too.
    B, I, Din, J, Dout = 40, 37, 2, 5, 2
    u, W = make_inputs(B, I, Din, J, Dout, torch.float32, "cpu", requires_grad=True)
    # The caller's predictions, made before measuring; contiguous (a strided u_hat is copied once).
    u_hat = reference.predictions(u, W).detach().contiguous().requires_grad_()
    limit = B * I * J * u.element_size()

    def step(run):
        return lambda: torch.autograd.grad(run(u, W, 3).square().sum(), (u, W))

    # The measurement can fail: the reference alone allocates B*I*J*Dout elements (u_hat).
    assert max(allocation_sizes(step(reference.capsule_routing))) >= limit * Dout
    largest = max(allocation_sizes(step(lambda a, b, n: capsrouting.capsule_routing(a, b, n, backend="cpu"))))
    assert largest < limit, f"cpu path allocated {largest} bytes, limit {limit}"
    # route returns du_hat (B, I, J, D), the gradient the caller asked for; nothing else may reach B*I*J elements.
    sizes = allocation_sizes(lambda: torch.autograd.grad(capsrouting.route(u_hat, 3, backend="cpu").square().sum(), u_hat))
    assert [n for n in sizes if n >= limit] == [u_hat.numel() * u_hat.element_size()], sorted(sizes)[-4:]
    # A strided u_hat is copied once (and the copy kept for the backward), not once per kernel.
    strided = u_hat.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    sizes = allocation_sizes(lambda: torch.autograd.grad(capsrouting.route(strided, 3, backend="cpu").square().sum(), strided))
    assert len([n for n in sizes if n >= limit]) == 2, sorted(sizes)[-4:]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    ops = torch.ops.capsrouting
    u, W = make_inputs(18, 9, 3, 4, 5, torch.float32, device, requires_grad=True)
    u_hat = reference.predictions(u, W).detach().requires_grad_()
    option_sets = [(None, None, False, False, False)]
    if "bias" in backends.get(backend).options:  # and with every routing option on (DESIGN.md §6)
        bias = torch.full((4, 5), 0.1, device=device, requires_grad=True)
        option_sets.append((bias, torch.randn(9, 4, device=device, requires_grad=True), True, True, True))
    for options in option_sets:
        torch.library.opcheck(ops.capsule_routing_ext.default, (u, W, *options, 3))
        torch.library.opcheck(ops.route_ext.default, (u_hat, *options, 2))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_capsnet_training_step_matches_eager(backend, device):
    assert_compiled_capsnet_step_matches_eager(backend, device)


@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="cpu backend unavailable")
def test_auto_picks_the_extension_for_cpu_tensors():
    u, W = make_inputs(2, 5, 3, 4, 5, torch.float32, "cpu")
    assert resolve("auto", u, W).name == "cpu"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", BAD_INPUT_CASES, ids=[c[0] for c in BAD_INPUT_CASES])
def test_bad_input_same_errors_as_reference(backend, device, case):
    _, call, exc, msg = case
    with pytest.raises(exc, match=msg):
        call(backend)


# The ops check their arguments in C++ too, for callers that bypass the Python API.
_u, _W = torch.randn(2, 5, 3), torch.randn(5, 4, 6, 3)
# The ops' routing options, all off: (bias, logit_prior, leaky, detach_inner, return_couplings) for a
# forward, (bias, logit_prior, leaky, detach_inner, option_grads) for a backward.
_OFF = (None, None, False, False, False)
_OFF_BACKWARD = (None, None, False, False, True)
DIRECT_OP_CASES = [
    ("u_rank", lambda ops: ops.capsule_routing_ext(torch.randn(2, 5), _W, *_OFF, 3), ValueError, r"u must have shape \(B, I, Din\)"),
    ("I_mismatch", lambda ops: ops.capsule_routing_ext(_u, torch.randn(6, 4, 6, 3), *_OFF, 3), ValueError, r"I = u.shape\[1\] = 5"),
    ("Din_mismatch", lambda ops: ops.capsule_routing_ext(_u, torch.randn(5, 4, 6, 2), *_OFF, 3), ValueError, r"Din = u.shape\[2\] = 3"),
    ("W_rank", lambda ops: ops.capsule_routing_ext(_u, torch.randn(5, 4, 6), *_OFF, 3), ValueError, r"W must have shape \(I, J, Dout, Din\)"),
    ("int_u", lambda ops: ops.capsule_routing_ext(_u.long(), _W, *_OFF, 3), TypeError, "u must have dtype"),
    ("int_W", lambda ops: ops.capsule_routing_ext(_u, _W.int(), *_OFF, 3), TypeError, "W must have dtype"),
    # A meta W among CPU tensors dispatches to the fake kernel, which checks too; redispatching
    # to the CPU key reaches the C++ check itself.
    ("mixed_device", lambda ops: ops.capsule_routing_ext(_u, _W.to("meta"), *_OFF, 3), ValueError, "same device"),
    ("mixed_device_cpp", lambda ops: ops.capsule_routing_ext.default.redispatch(
        torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), _u, _W.to("meta"), *_OFF, 3), ValueError, "u and W must be on the same device"),
    ("mixed_dtype", lambda ops: ops.capsule_routing_ext(_u, _W.double(), *_OFF, 3), TypeError, "same dtype"),
    ("zero_iterations", lambda ops: ops.route_ext(torch.randn(2, 5, 3, 4), *_OFF, 0), ValueError, "num_iterations must be >= 1"),
    ("empty_J", lambda ops: ops.route_ext(torch.randn(2, 5, 0, 4), *_OFF, 3), ValueError, "every dimension but the batch"),
    ("grad_shape", lambda ops: ops.route_ext_backward(torch.randn(2, 3, 5), torch.randn(2, 5, 3, 4), *_OFF_BACKWARD, torch.zeros(2, 3, 3, 4), torch.zeros(2, 3, 3, 4), 3),
     ValueError, r"grad_v must have shape \(B, J, D\) = \(2, 3, 4\)"),
    ("saved_dtype", lambda ops: ops.route_ext_backward(torch.randn(2, 3, 4), torch.randn(2, 5, 3, 4), *_OFF_BACKWARD, torch.zeros(2, 3, 3, 4).double(), torch.zeros(2, 3, 3, 4), 3),
     TypeError, "s_saved must have dtype Float"),
    # The routing options (DESIGN.md §6) are checked in C++ as well.
    ("bias_shape_cpp", lambda ops: ops.capsule_routing_ext(_u, _W, torch.randn(6, 4), None, False, False, False, 3),
     ValueError, r"bias must have shape \(J, Dout\) = \(4, 6\), got shape \[6, 4\]"),
    ("prior_dtype_cpp", lambda ops: ops.route_ext(torch.randn(2, 5, 3, 4), None, torch.randn(5, 3).double(), False, False,
                                                  False, 3), TypeError, "logit_prior must have the dtype of the routed input"),
]


@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="cpu backend unavailable")
@pytest.mark.parametrize("case", DIRECT_OP_CASES, ids=[c[0] for c in DIRECT_OP_CASES])
def test_ops_check_their_arguments_in_cpp(case):
    _, call, exc, msg = case
    with pytest.raises(exc, match=msg):
        call(torch.ops.capsrouting)
