"""Flax NNX networks: the pix2pix generator and discriminator, the ResNet-50 classifier and its
ImageNet weight import (from local files only)."""

from cxr_jax.models.patchgan import PatchGAN
from cxr_jax.models.pretrained import (CAFFE, TORCHVISION, Preprocess, PretrainedWeights,
                                       apply_pretrained, load_imagenet_resnet50, normalize)
from cxr_jax.models.resnet import ResNet, resnet50
from cxr_jax.models.unet import UNet

__all__ = ["CAFFE", "TORCHVISION", "PatchGAN", "Preprocess", "PretrainedWeights", "ResNet",
           "UNet", "apply_pretrained", "load_imagenet_resnet50", "normalize", "resnet50"]
