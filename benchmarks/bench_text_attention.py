"""Image-word cross-attention (issue 17): ssattn's short-key path against what a user writes.

Queries from an image feature, Nq = H*W (256x256, 128x128, 64x64), keys and
values from L = 16 or 77 word features, with a padding mask (sentences of
different lengths) and a per-word weight in [0, 1] (SPEC 2's weighted keys:
softmax(scale m_j <q_i, k_j>) m_j v_j). Every implementation starts from the
same tensors: the image projection q (B, h*d, H, W) (NCHW, as a 1x1 conv gives
it), word projections k, v (B, L, h*d) (as a Linear gives them), the weight
(B, L) and the mask (B, L), and ends with the output as (B, h*d, H, W).

  ssattn          ssattn.masked_cross_attention(backend="auto") on head views
                  of those tensors (no copies): on CUDA the short-key kernels
                  ("triton-short", Nk <= 128); on CPU whatever "auto" runs
                  there (reported per row: the reference or "cpu-flash")
  ssattn triton   (CUDA) the general kernels, for comparison
  sdpa-bool       k*m, v*m, permute + contiguous, F.scaled_dot_product_attention
                  with a boolean key mask (which sends it from the flash
                  backend to the memory-efficient one), permute back
  sdpa-float      the same with an additive float mask (0 / -inf)
  flex            (CUDA by default) torch.compile(flex_attention) with a
                  score_mod for the weight and the padding, v*m pre-scaled

Modes: fwd, and fwd+bwd (gradients for q, k, v and the weight). Each result is
checked against sdpa-bool's in the same run (no NaN, max error within 3e-2 of
the peer's largest value in bf16, 1e-2 in fp32) before it is timed. On the GPU
the table also gives the memory roofline: the bytes that must move (fwd: read
Q, K, V, write O; fwd+bwd: that, plus read Q, K, V, O, dO and write dQ, dK, dV)
over the device's copy bandwidth (H100 3.0 TB/s from SPEC.md, H200 4.3 TB/s
from the device notes, or --bandwidth), and each time as a multiple of it.

    python benchmarks/bench_text_attention.py --out $OUT/text_attention.md          # GPU, the full grid
    python benchmarks/bench_text_attention.py --quick --batch 1                     # CPU subset (N = 4096)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import headline_attention as headline  # noqa: E402
import peers_attention as peers  # noqa: E402

SIDES = (256, 128, 64)  # N = 65536, 16384, 4096
QUICK_SIDES = (64,)
WORDS = (16, 77)
HEAD_DIMS = (32, 64)
MODES = ("fwd", "fwd+bwd")
BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}  # device copy, bytes/s (SPEC.md; device notes KINDS.md)


# --------------------------------------------------------------------------- inputs
def make_inputs(B, h, d, side, L, dtype, device, grad):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, h * d, side, side, device=device, generator=g).to(dtype)
    k, v = (torch.randn(B, L, h * d, device=device, generator=g).to(dtype) for _ in range(2))
    m = torch.rand(B, L, device=device, generator=g).to(dtype)
    lengths = [max(1, L - (i * L) // (2 * B)) for i in range(B)]  # sentences of different lengths
    pad = torch.arange(L, device=device)[None, :] >= torch.tensor(lengths, device=device)[:, None]
    for t in (q, k, v, m):
        t.requires_grad_(grad)
    return q, k, v, m, pad


def _q_heads(q, h):  # (B, h*d, H, W) -> (B, h, N, d) view, as the module builds it
    B, C, H, W = q.shape
    return q.view(B, h, C // h, H * W).transpose(-1, -2)


def _kv_heads(x, h):  # (B, L, h*d) -> (B, h, L, d) view
    B, L, C = x.shape
    return x.view(B, L, h, C // h).transpose(1, 2)


def _back(out, shape):  # (B, h, N, d) -> (B, h*d, H, W)
    return out.transpose(-1, -2).reshape(shape)


# --------------------------------------------------------------------------- implementations
def ssattn_impl(backend):
    import ssattn

    def run(q, k, v, m, pad, h):
        out = ssattn.masked_cross_attention(_q_heads(q, h), _kv_heads(k, h), _kv_heads(v, h), m, pad, backend=backend)
        return _back(out, q.shape)

    return run


def cpu_auto_path(q, k, h) -> str:
    """What backend="auto" runs on CPU for these inputs (as ssattn.functional._attention decides it)."""
    from ssattn.ops import attention as attn_ops
    from ssattn.ops import attention_cpu

    qh, kh = _q_heads(q, h), _kv_heads(k, h)
    chosen = attn_ops.choose("auto", "cpu", q.dtype, kh.shape[-2])
    return chosen if chosen != attention_cpu.BACKEND or attention_cpu.worth_it(qh, kh) else "reference"


def sdpa_impl(mask_kind):
    def run(q, k, v, m, pad, h):
        w = m[:, :, None]
        qh = _q_heads(q, h).contiguous()
        kh, vh = (_kv_heads(t * w, h).contiguous() for t in (k, v))
        keep = ~pad[:, None, None, :]
        mask = keep if mask_kind == "bool" else torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~keep, float("-inf"))
        return _back(F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask), q.shape)

    return run


_FLEX = {}


def flex_impl(compiled):
    from torch.nn.attention.flex_attention import flex_attention

    if compiled and "fn" not in _FLEX:
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    fa = _FLEX["fn"] if compiled else flex_attention

    def run(q, k, v, m, pad, h):
        qh = _q_heads(q, h).contiguous()
        kh = _kv_heads(k, h).contiguous()
        vh = _kv_heads(v * m[:, :, None], h).contiguous()

        def score_mod(score, b, hh, qi, kv):  # scale <q, m k> = m * (scale <q, k>); padded words -inf
            return torch.where(pad[b, kv], float("-inf"), score * m[b, kv])

        return _back(fa(qh, kh, vh, score_mod=score_mod), q.shape)

    return run


# --------------------------------------------------------------------------- roofline
def bandwidth(device, override=None):
    if override:
        return float(override)
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in BANDWIDTH.items() if key in name), None)


def roofline_bytes(B, h, d, N, L, dtype, mode):
    """Bytes that must move: the (B, h, N, d) tensors dominate; K, V and their gradients are counted too."""
    e = torch.empty(0, dtype=dtype).element_size()
    big, small = B * h * N * d * e, B * h * L * d * e
    if mode == "fwd":
        return 2 * big + 2 * small  # read Q, write O (+ K, V)
    return 2 * big + 2 * small + 4 * big + 4 * small  # + read Q, O, dO, write dQ (+ K, V, dK, dV)


# --------------------------------------------------------------------------- measurement
def measure(case, dtype_label, mode, device, quick, peer_kinds, general=True, log=print):
    B, h, d, side, L = case
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_label]
    grad = mode == "fwd+bwd"
    q, k, v, m, pad = make_inputs(B, h, d, side, L, dtype, device, grad)
    go = torch.randn_like(q) if grad else None
    inputs = (q, k, v, m, pad, h)
    impls = [("sdpa-bool", sdpa_impl("bool")), ("sdpa-float", sdpa_impl("float"))]
    if "flex" in peer_kinds:
        impls.append(("flex", flex_impl(compiled=device == "cuda")))
    if device == "cuda":
        impls += [("ssattn", ssattn_impl("auto"))] + ([("ssattn triton", ssattn_impl("triton"))] if general else [])
    else:
        impls.append((f"ssattn ({cpu_auto_path(q, k, h)})", ssattn_impl("auto")))
    rows, reference = [], None
    matmul = "high" if (dtype == torch.float32 and device == "cuda") else "highest"  # TF32 on both sides on CUDA
    with peers.fp32_matmul(matmul), torch.no_grad() if not grad else contextlib.nullcontext():
        for name, fn in impls:
            step = headline._step_fn(lambda *a, fn=fn: fn(*a), inputs, grad, go)
            try:
                res = step()
            except (RuntimeError, NotImplementedError, ValueError, AssertionError) as exc:
                rows.append((name, None, f"n/a: {str(exc).splitlines()[0][:60] if str(exc) else type(exc).__name__}"))
                continue
            res = (res[0], res[1][:4])  # out and the grads of q, k, v, m
            if reference is None:
                reference = res
            ok, worst = headline._results_agree(res, reference, dtype_label)
            if not ok:
                rows.append((name, None, f"CHECK FAILED ({worst:.1e})"))
                continue
            ms = peers._bench_ms(step, device, quick)
            rows.append((name, ms, f"check {worst:.1e}"))
            log(f"N={side * side:>6} L={L:>3} d={d:>2} {dtype_label} {mode:>7} {name:>22}: {ms:9.3f} ms")
    return rows


def run(cases, dtypes, modes, device, quick, peer_kinds, bw, general=True, log=print, progress=None):
    """Every row group; progress(table) after each (the script rewrites --out then, so a run cut short
    still leaves its table)."""
    table = []  # (case, dtype, mode, roofline ms or None, rows)
    for case in cases:
        B, h, d, side, L = case
        for dt in dtypes:
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dt]
            for mode in modes:
                roof = roofline_bytes(B, h, d, side * side, L, dtype, mode) / bw * 1e3 if bw else None
                table.append((case, dt, mode, roof, measure(case, dt, mode, device, quick, peer_kinds, general, log)))
                if progress is not None:
                    progress(table)
    return table


def to_markdown(table, header):
    lines = list(header) + ["", "| N | L | d | dtype | mode | impl | ms | x best peer | x roofline | note |",
                            "|---|---|---|---|---|---|---|---|---|---|"]
    for (B, h, d, side, L), dt, mode, roof, rows in table:
        peer_ms = [ms for name, ms, _ in rows if ms is not None and not name.startswith("ssattn")]
        best = min(peer_ms) if peer_ms else None
        for name, ms, note in rows:
            if ms is None:
                lines.append(f"| {side * side} | {L} | {d} | {dt} | {mode} | {name} | n/a | | | {note} |")
                continue
            ratio = f"{ms / best:.2f}" if best else ""
            rl = f"{ms / roof:.1f} ({roof:.3f} ms)" if roof else ""
            lines.append(f"| {side * side} | {L} | {d} | {dt} | {mode} | {name} | {ms:.3f} | {ratio} | {rl} | {note} |")
    return "\n".join(lines) + "\n"


def environment(device, args, bw):
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip() if device == "cpu" else ""
    dev = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} torch thread(s)"
    lines = [f"# Image-word cross-attention ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"device: {dev}; torch {torch.__version__}; python {sys.version.split()[0]}; B={args.batch}, "
             f"h={args.heads}; weight and padding mask on every case"]
    if bw:
        lines.append(f"roofline bandwidth: {bw / 1e12:.1f} TB/s")
    if load:
        lines.append(f"load: {load}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the markdown table to this path")
    p.add_argument("--quick", action="store_true", help="N = 4096 only, fewer repetitions (the CPU run)")
    p.add_argument("--sides", default=None, help="comma-separated image sides (default 256,128,64; quick: 64)")
    p.add_argument("--words", default="16,77", help="comma-separated L")
    p.add_argument("--head-dims", default="32,64")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--peers", default=None, help="sdpa and/or flex (default: sdpa,flex on CUDA, sdpa on CPU)")
    p.add_argument("--bandwidth", type=float, default=None, help="bytes/s for the roofline (default: by device)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--no-general", action="store_true", help="(CUDA) leave out the general kernels' row")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    sides = [int(s) for s in (args.sides or ",".join(map(str, QUICK_SIDES if args.quick else SIDES))).split(",")]
    cases = [(args.batch, args.heads, d, side, L) for side in sides for L in (int(x) for x in args.words.split(","))
             for d in (int(x) for x in args.head_dims.split(","))]
    dtypes = [x for x in args.dtypes.split(",") if x]
    modes = [x for x in args.modes.split(",") if x]
    peer_kinds = tuple((args.peers or ("sdpa,flex" if device == "cuda" else "sdpa")).split(","))
    bad = [m for m in modes if m not in MODES] + [x for x in dtypes if x not in ("bf16", "fp32")]
    if bad:
        raise SystemExit(f"bench_text_attention: unknown --modes/--dtypes value(s) {bad}")
    bw = bandwidth(device, args.bandwidth)
    from ssattn import _checks

    old_checks = _checks._VALUE_CHECKS
    _checks.set_value_checks(False)  # the weight's [0, 1] check syncs with the host; the peers check nothing
    header = environment(device, args, bw)

    def write(table):
        if args.out:
            with open(args.out, "w") as f:
                f.write(to_markdown(table, header))

    try:
        table = run(cases, dtypes, modes, device, args.quick, peer_kinds, bw, not args.no_general, progress=write)
    finally:
        _checks.set_value_checks(old_checks)
    write(table)
    print(to_markdown(table, header))
    return table


if __name__ == "__main__":
    main()
