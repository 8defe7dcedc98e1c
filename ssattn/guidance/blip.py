"""Aligner: BLIP image-text retrieval features -> per-prompt similarity grids (the paper's step 2).

Patch tokens ``vision_model(...).last_hidden_state[:, 1:]`` go through the
ITC vision head ``vision_proj``; each prompt goes through the text encoder
and ``text_proj`` on its CLS token. ssattn.guidance_pyramid (fused on the
GPU) turns features and text into the normalised grid of SPEC 1; sharpening
and upsampling happen when the maps are rendered (see base.py).

Images are resized and normalised with torch (bicubic, antialiased) using
the size, mean and std of the model's own image processor, so the work
runs batched on the GPU or in DataLoader workers; it matches the processor
(PIL bicubic on 8-bit pixels) to within its rounding.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .base import GuideBase, as_image_list, normalized_grid
from .hub import DEFAULT_ALIGNER, from_pretrained, model_ref, require_transformers, revision_of
from .prompts import DEFAULT_PROMPTS, MAX_PROMPTS, prompts_from_caption

log = logging.getLogger("ssattn.guidance")


def _image_size(image_processor) -> tuple[int, int]:
    size = getattr(image_processor, "size", None) or {}
    if isinstance(size, int):
        return (size, size)
    size = dict(size)
    if "height" in size and "width" in size:
        return (int(size["height"]), int(size["width"]))
    if "shortest_edge" in size:
        return (int(size["shortest_edge"]),) * 2
    raise ValueError(f"cannot tell the input size from the image processor's size {size!r}")


class BlipAligner(GuideBase):
    """Guidance grids from BLIP ITC features for each image's prompts.

    Prompts of an image come from, in order: the `prompts` argument of
    grids()/__call__ (one list per image); the fixed `prompts` given here
    (a user prompt or class names, same for every image); the `captioner`'s
    answer parsed by prompts_from_caption; else `fallback` (logged).
    joint=True joins an image's prompts into one text ("fish, diver") and
    yields one grid; otherwise each prompt gets its own grid.
    """

    def __init__(self, model: str = DEFAULT_ALIGNER, *, prompts=None, captioner=None, joint: bool = False,
                 max_prompts: int = MAX_PROMPTS, fallback=DEFAULT_PROMPTS, device=None, dtype=None,
                 backend: str = "auto"):
        if prompts is not None and (isinstance(prompts, str) or not all(isinstance(p, str) and p.strip() for p in prompts)):
            raise ValueError(f"prompts must be a list of non-empty strings (one text each), got {prompts!r}")
        if prompts is not None and len(prompts) == 0:
            raise ValueError("prompts is empty; pass None to use the captioner or the fallback prompts")
        self.model_id = model
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.backend = backend
        self.fixed_prompts = list(prompts) if prompts is not None else None
        self.captioner = captioner
        self.joint = bool(joint)
        self.max_prompts = int(max_prompts)
        self.fallback = list(fallback)
        require_transformers("guidance", "BLIP guidance maps")
        config = from_pretrained("AutoConfig", model, "aligner config")
        vc = config.vision_config
        self.grid_size = (vc.image_size // vc.patch_size,) * 2
        processor = from_pretrained("AutoProcessor", model, "aligner processor")
        self.tokenizer = processor.tokenizer
        ip = processor.image_processor
        self.input_size = _image_size(ip)
        self.mean = torch.tensor(ip.image_mean if ip.do_normalize else [0.0] * 3).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std if ip.do_normalize else [1.0] * 3).view(1, 3, 1, 1)
        self.settings = {
            "method": "blip", "aligner": model_ref(model), "aligner_revision": revision_of(model),
            "input_size": list(self.input_size), "grid": list(self.grid_size), "joint": self.joint,
            "prompts": self.fixed_prompts, "max_prompts": self.max_prompts, "fallback": self.fallback,
            "captioner": None if self.fixed_prompts is not None or captioner is None else dict(captioner.settings),
            "dtype": str(self.dtype).replace("torch.", ""),
        }
        self._model = None

    @property
    def needs_original(self) -> bool:
        """Whether grids() needs the original images (for the captioner), not only the preprocessed batch."""
        return self.fixed_prompts is None and self.captioner is not None

    @property
    def model(self):
        if self._model is None:
            from transformers import BlipForImageTextRetrieval

            m = from_pretrained(BlipForImageTextRetrieval, self.model_id, "aligner", dtype=self.dtype)
            self._model = m.to(self.device).eval()
        return self._model

    # ----------------------------------------------------------------- prompts
    def prompts_for(self, images, prompts=None) -> list[list[str]]:
        n = len(images)
        if prompts is not None:
            if len(prompts) != n or any(isinstance(p, str) or len(p) == 0 for p in prompts):
                raise ValueError(f"prompts must be one non-empty list of strings per image ({n} images), got {prompts!r}")
            out = [list(p) for p in prompts]
        elif self.fixed_prompts is not None:
            out = [list(self.fixed_prompts) for _ in range(n)]
        elif self.captioner is not None:
            out = [prompts_from_caption(c, self.max_prompts, self.fallback) for c in self.captioner(images)]
        else:
            out = [list(self.fallback) for _ in range(n)]
        if self.joint:
            out = [[", ".join(p)] for p in out]
        return out

    # ----------------------------------------------------------------- features
    @torch.inference_mode()
    def text_features(self, texts: list[str]) -> Tensor:
        """ITC text features (T, C): text encoder, CLS token, text_proj."""
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        m = self.model
        hidden = m.text_encoder(input_ids=tok["input_ids"].to(self.device),
                                attention_mask=tok["attention_mask"].to(self.device)).last_hidden_state
        return m.text_proj(hidden[:, 0, :])

    @torch.inference_mode()
    def image_features(self, pixels: Tensor) -> Tensor:
        """ITC patch features (B, gh*gw, C) of a preprocessed batch (B, 3, S, S) in [0, 1]."""
        x = pixels.to(self.device, torch.float32, non_blocking=True)
        x = ((x - self.mean.to(x.device)) / self.std.to(x.device)).to(self.dtype)
        m = self.model
        patches = m.vision_model(pixel_values=x).last_hidden_state[:, 1:]
        return m.vision_proj(patches)

    # ----------------------------------------------------------------- grids
    @torch.inference_mode()
    def grids(self, images=None, prompts=None, *, preprocessed: Tensor | None = None):
        """Per image normalised grids (P, gh, gw) in [0, 1] (float32, CPU) and the prompts used.

        images: list of images or a (B, 3, H, W) batch; preprocessed: the same
        images through preprocess(), stacked (then images is only needed by a captioner).
        """
        if images is not None:
            imgs, _ = as_image_list(images)
        else:
            imgs = None
            if preprocessed is None:
                raise ValueError("grids() needs images or preprocessed")
            if self.needs_original:
                raise ValueError("this aligner captions images: pass the original images as well as preprocessed")
        if preprocessed is None:
            preprocessed = torch.stack([self.preprocess(x) for x in imgs])
        n = preprocessed.shape[0]
        if imgs is not None and len(imgs) != n:
            raise ValueError(f"images has {len(imgs)} entries but preprocessed has {n}")
        per_image = self.prompts_for(imgs if imgs is not None else [None] * n, prompts)
        feats = self.image_features(preprocessed)
        texts = sorted({t for p in per_image for t in p})
        index = {t: i for i, t in enumerate(texts)}
        tfeat = self.text_features(texts)
        if all(len(p) == 1 for p in per_image):
            t = tfeat[torch.tensor([index[p[0]] for p in per_image], device=tfeat.device)]
            g = normalized_grid(feats, text=t, grid_size=self.grid_size, backend=self.backend)
            return [x.unsqueeze(0).cpu() for x in g], per_image
        img_idx = torch.tensor([b for b, p in enumerate(per_image) for _ in p], device=feats.device)
        txt_idx = torch.tensor([index[t] for p in per_image for t in p], device=feats.device)
        g = normalized_grid(feats[img_idx], text=tfeat[txt_idx], grid_size=self.grid_size, backend=self.backend).cpu()
        counts = [len(p) for p in per_image]
        return list(torch.split(g, counts)), per_image
