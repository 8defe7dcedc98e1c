"""`ssattn train`: train the baseline U-Net or its -SS version on paired data or synthetic underwater crops.

On N GPUs (or N CPU processes): `torchrun --nproc_per_node N --no-python ssattn train ...` runs DDP,
one process per device; only rank 0 writes the run folder and prints.
"""

from __future__ import annotations


def add_data_args(p, *, n_default: int) -> None:
    p.add_argument("--data", required=True,
                   help="a folder of paired images (ssattn.apps.data.paired.PairedGuidanceDataset) or 'synthetic'")
    p.add_argument("--size", type=int, default=64, help="crop / resize size (default 64; divisible by 8)")
    # --items, not only --n: torchrun's parser rejects "--n" as an ambiguous prefix of its own options.
    p.add_argument("--items", "--n", dest="n", type=int, default=n_default,
                   help=f"synthetic items (default {n_default})")
    p.add_argument("--cache-dir", default=None, help="guidance cache folder for folder data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")


def load_data(args, split: str):
    """(dataset, description) for --data."""
    if args.size % 8:
        raise SystemExit(f"--size must be divisible by 8 (the U-Net halves it three times), got {args.size}")
    if args.data == "synthetic":
        from ssattn.apps.data.synthetic import SyntheticUnderwater

        return SyntheticUnderwater(args.size, args.n, args.seed, split), f"synthetic {split} ({args.n} x {args.size}px)"
    import os

    if not os.path.isdir(args.data):
        raise SystemExit(f"--data: {args.data!r} is neither a folder nor 'synthetic'")
    try:
        from ssattn.apps.data.paired import PairedGuidanceDataset
    except ImportError as exc:
        raise SystemExit(f"--data FOLDER needs ssattn.apps.data.paired ({exc}); use --data synthetic") from exc
    return PairedGuidanceDataset(args.data, cache_dir=args.cache_dir, size=args.size), f"folder {args.data}"


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def register(sub) -> None:
    p = sub.add_parser("train", help="train the baseline or -SS U-Net (resumes from RUN_DIR/checkpoint.pt)")
    add_data_args(p, n_default=256)
    p.add_argument("--out", required=True, help="run folder (checkpoint.pt, history.json)")
    p.add_argument("--model", choices=("unet", "unet-ss"), default="unet-ss")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--levels", default=None, help="-SS decoder stages, comma-separated (default all: dec3,dec2,dec1)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--vgg-weights", default=None,
                   help="local VGG-19 weights (torchvision state_dict) for the perceptual loss; without it the term is off")
    p.add_argument("--perceptual-weight", type=float, default=0.1)
    p.add_argument("--align-weight", type=float, default=0.1, help="lambda_align (default 0.1, the paper's)")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="mixed precision: bf16, or fp16 with a gradient scaler (default none)")
    p.add_argument("--accum", type=int, default=1,
                   help="gradient accumulation: micro-batches of --batch-size per optimizer step (default 1)")
    p.add_argument("--find-unused-parameters", action="store_true",
                   help="DDP: for a model that skips some stage in a forward pass (not needed for unet/unet-ss)")
    p.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds a rank waits for the others before the job fails (torchrun only; default 600)")
    p.add_argument("--log-every", type=int, default=100, help="log a line of metrics every N steps (0: off)")
    p.add_argument("--no-resume", action="store_true", help="start over even if RUN_DIR/checkpoint.pt exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import logging
    import os
    import sys

    import torch

    from ssattn.apps.distributed import setup, teardown
    from ssattn.apps.training import TrainConfig, build_model, train
    from ssattn.apps.training.trainer import RankFailure

    ctx = setup(args.device, timeout_s=args.dist_timeout)
    # Rank 0 speaks for the job; the other ranks only report their own failures.
    logging.basicConfig(level=logging.INFO if ctx.is_main else logging.WARNING, format="%(message)s")
    who = f"ssattn train (rank {ctx.rank} of {ctx.world_size})" if ctx.distributed else "ssattn train"
    data, desc = load_data(args, "train")
    spec = {"arch": args.model, "width": args.width}
    if args.model == "unet-ss":
        spec["align_weight"] = args.align_weight
        if args.levels:
            spec["levels"] = [v.strip() for v in args.levels.split(",") if v.strip()]
    torch.manual_seed(args.seed)
    model = build_model(spec)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      vgg_weights=args.vgg_weights, perceptual_weight=args.perceptual_weight,
                      checkpoint_every=args.checkpoint_every, device=str(ctx.device), amp=args.amp, accum=args.accum,
                      find_unused_parameters=args.find_unused_parameters, log_every=args.log_every,
                      progress=not args.no_progress, desc=f"train {args.model}")
    if ctx.is_main:
        ranks = f", {ctx.world_size} processes (DDP)" if ctx.distributed else ""
        print(f"ssattn train: {args.model} (width {args.width}) on {desc}, {args.steps} steps, device {ctx.device}{ranks}")
    try:
        hist = train(model, data, cfg, args.out, spec=spec, resume=not args.no_resume)
    except (RankFailure, FloatingPointError, ValueError, OSError) as exc:
        # A RankFailure is raised on every rank with the same text: rank 0 prints it once.
        if ctx.is_main or not isinstance(exc, RankFailure):
            print(f"{who}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # e.g. the process group's timeout when another rank stopped answering
        if not ctx.distributed:
            raise
        print(f"{who}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        teardown()
    if not ctx.is_main:
        return 0
    summary = {"steps": hist["steps"], "final_loss": hist["loss"][-1] if hist["loss"] else None,
               "step_time_s": hist["step_time_s"], "images_per_s": hist["images_per_s"],
               "world_size": hist["world_size"], "loss": hist["loss_description"], "spec": spec}
    with open(os.path.join(args.out, "history.json"), "w") as f:
        json.dump({**summary, "loss_per_step": hist["loss"], "psnr_per_step": hist["psnr"]}, f)
    print(f"done: step {hist['steps']}, loss {summary['final_loss']}, {1000 * hist['step_time_s']:.1f} ms/step, "
          f"{hist['images_per_s']:.1f} images/s over {hist['world_size']} process(es) ({hist['loss_description']}); "
          f"checkpoint {os.path.join(args.out, 'checkpoint.pt')}")
    return 0
