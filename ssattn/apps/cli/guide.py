"""`ssattn guide IMAGES_DIR --out CACHE_DIR`: precompute guidance for a dataset (resumable, multi-GPU)."""

from __future__ import annotations

import os

from .common import (CLIError, add_progress_arg, check_output_folder, nonnegative_int, one_line, positive_int,
                     resolve_device)


def register(sub) -> None:
    p = sub.add_parser(
        "guide", help="precompute guidance maps for a folder of images into a cache",
        description=(
            "Compute the guidance grids of every image in IMAGES_DIR once and cache them in CACHE_DIR "
            "(keyed by image content and settings; rerunning skips what is done). Default method: "
            "embedded water-contrast + saliency guidance (no weights). --method blip runs BLIP with --prompt, --classes or "
            "a LLaVA captioner. Multi-GPU: torchrun --no-python --nproc_per_node N ssattn guide ..."),
    )
    p.add_argument("images", metavar="IMAGES_DIR", help="folder of images (degraded inputs)")
    p.add_argument("--out", required=True, metavar="CACHE_DIR", help="cache folder (created if needed)")
    p.add_argument("--method", choices=("saliency", "blip"), default=None,
                   help="saliency (default unless a model or prompt is given) or blip")
    p.add_argument("--aligner", default=None, metavar="ID_OR_DIR",
                   help="BLIP retrieval model: hub id or local folder (default Salesforce/blip-itm-base-coco)")
    p.add_argument("--prompt", default=None, help="one text prompt for every image (skips the captioner)")
    p.add_argument("--classes", default=None, help="comma-separated class names, one map each (skips the captioner)")
    p.add_argument("--captioner", default=None, metavar="ID_OR_DIR",
                   help="image-text-to-text model asked for the key objects (default llava-hf/llava-1.5-7b-hf; "
                        "'none': generic prompts)")
    p.add_argument("--question", default=None, help="question asked to the captioner")
    p.add_argument("--max-prompts", type=positive_int, default=4, help="at most this many object prompts per image (4)")
    p.add_argument("--joint", action="store_true", help="join an image's prompts into one text (one map)")
    p.add_argument("--combine", choices=("max", "mean"), default="max",
                   help="how per-prompt maps combine in the overlays (max); datasets choose at load time")
    p.add_argument("--gamma", type=float, default=2.0, help="sharpening exponent for overlays (2.0)")
    p.add_argument("--delta", type=float, default=0.2, help="sharpening threshold for overlays (0.2)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per model call (16)")
    p.add_argument("--workers", type=nonnegative_int, default=min(4, os.cpu_count() or 1),
                   help="decoding processes (0: decode in the main process; default %(default)s)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default auto: cuda when present)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="model dtype (default float16 on cuda, float32 on cpu)")
    p.add_argument("--recursive", action="store_true", help="also take images in subfolders")
    p.add_argument("--overlay", nargs="?", const="", default=None, metavar="DIR",
                   help="also write PNGs of the map over each image (default DIR: CACHE_DIR/overlays)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N images (for a quick look)")
    add_progress_arg(p)
    p.set_defaults(func=run)


def _distributed(device_arg):
    """(rank, world_size, device) from torchrun's environment; initialises the process group when world_size > 1."""
    from ssattn.apps.distributed import setup

    ctx = setup(device_arg)
    return ctx.rank, ctx.world_size, ctx.device


def run(args) -> int:
    import logging
    import sys

    import torch

    from ssattn.guidance import ModelNotAvailableError
    from ssattn.guidance.factory import make_guide
    from ssattn.guidance.precompute import precompute
    from ssattn.guidance.prompts import DEFAULT_QUESTION

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    method = args.method or ("blip" if any(v is not None for v in (args.aligner, args.prompt, args.classes,
                                                                     args.captioner)) else "saliency")
    if method == "saliency" and any(v is not None for v in (args.aligner, args.prompt, args.classes, args.captioner)):
        print("ssattn guide: --aligner/--prompt/--classes/--captioner need --method blip", file=sys.stderr)
        return 2
    if not (args.gamma >= 1 and 0 <= args.delta < 1):
        print(f"ssattn guide: need --gamma >= 1 and 0 <= --delta < 1, got {args.gamma} and {args.delta}", file=sys.stderr)
        return 2
    if not os.path.isdir(args.images):
        print(f"ssattn guide: IMAGES_DIR {args.images!r} is not a folder", file=sys.stderr)
        return 2
    overlay = None if args.overlay is None else (args.overlay or os.path.join(args.out, "overlays"))
    for flag, path in (("--out", args.out), ("--overlay", overlay)):
        if path is not None:
            check_output_folder(flag, path)
    resolve_device(args.device or "auto")  # a clear error for a device that cannot run here, before any work
    rank, world, device = _distributed(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        guide = make_guide(method, aligner=args.aligner, prompt=args.prompt, classes=args.classes,
                           captioner=args.captioner or "llava-hf/llava-1.5-7b-hf", question=args.question or DEFAULT_QUESTION,
                           joint=args.joint, max_prompts=args.max_prompts, device=device, dtype=dtype)
    except (ModelNotAvailableError, ValueError) as exc:
        print(f"ssattn guide: {one_line(exc)}", file=sys.stderr)
        return 2
    try:
        stats = precompute(args.images, args.out, guide, batch_size=args.batch_size, workers=args.workers,
                           recursive=args.recursive, overlay_dir=overlay, gamma=args.gamma, delta=args.delta,
                           combine=args.combine, rank=rank, world_size=world, progress=not args.no_progress,
                           limit=args.limit)
    except FileNotFoundError as exc:
        print(f"ssattn guide: {one_line(exc)}", file=sys.stderr)
        return 2
    except PermissionError as exc:  # a read-only cache (entries already there or not)
        raise CLIError(f"cannot write to CACHE_DIR {args.out!r}: {exc.strerror or exc}"
                       + (f" ({exc.filename})" if exc.filename else "")) from None
    counts = torch.tensor([stats.computed, stats.cached, len(stats.failed)])
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(counts)
        dist.barrier()
    if stats.failed:  # each was logged with its reason; list them once more at the end, where they are seen
        print("ssattn guide: skipped unreadable files: " + ", ".join(p for p, _ in stats.failed), file=sys.stderr)
    if stats.overlay_failed:  # their guidance is cached; only the picture is missing
        print("ssattn guide: could not write the overlays of: " + ", ".join(p for p, _ in stats.overlay_failed),
              file=sys.stderr)
    if rank == 0:
        from ssattn.guidance.cache import settings_id

        print(f"ssattn guide: {int(counts[0])} computed, {int(counts[1])} already cached, {int(counts[2])} unreadable; "
              f"cache {os.path.join(args.out, settings_id(guide.settings))}")
    return 0
