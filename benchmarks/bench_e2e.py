"""End-to-end training step of the -SS U-Net: ssattn fused paths vs an SDPA chain vs a naive softmax.

    python benchmarks/bench_e2e.py                      # GPU: 256x256, batch 8, fp32 and bf16 autocast
    python benchmarks/bench_e2e.py --device cpu --size 32 --batch 2 --iters 2   # smoke run

One step = forward (all three decoder stages refined), L1 + alignment loss,
backward, Adam step. Implementations of the attention inside every
SemanticCrossAttention stage (same parameters, same maths):
  ssattn  backend="auto": the fused Triton kernels on a GPU (SPEC 2), and
          the native alignment loss where built
  sdpa    what a user writes: m * k, m * v, permute + contiguous,
          F.scaled_dot_product_attention, permute back
  naive   the paper formula with the (B, h, N, N) score matrix materialised
Reports mean step time (CUDA events / perf_counter) and peak memory; a
variant that runs out of memory is reported as OOM. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ssattn.models import UNet, unet_ss  # noqa: E402
from ssattn.semantic.modules import SemanticCrossAttention  # noqa: E402


class _Chain(SemanticCrossAttention):
    """SemanticCrossAttention with the attention computed by plain PyTorch (mode set per class)."""

    mode = "sdpa"

    def forward(self, dec, enc, guidance):
        B, _, H, W = dec.shape
        He, We = enc.shape[-2:]
        m = F.adaptive_avg_pool2d(guidance, (He, We)).reshape(B, 1, He * We, 1)
        q, k, v = self._heads(self.q_proj(dec)), self._heads(self.k_proj(enc)), self._heads(self.v_proj(enc))
        m = m.to(k.dtype)
        k, v = (k * m).contiguous(), (v * m).contiguous()
        q = q.contiguous()
        scale = self.scale if self.scale is not None else self.head_dim ** -0.5
        if self.mode == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            out = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v
        out = out.transpose(-1, -2).reshape(B, self.heads * self.head_dim, H, W)
        return dec + self.out_proj(out).to(dec.dtype)


class _Sdpa(_Chain):
    mode = "sdpa"


class _Naive(_Chain):
    mode = "naive"


def _build(variant: str, width: int, heads: int, device):
    torch.manual_seed(0)
    if variant == "baseline":
        return UNet(3, 3, width).to(device)
    ss = unet_ss(3, 3, width, heads=heads, backend="auto" if variant == "ssattn" else "reference").to(device)
    with torch.no_grad():  # non-zero output projections, as after some training
        for blk in ss.blocks.values():
            blk.out_proj.weight.normal_(0, 0.02)
            if variant != "ssattn":
                blk.__class__ = {"sdpa": _Sdpa, "naive": _Naive}[variant]
    return ss


def _step_fn(model, opt, x, ref, g, amp):
    ss = hasattr(model, "alignment_loss")

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            y = model(x, guidance=g) if ss else model(x)
            loss = (y.float() - ref).abs().mean()
            if ss:
                loss = loss + model.alignment_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def measure(variant, args, device, amp):
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        model = _build(variant, args.width, args.heads, device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        x = torch.rand(args.batch, 3, args.size, args.size, device=device)
        ref = torch.rand_like(x)
        g = torch.rand(args.batch, 1, args.size, args.size, device=device)
        step = _step_fn(model, opt, x, ref, g, amp)
        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step()
        if cuda:
            end.record()
            torch.cuda.synchronize(device)
            ms = start.elapsed_time(end) / args.iters
            peak = torch.cuda.max_memory_allocated(device) / 2**30
        else:
            ms = 1000 * (time.perf_counter() - t0) / args.iters
            peak = float("nan")
        return f"{ms:.2f}", ("-" if peak != peak else f"{peak:.2f}")
    except torch.OutOfMemoryError:
        return "OOM", "OOM"
    finally:
        if cuda:
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default="baseline,ssattn,sdpa,naive")
    p.add_argument("--dtypes", default="fp32,bf16")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=r"ssattn\..*falling back")
    device = torch.device(args.device)
    print(f"-SS U-Net training step, {args.size}x{args.size}, batch {args.batch}, width {args.width}, heads "
          f"{args.heads}, stages dec3,dec2,dec1 (N up to {args.size ** 2}); torch {torch.__version__}, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}\n")
    print("| implementation | dtype | step ms | peak GiB |")
    print("|---|---|---|---|")
    for dt in args.dtypes.split(","):
        for variant in args.variants.split(","):
            ms, peak = measure(variant, args, device, amp=(dt == "bf16"))
            label = {"baseline": "U-Net baseline (no -SS)", "ssattn": "(a) ssattn backend=auto",
                     "sdpa": "(b) SDPA chain", "naive": "(c) naive materialised softmax"}[variant]
            print(f"| {label} | {dt} | {ms} | {peak} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
