"""The ablation's variants: which parts of -SS each one has, how the public API builds it, and the `ssattn train`
options that train the same model on your own data.

-SS has two parts: an attention stage at each chosen decoder stage (reads
the guidance map) and the alignment loss on those stages' features (reads
the map too). Each variant keeps or drops a part, or changes the loss:

    baseline          the plain U-Net
    attention         attention stages, alignment weight 0 (lambda 0)
    alignment         the alignment loss on the plain decoder stages, no attention (paper form)
    both_paper        attention + alignment, the paper's loss form
    both_normalized   attention + alignment, the normalized (bounded) form
    eta0              attention + alignment, paper form with eta = 0 (only the background-energy term)
    baseline_2x       the U-Net at twice the steps: the doubling check of the budget
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

GUIDANCES = ("oracle", "embedded")  # the true object masks, or the embedded guidance of the degraded image


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    attention: bool = False      # -SS attention stages at the chosen levels
    align: bool = False          # the alignment loss on the chosen levels
    form: str = "paper"
    eta: float = 1.0
    weight: float = 0.1          # lambda_align
    steps_factor: int = 1

    @property
    def guided(self) -> bool:
        """Whether the model reads a guidance map (and so runs once per guidance)."""
        return self.attention or self.align

    def model_options(self, levels) -> dict:
        """Keyword arguments of ssattn.models.unet_ss for this variant ({} for the plain U-Net)."""
        if not self.guided:
            return {}
        levels = tuple(levels)
        opts = {"form": self.form, "eta": self.eta, "weight": self.weight}
        if self.attention and self.align:
            return {"levels": levels, **opts}
        return {"attention_levels": levels if self.attention else (), "align_levels": levels if self.align else (),
                **opts}

    def train_flags(self, levels) -> str:
        """The `ssattn train` options that build the same model."""
        if not self.guided:
            flags = "--model unet"
        else:
            joined = ",".join(levels)
            if self.attention and self.align:
                flags = f"--levels {joined}"
            else:
                flags = (f"--attention-levels {joined if self.attention else 'none'} "
                         f"--align-levels {joined if self.align else 'none'}")
            flags += f" --align-form {self.form} --eta {self.eta:g} --align-weight {self.weight:g}"
        return flags + (f" (x{self.steps_factor} steps)" if self.steps_factor != 1 else "")


VARIANTS = {v.name: v for v in (
    Variant("baseline", "U-Net (baseline)"),
    Variant("attention", "attention only (lambda 0)", attention=True, align=True, weight=0.0),
    Variant("alignment", "alignment only, paper form", align=True),
    Variant("both_paper", "attention + alignment, paper form", attention=True, align=True),
    Variant("both_normalized", "attention + alignment, normalized form", attention=True, align=True,
            form="normalized"),
    Variant("eta0", "attention + alignment, eta = 0", attention=True, align=True, eta=0.0),
    Variant("baseline_2x", "U-Net at 2x steps (doubling check)", steps_factor=2),
)}


def separate_stages_supported() -> bool:
    """Whether this ssattn's unet_ss can place attention and alignment on different stages (align_levels)."""
    from ssattn.models import unet_ss

    return "align_levels" in inspect.signature(unet_ss).parameters


def build(variant: Variant, width: int, levels):
    """The variant's network through the public API: ssattn.models.UNet, or unet_ss with the variant's options."""
    from ssattn.models import UNet, unet_ss

    if not variant.guided:
        return UNet(3, 3, width)
    opts = variant.model_options(levels)
    if "align_levels" in opts and not separate_stages_supported():
        raise ValueError(f"variant {variant.name!r} needs unet_ss(attention_levels=..., align_levels=...), which this "
                         "version of ssattn does not have")
    return unet_ss(3, 3, width, **opts)
