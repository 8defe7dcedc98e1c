"""`ssattn demo`: does -SS help on the objects? Baseline U-Net, -SS with the embedded guidance, and -SS with the
ground-truth masks (the oracle), end to end on synthetic underwater scenes.

Renders scenes with objects and masks (ssattn.apps.data.scenes), scores the
embedded guidance against the masks (ROC-AUC, best-threshold IoU), trains a
small segmenter of the scenes' object classes once on the clean references
(early stopping on held-back scenes; frozen: the downstream score), trains the
three models on identical data for each seed, scores them on held-out scenes
(PSNR / SSIM over the image and inside the masks, mIoU), and writes
results.json, results.md, run.json, figure.png, metrics.png and the segmenter
(segmenter.torchscript.pt, for `ssattn metrics --segmenter`) into --out. Its
-SS is the attention stages alone by default: what the -SS ablation
(benchmarks/ablation_ss.py) found not to cost quality.
"""

from __future__ import annotations

import os

from .common import CLIError, add_progress_arg, add_threads_arg, check_output_folder, resolve_device, use_threads

DEFAULTS = {"steps": 180, "size": 48, "batch_size": 8, "n_train": 192, "n_test": 32, "width": 8, "seeds": 3,
            "seg_steps": 600}
QUICK = {"steps": 3, "size": 32, "batch_size": 4, "n_train": 8, "n_test": 4, "width": 8, "seeds": 3,
         "seg_steps": 3}
ALIGN_FORMS = ("paper", "normalized")
# The downstream segmenter besides its step limit (--seg-steps): a fifth of the training scenes validates it.
# Smaller than the ablation's (width 16, benchmarks/ablation_ss.py) to fit the demo's five minutes.
SEGMENTER = {"val_share": 0.2, "eval_every": 50, "patience": 4, "width": 8, "batch_size": 16}
# The demo's -SS: attention stages only (lambda_align 0), the only -SS configuration that did not cost quality
# in the ablation (benchmarks/RESULTS.md); --align-weight 0.1 --align-form paper adds the paper's alignment loss back.
DEFAULT_ALIGN_WEIGHT = 0.0
DEFAULT_ALIGN_FORM = "normalized"  # when --align-weight > 0: bounded, unlike the paper's form
# What the ablation measured (benchmarks/ablation_ss/table.json and steps1600/table.json), cited in the demo's
# last lines.
ABLATION_NOTE = ("The -SS ablation (benchmarks/RESULTS.md, 2026-12-03: 48 px scenes, 5 paired seeds, the true masks as "
                 "guidance) measured foreground PSNR against the U-Net at 800 / 1600 steps: attention only "
                 "+0.03 ± 0.05 / +0.01 ± 0.11 dB (no effect); with the alignment loss lower in every seed, paper form "
                 "-0.98 ± 0.53 / -1.80 ± 0.66 dB, normalized form -0.84 ± 0.65 / -0.60 ± 0.19 dB; no variant gained "
                 "more than twice its spread.")


def register(sub) -> None:
    p = sub.add_parser("demo", help="baseline vs -SS vs oracle -SS U-Net on synthetic underwater scenes with objects")
    p.add_argument("--out", default="./ssattn-demo", help="output folder (default ./ssattn-demo)")
    for key, flag, what in (("steps", "--steps", "training steps per model"),
                            ("size", "--size", "scene size, divisible by 8"),
                            ("batch_size", "--batch-size", "batch size"),
                            ("n_train", "--n-train", "training scenes"),
                            ("n_test", "--n-test", "held-out scenes"),
                            ("width", "--width", "U-Net base width"),
                            ("seeds", "--seeds", "training seeds per model (mean and spread)"),
                            ("seg_steps", "--seg-steps", "step limit of the downstream segmenter (it stops earlier "
                                                         "when its validation mIoU stops rising)")):
        p.add_argument(flag, type=int, default=None, help=f"{what} (default {DEFAULTS[key]})")
    p.add_argument("--levels", default=None,
                   help="decoder stages with -SS attention, comma-separated from dec3,dec2,dec1 "
                        "(default: all on a GPU; dec3,dec2 on a CPU, where the full-resolution stage is slow)")
    p.add_argument("--align-weight", type=float, default=None,
                   help=f"lambda_align, the alignment loss's weight (default {DEFAULT_ALIGN_WEIGHT:g}: attention stages "
                        "only, the -SS configuration the ablation found not to cost quality; the paper's is 0.1)")
    p.add_argument("--align-form", choices=ALIGN_FORMS, default=None,
                   help=f"alignment loss form when --align-weight > 0 (default {DEFAULT_ALIGN_FORM}: bounded)")
    p.add_argument("--eta", type=float, default=None,
                   help="alignment loss eta when --align-weight > 0 (default: the library's, 1.0)")
    p.add_argument("--seed", type=int, default=0, help="data seed; training seeds are seed, seed+1, ...")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--amp", choices=("auto", "none", "bf16"), default="auto",
                   help="autocast (default: bf16 on CUDA, none on CPU)")
    add_threads_arg(p)
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny sizes; for tests)")
    add_progress_arg(p)
    p.set_defaults(func=run)


def _settings(args) -> dict:
    base = QUICK if args.quick else DEFAULTS
    s = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
    if s["size"] % 8 or s["size"] < 16:
        raise CLIError(f"--size must be a multiple of 8 and >= 16, got {s['size']}")
    for k in ("steps", "batch_size", "n_train", "n_test", "width", "seeds", "seg_steps"):
        if s[k] < 1:
            raise CLIError(f"--{k.replace('_', '-')} must be >= 1, got {s[k]}")
    if args.eta is not None and not args.eta >= 0:
        raise CLIError(f"--eta must be >= 0, got {args.eta}")
    if args.align_weight is not None and not args.align_weight >= 0:
        raise CLIError(f"--align-weight must be >= 0, got {args.align_weight}")
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
    return used


def _ss_options(args) -> dict:
    """unet_ss's options: attention stages only, or with the alignment loss (--align-weight > 0)."""
    weight = DEFAULT_ALIGN_WEIGHT if args.align_weight is None else args.align_weight
    if weight == 0:
        if args.align_form is not None or args.eta is not None:
            raise CLIError("--align-form and --eta set the alignment loss: they need --align-weight > 0")
        return {"align_levels": ()}
    opts = {"weight": weight, "form": args.align_form or DEFAULT_ALIGN_FORM}
    if args.eta is not None:
        opts["eta"] = args.eta
    return opts


def _describe_ss(opts: dict) -> str:
    if opts.get("align_levels") == ():
        return "attention only"
    return f"attention + alignment, {opts['form']} form, lambda {opts['weight']:g}, eta {opts.get('eta', 1.0):g}"


def run(args) -> int:
    import time
    import warnings

    import torch

    from ssattn.apps.data.scenes import CLASSES
    from ssattn.apps.demo import experiment, figures, results as res
    from ssattn.apps.jsonfile import METRIC_NOTES, dumps, write_json
    from ssattn.apps.training.guidance_quality import guidance_quality
    from ssattn.apps.training.segmentation import TORCHSCRIPT_FILE, save_torchscript
    from ssattn.metrics import masked_psnr
    from ssattn.guidance.embedded import DEFAULT_METHOD
    from ssattn.guidance.saliency import saliency_guidance

    from .train import parse_levels

    t_start, c_start = time.perf_counter(), time.process_time()
    s = _settings(args)
    device = resolve_device(args.device)
    threads = use_threads(args.threads, device, "ssattn demo")
    amp = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    if args.levels is not None:
        levels = tuple(parse_levels("--levels", args.levels))
        if not levels:
            raise CLIError("--levels: the demo's -SS needs at least one of dec3,dec2,dec1")
    else:
        levels = ("dec3", "dec2", "dec1") if device.type == "cuda" else ("dec3", "dec2")
    ss_options = _ss_options(args)
    check_output_folder("--out", args.out)
    os.makedirs(args.out, exist_ok=True)
    # Fallback notices are summarised once below instead of repeated per call.
    warnings.filterwarnings("ignore", message=r"ssattn\..*falling back", category=RuntimeWarning)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"ssattn demo: device {device} ({threads} thread(s), load average {load:.2f}), autocast {amp}, "
          f"{s['size']}x{s['size']} scenes, {s['n_train']} train / {s['n_test']} held-out, {s['steps']} steps x "
          f"batch {s['batch_size']}, U-Net width {s['width']}, -SS stages {','.join(levels)} "
          f"({_describe_ss(ss_options)}), {s['seeds']} seeds")

    t0 = time.perf_counter()
    data = experiment.make_scenes(s["size"], s["n_train"], s["n_test"], args.seed)
    test = data["test"]
    quality = guidance_quality(test["guidance"], test["mask"])
    # The previous embedded default, for comparison (one more map per test scene: cheap).
    spectral = guidance_quality(saliency_guidance(test["degraded"], backend="reference")[0], test["mask"])
    t_data = time.perf_counter() - t0
    print(f"  scenes + guidance: {t_data:.1f} s; embedded guidance ({DEFAULT_METHOD}) vs the object masks: "
          f"AUC {quality['auc']:.3f}, best-threshold IoU {quality['iou']:.3f} "
          f"(spectral-residual saliency alone: AUC {spectral['auc']:.3f}, IoU {spectral['iou']:.3f})")

    t0 = time.perf_counter()
    segmenter, seg_fit = experiment.fit_segmenter(data["train"], max_steps=s["seg_steps"], seed=args.seed,
                                                  device=device, **SEGMENTER)
    seg_file = os.path.join(args.out, TORCHSCRIPT_FILE)  # for `ssattn metrics --segmenter` (results.md says how)
    save_torchscript(segmenter, seg_file)
    bounds = {"degraded input": experiment.score_images(test["degraded"], test, segmenter),
              "reference": experiment.score_images(test["reference"], test, segmenter)}
    t_seg = time.perf_counter() - t0
    robot = CLASSES.index("robot")
    print(f"  segmenter ({len(CLASSES)} classes; {seg_fit.steps_run} steps, "
          f"{'stopped when its validation mIoU stopped rising' if seg_fit.stopped_early else 'the step limit'}, "
          f"{t_seg:.1f} s): mIoU {bounds['reference']['miou']:.3f} on the references, "
          f"{bounds['degraded input']['miou']:.3f} on the degraded inputs (robots: IoU "
          f"{bounds['reference']['iou'][robot]:.3f} / {bounds['degraded input']['iou'][robot]:.3f})")

    per_seed = {name: [] for name in experiment.MODELS}
    first_outputs = {}
    for k in range(s["seeds"]):
        seed = args.seed + k
        for name in experiment.MODELS:
            r = experiment.run_model(name, data, segmenter, seed=seed, steps=s["steps"], batch_size=s["batch_size"],
                                     width=s["width"], levels=levels, device=device, amp=amp,
                                     progress=not args.no_progress, ss_options=ss_options)
            if k == 0:
                first_outputs[name] = (r["outputs"], r["psnr_fg_per_image"], r["params"], r["loss"])
            per_seed[name].append({m: r[m] for m in res.METRICS})
            print(f"  seed {seed} {experiment.LABELS[name]:16s}: PSNR {r['psnr']:.2f} dB, fg PSNR "
                  f"{r['psnr_fg']:.2f} dB, fg SSIM {r['ssim_fg']:.4f}, mIoU {r['miou']:.3f}, "
                  f"{r['ms_per_step']:.0f} ms/step", flush=True)

    results = res.aggregate(per_seed, quality)
    table = res.table(results, extra_rows=[(k, v) for k, v in bounds.items()])
    verdict = res.verdict(results)

    # figure.png: the held-out scenes with the most object pixels, seed 0's models.
    order = test["mask"].flatten(1).sum(1).argsort(descending=True)[:min(4, s["n_test"])]
    caption = lambda name: [f"fg {first_outputs[name][1][i]:.2f} dB" for i in order.tolist()]  # noqa: E731
    in_caption = [f"fg {v:.2f} dB" for v in masked_psnr(test["degraded"][order], test["reference"][order],
                                                          test["mask"][order]).tolist()]
    shown = test["guidance"][order]
    shown = shown / shown.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)  # sharpened maps peak below 1: stretch
    columns = [("input", test["degraded"][order], in_caption), ("guidance (to max)", shown, None),
               ("object mask", test["mask"][order], None)]
    columns += [(experiment.LABELS[n], first_outputs[n][0][order], caption(n)) for n in experiment.MODELS]
    columns.append(("reference", test["reference"][order], None))
    fig = os.path.join(args.out, "figure.png")
    figures.comparison_figure(fig, columns)
    labels = {n: experiment.LABELS[n] for n in experiment.MODELS}
    figures.metrics_plot(os.path.join(args.out, "metrics.png"), [
        ("foreground PSNR (dB)", {n: results["models"][n]["per_seed"]["psnr_fg"] for n in experiment.MODELS},
         [("input", bounds["degraded input"]["psnr_fg"])], 2),
        ("segmenter mIoU", {n: results["models"][n]["per_seed"]["miou"] for n in experiment.MODELS},
         [("input", bounds["degraded input"]["miou"]), ("reference", bounds["reference"]["miou"])], 3),
    ], labels)

    total, cpu = time.perf_counter() - t_start, time.process_time() - c_start
    backends = _backends_used(device)
    run_info = {"settings": s, "data_seed": args.seed, "training_seeds": list(range(args.seed, args.seed + s["seeds"])),
                "device": str(device), "threads": threads, "load_average_at_start": load, "torch": torch.__version__,
                "autocast": amp, "ss_levels": list(levels), "ss_options": ss_options, "backends": backends,
                "guidance_method": DEFAULT_METHOD, "guidance_spectral_residual": {k: spectral[k] for k in ("auc", "iou")},
                "guidance_per_image": {k: quality[k] for k in ("auc_per_image", "iou_per_image")},
                "bounds": {k: {m: v[m] for m in experiment.IMAGE_METRICS} for k, v in bounds.items()},
                "segmenter": {"file": seg_file, "classes": list(CLASSES), "steps_run": seg_fit.steps_run,
                              "kept_step": seg_fit.best_step, "validation_miou": seg_fit.best_miou,
                              "iou": {k: v["iou"] for k, v in bounds.items()}},
                "params": {n: first_outputs[n][2] for n in experiment.MODELS},
                "loss": {n: first_outputs[n][3] for n in experiment.MODELS},
                "data_s": t_data, "segmenter_s": t_seg, "total_s": total, "cpu_s": cpu}
    write_json(os.path.join(args.out, "results.json"), results, METRIC_NOTES)
    write_json(os.path.join(args.out, "run.json"), run_info, METRIC_NOTES)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("# ssattn demo: does -SS help on the objects? (synthetic underwater scenes, held-out)\n\n")
        f.write(f"Mean ± sample std over {s['seeds']} training seeds; fg = inside the object masks; mIoU of a "
                f"segmenter trained on the clean references (frozen). Embedded guidance ({DEFAULT_METHOD}) vs the "
                f"masks: AUC {quality['auc']:.3f}, best-threshold IoU {quality['iou']:.3f}.\n\n")
        f.write("\n".join(table) + "\n\n")
        f.write("\n".join(verdict) + "\n\n")
        f.write(f"Settings: {dumps(s)}, data seed {args.seed}, device {device}, {threads} thread(s), "
                f"autocast {amp}, -SS stages {','.join(levels)}, -SS options {dumps(ss_options)}.\n"
                f"Backends: {dumps(backends)}.\nLoss (-SS): {first_outputs['ss'][3]}.\n")
        classes = ", ".join(f"{i} {c}" for i, c in enumerate(CLASSES))
        f.write(f"\nThe segmenter: {seg_file} (TorchScript; classes {classes}). Its mIoU on other images (a "
                f"folder OUTPUTS, label maps of these classes in LABELS): "
                f"`ssattn metrics OUTPUTS --masks LABELS --segmenter {seg_file} --classes {len(CLASSES)}`.\n")
    print("\n" + "\n".join(table) + "\n")
    print(f"backends: attention {backends['masked_cross_attention']}, alignment loss {backends['alignment_loss']}")
    print(f"wrote figure.png, metrics.png, results.md, results.json, run.json, {TORCHSCRIPT_FILE} into {args.out} "
          f"({total:.1f} s total, {cpu:.1f} s CPU)")
    for line in verdict:
        print(line)
    print(ABLATION_NOTE)
    chosen = "" if ss_options.get("align_levels") == () else " (set by --align-weight)"
    print(f"This demo's -SS: {_describe_ss(ss_options)}{chosen}.")
    return 0
