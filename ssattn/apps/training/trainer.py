"""Training loop for the baseline and its -SS version: one process or DDP under torchrun, resumable bit for bit.

Data order: every epoch has one shuffled order of all samples, seeded by
(seed + epoch); rank r of W takes every W-th sample of it
(`ResumableDistributedSampler`, DistributedSampler's order). A step consumes
accum x batch_size samples per rank, so the run's position is (epoch, offset
into the epoch's order), saved in the checkpoint. A run resumed on the same
number of ranks draws exactly the batches it would have drawn; on another
number it continues the same epoch order (nothing repeated or skipped) and
says so.

Under DDP (the process group initialised by the caller, e.g.
`ssattn.apps.distributed.setup` in `ssattn train`): gradients are averaged
by DDP; the -SS stages run on every forward (the wrapper raises if a paired
decoder module did not run, and `alignment_loss` needs all of them), so DDP
runs with find_unused_parameters=False; a model that skips some stage in some
mode needs `TrainConfig(find_unused_parameters=True)` (`--find-unused-parameters`),
and the first step says so, naming the parameters, instead of failing
later inside DDP. Buffers are synced once at the start, not on every
forward (the reference U-Net has GroupNorm, no buffers), so a forward
pass involves no collective and a failure before backward cannot hang.

Failures: each micro-step, every rank shares an error flag with its metrics
in one all-reduce before backward, so a bad sample or a failing forward on one
rank stops every rank with the same RankFailure naming that rank (a rank that
dies or hangs is ended by torchrun or by the process group's timeout).
Metrics (loss, PSNR, ms/step, images/s) are reduced across ranks; only rank 0
writes checkpoints, logs and shows the progress bar.

A checkpoint (written atomically) holds the model, optimizer, LR scheduler,
GradScaler (fp16), step, sampler position, every rank's RNG states, the world
size and the model spec (to rebuild the model in `ssattn eval`). It holds only
tensors and plain Python values, so it loads with torch.load(weights_only=True).
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
import torch.distributed as dist
from torch import Tensor, nn

from ssattn._checks import load_failure
from ssattn._progress import progress_bar
from ssattn.apps import distributed
from ssattn.apps.data.sampler import ResumableDistributedSampler
from ssattn.metrics import psnr, ssim

from .losses import ReconstructionLoss

log = logging.getLogger("ssattn.apps.training")

CHECKPOINT = "checkpoint.pt"
FORMAT = 2  # checkpoint layout: 2 adds scheduler, sampler position, per-rank RNG states, world size


class RankFailure(RuntimeError):
    """A rank failed during a step; every rank raises this, with the same message naming the failed rank(s)."""


# --------------------------------------------------------------------------- models
def ss_levels(spec: dict) -> tuple[list[str], list[str]]:
    """(attention levels, alignment levels) of a "unet-ss" spec, in the U-Net's decoder order.

    A spec records both ("attention_levels", "align_levels"); an older one only
    "levels" (both parts), or nothing (every decoder stage).
    """
    from ssattn.models import DEFAULT_PAIRS

    base = spec.get("levels")
    base = list(DEFAULT_PAIRS) if base is None else list(base)
    attention, align = spec.get("attention_levels", base), spec.get("align_levels", base)
    # Decoder order; a name that is not a stage stays, for unet_ss to name in its error.
    return tuple([d for d in DEFAULT_PAIRS if d in part] + [d for d in part if d not in DEFAULT_PAIRS]
                 for part in (attention, align))


def comparable_spec(spec: dict | None) -> dict | None:
    """The spec with a "unet-ss" model's levels written out, so that an older spec equals its newer form."""
    if not spec or spec.get("arch") != "unet-ss":
        return spec
    attention, align = ss_levels(spec)
    out = {k: v for k, v in spec.items() if k != "levels"}
    out.update(attention_levels=attention, align_levels=align)
    return out


def build_model(spec: dict) -> nn.Module:
    """Rebuild a model from its spec: {"arch": "unet" | "unet-ss", "width": 16, ...}.

    "unet-ss": "attention_levels" and "align_levels" (or an older spec's
    "levels", both parts) pick the decoder stages with an attention block and
    those that feed the alignment loss (see ss_levels); "eta", "align_weight"
    (lambda_align) and "align_form" ("paper" | "normalized") set the alignment loss.
    spec["text"] = {"channels": Ct, "stages": [...]} adds text stages (ssattn.text_guided) to either arch.
    """
    from ssattn import text_guided
    from ssattn.models import UNet, unet_ss

    arch = spec.get("arch", "unet")
    width = int(spec.get("width", 16))
    text = spec.get("text")
    text_opts = {} if not text else {"text_stages": list(text["stages"]), "text_channels": int(text["channels"])}
    if arch == "unet":
        net = UNet(3, 3, width)
        return text_guided(net, text_opts["text_stages"], text_opts["text_channels"]) if text else net
    if arch == "unet-ss":
        opts = {k: spec[k] for k in ("heads", "backend", "eta") if k in spec}
        if "align_weight" in spec:
            opts["weight"] = spec["align_weight"]
        if "align_form" in spec:
            opts["form"] = spec["align_form"]
        attention, align = ss_levels(spec)
        return unet_ss(3, 3, width, attention_levels=attention, align_levels=align, **opts, **text_opts)
    raise ValueError(f"model arch must be 'unet' or 'unet-ss', got {arch!r}")


def guidance_kinds(model: nn.Module) -> tuple[bool, bool]:
    """(takes a guidance map, takes text): what a drop-in wrapper's stages read; (False, False) for a plain net."""
    from ssattn.dropin import GuidedModel

    if isinstance(model, GuidedModel):
        return model.takes_map, model.takes_text
    return False, False


def is_ss(model: nn.Module) -> bool:
    """Whether the model has -SS stages (takes a guidance map and has an alignment loss)."""
    return guidance_kinds(model)[0]


def run_model(model: nn.Module, x: Tensor, guidance: Tensor, kinds: tuple[bool, bool] | None = None,
              text=None) -> Tensor:
    """Call a plain network or a guided one (kinds: guidance_kinds(model), given when `model` is a DDP wrapper)."""
    takes_map, takes_text = guidance_kinds(model) if kinds is None else kinds
    kwargs = {}
    if takes_map:
        kwargs["guidance"] = guidance
    if takes_text:
        if text is None:
            raise ValueError("this model has text stages: it needs the items' captions (ssattn train/eval --text)")
        kwargs["text"] = text
    return model(x, **kwargs)


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


# --------------------------------------------------------------------------- config
AMP_MODES = ("none", "bf16", "fp16")
# "sgd" (plain, no momentum) makes a step linear in the gradient: tests compare runs through it exactly.
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 8            # per rank and micro-step; a step takes batch_size x accum x world size images
    lr: float = 2e-3
    min_lr_ratio: float = 0.05     # cosine decay to lr * min_lr_ratio
    seed: int = 0
    vgg_weights: str | None = None
    perceptual_weight: float = 0.1
    checkpoint_every: int = 0      # 0: only at the end
    device: str = "cpu"
    amp: str = "none"              # "none" | "bf16" | "fp16" (fp16 with a GradScaler)
    accum: int = 1                 # gradient accumulation: micro-steps per optimizer step
    optimizer: str = "adam"        # "adam" | "sgd" (no momentum)
    find_unused_parameters: bool = False  # DDP: only for models that skip a stage in some forward
    log_every: int = 0             # log a line of metrics every N steps (rank 0); 0: progress bar only
    progress: bool = True
    desc: str = "train"
    extra: dict = field(default_factory=dict)

    def lr_at(self, step: int) -> float:
        t = min(1.0, step / max(1, self.steps))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    def check(self) -> None:
        for name in ("steps", "batch_size", "accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {self.optimizer!r}")


def _autocast(config: TrainConfig, device: torch.device):
    if config.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if config.amp == "bf16" else torch.float16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- ranks
def _comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _gather(ctx: distributed.Context, obj) -> list:
    """Every rank's `obj`, in rank order (a list of one in a single process)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def _agree(ctx: distributed.Context, error: str | None, metrics: list[float]) -> list[float]:
    """Sum `metrics` over the ranks, sharing each rank's error in the same all-reduce.

    If any rank reports an error, every rank raises the same RankFailure naming
    the failed rank(s), so none is left waiting in the next collective.
    """
    if not ctx.distributed:
        return metrics
    w = ctx.world_size
    buf = torch.zeros(w + len(metrics), dtype=torch.float64)
    if error is None:
        buf[w:] = torch.tensor(metrics, dtype=torch.float64)
    else:
        buf[ctx.rank] = 1.0
    buf = buf.to(_comm_device(ctx.device))
    dist.all_reduce(buf)
    buf = buf.cpu()
    if bool(buf[:w].any()):
        errors = _gather(ctx, error)
        failed = "; ".join(f"rank {r} of {w} failed {e}" for r, e in enumerate(errors) if e is not None)
        raise RankFailure(f"{failed}; the job stops on every rank")
    return buf[w:].tolist()


def _attempt(ctx: distributed.Context, where: str, fn, n_metrics: int = 0):
    """fn(), agreed on by every rank: in a process group, a failure on any rank raises RankFailure on all.

    With n_metrics, fn returns (result, metrics: n_metrics floats) and the metrics come back summed over
    the ranks (shared in the same all-reduce). In a single process exceptions pass through unchanged.
    """
    if not ctx.distributed:
        return fn()
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:
        error = f"{where}: {type(exc).__name__}: {exc}"  # `where` is this rank's: the others name other samples
    own = result[1] if n_metrics and error is None else [0.0] * n_metrics
    summed = _agree(ctx, error, own)
    return (result[0], summed) if n_metrics else result


def _max_over_ranks(ctx: distributed.Context, value: float) -> float:
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device(ctx.device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


# --------------------------------------------------------------------------- checkpoints
def _rng_state(device: torch.device) -> dict:
    """This process's RNG states, as tensors and plain numbers (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    else:  # format 1: numpy's tuple, its key an array or a list of ints
        name, key, pos, has_gauss, cached = n
        np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and device.type == "cuda":
        cuda = state["cuda"]
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda, device)


def _seed(seed: int, rank: int) -> None:
    # Rank 0 keeps the run's seed (a single process is unchanged); other ranks get their own streams.
    s = int(seed) + 1_000_003 * int(rank)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def write_checkpoint(path: str, payload: dict) -> None:
    """torch.save to a temporary file in the same folder, then rename: a reader never sees half a checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
        raise ValueError(f"{path!r} is not a checkpoint written by ssattn train ({load_failure(exc)})") from None
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
    if spec is not None and saved and comparable_spec(saved) != comparable_spec(spec):
        raise CheckpointMismatch(
            f"{path} holds a run of another model or objective ({saved}) than this one ({spec}): give the run's own "
            f"settings again, choose another run folder, or start over in this one with --no-resume (resume=False), "
            f"which overwrites its checkpoint"
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
def _unused_parameters(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def train(model: nn.Module, data, config: TrainConfig, out_dir: str | None = None, *, spec: dict | None = None,
          resume: bool = True, stop_at: int | None = None, unsafe: bool = False, text=None, caption=None) -> dict:
    """Train `model` (a plain network, or a drop-in wrapper) on (degraded, reference, guidance).

    text: the items' word features (ssattn.apps.training.text.ItemText) for a model with text stages.
    caption: a CaptionTerm (ssattn.apps.training.caption) added to the reconstruction loss.

    Loss: ReconstructionLoss (L1 [+ VGG-19 perceptual]) + ss.alignment_loss()
    for -SS models. With out_dir, checkpoints go to out_dir/checkpoint.pt and
    an existing one is resumed when resume=True (unsafe: see load_checkpoint). stop_at ends the run early
    (as an interruption would; the LR schedule still spans config.steps).
    In an initialised process group the model is trained with DDP on this
    rank's shard (see the module's docstring).
    Returns a history dict (rank 0's; metrics already reduced over the ranks):
    loss and psnr per step, step_times, steps, steps_run (in this call), step_time_s
    (seconds per step, after 2 warm-up steps; NaN when none ran), images_per_s (all
    ranks), world_size, loss_description.
    """
    config.check()
    device = torch.device(config.device)
    ctx = distributed.current(device)
    say = log.info if ctx.is_main else (lambda *a, **k: None)
    source = Source(data)
    w, k, b = ctx.world_size, config.accum, config.batch_size
    per_rank = k * b                  # samples a rank takes per step
    per_step = w * per_rank           # samples of the epoch order a step consumes
    sampler = ResumableDistributedSampler(source, num_replicas=w, rank=ctx.rank, seed=config.seed)
    if len(source) // w < per_rank:
        raise ValueError(f"the training data has {len(source)} items, fewer than one step takes: batch size {b} x "
                         f"accum {k} x {w} rank(s) = {per_step}; lower the batch size or accum")
    model.to(device).train()
    criterion = ReconstructionLoss(config.vgg_weights, perceptual_weight=config.perceptual_weight).to(device)
    if caption is not None:  # + weight * CaptionFeatureLoss (the caption regulariser): the captioner stays out of the optimiser
        from .caption import WithCaption

        criterion = WithCaption(criterion, caption).to(device)
    optimizer = OPTIMIZERS[config.optimizer](model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: config.lr_at(s) / config.lr)
    scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
    kinds = guidance_kinds(model)
    ss = kinds[0] and bool(model.align_sites)  # an alignment term (none for attention-only -SS stages)
    if kinds[1] and (text is None or len(text) != len(source)):
        raise ValueError(f"this model has text stages: text must give the word features of each of the "
                         f"{len(source)} items, got {'none' if text is None else len(text)}")
    step, epoch, offset = 0, 0, 0
    history = {"loss": [], "psnr": [], "step_times": []}
    ckpt_path = os.path.join(out_dir, CHECKPOINT) if out_dir else None
    if ckpt_path and resume and os.path.isfile(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, unsafe=unsafe)
        check_resumable(ckpt, model, spec, ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, history = int(ckpt["step"]), ckpt["history"]
        history.setdefault("psnr", [])
        if ckpt.get("scheduler"):
            scheduler.load_state_dict(ckpt["scheduler"])
        else:  # format 1 set the LR by hand each step
            scheduler.last_epoch = step
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if "sampler" in ckpt:
            epoch, offset = int(ckpt["sampler"]["epoch"]), int(ckpt["sampler"]["offset"])
        else:  # format 1: a single process, whole steps per epoch
            epoch, pos = divmod(step, max(1, len(source) // per_step))
            offset = pos * per_step
        rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
        saved_world = int(ckpt.get("world_size", 1))
        if ctx.rank < len(rngs):
            _set_rng_state(rngs[ctx.rank], device)
        else:
            _seed(config.seed + step, ctx.rank)
        say("resumed from %s at step %d (epoch %d, sample %d of its order)", ckpt_path, step, epoch, offset)
        if saved_world != w and ctx.is_main:
            log.warning(
                "resuming a run saved by %d process(es) on %d: it continues the same epoch order from sample %d "
                "(nothing repeated or skipped), with %d images per step instead of %d and the same learning-rate "
                "schedule; %s. The result will not match an uninterrupted %d-process run bit for bit.",
                saved_world, w, offset, per_step, saved_world * per_rank,
                f"ranks {len(rngs)}-{w - 1} start new RNG streams" if w > len(rngs) else
                f"the RNG states of ranks {w}-{saved_world - 1} are dropped", saved_world)
    else:
        _seed(config.seed, ctx.rank)
    net = model
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      forward_sync_buffers=False, find_unused_parameters=config.find_unused_parameters)

    def no_sync(micro: int):
        # DDP all-reduces the gradients only on the last micro-step of a step.
        return net.no_sync() if ctx.distributed and micro < k - 1 else contextlib.nullcontext()

    say("%s: loss = %s%s; %d rank(s) x batch %d x accum %d = %d images per step", config.desc, criterion.describe(),
        " + alignment" if ss else "", w, b, k, per_step)

    bar = progress_bar(config.steps, initial=step, desc=config.desc, unit="step",
                       disable=not (config.progress and ctx.is_main))
    end = config.steps if stop_at is None else min(config.steps, int(stop_at))
    first, first_step = True, step
    order = None
    while step < end:
        if (len(source) - offset) // w < per_rank:  # the rest of this epoch is too short for a step
            epoch, offset, order = epoch + 1, 0, None
        if order is None:
            sampler.set_epoch(epoch, offset)
            order = iter(sampler)
        _sync(device)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        sums = [0.0, 0.0, 0.0]  # loss over micro-steps and ranks, PSNR over images, images
        for micro in range(k):
            idx = [next(order) for _ in range(b)]
            where = f"at step {step} (samples {idx})"
            # Two agreements per micro-step: after reading (DDP's forward may itself run a collective, e.g.
            # when it rebuilds its buckets in the second step) and after the loss, before backward's all-reduce.
            batch = _attempt(ctx, where, lambda: tuple(t.to(device, non_blocking=True)
                                                       for t in source.batch(torch.tensor(idx))))

            def forward():
                x, ref, g = batch
                words = None if not kinds[1] else text.batch(idx).to(device)
                with no_sync(micro):
                    with _autocast(config, device):
                        out = run_model(net, x, g, kinds, text=words)
                        loss = criterion(out, ref)
                        if ss:
                            loss = loss + model.alignment_loss()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"{config.desc}: loss became {value} at step {step}")
                return loss, [value, float(psnr(out.detach().float().clamp(0, 1), ref.float()).sum()), float(b)]

            loss, stats = _attempt(ctx, where, forward, n_metrics=3)
            with no_sync(micro):
                scaled = loss / k
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            sums = [a + v for a, v in zip(sums, stats)]
        if first and ctx.distributed and not config.find_unused_parameters:
            unused = _unused_parameters(model)
            if unused:  # the same model on every rank: every rank raises this
                raise RankFailure(f"{len(unused)} parameter(s) got no gradient in the first step "
                                  f"({', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''}): this model skips "
                                  f"a stage, so DDP needs find_unused_parameters=True (--find-unused-parameters)")
        first = False
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        step += 1
        offset += per_step
        _sync(device)
        dt = _max_over_ranks(ctx, time.perf_counter() - t0)  # the slowest rank sets the pace
        history["step_times"].append(dt)
        history["loss"].append(sums[0] / (k * w))
        history["psnr"].append(sums[1] / max(1.0, sums[2]))
        bar.update(1)
        bar.set_postfix(loss=f"{history['loss'][-1]:.4f}", psnr=f"{history['psnr'][-1]:.2f}",
                        ms_per_step=f"{1000 * dt:.0f}", img_per_s=f"{per_step / dt:.1f}")
        if config.log_every and step % config.log_every == 0:
            say("step %d/%d: loss %.4f, PSNR %.2f dB, %.1f ms/step, %.1f images/s", step, config.steps,
                history["loss"][-1], history["psnr"][-1], 1000 * dt, per_step / dt)
        if ckpt_path and config.checkpoint_every and step % config.checkpoint_every == 0 and step < end:
            _save(ctx, ckpt_path, model, optimizer, scheduler, scaler, step, epoch, offset, config, spec, history)
    bar.close()
    if ckpt_path:
        _save(ctx, ckpt_path, model, optimizer, scheduler, scaler, step, epoch, offset, config, spec, history)
    times = history["step_times"][2:] or history["step_times"]
    step_time = float(np.mean(times)) if times else float("nan")
    return {**history, "steps": step, "steps_run": step - first_step, "step_time_s": step_time, "images_per_s": per_step / step_time,
            "world_size": w,
            "loss_description": criterion.describe() + (f" + alignment (lambda {model.align.weight:g})" if ss else "")}


def _save(ctx, path, model, optimizer, scheduler, scaler, step, epoch, offset, config, spec, history) -> None:
    rngs = _gather(ctx, _rng_state(ctx.device))  # a collective: every rank takes part, rank 0 writes
    if ctx.is_main:
        save_checkpoint(path, model, optimizer, step, config, spec, history, scheduler=scheduler, scaler=scaler,
                        sampler={"epoch": epoch, "offset": offset, "seed": config.seed}, world_size=ctx.world_size,
                        rngs=rngs)


def save_checkpoint(path: str, model: nn.Module, optimizer, step: int, config: TrainConfig, spec: dict | None,
                    history: dict, *, scheduler=None, scaler=None, sampler: dict | None = None, world_size: int = 1,
                    rngs: list | None = None) -> None:
    """Write a checkpoint `train` can resume (atomically); by default that of one process at `step`.

    sampler: {"epoch", "offset", "seed"} (default: the start of epoch 0); rngs: every rank's RNG states
    (default: this process's).
    """
    write_checkpoint(path, {
        "format": FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None, "step": int(step),
        "sampler": sampler or {"epoch": 0, "offset": 0, "seed": config.seed}, "world_size": int(world_size),
        "rng": rngs if rngs is not None else [_rng_state(torch.device(config.device))], "config": asdict(config),
        "spec": spec, "history": history,
    })


@torch.no_grad()
def evaluate(model: nn.Module, data, *, batch_size: int = 16, device="cpu", text=None) -> dict:
    """PSNR / SSIM of the model's outputs (clamped to [0, 1]) and of the degraded inputs, per image and mean.

    text: the items' word features (ItemText) for a model with text stages.
    """
    device = torch.device(device)
    source = Source(data)
    model.to(device).eval()
    out_psnr, out_ssim, in_psnr, in_ssim, outputs = [], [], [], [], []
    for start in range(0, len(source), batch_size):
        idx = torch.arange(start, min(len(source), start + batch_size))
        x, ref, g = (t.to(device) for t in source.batch(idx))
        words = None if text is None else text.batch(idx).to(device)
        y = run_model(model, x, g, text=words).float().clamp(0, 1)
        out_psnr += psnr(y, ref).tolist()
        out_ssim += ssim(y, ref).tolist()
        in_psnr += psnr(x, ref).tolist()
        in_ssim += ssim(x, ref).tolist()
        outputs.append(y.cpu())
    mean = lambda v: float(np.mean(v))  # noqa: E731
    return {"psnr": mean(out_psnr), "ssim": mean(out_ssim), "input_psnr": mean(in_psnr), "input_ssim": mean(in_ssim),
            "psnr_per_image": out_psnr, "ssim_per_image": out_ssim, "outputs": torch.cat(outputs)}
