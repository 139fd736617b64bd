"""A light image decoder shared by the reconstruction and generative methods
(autoencoder, denoising_autoencoder, context_encoder, vae, vqvae).

It maps a spatial map ``[B, C, h, h]`` (the backbone's ``forward_features``, a VQ-VAE's
quantised codes, or a VAE latent as a 1x1 map) to an image ``[B, c, S, S]``: a 1x1
convolution to `width` channels, then one ``ConvTranspose2d(4, stride 2)``-BN-ReLU stage
per doubling of the side (the width halves at each, down to `min_width`), a 3x3
convolution to the image channels, and a bilinear resize when ``S / h`` is not a power
of two. No output activation: the targets are the normalised views.

Geometry at the embedded scale (32 px): timm's resnet18 with its normal stem gives a
``[B, 512, 1, 1]`` map (five halvings of 32), so the decoder has five stages
(1 -> 2 -> 4 -> 8 -> 16 -> 32, widths 256 -> 128 -> 64 -> 32 -> 32 -> 32), about 7 M
multiply-adds per image, a fifth of the backbone's 35 M forward. With
``backbone.create.small_input = True`` the map is ``[B, 512, 4, 4]`` (three stages,
28 M, against the CIFAR-stem backbone's 554 M). At 224 px a ResNet-50's
``[B, 2048, 7, 7]`` map takes five stages (403 M against 4.1 G).
(Multiply-adds of the convolution and linear layers counted from their shapes, not timed.)
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

import gin
from methods.base import Encoder


def feature_map_shape(backbone: nn.Module, channels: int, image_size: int) -> tuple[int, int]:
    """``(C, h)`` of ``backbone.forward_features`` on a ``[1, channels, S, S]`` input.

    Runs the backbone once in eval mode without gradients (BatchNorm statistics and the
    RNG are left untouched), then restores its mode.

    Raises:
        ValueError: the backbone gives no square spatial map (e.g. a ViT's tokens).
    """
    was_training = backbone.training
    device = next(backbone.parameters()).device
    backbone.eval()
    with torch.no_grad():
        f = cast(Encoder, backbone).forward_features(torch.zeros(1, channels, image_size, image_size, device=device))
    backbone.train(was_training)
    if f.ndim != 4 or f.shape[2] != f.shape[3]:
        raise ValueError(
            f"the decoder needs a convolutional backbone whose forward_features gives a square "
            f"[B, C, h, h] map; got {tuple(f.shape)} (set backbone.create.name to a ResNet)"
        )
    return int(f.shape[1]), int(f.shape[2])


@gin.configurable(module="decoder")
class Decoder(nn.Module):
    """Spatial map ``[B, in_channels, in_size, in_size]`` -> image ``[B, out_channels, out_size, out_size]``.

    Args:
        in_channels: channels of the input map (given by the method).
        out_channels: image channels (given by the method).
        in_size: side of the input map (given by the method).
        out_size: image side (given by the method).
        width: channels after the input 1x1 convolution.
        min_width: the halving stops here.
    """

    def __init__(
        self, in_channels: int, out_channels: int, in_size: int, out_size: int, width: int = 256, min_width: int = 32
    ):
        super().__init__()
        stages = max(0, math.ceil(math.log2(out_size / in_size) - 1e-9))
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
        w = width
        for _ in range(stages):
            w_next = max(min_width, w // 2)
            layers += [
                nn.ConvTranspose2d(w, w_next, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(w_next),
                nn.ReLU(True),
            ]
            w = w_next
        layers.append(nn.Conv2d(w, out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)
        self.out_size = out_size

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.net(z)  # [B, c, in_size * 2^stages, ...]
        if y.shape[-1] != self.out_size:
            y = F.interpolate(y, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        return y  # [B, c, S, S]
