"""The Triton launchers' traffic model (``triton_backend.forward_traffic`` and ``backward_traffic``)
against the bytes the kernels really load and store, counted under Triton's interpreter, and its
figures at the paper's shape.

Counting wraps the interpreter's masked load and store: each adds the bytes of its lanes whose
mask is true, as a GPU would move them (caches aside). Only the kernels count, not the torch ops
the launcher runs between launches.
"""
import contextlib
import dataclasses

import pytest
import torch

from routing_checks import make_inputs

triton = pytest.importorskip("triton")
from capsrouting import backends, triton_backend  # noqa: E402

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or backends.unavailable_reason("triton") is not None,
    reason="counts through Triton's interpreter (CPU only)",
)


@contextlib.contextmanager
def counted_traffic():
    """Bytes loaded and stored by the interpreted kernels inside the block: {'loaded': n, 'stored': n}."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store
    counts = {"loaded": 0, "stored": 0}

    def itemsize(ptrs):
        return np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize

    def counted_load(self, ptrs, mask, *args):
        counts["loaded"] += int(np.count_nonzero(mask.data)) * itemsize(ptrs)
        return load(self, ptrs, mask, *args)

    def counted_store(self, ptrs, value, mask, *args):
        counts["stored"] += int(np.count_nonzero(mask.data)) * itemsize(ptrs)
        return store(self, ptrs, value, mask, *args)

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    try:
        yield counts
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store


# (B, I, Din, J, Dout, R, dtype): batches not a multiple of the batch tile, two input tiles in
# phase 2, odd sizes, float64, bfloat16, a large J x Dout (batch tiles of 4), Din in two chunks.
SHAPES = [
    (5, 11, 3, 10, 16, 3, torch.float32),
    (33, 6, 2, 3, 4, 2, torch.float32),
    (3, 5, 4, 10, 16, 2, torch.float64),
    (4, 6, 8, 10, 16, 3, torch.bfloat16),
    (2, 3, 2, 40, 20, 2, torch.float32),
    (2, 3, 9, 33, 17, 2, torch.float32),
]


def routing_inputs(shape, entry):
    """(x, W or None, K, R) of a SHAPES entry for one entry point."""
    B, I, Din, J, Dout, R, dtype = shape
    u, W = make_inputs(B, I, Din, J, Dout, dtype, "cpu")
    if entry == "capsule_routing":
        return u, W, Din, R
    return torch.einsum("ijdk,bik->bijd", W, u).contiguous(), None, 0, R


# With 64 programs wanted, the small batches split their input capsules and, with weights, their
# weight gradient into batch chunks; with 1, neither (as the interpreter's launches run).
@pytest.mark.parametrize("programs", [1, 64])
@pytest.mark.parametrize("entry", ["capsule_routing", "route"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{s[0]}-I{s[1]}-Din{s[2]}-J{s[3]}-Dout{s[4]}-R{s[5]}-{str(s[6])[6:]}" for s in SHAPES])
def test_traffic_model_counts_what_the_kernels_move(monkeypatch, shape, entry, programs):
    monkeypatch.setattr(triton_backend, "_program_target", lambda device: programs)
    x, W, K, R = routing_inputs(shape, entry)
    B, I, J, Dout = x.shape[0], x.shape[1], shape[3], shape[4]
    plan = triton_backend.launch_plan(B, I, J, Dout, K, x.element_size(), programs)
    with counted_traffic() as forward:
        v, _, s_saved, Vprev_saved = triton_backend.routing_forward(x, W, R)
    grad_v = torch.randn_like(v)
    with counted_traffic() as backward:
        triton_backend.routing_backward(grad_v, x, W, s_saved, Vprev_saved, R)
    assert (forward["loaded"], forward["stored"]) == dataclasses.astuple(triton_backend.forward_traffic(plan, R))
    assert (backward["loaded"], backward["stored"]) == dataclasses.astuple(triton_backend.backward_traffic(plan, R))


def test_the_forced_paths_are_the_ones_counted():
    """The cases above reach the split forward and backward and the batch-chunked weight gradient."""
    plans = [triton_backend.launch_plan(s[0], s[1], s[3], s[4], s[2], 4, 64) for s in SHAPES]
    assert any(p.splits > 1 for p in plans) and any(p.chunks > 1 for p in plans)
    assert any(not p.cfg.W_IN_REGISTERS for p in plans) and any(p.cfg.W_IN_REGISTERS for p in plans)
    assert any(p.input_tiles > 1 for p in plans)


def counted(B, I, J, Dout, Din, R):
    """Bytes counted for a float32 forward and backward (one program wanted: no splits, no chunks)."""
    u, W = make_inputs(B, I, Din, J, Dout, torch.float32, "cpu")
    with counted_traffic() as forward:
        v, _, s_saved, Vprev_saved = triton_backend.routing_forward(u, W, R)
    with counted_traffic() as backward:
        triton_backend.routing_backward(torch.ones_like(v), u, W, s_saved, Vprev_saved, R)
    return forward["loaded"], forward["loaded"] + backward["loaded"]


def paper_layer_counts(monkeypatch):
    """(forward, forward + backward) bytes loaded at the paper's layer, B = 128, counted, and the
    launch plan the count belongs to (one program wanted: no splits, no chunks).

    Counting the whole layer takes the interpreter minutes, but without splits the loads are
    bilinear in B and I over whole batch and input tiles, a + b B + c I + d B I: counts at two
    batch sizes and two input sizes extrapolate exactly.
    """
    monkeypatch.setattr(triton_backend, "_program_target", lambda device: 1)
    J, Dout, Din, R = 10, 16, 8, 3
    cfg = triton_backend.launch_config(J, Dout, Din)
    # Multiples of both batch tiles and of the input tile.
    (B0, B1), (I0, I1) = (cfg.BLOCK_B, 2 * cfg.BLOCK_B), (cfg.INPUTS_BLOCK_I, 2 * cfg.INPUTS_BLOCK_I)
    c = {(B, I): counted(B, I, J, Dout, Din, R) for B in (B0, B1) for I in (I0, I1)}

    def extrapolate(B, I, n):  # bilinear interpolation through the four counts, evaluated at (B, I)
        x, y = (B - B0) / (B1 - B0), (I - I0) / (I1 - I0)
        value = ((1 - x) * (1 - y) * c[B0, I0][n] + x * (1 - y) * c[B1, I0][n]
                 + (1 - x) * y * c[B0, I1][n] + x * y * c[B1, I1][n])
        return round(value)

    B, I = 128, 1152
    return extrapolate(B, I, 0), extrapolate(B, I, 1), triton_backend.launch_plan(B, I, J, Dout, Din, 4, programs=1)


def loads(plan, R=3):
    forward = triton_backend.forward_traffic(plan, R).loaded
    return forward, forward + triton_backend.backward_traffic(plan, R).loaded


# As launched on a 132-SM GPU (4 programs wanted per SM): input capsules split over programs.
GPU_PLAN = dict(B=128, I=1152, J=10, D=16, K=8, element_size=4, programs=4 * 132)


def test_paper_layer_counts_equal_the_model(monkeypatch):
    """Paper layer (I = 1152, J = 10, Dout = 16, Din = 8, R = 3), B = 128: what the kernels load,
    counted, is what the model says, so the model's figures for a GPU launch below are the kernels'."""
    forward, total, plan = paper_layer_counts(monkeypatch)
    assert (forward, total) == loads(plan)
    assert triton_backend.launch_plan(**GPU_PLAN).splits > 1  # the GPU launch differs: input capsules split


# The targets at the paper's layer, B = 128, as launched on a 132-SM GPU: at most 0.33 and
# 0.8 x B|W| (0.25 and 0.6 GB), where the one-element-per-program kernels loaded 3.02 and 6.84 x.
def test_paper_layer_forward_loads_at_most_a_quarter_gigabyte():
    assert loads(triton_backend.launch_plan(**GPU_PLAN))[0] <= 0.25e9


def test_paper_layer_forward_and_backward_load_at_most_0_6_gigabytes():
    assert loads(triton_backend.launch_plan(**GPU_PLAN))[1] <= 0.6e9
