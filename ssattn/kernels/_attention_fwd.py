"""Forward kernel of SPEC 2's mask-weighted attention (flash-attention style).

One program per (query block, batch * head). K and V go to the tensor cores
straight from their loads (so Hopper's cp.async ring pipelines them); the
per-key weight m_j is folded into the per-column score factor
c_j = scale * log2(e) * m_j (`s * c_j` in place of `s * qk_scale`) and into P
before its cast for the P.V product (`p * m_j`). Masks are applied after that
scaling, so scale = 0 gives finite zeros, not -inf * 0. The softmax runs
online in base 2 and its statistics stay in base 2: the row max and log2 of
the row sum are stored as two float32 values, so the backward recomputes the
forward's P without a natural-log round trip (which costs 1e-3 in P at fp32
logits of 1e4). Full key blocks run without bounds masks and the last partial
block is peeled. Pointer arithmetic only (no tl.make_block_ptr: Triton 3.6 to 3.9).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_2d(ptrs, row_ok, col_ok, MASK_ROW: tl.constexpr, MASK_COL: tl.constexpr):
    """Load a tile, masking rows and/or columns only where the caller says a mask is needed."""
    if MASK_ROW and MASK_COL:
        x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    elif MASK_ROW:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif MASK_COL:
        x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def load_1d(ptrs, ok, other, MASK: tl.constexpr):
    if MASK:
        x = tl.load(ptrs, mask=ok, other=other)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr, INTERP_DOT: tl.constexpr):
    """acc + a @ b in float32 (INTERP_DOT: see mm)."""
    if INTERP_DOT == 2:
        return acc + tl.dot(a.to(tl.float64), b.to(tl.float64)).to(tl.float32)
    elif INTERP_DOT == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def mm(a, b, PREC: tl.constexpr, INTERP_DOT: tl.constexpr):
    """a @ b in float32. Under the interpreter (numpy), INTERP_DOT=1 upcasts bf16 operands (its bf16 dot
    is wrong) and INTERP_DOT=2 computes float32 dots in float64, rounded once: numpy's float32 matmul
    rounds (A B^T)^T and B A^T differently, whereas the GPU's dots sum each product sequence in one
    order, so the backward's transposed score tile equals the forward's bit for bit there too."""
    if INTERP_DOT == 2:
        return tl.dot(a.to(tl.float64), b.to(tl.float64)).to(tl.float32)
    elif INTERP_DOT == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def key_weight(w_ptrs, n_ok, like, MASK_N: tl.constexpr):
    """The per-key weight in float32, first rounded to the inputs' dtype (`like`'s, as the reference rounds it)."""
    return load_1d(w_ptrs, n_ok, 0.0, MASK_N).to(like.dtype).to(tl.float32)


@triton.jit
def exp2_scores(x, FAST_EXP2: tl.constexpr):
    """exp2 of a float32 tile; FAST_EXP2 evaluates it as packed half-precision pairs (ex2.approx.f16x2).

    Two exponentials per special-function slot, at half precision (rel. error ~1e-3): meant for
    fp16/bf16 inputs at head dims <= 64, where the exponentials bound the kernel. GPU only.
    """
    if FAST_EXP2:
        h = tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x.to(tl.float16)],
                                      dtype=tl.float16, is_pure=True, pack=2)
        return h.to(tl.float32)
    else:
        return tl.math.exp2(x)


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, kT_ptrs, v_ptrs, w_ptrs, pad_ptrs, lo, hi, Nk,
    stride_kn, stride_vn, stride_wn, stride_pn, offs_n, d_ok, dv_ok, qk_scale,
    BLOCK_N: tl.constexpr, HAS_W: tl.constexpr, HAS_KPM: tl.constexpr,
    MASK_N: tl.constexpr, MASK_D: tl.constexpr, MASK_DV: tl.constexpr,
    PREC: tl.constexpr, INTERP_DOT: tl.constexpr, FAST_EXP2: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        n_ok = (start_n + offs_n) < Nk
        kT = load_2d(kT_ptrs + start_n * stride_kn, d_ok, n_ok, MASK_D, MASK_N)  # (D, BN), as loaded
        v = load_2d(v_ptrs + start_n * stride_vn, n_ok, dv_ok, MASK_N, MASK_DV)  # (BN, DV), as loaded
        s = mm(q, kT, PREC, INTERP_DOT)
        if HAS_W:  # per-column factor: the weight costs the tiles nothing
            w = key_weight(w_ptrs + start_n * stride_wn, n_ok, kT, MASK_N)
            t = s * (qk_scale * w)[None, :]
        else:
            t = s * qk_scale
        # Mask after scaling: with scale 0, -inf * 0 would be NaN.
        if HAS_KPM:
            pad = load_1d(pad_ptrs + start_n * stride_pn, n_ok, 1, MASK_N)
            t = tl.where(pad[None, :] == 0, t, float("-inf"))
        elif MASK_N:
            t = tl.where(n_ok[None, :], t, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(t, 1))
        # A row with no valid key so far keeps m = -inf; use 0 so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = exp2_scores(t - m_use[:, None], FAST_EXP2)
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_W:
            p = p * w[None, :]
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], PREC, INTERP_DOT)
        m_i = m_new
    return acc, l_i, m_i


# Lengths are not specialized (N == 1 or N % 16 == 0 would each compile another binary for nothing).
@triton.jit(do_not_specialize=["H", "Nq", "Nk", "NQ_BUCKET", "NK_BUCKET", "LAYOUT"])
def attn_fwd_kernel(
    Q, K, V, W, KPM, Out, Stats,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_wb, stride_wn, stride_pb, stride_pn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_sb, stride_sh, stride_sm,
    H, Nq, Nk, qk_scale,
    NQ_BUCKET, NK_BUCKET, LAYOUT,  # autotune keys only
    HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_W: tl.constexpr, HAS_KPM: tl.constexpr,
    PREC: tl.constexpr, INTERP_DOT: tl.constexpr, FAST_EXP2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    MASK_D: tl.constexpr = BLOCK_D != HEAD_DIM
    MASK_DV: tl.constexpr = BLOCK_DV != HEAD_DV

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Nq
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DV

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = load_2d(q_ptrs, m_ok, d_ok, True, MASK_D)
    kT_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    w_ptrs = W + off_b * stride_wb + offs_n * stride_wn
    pad_ptrs = KPM + off_b * stride_pb + offs_n * stride_pn

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    n_full = (Nk // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, kT_ptrs, v_ptrs, w_ptrs, pad_ptrs, 0, n_full, Nk,
        stride_kn, stride_vn, stride_wn, stride_pn, offs_n, d_ok, dv_ok, qk_scale,
        BLOCK_N, HAS_W, HAS_KPM, False, MASK_D, MASK_DV, PREC, INTERP_DOT, FAST_EXP2,
    )
    if n_full < Nk:
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, kT_ptrs, v_ptrs, w_ptrs, pad_ptrs, n_full, Nk, Nk,
            stride_kn, stride_vn, stride_wn, stride_pn, offs_n, d_ok, dv_ok, qk_scale,
            BLOCK_N, HAS_W, HAS_KPM, True, MASK_D, MASK_DV, PREC, INTERP_DOT, FAST_EXP2,
        )

    # Every key padded: output 0, both statistics +inf (so the backward's exp2 gives P = 0).
    empty = l_i == 0.0
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    out = acc * inv_l[:, None]
    row_max = tl.where(empty, float("inf"), m_i)
    log2_sum = tl.where(empty, float("inf"), tl.math.log2(tl.where(empty, 1.0, l_i)))

    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    if MASK_DV:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None])
    s_ptrs = Stats + off_b * stride_sb + off_h * stride_sh + offs_m * stride_sm
    tl.store(s_ptrs, row_max, mask=m_ok)
    tl.store(s_ptrs + 1, log2_sum, mask=m_ok)
