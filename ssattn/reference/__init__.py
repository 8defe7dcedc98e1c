"""Pure-PyTorch references: the ground truth every fast path is tested against.

They follow docs/operations.md literally, differentiate through autograd, and run on
any device and floating dtype. Inputs are assumed valid (the functional API
validates them).
"""

from .alignment import alignment_loss
from .area import area_resize
from .caption_loss import caption_feature_loss
from .attention import masked_cross_attention
from .pyramid import guidance_pyramid, sharpen, similarity_grid, normalize_minmax

__all__ = [
    "area_resize",
    "alignment_loss",
    "caption_feature_loss",
    "guidance_pyramid",
    "masked_cross_attention",
    "normalize_minmax",
    "sharpen",
    "similarity_grid",
]
