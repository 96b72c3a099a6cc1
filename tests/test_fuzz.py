"""Shape fuzzing: every fused backend against the float64 reference on shapes hypothesis draws.

Derandomized, so CI runs the same examples every time; a failure prints the shape to replay.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from capsrouting.backends import unavailable_reason

from routing_checks import assert_matches_reference

# (B, I, Din, J, Dout, R) with B = 0 allowed and sizes that straddle the kernels' tiles.
def shapes(max_B, max_I, max_J, max_Dout, max_Din):
    return st.tuples(
        st.integers(0, max_B), st.integers(1, max_I), st.integers(1, max_Din),
        st.integers(1, max_J), st.integers(1, max_Dout), st.integers(1, 4),
    )


@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason=f"cpu backend: {unavailable_reason('cpu')}")
@settings(max_examples=40, deadline=None, derandomize=True)
@given(shape=shapes(max_B=40, max_I=40, max_J=70, max_Dout=40, max_Din=20))
def test_cpu_backend_matches_the_reference_on_any_shape(shape):
    assert_matches_reference("cpu", *shape, dtype=torch.float64, device="cpu")


@pytest.mark.skipif(unavailable_reason("triton") is not None, reason=f"triton backend: {unavailable_reason('triton')}")
@settings(max_examples=5, deadline=None, derandomize=True)  # few and small: the interpreter is slow
@given(shape=shapes(max_B=3, max_I=20, max_J=64, max_Dout=32, max_Din=16))
def test_triton_backend_matches_the_reference_on_any_shape(shape):
    from capsrouting.triton_backend import size_limit_reason

    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, I, Din, J, Dout, R = shape
    dtype = torch.float64 if size_limit_reason(J, Dout, Din, 8) is None else torch.float32
    assert_matches_reference("triton", *shape, dtype=dtype, device=device)
