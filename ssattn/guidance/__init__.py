"""Guidance maps: the embedded default (water-contrast + saliency, no weights) and the VLM + BLIP pipeline.

The Guide interface (base.py): grids(images, prompts) -> normalised per-prompt
grids that the cache stores; render_maps() sharpens, upsamples and combines
them at any size through ssattn.guidance_pyramid. SaliencyGuide needs no
weights; BlipAligner (+ an optional LlavaCaptioner) is the paper's pipeline.
transformers is imported only when a model class is used.
"""

from .base import COMBINE_MODES, Guide, GuideBase, SaliencyGuide, normalized_grid, render_maps
from .cache import GuidanceCache, settings_id
from .hub import DEFAULT_ALIGNER, DEFAULT_CAPTIONER, ModelNotAvailableError
from .prompts import DEFAULT_PROMPTS, parse_caption, parse_classes, prompts_from_caption
from .embedded import embedded_guidance, guidance_grid
from .saliency import saliency_grid, saliency_guidance

__all__ = [
    "COMBINE_MODES", "DEFAULT_ALIGNER", "DEFAULT_CAPTIONER", "DEFAULT_PROMPTS", "BlipAligner", "Guide", "GuideBase",
    "GuidanceCache", "LlavaCaptioner", "ModelNotAvailableError", "SaliencyGuide", "make_guide", "normalized_grid",
    "parse_caption", "parse_classes", "prompts_from_caption", "render_maps", "saliency_grid", "saliency_guidance",
    "embedded_guidance", "guidance_grid",
    "settings_id",
]


def __getattr__(name):
    # Model classes import transformers: load them on first use only.
    if name == "BlipAligner":
        from .blip import BlipAligner

        return BlipAligner
    if name == "LlavaCaptioner":
        from .llava import LlavaCaptioner

        return LlavaCaptioner
    if name == "make_guide":
        from .factory import make_guide

        return make_guide
    raise AttributeError(f"module 'ssattn.guidance' has no attribute {name!r}")
