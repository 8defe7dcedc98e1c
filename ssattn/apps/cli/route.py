"""`ssattn route IMAGES_DIR --out DIR`: classify each image's degradation and, with experts, restore it.

Writes DIR/labels.csv (file, class, confidence, route) and, with --experts,
DIR/restored/<name>.png (<name>.<ext>.png for images whose names differ only by
extension: restored_names). Results are cached in DIR/cache (the guidance
cache's format: keyed by image content and every classifier/expert
setting, written atomically, checked on read), so a rerun skips the images
already done; unreadable images are reported and skipped.
"""

from __future__ import annotations

import os

from .common import add_progress_arg, check_output_folder, name_list, one_line, positive_int, resolve_device


def register(sub) -> None:
    p = sub.add_parser(
        "route", help="classify each image's degradation (and restore it with the class's expert)",
        description=(
            "Classify the degradation of every image in IMAGES_DIR (noise_blur_jpeg, reflection, motion_blur, none; "
            "--classes for others) and write DIR/labels.csv. With --experts CLASS=CHECKPOINT,... each image of a "
            "class goes through that `ssattn train` checkpoint and is written to DIR/restored; other classes pass "
            "through unchanged (restored images are named <name>.png, or by the full file name, a.jpg.png and "
            "a.png.png, when two images differ only by extension). Reruns skip finished images."),
    )
    p.add_argument("images", metavar="IMAGES_DIR", help="folder of images")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    p.add_argument("--classifier", choices=("embedded", "clip", "vlm"), default="embedded",
                   help="embedded (default, no weights), clip (zero-shot) or vlm (multiple-choice chat model)")
    p.add_argument("--model", default=None, metavar="ID_OR_DIR",
                   help="hub id or folder of the clip/vlm model (defaults: openai/clip-vit-base-patch32, "
                        "llava-hf/llava-1.5-7b-hf)")
    p.add_argument("--classes", default=None,
                   help="comma-separated classes (default noise_blur_jpeg,reflection,motion_blur,none; "
                        "also underwater, low_light)")
    p.add_argument("--experts", default=None, metavar="SPEC",
                   help="CLASS=CHECKPOINT[,CLASS=CHECKPOINT...]: checkpoints written by `ssattn train`")
    p.add_argument("--threshold", type=float, default=None,
                   help="images less confident than this go to --fallback (default: no threshold)")
    p.add_argument("--fallback", default=None, metavar="CLASS",
                   help="class whose expert (or passthrough) takes the uncertain images")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default auto: cuda when present)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="clip/vlm model dtype (default float16 on cuda, float32 on cpu)")
    p.add_argument("--recursive", action="store_true", help="also take images in subfolders")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N images")
    add_progress_arg(p)
    p.set_defaults(func=run)


class _CheckpointExpert:
    """Builds the nn.Module that runs an `ssattn train` checkpoint on any image size (and -SS guidance)."""

    @staticmethod
    def load(path: str, device):
        import torch
        from torch import nn

        from ssattn.apps.training import load_model
        from ssattn.apps.training.trainer import is_ss
        from ssattn.guidance import saliency_guidance

        model, _ = load_model(path, device)
        model.eval()
        ss = is_ss(model)

        class Expert(nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, x):
                # The U-Net halves the image three times: pad to a multiple of 8, crop back.
                h, w = x.shape[-2:]
                ph, pw = -h % 8, -w % 8
                xp = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
                if ss:
                    g = saliency_guidance(xp)[0]
                    y = self.model(xp, guidance=g)
                else:
                    y = self.model(xp)
                return y[..., :h, :w].clamp(0, 1)

        return Expert()


def _parse_experts(spec: str | None) -> dict:
    if not spec:
        return {}
    out = {}
    for part in spec.split(","):
        name, sep, path = part.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"--experts must be CLASS=CHECKPOINT[,CLASS=CHECKPOINT...], got {part!r}")
        if name in out:
            raise ValueError(f"--experts names class {name!r} twice")
        if not os.path.isfile(path):
            raise ValueError(f"--experts: checkpoint {path!r} of class {name!r} is not a file")
        out[name] = path
    return out


def _same_size_groups(images) -> list[list[int]]:
    """Indices of `images` grouped by shape, in order of first appearance."""
    groups: dict = {}
    for i, x in enumerate(images):
        groups.setdefault(tuple(x.shape), []).append(i)
    return list(groups.values())


def restored_names(rels) -> dict:
    """Where each image (a path relative to IMAGES_DIR) is restored to, relative to DIR/restored: its stem + .png,
    or, where that would collide with another image's (a.jpg and a.png), its full file name + .png (a.jpg.png,
    a.png.png), as `guide --overlay` names overlays."""
    from ssattn.guidance.precompute import overlay_path

    names = {rel: rel.with_suffix(".png") for rel in rels}
    while True:  # a full name can in turn meet another image's stem name (a.jpg.png); repeat until none collide
        owners: dict = {}
        for rel, name in names.items():
            owners.setdefault(name, []).append(rel)
        clashing = [rel for group in owners.values() if len(group) > 1 for rel in group
                    if names[rel] != overlay_path("", rel)]
        if not clashing:
            return names
        for rel in clashing:
            names[rel] = overlay_path("", rel)


def _write_png(path, image) -> None:
    import numpy as np
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    Image.fromarray(arr).save(tmp)
    os.replace(tmp, path)


def run(args) -> int:
    import csv
    import io
    import logging
    import sys
    from pathlib import Path

    import torch

    from ssattn._progress import progress_bar
    from ssattn.guidance import GuidanceCache, ModelNotAvailableError
    from ssattn.guidance.cache import atomic_write_bytes
    from ssattn.images import ImageLoadError, file_sha256, list_images, load_image
    from ssattn.routing import ALL_CLASSES, PAPER_CLASSES, DegradationRouter, make_classifier

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def fail(msg: str) -> int:
        print(f"ssattn route: {one_line(msg)}", file=sys.stderr)
        return 2

    if not os.path.isdir(args.images):
        return fail(f"IMAGES_DIR {args.images!r} is not a folder")
    check_output_folder("--out", args.out)
    if (args.threshold is None) != (args.fallback is None):
        return fail("--threshold and --fallback go together")
    classes = PAPER_CLASSES if not args.classes else tuple(
        name_list("--classes", args.classes, ALL_CLASSES, "is unknown here",
                  f"give some of {','.join(ALL_CLASSES)} (comma-separated)"))
    device = resolve_device(args.device or "auto")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        files = list_images(args.images, recursive=args.recursive)
        if not files:
            raise FileNotFoundError(f"no images in {args.images!r}"
                                    f"{'' if args.recursive else ' (pass --recursive to look in subfolders)'}")
        # named over the whole folder, so that --limit and reruns give each image the same name
        restored = restored_names([path.relative_to(args.images) for path in files])
        files = files[: args.limit] if args.limit else files
        classifier = make_classifier(args.classifier, classes, model=args.model, device=device, dtype=dtype)
        expert_paths = _parse_experts(args.experts)
        experts = {name: _CheckpointExpert.load(path, device) for name, path in expert_paths.items()}
        router = DegradationRouter(classifier, experts, passthrough=[c for c in classes if c not in experts],
                                   threshold=args.threshold, fallback=args.fallback)
    except (FileNotFoundError, ModelNotAvailableError, ValueError, TypeError) as exc:
        return fail(str(exc))
    settings = {"task": "route", **classifier.settings, "threshold": args.threshold, "fallback": args.fallback,
                "experts": {name: [os.path.abspath(p), file_sha256(p)] for name, p in expert_paths.items()}}
    cache = GuidanceCache(os.path.join(args.out, "cache"), settings)
    cache.write_settings()
    root, out = Path(args.images), Path(args.out)
    rows, failed, computed, cached = {}, [], 0, 0

    def record(path, scores):
        labels, routes, conf = router.routes_for(scores[None])
        rows[path] = (labels[0], float(conf[0]), routes[0])

    bar = progress_bar(len(files), disable=args.no_progress, unit="img", desc="route")
    try:
        for start in range(0, len(files), args.batch_size):
            chunk = files[start:start + args.batch_size]
            todo = []
            for path in chunk:
                try:
                    sha = file_sha256(path)
                    entry = cache.get(sha)
                    if entry is not None:
                        record(path, entry.grids.flatten())
                        cached += 1
                        continue
                    todo.append((path, sha, load_image(path)))
                except (ImageLoadError, OSError) as exc:
                    logging.getLogger("ssattn.routing").warning("%s; skipped", exc)
                    failed.append(str(path))
            if todo:
                imgs = [im.to(device) for _, _, im in todo]
                with torch.no_grad():
                    # one classifier call for the chunk (the embedded one batches images of similar sizes)
                    scores = classifier(imgs).float().cpu()
                    if experts:
                        # images of one size go through the router as one batch
                        for idx in _same_size_groups(imgs):
                            res = router(torch.stack([imgs[j] for j in idx]), scores=scores[idx].to(device))
                            for k, j in enumerate(idx):
                                if res.routes[k] in experts or res.routes[k] == "fallback":
                                    rel = restored[todo[j][0].relative_to(root)]
                                    _write_png(out / "restored" / rel, res.images[k])
                # The entry is written after the restored image, so a cached entry means the image is done.
                for (path, sha, img), s in zip(todo, scores):
                    cache.put(sha, s.view(1, 1, -1), list(classes), tuple(img.shape[-2:]))
                    record(path, s)
                computed += len(todo)
            bar.update(len(chunk))
            bar.set_postfix(new=computed, cached=cached, failed=len(failed))
    finally:
        bar.close()
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["file", "class", "confidence", "route"])
        for path in files:
            if path in rows:
                label, conf, route = rows[path]
                w.writerow([path.relative_to(root).as_posix(), label, f"{conf:.4f}", route])
        atomic_write_bytes(out / "labels.csv", buf.getvalue().encode())
    if failed:
        print("ssattn route: skipped unreadable files: " + ", ".join(failed), file=sys.stderr)
    print(f"ssattn route: {computed} classified, {cached} already cached, {len(failed)} unreadable; "
          f"labels {out / 'labels.csv'}")
    accuracy = getattr(classifier, "held_out_accuracy", None)
    if accuracy is not None and args.threshold is None:
        # The embedded classifier's labels are statistics, not a view of the scene: say how far to trust them.
        print(f"ssattn route: the embedded classifier was right on {accuracy:.0%} of photographs it never saw when "
              f"fitted (docs/routing.md); --threshold 0.7 --fallback none leaves its uncertain images as they "
              f"are, and --classifier clip or vlm look at the scene")
    return 0
