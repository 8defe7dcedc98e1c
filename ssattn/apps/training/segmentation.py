"""The downstream score: a small segmentation network trained on clean references and their per-pixel class
labels until its score on held-out validation scenes stops rising, then frozen and applied to each enhancement
model's output (per-class IoU and mIoU against the labels).

A better-restored image looks more like the references the segmenter
learned from, so its score rises: the paper's downstream argument, at toy
scale. Per class, because the paper's largest gain is on one class (small,
low-contrast robots) that a mean over classes hides. The network is the
project's U-Net (no residual, one logit per class).
"""

from __future__ import annotations

import copy
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssattn.metrics import confusion_matrix, iou_per_class, mean_iou

# Object pixels are rare (a few % of a scene): weigh rare classes up, but not without bound.
MAX_CLASS_WEIGHT = 10.0
# The trained segmenter as a file `ssattn metrics --segmenter FILE --classes K` reads (save_torchscript).
TORCHSCRIPT_FILE = "segmenter.torchscript.pt"


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> Tensor:
    """Indices of the segmenter's batch at `step` (0-based): epoch permutations seeded by (seed, epoch)."""
    per_epoch = max(1, n // batch_size)  # drop the last partial batch
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    if n < batch_size:
        return perm.repeat(math.ceil(batch_size / n))[:batch_size]
    return perm[pos * batch_size:(pos + 1) * batch_size]


def class_weights(labels: Tensor, num_classes: int) -> Tensor:
    """Cross-entropy weights: (median class frequency / frequency), clamped to [1/MAX, MAX]; 1 for absent classes."""
    counts = torch.bincount(labels.flatten(), minlength=num_classes).double()
    present = counts > 0
    freq = counts / counts.sum()
    median = freq[present].median()
    w = torch.where(present, median / freq.clamp_min(1e-12), torch.ones_like(freq))
    return w.clamp(1 / MAX_CLASS_WEIGHT, MAX_CLASS_WEIGHT).float()


@dataclass
class SegmenterFit:
    """What train_segmenter did: steps run, the step whose weights were kept, validation mIoU per evaluation."""

    steps_run: int = 0
    best_step: int = 0
    best_miou: float = float("nan")
    val_miou: list = field(default_factory=list)   # [(step, mIoU)]
    stopped_early: bool = False


def _check_pair(images: Tensor, labels: Tensor, what: str) -> None:
    if (not isinstance(images, Tensor) or not isinstance(labels, Tensor) or images.dim() != 4 or labels.dim() != 3
            or images.shape[0] != labels.shape[0] or images.shape[-2:] != labels.shape[-2:]
            or labels.is_floating_point()):
        raise ValueError(f"{what}: images (n, 3, S, S) and integer labels (n, S, S) must match, got "
                         f"{tuple(getattr(images, 'shape', ()))} and {tuple(getattr(labels, 'shape', ()))}")


def train_segmenter(images: Tensor, labels: Tensor, *, num_classes: int, val=None, max_steps: int = 3000,
                    eval_every: int = 100, patience: int = 4, batch_size: int = 16, width: int = 16,
                    lr: float = 3e-3, seed: int = 0, device="cpu") -> tuple[nn.Module, SegmenterFit]:
    """Train a segmenter on images (n, 3, S, S) and labels (n, S, S) (class indices); returns it frozen (eval
    mode) with its SegmenterFit.

    val=(images, labels): every `eval_every` steps the validation mIoU is measured; training stops when it has
    not risen for `patience` evaluations in a row (or at max_steps), and the weights of the best evaluation are
    kept (early stopping). Without val it trains max_steps steps and keeps the last weights.
    """
    from ssattn.models import UNet

    _check_pair(images, labels, "train_segmenter")
    if val is not None:
        _check_pair(*val, "train_segmenter val")
    for name, v in (("num_classes", num_classes), ("max_steps", max_steps), ("eval_every", eval_every),
                    ("patience", patience), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    device = torch.device(device)
    torch.manual_seed(seed)
    net = UNet(3, num_classes, width, residual=False).to(device).train()
    weight = class_weights(labels, num_classes).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    fit = SegmenterFit()
    best_state, waited = None, 0
    for step in range(1, max_steps + 1):
        idx = batch_indices(images.shape[0], batch_size, seed, step - 1)
        x, y = images[idx].to(device), labels[idx].to(device)
        if step % 2:  # flips: cheap augmentation, the scenes have no preferred left or right
            x, y = x.flip(-1), y.flip(-1)
        loss = F.cross_entropy(net(x), y, weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        fit.steps_run = step
        if val is None or (step % eval_every and step != max_steps):
            continue
        score = segmentation_scores(net.eval(), val[0], val[1], num_classes)["miou"]
        net.train()
        fit.val_miou.append((step, score))
        if math.isnan(fit.best_miou) or score > fit.best_miou:  # the first evaluation, or a rise
            fit.best_miou, fit.best_step, waited = score, step, 0
            best_state = copy.deepcopy(net.state_dict())
        else:
            waited += 1
            if waited >= patience:
                fit.stopped_early = True
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    else:
        fit.best_step = fit.steps_run
    return net.eval().requires_grad_(False), fit


@torch.no_grad()
def segment(net: nn.Module, images: Tensor, batch_size: int = 32) -> Tensor:
    """Labels (n, S, S) int64 (the most likely class per pixel) of images (n, 3, S, S)."""
    dev = next(net.parameters()).device
    out = [net(images[i:i + batch_size].to(dev).float()).argmax(1).cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


def segmentation_scores(net: nn.Module, images: Tensor, labels: Tensor, num_classes: int) -> dict:
    """{"iou": per-class IoU (list, CLASSES order; NaN for a class absent from prediction and labels), "miou"}
    of the segmenter's labels on images against labels (n, S, S), counted over all pixels of all images."""
    conf = confusion_matrix(segment(net, images), labels, num_classes).sum(0)
    return {"iou": iou_per_class(conf).tolist(), "miou": float(mean_iou(conf))}


class _AnySize(nn.Module):
    """The U-Net for images of any size: pads the bottom and right edges (edge pixels repeated) to its multiple
    of 8 and crops the logits back. Images whose sides are multiples of 8 pass unchanged."""

    def __init__(self, net: nn.Module, multiple: int = 8):
        super().__init__()
        self.net, self.multiple = net, multiple

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2], x.shape[-1]
        pad_h, pad_w = (-h) % self.multiple, (-w) % self.multiple
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [0, pad_w, 0, pad_h], mode="replicate")
        return self.net(x)[:, :, :h, :w]


def save_torchscript(net: nn.Module, path) -> None:
    """Save a trained segmenter (the project's U-Net) as TorchScript for `ssattn metrics --segmenter`: images
    (B, 3, H, W) in [0, 1] of any size -> class logits (B, K, H, W). Loading it needs torch alone, not ssattn
    (torch.jit.load). Written on the CPU, atomically (guidance.cache.atomic_write_bytes)."""
    from ssattn.guidance.cache import atomic_write_bytes

    net = copy.deepcopy(net).cpu().float().eval().requires_grad_(False)
    with warnings.catch_warnings():
        # torch.jit's deprecation notice, and the tracer's about the U-Net's shape checks (they hold for the
        # example, and _AnySize makes them hold for every image)
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, torch.zeros(1, 3, 32, 32))
        scripted = torch.jit.script(_AnySize(traced))
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
    atomic_write_bytes(Path(os.path.abspath(os.fspath(path))), buf.getvalue())
