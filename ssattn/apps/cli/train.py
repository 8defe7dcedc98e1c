"""`ssattn train`: train the baseline U-Net or its -SS version on paired data or synthetic underwater crops.

On N GPUs (or N CPU processes): `torchrun --nproc_per_node N --no-python ssattn train ...` runs DDP,
one process per device; only rank 0 writes the run folder and prints.
"""

from __future__ import annotations

import argparse

from .common import (CLIError, add_progress_arg, add_threads_arg, check_number, check_output_folder, nonnegative_int,
                     name_list, positive_int, resolve_device, use_threads)


def add_data_args(p, *, n_default: int) -> None:
    p.add_argument("--data", required=True,
                   help="a folder of paired images (ssattn.apps.data.paired.PairedGuidanceDataset) or 'synthetic'")
    p.add_argument("--size", type=positive_int, default=64, help="crop / resize size (default 64; divisible by 8)")
    # --items, not only --n: torchrun's parser rejects "--n" as an ambiguous prefix of its own options.
    p.add_argument("--items", "--n", dest="n", type=positive_int, default=n_default,
                   help=f"synthetic items (default {n_default})")
    p.add_argument("--cache-dir", default=None, help="guidance cache folder for folder data")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N (default auto)")
    p.add_argument("--unsafe-checkpoint", action="store_true",
                   help="load checkpoints with torch.load(weights_only=False), which runs any code inside the file: "
                        "only for files you trust (default: weights only, the types ssattn train saves)")


def load_data(args, split: str):
    """(dataset, description) for --data."""
    if args.size % 8:
        raise CLIError(f"--size must be divisible by 8 (the U-Net halves it three times), got {args.size}")
    if args.data == "synthetic":
        from ssattn.apps.data.synthetic import SyntheticUnderwater

        return SyntheticUnderwater(args.size, args.n, args.seed, split), f"synthetic {split} ({args.n} x {args.size}px)"
    import os

    if not os.path.isdir(args.data):
        raise CLIError(f"--data: {args.data!r} is neither a folder nor 'synthetic'")
    try:
        from ssattn.apps.data.paired import LAYOUTS, PairedGuidanceDataset, find_layout
    except ImportError as exc:
        raise CLIError(f"--data FOLDER needs ssattn.apps.data.paired ({exc}); use --data synthetic") from exc
    try:
        find_layout(args.data)
    except FileNotFoundError:  # the library's message suggests its layout= argument, which the command lacks
        found = sorted(p.name for p in os.scandir(args.data) if p.is_dir())
        raise CLIError(f"--data {args.data!r} has no known paired layout (its subfolders: "
                       f"{', '.join(found) or 'none'}); name its two folders as one of "
                       f"{', '.join(f'{a}/ + {b}/' for a, b in LAYOUTS)}") from None
    return PairedGuidanceDataset(args.data, cache_dir=args.cache_dir, size=args.size), f"folder {args.data}"


DEFAULT_TEXT_LEVELS = ("dec3", "dec2")


def _captions(text: str) -> str:
    """--text: anything but an empty value (read as a path, "" would be the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; give a caption ('a fish over sand'), a file or folder of captions, "
                                         "or 'vlm'")
    return text


def add_text_args(p, *, training: bool) -> None:
    g = p.add_argument_group("NaLSuper text guidance")
    g.add_argument("--text", type=_captions, default=None, metavar="CAPTIONS",
                   help="captions of the images: a folder of <name>.txt, a .json {name: caption}, a name<TAB>caption "
                        "table, a text file whose text is every image's caption, or the caption itself for every "
                        "image (--text 'a fish over sand'; a value with a '/' or ending in .txt, .json, .tsv or .csv "
                        "must name an existing file or folder); names: the degraded files' stems, synthetic items: "
                        "their index; or 'vlm': ask the captioner (--text-captioner) about each degraded image" + ("; adds text stages to the model" if training else
                                          "; needed for a model trained with --text"))
    g.add_argument("--text-encoder", default=None, metavar="ID_OR_DIR",
                   help="CLIP text encoder (hub id or local folder; default openai/clip-vit-base-patch32"
                        + (")" if training else ", or the one the model was trained with)"))
    g.add_argument("--text-captioner", default=None, metavar="ID_OR_DIR",
                   help="with --text vlm: the LLaVA-family captioner (default llava-hf/llava-1.5-7b-hf); its answers "
                        "are cached under --cache-dir")
    if training:
        g.add_argument("--text-levels", default=None,
                       help=f"U-Net stages whose outputs the text refines, comma-separated, from dec3,dec2,dec1 "
                            f"(also enc1,enc2,enc3,bottleneck) (default {','.join(DEFAULT_TEXT_LEVELS)})")


def load_text(args, data, encoder_id: str, device):
    """The items' word features (ItemText) for --text, encoded by `encoder_id` (cached under --cache-dir)."""
    from ssattn.apps.training.text import ItemText, load_item_text
    from ssattn.text import TextEncoder

    cache = (lambda sub: None) if args.cache_dir is None else (lambda sub: f"{args.cache_dir}/{sub}")
    encoder = TextEncoder(encoder_id, device=device, cache_dir=cache("text"))
    if args.text_captioner and args.text != "vlm":
        raise CLIError("--text-captioner is for --text vlm (captions from the captioner)")
    try:
        if args.text == "vlm":
            return ItemText.from_captions(vlm_captions(data, args.text_captioner, cache("captions")), encoder)
        return load_item_text(data, args.text, encoder)
    except (ValueError, FileNotFoundError) as exc:
        raise CLIError(f"--text: {exc}") from None


def vlm_captions(data, captioner_id, cache_dir) -> list[str]:
    """The captioner's answer about each degraded image of `data` (an empty answer is an error naming the item)."""
    from ssattn.guidance.hub import DEFAULT_CAPTIONER
    from ssattn.guidance.llava import LlavaCaptioner
    from ssattn.text import caption_images

    captioner = LlavaCaptioner(captioner_id or DEFAULT_CAPTIONER)
    captions = caption_images((data[i][0] for i in range(len(data))), captioner, cache_dir)
    empty = [i for i, c in enumerate(captions) if not c.strip()]
    if empty:
        shown = ", ".join(map(str, empty[:5])) + (" ..." if len(empty) > 5 else "")
        raise ValueError(f"the captioner gave an empty answer for item(s) {shown}; give the captions as a file")
    return captions


def add_caption_args(p) -> None:
    g = p.add_argument_group("ClipCap-style caption regulariser")
    g.add_argument("--caption-loss", type=float, default=0.0, metavar="WEIGHT",
                   help="add WEIGHT * CaptionFeatureLoss(output, reference): the two images must agree in the "
                        "captioner's visual, prefix and language spaces (default 0: off)")
    g.add_argument("--captioner", default=None, metavar="ID_OR_DIR",
                   help="the captioner: a folder with captioner.json (ssattn.caption.save_captioner), a hub id "
                        "holding one, or a ClipCap checkpoint .pt (with CLIP openai/clip-vit-base-patch32)")
    g.add_argument("--caption-tokens", type=nonnegative_int, default=0, metavar="T",
                   help="the language space also covers T tokens of the reference's own greedy caption, "
                        "teacher-forced in both branches (default 0: the prefix positions only)")
    g.add_argument("--caption-distance", choices=("l1", "l2", "cosine"), default="l1",
                   help="distance in each space (default %(default)s); reference features are cached under "
                        "--cache-dir/caption when --cache-dir is given")


def check_caption_args(args) -> None:
    """CLIError for --caption-loss / --captioner / --caption-tokens that do not go together (before any work)."""
    import math

    if not args.caption_loss:
        if args.captioner or args.caption_tokens:
            raise CLIError("--captioner and --caption-tokens need --caption-loss WEIGHT (> 0)")
        return
    if not math.isfinite(args.caption_loss) or args.caption_loss < 0:
        raise CLIError(f"--caption-loss must be a finite number >= 0, got {args.caption_loss}")
    if not args.captioner:
        raise CLIError("--caption-loss needs --captioner ID_OR_DIR (a captioner folder, hub id or ClipCap checkpoint)")


def load_caption_term(args):
    """The CaptionTerm for --caption-loss / --captioner, or None (CLIError on bad arguments)."""
    check_caption_args(args)
    if not args.caption_loss:
        return None
    from ssattn.apps.training.caption import caption_term
    from ssattn.guidance.hub import ModelNotAvailableError

    cache = None if args.cache_dir is None else f"{args.cache_dir}/caption"
    try:
        return caption_term(weight=args.caption_loss, captioner=args.captioner, distance=args.caption_distance,
                            cache_dir=cache, caption_length=args.caption_tokens)
    except (ModelNotAvailableError, ValueError) as exc:
        raise CLIError(f"--captioner: {exc}") from None


# The U-Net's stages a text stage may refine (its modules' names).
TEXT_STAGES = ("enc1", "enc2", "enc3", "bottleneck", "dec3", "dec2", "dec1")


def text_levels(args) -> list[str]:
    """--text-levels as a list of U-Net stages (CLIError naming the flag otherwise)."""
    if not args.text_levels:
        return list(DEFAULT_TEXT_LEVELS)
    return name_list("--text-levels", args.text_levels, TEXT_STAGES, "is not a stage of the U-Net",
                     f"give some of dec3,dec2,dec1 (or {','.join(TEXT_STAGES[:4])}), comma-separated")


def parse_levels(flag: str, text: str) -> list[str]:
    """A comma-separated list of U-Net decoder stages, or 'none' (CLIError naming the flag otherwise)."""
    from ssattn.models import DEFAULT_PAIRS

    if text.strip().lower() == "none":
        return []
    levels = name_list(flag, text, DEFAULT_PAIRS, "is not a decoder stage",
                       f"give some of {','.join(DEFAULT_PAIRS)} (comma-separated), or 'none'")
    return [d for d in DEFAULT_PAIRS if d in levels]


def stage_levels(args) -> dict:
    """{"attention_levels": [...], "align_levels": [...]} from --levels / --attention-levels / --align-levels
    ({} for --model unet)."""
    from ssattn.models import DEFAULT_PAIRS

    if args.model != "unet-ss":
        if any(v is not None for v in (args.levels, args.attention_levels, args.align_levels)):
            raise CLIError("--levels, --attention-levels and --align-levels choose the -SS stages: they need "
                           "--model unet-ss")
        return {}
    base = list(DEFAULT_PAIRS) if args.levels is None else parse_levels("--levels", args.levels)
    attention = base if args.attention_levels is None else parse_levels("--attention-levels", args.attention_levels)
    align = base if args.align_levels is None else parse_levels("--align-levels", args.align_levels)
    if not attention and not align:
        raise CLIError("no -SS stage is left (no attention and no alignment levels): use --model unet for the plain "
                       "U-Net")
    return {"attention_levels": attention, "align_levels": align}


def register(sub) -> None:
    p = sub.add_parser("train", help="train the baseline or -SS U-Net (resumes from RUN_DIR/checkpoint.pt)")
    add_data_args(p, n_default=256)
    p.add_argument("--out", required=True, help="run folder (checkpoint.pt, history.json)")
    p.add_argument("--model", choices=("unet", "unet-ss"), default="unet-ss",
                   help="baseline U-Net or its -SS version (default %(default)s)")
    p.add_argument("--width", type=positive_int, default=16, help="U-Net base width (default %(default)s)")
    p.add_argument("--levels", default=None,
                   help="-SS decoder stages, comma-separated, for both the attention and the alignment loss "
                        "(default all: dec3,dec2,dec1)")
    p.add_argument("--attention-levels", default=None, metavar="LEVELS",
                   help="decoder stages that get an attention block, or 'none' (alignment only); default: --levels")
    p.add_argument("--align-levels", default=None, metavar="LEVELS",
                   help="decoder stages whose outputs feed the alignment loss, or 'none' (attention only); "
                        "default: --levels")
    p.add_argument("--steps", type=positive_int, default=1000,
                   help="total training steps, counted across resumes (default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="batch size per process (default %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine decay (default %(default)s)")
    p.add_argument("--vgg-weights", default=None,
                   help="local VGG-19 weights (torchvision state_dict) for the perceptual loss; without it the term is off")
    p.add_argument("--perceptual-weight", type=float, default=0.1, help="weight of the VGG term (default %(default)s)")
    p.add_argument("--align-weight", type=float, default=0.1, help="lambda_align (default 0.1, the paper's)")
    p.add_argument("--align-form", choices=("paper", "normalized"), default="paper",
                   help="alignment loss form: the paper's formula, or normalized (scale invariant, bounded; "
                        "docs/operations.md section 3) (default %(default)s)")
    p.add_argument("--eta", type=float, default=1.0,
                   help="alignment loss eta, the weight of its foreground term (default %(default)s)")
    p.add_argument("--checkpoint-every", type=nonnegative_int, default=200,
                   help="save a checkpoint every N steps; 0: only at the end (default %(default)s)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="mixed precision: bf16, or fp16 with a gradient scaler (default %(default)s)")
    p.add_argument("--accum", type=positive_int, default=1,
                   help="gradient accumulation: micro-batches of --batch-size per optimizer step (default %(default)s)")
    p.add_argument("--find-unused-parameters", action="store_true",
                   help="DDP: for a model that skips some stage in a forward pass (not needed for unet/unet-ss)")
    p.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds a rank waits for the others before the job fails (torchrun only; default %(default)s)")
    p.add_argument("--log-every", type=nonnegative_int, default=100,
                   help="log a line of metrics every N steps; 0: off (default %(default)s)")
    p.add_argument("--no-resume", action="store_true", help="start over even if RUN_DIR/checkpoint.pt exists")
    add_progress_arg(p)
    add_threads_arg(p)
    add_text_args(p, training=True)
    add_caption_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import logging
    import os
    import sys

    import torch

    from ssattn.apps.distributed import setup
    from ssattn.apps.jsonfile import METRIC_NOTES, write_json
    from ssattn.apps.training import TrainConfig, build_model, train
    from ssattn.apps.training.trainer import CheckpointMismatch, RankFailure

    resolve_device(args.device)  # a clear error for a device that cannot run here
    levels = stage_levels(args)  # checked before any process group starts
    for flag, value in (("--align-weight", args.align_weight), ("--perceptual-weight", args.perceptual_weight),
                        ("--eta", args.eta)):
        check_number(flag, value)
    check_number("--lr", args.lr, positive=True)
    check_number("--dist-timeout", args.dist_timeout, positive=True)
    check_caption_args(args)
    if args.text is not None:
        stages = text_levels(args)
    elif args.text_encoder or args.text_levels or args.text_captioner:
        raise CLIError("--text-encoder, --text-levels and --text-captioner need --text (the captions)")
    if args.vgg_weights and not os.path.isfile(args.vgg_weights):
        raise CLIError(f"--vgg-weights {args.vgg_weights!r}: no such file")
    check_output_folder("--out", args.out)
    if args.cache_dir is not None:
        check_output_folder("--cache-dir", args.cache_dir)
    ctx = setup(args.device, timeout_s=args.dist_timeout)
    threads = use_threads(args.threads, ctx.device, "ssattn train")
    # Rank 0 speaks for the job; the other ranks only report their own failures.
    logging.basicConfig(level=logging.INFO if ctx.is_main else logging.WARNING, format="%(message)s")
    who = f"ssattn train (rank {ctx.rank} of {ctx.world_size})" if ctx.distributed else "ssattn train"
    data, desc = load_data(args, "train")
    spec = {"arch": args.model, "width": args.width}
    if args.model == "unet-ss":
        spec["align_weight"] = args.align_weight
        spec.update(levels)
        # Only when not the default: a run folder written before these options resumes with the same spec.
        if args.align_form != "paper":
            spec["align_form"] = args.align_form
        if args.eta != 1.0:
            spec["eta"] = args.eta
    text = None
    if args.text is not None:
        from ssattn.text import DEFAULT_TEXT_ENCODER

        encoder_id = args.text_encoder or DEFAULT_TEXT_ENCODER
        text = load_text(args, data, encoder_id, "cpu")
        spec["text"] = {"channels": text.channels, "stages": stages, "encoder": encoder_id}
    caption = load_caption_term(args)
    if caption is not None:  # part of the run's objective: resuming the run with another one is an error
        spec["caption_loss"] = {"weight": args.caption_loss, "captioner": args.captioner,
                                "distance": args.caption_distance, "tokens": args.caption_tokens}
    torch.manual_seed(args.seed)
    model = build_model(spec)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      vgg_weights=args.vgg_weights, perceptual_weight=args.perceptual_weight,
                      checkpoint_every=args.checkpoint_every, device=str(ctx.device), amp=args.amp, accum=args.accum,
                      find_unused_parameters=args.find_unused_parameters, log_every=args.log_every,
                      progress=not args.no_progress, desc=f"train {args.model}")
    if ctx.is_main:
        ranks = f", {ctx.world_size} processes (DDP)" if ctx.distributed else ""
        guided = f", text stages {','.join(spec['text']['stages'])}" if text is not None else ""
        if levels:
            guided = (f", attention at {','.join(levels['attention_levels']) or 'none'}, alignment at "
                      f"{','.join(levels['align_levels']) or 'none'}") + guided
        cpu = f" ({threads} thread(s){' each' if ctx.distributed else ''})" if ctx.device.type == "cpu" else ""
        print(f"ssattn train: {args.model} (width {args.width}{guided}) on {desc}, {args.steps} steps, "
              f"device {ctx.device}{cpu}{ranks}")
    try:
        hist = train(model, data, cfg, args.out, spec=spec, resume=not args.no_resume, unsafe=args.unsafe_checkpoint,
                     text=text, caption=caption)
    except (RankFailure, CheckpointMismatch) as exc:  # the same on every rank: rank 0 prints it once
        if ctx.is_main:
            print(f"{who}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # e.g. the process group's timeout when another rank stopped answering
        # a bad --vgg-weights file shows only when the loss is built; the library calls it vgg_weights
        vgg = str(exc).startswith("vgg_weights ")
        flag = CLIError("--vgg-weights " + str(exc)[len("vgg_weights "):]) if vgg else None
        if not ctx.distributed:
            if flag is not None:
                raise flag from None
            raise  # ssattn.apps.cli.main prints it
        if flag is None or ctx.is_main:  # a bad --vgg-weights file is the same on every rank: rank 0 says it
            print(f"{who}: {flag or f'{type(exc).__name__}: {exc}'}", file=sys.stderr)
        return 2
    if not ctx.is_main:
        return 0
    summary = {"steps": hist["steps"], "final_loss": hist["loss"][-1] if hist["loss"] else None,
               "step_time_s": hist["step_time_s"], "images_per_s": hist["images_per_s"],
               "world_size": hist["world_size"], "loss": hist["loss_description"], "spec": spec}
    write_json(os.path.join(args.out, "history.json"), {**summary, "loss_per_step": hist["loss"],
                                                         "psnr_per_step": hist["psnr"]}, METRIC_NOTES, indent=None)
    timing = (f"{1000 * hist['step_time_s']:.1f} ms/step, {hist['images_per_s']:.1f} images/s over "
              f"{hist['world_size']} process(es)" if hist["steps_run"] > 0
              else f"no new steps (the checkpoint in {args.out} was already at step {hist['steps']})")
    print(f"done: step {hist['steps']}, loss {summary['final_loss']}, {timing} ({hist['loss_description']}); "
          f"checkpoint {os.path.join(args.out, 'checkpoint.pt')}")
    return 0
