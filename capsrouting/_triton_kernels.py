"""Triton kernels for fused dynamic routing (DESIGN.md §2-§3).

Every kernel rebuilds the predictions u_hat[b, i, j, :] = W[i, j] @ u[b, i] in
registers, tile by tile, instead of reading them from memory (or reads a given
u_hat when ``HAS_W`` is false, for ``route``). The routing state carried
between iterations is V(r) = v(1) + ... + v(r), J x D numbers per batch
element; the logits of iteration r are dot(u_hat[i, j], V(r-1)[j]).

Notation in pointers: B batch, I input capsules, J output capsules, D = Dout,
K = Din, R routing iterations. Arithmetic runs in the dtype of the saved-state
buffers (``s_ptr``): float64 for float64 input, float32 otherwise; loads are
cast to it and stores cast back once.

Kernels
-------
_routing_forward_kernel
    grid (ceil(B / BLOCK_B), splits). A program owns a tile of BLOCK_B batch
    elements, so every W tile it loads serves all of them: W is read
    ceil(B / BLOCK_B) times per iteration instead of B times.
    one_launch: the program runs all R iterations with V in registers; one
    launch does the whole forward. Else (few batch tiles, which would leave
    most of a GPU idle, or the couplings asked for) each program sums its
    slice of the input capsules (all of them with one split) for ONE
    iteration into a partial s, and the launcher combines the slices (fixed
    order, so deterministic) between iterations. Only these launches store
    the couplings: in the one-launch loop their addresses would not fit the
    registers of the largest tiles.
    Tiling: BLOCK_I input capsules at a time; the predictions tile is
    (BLOCK_B, BLOCK_I, BLOCK_J, BLOCK_D) in registers, built by a loop over K
    from a (BLOCK_B, BLOCK_I) column of u and a (BLOCK_I, BLOCK_J, BLOCK_D)
    slice of W per k (plain FMAs: float32 stays IEEE float32), or for half
    inputs (DOT_K > 0, BLOCK_I = 1, BLOCK_B = 16) by one tl.dot on tensor
    cores, (BLOCK_B x DOT_K) @ (DOT_K x BLOCK_J * BLOCK_D) with Din padded to
    DOT_K = 16 and float32 accumulation (operands staged in shared memory, the
    result moved into the tile's layout through it).
    Registers: the predictions tile, V and s (BLOCK_B x BLOCK_J x BLOCK_D each);
    v is stored every iteration (the last stays) rather than carried.
    The routing bias (OPTIONS, DESIGN.md §6): a (J, D) bias, loaded once per
    program and iteration (from cache), is added to s(r) before the squash and
    saved with it, so the backward kernels need not know of it.
    Saved for backward: s(r) and V(r-1) for every r, (R, B, J, D) each, so
    that a tile's block of row r is contiguous and addressed from one scalar base.
_routing_backward_reduce_kernel
    grid (ceil(B / BLOCK_B), num_splits), phase 1 of §3, tiled like the
    forward but with half its batch tile (8 at the paper's sizes): it holds
    one more state per element. For r = R..1 it turns the gradient G reaching v(r) into g_s(r)
    (squash backward, stored for phase 2) and, for r >= 2, adds
    A(r) = sum_i g_b(r)[i, j] u_hat[i, j], the gradient that flows into
    V(r-1), to G. Registers: the predictions tile, G, V(r-1), g_s(r).
    Split like the forward for small batches (then one launch per iteration
    and the launcher combines partial A).
_routing_backward_inputs_kernel
    grid (ceil(I / BLOCK_I), K chunks, batch chunks), phase 2 of §3. A program
    owns BLOCK_I input capsules (and a chunk of BLOCK_K of Din) and loops over
    its batch chunk: per element it loads V(r-1) and g_s(r) once for the
    whole capsule tile, rebuilds u_hat[b, tile] (from the W tile it holds in
    registers when one chunk covers Din, W_IN_REGISTERS; else from memory),
    sums the R terms of du_hat, and writes du[b, tile] (du_hat for ``route``).
    The dW tile (BLOCK_I x BLOCK_J x BLOCK_D x BLOCK_K) is accumulated in
    registers across the batch and stored once: no atomics, the same bits
    every run. With several batch chunks each writes its own partial dW,
    summed in a fixed order. Registers: the W and dW tiles, u_hat and du_hat.

Routing options (DESIGN.md §6). Every kernel has two variants: OPTIONS = False, the plain op,
compiled without a trace of them (so the default path is what it was before they existed), and
OPTIONS = True, where they are runtime scalars (no variant per option): ``bias`` is added to s(r)
(``bias_cols`` = J, else 0: a mask bound, so nothing is loaded without it), ``logit_prior`` adds
an (I, J) tile of prior logits to every coupling (``prior_cols``), ``leaky`` is ``leak`` = 0.0
(else -inf, which changes nothing) in the softmax, ``return_couplings`` stores c of the last
iteration (``c_cols``); phase 2 sums g_b into d logit_prior (``dprior_cols``, one partial per batch
chunk, the first Din chunk stores it) and with ``detach_inner`` weighs the terms of du_hat (only
c(R) g_s(R) stays). With ``detach_inner`` and no bias or prior gradient wanted, phase 1 does not
run and phase 2 visits only r = R (``r_begin``): the backward is one pass. The options variant of
a 16-element forward tile takes 8 elements, with FMAs (``LaunchConfig.forward_tile``): at 16 it
spilled.

Memory traffic per launch (bytes loaded and stored, from the shapes and these
tilings) is modelled by ``triton_backend.forward_traffic`` and
``backward_traffic``; tests/test_triton_traffic.py checks the model against
every load and store counted under the interpreter. At the paper's layer and
B = 128 on a 132-SM GPU the forward loads 0.23 x B|W| bytes and forward +
backward 0.71 x B|W| (``python -m bench.traffic``).

Addresses: every tile is a scalar base pointer (64-bit arithmetic) plus 32-bit
lane offsets from it (W has fewer than 2**31 elements, a sample of x fewer than
2**27, ``triton_backend._shape_reason``). Tensors of 64-bit pointers held across
the loops took two registers a lane and made 16-element batch tiles spill.

Block sizes and warps come from ``triton_backend.launch_config``: J and D are
padded to powers of two (at least 16 and 8, so few variants exist); each
(BLOCK_B, BLOCK_J, BLOCK_D) state takes about 16 registers per thread in the
forward and 8 in phase 1 (which holds one more), the W tile of phase 2 about
32 (16 for half inputs and large J x D), the warps (4 to 8) growing with the
tile; ptxas may use every register a program can have. ``tests/triton_aot.py`` compiles
every variant for sm_80 and sm_90 and checks that none spills (in CI with the
current Triton, and for sm_90 with Triton 3.6, the oldest supported).
"""
import triton
import triton.language as tl

SQUASH_EPS = tl.constexpr(1e-8)  # as in reference.squash
# Under TRITON_INTERPRET=1 Triton runs these functions as Python, on CPU tensors.
_INTERPRETING = tl.constexpr(triton.knobs.runtime.interpret)


@triton.jit
def _loop_bound(n):
    """n as a bound of range(): n itself when compiled, a Python int when interpreted.

    Triton 3.6's interpreter holds scalars as 1-element arrays and hands them to range()
    through int(), which NumPy >= 2.4 refuses; the branch below is never compiled.
    """
    if _INTERPRETING:
        return n.handle.data.item() if isinstance(n, tl.tensor) else n
    return n


@triton.jit
def _jd_block(J, D, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets and mask of a (BLOCK_J, BLOCK_D) block over a contiguous J x D state."""
    j_offs = tl.arange(0, BLOCK_J)
    d_offs = tl.arange(0, BLOCK_D)
    jd_offs = j_offs[:, None] * D + d_offs[None, :]
    jd_mask = (j_offs[:, None] < J) & (d_offs[None, :] < D)
    return j_offs, d_offs, jd_offs, jd_mask


@triton.jit
def _split_range(split, i_per_split, I):
    """The input capsules [i_begin, i_end) of program `split` along grid axis 1."""
    i_begin = split * i_per_split
    return i_begin, tl.minimum(i_begin + i_per_split, I)


@triton.jit
def _batch_predictions_tile(
    x_ptr, W_ptr, b0, b_local, b_valid, i0, i_end, j_offs, d_offs, I, J, D, K,
    HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK_I: tl.constexpr, DOT_K: tl.constexpr,
):
    """u_hat[b0 + b_local, i0:i0+BLOCK_I, j_offs, d_offs] as a (BLOCK_B, BLOCK_I, BLOCK_J, BLOCK_D) tile.

    DOT_K > 0 (half inputs, BLOCK_I == 1, BLOCK_B >= 16): one tl.dot, (BLOCK_B x DOT_K) @
    (DOT_K x BLOCK_J * BLOCK_D), Din padded with zeros to DOT_K, on tensor cores with float32
    accumulation (a product of two half numbers is exact in float32). Else plain FMAs, one k at
    a time.

    Each W element is loaded once for the whole batch tile. Rows of padded or
    out-of-range b, of i at or past i_end, and padded j, d are zero.
    Addresses are a scalar base plus 32-bit lane offsets (one sample of x has
    fewer than 2**27 elements and W fewer than 2**31, _shape_reason): a tensor
    of 64-bit pointers held across the loops takes twice the registers.
    """
    i_local = tl.arange(0, BLOCK_I)
    i_valid = i0 + i_local < i_end
    i3 = i_local[:, None, None]
    j3 = j_offs[None, :, None]
    d3 = d_offs[None, None, :]
    ijd_mask = i_valid[:, None, None] & (j3 < J) & (d3 < D)
    if HAS_W and DOT_K > 0:
        tl.static_assert(BLOCK_I == 1)
        BLOCK_J: tl.constexpr = j_offs.shape[0]
        BLOCK_D: tl.constexpr = d_offs.shape[0]
        k_offs = tl.arange(0, DOT_K)
        k_valid = k_offs < K
        u_rows = (x_ptr + (b0 * I + i0) * K) + b_local[:, None] * (I * K) + k_offs[None, :]
        u_tile = tl.load(u_rows, mask=(b_valid[:, None] & i_valid[None, :]) & k_valid[None, :], other=0.0)
        n = tl.arange(0, BLOCK_J * BLOCK_D)  # the output columns: (j, d) of W[i0]
        n_j = n // BLOCK_D
        n_d = n % BLOCK_D
        n_valid = (n_j < J) & (n_d < D) & i_valid
        w_cols = (W_ptr + i0 * J * D * K) + ((n_j * D + n_d) * K)[None, :] + k_offs[:, None]
        w_tile = tl.load(w_cols, mask=k_valid[:, None] & n_valid[None, :], other=0.0)
        if _INTERPRETING:  # the interpreter's dot reads bfloat16 as raw bits; float32 gives the same products
            u_tile = u_tile.to(tl.float32)
            w_tile = w_tile.to(tl.float32)
        acc = tl.dot(u_tile, w_tile, out_dtype=tl.float32)
        return tl.reshape(acc, (b_local.shape[0], 1, BLOCK_J, BLOCK_D)).to(ACC)
    elif HAS_W:
        acc = tl.zeros((b_local.shape[0], BLOCK_I, j_offs.shape[0], d_offs.shape[0]), dtype=ACC)
        u_base = x_ptr + (b0 * I + i0) * K
        u_offs = (b_local[:, None] * I + i_local[None, :]) * K
        bi_mask = b_valid[:, None] & i_valid[None, :]
        w_base = W_ptr + i0 * J * D * K
        w_offs = ((i3 * J + j3) * D + d3) * K
        for k in range(_loop_bound(K)):
            u_k = tl.load((u_base + k) + u_offs, mask=bi_mask, other=0.0).to(ACC)
            w_k = tl.load((w_base + k) + w_offs, mask=ijd_mask, other=0.0).to(ACC)
            acc += w_k[None, :, :, :] * u_k[:, :, None, None]
        return acc
    else:
        b4 = b_local[:, None, None, None]
        offs = ((b4 * I + i3[None, :, :, :]) * J + j3[None, :, :, :]) * D + d3[None, :, :, :]
        mask = b_valid[:, None, None, None] & ijd_mask[None, :, :, :]
        return tl.load((x_ptr + (b0 * I + i0) * J * D) + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _prior_tile(prior_ptr, i0, i_end, j_offs, J, prior_cols, BLOCK_I: tl.constexpr):
    """logit_prior[i0:i0+BLOCK_I, j_offs] as a (BLOCK_I, BLOCK_J) tile, zero where absent (prior_cols == 0:
    nothing is loaded, the pointer is not read)."""
    i_local = tl.arange(0, BLOCK_I)
    mask = (i0 + i_local < i_end)[:, None] & (j_offs < prior_cols)[None, :]
    return tl.load((prior_ptr + i0 * J) + (i_local[:, None] * J + j_offs[None, :]), mask=mask, other=0.0)


@triton.jit
def _batch_coupling(u_hat, V, j_valid, prior, leak, OPTIONS: tl.constexpr):
    """c[b, i, :] = softmax over j of u_hat[b, i, j] . V[b, j] for a (BLOCK_B, BLOCK_I, BLOCK_J,
    BLOCK_D) tile (DESIGN.md §2). Padded j get zero.

    OPTIONS (DESIGN.md §6): the logits start from prior (BLOCK_I, BLOCK_J), and ``leak`` is 0.0 for
    leaky routing (an extra zero logit, dropped from the result) or -inf for the plain softmax, where
    it changes nothing: with m = max(leak, max_j logits), c = exp(b - m) / (exp(leak - m) + sum_k exp(b_k - m)).
    """
    dots = tl.sum(u_hat * V[:, None, :, :], axis=3)
    if OPTIONS:
        logits = tl.where(j_valid, dots + prior[None, :, :], float("-inf"))
        m = tl.maximum(tl.max(logits, axis=2), leak)[:, :, None]
        e = tl.exp(logits - m)
        return e / (tl.sum(e, axis=2)[:, :, None] + tl.exp(leak - m))
    logits = tl.where(j_valid, dots, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=2)[:, :, None])
    return e / tl.sum(e, axis=2)[:, :, None]


@triton.jit
def _batch_logit_grad(u_hat, c, gs):
    """g_b = c (g_c - sum_j c g_c) with g_c[b, i, j] = u_hat[b, i, j] . g_s[b, j] (DESIGN.md §3)."""
    g_c = tl.sum(u_hat * gs[:, None, :, :], axis=3)
    return c * (g_c - tl.sum(c * g_c, axis=2)[:, :, None])


@triton.jit
def _batch_accumulate_s(
    x_ptr, W_ptr, prior_ptr, c_ptr, b0, b_local, b_valid, V, s, i_begin, i_end, j_offs, d_offs, I, J, D, K,
    prior_cols, leak, c_cols,
    HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK_I: tl.constexpr, DOT_K: tl.constexpr, OPTIONS: tl.constexpr,
    STORE_C: tl.constexpr,
):
    """s plus, per batch element of the tile, the sum over i in [i_begin, i_end) of c[i, j] u_hat[i, j].

    OPTIONS: the couplings take the prior and the leak. STORE_C: with c_cols == J they are also stored
    to c_ptr (B, I, J) (return_couplings; 0: not).
    """
    j_valid = (j_offs < J)[None, None, :]
    for i0 in range(_loop_bound(i_begin), _loop_bound(i_end), BLOCK_I):
        u_hat = _batch_predictions_tile(x_ptr, W_ptr, b0, b_local, b_valid, i0, i_end, j_offs, d_offs, I, J, D, K,
                                        HAS_W, ACC, BLOCK_I, DOT_K)
        if OPTIONS:
            prior = _prior_tile(prior_ptr, i0, i_end, j_offs, J, prior_cols, BLOCK_I).to(ACC)
            c = _batch_coupling(u_hat, V, j_valid, prior, leak, True)
        else:
            c = _batch_coupling(u_hat, V, j_valid, 0.0, 0.0, False)
        if STORE_C:  # offsets built here, not held across the loop
            i_local = tl.arange(0, BLOCK_I)
            c_offs = (b_local[:, None, None] * I + i_local[None, :, None]) * J + j_offs[None, None, :]
            c_mask = (b_valid[:, None, None] & (i0 + i_local < i_end)[None, :, None]
                      & (j_offs < c_cols)[None, None, :])
            tl.store((c_ptr + (b0 * I + i0) * J) + c_offs, c.to(c_ptr.dtype.element_ty), mask=c_mask)
        s += tl.sum(c[:, :, :, None] * u_hat, axis=1)
    return s


@triton.jit
def _batch_agreement_grad(
    x_ptr, W_ptr, prior_ptr, b0, b_local, b_valid, Vp, gs, A, i_begin, i_end, j_offs, d_offs, I, J, D, K,
    prior_cols, leak,
    HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK_I: tl.constexpr, OPTIONS: tl.constexpr,
):
    """A plus, per batch element of the tile, sum over i in [i_begin, i_end) of g_b[i, j] u_hat[i, j] (§3)."""
    j_valid = (j_offs < J)[None, None, :]
    for i0 in range(_loop_bound(i_begin), _loop_bound(i_end), BLOCK_I):
        u_hat = _batch_predictions_tile(x_ptr, W_ptr, b0, b_local, b_valid, i0, i_end, j_offs, d_offs, I, J, D, K,
                                        HAS_W, ACC, BLOCK_I, 0)
        if OPTIONS:
            prior = _prior_tile(prior_ptr, i0, i_end, j_offs, J, prior_cols, BLOCK_I).to(ACC)
            c = _batch_coupling(u_hat, Vp, j_valid, prior, leak, True)
        else:
            c = _batch_coupling(u_hat, Vp, j_valid, 0.0, 0.0, False)
        g_b = _batch_logit_grad(u_hat, c, gs)
        A += tl.sum(g_b[:, :, :, None] * u_hat, axis=1)
    return A


@triton.jit
def _batch_squash(s, EPS: tl.constexpr):
    """Squash each (b, j) row of s (BLOCK_B, BLOCK_J, BLOCK_D)."""
    n2 = tl.sum(s * s, axis=2)[:, :, None]
    return n2 / (1.0 + n2) * s / tl.sqrt(n2 + EPS)


@triton.jit
def _batch_squash_backward(s, g, EPS: tl.constexpr):
    """Gradient wrt s of squash(s) given the gradient g of its output, per (b, j) row.

    squash(s) = f(x) s with x = |s|^2, f = x / ((1 + x) sqrt(x + eps)), so
    g_s = f g + 2 f'(x) (s . g) s with
    f'(x) = ((x + eps) - x (1 + x) / 2) / ((1 + x)^2 (x + eps)^(3/2)),
    finite at s = 0.
    """
    x = tl.sum(s * s, axis=2)[:, :, None]
    sg = tl.sum(s * g, axis=2)[:, :, None]
    root = tl.sqrt(x + EPS)
    f = x / ((1.0 + x) * root)
    df = ((x + EPS) - 0.5 * x * (1.0 + x)) / ((1.0 + x) * (1.0 + x) * (x + EPS) * root)
    return f * g + 2.0 * df * sg * s


@triton.jit
def _batch_tile(B, J, D, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's batch tile [b0, b0 + BLOCK_B): its first element, lane offsets, validity, and the
    32-bit offsets and mask of its (BLOCK_B, BLOCK_J, BLOCK_D) block in a (.., B, J, D) state, from
    (row * B + b0) * J * D (see _state_ptrs)."""
    b0 = tl.program_id(0).to(tl.int64) * BLOCK_B
    b_local = tl.arange(0, BLOCK_B)
    b_valid = b0 + b_local < B
    j_offs, d_offs, jd_offs, jd_mask = _jd_block(J, D, BLOCK_J, BLOCK_D)
    bjd_offs = b_local[:, None, None] * (J * D) + jd_offs[None, :, :]
    bjd_mask = b_valid[:, None, None] & jd_mask[None, :, :]
    return b0, b_local, b_valid, j_offs, d_offs, bjd_offs, bjd_mask


@triton.jit
def _state_ptrs(ptr, row, B, b0, J, D, bjd_offs):
    """Pointers to the batch tile's block of row `row` of a (rows, B, J, D) state: a scalar base and
    the tile's 32-bit offsets, so no tensor of 64-bit pointers is held across the loops."""
    return (ptr + (row * B + b0) * J * D) + bjd_offs


@triton.jit
def _routing_forward_kernel(
    x_ptr,        # u (B, I, K) if HAS_W else u_hat (B, I, J, D), contiguous
    W_ptr,        # W (I, J, D, K), contiguous; ignored unless HAS_W
    v_ptr,        # out: v (B, J, D), input dtype (one_launch only)
    s_ptr,        # out: s(r) (R, B, J, D) in the compute dtype (one_launch); else partial s (splits, B, J, D)
    Vprev_ptr,    # out: V(r-1) (R, B, J, D) (one_launch); else in: V (B, J, D) for this iteration
    bias_ptr,     # bias (J, D), input dtype, added to s(r) if bias_cols > 0 (one_launch; else the launcher)
    prior_ptr,    # logit_prior (I, J), input dtype; read only if prior_cols > 0
    c_ptr,        # out: the couplings (B, I, J), input dtype; written only if c_cols > 0 (not one_launch)
    B, I, J, D, K, R,
    one_launch,   # 1: this launch runs every iteration; 0: one iteration over this program's input slice
    i_per_split,  # input capsules per program along grid axis 1
    # The options of DESIGN.md §6 (read only with OPTIONS) as runtime scalars. Flags are column counts,
    # so that they enter masks as bounds (j < J: on; j < 0: off):
    bias_cols,    # J if a bias is given, else 0
    prior_cols,   # J if a logit_prior is given, else 0
    leak,         # 0.0: leaky routing; -inf: the plain softmax
    c_cols,       # J: store this launch's couplings (not one_launch); 0: not
    HAS_W: tl.constexpr,
    OPTIONS: tl.constexpr,  # False: the plain op, compiled without a trace of the options
    BLOCK_B: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_K: tl.constexpr,  # > 0: predictions by tl.dot with Din padded to DOT_K (half inputs); 0: FMAs
):
    split = tl.program_id(1).to(tl.int64)
    ACC: tl.constexpr = s_ptr.dtype.element_ty
    b0, b_local, b_valid, j_offs, d_offs, bjd_offs, bjd_mask = _batch_tile(B, J, D, BLOCK_B, BLOCK_J, BLOCK_D)

    if one_launch:
        V = tl.zeros((BLOCK_B, BLOCK_J, BLOCK_D), dtype=ACC)
        for r in range(_loop_bound(R)):
            tl.store(_state_ptrs(Vprev_ptr, r, B, b0, J, D, bjd_offs), V, mask=bjd_mask)
            s = tl.zeros((BLOCK_B, BLOCK_J, BLOCK_D), dtype=ACC)
            if OPTIONS:  # DESIGN.md §6: the bias is in s(r) in every iteration, so s(r) is saved with it. It
                # starts the sum, loaded (from cache) each iteration: held across the pass, or added after
                # it, its copy broadcast over the batch tile took registers that the largest tiles lack.
                j_b, _, jd_offs, jd_mask = _jd_block(J, D, BLOCK_J, BLOCK_D)
                bias_mask = jd_mask & (j_b < bias_cols)[:, None]
                s += tl.load(bias_ptr + jd_offs, mask=bias_mask, other=0.0).to(ACC)[None, :, :]
            s = _batch_accumulate_s(x_ptr, W_ptr, prior_ptr, c_ptr, b0, b_local, b_valid, V, s, 0, I, j_offs, d_offs,
                                    I, J, D, K, prior_cols, leak, 0, HAS_W, ACC, BLOCK_I, DOT_K, OPTIONS, False)
            tl.store(_state_ptrs(s_ptr, r, B, b0, J, D, bjd_offs), s, mask=bjd_mask)
            v = _batch_squash(s, SQUASH_EPS)
            V += v
            # Stored every iteration (the last one stays) rather than carried: fewer live registers.
            tl.store(_state_ptrs(v_ptr, 0, B, b0, J, D, bjd_offs), v.to(v_ptr.dtype.element_ty), mask=bjd_mask)
    else:
        V = tl.load(_state_ptrs(Vprev_ptr, 0, B, b0, J, D, bjd_offs), mask=bjd_mask, other=0.0)
        i_begin, i_end = _split_range(split, i_per_split, I)
        s = _batch_accumulate_s(x_ptr, W_ptr, prior_ptr, c_ptr, b0, b_local, b_valid, V,
                                tl.zeros((BLOCK_B, BLOCK_J, BLOCK_D), dtype=ACC), i_begin, i_end, j_offs, d_offs,
                                I, J, D, K, prior_cols, leak, c_cols, HAS_W, ACC, BLOCK_I, DOT_K, OPTIONS, OPTIONS)
        tl.store(_state_ptrs(s_ptr, split, B, b0, J, D, bjd_offs), s, mask=bjd_mask)


@triton.jit
def _routing_backward_reduce_kernel(
    x_ptr,        # u (B, I, K) if HAS_W else u_hat (B, I, J, D)
    W_ptr,        # W (I, J, D, K); ignored unless HAS_W
    grad_v_ptr,   # in: dL/dv (B, J, D), contiguous, any float dtype (num_splits == 1)
    s_ptr,        # in: s(r) (R, B, J, D) from the forward
    Vprev_ptr,    # in: V(r-1) (R, B, J, D) from the forward
    gs_ptr,       # out: g_s(r) (R, B, J, D) (num_splits == 1); in: g_s(r) for iteration `r_only` (num_splits > 1)
    A_ptr,        # out: partial A(r_only) (num_splits, B, J, D) (num_splits > 1 only)
    prior_ptr,    # logit_prior (I, J); read only if prior_cols > 0
    B, I, J, D, K, R,
    r_only,       # the one iteration this launch reduces (num_splits > 1)
    num_splits,
    i_per_split,
    prior_cols,   # as the forward's (read only with OPTIONS)
    leak,
    HAS_W: tl.constexpr,
    OPTIONS: tl.constexpr,  # False: the plain op
    BLOCK_B: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    split = tl.program_id(1).to(tl.int64)
    ACC: tl.constexpr = s_ptr.dtype.element_ty
    b0, b_local, b_valid, j_offs, d_offs, bjd_offs, bjd_mask = _batch_tile(B, J, D, BLOCK_B, BLOCK_J, BLOCK_D)

    if num_splits == 1:
        # G: the gradient reaching v(r). For r = R it is dL/dv; below, the A(r') of every later
        # iteration r' (which read V(r'-1), a sum that holds v(r)).
        G = tl.load(_state_ptrs(grad_v_ptr, 0, B, b0, J, D, bjd_offs), mask=bjd_mask, other=0.0).to(ACC)
        for rr in range(_loop_bound(R)):
            r = R - 1 - rr
            s = tl.load(_state_ptrs(s_ptr, r, B, b0, J, D, bjd_offs), mask=bjd_mask, other=0.0)
            gs = _batch_squash_backward(s, G, SQUASH_EPS)
            tl.store(_state_ptrs(gs_ptr, r, B, b0, J, D, bjd_offs), gs, mask=bjd_mask)
            if r > 0:
                G = tl.where(rr > 0, G, 0.0)  # dL/dv reaches only v(R)
                Vp = tl.load(_state_ptrs(Vprev_ptr, r, B, b0, J, D, bjd_offs), mask=bjd_mask, other=0.0)
                G = _batch_agreement_grad(x_ptr, W_ptr, prior_ptr, b0, b_local, b_valid, Vp, gs, G, 0, I, j_offs,
                                          d_offs, I, J, D, K, prior_cols, leak, HAS_W, ACC, BLOCK_I, OPTIONS)
    else:
        Vp = tl.load(_state_ptrs(Vprev_ptr, r_only, B, b0, J, D, bjd_offs), mask=bjd_mask, other=0.0)
        gs = tl.load(_state_ptrs(gs_ptr, r_only, B, b0, J, D, bjd_offs), mask=bjd_mask, other=0.0)
        i_begin, i_end = _split_range(split, i_per_split, I)
        A = tl.zeros((BLOCK_B, BLOCK_J, BLOCK_D), dtype=ACC)
        A = _batch_agreement_grad(x_ptr, W_ptr, prior_ptr, b0, b_local, b_valid, Vp, gs, A, i_begin, i_end, j_offs,
                                  d_offs, I, J, D, K, prior_cols, leak, HAS_W, ACC, BLOCK_I, OPTIONS)
        tl.store(_state_ptrs(A_ptr, split, B, b0, J, D, bjd_offs), A, mask=bjd_mask)


@triton.jit
def _routing_backward_inputs_kernel(
    x_ptr,        # u (B, I, K) if HAS_W else u_hat (B, I, J, D)
    W_ptr,        # W (I, J, D, K); ignored unless HAS_W
    Vprev_ptr,    # in: V(r-1) (R, B, J, D)
    gs_ptr,       # in: g_s(r) (R, B, J, D)
    dx_ptr,       # out: du (B, I, K) if HAS_W else du_hat (B, I, J, D), input dtype
    dW_ptr,       # out: dW partial (B_CHUNKS, I, J, D, K) in the compute dtype; ignored unless HAS_W
    prior_ptr,    # logit_prior (I, J); read only if prior_cols > 0
    dprior_ptr,   # out: d logit_prior partial (B_CHUNKS, I, J) in the compute dtype; written only if dprior_cols > 0
    B, I, J, D, K, R,
    b_per_chunk,  # batch elements per program along grid axis 2
    # The options of DESIGN.md §6, read only with OPTIONS:
    prior_cols,   # as the forward's
    leak,
    dprior_cols,  # J: sum g_b(r) over the chunk and the iterations into dprior; 0: not
    detach_inner, # 1: du_hat = c(R) g_s(R) only; the other terms of the sum are the detached iterations'
    r_begin,      # first iteration to visit: R - 1 when detach_inner and no dprior is wanted, else 0
    HAS_W: tl.constexpr,
    OPTIONS: tl.constexpr,  # False: the plain op
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    W_IN_REGISTERS: tl.constexpr,  # HAS_W and BLOCK_K >= K: the predictions come from the W tile held for du
):
    i0 = tl.program_id(0).to(tl.int64) * BLOCK_I
    k_chunk = tl.program_id(1).to(tl.int64)
    b_chunk = tl.program_id(2).to(tl.int64)
    ACC: tl.constexpr = Vprev_ptr.dtype.element_ty
    j_offs, d_offs, jd_offs, jd_mask = _jd_block(J, D, BLOCK_J, BLOCK_D)
    j_valid = (j_offs < J)[None, None, :]
    i_offs = i0 + tl.arange(0, BLOCK_I)
    i_valid = i_offs < I
    k_offs = k_chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    ik_mask = i_valid[:, None] & (k_offs < K)[None, :]
    ijdk_offs = (((i_offs[:, None, None, None] * J + j_offs[None, :, None, None]) * D + d_offs[None, None, :, None]) * K
                 + k_offs[None, None, None, :])
    ijdk_mask = ik_mask[:, None, None, :] & jd_mask[None, :, :, None]
    ijd_mask = i_valid[:, None, None] & jd_mask[None, :, :]
    if HAS_W:
        W_tile = tl.load(W_ptr + ijdk_offs, mask=ijdk_mask, other=0.0).to(ACC)
        dW = tl.zeros((BLOCK_I, BLOCK_J, BLOCK_D, BLOCK_K), dtype=ACC)
    if OPTIONS:
        prior = _prior_tile(prior_ptr, i0, I, j_offs, J, prior_cols, BLOCK_I).to(ACC)
        dprior = tl.zeros((BLOCK_I, BLOCK_J), dtype=ACC)
        # detach_inner: iteration r < R adds neither c g_s nor g_b V(r-1) to du_hat (its u_hat was detached).
        inner_weight = tl.where(detach_inner != 0, 0.0, 1.0)
        r_first = r_begin
    else:
        r_first = 0

    b_begin = b_chunk * b_per_chunk
    b_end = tl.minimum(b_begin + b_per_chunk, B)
    for b in range(_loop_bound(b_begin), _loop_bound(b_end)):
        # The tile of one batch element, as a BLOCK_B = 1 tile: (1, BLOCK_I, BLOCK_J, BLOCK_D).
        one = tl.arange(0, 1)
        if HAS_W:
            u_b = tl.load(x_ptr + (b * I + i_offs[:, None]) * K + k_offs[None, :], mask=ik_mask, other=0.0).to(ACC)
        if W_IN_REGISTERS:
            u_hat = tl.sum(W_tile * u_b[:, None, None, :], axis=3)[None, :, :, :]
        else:
            u_hat = _batch_predictions_tile(x_ptr, W_ptr, b, one, one == 0, i0, I, j_offs, d_offs, I, J, D, K,
                                            HAS_W, ACC, BLOCK_I, 0)
        du_hat = tl.zeros((1, BLOCK_I, BLOCK_J, BLOCK_D), dtype=ACC)
        for r in range(_loop_bound(r_first), _loop_bound(R)):
            Vp = tl.load(_state_ptrs(Vprev_ptr, r, B, b, J, D, jd_offs), mask=jd_mask, other=0.0)[None, :, :]
            gs = tl.load(_state_ptrs(gs_ptr, r, B, b, J, D, jd_offs), mask=jd_mask, other=0.0)[None, :, :]
            if OPTIONS:
                c = _batch_coupling(u_hat, Vp, j_valid, prior, leak, True)
                g_b = _batch_logit_grad(u_hat, c, gs)
                dprior += tl.sum(g_b, axis=0)
                c_weight = tl.where(r == R - 1, 1.0, inner_weight)
                du_hat += ((c * c_weight)[:, :, :, None] * gs[:, None, :, :]
                           + (g_b * inner_weight)[:, :, :, None] * Vp[:, None, :, :])
            else:
                c = _batch_coupling(u_hat, Vp, j_valid, 0.0, 0.0, False)
                g_b = _batch_logit_grad(u_hat, c, gs)
                du_hat += c[:, :, :, None] * gs[:, None, :, :] + g_b[:, :, :, None] * Vp[:, None, :, :]
        du_hat_b = tl.sum(du_hat, axis=0)  # (BLOCK_I, BLOCK_J, BLOCK_D)
        if HAS_W:
            dW += du_hat_b[:, :, :, None] * u_b[:, None, None, :]
            du_b = tl.sum(tl.sum(W_tile * du_hat_b[:, :, :, None], axis=2), axis=1)
            tl.store(dx_ptr + (b * I + i_offs[:, None]) * K + k_offs[None, :], du_b.to(dx_ptr.dtype.element_ty),
                     mask=ik_mask)
        else:
            offs = (b * I + i_offs[:, None, None]) * J * D + jd_offs[None, :, :]
            tl.store(dx_ptr + offs, du_hat_b.to(dx_ptr.dtype.element_ty), mask=ijd_mask)
    if HAS_W:
        tl.store(dW_ptr + b_chunk * I * J * D * K + ijdk_offs, dW, mask=ijdk_mask)
    if OPTIONS:  # every Din chunk computed the same g_b: the first stores it
        ij_mask = i_valid[:, None] & (j_offs < tl.where(k_chunk == 0, dprior_cols, 0))[None, :]
        tl.store(dprior_ptr + (b_chunk * I * J + i_offs[:, None] * J + j_offs[None, :]), dprior, mask=ij_mask)
