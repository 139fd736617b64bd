"""Autoencoder and denoising autoencoder on the shared backbone.

- ``autoencoder``: Hinton & Salakhutdinov 2006, "Reducing the Dimensionality of Data with
  Neural Networks" (Science): an encoder and a decoder trained to reproduce the input
  through a bottleneck, by squared pixel error.
- ``denoising_autoencoder``: Vincent, Larochelle, Bengio & Manzagol 2008, "Extracting and
  Composing Robust Features with Denoising Autoencoders" (ICML): the encoder sees a
  corrupted input and the decoder must reconstruct the clean one. The 2008 paper's
  corruption is masking noise: for each input, a fixed number of components, a fraction
  ν, chosen at random, are forced to 0. Gaussian and salt-and-pepper noise are the
  other corruptions of the stacked-DAE follow-up (Vincent et al. 2010, JMLR).

Neither paper trains a convolutional network on ImageNet or reports an ImageNet number.
One class, `AutoEncoder`; the two gin files differ only in `noise`. The encoder is the
backbone's spatial map ``forward_features(x)`` ``[B, C, h, h]``, decoded by the shared
light decoder (methods/decoder.py); the loss is the mean squared error to the clean
(normalised) view. The evaluated representation is the backbone's pooled features.

Corruptions act on the normalised view the network sees:
  - ``masking``: exactly ``round(ν H W)`` pixel positions per image (all channels) are
    set to 0, i.e. to the data's mean colour: the input carries nothing there (Vincent's
    [0, 1] inputs were set to 0, MNIST's background).
  - ``gaussian``: every component gets additive N(0, σ²) noise, σ = `noise_level`, in
    units of the data's standard deviation.
  - ``salt_and_pepper``: exactly ``round(ν H W)`` pixel positions per image are set to
    white or black (a fair coin each); needs the normalisation's `mean` and `std` to
    know which values those are.
"""

from __future__ import annotations

from typing import Callable, cast

import torch
import torch.nn.functional as F
from torch import nn

import gin
from harness import dist
from methods.base import Batch, DataInfo, Encoder, Method
from methods.decoder import Decoder, feature_map_shape

NOISES = ("masking", "gaussian", "salt_and_pepper")


def random_pixels(b: int, h: int, w: int, fraction: float, device: torch.device | None = None) -> torch.Tensor:
    """Exactly ``round(fraction h w)`` random pixel positions per image: bool ``[B, 1, H, W]``."""
    k = round(fraction * h * w)
    idx = dist.rand(b, h * w, device=device).argsort(1)[:, :k]  # [B, k] distinct positions
    return torch.zeros(b, h * w, dtype=torch.bool, device=device).scatter_(1, idx, True).view(b, 1, h, w)


def corrupt(
    x: torch.Tensor, noise: str, level: float, black: torch.Tensor | None = None, white: torch.Tensor | None = None
) -> torch.Tensor:
    """A corrupted copy of ``x`` ``[B, C, H, W]`` (normalised).

    Args:
        noise: ``masking``, ``gaussian`` or ``salt_and_pepper``.
        level: the fraction ν of pixels (masking, salt-and-pepper) or the std σ (gaussian).
        black: ``[C]`` value of a black pixel in the normalised space (salt-and-pepper).
        white: ``[C]`` value of a white pixel (salt-and-pepper).
    """
    b, c, h, w = x.shape
    if noise == "gaussian":
        return x + level * dist.randn_like(x)
    hit = random_pixels(b, h, w, level, x.device)  # [B, 1, H, W]
    if noise == "masking":
        return x.masked_fill(hit, 0.0)
    if noise == "salt_and_pepper":
        salt = dist.rand(b, 1, h, w, device=x.device) < 0.5
        value = torch.where(
            salt,
            cast(torch.Tensor, white).view(1, c, 1, 1),  # this noise needs black and white
            cast(torch.Tensor, black).view(1, c, 1, 1),
        )  # [B, C, H, W]
        return torch.where(hit, value, x)
    raise ValueError(f"unknown noise {noise!r}; autoencoder.AutoEncoder.noise is one of {', '.join(NOISES)} or None")


@gin.configurable(module="autoencoder")
class AutoEncoder(Method):
    """(Denoising) autoencoder: backbone spatial map -> light decoder -> pixels.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): ``channels`` (the decoder's output);
            ``mean``, ``std`` (the views' normalisation: black and white for salt-and-pepper noise).
        image_size: side of the views (``%IMAGE_SIZE``).
        decoder: the decoder's constructor, e.g. ``@decoder.Decoder``.
        noise: None (plain autoencoder), ``masking``, ``gaussian`` or ``salt_and_pepper``.
        noise_level: ν (fraction of pixels) or σ (gaussian).
    """

    black: torch.Tensor | None  # buffers with noise='salt_and_pepper'
    white: torch.Tensor | None

    data_parallel = True  # per-image reconstruction; noise drawn for the global batch (harness/dist.py)

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        image_size: int = gin.REQUIRED,
        decoder: Callable[..., nn.Module] = Decoder,
        noise: str | None = None,
        noise_level: float = 0.25,
    ):
        super().__init__(backbone)
        if noise is not None and noise not in NOISES:
            raise ValueError(f"autoencoder.AutoEncoder.noise = {noise!r}: use one of {', '.join(NOISES)} or None")
        self.noise, self.noise_level = noise, noise_level
        if noise == "salt_and_pepper":  # black and white in the views' normalisation
            m, s = torch.tensor(data.mean, dtype=torch.float32), torch.tensor(data.std, dtype=torch.float32)
            self.register_buffer("black", (0 - m) / s, persistent=False)  # [C]
            self.register_buffer("white", (1 - m) / s, persistent=False)
        else:
            self.black = self.white = None
        c, h = feature_map_shape(backbone, data.channels, image_size)
        self.decoder = decoder(in_channels=c, out_channels=data.channels, in_size=h, out_size=image_size)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = batch.views[0]  # [B, C, S, S], the clean target
        inp = x if self.noise is None else corrupt(x, self.noise, self.noise_level, self.black, self.white)
        recon = self.decoder(cast(Encoder, self.backbone).forward_features(inp))  # [B, C, S, S]
        return {"loss": F.mse_loss(recon, x)}
