"""Forward kernel of SPEC 2's mask-weighted attention (flash-attention style).

One program per (query block, batch * head). The per-key weight is multiplied
into the K and V tiles as they are loaded (no weighted copies in memory); the
softmax runs online in base 2 with the scale folded into one FMA per score;
full key blocks run without bounds masks and the last partial block is peeled.
Pointer arithmetic only (no tl.make_block_ptr: Triton 3.6 to 3.9).
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
def mma(a, b, acc, PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """acc + a @ b in float32; DOT_F32 upcasts operands (bf16 under the interpreter)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def weigh(x, w, AXIS: tl.constexpr, F32: tl.constexpr):
    """x * w along AXIS (1: rows of x, 0: columns), in x's dtype.

    F32 computes in float32 and rounds back: the same result, but the interpreter's bf16
    arithmetic is wrong. On the GPU the half-precision product is native (no conversions).
    """
    if F32:
        xf = x.to(tl.float32)
        wf = w.to(tl.float32)
        if AXIS == 1:
            return (xf * wf[:, None]).to(x.dtype)
        else:
            return (xf * wf[None, :]).to(x.dtype)
    else:
        if AXIS == 1:
            return x * w[:, None]
        else:
            return x * w[None, :]


@triton.jit
def neg(x, F32: tl.constexpr):
    if F32:
        return (-x.to(tl.float32)).to(x.dtype)
    else:
        return -x


@triton.jit
def mm(a, b, PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """a @ b in float32; DOT_F32 upcasts operands (bf16 under the interpreter)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def weigh_kv(kT, v, w_ptrs, n_ok, V_AXIS: tl.constexpr, HAS_W: tl.constexpr, NEG: tl.constexpr,
             MASK_N: tl.constexpr, DOT_F32: tl.constexpr):
    """The K^T (D, BN) and V tiles times the per-key weight, K^T also negated for a negative scale.

    V is (BN, DV) with V_AXIS=1 or V^T (DV, BN) with V_AXIS=0. The weight is rounded to the input
    dtype (as the reference does), so each element is one rounded product.
    """
    if HAS_W:
        w = load_1d(w_ptrs, n_ok, 0.0, MASK_N).to(kT.dtype)
        if DOT_F32:  # negate and multiply in fp32 under the interpreter (bf16 ops are wrong there)
            w = w.to(tl.float32)
        v = weigh(v, w, V_AXIS, DOT_F32)
        if NEG:
            w = -w
        kT = weigh(kT, w, 0, DOT_F32)
    elif NEG:
        kT = neg(kT, DOT_F32)
    return kT, v


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, kT_ptrs, v_ptrs, w_ptrs, pad_ptrs, lo, hi, Nk,
    stride_kn, stride_vn, stride_wn, stride_pn, offs_n, d_ok, dv_ok, qk_scale,
    BLOCK_N: tl.constexpr, HAS_W: tl.constexpr, HAS_KPM: tl.constexpr, NEG: tl.constexpr,
    MASK_N: tl.constexpr, MASK_D: tl.constexpr, MASK_DV: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        n_ok = (start_n + offs_n) < Nk
        kT = load_2d(kT_ptrs + start_n * stride_kn, d_ok, n_ok, MASK_D, MASK_N)  # (D, BN)
        v = load_2d(v_ptrs + start_n * stride_vn, n_ok, dv_ok, MASK_N, MASK_DV)  # (BN, DV)
        kT, v = weigh_kv(kT, v, w_ptrs + start_n * stride_wn, n_ok, 1, HAS_W, NEG, MASK_N, DOT_F32)
        s = mm(q, kT, PREC, DOT_F32)
        if HAS_KPM:
            pad = load_1d(pad_ptrs + start_n * stride_pn, n_ok, 1, MASK_N)
            s = tl.where(pad[None, :] == 0, s, float("-inf"))
        elif MASK_N:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        # A row with no valid key so far keeps m = -inf; use 0 so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], PREC, DOT_F32)
        m_i = m_new
    return acc, l_i, m_i


# Lengths are not specialized (N == 1 or N % 16 == 0 would each compile another binary for nothing).
@triton.jit(do_not_specialize=["H", "Nq", "Nk", "NQ_BUCKET", "NK_BUCKET"])
def attn_fwd_kernel(
    Q, K, V, W, KPM, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_wb, stride_wn, stride_pb, stride_pn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    H, Nq, Nk, qk_scale,
    NQ_BUCKET, NK_BUCKET,  # autotune keys only
    HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_W: tl.constexpr, HAS_KPM: tl.constexpr, NEG: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr,
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
        BLOCK_N, HAS_W, HAS_KPM, NEG, False, MASK_D, MASK_DV, PREC, DOT_F32,
    )
    if n_full < Nk:
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, kT_ptrs, v_ptrs, w_ptrs, pad_ptrs, n_full, Nk, Nk,
            stride_kn, stride_vn, stride_wn, stride_pn, offs_n, d_ok, dv_ok, qk_scale,
            BLOCK_N, HAS_W, HAS_KPM, NEG, True, MASK_D, MASK_DV, PREC, DOT_F32,
        )

    empty = l_i == 0.0  # every key padded: output 0, lse = +inf (so exp(s - lse) = 0)
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    out = acc * inv_l[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)

    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    if MASK_DV:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None])
    tl.store(Lse + off_b * stride_lb + off_h * stride_lh + offs_m * stride_lm, lse, mask=m_ok)
