"""The Triton launchers' traffic model (``triton_backend.forward_traffic``) against the bytes the
kernels really load and store, counted under Triton's interpreter, and its figures at the paper's
shape.

Counting wraps the interpreter's masked load and store: each adds the bytes of its lanes whose
mask is true, as a GPU would move them (caches aside). Only the kernels count, not the torch ops
the launcher runs between launches.
"""
import contextlib

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


# (B, I, Din, J, Dout, R, dtype): batch not a multiple of the batch tile, odd sizes, float64,
# bfloat16, J x Dout large enough for a one-element batch tile.
SHAPES = [
    (5, 7, 3, 10, 16, 3, torch.float32),
    (19, 6, 2, 3, 5, 2, torch.float32),
    (3, 5, 4, 10, 16, 2, torch.float64),
    (4, 6, 8, 10, 16, 3, torch.bfloat16),
    (2, 3, 2, 40, 20, 2, torch.float32),
]


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("entry", ["capsule_routing", "route"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{s[0]}-I{s[1]}-Din{s[2]}-J{s[3]}-Dout{s[4]}-R{s[5]}-{str(s[6])[6:]}" for s in SHAPES])
def test_forward_traffic_model_counts_what_the_kernels_move(shape, entry, splits):
    B, I, Din, J, Dout, R, dtype = shape
    u, W = make_inputs(B, I, Din, J, Dout, dtype, "cpu")
    x, weights, K = (u, W, Din) if entry == "capsule_routing" else (torch.einsum("ijdk,bik->bijd", W, u).contiguous(), None, 0)
    with counted_traffic() as counts:
        triton_backend.routing_forward(x, weights, R, splits=splits)
    model = triton_backend.forward_traffic(B, I, J, Dout, K, R, x.element_size(), torch.device("cpu"), splits=splits)
    assert (counts["loaded"], counts["stored"]) == (model.loaded, model.stored)
