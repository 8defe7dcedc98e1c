"""The ClipCap-style caption regulariser: enhanced and reference images agree in a captioner's feature spaces.

A ClipCap-style captioner (CLIP vision -> mapping network -> GPT-2, built from
transformers' modules; captioner.py), CLIP's preprocessing as differentiable
tensor ops (preprocess.py), ClipCap's checkpoint format (clipcap.py), the
reference-feature cache (cache.py) and CaptionFeatureLoss (loss.py), a module
over ssattn.caption_feature_loss (docs/operations.md section 4).
"""

from .captioner import SPACES, Captioner, load_captioner, save_captioner
from .clipcap import MappingReport, load_clipcap
from .loss import CaptionFeatureLoss
from .mapper import MLPMapper, TransformerMapper
from .preprocess import ClipPreprocess

__all__ = ["SPACES", "CaptionFeatureLoss", "Captioner", "ClipPreprocess", "MLPMapper", "MappingReport",
           "TransformerMapper", "load_captioner", "load_clipcap", "save_captioner"]
