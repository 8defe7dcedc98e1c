"""`ssattn eval`: PSNR / SSIM of a trained checkpoint on held-out data."""

from __future__ import annotations


def register(sub) -> None:
    from .common import positive_int
    from .train import add_data_args

    p = sub.add_parser("eval", help="evaluate a checkpoint written by `ssattn train` (PSNR, SSIM)")
    p.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoint.pt")
    add_data_args(p, n_default=32)
    p.add_argument("--batch-size", type=positive_int, default=16, help="batch size (default %(default)s)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from ssattn.apps.training import evaluate, load_model

    from .train import load_data, resolve_device

    device = resolve_device(args.device)
    model, ckpt = load_model(args.checkpoint, device, unsafe=args.unsafe_checkpoint)
    # Synthetic evaluation uses the held-out split (right quarter of each photograph).
    data, desc = load_data(args, "test")
    ev = evaluate(model, data, batch_size=args.batch_size, device=device)
    res = {"checkpoint": args.checkpoint, "spec": ckpt["spec"], "step": ckpt["step"], "data": desc,
           "psnr": ev["psnr"], "ssim": ev["ssim"], "input_psnr": ev["input_psnr"], "input_ssim": ev["input_ssim"],
           "n": len(ev["psnr_per_image"])}
    print(f"{ckpt['spec']['arch']} at step {ckpt['step']} on {desc}: PSNR {ev['psnr']:.2f} dB, SSIM {ev['ssim']:.4f} "
          f"(degraded input: {ev['input_psnr']:.2f} dB, {ev['input_ssim']:.4f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0
