"""The ablation runner: every variant trained on the same scenes with the same seeds, scored on held-out scenes.

Pairing: for each training seed, every variant starts from the same initial
weights of the plain U-Net (built first under the seed; the -SS stages are
added after it) and draws the same batches in the same order (the trainer's
sampler is seeded by the seed alone). Each run records a digest of both,
so the pairing is checked, not assumed.

Resume: each run writes runs/<variant>-<guidance>-s<seed>.json (atomically)
with a hash of everything it depends on (the run's settings, the data, the
segmenter, FORMAT); a run whose file exists with the same hash is not redone.
The segmenter is trained once per folder (segmenter.pt, same rule), with a
TorchScript copy for `ssattn metrics --segmenter` (segmenter.torchscript.pt).

Runs go to `jobs` worker processes (each single-threaded by default: on a
CPU, several one-thread trainings use the cores better than one
multi-threaded one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .variants import GUIDANCES, VARIANTS, Variant, build

FORMAT = 1  # bump when a change makes earlier run files incomparable (scores, training, data)
RUNS = "runs"
SEGMENTER_FILE = "segmenter.pt"
BOUNDS = "bounds.json"
GUARD_MESSAGE = "SemanticAlignmentLoss"  # the divergence guard's warnings start with this name


@dataclass
class AblationConfig:
    """The budget and setting (flags of benchmarks/ablation_ss.py)."""

    size: int = 48
    n_train: int = 512
    n_test: int = 128
    width: int = 8
    levels: tuple = ("dec3", "dec2")
    steps: int = 800
    batch_size: int = 8
    lr: float = 2e-3
    seeds: tuple = (0, 1, 2, 3, 4)
    data_seed: int = 0
    variants: tuple = tuple(VARIANTS)
    guidances: tuple = GUIDANCES
    # The downstream segmenter: trained on the references of the first (1 - seg_val) of the training scenes,
    # validated on the rest, early stopping (ssattn.apps.training.segmentation.train_segmenter).
    seg_val: float = 0.2
    seg_width: int = 16
    seg_batch: int = 16
    seg_max_steps: int = 3000
    seg_eval_every: int = 100
    seg_patience: int = 4
    feature_images: int = 32     # held-out scenes on which each run's decoder-feature scales are measured
    threads: int = 1             # torch threads per run

    def __post_init__(self):
        self.levels, self.seeds = tuple(self.levels), tuple(int(s) for s in self.seeds)
        self.variants, self.guidances = tuple(self.variants), tuple(self.guidances)
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"variants: {unknown} are not variants; choose from {list(VARIANTS)}")
        bad = [g for g in self.guidances if g not in GUIDANCES]
        if bad or not self.guidances:
            raise ValueError(f"guidances must be some of {list(GUIDANCES)}, got {list(self.guidances)}")
        if "baseline" not in self.variants:
            raise ValueError("variants must include 'baseline' (every difference is paired with it)")
        if self.size % 8 or self.size < 16:
            raise ValueError(f"size must be a multiple of 8 and >= 16, got {self.size}")
        for name in ("n_train", "n_test", "width", "steps", "batch_size", "seg_width", "seg_batch", "seg_max_steps",
                     "seg_eval_every", "seg_patience", "feature_images", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {list(self.seeds)}")
        if not 0 < self.seg_val < 1 or self.n_train < 2:
            raise ValueError(f"seg_val must be in (0, 1) with at least 2 training scenes, got {self.seg_val} of "
                             f"{self.n_train}")
        if self.n_train < self.batch_size:
            raise ValueError(f"n_train ({self.n_train}) must be at least batch_size ({self.batch_size})")

    def data_key(self) -> dict:
        """What the scenes and the segmenter depend on."""
        keys = ("size", "n_train", "n_test", "data_seed", "seg_val", "seg_width", "seg_batch", "seg_max_steps",
                "seg_eval_every", "seg_patience")
        return {"format": FORMAT, **{k: getattr(self, k) for k in keys}}

    def run_key(self, variant: Variant, guidance: str | None, seed: int) -> dict:
        """Everything one run's result depends on."""
        what = {k: v for k, v in dataclasses.asdict(variant).items() if k != "label"}  # a label is only words
        return {"data": self.data_key(), "variant": what, "guidance": guidance, "seed": seed,
                "width": self.width, "levels": list(self.levels), "steps": self.steps * variant.steps_factor,
                "batch_size": self.batch_size, "lr": self.lr, "feature_images": self.feature_images}

    def runs(self) -> list[tuple[str, str | None, int]]:
        """(variant, guidance or None, seed) of every run, seed by seed (a stopped ablation has whole seeds)."""
        out = []
        for seed in self.seeds:
            for name in self.variants:
                for g in (self.guidances if VARIANTS[name].guided else (None,)):
                    out.append((name, g, seed))
        return out


def digest(obj) -> str:
    """A short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def state_digest(module: nn.Module) -> str:
    """A hash of a module's weights (names, shapes and values)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run_id(variant: str, guidance: str | None, seed: int) -> str:
    return f"{variant}-{guidance or 'none'}-s{seed}"


def _write_json(path: str, obj) -> None:
    """Strict JSON (a non-finite number as null with a note: ssattn.apps.jsonfile), written atomically."""
    from ssattn.apps.jsonfile import write_json

    tmp = f"{path}.tmp{os.getpid()}"
    write_json(tmp, obj, indent=1)
    os.replace(tmp, path)


def read_run(out_dir: str, config: AblationConfig, variant: str, guidance: str | None, seed: int) -> dict | None:
    """A finished run's result, or None when it is missing or was made with other settings."""
    path = os.path.join(out_dir, RUNS, run_id(variant, guidance, seed) + ".json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError):
        return None
    return result if result.get("hash") == digest(config.run_key(VARIANTS[variant], guidance, seed)) else None


# --------------------------------------------------------------------------- data and segmenter
def load_scenes(config: AblationConfig) -> dict:
    """The scenes (train and held-out, with masks and labels); the same on every call and machine."""
    from ssattn.apps.demo.experiment import make_scenes

    return make_scenes(config.size, config.n_train, config.n_test, config.data_seed)


def segmenter(config: AblationConfig, data: dict, out_dir: str, log=print) -> nn.Module:
    """The downstream segmenter: loaded from out_dir/segmenter.pt when trained with these settings, else trained
    (references of the training scenes, early stopping on a validation share of them) and saved."""
    from ssattn.apps.data.scenes import CLASSES
    from ssattn.apps.demo.experiment import fit_segmenter
    from ssattn.apps.training.segmentation import TORCHSCRIPT_FILE, save_torchscript
    from ssattn.apps.training.trainer import write_checkpoint
    from ssattn.models import UNet

    path, scripted = os.path.join(out_dir, SEGMENTER_FILE), os.path.join(out_dir, TORCHSCRIPT_FILE)
    key = digest(config.data_key())
    if os.path.isfile(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("hash") == key:
            net = UNet(3, len(CLASSES), config.seg_width, residual=False)
            net.load_state_dict(saved["state"])
            if not os.path.isfile(scripted):  # a folder from before the copy was written
                save_torchscript(net, scripted)
            return net.eval().requires_grad_(False)
    t0 = time.perf_counter()
    net, fit = fit_segmenter(data["train"], val_share=config.seg_val, max_steps=config.seg_max_steps,
                             eval_every=config.seg_eval_every, patience=config.seg_patience, width=config.seg_width,
                             batch_size=config.seg_batch, seed=config.data_seed)
    log(f"segmenter: {fit.steps_run} steps ({'stopped early' if fit.stopped_early else 'step limit'}), kept step "
        f"{fit.best_step}, validation mIoU {fit.best_miou:.3f}, {time.perf_counter() - t0:.0f} s")
    save_torchscript(net, scripted)  # first: stopped before segmenter.pt, its old hash makes the next run redo both
    write_checkpoint(path, {"hash": key, "state": net.state_dict(), "fit": dataclasses.asdict(fit)})
    return net


def bounds(config: AblationConfig, data: dict, seg: nn.Module, out_dir: str) -> dict:
    """The segmenter's and the metrics' values on the degraded inputs and on the references (out_dir/bounds.json)."""
    from ssattn.apps.demo.experiment import score_images

    test = data["test"]
    result = {name: {k: v for k, v in score_images(images, test, seg).items() if k != "psnr_fg_per_image"}
              for name, images in (("degraded input", test["degraded"]), ("reference", test["reference"]))}
    saved = torch.load(os.path.join(out_dir, SEGMENTER_FILE), map_location="cpu", weights_only=True)
    result = {"hash": digest(config.data_key()), "segmenter": saved.get("fit"), "scores": result}
    _write_json(os.path.join(out_dir, BOUNDS), result)
    return result


# --------------------------------------------------------------------------- one run
class _RecordedData(torch.utils.data.Dataset):
    """(degraded, reference, guidance) items that hash the order in which the trainer reads them."""

    def __init__(self, degraded: Tensor, reference: Tensor, guidance: Tensor):
        self.tensors_ = (degraded, reference, guidance)
        self.hash = hashlib.sha256()
        self.reads = 0

    def __len__(self) -> int:
        return self.tensors_[0].shape[0]

    def __getitem__(self, index: int):
        self.hash.update(int(index).to_bytes(4, "little"))
        self.reads += 1
        return tuple(t[index] for t in self.tensors_)


@torch.no_grad()
def feature_scales(model: nn.Module, base: nn.Module, test: dict, guidance: Tensor | None, levels,
                   n: int) -> dict:
    """Mean |F| of each level's decoder output inside and outside the object masks, on n held-out scenes.

    Read with forward hooks on the plain network's decoder modules, added after the -SS wrapper's own, so they
    see the refined outputs.
    """
    from ssattn.reference.area import area_resize

    seen = {}
    handles = [getattr(base, lv).register_forward_hook(lambda m, a, out, lv=lv: seen.__setitem__(lv, out))
               for lv in levels]
    try:
        x, mask = test["degraded"][:n], test["mask"][:n]
        model.eval()
        model(x) if guidance is None else model(x, guidance=guidance[:n])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for lv, f in seen.items():
        inside = area_resize(mask, f.shape[-2:]) > 0.5
        a = f.abs().mean(1, keepdim=True)
        out[lv] = {"in": float(a[inside].mean()) if inside.any() else float("nan"),
                   "out": float(a[~inside].mean()) if (~inside).any() else float("nan")}
    return out


def run_one(config: AblationConfig, data: dict, seg: nn.Module, variant_name: str, guidance: str | None,
            seed: int, out_dir: str) -> dict:
    """Train one variant with one seed, score it on the held-out scenes, and write its result file."""
    from ssattn.apps.demo.experiment import score_images
    from ssattn.apps.training import TrainConfig, evaluate, train

    variant = VARIANTS[variant_name]
    key = config.run_key(variant, guidance, seed)
    torch.manual_seed(seed)
    model = build(variant, config.width, config.levels)  # the plain U-Net is drawn first: the same for every variant
    base = model.model if variant.guided else model
    init = state_digest(base)
    train_split, test = data["train"], data["test"]
    pick = (lambda split: split["mask"] if guidance == "oracle" else split["guidance"])
    recorded = _RecordedData(train_split["degraded"], train_split["reference"], pick(train_split))
    cfg = TrainConfig(steps=key["steps"], batch_size=config.batch_size, lr=config.lr, seed=seed, progress=False,
                      desc=run_id(variant_name, guidance, seed))
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hist = train(model, recorded, cfg)
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    messages = list(dict.fromkeys(str(w.message) for w in caught))
    guard = [m for m in messages if GUARD_MESSAGE in m]
    test_guidance = pick(test) if variant.guided else None
    test_set = (test["degraded"], test["reference"], test_guidance if test_guidance is not None else test["mask"])
    outputs = evaluate(model, test_set)["outputs"]
    scores = score_images(outputs, test, seg)
    scores.pop("psnr_fg_per_image")
    result = {
        "hash": digest(key), "key": key, "variant": variant_name, "guidance": guidance, "seed": seed,
        "scores": scores, "init_digest": init, "batch_digest": recorded.hash.hexdigest()[:16],
        "items_read": recorded.reads, "steps": hist["steps"], "final_loss": hist["loss"][-1],
        "loss_every_50": hist["loss"][::50], "ms_per_step": 1000 * hist["step_time_s"], "train_s": train_s,
        "cpu_s": cpu_s, "guard_warnings": guard, "other_warnings": [m for m in messages if m not in guard][:5],
        "guard_history": list(model.align.guard_history) if variant.guided else [],
        "feature_scale": feature_scales(model, base, test, test_guidance, config.levels, config.feature_images),
        "params": sum(p.numel() for p in model.parameters()),
    }
    os.makedirs(os.path.join(out_dir, RUNS), exist_ok=True)
    _write_json(os.path.join(out_dir, RUNS, run_id(variant_name, guidance, seed) + ".json"), result)
    return result


def describe(result: dict) -> str:
    s = result["scores"]
    guard = "; guard warned" if result["guard_warnings"] else ""
    return (f"{run_id(result['variant'], result['guidance'], result['seed'])}: PSNR {s['psnr']:.2f}, fg "
            f"{s['psnr_fg']:.2f}, bg {s['psnr_bg']:.2f} dB, mIoU {s['miou']:.3f}, {result['ms_per_step']:.0f} "
            f"ms/step, {result['train_s']:.0f} s{guard}")


# --------------------------------------------------------------------------- all runs
_WORKER: dict = {}


def _worker_init(config: AblationConfig, out_dir: str) -> None:
    warnings.filterwarnings("ignore", message=r"ssattn\..*falling back")
    torch.set_num_threads(config.threads)
    data = load_scenes(config)
    _WORKER.update(config=config, out_dir=out_dir, data=data, seg=segmenter(config, data, out_dir))


def _worker_run(variant: str, guidance: str | None, seed: int) -> dict:
    w = _WORKER
    return run_one(w["config"], w["data"], w["seg"], variant, guidance, seed, w["out_dir"])


def run_all(config: AblationConfig, out_dir: str, *, jobs: int = 1, log=print, progress: bool = True) -> dict:
    """Run every run not yet finished (in `jobs` processes), then return {"done", "ran", "skipped"}.

    The variants that need stages this ssattn cannot build are left out with one message.
    """
    from ssattn._progress import progress_bar

    from .variants import separate_stages_supported

    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(config.threads)
    data = load_scenes(config)
    seg = segmenter(config, data, out_dir, log)
    bounds(config, data, seg, out_dir)
    todo, skipped = [], []
    for name, g, seed in config.runs():
        v = VARIANTS[name]
        if v.guided and "align_levels" in v.model_options(config.levels) and not separate_stages_supported():
            skipped.append((name, g, seed))
        elif read_run(out_dir, config, name, g, seed) is None:
            todo.append((name, g, seed))
    if skipped:
        log(f"left out {len(skipped)} run(s) of {sorted({s[0] for s in skipped})}: this ssattn's unet_ss cannot "
            "place attention and alignment on different stages (align_levels)")
    done = len(config.runs()) - len(todo) - len(skipped)
    log(f"{done} run(s) already finished, {len(todo)} to run in {min(jobs, max(1, len(todo)))} process(es)")
    bar = progress_bar(len(todo), desc="ablation", unit="run", disable=not progress)
    if jobs <= 1 or len(todo) <= 1:
        for name, g, seed in todo:
            log(describe(run_one(config, data, seg, name, g, seed, out_dir)))
            bar.update(1)
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                    initializer=_worker_init, initargs=(config, out_dir)) as pool:
            futures = [pool.submit(_worker_run, *r) for r in todo]
            for f in cf.as_completed(futures):
                log(describe(f.result()))
                bar.update(1)
    bar.close()
    return {"done": done, "ran": len(todo), "skipped": skipped}
