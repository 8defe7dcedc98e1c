"""The headline attention benchmark of issue 12: SPEC's four decoder stages, bf16 and fp32 (TF32).

Per stage (B=4, d=32, NCHW projections and the stage's map, as in
peers_attention.py), forward and forward+backward, timed against:

  chain  what a user writes: mask multiply, permute + contiguous, SDPA, permute
         back (peers_attention.sdpa_chain), best SDPA backend;
  core   SDPA's kernel alone on pre-weighted contiguous (B, h, N, d) inputs
         prepared outside the timed region (so layout savings and kernel
         quality are told apart), best backend;
  ssattn ssattn.masked_cross_attention on the NCHW views, single-pass backward
         (default) and two-pass (deterministic=True).

Before any time is taken, each implementation's output and gradients (q, k, v
and the map) are checked against a peer's in the same run: no NaN, and a max
error within TOL of the peer's largest value (a sanity check of the benchmarked
path; the accuracy rule is the GPU tests' job). A failed check is reported and
not timed. Targets (SPEC, issue 12): bf16 sum of fwd+bwd over the four stages
<= 0.7x the chain's; forward at N=65536 <= 6 ms; fp32 tf32 <= 0.2x the fp32 peer.

    python benchmarks/headline_attention.py --out $OUT/headline.md
    TRITON_INTERPRET=1 python benchmarks/headline_attention.py --quick   # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers_attention as peers  # noqa: E402

STAGES = peers.CASES[:4]  # the four SPEC stages, d=32
QUICK_STAGES = peers.QUICK_CASES
TOL = {"bf16": 3e-2, "fp32": 1e-2}  # relative to the peer's max |value|; tf32 dots on both sides
SDPA_FP32_MATH_MAX_N = 16384  # the math backend materialises B*h*N*N scores


def _core_inputs(q, k, v, m, h):
    """Pre-weighted contiguous (B, h, N, d) leaves, built outside the timed region."""
    with torch.no_grad():
        qh, kh, vh = (peers._heads(t, h).contiguous() for t in (q, k * m, v * m))
    return [t.detach().requires_grad_(q.requires_grad) for t in (qh, kh, vh)]


def sdpa_core(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]

    def run(qh, kh, vh):
        with sdpa_kernel([which]):
            return F.scaled_dot_product_attention(qh, kh, vh)

    return run


def ssattn_run(deterministic, precision):
    import ssattn

    ssattn.set_value_checks(False)

    def run(q, k, v, m, h):
        B = q.shape[0]
        qh, kh, vh = (peers._heads(t, h) for t in (q, k, v))
        d = qh.shape[-1]
        out = torch.ops.ssattn.masked_attention_fwd(qh, kh, vh, m.reshape(B, -1), None, d ** -0.5, "triton",
                                                    precision, deterministic)[0]
        return peers._back(out, q.shape)

    return run


def _step_fn(fn, inputs, grad, go):
    def step():
        out = fn(*inputs)
        if grad:
            return out, torch.autograd.grad(out, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad], go)
        return out, ()
    return step


def _results_agree(mine, ref, dtype_label):
    """(ok, worst relative error) of an (out, grads) pair against a peer's."""
    worst = 0.0
    for a, b in zip([mine[0], *mine[1]], [ref[0], *ref[1]]):
        if not torch.isfinite(a).all():
            return False, float("nan")
        scale = b.detach().abs().max().item() or 1.0
        worst = max(worst, (a.detach().float() - b.detach().float()).abs().max().item() / scale)
    return worst <= TOL[dtype_label], worst


def measure_stage(case, dtype_label, mode, device, quick, log=print):
    """Rows (impl, ms or None, note) for one stage, dtype and mode; checks come before every timing."""
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_label]
    grad = mode == "fwd+bwd"
    q, k, v, m = peers.make_inputs(*case[1:5], dtype, device, grad)
    h = case[5]
    B, C, H, W = q.shape
    go = torch.randn(B, C, H, W, device=device, dtype=dtype) if grad else None
    core_in = _core_inputs(q, k, v, m, h)
    go_core = peers._heads(go, h).contiguous() if grad else None
    precision = "tf32" if dtype == torch.float32 else "ieee"
    matmul = "high" if dtype == torch.float32 else "highest"  # TF32 for the fp32 peers, as for ours
    backends = ("flash", "efficient", "cudnn") if device == "cuda" else ("math",)
    if device == "cuda" and dtype == torch.float32:
        backends = ("efficient",) + (("math",) if H * W <= SDPA_FP32_MATH_MAX_N else ())
    impls = [(f"chain sdpa-{b}", _step_fn(peers.sdpa_chain(b), (q, k, v, m, h), grad, go), "chain") for b in backends]
    impls += [(f"core sdpa-{b}", _step_fn(sdpa_core(b), core_in, grad, go_core), "core") for b in backends]
    impls += [("ssattn single-pass", _step_fn(ssattn_run(False, precision), (q, k, v, m, h), grad, go), "ssattn"),
              ("ssattn two-pass", _step_fn(ssattn_run(True, precision), (q, k, v, m, h), grad, go), "ssattn")]
    rows, reference = [], None
    ctx = torch.no_grad() if not grad else contextlib.nullcontext()
    with peers.fp32_matmul(matmul), ctx:
        for name, step, kind in impls:
            try:
                res = step()
            except (RuntimeError, NotImplementedError, ValueError) as exc:
                rows.append((name, kind, None, f"n/a: {str(exc).splitlines()[0][:60] if str(exc) else type(exc).__name__}"))
                continue
            if kind == "core":  # compare in the chain's NCHW terms: out only (its grads are w.r.t. other leaves)
                res = (peers._back(res[0], q.shape), ())
            if reference is None and kind == "chain":
                reference = res
            if reference is not None:
                ok, worst = _results_agree(res, reference if kind != "core" else (reference[0], ()), dtype_label)
            else:
                ok, worst = bool(torch.isfinite(res[0]).all()), 0.0
            note = f"check {worst:.1e}"
            if not ok:
                rows.append((name, kind, None, f"CHECK FAILED ({worst:.1e} > {TOL[dtype_label]:g})"))
                continue
            ms = peers._bench_ms(step, device, quick)
            rows.append((name, kind, ms, note))
            log(f"{case[0]:>18} {dtype_label} {mode:>7} {name:>20}: {ms:9.3f} ms ({note})")
    return rows


def _best(rows, kind):
    timed = [(ms, name) for name, k, ms, _ in rows if k == kind and ms is not None]
    return min(timed) if timed else (None, "")


def run(stages, device, quick, dtypes, modes, log=print):
    table = []  # (stage, dtype, mode, rows)
    for case in stages:
        for dt in dtypes:
            for mode in modes:
                table.append((case[0], dt, mode, measure_stage(case, dt, mode, device, quick, log)))
    return table


def to_markdown(table, header):
    lines = list(header) + ["", "| stage | dtype | mode | ssattn single-pass ms | ssattn two-pass ms | best chain ms "
                            "| best core ms | ratio to chain | ratio to core | checks |",
                            "|---|---|---|---|---|---|---|---|---|---|"]
    sums = {}
    for stage, dt, mode, rows in table:
        ours = {name: ms for name, k, ms, _ in rows if k == "ssattn"}
        single, two = ours.get("ssattn single-pass"), ours.get("ssattn two-pass")
        best_ours = min([x for x in (single, two) if x is not None], default=None)
        chain, chain_name = _best(rows, "chain")
        core, core_name = _best(rows, "core")
        fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        ratio = lambda a, b: "" if a is None or b is None else f"{a / b:.2f}"  # noqa: E731
        failed = [f"{name}: {note}" for name, _, ms, note in rows if ms is None]
        lines.append(f"| {stage} | {dt} | {mode} | {fmt(single)} | {fmt(two)} | {fmt(chain)} {chain_name[6:]} | "
                     f"{fmt(core)} {core_name[5:]} | {ratio(best_ours, chain)} | {ratio(best_ours, core)} | "
                     f"{'; '.join(failed) or 'ok'} |")
        key = (dt, mode)
        s = sums.setdefault(key, [0.0, 0.0, True])
        if best_ours is None or chain is None:
            s[2] = False
        else:
            s[0] += best_ours
            s[1] += chain
    lines.append("")
    for (dt, mode), (ours, chain, complete) in sums.items():
        if complete and chain:
            lines.append(f"- {dt} {mode}, sum over the stages: ssattn {ours:.3f} ms vs chain {chain:.3f} ms = "
                         f"{ours / chain:.2f}x")
    lines.append("- targets: bf16 fwd+bwd sum <= 0.7x the chain's; fwd at N=65536 <= 6 ms; fp32 tf32 <= 0.2x the fp32 peer")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the markdown table to this path")
    p.add_argument("--quick", action="store_true", help="one tiny stage, one repetition (CPU smoke run)")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp32 (fp32 runs TF32 dots)")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("headline_attention: without a GPU, run with TRITON_INTERPRET=1 (and --quick)")
    dtypes = [d for d in args.dtypes.split(",") if d]
    if device == "cpu":  # the interpreter's bf16 is slow and partly emulated: keep the smoke run to fp32
        dtypes = [d for d in dtypes if d != "bf16"] or ["fp32"]
    modes = [m for m in args.modes.split(",") if m]
    import triton

    header = [f"# Headline: mask-weighted attention, SPEC stages ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
              "", f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU (interpreter)'}; "
              f"torch {torch.__version__}; triton {triton.__version__}; ssattn heuristic configs"]
    from ssattn import _checks

    old_checks = _checks._VALUE_CHECKS  # ssattn_run turns the value checks off (peers check nothing)
    try:
        table = run(QUICK_STAGES if args.quick else STAGES, device, args.quick, dtypes, modes)
    finally:  # leave the process as it was (the CPU test runs this in the pytest process)
        _checks.set_value_checks(old_checks)
    text = to_markdown(table, header)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return table


if __name__ == "__main__":
    main()
