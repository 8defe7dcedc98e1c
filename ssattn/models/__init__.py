"""Reference UIE networks: the baseline U-Net and its -SS version."""

from .unet import DEFAULT_PAIRS, UNet, unet_ss

__all__ = ["DEFAULT_PAIRS", "UNet", "unet_ss"]
