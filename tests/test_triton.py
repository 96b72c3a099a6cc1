"""Backend "triton" against the reference: values, gradients, edge cases, memory, registration.

Without a GPU these run the real kernels in Triton's interpreter on CPU tensors
(conftest.py sets TRITON_INTERPRET=1); on a GPU machine, on CUDA tensors.
"""
import pytest
import torch

import capsrouting
from capsrouting import reference
from capsrouting.backends import unavailable_reason
from capsrouting.tolerances import ACCUMULATION_ERROR_RATIO

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

pytestmark = pytest.mark.skipif(unavailable_reason("triton") is not None, reason=f"triton backend: {unavailable_reason('triton')}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, I, Din, J, Dout, R): the paper's layer, odd I, J = 1, B = 1, the largest sizes, non-power-of-two J and D.
SHAPES = {
    "paper": (2, 1152, 8, 10, 16, 3),
    "odd_I_1153": (1, 1153, 2, 3, 4, 2),
    "odd_I_37_R1": (3, 37, 8, 10, 16, 1),
    "J1_R5": (2, 37, 3, 1, 5, 5),
    "B1": (1, 45, 8, 10, 16, 3),
    "largest": (2, 19, 16, 64, 32, 2),
    "non_pow2": (2, 23, 5, 33, 17, 3),
    "non_pow2_small": (2, 23, 5, 20, 17, 3),  # within the float64 limit
    "two_batch_tiles": (17, 29, 3, 10, 16, 2),  # half inputs: tl.dot over Din padded from 3 to 16
}


def _case_ids(names):
    return [pytest.param(SHAPES[n], id=n) for n in names]


# The two largest run only the capsule_routing entry point: route shares its kernels and,
# under the interpreter, would double the two slowest tests of the suite.
_ONE_ENTRY = {"paper", "odd_I_1153"}


@pytest.mark.parametrize("name", list(SHAPES))
def test_float32_matches_reference(name):
    entries = ("capsule_routing",) if name in _ONE_ENTRY else ("capsule_routing", "route")
    assert_matches_reference("triton", *SHAPES[name], dtype=torch.float32, device=DEVICE, entries=entries)


@pytest.mark.parametrize("shape", _case_ids(["odd_I_37_R1", "J1_R5", "B1", "non_pow2_small"]))
def test_float64_matches_reference(shape):
    assert_matches_reference("triton", *shape, dtype=torch.float64, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", _case_ids(["B1", "non_pow2", "two_batch_tiles"]))
def test_half_types_within_twice_the_reference_error(shape, dtype):
    assert_matches_reference("triton", *shape, dtype=dtype, device=DEVICE)


# The routing options of DESIGN.md §6: those that change the forward together (with leaky's softmax and the
# prior's logits in every kernel, the bias and prior gradients), and detach_inner alone (the one-pass backward).
OPTION_SETS = {"bias+prior+leaky": ("bias", "logit_prior", "leaky"), "detach_inner": ("detach_inner",)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_routing_options_within_the_tolerance_table(option_set, dtype):
    """Two batch tiles (tl.dot for half inputs), odd sizes; values and every gradient, options' included."""
    B, I, Din, J, Dout, R = SHAPES["two_batch_tiles"]
    options = routing_option_values(I, J, Dout, OPTION_SETS[option_set])
    assert_matches_reference("triton", B, I, Din, J, Dout, R, dtype=dtype, device=DEVICE, options=options)


def test_detach_inner_backward_is_one_pass(monkeypatch):
    """With detach_inner and no bias or prior needing a gradient, phase 1 of the backward never runs
    (DESIGN.md §6: du_hat = c(R) g_s(R)); with a bias that needs one, it does."""
    from capsrouting import triton_backend

    kernels = triton_backend._kernels()
    reduce_kernel = kernels._routing_backward_reduce_kernel
    monkeypatch.setattr(kernels, "_routing_backward_reduce_kernel", None)  # any launch would fail
    u, W = make_inputs(3, 11, 4, 5, 6, torch.float64, DEVICE, requires_grad=True)
    bias = torch.full((5, 6), 0.1, dtype=torch.float64, device=DEVICE)
    for leaky in (False, True):
        v = capsrouting.capsule_routing(u, W, 3, bias=bias, leaky=leaky, detach_inner=True, backend="triton")
        got = torch.autograd.grad(v.square().sum(), (u, W))
        v_ref = capsrouting.capsule_routing(u, W, 3, bias=bias, leaky=leaky, detach_inner=True, backend="torch")
        for g, want in zip(got, torch.autograd.grad(v_ref.square().sum(), (u, W))):
            torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)
    bias.requires_grad_()
    v = capsrouting.capsule_routing(u, W, 3, bias=bias, detach_inner=True, backend="triton")
    with pytest.raises(TypeError):  # the phase-1 kernel is needed now: the None above cannot be launched
        torch.autograd.grad(v.square().sum(), bias)
    monkeypatch.setattr(kernels, "_routing_backward_reduce_kernel", reduce_kernel)


def test_only_half_inputs_build_predictions_with_tl_dot():
    """The forward's tl.dot path (tensor cores, float32 accumulation) runs for half inputs where a batch
    tile has 16 elements, as in the half-type cases above; float32 and float64 stay on FMAs."""
    from capsrouting.triton_backend import launch_config

    for _, _, Din, J, Dout, _ in (SHAPES["B1"], SHAPES["two_batch_tiles"]):
        assert launch_config(J, Dout, Din, 2).DOT_K == 16
        assert launch_config(J, Dout, Din, 4).DOT_K == 0 and launch_config(J, Dout, Din, 8).DOT_K == 0
    _, _, Din, J, Dout, _ = SHAPES["non_pow2"]
    assert launch_config(J, Dout, Din, 2).DOT_K == 0  # batch tiles of 2: below tl.dot's 16 rows


# The interpreter rounds float32 -> bfloat16 toward zero (up to one unit in the last place,
# where a GPU's round-to-nearest costs half a unit), so its bfloat16 allowance is doubled.
INTERPRETER_BF16_TRUNCATES = DEVICE == "cpu"


def accumulation_ratio(dtype):
    return (2 if INTERPRETER_BF16_TRUNCATES and dtype == torch.bfloat16 else 1) * ACCUMULATION_ERROR_RATIO


@pytest.mark.skipif(not INTERPRETER_BF16_TRUNCATES, reason="on a GPU, float32 -> bfloat16 rounds to nearest")
def test_interpreter_truncates_float32_to_bfloat16():
    """Why the bfloat16 allowance is doubled under the interpreter; fails once the interpreter rounds."""
    u_hat = (0.1 * torch.randn(2, 16, 4, 8, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
    v = capsrouting.route(u_hat, 3, backend="triton")
    v32 = reference.route(u_hat.float(), 3)
    truncated = (v32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    assert torch.equal(v, truncated) and not torch.equal(v, v32.to(torch.bfloat16))


# Under the interpreter, I = 512 and one entry point per dtype keep this to seconds; half-precision
# sums would still be off by 10x (float16) and 30x (bfloat16) the allowance (tests/test_tolerances.py).
@pytest.mark.parametrize("entry,dtype", [("capsule_routing", torch.float16), ("route", torch.bfloat16)])
def test_half_types_accumulate_in_float32(entry, dtype):
    routing = getattr(capsrouting, entry)
    I = 512 if DEVICE == "cpu" else 2048
    assert_accumulates_in_float32(
        lambda *x: routing(*x, backend="triton"), dtype, DEVICE, entry, I=I, ratio=accumulation_ratio(dtype)
    )


@pytest.mark.parametrize("entry", ["capsule_routing", "route"])
def test_small_batch_split_paths(monkeypatch, entry):
    """Force the small-batch path: input capsules split across programs."""
    from capsrouting import triton_backend

    monkeypatch.setattr(triton_backend, "_program_target", lambda device: 256)
    B, I, Din, J, Dout = 2, 150, 8, 10, 16
    plan = triton_backend.launch_plan(B, I, J, Dout, Din, 8, 256)
    assert plan.splits > 1 and plan.reduce_splits > 1
    assert_matches_reference("triton", B, I, Din, J, Dout, 3, dtype=torch.float64, device=DEVICE, entries=(entry,))


def test_batch_chunked_weight_gradient(monkeypatch):
    """Force the batch-chunked dW path (few input capsules, many batch elements)."""
    from capsrouting import triton_backend

    monkeypatch.setattr(triton_backend, "_program_target", lambda device: 64)
    B, I, Din, J, Dout = 17, 30, 2, 10, 4
    assert triton_backend.launch_plan(B, I, J, Dout, Din, 8, 64).chunks > 1
    assert_matches_reference("triton", B, I, Din, J, Dout, 3, dtype=torch.float64, device=DEVICE, entries=("capsule_routing",))


def test_gradcheck_float64():
    # Odd sizes, few elements. Under the interpreter the full check (two forwards per input element, a
    # backward per output element) took minutes; fast mode compares the finite-difference and analytical
    # directional derivatives along random vectors. Every gradient element is compared with the reference's
    # in float64 elsewhere (test_float64_matches_reference).
    fast = DEVICE == "cpu"
    u, W = make_inputs(2, 5, 2, 3, 3, torch.float64, DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: capsrouting.capsule_routing(a, b, 3, backend="triton"), (u, W),
                                    fast_mode=fast)
    u_hat = reference.predictions(u, W).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: capsrouting.route(x, 2, backend="triton"), (u_hat,), fast_mode=fast)


def test_empty_batch():
    assert_empty_batch_works("triton", DEVICE)


def test_non_contiguous_inputs():
    assert_non_contiguous_inputs_work("triton", DEVICE)


@pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter runs programs one after another, so this cannot fail there")
def test_weight_gradient_is_bitwise_reproducible_on_a_gpu(monkeypatch):
    from capsrouting import triton_backend

    monkeypatch.setattr(triton_backend, "_program_target", lambda device: 64)  # exercise the chunked dW sum too
    u, W = make_inputs(17, 30, 2, 10, 4, torch.float32, DEVICE, requires_grad=True)
    assert triton_backend.launch_plan(17, 30, 10, 4, 2, 4, 64).chunks > 1
    grads = []
    for _ in range(2):
        v = capsrouting.capsule_routing(u, W, 3, backend="triton")
        grads.append(torch.autograd.grad(v.square().sum(), (u, W)))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def allocation_sizes(fn) -> list:
    """Bytes of every allocation ``fn`` makes, from the profiler's allocation events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    tree = prof.profiler.kineto_results.experimental_event_tree()
    return [n.extra_fields.alloc_size for n in walk(tree) if n.tag == _EventType.Allocation and n.extra_fields.alloc_size > 0]


@pytest.mark.parametrize("small_batch_paths", [False, True])
def test_never_allocates_B_I_J_elements(monkeypatch, small_batch_paths):
    from capsrouting import triton_backend

    # D * Din < B, so that W, dW and the partial dWs of the batch chunks stay below B*I*J elements;
    # I > 4 * BLOCK_I (16 here), so that the input capsules can be split.
    B, I, Din, J, Dout = 9, 65, 2, 5, 2
    device = torch.device(DEVICE)
    # 256 programs wanted forces both small-batch paths; 1 (as under the interpreter) forces neither.
    monkeypatch.setattr(triton_backend, "_program_target", lambda device: 256 if small_batch_paths else 1)
    plan = triton_backend.launch_plan(B, I, J, Dout, Din, 4, triton_backend._program_target(device))
    paths = (plan.splits, plan.reduce_splits, plan.chunks)
    # Input capsules split across programs and dW summed over batch chunks, or neither.
    assert (min(paths) > 1) if small_batch_paths else paths == (1, 1, 1), paths
    u, W = make_inputs(B, I, Din, J, Dout, torch.float32, DEVICE, requires_grad=True)
    # The caller's predictions, made before measuring; contiguous (a strided u_hat is copied once).
    u_hat = reference.predictions(u, W).detach().contiguous().requires_grad_()
    limit = B * I * J * u.element_size()

    # Gradients by autograd.grad: .backward() would add the copies AccumulateGrad makes of .grad.
    def routing(run):
        return lambda: torch.autograd.grad(run(u, W, 3).square().sum(), (u, W))

    # The measurement can fail: the reference alone allocates tensors of B*I*J elements and more.
    assert max(allocation_sizes(routing(reference.capsule_routing))) >= limit
    largest = max(allocation_sizes(routing(lambda a, b, n: capsrouting.capsule_routing(a, b, n, backend="triton"))))
    assert largest < limit, f"triton capsule_routing allocated {largest} bytes, limit {limit}"
    # route returns du_hat (B, I, J, D), the gradient the caller asked for; nothing else may reach B*I*J elements.
    sizes = allocation_sizes(lambda: torch.autograd.grad(capsrouting.route(u_hat, 3, backend="triton").square().sum(), u_hat))
    du_hat_bytes = u_hat.numel() * u_hat.element_size()
    big = [n for n in sizes if n >= limit]
    # The CUDA caching allocator reports sizes rounded up to its 512-byte blocks.
    rounding = 512 if DEVICE == "cuda" else 0
    assert len(big) == 1 and du_hat_bytes <= big[0] <= du_hat_bytes + rounding, (big, sorted(sizes)[-4:])


def test_opcheck():
    from capsrouting import triton_backend

    u, W = make_inputs(2, 9, 3, 4, 5, torch.float32, DEVICE, requires_grad=True)
    bias = torch.full((4, 5), 0.1, device=DEVICE, requires_grad=True)
    prior = torch.randn(9, 4, device=DEVICE, requires_grad=True)
    u_hat = reference.predictions(u, W).detach().requires_grad_()
    # Without routing options, and with every one of them on (DESIGN.md §6).
    for options in ((None, None, False, False, False), (bias, prior, True, True, True)):
        torch.library.opcheck(triton_backend.capsule_routing_op, (u, W, *options, 3))
        torch.library.opcheck(triton_backend.route_op, (u_hat, *options, 2))


def test_torch_compile_capsnet_training_step_matches_eager():
    # Under the interpreter, aot_eager: Inductor would only add its own code generation time.
    assert_compiled_capsnet_step_matches_eager("triton", DEVICE, "aot_eager" if DEVICE == "cpu" else "inductor")


def test_sizes_beyond_the_kernels_raise_when_triton_is_asked_for():
    # (The automatic choice around these limits: tests/test_backend_choice.py.)
    with pytest.raises(ValueError, match="J <= 64"):
        capsrouting.route(torch.zeros(2, 3, 65, 4, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="float64 up to 1024"):
        capsrouting.route(torch.zeros(2, 3, 64, 32, dtype=torch.float64, device=DEVICE), backend="triton")


@pytest.mark.parametrize("case", BAD_INPUT_CASES, ids=[c[0] for c in BAD_INPUT_CASES])
def test_bad_input_same_errors_as_reference(case):
    _, call, exc, msg = case
    with pytest.raises(exc, match=msg):
        call("triton")
