"""Backward kernels of SPEC 2's mask-weighted attention.

1. attn_bwd_delta_kernel: delta_i = <do_i, o_i> (float32).
2. attn_bwd_dkdv_kernel: one program per (key block, batch * head) walks all
   query blocks, recomputes P^T from the forward's base-2 statistics (row max,
   log2 of the row sum) and accumulates dV_w = P^T dO and dK_w = dS^T Q; it
   writes dk = scale*w*dK_w, dv = w*dV_w and the per-head partial of dweight,
   scale <dK_w, k> + <dV_w, v> (k and v reloaded after the loop: no float32
   copies live through it), which the host sums over heads in a fixed order.
   With FUSED_DQ it also adds dq = dS (scale*w*k) into a float32 buffer with
   atomics: the single-pass backward (every exponential computed once; the
   order of the additions, so the bits of dq, vary run to run).
3. attn_bwd_dq_kernel: one program per (query block, batch * head) walks all
   key blocks: dq = dS (scale*w*k). With 2., the deterministic two-pass backward.
The weight is folded into per-key factors (scores, dP, dS) as in the forward:
K and V feed the dots as loaded. Both loops peel their last partial block so
full blocks run without bounds masks.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._attention_fwd import key_weight, load_1d, load_2d, mm, mma


@triton.jit
def softmax_grad(p, dp, delta):
    """dS = P (dP - delta), exactly 0 where P rounds to 1 (within 2 ulps).

    There every other probability of the row is below 2^-22 and the true dS is below the rounding
    residue of dP - delta (delta = <do, o> is computed from the stored output, not from dP). The
    reference's softmax backward cancels exactly there, so a one-hot row or a single key (Nk = 1)
    gets dS = 0, as in the reference, instead of that residue.
    """
    ds = p * (dp - delta)
    return tl.where(p >= 0.99999976158142089844, 0.0, ds)  # 1 - 2^-22


@triton.jit(do_not_specialize=["H", "Nq"])
def attn_bwd_delta_kernel(
    O, DO, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    H, Nq,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    mask = (offs_m < Nq)[:, None] & (offs_d < HEAD_DV)[None, :]
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * Nq + offs_m, tl.sum(o * do, 1), mask=offs_m < Nq)


@triton.jit
def _dkdv_inner(
    dk_acc, dv_acc, k, v, c, w, f, key_ok, qT_ptrs, do_ptrs, st_ptrs, delta_ptrs, dq_ptrs, lo, hi, Nq,
    stride_qm, stride_gm, stride_sm, stride_dqm, offs_m, d_ok, dv_ok,
    BLOCK_M: tl.constexpr, MASK_M: tl.constexpr, MASK_KEYS: tl.constexpr,
    MASK_D: tl.constexpr, MASK_DV: tl.constexpr, HAS_W: tl.constexpr, FUSED_DQ: tl.constexpr,
    PREC: tl.constexpr, INTERP_DOT: tl.constexpr,
):
    for start_m in range(lo, hi, BLOCK_M):
        m_ok = (start_m + offs_m) < Nq
        qT = load_2d(qT_ptrs + start_m * stride_qm, d_ok, m_ok, MASK_D, MASK_M)  # (D, BM)
        do = load_2d(do_ptrs + start_m * stride_gm, m_ok, dv_ok, MASK_M, MASK_DV)  # (BM, DV)
        # Rows past Nq get +inf statistics, so their probabilities are exactly 0.
        row_max = load_1d(st_ptrs + start_m * stride_sm, m_ok, float("inf"), MASK_M)
        log2_sum = load_1d(st_ptrs + start_m * stride_sm + 1, m_ok, float("inf"), MASK_M)
        delta = load_1d(delta_ptrs + start_m, m_ok, 0.0, MASK_M)
        sT = mm(k, qT, PREC, INTERP_DOT)  # (BN, BM), unscaled
        pT = tl.math.exp2((sT * c[:, None] - row_max[None, :]) - log2_sum[None, :])
        if MASK_KEYS:
            pT = tl.where(key_ok[:, None], pT, 0.0)
        dv_acc = mma(pT.to(do.dtype), do, dv_acc, PREC, INTERP_DOT)
        dpT = mm(v, tl.trans(do), PREC, INTERP_DOT)  # (BN, BM): <do_i, v_j>
        if HAS_W:
            dpT = dpT * w[:, None]
        dsT = softmax_grad(pT, dpT, delta[None, :])
        dk_acc = mma(dsT.to(qT.dtype), tl.trans(qT), dk_acc, PREC, INTERP_DOT)
        if FUSED_DQ:
            dq = mm(tl.trans((dsT * f[:, None]).to(k.dtype)), k, PREC, INTERP_DOT)  # (BM, D)
            if MASK_D:
                tl.atomic_add(dq_ptrs + start_m * stride_dqm, dq, mask=m_ok[:, None] & d_ok[None, :])
            else:
                tl.atomic_add(dq_ptrs + start_m * stride_dqm, dq, mask=m_ok[:, None])
    return dk_acc, dv_acc


@triton.jit
def _dkdv_loop(
    dk_acc, dv_acc, k, v, c, w, f, key_ok, qT_ptrs, do_ptrs, st_ptrs, delta_ptrs, dq_ptrs, Nq,
    stride_qm, stride_gm, stride_sm, stride_dqm, offs_m, d_ok, dv_ok,
    BLOCK_M: tl.constexpr, MASK_KEYS: tl.constexpr,
    MASK_D: tl.constexpr, MASK_DV: tl.constexpr, HAS_W: tl.constexpr, FUSED_DQ: tl.constexpr,
    PREC: tl.constexpr, INTERP_DOT: tl.constexpr,
):
    """All query blocks: the full ones without row masks, then the partial one."""
    m_full = (Nq // BLOCK_M) * BLOCK_M
    dk_acc, dv_acc = _dkdv_inner(
        dk_acc, dv_acc, k, v, c, w, f, key_ok, qT_ptrs, do_ptrs, st_ptrs, delta_ptrs, dq_ptrs, 0, m_full, Nq,
        stride_qm, stride_gm, stride_sm, stride_dqm, offs_m, d_ok, dv_ok,
        BLOCK_M, False, MASK_KEYS, MASK_D, MASK_DV, HAS_W, FUSED_DQ, PREC, INTERP_DOT,
    )
    if m_full < Nq:
        dk_acc, dv_acc = _dkdv_inner(
            dk_acc, dv_acc, k, v, c, w, f, key_ok, qT_ptrs, do_ptrs, st_ptrs, delta_ptrs, dq_ptrs, m_full, Nq, Nq,
            stride_qm, stride_gm, stride_sm, stride_dqm, offs_m, d_ok, dv_ok,
            BLOCK_M, True, MASK_KEYS, MASK_D, MASK_DV, HAS_W, FUSED_DQ, PREC, INTERP_DOT,
        )
    return dk_acc, dv_acc


@triton.jit(do_not_specialize=["H", "Nq", "Nk", "NQ_BUCKET", "NK_BUCKET", "LAYOUT"])
def attn_bwd_dkdv_kernel(
    Q, K, V, W, KPM, DO, Stats, Delta, DK, DV, DWp, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_wb, stride_wn, stride_pb, stride_pn,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_sb, stride_sh, stride_sm,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, Nq, Nk, qk_scale, scale,
    NQ_BUCKET, NK_BUCKET, LAYOUT,  # autotune keys only
    HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_W: tl.constexpr, HAS_KPM: tl.constexpr, WEIGHT_GRAD: tl.constexpr, FUSED_DQ: tl.constexpr,
    PREC: tl.constexpr, INTERP_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    MASK_D: tl.constexpr = BLOCK_D != HEAD_DIM
    MASK_DV: tl.constexpr = BLOCK_DV != HEAD_DV

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < Nk
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DV

    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    k = load_2d(k_ptrs, n_ok, d_ok, True, MASK_D)
    v = load_2d(v_ptrs, n_ok, dv_ok, True, MASK_DV)
    key_ok = n_ok
    if HAS_KPM:
        pad = tl.load(KPM + off_b * stride_pb + offs_n * stride_pn, mask=n_ok, other=1)
        key_ok = n_ok & (pad == 0)
    # Per-key factors: scores (c), dP (w), dS for dq (f).
    if HAS_W:
        w = key_weight(W + off_b * stride_wb + offs_n * stride_wn, n_ok, k, True)
    else:
        w = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    c = w * qk_scale
    f = w * scale
    qT_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_d[:, None] * stride_qd + offs_m[None, :] * stride_qm
    do_ptrs = DO + off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gm + offs_dv[None, :] * stride_gd
    st_ptrs = Stats + off_b * stride_sb + off_h * stride_sh + offs_m * stride_sm
    delta_ptrs = Delta + pid_bh.to(tl.int64) * Nq + offs_m
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd

    dk_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # Keys past Nk or padded have finite scores here: only blocks holding one need the probability mask.
    if HAS_KPM or pid_n * BLOCK_N + BLOCK_N > Nk:
        dk_acc, dv_acc = _dkdv_loop(
            dk_acc, dv_acc, k, v, c, w, f, key_ok, qT_ptrs, do_ptrs, st_ptrs, delta_ptrs, dq_ptrs, Nq,
            stride_qm, stride_gm, stride_sm, stride_dqm, offs_m, d_ok, dv_ok,
            BLOCK_M, True, MASK_D, MASK_DV, HAS_W, FUSED_DQ, PREC, INTERP_DOT,
        )
    else:
        dk_acc, dv_acc = _dkdv_loop(
            dk_acc, dv_acc, k, v, c, w, f, key_ok, qT_ptrs, do_ptrs, st_ptrs, delta_ptrs, dq_ptrs, Nq,
            stride_qm, stride_gm, stride_sm, stride_dqm, offs_m, d_ok, dv_ok,
            BLOCK_M, False, MASK_D, MASK_DV, HAS_W, FUSED_DQ, PREC, INTERP_DOT,
        )

    dkw = dk_acc * scale  # d(loss)/d(w*k), the sign of scale included
    dk = dkw * w[:, None]
    dv = dv_acc * w[:, None]
    dk_ptrs = DK + off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + off_b * stride_dvb + off_h * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & dv_ok[None, :])
    if WEIGHT_GRAD:
        # dm_j (this head) = scale <(dS^T q)_j, k_j> + <(P^T do)_j, v_j>, with k and v read again
        # (cached) rather than kept live in float32 through the loop.
        kf = load_2d(k_ptrs, n_ok, d_ok, True, MASK_D).to(tl.float32)
        vf = load_2d(v_ptrs, n_ok, dv_ok, True, MASK_DV).to(tl.float32)
        dw = tl.sum(dkw * kf, 1) + tl.sum(dv_acc * vf, 1)
        tl.store(DWp + pid_bh.to(tl.int64) * Nk + offs_n, dw, mask=n_ok)


@triton.jit
def _dq_inner(
    dq_acc, q, do, row_max, log2_sum, delta, kT_ptrs, vT_ptrs, w_ptrs, pad_ptrs, lo, hi, Nk,
    stride_kn, stride_vn, stride_wn, stride_pn, offs_n, d_ok, dv_ok, qk_scale,
    BLOCK_N: tl.constexpr, HAS_W: tl.constexpr, HAS_KPM: tl.constexpr,
    MASK_N: tl.constexpr, MASK_D: tl.constexpr, MASK_DV: tl.constexpr,
    PREC: tl.constexpr, INTERP_DOT: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        n_ok = (start_n + offs_n) < Nk
        kT = load_2d(kT_ptrs + start_n * stride_kn, d_ok, n_ok, MASK_D, MASK_N)  # (D, BN), as loaded
        vT = load_2d(vT_ptrs + start_n * stride_vn, dv_ok, n_ok, MASK_DV, MASK_N)  # (DV, BN), as loaded
        s = mm(q, kT, PREC, INTERP_DOT)
        dp = mm(do, vT, PREC, INTERP_DOT)
        if HAS_W:
            w = key_weight(w_ptrs + start_n * stride_wn, n_ok, kT, MASK_N)
            p = tl.math.exp2((s * (qk_scale * w)[None, :] - row_max[:, None]) - log2_sum[:, None])
            dp = dp * w[None, :]
        else:
            p = tl.math.exp2((s * qk_scale - row_max[:, None]) - log2_sum[:, None])
        if HAS_KPM:
            pad = load_1d(pad_ptrs + start_n * stride_pn, n_ok, 1, MASK_N)
            p = tl.where(pad[None, :] == 0, p, 0.0)
        elif MASK_N:
            p = tl.where(n_ok[None, :], p, 0.0)
        ds = softmax_grad(p, dp, delta[:, None])
        if HAS_W:
            ds = ds * w[None, :]  # dq = scale * dS (w k): the weight on dS, K as loaded
        dq_acc = mma(ds.to(kT.dtype), tl.trans(kT), dq_acc, PREC, INTERP_DOT)
    return dq_acc


@triton.jit(do_not_specialize=["H", "Nq", "Nk", "NQ_BUCKET", "NK_BUCKET", "LAYOUT"])
def attn_bwd_dq_kernel(
    Q, K, V, W, KPM, DO, Stats, Delta, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_wb, stride_wn, stride_pb, stride_pn,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_sb, stride_sh, stride_sm,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, Nq, Nk, qk_scale, scale,
    NQ_BUCKET, NK_BUCKET, LAYOUT,  # autotune keys only
    HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_W: tl.constexpr, HAS_KPM: tl.constexpr,
    PREC: tl.constexpr, INTERP_DOT: tl.constexpr,
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

    q = load_2d(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                m_ok, d_ok, True, MASK_D)
    do = load_2d(DO + off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gm + offs_dv[None, :] * stride_gd,
                 m_ok, dv_ok, True, MASK_DV)
    st_ptrs = Stats + off_b * stride_sb + off_h * stride_sh + offs_m * stride_sm
    row_max = tl.load(st_ptrs, mask=m_ok, other=float("inf"))
    log2_sum = tl.load(st_ptrs + 1, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + pid_bh.to(tl.int64) * Nq + offs_m, mask=m_ok, other=0.0)

    kT_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
    vT_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_dv[:, None] * stride_vd + offs_n[None, :] * stride_vn
    w_ptrs = W + off_b * stride_wb + offs_n * stride_wn
    pad_ptrs = KPM + off_b * stride_pb + offs_n * stride_pn

    dq_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (Nk // BLOCK_N) * BLOCK_N
    dq_acc = _dq_inner(
        dq_acc, q, do, row_max, log2_sum, delta, kT_ptrs, vT_ptrs, w_ptrs, pad_ptrs, 0, n_full, Nk,
        stride_kn, stride_vn, stride_wn, stride_pn, offs_n, d_ok, dv_ok, qk_scale,
        BLOCK_N, HAS_W, HAS_KPM, False, MASK_D, MASK_DV, PREC, INTERP_DOT,
    )
    if n_full < Nk:
        dq_acc = _dq_inner(
            dq_acc, q, do, row_max, log2_sum, delta, kT_ptrs, vT_ptrs, w_ptrs, pad_ptrs, n_full, Nk, Nk,
            stride_kn, stride_vn, stride_wn, stride_pn, offs_n, d_ok, dv_ok, qk_scale,
            BLOCK_N, HAS_W, HAS_KPM, True, MASK_D, MASK_DV, PREC, INTERP_DOT,
        )
    dq = dq_acc * scale
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
