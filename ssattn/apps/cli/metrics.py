"""`ssattn metrics OUTPUTS... [--ref REFS] [--masks MASKS] [--out DIR]`: the evaluation table of folders of images.

Each OUTPUTS folder is a method (a row of the table). Files are matched by stem across OUTPUTS, REFS and
MASKS. Writes DIR/metrics.csv (a row per method and image), DIR/summary.json and DIR/summary.md (mean,
std and count per metric and method) and prints the table. Definitions: docs/metrics.md.
"""

from __future__ import annotations

import os

from .common import CLIError, check_output_folder, positive_int, resolve_device

UIQM_CONVENTIONS = ("paper", "funiegan")    # ssattn.metrics.underwater's, kept here so that --help imports no torch
UCIQE_CONVENTIONS = ("paper", "authors")


def _classes(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2, got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (background and at least one class), got {value}")
    return value


def register(sub) -> None:
    p = sub.add_parser(
        "metrics", help="score folders of enhanced images: PSNR, SSIM, LPIPS, UIQM, UCIQE, foreground and mIoU",
        description=(
            "Score every image in each OUTPUTS folder (one folder per method; the table gets a row per method). "
            "Always: UIQM and UCIQE (no reference). With --ref: PSNR, SSIM and LPIPS against the reference of the "
            "same name (file stem). With --masks and --ref: PSNR and SSIM inside the mask (nonzero pixels). With "
            "--segmenter and --classes: the segmenter's per-class IoU and mIoU on each output against the label "
            "maps in --masks. Unmatched and unreadable files are reported, not fatal."),
    )
    p.add_argument("outputs", nargs="+", metavar="OUTPUTS", help="folders of enhanced images, one per method")
    p.add_argument("--ref", default=None, metavar="REFS", help="folder of reference images (full-reference metrics)")
    p.add_argument("--masks", default=None, metavar="MASKS",
                   help="folder of masks / label maps (one channel of class indices; 0 = background)")
    p.add_argument("--out", default="ssattn-metrics", metavar="DIR",
                   help="where metrics.csv, summary.json and summary.md go (default %(default)s)")
    p.add_argument("--lpips-weights", default=None, metavar="FILE",
                   help="ImageNet weights of LPIPS' backbone (torchvision's state dict, e.g. alexnet-owt-7be5be79.pth); "
                        "default: torch hub's cache. Never downloaded")
    p.add_argument("--lpips-net", choices=("alex", "vgg", "squeeze"), default="alex",
                   help="LPIPS backbone (default %(default)s)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS (it needs the lpips package and weights)")
    p.add_argument("--segmenter", default=None, metavar="CKPT",
                   help="segmentation network: TorchScript, or a module saved whole with torch.save "
                        "(--unsafe-checkpoint); maps images (B, 3, H, W) in [0, 1] to logits (B, K, H, W). "
                        "ssattn demo writes its segmenter as segmenter.torchscript.pt (--classes 5)")
    p.add_argument("--classes", type=_classes, default=None, metavar="K", help="number of classes of --segmenter")
    p.add_argument("--unsafe-checkpoint", action="store_true",
                   help="allow a --segmenter saved whole with torch.save (loading it runs code from the file: only "
                        "for files you trust)")
    p.add_argument("--uiqm-convention", choices=UIQM_CONVENTIONS, default="paper",
                   help="paper: Panetta et al.'s definitions (default); funiegan: the choices of FUnIE-GAN's "
                        "uqim_utils.py, to reproduce published UIQM values (docs/metrics.md)")
    p.add_argument("--uciqe-convention", choices=UCIQE_CONVENTIONS, default="paper",
                   help="paper: Yang and Sowmya's definitions (default); authors: the choices of the authors' "
                        "released UCIQE.py, to reproduce published UCIQE values (docs/metrics.md)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per batch (default %(default)s)")
    p.add_argument("--workers", type=positive_int, default=min(4, os.cpu_count() or 1),
                   help="threads reading images (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N (default auto)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _folder(flag: str, path: str) -> str:
    if not os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is not a folder")
    return path


def _lpips(args, device):
    from ssattn.metrics import LPIPS, MissingWeightsError

    try:
        return LPIPS(args.lpips_net, args.lpips_weights).to(device)
    except MissingWeightsError as exc:
        raise CLIError(f"LPIPS needs {exc.weights_file} ({args.lpips_net} backbone weights), not found in torch hub's "
                       f"cache {exc.cache_folder}: pass --lpips-weights FILE (downloaded from {exc.url}), or --no-lpips"
                       ) from None
    except ImportError as exc:
        raise CLIError(f"{exc}; or pass --no-lpips") from None


def run(args) -> int:
    import sys

    from ssattn._progress import progress_bar
    from ssattn.apps import scoring

    for path in args.outputs:
        _folder("OUTPUTS", path)
    if args.ref is not None:
        _folder("--ref", args.ref)
    if args.masks is not None:
        _folder("--masks", args.masks)
    if args.segmenter is not None and (args.masks is None or args.classes is None):
        raise CLIError("--segmenter needs --masks (the label maps) and --classes K")
    if args.classes is not None and args.segmenter is None:
        raise CLIError("--classes is the segmenter's number of classes: give --segmenter too")
    check_output_folder("--out", args.out)  # before any scoring
    device = resolve_device(args.device)

    problems = []
    refs = masks = None
    for flag, folder in (("--ref", args.ref), ("--masks", args.masks)):
        if folder is None:
            continue
        found, dupes = scoring.index_folder(folder)
        problems += [{"method": None, "image": s, "file": str(folder),
                      "problem": f"{flag}: several files named {s}.* (left out)"} for s in dupes]
        if flag == "--ref":
            refs = found
        else:
            masks = found
    settings = scoring.Settings(device=device, batch_size=args.batch_size, workers=args.workers,
                                num_classes=args.classes, uiqm_convention=args.uiqm_convention,
                                uciqe_convention=args.uciqe_convention)
    if refs is not None and not args.no_lpips:
        settings.lpips = _lpips(args, device)
    if args.segmenter is not None:
        settings.segmenter = scoring.Segmenter(args.segmenter, args.classes, device, unsafe=args.unsafe_checkpoint)

    methods = []
    for name, folder in zip(scoring.method_names(args.outputs), args.outputs):
        m = scoring.pair(name, folder, refs, masks)
        problems += [{"method": name, "image": s, "file": str(folder),
                      "problem": f"several files named {s}.* (left out)"} for s in m.duplicates]
        methods.append(m)
    total = sum(len(m.items) for m in methods)
    if total == 0:
        raise CLIError(f"no images in {', '.join(repr(f) for f in args.outputs)}")

    scorer = scoring.Scorer(settings)
    columns = scorer.columns(refs is not None, masks is not None)
    bar = progress_bar(total, desc="ssattn metrics", unit="img", disable=args.no_progress)
    all_rows, summary = [], {"reference": args.ref, "masks": args.masks, "device": str(device),
                             "lpips": None if settings.lpips is None else {"net": args.lpips_net,
                                                                          "weights": settings.lpips.weights_path},
                             "segmenter": args.segmenter, "classes": args.classes,
                             "uiqm_convention": args.uiqm_convention, "uciqe_convention": args.uciqe_convention,
                             "methods": {}, "problems": problems}
    try:
        for m in methods:
            rows, found, pooled = scorer.score(m, bar)
            problems += found
            all_rows += rows
            summary["methods"][m.name] = scoring.method_summary(m, rows, columns, pooled)
    finally:
        bar.close()

    names = scoring.write_reports(args.out, all_rows, columns, summary)
    for p in problems[:20]:
        print(f"ssattn metrics: {p['file']}: {p['problem']}", file=sys.stderr)
    if len(problems) > 20:
        print(f"ssattn metrics: ... and {len(problems) - 20} more problems (summary.json)", file=sys.stderr)
    for m in summary["methods"].values():
        for key, what in (("no_reference", "outputs without a reference"),
                          ("missing", "references without an output"), ("no_mask", "outputs without a mask")):
            if m[key]:
                print(f"ssattn metrics: {m['folder']}: {len(m[key])} {what}: {', '.join(m[key][:10])}"
                      f"{' ...' if len(m[key]) > 10 else ''}", file=sys.stderr)
    print(scoring.markdown_table(summary))
    if (args.uiqm_convention, args.uciqe_convention) != ("paper", "paper"):
        print(scoring.conventions_line(summary))
    print(f"wrote {', '.join(names)} into {args.out}")
    return 0
