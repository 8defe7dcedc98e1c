"""NaLSuper text guidance: image-word cross-attention, intra-modal and fusion attention.

- modules: TextGuidedCrossAttention (TCM's cross-modal attention; the short-key
  kernel on CUDA), IntraModalAttention (image tokens), WordSelfAttention (words),
  TextConditioning (the TCM block: intra-modal, then cross-modal)
- fusion: ChannelAttention, PixelAttention, CrossLayerAttentionFusion (CAFB),
  InformationFusionAttention (IFA)
- features: TextEncoder (captions -> word features through CLIP's text encoder,
  cached), TextFeatures (words, mask, weight)
- captions: read_captions (text, a file per image, a table), caption_images (a VLM)

Definitions: docs/operations.md, sections 5 and 6. The drop-in is
ssattn.text_guided (ssattn.dropin). transformers is imported only when a
TextEncoder is built.
"""

from .captions import caption_images, read_captions
from .features import DEFAULT_TEXT_ENCODER, TextEncoder, TextFeatures, as_text_features, pad_features
from .fusion import (ChannelAttention, CrossLayerAttentionFusion, InformationFusionAttention, PixelAttention,
                     pooled_words)
from .modules import IntraModalAttention, TextConditioning, TextGuidedCrossAttention, WordSelfAttention

__all__ = ["ChannelAttention", "CrossLayerAttentionFusion", "DEFAULT_TEXT_ENCODER", "InformationFusionAttention",
           "IntraModalAttention", "PixelAttention", "TextConditioning", "TextEncoder", "TextFeatures",
           "TextGuidedCrossAttention", "WordSelfAttention", "as_text_features", "caption_images", "pad_features",
           "pooled_words", "read_captions"]
