"""The comparison rules of tests/routing_checks.py reject what they are meant to reject."""
import pytest
import torch

import capsrouting
from capsrouting import reference
from capsrouting.tolerances import ACCUMULATION_ERROR_RATIO

from routing_checks import assert_accumulates_in_float32


def _route_accumulating_in_half(u_hat, num_iterations):
    """Routing whose sums over the input capsules run in u_hat's own (half) dtype, one capsule at a time."""
    B, I, J, D = u_hat.shape
    logits = u_hat.new_zeros(B, I, J)
    for r in range(num_iterations):
        c = torch.softmax(logits.float(), dim=2).to(u_hat.dtype)
        s = u_hat.new_zeros(B, J, D)
        for i in range(I):
            s = s + c[:, i, :, None] * u_hat[:, i]
        v = reference.squash(s.float()).to(u_hat.dtype)
        if r < num_iterations - 1:
            logits = logits + (u_hat * v[:, None]).sum(-1)
    return v


# As the extension tests run it (I = 2048), and as the Triton interpreter tests do (I = 512,
# bfloat16 allowance doubled for the interpreter's truncation).
@pytest.mark.parametrize("I,interpreter", [(2048, False), (512, True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_accumulation_check_rejects_half_precision_sums(dtype, I, interpreter):
    ratio = ACCUMULATION_ERROR_RATIO * (2 if interpreter and dtype == torch.bfloat16 else 1)
    with pytest.raises(AssertionError, match="not accumulated in float32"):
        assert_accumulates_in_float32(_route_accumulating_in_half, dtype, entry="route", I=I, ratio=ratio)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("entry", ["capsule_routing", "route"])
def test_the_reference_backend_accumulates_in_float32(dtype, entry):
    routing = getattr(capsrouting, entry)
    assert_accumulates_in_float32(lambda *x: routing(*x, backend="torch"), dtype, entry=entry)
