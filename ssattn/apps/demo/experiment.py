"""The demo's experiment: baseline U-Net, its -SS version with the embedded guidance, and its -SS version with
the ground-truth masks as guidance (the oracle), trained on identical scenes and seeds and scored on held-out
scenes: PSNR / SSIM over the image, inside the object masks (foreground) and outside them (background), and a
frozen segmenter's per-class IoU and mIoU. The ablation (ssattn.apps.ablation) runs on the same scenes and scores.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import Tensor, nn

MODELS = ("baseline", "ss", "ss_oracle")
LABELS = {"baseline": "U-Net", "ss": "U-Net-SS", "ss_oracle": "U-Net-SS oracle"}
IMAGE_METRICS = ("psnr", "ssim", "psnr_fg", "ssim_fg", "miou")


def make_scenes(size: int, n_train: int, n_test: int, seed: int) -> dict:
    """{"train"/"test": {"degraded", "reference", "guidance", "mask", "labels"}}: scenes.UnderwaterScenes with the
    embedded guidance; labels are the per-pixel classes (scenes.CLASSES)."""
    from ssattn.apps.data.scenes import UnderwaterScenes

    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        ds = UnderwaterScenes(size, n, seed, split)
        deg, ref, guide = ds.tensors()
        out[split] = {"degraded": deg, "reference": ref, "guidance": guide, "mask": ds.masks(), "labels": ds.labels()}
    return out


def build_model(name: str, width: int, levels, **ss_options) -> nn.Module:
    from ssattn.models import UNet, unet_ss

    if name == "baseline":
        return UNet(3, 3, width)
    return unet_ss(3, 3, width, levels=levels, **ss_options)


def guidance_for(name: str, split: dict) -> Tensor:
    """What each model is given as guidance: the embedded map, or for the oracle the object mask itself."""
    return split["mask"] if name == "ss_oracle" else split["guidance"]


def _nanmean(values) -> float:
    v = [float(x) for x in values if not math.isnan(float(x))]
    return float(np.mean(v)) if v else float("nan")


def score_images(images: Tensor, test: dict, segmenter: nn.Module) -> dict:
    """Scores of images against test's references (means over images): PSNR / SSIM over the whole image, inside
    the masks (fg) and outside them (bg); the segmenter's per-class IoU ("iou", scenes.CLASSES order) and mIoU."""
    from ssattn.apps.data.scenes import CLASSES
    from ssattn.apps.training.segmentation import segmentation_scores
    from ssattn.metrics import masked_psnr, masked_ssim, psnr, ssim

    ref, mask = test["reference"], test["mask"]
    fg, bg = masked_psnr(images, ref, mask), masked_psnr(images, ref, 1 - mask)
    seg = segmentation_scores(segmenter, images, test["labels"], len(CLASSES))
    return {"psnr": _nanmean(psnr(images, ref)), "ssim": _nanmean(ssim(images, ref)),
            "psnr_fg": _nanmean(fg), "ssim_fg": _nanmean(masked_ssim(images, ref, mask)),
            "psnr_bg": _nanmean(bg), "ssim_bg": _nanmean(masked_ssim(images, ref, 1 - mask)),
            "miou": seg["miou"], "iou": seg["iou"], "psnr_fg_per_image": fg.tolist()}


def fit_segmenter(train: dict, *, val_share: float, max_steps: int, eval_every: int, patience: int, width: int,
                  batch_size: int, seed: int, device="cpu"):
    """The downstream segmenter (segmentation.train_segmenter, all scenes.CLASSES): trained on the references and
    labels of the first (1 - val_share) of the training scenes, stopped when its mIoU on the rest stops rising.
    Returns (segmenter on the CPU, frozen; its SegmenterFit)."""
    from ssattn.apps.data.scenes import CLASSES
    from ssattn.apps.training.segmentation import train_segmenter

    n = train["reference"].shape[0]
    n_fit = n - max(1, int(n * val_share))
    net, fit = train_segmenter(train["reference"][:n_fit], train["labels"][:n_fit], num_classes=len(CLASSES),
                               val=(train["reference"][n_fit:], train["labels"][n_fit:]), max_steps=max_steps,
                               eval_every=eval_every, patience=patience, batch_size=batch_size, width=width,
                               seed=seed, device=device)
    return net.cpu(), fit


def run_model(name: str, data: dict, segmenter: nn.Module, *, seed: int, steps: int, batch_size: int, width: int,
              levels, device, amp: str, progress: bool, lr: float = 2e-3, ss_options: dict | None = None) -> dict:
    """Train one model with one seed and score it on the held-out scenes; returns metrics and its outputs."""
    from ssattn.apps.training import TrainConfig, evaluate, train

    torch.manual_seed(seed)  # the same U-Net initialisation for all three models of a seed
    model = build_model(name, width, levels, **(ss_options or {}))
    train_set = (data["train"]["degraded"], data["train"]["reference"], guidance_for(name, data["train"]))
    test_set = (data["test"]["degraded"], data["test"]["reference"], guidance_for(name, data["test"]))
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=str(device), amp=amp,
                      progress=progress, desc=f"{LABELS[name]} seed {seed}")
    t0 = time.perf_counter()
    hist = train(model, train_set, cfg)
    train_s = time.perf_counter() - t0
    outputs = evaluate(model, test_set, device=device)["outputs"]
    scores = score_images(outputs, data["test"], segmenter)
    return {**scores, "ms_per_step": 1000 * hist["step_time_s"], "train_s": train_s, "final_loss": hist["loss"][-1],
            "params": sum(p.numel() for p in model.parameters()), "loss": hist["loss_description"],
            "outputs": outputs}
