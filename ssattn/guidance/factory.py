"""Build a guide from plain options (the CLI and the dataset use this)."""

from __future__ import annotations

from .hub import DEFAULT_ALIGNER, DEFAULT_CAPTIONER
from .prompts import DEFAULT_PROMPTS, DEFAULT_QUESTION, MAX_PROMPTS, parse_classes

METHODS = ("saliency", "blip")


def make_guide(method: str = "saliency", *, aligner: str | None = None, prompt: str | None = None, classes=None,
               captioner: str | None = DEFAULT_CAPTIONER, question: str = DEFAULT_QUESTION, joint: bool = False,
               max_prompts: int = MAX_PROMPTS, fallback=DEFAULT_PROMPTS, device=None, dtype=None,
               backend: str = "auto", captioner_batch: int = 8):
    """saliency: SaliencyGuide(). blip: BlipAligner with, in order, the user prompt, the class names,
    or a LlavaCaptioner (captioner=None or "none": the fallback prompts)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "saliency":
        if prompt is not None or classes is not None:
            raise ValueError("prompt and classes need --method blip (saliency has no text input)")
        from .base import SaliencyGuide

        return SaliencyGuide(device=device, backend=backend)
    from .blip import BlipAligner

    if prompt is not None and classes is not None:
        raise ValueError("give either prompt (one text) or classes (several names), not both")
    if prompt is not None:
        if not prompt.strip():
            raise ValueError("prompt is empty")
        prompts = [" ".join(prompt.split())]
    elif classes is not None:
        prompts = parse_classes(classes)
    else:
        prompts = None
    cap = None
    if prompts is None and captioner not in (None, "", "none"):
        from .llava import LlavaCaptioner

        cap = LlavaCaptioner(captioner, question=question, device=device, dtype=dtype, batch_size=captioner_batch)
    return BlipAligner(aligner or DEFAULT_ALIGNER, prompts=prompts, captioner=cap, joint=joint,
                       max_prompts=max_prompts, fallback=fallback, device=device, dtype=dtype, backend=backend)
