"""ssattn: fast kernels for the semantic-sensitive (-SS) underwater image enhancement strategy.

A guidance map from a vision-language model steers an encoder-decoder
enhancement network through a mask-weighted cross-attention at each decoder
stage and an alignment loss on decoder features. Text guidance (ssattn.text,
ssattn.text_guided) steers the same networks with the words of a caption.
See README.md and docs/.
"""

from . import models, text
from ._checks import set_value_checks
from .dropin import remove_semantic_sensitive, semantic_sensitive, text_guided
from .functional import alignment_loss, guidance_pyramid, masked_cross_attention
from .semantic import GuidancePyramid, SemanticAlignmentLoss, SemanticCrossAttention

__version__ = "0.1.0"

__all__ = [
    "GuidancePyramid",
    "SemanticAlignmentLoss",
    "SemanticCrossAttention",
    "alignment_loss",
    "guidance_pyramid",
    "masked_cross_attention",
    "models",
    "remove_semantic_sensitive",
    "semantic_sensitive",
    "set_value_checks",
    "text",
    "text_guided",
]
