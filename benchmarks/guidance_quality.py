"""How well each embedded guidance method finds the objects of the demo's scenes: mean ROC-AUC and best-threshold
IoU against the object masks (ssattn.apps.training.guidance_quality), per method and scene size.

"map" is what a model receives (the grid through SPEC 1 with gamma 2, delta 0.2, at the scene size); "grid" is
the method's raw grid upsampled (no sharpening: delta's clamp to 0 ties pixels, which lowers AUC).

    python benchmarks/guidance_quality.py --n 96 --sizes 48 64 128

Deterministic (scenes from the seed); prints a Markdown table and JSON on the last line.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from ssattn import guidance_pyramid
from ssattn.apps.data.scenes import UnderwaterScenes
from ssattn.apps.training.guidance_quality import guidance_quality
from ssattn.guidance import water_contrast
from ssattn.guidance.saliency import saliency_grid

METHODS = {
    "spectral-residual (previous default)": lambda x: saliency_grid(x),
    "water-contrast, colour only": lambda x: water_contrast.water_contrast_grid(x, saliency_weight=0.0),
    "water-contrast + 0.3 saliency (default)": lambda x: water_contrast.water_contrast_grid(x),
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=96, help="held-out scenes per size")
    p.add_argument("--sizes", type=int, nargs="+", default=[48, 64, 128])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows, out = [], {}
    for size in args.sizes:
        ds = UnderwaterScenes(size, args.n, args.seed, "test")
        deg, _, _ = ds.tensors()
        masks = ds.masks()
        for name, fn in METHODS.items():
            grid = fn(deg)
            up = F.interpolate(grid[:, None], size=(size, size), mode="bilinear", align_corners=False)
            final = guidance_pyramid(grid, [(size, size)], gamma=2.0, delta=0.2, backend="reference")[0]
            g, m = guidance_quality(up, masks), guidance_quality(final, masks)
            out[f"{name} @ {size}"] = {"map_auc": m["auc"], "map_iou": m["iou"], "grid_auc": g["auc"],
                                       "grid_iou": g["iou"]}
            rows.append(f"| {name} | {size} | {m['auc']:.3f} | {m['iou']:.3f} | {g['auc']:.3f} | {g['iou']:.3f} |")
    print(f"{args.n} held-out scenes per size, seed {args.seed}\n")
    print("| method | size | map AUC | map IoU | grid AUC | grid IoU |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
