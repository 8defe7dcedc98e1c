"""Mask-weighted cross-attention (SPEC 2): ssattn's Triton kernels against what a user would write.

Peers, all producing the same NCHW output (B, C, H, W) from the same NCHW
projections q, k, v (B, C, H, W) and the stage's map m (B, 1, H, W):

  sdpa-<backend>  mask multiply (k*m, v*m), reshape + permute + contiguous to
                  (B, h, N, d), F.scaled_dot_product_attention restricted to
                  one backend (flash, efficient, cudnn, math), permute back.
  flex            the same layout chain, v*m, and torch.compile(flex_attention)
                  with score_mod = score * m[b, kv] (the key weight on scores).
  ssattn          ssattn.masked_cross_attention on the NCHW views (no copies
                  of q, k, v; the weight is applied inside the kernel), output
                  transposed back to NCHW as SemanticCrossAttention does;
                  value checks off (ssattn.set_value_checks(False)).

Modes: fwd, and fwd+bwd (gradients w.r.t. q, k, v and m). dtypes: bf16, and
fp32 with ssattn precisions ieee / tf32 / tf32x3 (peers run fp32 with TF32
off, and the math backend once more with TF32 on as the tf32 peer).
Columns: ms (triton.testing.do_bench median on the GPU), TFLOP/s with the
flash-attention convention (fwd 4*B*h*Nq*Nk*d flops, fwd+bwd 3.5x that),
ratio = ms / best peer's ms in the same row group (< 1: ssattn is faster),
and the peak extra memory of one call.

    python benchmarks/peers_attention.py --out $OUT/peers_attention.md
    TRITON_INTERPRET=1 python benchmarks/peers_attention.py --quick   # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# B=4, d=32 decoder stages of SPEC's peer table, plus one d=64 case.
CASES = [  # name, B, C, H, W, heads
    ("C32@256x256 h1", 4, 32, 256, 256, 1),
    ("C64@128x128 h2", 4, 64, 128, 128, 2),
    ("C128@64x64 h4", 4, 128, 64, 64, 4),
    ("C256@32x32 h8", 4, 256, 32, 32, 8),
    ("C64@128x128 h1 d64", 4, 64, 128, 128, 1),
]
QUICK_CASES = [("C32@8x8 h1 (quick)", 1, 32, 8, 8, 1)]
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
MODES = ("fwd", "fwd+bwd")


# --------------------------------------------------------------------------- inputs and chains
def make_inputs(B, C, H, W, dtype, device, requires_grad):
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, C, H, W, device=device, generator=g).to(dtype) for _ in range(3))
    m = torch.rand(B, 1, H, W, device=device, generator=g).to(dtype)
    for t in (q, k, v, m):
        t.requires_grad_(requires_grad)
    return q, k, v, m


def _heads(x, h):
    """(B, C, H, W) -> (B, h, N, d) view, as SemanticCrossAttention builds it."""
    B, C, H, W = x.shape
    return x.view(B, h, C // h, H * W).transpose(-1, -2)


def _back(out, shape):
    B, C, H, W = shape
    return out.transpose(-1, -2).reshape(B, C, H, W)


def sdpa_chain(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]

    def run(q, k, v, m, h):
        with sdpa_kernel([which]):
            qh, kh, vh = (_heads(t, h).contiguous() for t in (q, k * m, v * m))
            return _back(F.scaled_dot_product_attention(qh, kh, vh), q.shape)

    return run


_FLEX = {}


def flex_chain(compiled=True):
    from torch.nn.attention.flex_attention import flex_attention

    if compiled and "fn" not in _FLEX:
        # One compiled graph per shape, dtype and mode: raise the recompile limit so no case silently
        # falls back to the eager flex_attention (which materialises the scores).
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    fa = _FLEX["fn"] if compiled else flex_attention

    def run(q, k, v, m, h):
        B = q.shape[0]
        w = m.reshape(B, -1)
        qh, kh, vh = (_heads(t, h).contiguous() for t in (q, k, v * m))

        def score_mod(score, b, hh, qi, kv):
            return score * w[b, kv]  # scale * <q, m k> = m * (scale * <q, k>)

        return _back(fa(qh, kh, vh, score_mod=score_mod), q.shape)

    return run


def ssattn_chain(options):
    import ssattn

    ssattn.set_value_checks(False)  # the map's [0, 1] check syncs with the host; peers validate nothing either

    def run(q, k, v, m, h):
        B = q.shape[0]
        qh, kh, vh = (_heads(t, h) for t in (q, k, v))
        w = m.reshape(B, -1)
        d = qh.shape[-1]
        if options is None:
            out = ssattn.masked_cross_attention(qh, kh, vh, w, backend="triton")
        else:  # an explicit float32 precision: the op with it (what the functional does for float32)
            out = torch.ops.ssattn.masked_attention_fwd(qh, kh, vh, w, None, d ** -0.5, "triton", options, False)[0]
        return _back(out, q.shape)

    return run


@contextlib.contextmanager
def fp32_matmul(precision):
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


# --------------------------------------------------------------------------- timing
def _bench_ms(fn, device, quick):
    if device == "cuda" and not quick:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()  # warm-up (compiles)
    times = []
    for _ in range(1 if quick else 5):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_extra_mb(fn, device):
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(chain, case, dtype, mode, device, quick, precision="highest"):
    """(ms, peak extra MB) of one chain on one case, or None when the chain cannot run it."""
    _, B, C, H, W, h = case
    grad = mode == "fwd+bwd"
    q, k, v, m = make_inputs(B, C, H, W, dtype, device, grad)
    go = torch.randn(B, C, H, W, device=device, dtype=dtype) if grad else None

    def step():
        out = chain(q, k, v, m, h)
        if grad:
            torch.autograd.grad(out, (q, k, v, m), go)
        return out

    try:
        with fp32_matmul(precision), torch.no_grad() if not grad else contextlib.nullcontext():
            step()  # raises here if the backend rejects the case
            ms = _bench_ms(step, device, quick)
            mb = _peak_extra_mb(step, device)
    except (RuntimeError, NotImplementedError, ValueError, AssertionError) as exc:
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
    return (ms, mb), None


def flops(case, mode):
    _, B, C, H, W, h = case
    n, d = H * W, C // h
    f = 4.0 * B * h * n * n * d
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


# --------------------------------------------------------------------------- table
def run_all(cases, device, quick, dtypes, log=print, peer_kinds=("sdpa", "flex"), modes=MODES, progress=None):
    """Measure every chain; progress(rows) is called after each row group (the script rewrites --out then)."""
    rows = []  # (case, dtype label, mode, impl, ms, tflops, ratio, mb, note)
    for case in cases:
        for dtype_label in dtypes:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_label]
            for mode in modes:
                peers = []
                if "sdpa" in peer_kinds:
                    backends = SDPA_BACKENDS if device == "cuda" else ("math",)
                    for b in backends:
                        peers.append((f"sdpa-{b}", sdpa_chain(b), "highest"))
                    if dtype == torch.float32:
                        peers.append(("sdpa-math tf32", sdpa_chain("math"), "high"))
                if "flex" in peer_kinds:
                    peers.append(("flex", flex_chain(compiled=device == "cuda" and not quick), "highest"))
                precisions = ("ieee",) if (quick and device != "cuda") else ("ieee", "tf32", "tf32x3")
                ours = [("ssattn", ssattn_chain(None), "highest")] if dtype != torch.float32 else [
                    (f"ssattn {p}", ssattn_chain(p), "highest") for p in precisions
                ]
                group = []
                for name, chain, prec in peers + ours:
                    res, note = measure(chain, case, dtype, mode, device, quick, prec)
                    group.append((name, res, note))
                    log(f"{case[0]:>20} {dtype_label:>4} {mode:>7} {name:>16}: "
                        + (f"{res[0]:9.3f} ms" if res else f"n/a ({note})"))
                peer_ms = [r[0] for n, r, _ in group if r and not n.startswith("ssattn")]
                best = min(peer_ms) if peer_ms else float("nan")
                for name, res, note in group:
                    if res is None:
                        rows.append((case[0], dtype_label, mode, name, None, None, None, None, note))
                        continue
                    ms, mb = res
                    rows.append((case[0], dtype_label, mode, name, ms, flops(case, mode) / (ms * 1e-3) / 1e12,
                                 ms / best if best == best else float("nan"), mb, ""))
                if progress is not None:
                    progress(rows)
    return rows


def to_markdown(rows, header_lines):
    lines = list(header_lines) + [
        "",
        "| case | dtype | mode | impl | ms | TFLOP/s | ratio to best peer | peak extra MB | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, dt, mode, impl, ms, tf, ratio, mb, note in rows:
        if ms is None:
            lines.append(f"| {case} | {dt} | {mode} | {impl} | n/a | | | | {note} |")
        else:
            mb_s = "" if math.isnan(mb) else f"{mb:.1f}"
            lines.append(f"| {case} | {dt} | {mode} | {impl} | {ms:.3f} | {tf:.1f} | {ratio:.2f} | {mb_s} | |")
    return "\n".join(lines) + "\n"


def environment_lines(device):
    import triton

    dev = torch.cuda.get_device_name() if device == "cuda" else "CPU (TRITON_INTERPRET=1)"
    return [
        f"# Peers: mask-weighted cross-attention ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"device: {dev}; torch {torch.__version__}; triton {triton.__version__}; python {sys.version.split()[0]}",
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the markdown table to this path")
    p.add_argument("--quick", action="store_true", help="one tiny case, one repetition (CPU smoke test)")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp16, fp32")
    p.add_argument("--cases", default=None, help="comma-separated case indices (default: all)")
    p.add_argument("--peers", default="sdpa,flex",
                   help="comma-separated peer kinds: sdpa, flex (flex compiles per shape, ~1 min each on the GPU)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated: fwd, fwd+bwd")
    p.add_argument("--autotune", action="store_true",
                   help="autotune the ssattn kernels (default: one calibrated config per shape, SSATTN_AUTOTUNE=0; "
                        "autotuning compiles every config, minutes per dtype and head dim)")
    args = p.parse_args(argv)
    from ssattn import _checks

    old_env, old_checks = os.environ.get("SSATTN_AUTOTUNE"), _checks._VALUE_CHECKS
    os.environ["SSATTN_AUTOTUNE"] = "1" if args.autotune else "0"
    try:
        return _run(args)
    finally:  # leave the process as it was (the smoke test runs this in the pytest process)
        _checks.set_value_checks(old_checks)
        if old_env is None:
            os.environ.pop("SSATTN_AUTOTUNE", None)
        else:
            os.environ["SSATTN_AUTOTUNE"] = old_env


def _run(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("peers_attention: without a GPU, run with TRITON_INTERPRET=1 (and --quick)")
    cases = QUICK_CASES if args.quick else CASES
    if args.cases:
        cases = [cases[int(i)] for i in args.cases.split(",")]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if device == "cpu":
        dtypes = [d for d in dtypes if d != "bf16"] or ["fp32"]  # interpreter: keep the smoke run to fp32
    peer_kinds = tuple(x.strip() for x in args.peers.split(",") if x.strip())
    modes = tuple(x.strip() for x in args.modes.split(",") if x.strip())
    bad = [m for m in modes if m not in MODES] + [k for k in peer_kinds if k not in ("sdpa", "flex")]
    if bad:
        raise SystemExit(f"peers_attention: unknown --modes/--peers value(s) {bad}")
    header = environment_lines(device) + [
        f"ssattn configs: {'autotuned' if args.autotune else 'one calibrated config per shape (SSATTN_AUTOTUNE=0)'}"
    ]

    def write(rows):  # rewritten after every row group, so a run cut short still leaves its table
        if args.out:
            with open(args.out, "w") as f:
                f.write(to_markdown(rows, header))

    rows = run_all(cases, device, args.quick, dtypes, peer_kinds=peer_kinds, modes=modes, progress=write)
    write(rows)
    print(to_markdown(rows, header))
    return rows


if __name__ == "__main__":
    main()
