"""`ssattn eval`: PSNR / SSIM of a trained checkpoint on held-out data."""

from __future__ import annotations


def register(sub) -> None:
    from .common import positive_int
    from .train import add_data_args, add_text_args

    p = sub.add_parser("eval", help="evaluate a checkpoint written by `ssattn train` (PSNR, SSIM)")
    p.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoint.pt")
    add_data_args(p, n_default=32)
    p.add_argument("--batch-size", type=positive_int, default=16, help="batch size (default %(default)s)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    add_text_args(p, training=False)
    p.set_defaults(func=run)


def run(args) -> int:
    from ssattn.apps.jsonfile import METRIC_NOTES, write_json

    from ssattn.apps.training import evaluate, load_model

    from .common import CLIError, check_output_folder, resolve_device
    from .train import load_data, load_text

    device = resolve_device(args.device)
    if args.cache_dir is not None:
        check_output_folder("--cache-dir", args.cache_dir)
    model, ckpt = load_model(args.checkpoint, device, unsafe=args.unsafe_checkpoint)
    # Synthetic evaluation uses the held-out split (right quarter of each photograph).
    data, desc = load_data(args, "test")
    trained_text = ckpt["spec"].get("text")
    text = None
    if trained_text and args.text is None:
        raise CLIError(f"this model was trained with text stages {','.join(trained_text['stages'])}: pass --text "
                       f"with the captions of the evaluation images")
    if args.text is not None:
        if not trained_text:
            raise CLIError("--text: this model has no text stages (it was trained without --text)")
        text = load_text(args, data, args.text_encoder or trained_text["encoder"], "cpu")
        if text.channels != trained_text["channels"]:
            raise CLIError(f"--text-encoder gives {text.channels} features per word but the model was trained on "
                           f"{trained_text['channels']} ({trained_text['encoder']})")
    ev = evaluate(model, data, batch_size=args.batch_size, device=device, text=text)
    res = {"checkpoint": args.checkpoint, "spec": ckpt["spec"], "step": ckpt["step"], "data": desc,
           "psnr": ev["psnr"], "ssim": ev["ssim"], "input_psnr": ev["input_psnr"], "input_ssim": ev["input_ssim"],
           "n": len(ev["psnr_per_image"])}
    print(f"{ckpt['spec']['arch']} at step {ckpt['step']} on {desc}: PSNR {ev['psnr']:.2f} dB, SSIM {ev['ssim']:.4f} "
          f"(degraded input: {ev['input_psnr']:.2f} dB, {ev['input_ssim']:.4f})")
    if args.json:
        write_json(args.json, res, METRIC_NOTES)
    return 0
