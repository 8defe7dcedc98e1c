"""Image quality metrics on batched tensors, one value per image, so training code and `ssattn metrics` share them.

- full reference: `psnr`, `ssim` (and `ssim_map`), `masked_psnr`, `masked_ssim` (inside a foreground mask),
  `lpips` / `LPIPS` (the `lpips` package, backbone weights read offline);
- no reference, underwater: `uiqm` (`uiqm_terms`: UICM, UISM, UIConM), `uciqe` (`uciqe_terms`), `rgb_to_lab`;
  each by the paper's definition, or with `convention=` the public code's choices that published numbers
  come from (`UIQM_CONVENTIONS`, `UCIQE_CONVENTIONS`);
- segmentation: `confusion_matrix`, `iou_per_class`, `mean_iou`, `miou`.

Definitions and every convention chosen: docs/metrics.md.
"""

from .full_reference import masked_psnr, masked_ssim, psnr, ssim, ssim_map
from .perceptual import LPIPS, MissingWeightsError, backbone_weights_path, lpips
from .segmentation import confusion_matrix, iou_per_class, mean_iou, miou
from .underwater import (UCIQE_CONVENTIONS, UIQM_CONVENTIONS, UCIQETerms, UIQMTerms, rgb_to_lab, uciqe, uciqe_terms,
                         uicm, uiconm, uism, uiqm, uiqm_terms)

__all__ = [
    "LPIPS", "MissingWeightsError", "UCIQETerms", "UCIQE_CONVENTIONS", "UIQMTerms", "UIQM_CONVENTIONS",
    "backbone_weights_path", "confusion_matrix", "iou_per_class", "lpips", "masked_psnr", "masked_ssim", "mean_iou",
    "miou", "psnr", "rgb_to_lab", "ssim", "ssim_map", "uciqe", "uciqe_terms", "uicm", "uiconm", "uiqm", "uiqm_terms",
    "uism",
]
