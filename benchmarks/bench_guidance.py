"""Throughput of the guidance precompute with a BLIP-base-sized aligner (random weights).

Reports images/s of `precompute` (decode in DataLoader workers, hash, cache
lookup, preprocessing, model forwards, similarity + normalisation through
ssattn.guidance_pyramid, cache writes) at batch 32 on 384x384 JPEGs, and the
share of wall time spent outside the model forwards (measured separately on
the same batches: vision tower + ITC head and the text encoder). Target:
under 20%. Also renders the maps of one batch at 384x384 from the cache.

    python benchmarks/bench_guidance.py --images 512 --workers 8     # on a GPU machine
    python benchmarks/bench_guidance.py --tiny --images 16 --device cpu   # smoke test on CPU
    pytest benchmarks/bench_guidance.py -m gpu                         # the same, GPU-marked

No timing is asserted; numbers are printed (JSON on the last line).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch


def _write_jpegs(folder: Path, n: int, size: int = 384) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    for i in range(n):
        img = Image.fromarray(np.roll(base, i, axis=1)).resize((size, size), Image.BICUBIC)
        img.save(folder / f"{i:05d}.jpg", quality=90)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run(images: int = 512, batch: int = 32, workers: int = 8, device=None, tiny: bool = False,
        dtype: str = "float16", prompts=("fish", "diver", "coral", "robot")) -> dict:
    from ssattn.guidance import testing
    from ssattn.guidance.blip import BlipAligner
    from ssattn.guidance.cache import GuidanceCache
    from ssattn.guidance.precompute import precompute

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tdtype = getattr(torch, dtype) if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = testing.blip_config() if tiny else testing.blip_base_config()
        testing.save_blip(tmp / "blip", cfg)
        _write_jpegs(tmp / "imgs", images)
        aligner = BlipAligner(str(tmp / "blip"), prompts=list(prompts), device=device, dtype=tdtype)
        nparams = sum(p.numel() for p in aligner.model.parameters())

        # warm-up (kernels, allocator, cuDNN/cuBLAS heuristics) on one batch, not cached
        warm = torch.rand(batch, 3, *aligner.input_size)
        aligner.grids(preprocessed=warm)
        _sync(device)

        t0 = time.perf_counter()
        stats = precompute(tmp / "imgs", tmp / "cache", aligner, batch_size=batch, workers=workers, progress=False)
        _sync(device)
        wall = time.perf_counter() - t0

        # the model forwards alone, same number of batches, inputs already on the device
        x = torch.rand(batch, 3, *aligner.input_size, device=device)
        nb = -(-images // batch)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(nb):
            aligner.image_features(x)
            aligner.text_features(sorted(prompts))
        _sync(device)
        forward = time.perf_counter() - t0

        cache = GuidanceCache(tmp / "cache", aligner.settings)
        from ssattn.images import file_sha256, list_images

        files = list_images(tmp / "imgs")[:batch]
        t0 = time.perf_counter()
        for f in files:
            e = cache.get(file_sha256(f))
            e.render([(384, 384), (192, 192), (96, 96), (48, 48)])
        _sync(device)
        render = time.perf_counter() - t0

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "model_params": nparams, "dtype": str(tdtype), "images": images,
        "batch": batch, "workers": workers, "computed": stats.computed,
        "images_per_s": images / wall, "forward_only_images_per_s": images / forward,
        "share_outside_forwards": max(0.0, 1.0 - forward / wall),
        "main_process_seconds": stats.seconds, "render_ms_per_image_4_levels": 1e3 * render / len(files),
    }
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--tiny", action="store_true", help="tiny model (smoke test), not BLIP-base")
    a = ap.parse_args(argv)
    r = run(a.images, a.batch, a.workers, a.device, a.tiny, a.dtype)
    print(f"{r['device']}, torch {r['torch']}, {r['model_params'] / 1e6:.0f}M params, {r['dtype']}, "
          f"batch {r['batch']}, {r['workers']} workers")
    print(f"precompute: {r['images_per_s']:.1f} images/s; model forwards alone: {r['forward_only_images_per_s']:.1f} "
          f"images/s; share of time outside the forwards: {100 * r['share_outside_forwards']:.1f}% (target < 20%)")
    print(f"render 4-level pyramid at 384 from the cache: {r['render_ms_per_image_4_levels']:.2f} ms/image")
    print(json.dumps(r))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_guidance_throughput():
    r = run(images=256, batch=32, workers=min(8, os.cpu_count() or 1))
    print(json.dumps(r))
    assert r["computed"] == 256  # every image went through the aligner (no timing assertion)


if __name__ == "__main__":
    main()
