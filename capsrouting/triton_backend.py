"""Backend "triton": launchers for the fused kernels and their registration as custom ops.

The ops are ``torch.library.custom_op`` with ``register_fake`` and one
autograd registration (``_autograd.py``), so ``torch.compile(fullgraph=True)``
traces them without a graph break; with the Triton interpreter
(``TRITON_INTERPRET=1``) they also run on CPU tensors, which is how they are
tested without a GPU.
"""
import contextlib
import dataclasses
import math
import os
from typing import Optional, Tuple

import torch

from ._autograd import (FusedRouting, fake_forward, fake_option_grads, op_options, op_result,
                        register_backward_op_autograd)
from ._validation import check_capsule_routing_args, check_route_args, check_routing_options
from .backends import Backend, accumulation_dtype, register
from .reference import SQUASH_EPS, squash

# Largest sizes the kernels are compiled and tested for.
MAX_J, MAX_DOUT, MAX_DIN = 64, 32, 16
# Registers per thread that one (BLOCK_B, BLOCK_J, BLOCK_D) state tensor (V, s, g_s, ...) or the
# predictions tile of a batch-tile kernel may take. The forward holds three such tensors (V, s, the
# tile) besides its temporaries; phase 1 of the backward holds four (G, V(r-1), g_s(r), the tile)
# and spills at the forward's size (tests/triton_aot.py), so it gets half.
_FORWARD_STATE_REGISTERS = 16
_REDUCE_STATE_REGISTERS = 8
# Registers per thread for the W tile of the input-gradient kernel (its dW tile takes as many):
# the first where the rest of the program is small, the second where it is not: half inputs
# convert every element they load, and a padded J x Dout of _INPUTS_LARGE_JD or more takes registers of
# its own (each spills with the first, tests/triton_aot.py).
_INPUTS_TILE_REGISTERS, _INPUTS_TILE_REGISTERS_CROWDED = 32, 16
_INPUTS_LARGE_JD = 1024
# Smallest blocks: small capsule sizes are padded up so that few kernel variants exist
# (each is compiled and checked for spills ahead of time); padded lanes are masked.
_MIN_BLOCK_J, _MIN_BLOCK_D, _MIN_BLOCK_K = 16, 8, 4
_MAX_BLOCK_I = 16
_MIN_DOT = 16  # tl.dot's smallest M and K
# Batch elements per program of the forward and backward phase 1: each W tile loaded serves all.
_MAX_BLOCK_B = 16
# Batch chunks of the input-gradient kernel: each holds a partial dW, so keep them few.
_MAX_BATCH_CHUNKS = 8
# Warps per program. At 16 a thread may have only 128 registers: the forward at the paper's
# sizes then spills with Triton 3.6, and 16 batch elements at 8 warps spill with 3.9
# (tests/triton_aot.py), so every kernel stays at 8 warps or fewer for now.
_MIN_WARPS, _MAX_WARPS = 4, 8
# Programs wanted in flight per SM, so that one waiting on memory leaves others to run.
_PROGRAMS_PER_SM = 4
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


def _clamp(x: int, low: int, high: int) -> int:
    return max(low, min(high, x))


def _register_cap(num_warps: int) -> int:
    """Registers a thread may use so that one program of num_warps warps fits an SM's 64K."""
    return min(_MAX_REGISTERS, 65536 // (32 * num_warps))


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Compile-time block sizes for one problem shape (see the kernels' comment block)."""

    BLOCK_J: int
    BLOCK_D: int
    # Forward: a program owns BLOCK_B batch elements, BLOCK_I input capsules per predictions tile.
    BLOCK_B: int
    BLOCK_I: int
    num_warps: int
    DOT_K: int  # > 0: the forward's predictions by tl.dot, Din padded to DOT_K (half inputs); 0: FMAs
    # Backward phase 1: likewise, with half the forward's registers per state tensor (it holds more).
    REDUCE_BLOCK_B: int
    REDUCE_BLOCK_I: int
    reduce_num_warps: int
    # Backward phase 2: a program owns INPUTS_BLOCK_I input capsules and a chunk of BLOCK_K of Din.
    INPUTS_BLOCK_I: int
    BLOCK_K: int
    W_IN_REGISTERS: bool  # one chunk holds all of Din: predictions come from the W tile in registers
    inputs_num_warps: int

    def gpu_options(self, kernel: str = "forward") -> dict:
        """Compile options of one kernel, "forward", "reduce" or "inputs" (the same for its OPTIONS
        variant), for a GPU: its warps, its register cap, and multiply-adds fused
        as the tolerances were measured (stated, because Triton's default changes after 3.9)."""
        num_warps = {"forward": self.num_warps, "reduce": self.reduce_num_warps, "inputs": self.inputs_num_warps}[kernel]
        return dict(num_warps=num_warps, maxnreg=_register_cap(num_warps), enable_fp_fusion=True)

    def forward_tile(self, with_options: bool = False) -> Tuple[int, int]:
        """(BLOCK_B, DOT_K) of the forward, plain or with the routing options: the options variant of the
        largest batch tile takes half of it (at 16 elements the options spilled, tests/triton_aot.py),
        and then FMAs (tl.dot wants 16 rows)."""
        if with_options and self.BLOCK_B >= _MAX_BLOCK_B:
            return _MAX_BLOCK_B // 2, 0
        return self.BLOCK_B, self.DOT_K

    def compile_options(self, kernel: str = "forward") -> dict:
        """What a launch passes: gpu_options, or nothing under the interpreter (it takes none)."""
        return {} if _interpreting() else self.gpu_options(kernel)


def _batch_tiling(jd: int, registers: int) -> Tuple[int, int, int]:
    """(BLOCK_B, BLOCK_I, warps) so that each state tensor takes about ``registers`` per thread."""
    per_warp = 32 * registers
    block_b = _clamp(_MAX_WARPS * per_warp // jd, 1, _MAX_BLOCK_B)
    warps = _clamp(-(-block_b * jd // per_warp), _MIN_WARPS, _MAX_WARPS)
    block_i = _clamp(warps * per_warp // (block_b * jd), 1, _MAX_BLOCK_I)
    return block_b, block_i, warps


def launch_config(J: int, D: int, K: int, element_size: int = 4) -> LaunchConfig:
    """Block sizes for J output capsules of D dims fed by Din = K (K = 0: predictions given).

    Sized in registers per thread (a float64 element takes two): a state tensor of a batch tile
    takes about _FORWARD_STATE_REGISTERS (_REDUCE_STATE_REGISTERS in phase 1 of the backward), the
    W tile of phase 2 about _INPUTS_TILE_REGISTERS (or _CROWDED); the warps
    grow with the tile so that this holds, up to 8.
    """
    scale = max(1, element_size // 4)
    block_j = max(_MIN_BLOCK_J, _next_pow2(J))
    block_d = max(_MIN_BLOCK_D, _next_pow2(D))
    jd = block_j * block_d * scale  # registers of one element's J x D state, over all threads
    forward = _batch_tiling(jd, _FORWARD_STATE_REGISTERS)
    # tl.dot needs 16 rows and a K of 16; float32 stays on FMAs (IEEE float32, never TF32).
    dot_k = max(_MIN_DOT, _next_pow2(K)) if element_size == 2 and K and forward[0] >= _MIN_DOT else 0
    reduce = _batch_tiling(jd, _REDUCE_STATE_REGISTERS)
    crowded = element_size == 2 or block_j * block_d >= _INPUTS_LARGE_JD
    tile_registers = _INPUTS_TILE_REGISTERS_CROWDED if crowded else _INPUTS_TILE_REGISTERS
    tile_budget = 32 * tile_registers * _MAX_WARPS
    if K:
        block_k = max(_MIN_BLOCK_K, _next_pow2(K))
        if jd * block_k > tile_budget:  # W[i] does not fit: loop over chunks of Din
            block_k = max(1, tile_budget // jd)
        inputs_block_i = _clamp(tile_budget // (jd * block_k), 1, _MAX_BLOCK_I)
        tile = inputs_block_i * jd * block_k
        inputs_warps = _clamp(-(-tile // (32 * tile_registers)), _MIN_WARPS, _MAX_WARPS)
    else:  # route: the tile holds the given predictions and their gradient
        block_k = 1
        inputs_block_i = _clamp(_MIN_WARPS * 32 * _REDUCE_STATE_REGISTERS // jd, 1, _MAX_BLOCK_I)
        inputs_warps = _clamp(-(-inputs_block_i * jd // (32 * _REDUCE_STATE_REGISTERS)), _MIN_WARPS, _MAX_WARPS)
    return LaunchConfig(block_j, block_d, *forward, dot_k, *reduce, inputs_block_i, block_k, bool(K) and block_k >= K,
                        inputs_warps)


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
        return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """How one call is launched: its shape, block sizes, and how the work is split over programs."""

    B: int
    I: int
    J: int
    D: int
    K: int  # 0: predictions given (route)
    element_size: int
    cfg: LaunchConfig
    # Forward: grid (batch_tiles, splits).
    batch_tiles: int
    splits: int  # slices of the input capsules per batch tile; 1: one launch runs every iteration
    i_per_split: int
    # Backward phase 1: grid (reduce_tiles, reduce_splits), likewise.
    reduce_tiles: int
    reduce_splits: int
    reduce_i_per_split: int
    # Backward phase 2: grid (input_tiles, k_chunks, chunks).
    input_tiles: int
    k_chunks: int
    chunks: int  # batch chunks, each with its own partial dW
    b_per_chunk: int


def input_slices(I: int, splits: int) -> Tuple[int, int]:
    """(input capsules per slice, slices) for about ``splits`` slices of I, none of them empty."""
    i_per_split = -(-I // splits)
    return i_per_split, -(-I // i_per_split)


def launch_plan(B: int, I: int, J: int, D: int, K: int, element_size: int, programs: int,
                splits: Optional[int] = None) -> LaunchPlan:
    """The launches for a (B, I, J, D, K) problem on a device that wants ``programs`` in flight.

    A batch too small to give that many batch tiles has its input capsules split across programs
    (at least four tiles per slice); phase 2 splits the batch into chunks when its input tiles
    alone are too few, at most _MAX_BATCH_CHUNKS and with all partial dW together below B*I*J
    elements. ``splits`` forces the slices (tests).
    """
    cfg = launch_config(J, D, K, element_size)

    def tiles_and_slices(block_b: int, block_i: int) -> Tuple[int, int, int]:
        tiles, slices = -(-B // block_b), splits
        if slices is None:
            slices = 1
            if 0 < tiles < programs:
                slices = min(-(-programs // tiles), -(-I // (4 * block_i)))
        i_per_slice, slices = input_slices(I, slices) if slices > 1 else (I, 1)
        return tiles, slices, i_per_slice

    forward = tiles_and_slices(cfg.BLOCK_B, cfg.BLOCK_I)
    reduce = tiles_and_slices(cfg.REDUCE_BLOCK_B, cfg.REDUCE_BLOCK_I)
    input_tiles = -(-I // cfg.INPUTS_BLOCK_I)
    k_chunks = -(-K // cfg.BLOCK_K) if K else 1
    chunks = 1
    if K and B and input_tiles * k_chunks < programs:
        memory_cap = (B - 1) // (D * K)
        chunks = _clamp(-(-programs // (input_tiles * k_chunks)), 1, min(memory_cap, _MAX_BATCH_CHUNKS))
    b_per_chunk = max(1, -(-B // chunks))
    chunks = max(1, -(-B // b_per_chunk))
    return LaunchPlan(B, I, J, D, K, element_size, cfg, *forward, *reduce, input_tiles, k_chunks, chunks, b_per_chunk)


def plan_for(x: torch.Tensor, W: Optional[torch.Tensor], splits: Optional[int] = None) -> LaunchPlan:
    """The launch plan of a call with these inputs on their device."""
    return launch_plan(*_shape(x, W), x.element_size(), _program_target(x.device), splits)


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Global-memory bytes the kernels of one call load and store (masked-off lanes move nothing)."""

    loaded: int
    stored: int

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.loaded + other.loaded, self.stored + other.stored)


def _predictions_traffic(p: LaunchPlan, tiles: int) -> int:
    """Elements one pass over every (b, i) loads to build predictions, for ``tiles`` batch tiles.

    With W, each tile reads u once per k and W once for all its batch elements; without, u_hat once.
    """
    return p.B * p.I * p.K + p.I * p.J * p.D * p.K * tiles if p.K else p.B * p.I * p.J * p.D


def _accumulator_size(element_size: int) -> int:
    """Bytes of an element of the compute dtype for inputs of ``element_size`` bytes."""
    return accumulation_dtype({2: torch.float16, 4: torch.float32, 8: torch.float64}[element_size]).itemsize


def forward_traffic(p: LaunchPlan, R: int) -> Traffic:
    """What ``routing_forward`` moves through its Triton launches (not the torch ops between them),
    without routing options (a bias adds J x D loads per program).

    W costs ceil(B / BLOCK_B) reads per iteration, u and u_hat one each. Stored: s(r), V(r-1) and v.
    Counted exactly against the interpreter in tests/test_triton_traffic.py.
    """
    acc = _accumulator_size(p.element_size)
    state = p.B * p.J * p.D
    loaded = R * _predictions_traffic(p, p.batch_tiles) * p.element_size
    if p.splits == 1:  # one launch: s(r), V(r-1) and v (the last one stays) stored per iteration
        return Traffic(loaded, R * state * (2 * acc + p.element_size))
    # A launch per iteration: each slice loads its tile's V and stores a partial s.
    return Traffic(loaded + R * p.splits * state * acc, R * p.splits * state * acc)


def backward_traffic(p: LaunchPlan, R: int, grad_element_size: Optional[int] = None) -> Traffic:
    """What ``routing_backward`` moves through its Triton launches (not the torch ops between them).

    Phase 1 rebuilds the predictions in R - 1 iterations, W read once per its batch tile; phase 2 reads
    each W tile once per batch chunk (again per element where Din is chunked), and V(r-1), g_s(r)
    once per (batch element, input tile, Din chunk).
    """
    acc = _accumulator_size(p.element_size)
    size = p.element_size
    state = p.B * p.J * p.D
    passes = (R - 1) * _predictions_traffic(p, p.reduce_tiles) * size
    if p.reduce_splits == 1:  # one launch: dL/dv, s(r) for every r and V(r-1) for r >= 2 in; g_s(r) out
        phase1 = Traffic(state * (grad_element_size or size) + (2 * R - 1) * state * acc + passes, R * state * acc)
    else:  # a launch per iteration r >= 2: each slice loads V(r-1) and g_s(r), stores a partial A
        phase1 = Traffic(2 * (R - 1) * p.reduce_splits * state * acc + passes, (R - 1) * p.reduce_splits * state * acc)
    saved_reads = p.B * p.input_tiles * p.k_chunks * 2 * R * p.J * p.D * acc
    if not p.K:
        phase2 = Traffic(p.B * p.I * p.J * p.D * size + saved_reads, p.B * p.I * p.J * p.D * size)
        return phase1 + phase2
    weights = p.I * p.J * p.D * p.K
    loaded = p.chunks * weights * size + p.B * p.I * p.K * size + saved_reads
    if not p.cfg.W_IN_REGISTERS:  # predictions rebuilt from u and W for every element and Din chunk
        loaded += p.k_chunks * p.B * (p.I * p.K + weights) * size
    return phase1 + Traffic(loaded, p.B * p.I * p.K * size + p.chunks * weights * acc)


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


def _option_args(x: torch.Tensor, J: int, logit_prior: Optional[torch.Tensor], leaky: bool):
    """(prior pointer, prior_cols, leak) as the kernels take them (DESIGN.md §6)."""
    prior_arg = logit_prior.contiguous() if logit_prior is not None else x
    return prior_arg, J if logit_prior is not None else 0, 0.0 if leaky else float("-inf")


def routing_forward(x: torch.Tensor, W: Optional[torch.Tensor], num_iterations: int, splits: Optional[int] = None,
                    bias: Optional[torch.Tensor] = None, logit_prior: Optional[torch.Tensor] = None,
                    leaky: bool = False, return_couplings: bool = False):
    """Fused forward. x is u (B, I, K) with W, or u_hat (B, I, J, D) without; the options of
    DESIGN.md §6: ``bias`` (J, D) or None, ``logit_prior`` (I, J) or None, ``leaky``.

    Returns v (B, J, D) in x's dtype; the last iteration's couplings (B, I, J) in x's dtype if
    ``return_couplings``, else an empty tensor; and s(r) (bias included), V(r-1) as (R, B, J, D)
    in the compute dtype.
    """
    p = plan_for(x, W, splits)
    B, I, J, D, R = p.B, p.I, p.J, p.D, num_iterations
    acc = accumulation_dtype(x.dtype)
    v = torch.empty(B, J, D, device=x.device, dtype=x.dtype)
    c = x.new_empty((B, I, J) if return_couplings else (0,))
    s_saved = torch.empty(R, B, J, D, device=x.device, dtype=acc)
    Vprev_saved = torch.empty(R, B, J, D, device=x.device, dtype=acc)
    if B == 0:
        return v, c, s_saved, Vprev_saved
    cfg = p.cfg
    W_arg = W if W is not None else x
    kernel = _kernels()._routing_forward_kernel
    prior_arg, prior_cols, leak = _option_args(x, J, logit_prior, leaky)
    bias_arg = bias.contiguous() if bias is not None else x
    c_arg = c if return_couplings else x
    # The couplings are stored by per-iteration launches (one split: the whole of I), see the kernel.
    one_launch = p.splits == 1 and not return_couplings
    args = (B, I, J, D, p.K, R, int(one_launch), p.i_per_split, J if bias is not None else 0, prior_cols, leak)
    options = bias is not None or logit_prior is not None or leaky or return_couplings
    block_b, dot_k = cfg.forward_tile(options)
    blocks = dict(HAS_W=W is not None, OPTIONS=options, BLOCK_B=block_b, BLOCK_I=cfg.BLOCK_I,
                  BLOCK_J=cfg.BLOCK_J, BLOCK_D=cfg.BLOCK_D, DOT_K=dot_k, **cfg.compile_options("forward"))
    grid = (-(-B // block_b), p.splits)
    with _device_guard(x):
        if one_launch:
            kernel[grid](x, W_arg, v, s_saved, Vprev_saved, bias_arg, prior_arg, c_arg, *args, 0, **blocks)
            return v, c, s_saved, Vprev_saved
        # Small batch (or the couplings): one launch per iteration, the slices' partial sums combined in a
        # fixed order.
        partial = torch.empty(p.splits, B, J, D, device=x.device, dtype=acc)
        V = torch.zeros(B, J, D, device=x.device, dtype=acc)
        for r in range(R):
            c_cols = J if return_couplings and r == R - 1 else 0
            kernel[grid](x, W_arg, v, partial, V, bias_arg, prior_arg, c_arg, *args, c_cols, **blocks)
            s = partial.sum(dim=0) if bias is None else partial.sum(dim=0) + bias.to(acc)
            s_saved[r] = s
            Vprev_saved[r] = V
            out = squash(s)
            V = V + out
        v.copy_(out)
    return v, c, s_saved, Vprev_saved


def routing_backward(grad_v, x, W, s_saved, Vprev_saved, num_iterations: int, splits: Optional[int] = None,
                     bias: Optional[torch.Tensor] = None, logit_prior: Optional[torch.Tensor] = None,
                     leaky: bool = False, detach_inner: bool = False, option_grads: bool = True):
    """Exact backward (DESIGN.md §3, §6). Returns (dx, dW, dbias, dprior): dW is None without W;
    dbias (the sum of g_s(r) over the batch and the iterations) and dprior (that of g_b(r)) are None
    without their option or when ``option_grads`` is false. With ``detach_inner`` and no option
    gradient, only g_s(R) is needed: phase 1 is skipped and phase 2 visits the last iteration only."""
    p = plan_for(x, W, splits)
    B, I, J, D, K, R = p.B, p.I, p.J, p.D, p.K, num_iterations
    acc = s_saved.dtype
    cfg = p.cfg
    dx = torch.empty_like(x)
    dW = torch.zeros_like(W) if W is not None else None
    want_dbias = bias is not None and option_grads
    want_dprior = logit_prior is not None and option_grads
    if B == 0:
        dx.zero_()
        return (dx, dW, torch.zeros_like(bias) if want_dbias else None,
                torch.zeros_like(logit_prior) if want_dprior else None)
    has_w = W is not None
    W_arg = W if has_w else x
    kernels = _kernels()
    prior_arg, prior_cols, leak = _option_args(x, J, logit_prior, leaky)
    one_pass = detach_inner and not option_grads
    gs_saved = torch.empty_like(s_saved)
    # The plain kernels unless an option changes the backward (the bias does not: it is in s(r)).
    options = logit_prior is not None or leaky or detach_inner
    blocks = dict(HAS_W=has_w, OPTIONS=options, BLOCK_B=cfg.REDUCE_BLOCK_B, BLOCK_I=cfg.REDUCE_BLOCK_I,
                  BLOCK_J=cfg.BLOCK_J, BLOCK_D=cfg.BLOCK_D, **cfg.compile_options("reduce"))
    reduce_grid = (p.reduce_tiles, p.reduce_splits)
    with _device_guard(x):
        # Phase 1: g_s(r) for every r, reducing A(r) over the input capsules.
        if one_pass:  # only g_s(R), from dL/dv alone
            gs_saved[R - 1] = _squash_backward(s_saved[R - 1], grad_v.to(acc))
        elif p.reduce_splits == 1:
            kernels._routing_backward_reduce_kernel[reduce_grid](
                x, W_arg, grad_v, s_saved, Vprev_saved, gs_saved, gs_saved, prior_arg, B, I, J, D, K, R, 0, 1, I,
                prior_cols, leak, **blocks)
        else:
            partial = torch.empty(p.reduce_splits, B, J, D, device=x.device, dtype=acc)
            g_v = grad_v.to(acc)
            A_suffix = torch.zeros_like(g_v)
            for r in reversed(range(R)):
                gs = _squash_backward(s_saved[r], A_suffix + (g_v if r == R - 1 else 0))
                gs_saved[r] = gs
                if r > 0:
                    kernels._routing_backward_reduce_kernel[reduce_grid](
                        x, W_arg, grad_v, s_saved, Vprev_saved, gs_saved, partial, prior_arg, B, I, J, D, K, R, r,
                        p.reduce_splits, p.reduce_i_per_split, prior_cols, leak, **blocks)
                    A_suffix = A_suffix + partial.sum(dim=0)
        # Phase 2: per tile of input capsules, du (or du_hat) for every element and dW summed over the batch.
        dW_partial = torch.empty(p.chunks, *W.shape, device=x.device, dtype=acc) if has_w else x
        dprior_partial = torch.empty(p.chunks, I, J, device=x.device, dtype=acc) if want_dprior else x
        kernels._routing_backward_inputs_kernel[(p.input_tiles, p.k_chunks, p.chunks)](
            x, W_arg, Vprev_saved, gs_saved, dx, dW_partial, prior_arg, dprior_partial, B, I, J, D, K, R, p.b_per_chunk,
            prior_cols, leak, J if want_dprior else 0, int(detach_inner), R - 1 if one_pass else 0,
            HAS_W=has_w, OPTIONS=options, BLOCK_I=cfg.INPUTS_BLOCK_I, BLOCK_J=cfg.BLOCK_J, BLOCK_D=cfg.BLOCK_D,
            BLOCK_K=cfg.BLOCK_K, W_IN_REGISTERS=cfg.W_IN_REGISTERS, **cfg.compile_options("inputs"),
        )
        if has_w:
            dW.copy_(dW_partial.sum(dim=0) if p.chunks > 1 else dW_partial[0])
    dbias = gs_saved.sum(dim=(0, 1)).to(bias.dtype) if want_dbias else None
    dprior = dprior_partial.sum(dim=0).to(logit_prior.dtype) if want_dprior else None
    return dx, dW, dbias, dprior


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
# The forms of _autograd.py with options: the forward takes every option of DESIGN.md §6 (detach_inner
# only for the autograd's sake: it changes the backward alone), the backward returns dbias and dprior.


def _check_options(x: torch.Tensor, W: Optional[torch.Tensor], bias, logit_prior, leaky, detach_inner,
                   return_couplings) -> None:
    _, I, J, D, _ = _shape(x, W)
    check_routing_options(x, I, J, D, bias, logit_prior, leaky, detach_inner, return_couplings)


def _empty(x: torch.Tensor) -> torch.Tensor:
    """What an op returns for an absent result (an op cannot return None)."""
    return x.new_empty(0)


def _option_grads_or_empty(x, dbias, dprior):
    return dbias if dbias is not None else _empty(x), dprior if dprior is not None else _empty(x)


@torch.library.custom_op("capsrouting::capsule_routing_triton", mutates_args=())
def capsule_routing_op(
    u: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor], logit_prior: Optional[torch.Tensor], leaky: bool,
    detach_inner: bool, return_couplings: bool, num_iterations: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_capsule_routing_args(u, W, num_iterations, leading_dims=False)  # the op may be called directly
    _check_options(u, W, bias, logit_prior, leaky, detach_inner, return_couplings)
    return routing_forward(u, W, num_iterations, bias=bias, logit_prior=logit_prior, leaky=leaky,
                           return_couplings=return_couplings)


@torch.library.custom_op("capsrouting::capsule_routing_triton_backward", mutates_args=())
def capsule_routing_backward_op(
    grad_v: torch.Tensor, u: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor],
    logit_prior: Optional[torch.Tensor], leaky: bool, detach_inner: bool, option_grads: bool, s_saved: torch.Tensor,
    Vprev_saved: torch.Tensor, num_iterations: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    du, dW, dbias, dprior = routing_backward(grad_v, u, W, s_saved, Vprev_saved, num_iterations, bias=bias,
                                             logit_prior=logit_prior, leaky=leaky, detach_inner=detach_inner,
                                             option_grads=option_grads)
    return du, dW, *_option_grads_or_empty(u, dbias, dprior)


@torch.library.custom_op("capsrouting::route_triton", mutates_args=())
def route_op(
    u_hat: torch.Tensor, bias: Optional[torch.Tensor], logit_prior: Optional[torch.Tensor], leaky: bool,
    detach_inner: bool, return_couplings: bool, num_iterations: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_route_args(u_hat, num_iterations, leading_dims=False)
    _check_options(u_hat, None, bias, logit_prior, leaky, detach_inner, return_couplings)
    return routing_forward(u_hat, None, num_iterations, bias=bias, logit_prior=logit_prior, leaky=leaky,
                           return_couplings=return_couplings)


@torch.library.custom_op("capsrouting::route_triton_backward", mutates_args=())
def route_backward_op(
    grad_v: torch.Tensor, u_hat: torch.Tensor, bias: Optional[torch.Tensor], logit_prior: Optional[torch.Tensor],
    leaky: bool, detach_inner: bool, option_grads: bool, s_saved: torch.Tensor, Vprev_saved: torch.Tensor,
    num_iterations: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    du_hat, _, dbias, dprior = routing_backward(grad_v, u_hat, None, s_saved, Vprev_saved, num_iterations, bias=bias,
                                                logit_prior=logit_prior, leaky=leaky, detach_inner=detach_inner,
                                                option_grads=option_grads)
    return du_hat, *_option_grads_or_empty(u_hat, dbias, dprior)


def _fake_forward(x, W, num_iterations, return_couplings):
    B, I, J, D, _ = _shape(x, W)
    return fake_forward(x, (num_iterations, B, J, D), I, J, D, return_couplings)


@capsule_routing_op.register_fake
def _(u, W, bias, logit_prior, leaky, detach_inner, return_couplings, num_iterations):
    check_capsule_routing_args(u, W, num_iterations, leading_dims=False)  # as the real op checks
    _check_options(u, W, bias, logit_prior, leaky, detach_inner, return_couplings)
    return _fake_forward(u, W, num_iterations, return_couplings)


@route_op.register_fake
def _(u_hat, bias, logit_prior, leaky, detach_inner, return_couplings, num_iterations):
    check_route_args(u_hat, num_iterations, leading_dims=False)
    _check_options(u_hat, None, bias, logit_prior, leaky, detach_inner, return_couplings)
    return _fake_forward(u_hat, None, num_iterations, return_couplings)


capsule_routing_backward_op.register_fake(
    lambda grad_v, u, W, bias, prior, leaky, detach, option_grads, s, V, n: (
        torch.empty_like(u), torch.empty_like(W), *fake_option_grads(u, bias, prior, option_grads))
)
route_backward_op.register_fake(
    lambda grad_v, u_hat, bias, prior, leaky, detach, option_grads, s, V, n: (
        torch.empty_like(u_hat), *fake_option_grads(u_hat, bias, prior, option_grads))
)

fused_capsule_routing = FusedRouting(capsule_routing_op, capsule_routing_backward_op, has_weights=True)
fused_route = FusedRouting(route_op, route_backward_op, has_weights=False)
register_backward_op_autograd(capsule_routing_backward_op, "capsrouting::capsule_routing_triton_backward")
register_backward_op_autograd(route_backward_op, "capsrouting::route_triton_backward")


# ---- backend entry points ----------------------------------------------------------------------

def capsule_routing(u: torch.Tensor, W: torch.Tensor, num_iterations: int, options=None):
    out = fused_capsule_routing(u.contiguous(), W.contiguous(), *op_options(options), num_iterations)
    return op_result(out, options)


def route(u_hat: torch.Tensor, num_iterations: int, options=None):
    return op_result(fused_route(u_hat.contiguous(), *op_options(options), num_iterations), options)


def _shape_reason(x: torch.Tensor, W: Optional[torch.Tensor]) -> Optional[str]:
    _, _, J, D, K = _shape(x, W)
    # The kernels address W, and a batch tile's samples from the tile's first, with 32-bit offsets.
    if W is not None and W.numel() >= 2**31:
        return f"the triton backend supports W with fewer than 2**31 elements; got {W.numel()}"
    # The couplings (return_couplings) are addressed likewise: I x J per sample.
    per_sample = max(math.prod(x.shape[1:]), x.shape[1] * J)
    if per_sample * _MAX_BLOCK_B >= 2**31:
        return (f"the triton backend supports inputs with fewer than {2**31 // _MAX_BLOCK_B} elements per sample; "
                f"got {per_sample}")
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
        options=frozenset({"bias", "logit_prior", "leaky", "detach_inner", "return_couplings"}),
    )
)
