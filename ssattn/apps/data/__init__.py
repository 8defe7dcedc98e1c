"""Datasets and image loading: paired underwater datasets with cached guidance maps."""

from .sampler import ResumableDistributedSampler
from ssattn.images import IMAGE_EXTENSIONS, ImageLoadError, file_sha256, list_images, load_image, resize_image, to_image_tensor

__all__ = [
    "IMAGE_EXTENSIONS", "ImageLoadError", "LAYOUTS", "PairedGuidanceDataset", "ResumableDistributedSampler", "SyntheticUnderwater", "degrade",
    "file_sha256", "find_layout", "list_images", "load_image", "pair_files", "resize_image", "to_image_tensor",
]


def __getattr__(name):
    # paired imports ssattn.guidance, which imports .images from here: load it on first use (no import cycle).
    if name in ("LAYOUTS", "PairedGuidanceDataset", "find_layout", "pair_files"):
        from . import paired

        return getattr(paired, name)
    if name in ("SyntheticUnderwater", "degrade"):  # the photographs come from scikit-image (demo extra)
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module 'ssattn.apps.data' has no attribute {name!r}")
