"""Training and evaluation of the baseline U-Net and its -SS version."""

from .losses import ReconstructionLoss, VGGPerceptualLoss, vgg19_features
from .metrics import psnr, ssim
from .trainer import TrainConfig, build_model, evaluate, load_model, train

__all__ = ["ReconstructionLoss", "TrainConfig", "VGGPerceptualLoss", "build_model", "evaluate", "load_model", "psnr",
           "ssim", "train", "vgg19_features"]
