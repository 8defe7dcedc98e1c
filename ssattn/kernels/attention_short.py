"""Triton kernels for SPEC 2's attention with few keys (Nk <= 128: image-word cross-attention).

Same contract as ssattn/kernels/attention.py (forward -> (out, stats), backward ->
(dq, dk, dv, dweight), the same base-2 statistics, out in q's layout), for
Nk <= MAX_KEYS only: the launchers raise on more keys.

With Nq = H*W up to 65536 queries and L <= 77 text keys, the work per byte is
below the Hopper ridge: the time is reading Q (and dO, O) and writing O (and
dQ). So all keys fit one tile: K and V (padded to BLOCK_N, a power of 2 >= 16)
are loaded once per program and stay on chip; the softmax takes one pass (no
online rescaling, no loop over key blocks). The per-key weight m_j goes into
the score factor c_j = scale * log2(e) * m_j and into P before the P.V product
(`p * m_j`), as in ssattn/kernels/_attention_fwd.py; the padding mask is applied after
that scaling, so scale = 0 or -0.0 gives no NaN. A row whose keys are all
padded gets out = 0 and +inf statistics.

Forward: one program per (query block, batch * head).

Backward: one program per (split, batch * head). Each loads K and V once
(the weight and mask vectors, 2 x BLOCK_N values, are re-read from cache per
block; see the loop) and walks the query blocks split, split + SPLITS, ...: per
block it computes delta = <dO, O>, recomputes P from the statistics, writes
dq = scale * dS (m k) directly (each query block belongs to one program, so dq
needs no atomics), and accumulates dV_m = P^T dO and dK_m = dS^T Q over its
blocks in float32 registers. Those two sums over queries are the only
reductions. SPLITS is chosen so that splits * B * h fills the GPU (about
two programs per SM of an H100) while each program still walks many query blocks, so K
and V are read from memory once per program, not once per query block. At
the end each program adds its partial sums:
  - default (deterministic=False): float32 atomic adds into one (B, h, Nk, d)
    buffer. The buffer is the size of K, the adds are few (splits per key), and
    no second pass runs; the order of the adds, so the low bits, vary run to run.
  - deterministic=True: each program stores its partial into its own slot of a
    (B, h, SPLITS, Nk, d) buffer, which the host sums over SPLITS in a fixed
    order (torch.sum on a fixed shape): the same bits in every run and process
    (SPLITS depends on the shape only, never on the device).
The host then forms dk = scale * m * dK_m, dv = m * dV_m and
dm = sum over heads of scale <dK_m, k> + <dV_m, v> (tensors of K's size).
Pointer arithmetic only (Triton 3.6 to 3.9).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._attention_bwd import softmax_grad
from ._attention_fwd import key_weight, load_2d, mm
from .attention import INTERPRET, LOG2E, _check, _common, zero_gradients

MAX_KEYS = 128
# Backward programs aimed at per launch: about two per SM of an H100 (132 SMs). A constant, not the
# device's SM count, so that the deterministic mode gives the same bits on every device and process.
# Under the interpreter two, so that the CPU tests cover several splits, each walking several blocks.
_TARGET_PROGRAMS = 2 if INTERPRET else 264


# --------------------------------------------------------------------------- kernels
@triton.jit
def _key_factors(W, KPM, off_b, stride_wb, stride_wn, stride_pb, stride_pn, offs_n, Nk, like,
                 HAS_W: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per key: the weight (1 without one) and whether the key takes part (in range, not padded)."""
    n_ok = offs_n < Nk
    key_ok = n_ok
    if HAS_KPM:
        pad = tl.load(KPM + off_b * stride_pb + offs_n * stride_pn, mask=n_ok, other=1)
        key_ok = n_ok & (pad == 0)
    if HAS_W:
        w = key_weight(W + off_b * stride_wb + offs_n * stride_wn, n_ok, like, True)
    else:
        w = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    return w, key_ok


@triton.jit(do_not_specialize=["H", "Nq", "Nk"])
def short_fwd_kernel(
    Q, K, V, W, KPM, Out, Stats,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_wb, stride_wn, stride_pb, stride_pn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_sb, stride_sh, stride_sm,
    H, Nq, Nk, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_W: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KEYS: tl.constexpr,
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
    n_ok = offs_n < Nk
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DV

    # Every key at once: K^T (D, BN) and V (BN, DV), loaded once and kept on chip.
    kT = load_2d(K + off_b * stride_kb + off_h * stride_kh + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                 d_ok, n_ok, MASK_D, True)
    v = load_2d(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                n_ok, dv_ok, True, MASK_DV)
    w, key_ok = _key_factors(W, KPM, off_b, stride_wb, stride_wn, stride_pb, stride_pn, offs_n, Nk, kT,
                             HAS_W, HAS_KPM, BLOCK_N)
    q = load_2d(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                m_ok, d_ok, True, MASK_D)

    s = mm(q, kT, PREC, INTERP_DOT)
    if HAS_W:  # per-column factor: the weight costs the tiles nothing
        t = s * (qk_scale * w)[None, :]
    else:
        t = s * qk_scale
    if MASK_KEYS:  # after scaling: with scale 0, -inf * 0 would be NaN
        t = tl.where(key_ok[None, :], t, float("-inf"))
    row_max = tl.max(t, 1)
    # A row with no key keeps max = -inf; subtract 0 there so exp2 gives 0, not NaN.
    p = tl.math.exp2(t - tl.where(row_max == float("-inf"), 0.0, row_max)[:, None])
    row_sum = tl.sum(p, 1)
    if HAS_W:
        p = p * w[None, :]
    acc = mm(p.to(v.dtype), v, PREC, INTERP_DOT)

    empty = row_sum == 0.0
    out = acc * tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, row_sum))[:, None]
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])
    s_ptrs = Stats + off_b * stride_sb + off_h * stride_sh + offs_m * stride_sm
    tl.store(s_ptrs, tl.where(empty, float("inf"), row_max), mask=m_ok)
    tl.store(s_ptrs + 1, tl.where(empty, float("inf"), tl.math.log2(tl.where(empty, 1.0, row_sum))), mask=m_ok)


@triton.jit(do_not_specialize=["H", "Nq", "Nk", "SPLITS"])
def short_bwd_kernel(
    Q, K, V, W, KPM, Out, DO, Stats, DQ, DKM, DVM,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_wb, stride_wn, stride_pb, stride_pn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_sb, stride_sh, stride_sm,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_ab, stride_ah, stride_as, stride_an,  # DKM (B, h, slots, Nk, d) float32, d contiguous
    stride_cb, stride_ch, stride_cs, stride_cn,  # DVM (B, h, slots, Nk, dv) float32, dv contiguous
    H, Nq, Nk, qk_scale, scale, SPLITS,
    HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_W: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KEYS: tl.constexpr, ATOMIC: tl.constexpr,
    PREC: tl.constexpr, INTERP_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    MASK_D: tl.constexpr = BLOCK_D != HEAD_DIM
    MASK_DV: tl.constexpr = BLOCK_DV != HEAD_DV

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < Nk
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DV

    k = load_2d(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                n_ok, d_ok, True, MASK_D)  # (BN, D)
    v = load_2d(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                n_ok, dv_ok, True, MASK_DV)  # (BN, DV)
    w, key_ok = _key_factors(W, KPM, off_b, stride_wb, stride_wn, stride_pb, stride_pn, offs_n, Nk, k,
                             HAS_W, HAS_KPM, BLOCK_N)
    km = (k.to(tl.float32) * w[:, None]).to(k.dtype)  # m * k, rounded as the reference rounds it: dq = scale dS (m k)

    q_base = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    o_base = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    do_base = DO + off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gm + offs_dv[None, :] * stride_gd
    dq_base = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    st_base = Stats + off_b * stride_sb + off_h * stride_sh + offs_m * stride_sm

    dk_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for start in range(pid_s * BLOCK_M, Nq, SPLITS * BLOCK_M):
        m_ok = (start + offs_m) < Nq
        q = load_2d(q_base + start * stride_qm, m_ok, d_ok, True, MASK_D)
        do = load_2d(do_base + start * stride_gm, m_ok, dv_ok, True, MASK_DV)
        o = load_2d(o_base + start * stride_om, m_ok, dv_ok, True, MASK_DV)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        # Rows past Nq get +inf statistics, so their probabilities are exactly 0.
        row_max = tl.load(st_base + start * stride_sm, mask=m_ok, other=float("inf"))
        log2_sum = tl.load(st_base + start * stride_sm + 1, mask=m_ok, other=float("inf"))
        # The per-key vectors are read again per block (from cache): kept from outside the loop, the compiler
        # hoists their broadcasts to full (BM, BN) tiles held in registers through the loop, and spills.
        w, key_ok = _key_factors(W, KPM, off_b, stride_wb, stride_wn, stride_pb, stride_pn, offs_n, Nk, k,
                                 HAS_W, HAS_KPM, BLOCK_N)
        s = mm(q, tl.trans(k), PREC, INTERP_DOT)  # (BM, BN), unscaled
        p = tl.math.exp2((s * (w * qk_scale)[None, :] - row_max[:, None]) - log2_sum[:, None])
        if MASK_KEYS:
            p = tl.where(key_ok[None, :], p, 0.0)
        dp = mm(do, tl.trans(v), PREC, INTERP_DOT)  # <do_i, v_j>
        if HAS_W:
            dp = dp * w[None, :]
        ds = softmax_grad(p, dp, delta[:, None])
        dq = mm(ds.to(k.dtype), km, PREC, INTERP_DOT) * scale
        tl.store(dq_base + start * stride_dqm, dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        dv_acc = dv_acc + mm(tl.trans(p.to(do.dtype)), do, PREC, INTERP_DOT)
        dk_acc = dk_acc + mm(tl.trans(ds.to(q.dtype)), q, PREC, INTERP_DOT)

    slot = 0 if ATOMIC else pid_s
    dk_ptrs = DKM + off_b * stride_ab + off_h * stride_ah + slot * stride_as + offs_n[:, None] * stride_an + offs_d[None, :]
    dv_ptrs = DVM + off_b * stride_cb + off_h * stride_ch + slot * stride_cs + offs_n[:, None] * stride_cn + offs_dv[None, :]
    if ATOMIC:
        tl.atomic_add(dk_ptrs, dk_acc, mask=n_ok[:, None] & d_ok[None, :])
        tl.atomic_add(dv_ptrs, dv_acc, mask=n_ok[:, None] & dv_ok[None, :])
    else:
        tl.store(dk_ptrs, dk_acc, mask=n_ok[:, None] & d_ok[None, :])
        tl.store(dv_ptrs, dv_acc, mask=n_ok[:, None] & dv_ok[None, :])


# --------------------------------------------------------------------------- launchers
def _config(kind: str, block_n: int) -> dict:
    """Block rows and warps per kernel: one fixed config (SSATTN_AUTOTUNE does not apply here).

    Chosen from the sm_90 compile report (benchmarks/compile_report.py --kernels short-fwd,short-bwd):
    the largest blocks that compile without spills in bf16 and fp32 (TF32) at d = 32 and 64, L = 16 and 77.
    The backward holds dK and dV (BLOCK_N x d, float32) through its loop, so its query blocks shrink as
    BLOCK_N grows (at BLOCK_N = 128, 32-row blocks already spill 20-700 B).
    """
    if INTERPRET:  # big enough to be quick, small enough that the CPU tests cover a partial block
        return {"BLOCK_M": 64, "num_warps": 4, "num_stages": 1}
    if kind == "fwd":  # 64-row blocks, 4 warps: ~130 registers, so 2-3 blocks per SM keep loads in flight
        return {"BLOCK_M": 64, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": {16: 64, 32: 64, 64: 32}.get(block_n, 16), "num_warps": 8, "num_stages": 1}


def _check_short(q, k, v, weight, kpm):
    _check(q, k, v, weight, kpm)
    nk = k.shape[2]
    if nk > MAX_KEYS:
        raise ValueError(f"the short-key attention kernels take at most {MAX_KEYS} keys, got k with Nk = {nk} "
                         "(use backend='triton')")


def _meta(q, k, v, weight, kpm, precision):
    w, pad, wstr, pstr, meta, _ = _common(q, k, v, weight, kpm, precision)
    nk = k.shape[2]
    block_n = max(16, triton.next_power_of_2(nk))
    meta.update(BLOCK_N=block_n, MASK_KEYS=kpm is not None or block_n != nk)
    return w, pad, wstr, pstr, meta


def splits_for(batch_heads: int, nq: int, block_m: int) -> int:
    """Backward programs per (batch, head): enough to fill the GPU, at most one per query block."""
    return max(1, min(triton.cdiv(nq, block_m), triton.cdiv(_TARGET_PROGRAMS, batch_heads)))


def forward(q, k, v, weight, key_padding_mask, scale, *, precision="ieee", deterministic=False):
    """(out, stats) for Nk <= MAX_KEYS; deterministic is accepted for the common contract (the forward always is)."""
    _check_short(q, k, v, weight, key_padding_mask)
    B, H, Nq, _ = q.shape
    Nk, dv = k.shape[2], v.shape[-1]
    out = torch.empty_like(q) if q.shape[-1] == dv else torch.empty((B, H, Nq, dv), device=q.device, dtype=q.dtype)
    stats = torch.empty((B, H, Nq, 2), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        stats.fill_(float("inf"))
        return out, stats
    w, pad, wstr, pstr, meta = _meta(q, k, v, weight, key_padding_mask, precision)
    cfg = _config("fwd", meta["BLOCK_N"])
    short_fwd_kernel[(triton.cdiv(Nq, cfg["BLOCK_M"]), B * H)](
        q, k, v, w, pad, out, stats, *q.stride(), *k.stride(), *v.stride(), *wstr, *pstr, *out.stride(),
        *stats.stride()[:3], H, Nq, Nk, float(scale) * LOG2E, **meta, **cfg,
    )
    return out, stats


def backward(grad_out, q, k, v, weight, key_padding_mask, out, stats, scale, weight_grad, *, precision="ieee",
             deterministic=False):
    _check_short(q, k, v, weight, key_padding_mask)
    B, H, Nq, d = q.shape
    Nk, dv = k.shape[2], v.shape[-1]
    scale = float(scale)
    dq, dk, dvv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    weight_grad = bool(weight_grad) and weight is not None
    if dq.numel() == 0 or dk.numel() == 0:
        return zero_gradients(q, k, v, weight, weight_grad)
    w, pad, wstr, pstr, meta = _meta(q, k, v, weight, key_padding_mask, precision)
    cfg = _config("bwd", meta["BLOCK_N"])
    splits = splits_for(B * H, Nq, cfg["BLOCK_M"])
    # The sums over queries in float32: one slot added into by atomics, or one slot per split.
    slots = 1 if not deterministic else splits
    alloc = torch.zeros if not deterministic else torch.empty
    dkm = alloc((B, H, slots, Nk, d), device=q.device, dtype=torch.float32)
    dvm = alloc((B, H, slots, Nk, dv), device=q.device, dtype=torch.float32)
    short_bwd_kernel[(splits, B * H)](
        q, k, v, w, pad, out, grad_out, stats, dq, dkm, dvm,
        *q.stride(), *k.stride(), *v.stride(), *wstr, *pstr, *out.stride(), *grad_out.stride(),
        *stats.stride()[:3], *dq.stride(), *dkm.stride()[:4], *dvm.stride()[:4],
        H, Nq, Nk, scale * LOG2E, scale, splits,
        **meta, ATOMIC=not deterministic, **cfg,
    )
    # Fixed-order sums over the splits (deterministic) and over heads (dweight): no atomics there.
    dkm, dvm = dkm.sum(2), dvm.sum(2)  # (B, h, Nk, d): d(loss)/d(scale m k) / scale, d(loss)/d(m v)
    dkm = dkm * scale
    if weight is not None:
        wr = weight.to(k.dtype).float()[:, None, :, None]  # rounded like the kernels round it
        dk.copy_(dkm * wr)
        dvv.copy_(dvm * wr)
    else:
        dk.copy_(dkm)
        dvv.copy_(dvm)
    if weight_grad:
        dw = ((dkm * k.float()).sum(-1) + (dvm * v.float()).sum(-1)).sum(1).to(weight.dtype)
    else:
        dw = q.new_empty(0)
    return dq, dk, dvv, dw
