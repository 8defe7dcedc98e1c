"""The -SS (semantic-sensitive) system: a VLM guidance map steers a decoder.

One mask-weighted cross-attention stage per decoder level, the guidance
pyramid that gives each level its map, and the alignment loss on decoder
features. The operations themselves live in ssattn.functional; these are
their nn.Module forms.
"""

from .modules import GuidancePyramid, SemanticAlignmentLoss, SemanticCrossAttention

__all__ = ["GuidancePyramid", "SemanticAlignmentLoss", "SemanticCrossAttention"]
