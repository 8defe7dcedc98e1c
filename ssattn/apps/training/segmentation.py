"""The downstream score: a small segmentation network trained once on clean references and their object masks,
then frozen and applied to each enhancement model's output (mIoU against the masks).

A better-restored foreground looks more like the references the segmenter
learned from, so its mIoU rises: the paper's downstream argument, at toy scale.
The network is the project's U-Net (no residual, one logit per pixel).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssattn.metrics import miou

# Object pixels are rare (a few % of a scene): weigh them up, but not without bound.
MAX_POS_WEIGHT = 10.0


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> Tensor:
    """Indices of the segmenter's batch at `step` (0-based): epoch permutations seeded by (seed, epoch)."""
    per_epoch = max(1, n // batch_size)  # drop the last partial batch
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    if n < batch_size:
        return perm.repeat(math.ceil(batch_size / n))[:batch_size]
    return perm[pos * batch_size:(pos + 1) * batch_size]


def train_segmenter(images: Tensor, masks: Tensor, *, steps: int = 200, batch_size: int = 8, width: int = 8,
                    lr: float = 3e-3, seed: int = 0, device="cpu") -> nn.Module:
    """Train a binary segmenter on images (n, 3, S, S) and masks (n, 1, S, S); returns it frozen, in eval mode."""
    from ssattn.models import UNet

    if images.shape[0] != masks.shape[0] or masks.shape[1] != 1 or images.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"images (n, 3, S, S) and masks (n, 1, S, S) must match, got {tuple(images.shape)} and "
                         f"{tuple(masks.shape)}")
    device = torch.device(device)
    torch.manual_seed(seed)
    net = UNet(3, 1, width, residual=False).to(device).train()
    pos = float(masks.mean())
    pos_weight = torch.tensor(min(MAX_POS_WEIGHT, (1 - pos) / max(pos, 1e-6)), device=device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for step in range(steps):
        idx = batch_indices(images.shape[0], batch_size, seed, step)
        x, y = images[idx].to(device), masks[idx].to(device)
        if step % 2:  # flips: cheap augmentation, the scenes have no preferred left or right
            x, y = x.flip(-1), y.flip(-1)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / steps))).item()
        loss = F.binary_cross_entropy_with_logits(net(x), y, pos_weight=pos_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def segment(net: nn.Module, images: Tensor, batch_size: int = 32) -> Tensor:
    """Labels (n, S, S) int64 (1 = object) of images (n, 3, S, S)."""
    dev = next(net.parameters()).device
    out = [(net(images[i:i + batch_size].to(dev).float()) > 0).long()[:, 0].cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


def segmentation_miou(net: nn.Module, images: Tensor, masks: Tensor) -> float:
    """mIoU (background and object classes) of the segmenter's labels on images against masks (n, 1, S, S)."""
    return miou(segment(net, images), (masks[:, 0] > 0.5).long(), num_classes=2)
