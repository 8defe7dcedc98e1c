"""Training loop for the baseline and its -SS version, with resumable checkpoints.

Batches are drawn from a permutation seeded by (seed, epoch), so the batch
order depends only on the step: two runs with the same seed see identical
batches, and a resumed run continues exactly where it stopped. A checkpoint
holds the model, the optimizer, the step, the RNG states and the model spec
(to rebuild the model in `ssattn eval`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from .losses import ReconstructionLoss
from .metrics import psnr, ssim

log = logging.getLogger("ssattn.apps.training")

CHECKPOINT = "checkpoint.pt"


# --------------------------------------------------------------------------- models
def build_model(spec: dict) -> nn.Module:
    """Rebuild a model from its spec: {"arch": "unet" | "unet-ss", "width": 16, "levels": None, ...}."""
    from ssattn.models import UNet, unet_ss

    arch = spec.get("arch", "unet")
    width = int(spec.get("width", 16))
    if arch == "unet":
        return UNet(3, 3, width)
    if arch == "unet-ss":
        opts = {k: spec[k] for k in ("heads", "backend", "eta") if k in spec}
        if "align_weight" in spec:
            opts["weight"] = spec["align_weight"]
        return unet_ss(3, 3, width, levels=spec.get("levels"), **opts)
    raise ValueError(f"model arch must be 'unet' or 'unet-ss', got {arch!r}")


def is_ss(model: nn.Module) -> bool:
    from ssattn.dropin import SemanticSensitive

    return isinstance(model, SemanticSensitive)


def run_model(model: nn.Module, x: Tensor, guidance: Tensor) -> Tensor:
    return model(x, guidance=guidance) if is_ss(model) else model(x)


# --------------------------------------------------------------------------- data
class Source:
    """Indexable (degraded, reference, guidance) triples: in-memory tensors, or a Dataset read per item."""

    def __init__(self, data):
        if isinstance(data, (tuple, list)) and len(data) == 3 and all(isinstance(t, Tensor) for t in data):
            self.tensors = tuple(data)
        elif hasattr(data, "tensors") and callable(data.tensors):
            self.tensors = data.tensors()
        else:
            self.tensors = None
            self.dataset = data
        if self.tensors is not None:
            n = {t.shape[0] for t in self.tensors}
            if len(n) != 1:
                raise ValueError(f"degraded, reference and guidance must have the same count, got {n}")
            self.n = n.pop()
        else:
            self.n = len(data)
        if self.n < 1:
            raise ValueError("the training data is empty")

    def __len__(self) -> int:
        return self.n

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.tensors is not None:
            return tuple(t[idx] for t in self.tensors)
        items = [self.dataset[int(i)] for i in idx]
        return tuple(torch.stack(t) for t in zip(*items))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> Tensor:
    """Indices of the batch at `step` (0-based): epoch permutations seeded by (seed, epoch)."""
    per_epoch = max(1, n // batch_size)  # drop the last partial batch
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    if n < batch_size:
        return perm.repeat(math.ceil(batch_size / n))[:batch_size]
    return perm[pos * batch_size:(pos + 1) * batch_size]


# --------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 8
    lr: float = 2e-3
    min_lr_ratio: float = 0.05     # cosine decay to lr * min_lr_ratio
    seed: int = 0
    vgg_weights: str | None = None
    perceptual_weight: float = 0.1
    checkpoint_every: int = 0      # 0: only at the end
    device: str = "cpu"
    amp: str = "none"              # "none" | "bf16"
    progress: bool = True
    desc: str = "train"
    extra: dict = field(default_factory=dict)

    def lr_at(self, step: int) -> float:
        t = min(1.0, step / max(1, self.steps))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _autocast(config: TrainConfig, device: torch.device):
    if config.amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if config.amp != "none":
        raise ValueError(f"amp must be 'none' or 'bf16', got {config.amp!r}")
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    # numpy's state as plain Python values, so that the checkpoint loads with weights_only=True.
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (str(name), [int(v) for v in key], int(pos), int(has_gauss),
                                                       float(cached)), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, model: nn.Module, optimizer, step: int, config: TrainConfig, spec: dict | None,
                    history: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "rng": _rng_state(),
               "config": asdict(config), "spec": spec, "history": history}
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves a broken checkpoint


def _allowed_globals() -> list:
    """What a weights-only load may build besides tensors and plain values: numpy arrays, which
    checkpoints written before the RNG state was stored as plain values hold."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint(path: str, map_location="cpu", *, unsafe: bool = False) -> dict:
    """The checkpoint dict, loaded with torch.load(weights_only=True) (tensors, plain values, numpy arrays).

    unsafe=True loads with weights_only=False, which runs any code the file holds: only for
    files you trust (CLI: --unsafe-checkpoint).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no file at {path!r}")
    try:
        if unsafe:
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
        else:
            with torch.serialization.safe_globals(_allowed_globals()):
                ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # an unpickling error, a broken zip, a KeyError from random bytes...
        blocked = [] if unsafe else _blocked_globals(path)
        if blocked:
            raise ValueError(
                f"checkpoint {path!r} holds objects other than tensors and plain values ({', '.join(blocked[:5])}), "
                "so it was not loaded. If you trust the file, load it with unsafe=True (CLI: --unsafe-checkpoint), "
                "which runs any code inside it"
            ) from None
        text = str(exc).strip().splitlines()
        raise ValueError(f"{path!r} is not a checkpoint written by ssattn train "
                         f"(unreadable: {type(exc).__name__}{': ' + text[0] if text else ''})") from None
    if not isinstance(ckpt, dict) or not {"model", "step"} <= set(ckpt):
        raise ValueError(f"{path!r} is not a checkpoint written by ssattn train (no model state and step)")
    return ckpt


class CheckpointMismatch(ValueError):
    """A run folder's checkpoint was written for another model than the one asked for."""


def _first(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def check_resumable(ckpt: dict, model: nn.Module, spec: dict | None, path: str) -> None:
    """Raise CheckpointMismatch, in words, when `ckpt` cannot be resumed into `model` (built from `spec`)."""
    saved = ckpt.get("spec")
    if spec is not None and saved and saved != spec:
        raise CheckpointMismatch(
            f"{path} holds a run of another model ({saved}) than this one ({spec}): choose another run folder, "
            f"or start over in this one with --no-resume (resume=False), which overwrites its checkpoint"
        )
    own, theirs = model.state_dict(), ckpt["model"]
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    reshaped = [k for k in own if k in theirs and tuple(own[k].shape) != tuple(theirs[k].shape)]
    if missing or unexpected or reshaped:
        raise CheckpointMismatch(
            f"{path} was saved from a different model: {len(missing)} of this model's tensors are missing "
            f"({_first(missing)}), {len(unexpected)} are unknown to it ({_first(unexpected)}), {len(reshaped)} have "
            f"another shape ({_first(reshaped)}): choose another run folder, or start over with --no-resume"
        )


def _blocked_globals(path: str) -> list[str]:
    """The classes and functions a weights-only load refuses in this file (read without running it)."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _allowed_globals()}
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    except Exception:  # not a torch.save file at all
        return []


def load_model(path: str, device="cpu", *, unsafe: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild the model saved in a checkpoint; returns (model, checkpoint)."""
    ckpt = load_checkpoint(path, unsafe=unsafe)
    if not ckpt.get("spec"):
        raise ValueError(f"checkpoint {path!r} has no model spec; it was not written by ssattn train")
    model = build_model(ckpt["spec"])
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


# --------------------------------------------------------------------------- loop
def train(model: nn.Module, data, config: TrainConfig, out_dir: str | None = None, *, spec: dict | None = None,
          resume: bool = True, stop_at: int | None = None, unsafe: bool = False) -> dict:
    """Train `model` (a plain network, or a semantic_sensitive wrapper) on (degraded, reference, guidance).

    Loss: ReconstructionLoss (L1 [+ VGG-19 perceptual]) + ss.alignment_loss()
    for -SS models. With out_dir, checkpoints go to out_dir/checkpoint.pt and
    an existing one is resumed when resume=True (unsafe: see load_checkpoint).
    stop_at ends the run early (as an interruption would; the LR schedule
    still spans config.steps). Returns a history dict: loss per step,
    step_time_s (seconds per step, after 2 warm-up steps; NaN when none ran),
    steps, steps_run (in this call), loss_description.
    """
    from tqdm.auto import tqdm

    device = torch.device(config.device)
    source = Source(data)
    model.to(device).train()
    criterion = ReconstructionLoss(config.vgg_weights, perceptual_weight=config.perceptual_weight).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    ss = is_ss(model)
    step, history = 0, {"loss": [], "step_times": []}
    ckpt_path = os.path.join(out_dir, CHECKPOINT) if out_dir else None
    if ckpt_path and resume and os.path.isfile(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, unsafe=unsafe)
        check_resumable(ckpt, model, spec, ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, history = int(ckpt["step"]), ckpt["history"]
        _set_rng_state(ckpt["rng"])
        log.info("resumed from %s at step %d", ckpt_path, step)
    else:
        torch.manual_seed(config.seed)
    log.info("%s: loss = %s%s", config.desc, criterion.describe(), " + alignment" if ss else "")

    first_step = step
    bar = tqdm(total=config.steps, initial=step, desc=config.desc, disable=not config.progress, leave=False,
               dynamic_ncols=True)
    end = config.steps if stop_at is None else min(config.steps, int(stop_at))
    while step < end:
        idx = batch_indices(len(source), config.batch_size, config.seed, step)
        x, ref, g = (t.to(device, non_blocking=True) for t in source.batch(idx))
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        _sync(device)
        t0 = time.perf_counter()
        with _autocast(config, device):
            out = run_model(model, x, g)
            loss = criterion(out, ref)
            if ss:
                loss = loss + model.alignment_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        history["step_times"].append(time.perf_counter() - t0)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{config.desc}: loss became {value} at step {step}")
        history["loss"].append(value)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}", s_per_step=f"{history['step_times'][-1]:.3f}")
        if ckpt_path and config.checkpoint_every and step % config.checkpoint_every == 0 and step < end:
            save_checkpoint(ckpt_path, model, optimizer, step, config, spec, history)
    bar.close()
    if ckpt_path:
        save_checkpoint(ckpt_path, model, optimizer, step, config, spec, history)
    times = history["step_times"][2:] or history["step_times"]
    return {**history, "steps": step, "steps_run": step - first_step, "step_time_s": float(np.mean(times)) if times else float("nan"),
            "loss_description": criterion.describe() + (" + alignment (lambda 0.1)" if ss else "")}


@torch.no_grad()
def evaluate(model: nn.Module, data, *, batch_size: int = 16, device="cpu") -> dict:
    """PSNR / SSIM of the model's outputs (clamped to [0, 1]) and of the degraded inputs, per image and mean."""
    device = torch.device(device)
    source = Source(data)
    model.to(device).eval()
    out_psnr, out_ssim, in_psnr, in_ssim, outputs = [], [], [], [], []
    for start in range(0, len(source), batch_size):
        idx = torch.arange(start, min(len(source), start + batch_size))
        x, ref, g = (t.to(device) for t in source.batch(idx))
        y = run_model(model, x, g).float().clamp(0, 1)
        out_psnr += psnr(y, ref).tolist()
        out_ssim += ssim(y, ref).tolist()
        in_psnr += psnr(x, ref).tolist()
        in_ssim += ssim(x, ref).tolist()
        outputs.append(y.cpu())
    mean = lambda v: float(np.mean(v))  # noqa: E731
    return {"psnr": mean(out_psnr), "ssim": mean(out_ssim), "input_psnr": mean(in_psnr), "input_ssim": mean(in_ssim),
            "psnr_per_image": out_psnr, "ssim_per_image": out_ssim, "outputs": torch.cat(outputs)}
