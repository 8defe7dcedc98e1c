"""Training and evaluation of the baseline U-Net and its -SS version."""

from ssattn.metrics import psnr, ssim

from .losses import ReconstructionLoss, VGGPerceptualLoss, vgg19_features
from .trainer import TrainConfig, build_model, evaluate, load_model, train

__all__ = ["ReconstructionLoss", "TrainConfig", "VGGPerceptualLoss", "build_model", "evaluate", "load_model", "psnr",
           "ssim", "train", "vgg19_features"]
