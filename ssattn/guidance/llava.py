"""Captioner: a LLaVA-family model asked for the key objects of a degraded image.

Any image-text-to-text model of transformers works through the same small
interface (``model_class="auto"`` uses AutoModelForImageTextToText): a
processor with a chat template, greedy decoding (deterministic, so cacheable).
A captioner is any object with ``settings`` (dict) and
``__call__(images) -> list[str]``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..images import to_image_tensor
from .hub import DEFAULT_CAPTIONER, from_pretrained, model_ref, require_transformers, revision_of
from .prompts import DEFAULT_QUESTION


def _to_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    x = to_image_tensor(image).detach().float().clamp(0, 1).cpu()
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8))


class LlavaCaptioner:
    """Asks `question` about each image and returns the model's answers (strings)."""

    def __init__(self, model: str = DEFAULT_CAPTIONER, *, question: str = DEFAULT_QUESTION, max_new_tokens: int = 48,
                 device=None, dtype=None, model_class=None, batch_size: int = 8):
        self.model_id = model
        self.question = question
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self._model_class = model_class
        require_transformers("guidance", "LLaVA captions for the guidance maps")
        config = from_pretrained("AutoConfig", model, "captioner config")
        self.processor = from_pretrained("AutoProcessor", model, "captioner processor")
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError(f"the captioner processor of {model!r} has no chat template; pass a chat model's processor")
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"  # decoder-only generation continues from the right end
        self.settings = {"captioner": model_ref(model), "captioner_revision": revision_of(model),
                         "question": question, "max_new_tokens": self.max_new_tokens, "decoding": "greedy"}
        self._model = None

    @property
    def model(self):
        if self._model is None:
            cls = self._model_class
            if cls is None or cls == "auto":
                from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

                cls = LlavaForConditionalGeneration if cls is None else AutoModelForImageTextToText
            self._model = from_pretrained(cls, self.model_id, "captioner", dtype=self.dtype).to(self.device).eval()
        return self._model

    def prompt_text(self) -> str:
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question}]}]
        return self.processor.apply_chat_template(conv, add_generation_prompt=True)

    @torch.inference_mode()
    def __call__(self, images) -> list[str]:
        pil = [_to_pil(im) for im in images]
        text = self.prompt_text()
        out: list[str] = []
        for i in range(0, len(pil), self.batch_size):
            chunk = pil[i:i + self.batch_size]
            inputs = self.processor(images=chunk, text=[text] * len(chunk), return_tensors="pt", padding=True)
            inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                      for k, v in inputs.items()}
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            new = ids[:, inputs["input_ids"].shape[1]:]
            out.extend(s.strip() for s in self.processor.batch_decode(new, skip_special_tokens=True))
        return out
