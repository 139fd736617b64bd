"""Views: batched, per-sample random augmentations that run on the training device.

A method's gin file declares what the loader hands it (two SimCLR crops, one RotNet
crop, ...), so each paper's augmentation protocol is configuration. Every op draws
its own random parameters per sample from torch's global RNG (saved in checkpoints).

Crops of in-memory images (Fashion-MNIST: 28x28, CIFAR) are taken with one
``grid_sample`` per batch, flips folded into the same affine map; image files are
cropped from the full decoded image where they are decoded (`harness.data.pipeline`),
and only the ops after the crop (`Augment.after_crop`) run here. Colour jitter applies
brightness, contrast, saturation and hue in a fixed order (torchvision shuffles the order per image).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

import gin
from harness.data.pipeline import Crop


def _uniform(n: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    return torch.rand(n, device=device) * (hi - lo) + lo


def _coin(n: int, p: float, device: torch.device) -> torch.Tensor:
    return torch.rand(n, device=device) < p  # [B] bool


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)  # [B, 1, H, W]


def resized_crop(
    x: torch.Tensor, size: int, scale: Sequence[float], ratio: Sequence[float], flip: float
) -> torch.Tensor:
    """Random resized crop (Szegedy 2015) and horizontal flip, per sample. x: float [B, C, H, W]."""
    b, dev = x.shape[0], x.device
    area = _uniform(b, scale[0], scale[1], dev)
    log_r = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), dev)
    w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)  # crop width / image width
    h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
    cx = (torch.rand(b, device=dev) * 2 - 1) * (1 - w)  # centre in [-1, 1] coordinates
    cy = (torch.rand(b, device=dev) * 2 - 1) * (1 - h)
    sign = torch.where(_coin(b, flip, dev), -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sign, cx, h, cy
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(
    x: torch.Tensor, p: float, brightness: float, contrast: float, saturation: float, hue: float
) -> torch.Tensor:
    """Colour jitter applied to each sample with probability `p`. x: float [B, C, H, W] in [0, 1]."""
    b, dev = x.shape[0], x.device
    on = _coin(b, p, dev).view(b, 1, 1, 1)
    y = x * _uniform(b, 1 - brightness, 1 + brightness, dev).view(b, 1, 1, 1)
    y = y.clamp(0, 1)
    mean = _gray(y).mean((1, 2, 3), keepdim=True)
    y = ((y - mean) * _uniform(b, 1 - contrast, 1 + contrast, dev).view(b, 1, 1, 1) + mean).clamp(0, 1)
    if x.shape[1] == 3:
        g = _gray(y)
        y = ((y - g) * _uniform(b, 1 - saturation, 1 + saturation, dev).view(b, 1, 1, 1) + g).clamp(0, 1)
        if hue > 0:  # rotate chroma in YIQ space
            ang = _uniform(b, -hue, hue, dev) * 2 * math.pi
            yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=dev)
            q = torch.einsum("ij,bjhw->bihw", yiq, y)
            c, s = torch.cos(ang).view(b, 1, 1), torch.sin(ang).view(b, 1, 1)
            i2, q2 = q[:, 1] * c - q[:, 2] * s, q[:, 1] * s + q[:, 2] * c
            y = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(yiq), torch.stack([q[:, 0], i2, q2], 1)).clamp(0, 1)
    return torch.where(on, y, x)


def gaussian_blur(x: torch.Tensor, p: float, sigma: Sequence[float], kernel_frac: float = 0.1) -> torch.Tensor:
    """Gaussian blur with per-sample sigma (SimCLR: kernel 10 % of the image side)."""
    b, c, hgt, wid = x.shape
    k = max(3, int(kernel_frac * hgt) // 2 * 2 + 1)
    s = _uniform(b, sigma[0], sigma[1], x.device).view(b, 1)
    t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    ker = torch.exp(-(t.view(1, -1) ** 2) / (2 * s**2))
    ker = (ker / ker.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, k]
    y = x.reshape(1, b * c, hgt, wid)
    y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), ker.view(b * c, 1, 1, k), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), ker.view(b * c, 1, k, 1), groups=b * c)
    return torch.where(_coin(b, p, x.device).view(b, 1, 1, 1), y.view(b, c, hgt, wid), x)


@gin.configurable(module="views")
class Augment:
    """One random view of a batch. Defaults follow SimCLR (Chen et al. 2020, appendix A).

    Args:
        size: output side in pixels.
        scale: crop area range as a fraction of the image; ``(1, 1)`` with ``ratio=(1, 1)``
            is a plain resize.
        ratio: crop aspect-ratio range.
        flip: probability of a horizontal flip.
        jitter: probability of colour jitter; `strength` scales SimCLR's (0.8, 0.8, 0.8, 0.2).
        grayscale: probability of dropping colour.
        blur: probability of Gaussian blur with sigma in `blur_sigma`.
        solarize: probability of solarization (BYOL).
    """

    def __init__(
        self,
        size: int = gin.REQUIRED,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip: float = 0.5,
        jitter: float = 0.8,
        strength: float = 1.0,
        grayscale: float = 0.2,
        blur: float = 0.0,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        solarize: float = 0.0,
    ):
        self.size, self.scale, self.ratio, self.flip = size, tuple(scale), tuple(ratio), flip
        self.jitter, self.strength, self.grayscale = jitter, strength, grayscale
        self.blur, self.blur_sigma, self.solarize = blur, tuple(blur_sigma), solarize

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [B, C, H, W] in [0, 1] -> [B, C, size, size] in [0, 1]."""
        return self.after_crop(resized_crop(x, self.size, self.scale, self.ratio, self.flip))

    def crop(self) -> Crop:
        """The crop and flip of this view, for a pipeline that cuts them where it decodes (`harness.data.pipeline`)."""
        return Crop(self.size, (self.scale[0], self.scale[1]), (self.ratio[0], self.ratio[1]), self.flip)

    def after_crop(self, x: torch.Tensor) -> torch.Tensor:
        """The rest of the view on a cropped batch: float [B, C, size, size] in [0, 1] -> the same shape."""
        if self.jitter > 0 and self.strength > 0:
            s = self.strength
            x = color_jitter(x, self.jitter, 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        if self.grayscale > 0 and x.shape[1] == 3:
            x = torch.where(_coin(len(x), self.grayscale, x.device).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
        if self.blur > 0:
            x = gaussian_blur(x, self.blur, self.blur_sigma)
        if self.solarize > 0:
            x = torch.where(_coin(len(x), self.solarize, x.device).view(-1, 1, 1, 1), torch.where(x < 0.5, x, 1 - x), x)
        return x


@gin.configurable(module="views")
class Views:
    """What the loader hands a method: one normalised tensor per augmentation.

    Args:
        augmentations: one `Augment` per view (multi-crop: list them all).
        mean: per-channel mean used for normalisation (the job passes the dataset's).
        std: per-channel std.
    """

    def __init__(
        self,
        augmentations: Sequence[Augment] = gin.REQUIRED,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
    ):
        self.augmentations = list(augmentations)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images: uint8 [B, C, H, W] -> list of float [B, C, S, S], normalised."""
        x = images.float().div_(255)
        return [normalize(a(x), self.mean, self.std) for a in self.augmentations]

    def crops(self) -> list[Crop]:
        """Each view's crop, for a pipeline that cuts them from the decoded files (`harness.data.pipeline`)."""
        return [a.crop() for a in self.augmentations]

    def from_crops(self, crops: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """`__call__` for views already cropped and flipped where decoded: uint8 [B, C, S, S] per view -> float,
        the batched augmentations applied and normalised."""
        return [
            normalize(a.after_crop(c.float().div_(255)), self.mean, self.std) for a, c in zip(self.augmentations, crops)
        ]


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def eval_view(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The deterministic evaluation view: resize to `size`, normalise. uint8 [B,C,H,W] -> float."""
    x = images.float().div_(255)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return normalize(x, mean, std)
