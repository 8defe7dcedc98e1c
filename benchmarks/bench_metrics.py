"""Throughput of ssattn.metrics on CPU: images per second at 256x256 (UIQM, UCIQE, PSNR + SSIM, LPIPS).

UIQM and UCIQE are timed by the papers' definitions and under the public code's conventions (convention=).

    python benchmarks/bench_metrics.py [--size 256] [--batch 16] [--threads 1] [--out metrics.md]

Images are synthetic underwater scenes (ssattn.apps.data.scenes, the degraded inputs and their references),
scored in batches; each figure is the best of 3 timed runs after one warm-up. LPIPS uses the lpips package's
AlexNet on a randomly initialised backbone (the same arithmetic as with the ImageNet weights; nothing is
downloaded); it is skipped when lpips is not installed.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings

import torch

from ssattn import metrics


def best_rate(fn, n_images, repeats=3) -> float:
    """Images per second of fn() (which processes n_images), from the best of `repeats` timed calls after a warm-up
    (bench_routing uses it too)."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_images / best


def _random_lpips(folder):
    try:
        import lpips
    except ImportError:
        return None
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    path = os.path.join(folder, "alex-random.pth")
    torch.save({f"features.{k.split('.', 1)[1]}": v for k, v in net.net.state_dict().items()}, path)
    return metrics.LPIPS("alex", path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ssattn.apps.data.scenes import UnderwaterScenes

    degraded, clean, _ = UnderwaterScenes(size=args.size, n=args.batch, seed=0, split="test").tensors()
    x, y = degraded.float().contiguous(), clean.float().contiguous()
    n = x.shape[0]
    rows = [("UIQM (with its three terms)", lambda: metrics.uiqm_terms(x)),
            ("UCIQE (with its three terms)", lambda: metrics.uciqe_terms(x)),
            ("UIQM + UCIQE", lambda: (metrics.uiqm_terms(x), metrics.uciqe_terms(x))),
            ("UIQM, convention funiegan", lambda: metrics.uiqm_terms(x, "funiegan")),
            ("UCIQE, convention authors", lambda: metrics.uciqe_terms(x, "authors")),
            ("PSNR + SSIM (float64)", lambda: (metrics.psnr(x.double(), y.double()),
                                               metrics.ssim(x.double(), y.double())))]
    with tempfile.TemporaryDirectory() as tmp:
        model = _random_lpips(tmp)
        if model is not None:
            rows.append(("LPIPS (AlexNet)", lambda: model(x, y)))
        lines = [f"torch {torch.__version__}, {platform.machine()}, {platform.processor() or 'cpu'}, "
                 f"{args.threads} thread(s), batch {n} of {args.size}x{args.size}, best of 3", "",
                 "| metric | images/s | ms per image |", "|---|---|---|"]
        for name, fn in rows:
            rate = best_rate(fn, n)
            lines.append(f"| {name} | {rate:.1f} | {1000 / rate:.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
