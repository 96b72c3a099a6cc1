"""Backend "triton": launchers for the fused kernels and their registration as custom ops.

The ops are ``torch.library.custom_op`` with ``register_fake`` and one
autograd registration (``_autograd.py``), so ``torch.compile(fullgraph=True)``
traces them without a graph break; with the Triton interpreter
(``TRITON_INTERPRET=1``) they also run on CPU tensors, which is how they are
tested without a GPU.
"""
import contextlib
import dataclasses
import os
from typing import Optional, Tuple

import torch

from ._autograd import register_backward_op_autograd, register_routing_autograd
from ._validation import check_capsule_routing_args, check_route_args
from .backends import Backend, accumulation_dtype, register
from .reference import SQUASH_EPS, squash

# Largest sizes the kernels are compiled and tested for.
MAX_J, MAX_DOUT, MAX_DIN = 64, 32, 16
# Elements of the (BLOCK_I, BLOCK_J, BLOCK_D) predictions tile: bounds registers per program.
_TILE_ELEMENTS = 2048
# Elements of the (BLOCK_J, BLOCK_D, BLOCK_K) dW tile of the input-gradient kernel.
_DW_TILE_ELEMENTS = 2048
# Smallest blocks: small capsule sizes are padded up so that few kernel variants exist
# (each is compiled and checked for spills ahead of time); padded lanes are masked.
_MIN_BLOCK_J, _MIN_BLOCK_D, _MIN_BLOCK_K = 16, 8, 4
_MAX_BLOCK_I = 16
# Batch elements per forward program: each W tile loaded serves all of them.
_MAX_BLOCK_B = 8  # 16 spills on sm_90 (tests/triton_aot.py)
# Batch chunks of the input-gradient kernel: each holds a partial dW, so keep them few.
_MAX_BATCH_CHUNKS = 8
_NUM_WARPS = 4
# Let ptxas use up to the hardware limit: left alone, it caps registers for occupancy and spills.
_MAX_REGISTERS = 255


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    if not torch.cuda.is_available() and not _interpreting():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors, slowly)"
    return None


def _device_types() -> Tuple[str, ...]:
    return ("cpu",) if _interpreting() else ("cuda",)


# float64 state takes twice the registers: its padded J x Dout is capped so no variant spills.
MAX_FLOAT64_JD = 1024


def size_limit_reason(J: int, D: int, K: int, element_size: int = 4) -> Optional[str]:
    """None if the kernels cover these capsule sizes, else why not."""
    if J > MAX_J or D > MAX_DOUT or K > MAX_DIN:
        return (
            f"the triton backend supports J <= {MAX_J}, Dout <= {MAX_DOUT}, Din <= {MAX_DIN}; "
            f"got J = {J}, Dout = {D}, Din = {K}"
        )
    cfg = launch_config(J, D, K, element_size)
    if element_size == 8 and cfg.BLOCK_J * cfg.BLOCK_D > MAX_FLOAT64_JD:
        return (
            f"the triton backend supports float64 up to {MAX_FLOAT64_JD} output elements per sample "
            f"(J and Dout padded to powers of two); got J = {J}, Dout = {D}"
        )
    return None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Compile-time block sizes for one problem shape (see the kernels' comment block)."""

    BLOCK_I: int  # input capsules per tile of the backward kernels (one batch element each)
    BLOCK_J: int
    BLOCK_D: int
    BLOCK_K: int
    num_warps: int
    maxnreg: int
    BLOCK_B: int = 1  # batch elements per forward program
    FORWARD_BLOCK_I: int = 1  # input capsules per forward tile of BLOCK_B elements

    def compile_options(self) -> dict:
        if _interpreting():  # the interpreter takes no compiler options
            return {}
        return dict(num_warps=self.num_warps, maxnreg=self.maxnreg)


def launch_config(J: int, D: int, K: int, element_size: int = 4) -> LaunchConfig:
    """Block sizes for J output capsules of D dims fed by Din = K (K = 0: predictions given).

    Tiles are sized in registers: a float64 element takes two, so its tiles hold half as many.
    """
    scale = max(1, element_size // 4)
    block_j = max(_MIN_BLOCK_J, _next_pow2(J))
    block_d = max(_MIN_BLOCK_D, _next_pow2(D))
    block_i = max(1, min(_MAX_BLOCK_I, _TILE_ELEMENTS // scale // (block_j * block_d)))
    # The dW tile holds a chunk of K; the input-gradient kernel loops over the chunks.
    block_k = min(max(_MIN_BLOCK_K, _next_pow2(K)), max(1, _DW_TILE_ELEMENTS // scale // (block_j * block_d))) if K else 1
    # A large J x D state (V, s, g_s, rows of u_hat) is spread over more threads; the register
    # cap then shrinks so that one program still fits an SM's 64K registers.
    num_warps = min(16, max(_NUM_WARPS, _NUM_WARPS * block_j * block_d * scale // 1024))
    if element_size == 8 and block_j * block_d >= 512:
        # Triton 3.6 spreads a float64 tile's input capsules over warps, which replicates the J x D
        # state in each: at 4 warps, J x D = 16 x 32 spilled there (tests/triton_aot.py).
        num_warps = max(num_warps, 8)
    # The forward's (BLOCK_B, BLOCK_I, BLOCK_J, BLOCK_D) tile: as many batch elements as the tile
    # holds (they share every W load), then input capsules.
    block_b = max(1, min(_MAX_BLOCK_B, _TILE_ELEMENTS // scale // (block_j * block_d)))
    forward_block_i = max(1, min(_MAX_BLOCK_I, _TILE_ELEMENTS // scale // (block_b * block_j * block_d)))
    return LaunchConfig(block_i, block_j, block_d, block_k, num_warps, min(_MAX_REGISTERS, 65536 // (32 * num_warps)),
                        block_b, forward_block_i)


def all_launch_configs():
    """Every (LaunchConfig, has_weights, element_size) the dispatch can choose, for the ahead-of-time check."""
    configs = set()
    for element_size in (2, 4, 8):
        for J in range(1, MAX_J + 1):
            for D in range(1, MAX_DOUT + 1):
                for K in range(0, MAX_DIN + 1):  # K = 0: predictions given (route)
                    if size_limit_reason(J, D, K, element_size) is None:
                        configs.add((launch_config(J, D, K, element_size), K > 0, element_size))
    return sorted(configs, key=lambda c: (c[2], c[1], dataclasses.astuple(c[0])))


def _program_target(device: torch.device) -> int:
    """Programs wanted in flight: a few per SM on a GPU; 1 under the interpreter (it runs them serially)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def split_count(B: int, I: int, block_i: int, device: torch.device) -> int:
    """Slices of the input capsules per batch element, so that small batches fill the device."""
    if B == 0 or B >= _program_target(device):
        return 1
    wanted = -(-_program_target(device) // B)
    return max(1, min(wanted, -(-I // (4 * block_i))))  # at least four tiles per slice


def input_slices(I: int, splits: int) -> Tuple[int, int]:
    """(input capsules per slice, slices) for about ``splits`` slices of I, none of them empty."""
    i_per_split = -(-I // splits)
    return i_per_split, -(-I // i_per_split)


def forward_split_count(B: int, I: int, cfg: LaunchConfig, device: torch.device) -> int:
    """Slices of the input capsules per batch tile of the forward (its programs own BLOCK_B elements)."""
    return split_count(-(-B // cfg.BLOCK_B), I, cfg.FORWARD_BLOCK_I, device)


def batch_chunks(B: int, I: int, k_chunks: int, weights_per_pair: int, device: torch.device) -> int:
    """Batch chunks for the input-gradient kernel when I x K-chunks alone leave the device idle.

    Each chunk holds a partial dW of I*J*weights_per_pair elements (weights_per_pair = Dout*Din);
    their number is capped so that all of them together stay below B*I*J elements.
    """
    programs = I * k_chunks
    if B == 0 or programs >= _program_target(device):
        return 1
    memory_cap = (B - 1) // weights_per_pair
    return max(1, min(memory_cap, _MAX_BATCH_CHUNKS, -(-_program_target(device) // programs)))


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Global-memory bytes the kernels of one call load and store (masked-off lanes move nothing)."""

    loaded: int
    stored: int


def forward_traffic(B: int, I: int, J: int, D: int, K: int, R: int, element_size: int, device: torch.device,
                    splits: Optional[int] = None) -> Traffic:
    """What ``routing_forward`` moves through its Triton launches (not the torch ops between them).

    K = 0: ``route``, the predictions u_hat (B, I, J, D) given. A program loads each (b, i) of its
    batch tile's u column once per iteration and per k, and each W element of its input capsules
    once per iteration for its whole tile: W costs ceil(B / BLOCK_B) reads per iteration, u and
    u_hat one each. Counted exactly against the interpreter in tests/test_triton_traffic.py.
    """
    cfg = launch_config(J, D, K, element_size)
    acc_size = 8 if element_size == 8 else 4
    tiles = -(-B // cfg.BLOCK_B)
    if splits is None:
        splits = forward_split_count(B, I, cfg, device)
    if splits > 1:  # as the launcher rounds them
        splits = input_slices(I, splits)[1]
    per_iteration = (B * I * K + I * J * D * K * tiles) if K else B * I * J * D
    loaded = R * per_iteration * element_size
    if splits == 1:  # one launch: s(r) and V(r-1) saved per iteration, v at the end
        stored = 2 * R * B * J * D * acc_size + B * J * D * element_size
    else:  # a launch per iteration: each slice loads its tile's V and stores a partial s
        loaded += R * splits * B * J * D * acc_size
        stored = R * splits * B * J * D * acc_size
    return Traffic(loaded, stored)


def _kernels():
    from . import _triton_kernels  # imported lazily: triton is optional

    return _triton_kernels


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _shape(x: torch.Tensor, W: Optional[torch.Tensor]):
    """(B, I, J, D, K); K is 0 when predictions are given."""
    if W is not None:
        I, J, D, K = W.shape
        return x.shape[0], I, J, D, K
    B, I, J, D = x.shape
    return B, I, J, D, 0


def routing_forward(x: torch.Tensor, W: Optional[torch.Tensor], num_iterations: int, splits: Optional[int] = None):
    """Fused forward. x is u (B, I, K) with W, or u_hat (B, I, J, D) without.

    Returns v (B, J, D) in x's dtype, and s(r), V(r-1) as (B, R, J, D) in the compute dtype.
    """
    B, I, J, D, K = _shape(x, W)
    R = num_iterations
    acc = accumulation_dtype(x.dtype)
    cfg = launch_config(J, D, K, x.element_size())
    v = torch.empty(B, J, D, device=x.device, dtype=x.dtype)
    s_saved = torch.empty(B, R, J, D, device=x.device, dtype=acc)
    Vprev_saved = torch.empty(B, R, J, D, device=x.device, dtype=acc)
    if B == 0:
        return v, s_saved, Vprev_saved
    batch_tiles = -(-B // cfg.BLOCK_B)
    splits = splits or forward_split_count(B, I, cfg, x.device)
    W_arg = W if W is not None else x
    kernel = _kernels()._routing_forward_kernel
    blocks = dict(HAS_W=W is not None, BLOCK_B=cfg.BLOCK_B, BLOCK_I=cfg.FORWARD_BLOCK_I, BLOCK_J=cfg.BLOCK_J,
                  BLOCK_D=cfg.BLOCK_D, **cfg.compile_options())
    with _device_guard(x):
        if splits == 1:
            kernel[(batch_tiles, 1)](x, W_arg, v, s_saved, Vprev_saved, B, I, J, D, K, R, 1, I, **blocks)
            return v, s_saved, Vprev_saved
        # Small batch: one launch per iteration over (B, splits) programs, slices combined in a fixed order.
        i_per_split, splits = input_slices(I, splits)
        partial = torch.empty(B, splits, J, D, device=x.device, dtype=acc)
        V = torch.zeros(B, J, D, device=x.device, dtype=acc)
        for r in range(R):
            kernel[(batch_tiles, splits)](x, W_arg, v, partial, V, B, I, J, D, K, R, splits, i_per_split, **blocks)
            s = partial.sum(dim=1)
            s_saved[:, r] = s
            Vprev_saved[:, r] = V
            out = squash(s)
            V = V + out
        v.copy_(out)
    return v, s_saved, Vprev_saved


def routing_backward(grad_v, x, W, s_saved, Vprev_saved, num_iterations: int, splits: Optional[int] = None):
    """Exact backward (DESIGN.md §3). Returns (dx, dW); dW is None without W."""
    B, I, J, D, K = _shape(x, W)
    R = num_iterations
    acc = s_saved.dtype
    cfg = launch_config(J, D, K, x.element_size())
    dx = torch.empty_like(x)
    dW = torch.zeros_like(W) if W is not None else None
    if B == 0:
        dx.zero_()
        return dx, dW
    has_w = W is not None
    W_arg = W if has_w else x
    kernels = _kernels()
    gs_saved = torch.empty_like(s_saved)
    splits = splits or split_count(B, I, cfg.BLOCK_I, x.device)
    blocks = dict(HAS_W=has_w, BLOCK_I=cfg.BLOCK_I, BLOCK_J=cfg.BLOCK_J, BLOCK_D=cfg.BLOCK_D, **cfg.compile_options())
    with _device_guard(x):
        # Phase 1: g_s(r) for every r, reducing A(r) over the input capsules.
        if splits == 1:
            kernels._routing_backward_reduce_kernel[(B, 1)](
                x, W_arg, grad_v, s_saved, Vprev_saved, gs_saved, gs_saved, I, J, D, K, R, 0, 1, I, **blocks
            )
        else:
            i_per_split, splits = input_slices(I, splits)
            partial = torch.empty(B, splits, J, D, device=x.device, dtype=acc)
            g_v = grad_v.to(acc)
            A_suffix = torch.zeros_like(g_v)
            for r in reversed(range(R)):
                gs = _squash_backward(s_saved[:, r], A_suffix + (g_v if r == R - 1 else 0))
                gs_saved[:, r] = gs
                if r > 0:
                    kernels._routing_backward_reduce_kernel[(B, splits)](
                        x, W_arg, grad_v, s_saved, Vprev_saved, gs_saved, partial, I, J, D, K, R, r, splits, i_per_split,
                        **blocks,
                    )
                    A_suffix = A_suffix + partial.sum(dim=1)
        # Phase 2: per input capsule, du (or du_hat) for every element and dW accumulated over the batch.
        k_chunks = -(-K // cfg.BLOCK_K) if has_w else 1
        chunks = batch_chunks(B, I, k_chunks, D * K, x.device) if has_w else 1
        b_per_chunk = -(-B // chunks)
        chunks = -(-B // b_per_chunk)
        dW_partial = torch.empty(chunks, *W.shape, device=x.device, dtype=acc) if has_w else x
        kernels._routing_backward_inputs_kernel[(I, k_chunks, chunks)](
            x, W_arg, Vprev_saved, gs_saved, dx, dW_partial, B, I, J, D, K, R, b_per_chunk,
            HAS_W=has_w, BLOCK_J=cfg.BLOCK_J, BLOCK_D=cfg.BLOCK_D, BLOCK_K=cfg.BLOCK_K, **cfg.compile_options(),
        )
        if has_w:
            dW.copy_(dW_partial.sum(dim=0) if chunks > 1 else dW_partial[0])
    return dx, dW


def _squash_backward(s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Row-wise gradient of squash at s (the same formula as the kernel's)."""
    eps = SQUASH_EPS
    x = (s * s).sum(-1, keepdim=True)
    sg = (s * g).sum(-1, keepdim=True)
    root = torch.sqrt(x + eps)
    f = x / ((1 + x) * root)
    df = ((x + eps) - 0.5 * x * (1 + x)) / ((1 + x) ** 2 * (x + eps) * root)
    return f * g + 2 * df * sg * s


# ---- custom ops ------------------------------------------------------------------------------


@torch.library.custom_op("capsrouting::capsule_routing_triton", mutates_args=())
def capsule_routing_op(u: torch.Tensor, W: torch.Tensor, num_iterations: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return routing_forward(u, W, num_iterations)


@torch.library.custom_op("capsrouting::capsule_routing_triton_backward", mutates_args=())
def capsule_routing_backward_op(
    grad_v: torch.Tensor, u: torch.Tensor, W: torch.Tensor, s_saved: torch.Tensor, Vprev_saved: torch.Tensor, num_iterations: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    return routing_backward(grad_v, u, W, s_saved, Vprev_saved, num_iterations)


@torch.library.custom_op("capsrouting::route_triton", mutates_args=())
def route_op(u_hat: torch.Tensor, num_iterations: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return routing_forward(u_hat, None, num_iterations)


@torch.library.custom_op("capsrouting::route_triton_backward", mutates_args=())
def route_backward_op(
    grad_v: torch.Tensor, u_hat: torch.Tensor, s_saved: torch.Tensor, Vprev_saved: torch.Tensor, num_iterations: int
) -> torch.Tensor:
    return routing_backward(grad_v, u_hat, None, s_saved, Vprev_saved, num_iterations)[0]


def _fake_forward(x, W, num_iterations):
    B, _, J, D, _ = _shape(x, W)
    acc = accumulation_dtype(x.dtype)
    saved = x.new_empty(B, num_iterations, J, D, dtype=acc)
    return x.new_empty(B, J, D), saved, torch.empty_like(saved)


@capsule_routing_op.register_fake
def _(u, W, num_iterations):
    check_capsule_routing_args(u, W, num_iterations)  # as the real op's callers are checked
    return _fake_forward(u, W, num_iterations)


@route_op.register_fake
def _(u_hat, num_iterations):
    check_route_args(u_hat, num_iterations)
    return _fake_forward(u_hat, None, num_iterations)

capsule_routing_backward_op.register_fake(lambda grad_v, u, W, s, V, n: (torch.empty_like(u), torch.empty_like(W)))
route_backward_op.register_fake(lambda grad_v, u_hat, s, V, n: torch.empty_like(u_hat))

register_routing_autograd(capsule_routing_op, capsule_routing_backward_op, has_weights=True)
register_routing_autograd(route_op, route_backward_op, has_weights=False)
register_backward_op_autograd(capsule_routing_backward_op, "capsrouting::capsule_routing_triton_backward")
register_backward_op_autograd(route_backward_op, "capsrouting::route_triton_backward")


# ---- backend entry points ----------------------------------------------------------------------


def capsule_routing(u: torch.Tensor, W: torch.Tensor, num_iterations: int) -> torch.Tensor:
    return capsule_routing_op(u.contiguous(), W.contiguous(), num_iterations)[0]


def route(u_hat: torch.Tensor, num_iterations: int) -> torch.Tensor:
    return route_op(u_hat.contiguous(), num_iterations)[0]


def _shape_reason(x: torch.Tensor, W: Optional[torch.Tensor]) -> Optional[str]:
    _, _, J, D, K = _shape(x, W)
    return size_limit_reason(J, D, K, x.element_size())


register(
    Backend(
        name="triton",
        description="fused Triton kernels: predictions and every routing iteration in one pass, exact backward",
        device_types=_device_types,
        probe=_probe,
        capsule_routing=capsule_routing,
        route=route,
        shape_reason=_shape_reason,
    )
)
