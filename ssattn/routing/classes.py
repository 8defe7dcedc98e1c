"""The degradation classes a router tells apart, and how each is described to a model.

The first four are the classes of the VLM degradation-routing paper (A-D of its
multiple-choice prompt); "underwater" (colour cast and haze) and "low_light" are the
underwater additions. Every classifier takes any subset, in any order.
"""

from __future__ import annotations

PAPER_CLASSES = ("noise_blur_jpeg", "reflection", "motion_blur", "none")
ALL_CLASSES = PAPER_CLASSES + ("underwater", "low_light")

# The option text of the VLM's multiple-choice prompt (the routing paper's wording for A-D).
DESCRIPTIONS = {
    "noise_blur_jpeg": "super-resolution degradation (noise, blur and JPEG compression)",
    "reflection": "reflection artifacts",
    "motion_blur": "motion blur",
    "none": "no visible degradation (a high-quality image)",
    "underwater": "an underwater colour cast and haze",
    "low_light": "low light (dark and noisy)",
}

# Zero-shot CLIP prompts: several per class, averaged in the text embedding (prompt ensembling).
CLIP_PROMPTS = {
    "noise_blur_jpeg": ("a noisy, blurry, low-resolution photo with JPEG compression artifacts",
                        "a low-quality compressed photo"),
    "reflection": ("a photo taken through glass with reflections", "a photo with a reflection overlaid"),
    "motion_blur": ("a photo with motion blur", "a photo blurred by camera shake"),
    "none": ("a sharp, clean, high-quality photo", "a clear photo"),
    "underwater": ("a hazy underwater photo with a blue-green colour cast", "an underwater photo"),
    "low_light": ("a dark photo taken in low light", "an underexposed, noisy night photo"),
}


def check_classes(classes, known=None) -> tuple[str, ...]:
    """classes as a tuple of distinct non-empty strings (from `known` when given); errors name the argument."""
    if isinstance(classes, str) or not classes:
        raise ValueError(f"classes must be a non-empty sequence of class names, got {classes!r}")
    out = tuple(classes)
    if any(not isinstance(c, str) or not c.strip() for c in out) or len(set(out)) != len(out):
        raise ValueError(f"classes must be distinct non-empty strings, got {out!r}")
    if known is not None:
        unknown = [c for c in out if c not in known]
        if unknown:
            raise ValueError(f"classes {unknown} are unknown here; known classes: {tuple(known)}")
    return out
