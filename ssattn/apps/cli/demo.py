"""`ssattn demo`: baseline U-Net vs its -SS version on synthetic underwater images, end to end.

Synthesises degraded crops of scikit-image photographs (ssattn.apps.data.synthetic),
computes the embedded saliency guidance, trains the baseline and the -SS
U-Net on identical data and seeds, evaluates both on held-out crops, and
writes figure.png, results.md and results.json into --out.
"""

from __future__ import annotations

from .common import CLIError

DEFAULTS = {"steps": 200, "size": 48, "batch_size": 8, "n_train": 256, "n_test": 16, "width": 16}
QUICK = {"steps": 3, "size": 32, "batch_size": 4, "n_train": 8, "n_test": 4, "width": 8}


def register(sub) -> None:
    p = sub.add_parser("demo", help="train baseline vs -SS U-Net on synthetic underwater images and compare")
    p.add_argument("--out", default="./ssattn-demo", help="output folder (default ./ssattn-demo)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per model (default {DEFAULTS['steps']})")
    p.add_argument("--size", type=int, default=None, help=f"crop size, divisible by 8 (default {DEFAULTS['size']})")
    p.add_argument("--batch-size", type=int, default=None, help=f"batch size (default {DEFAULTS['batch_size']})")
    p.add_argument("--n-train", type=int, default=None, help=f"training crops (default {DEFAULTS['n_train']})")
    p.add_argument("--n-test", type=int, default=None, help=f"held-out crops (default {DEFAULTS['n_test']})")
    p.add_argument("--width", type=int, default=None, help=f"U-Net base width (default {DEFAULTS['width']})")
    p.add_argument("--levels", default=None,
                   help="decoder stages with -SS attention, comma-separated from dec3,dec2,dec1 "
                        "(default: all on a GPU; dec3,dec2 on a CPU, where the full-resolution stage is slow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--amp", choices=("auto", "none", "bf16"), default="auto",
                   help="autocast (default: bf16 on CUDA, none on CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny sizes; for tests)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def _settings(args) -> dict:
    base = QUICK if args.quick else DEFAULTS
    s = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
    if s["size"] % 8 or s["size"] < 16:
        raise CLIError(f"--size must be a multiple of 8 and >= 16, got {s['size']}")
    for k in ("steps", "batch_size", "n_train", "n_test", "width"):
        if s[k] < 1:
            raise CLIError(f"--{k.replace('_', '-')} must be >= 1, got {s[k]}")
    return s


def _backends_used(device) -> dict:
    """What backend="auto" resolves to on this device for each operation (as ssattn.functional asks)."""
    import warnings

    from ssattn import _backends

    used = {}
    for op in ("masked_cross_attention", "alignment_loss", "guidance_pyramid"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                used[op] = _backends.resolve(op, "auto", device.type)
            except Exception as exc:  # report, never fail the demo over a label
                used[op] = f"unknown ({type(exc).__name__})"
    used["guidance"] = "embedded spectral-residual saliency (no VLM weights)"
    return used


def _figure(path, rows, labels, scale: int) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    size = rows[0][0].shape[-1] * scale
    pad, head = 4, 18
    cols = len(labels)
    canvas = Image.new("RGB", (cols * (size + pad) + pad, head + len(rows) * (size + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(labels):
        draw.text((pad + c * (size + pad) + 2, 3), label, fill="black")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            t = img.detach().float().clamp(0, 1)
            if t.shape[0] == 1:
                t = t.expand(3, -1, -1)
            arr = (t.permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
            tile = Image.fromarray(arr).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (pad + c * (size + pad), head + pad + r * (size + pad)))
    canvas.save(path)


def run(args) -> int:
    import json
    import os
    import time
    import warnings

    import torch

    from ssattn.apps.data.synthetic import SyntheticUnderwater
    from ssattn.models import UNet, unet_ss
    from ssattn.apps.training import TrainConfig, evaluate, train

    t_start = time.perf_counter()
    s = _settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    amp = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    if args.levels:
        levels = tuple(v.strip() for v in args.levels.split(",") if v.strip())
    else:
        levels = ("dec3", "dec2", "dec1") if device.type == "cuda" else ("dec3", "dec2")
    os.makedirs(args.out, exist_ok=True)
    # Fallback notices are summarised once below instead of repeated per call.
    warnings.filterwarnings("ignore", message=r"ssattn\..*falling back", category=RuntimeWarning)

    print(f"ssattn demo: device {device}, autocast {amp}, {s['size']}x{s['size']} crops, "
          f"{s['n_train']} train / {s['n_test']} held-out, {s['steps']} steps x batch {s['batch_size']}, "
          f"U-Net width {s['width']}, -SS stages {','.join(levels)}")
    t0 = time.perf_counter()
    train_set = SyntheticUnderwater(s["size"], s["n_train"], args.seed, "train").tensors()
    test_set = SyntheticUnderwater(s["size"], s["n_test"], args.seed, "test").tensors()
    t_data = time.perf_counter() - t0
    print(f"  synthetic data + saliency guidance: {t_data:.1f} s")

    results = {}
    models = {}
    for name in ("baseline", "-SS"):
        torch.manual_seed(args.seed)  # identical U-Net initialisation for both
        if name == "baseline":
            model = UNet(3, 3, s["width"])
        else:
            model = unet_ss(3, 3, s["width"], levels=levels)
        cfg = TrainConfig(steps=s["steps"], batch_size=s["batch_size"], lr=2e-3, seed=args.seed,
                          device=str(device), amp=amp, progress=not args.no_progress, desc=f"train {name}")
        t0 = time.perf_counter()
        hist = train(model, train_set, cfg)
        t_train = time.perf_counter() - t0
        ev = evaluate(model, test_set, device=device)
        results[name] = {"psnr": ev["psnr"], "ssim": ev["ssim"], "step_time_ms": 1000 * hist["step_time_s"],
                         "train_s": t_train, "final_loss": hist["loss"][-1],
                         "params": sum(p.numel() for p in model.parameters()), "loss": hist["loss_description"],
                         "outputs": ev["outputs"]}
        results["input"] = {"psnr": ev["input_psnr"], "ssim": ev["input_ssim"]}
        models[name] = model
        print(f"  {name:8s}: PSNR {ev['psnr']:.2f} dB, SSIM {ev['ssim']:.4f}, "
              f"{1000 * hist['step_time_s']:.0f} ms/step, trained in {t_train:.1f} s")

    deg, ref, guide = test_set
    rows = [[deg[i], guide[i], results["baseline"]["outputs"][i], results["-SS"]["outputs"][i], ref[i]]
            for i in range(min(4, deg.shape[0]))]
    fig = os.path.join(args.out, "figure.png")
    _figure(fig, rows, ["input", "guidance", "baseline", "-SS", "reference"], scale=max(1, 128 // s["size"]))

    backends = _backends_used(device)
    total = time.perf_counter() - t_start
    table = ["| model | PSNR (dB) | SSIM | step time (ms) | parameters |", "|---|---|---|---|---|",
             f"| degraded input | {results['input']['psnr']:.2f} | {results['input']['ssim']:.4f} | - | - |"]
    for name in ("baseline", "-SS"):
        r = results[name]
        table.append(f"| U-Net {name} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['step_time_ms']:.1f} | {r['params']:,} |")
    meta = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(), "autocast": amp,
            "settings": s, "seed": args.seed, "ss_levels": list(levels), "backends": backends,
            "loss": results["-SS"]["loss"], "data_s": t_data, "total_s": total}
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("# ssattn demo: baseline vs -SS U-Net (synthetic underwater, held-out crops)\n\n")
        f.write("\n".join(table) + "\n\n")
        f.write(f"Settings: {json.dumps(meta['settings'])}, seed {args.seed}, device {device}, autocast {amp}, "
                f"-SS stages {','.join(levels)}.\nBackends: {json.dumps(backends)}.\nLoss: {meta['loss']}.\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"results": {k: {kk: vv for kk, vv in v.items() if kk != "outputs"} for k, v in results.items()},
                   **meta}, f, indent=2)
    print("\n" + "\n".join(table) + "\n")
    print(f"backends: attention {backends['masked_cross_attention']}, alignment loss {backends['alignment_loss']}")
    print(f"wrote figure.png, results.md and results.json into {args.out} ({total:.1f} s total)")
    return 0
