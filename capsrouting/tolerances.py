"""How close a backend must come to the float64 reference, per dtype: one table for the
tests and for ``python -m capsrouting.info``'s self-check.

| dtype              | rule                                                                  |
| ------------------ | --------------------------------------------------------------------- |
| float64            | ``|got - ref| <= atol + rtol * |ref|`` with rtol 1e-10, atol 1e-10      |
| float32            | the same with rtol 1e-4, atol 1e-5                                    |
| float16, bfloat16  | max error at most ``HALF_ERROR_RATIO`` x that of the reference run    |
|                    | natively in the dtype, and at most ``ACCUMULATION_ERROR_RATIO`` x that |
|                    | of the float32 computation rounded to the dtype (float32 accumulation) |
"""
import torch

# (rtol, atol) against the float64 reference.
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-5)}

# Half types: no worse than the reference computed natively in that dtype...
HALF_ERROR_RATIO = 2.0
# ...and no worse than float32 accumulation followed by one rounding to that dtype allows.
# Both sides are about half a unit in the last place of the largest values; a backend that
# sums long reductions in half precision is off by many units.
ACCUMULATION_ERROR_RATIO = 2.0


def within_tolerance(got: torch.Tensor, want64: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``got`` (any dtype, any device) matches the float64 ``want64`` for a backend run in ``dtype``."""
    rtol, atol = TOLERANCES[dtype]
    got64 = got.detach().double().cpu()
    return bool(((got64 - want64).abs() <= atol + rtol * want64.abs()).all())
