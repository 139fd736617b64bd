"""CIE Lab and quantized ab colours, shared by Colorization and Split-Brain.

- `rgb_to_lab` / `lab_to_rgb`: sRGB in [0, 1] (IEC 61966-2-1 transfer curve) <-> CIE
  L*a*b* under the D65 white point, batched on the training device.
- `ab_bins`: the ab plane on a grid of `grid` units, keeping the bins that some sRGB
  colour falls into (the in-gamut bins). Zhang et al. 2016 kept the 313 bins that occur in
  ImageNet; here the set is fixed by the sRGB gamut instead (no pass over the data is
  needed before training), computed from a dense RGB cube: 261 bins on a grid of 10.
- `soft_encode`: a target ab value as a distribution over its nearest bins, weighted by
  a Gaussian of the distance (Zhang et al. 2016, sec. 2.1).
- `gray_input` / `colour_input`: what the backbone sees. The exported encoder must take
  ordinary normalised RGB images, so an L-only (or ab-only) input is shown as the RGB
  image of that Lab colour with the other channels neutral (a = b = 0: a gray image of the
  same lightness; L = 50: an isoluminant colour image), normalised like any view.
- `dense_head`: a small decoder from the backbone's spatial map to per-location logits.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import nn

from harness.errors import Unsupported
from methods.base import DataInfo

# sRGB primaries -> CIE XYZ (D65), and the D65 white point.
RGB_TO_XYZ = torch.tensor(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
    dtype=torch.float64,
)
WHITE = (0.95047, 1.0, 1.08883)
_EPS = (6 / 29) ** 3


def _mix(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Applies a 3x3 matrix to the channels of ``[B, 3, H, W]``."""
    return torch.einsum("ij,bjhw->bihw", m.to(x.dtype).to(x.device), x)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB ``[B, 3, H, W]`` in [0, 1] -> Lab ``[B, 3, H, W]`` (L in [0, 100], a and b about +-110)."""
    lin = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb.clamp(min=0) + 0.055) / 1.055) ** 2.4)
    xyz = _mix(RGB_TO_XYZ, lin) / torch.tensor(WHITE, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    f = torch.where(xyz > _EPS, xyz.clamp(min=_EPS) ** (1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], 1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Lab ``[B, 3, H, W]`` -> sRGB ``[B, 3, H, W]``, clipped to [0, 1] (out-of-gamut colours)."""
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], 1)
    xyz = torch.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29))
    xyz = xyz * torch.tensor(WHITE, dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    lin = _mix(torch.linalg.inv(RGB_TO_XYZ), xyz).clamp(0, 1)
    return torch.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin.clamp(min=0.0031308) ** (1 / 2.4) - 0.055)


@functools.lru_cache(maxsize=4)
def _ab_bins(grid: float, levels: int) -> torch.Tensor:
    v = torch.linspace(0, 1, levels, dtype=torch.float64)
    cube = torch.stack(torch.meshgrid(v, v, v, indexing="ij")).reshape(1, 3, -1, 1)  # every RGB colour
    ab = rgb_to_lab(cube)[0, 1:, :, 0].T  # [levels^3, 2]
    cells = torch.unique(torch.round(ab / grid), dim=0)  # [Q, 2], sorted
    return (cells * grid).float()


def ab_bins(grid: float = 10.0, levels: int = 64) -> torch.Tensor:
    """Centres of the in-gamut ab bins, ``[Q, 2]`` (Q = 261 on a grid of 10), sorted by (a, b).

    A bin is in gamut if the ab value of some colour of a ``levels^3`` sRGB cube rounds to it.
    """
    return _ab_bins(float(grid), levels).clone()


def soft_encode(
    ab: torch.Tensor, bins: torch.Tensor, k: int = 5, sigma: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each ab value as a distribution over its `k` nearest bins, Gaussian-weighted by distance.

    Args:
        ab: ``[N, 2]``.
        bins: ``[Q, 2]`` bin centres.
    Returns:
        (index ``[N, k]`` of the nearest bins, nearest first; weights ``[N, k]`` summing to 1).
    """
    d2 = torch.cdist(ab.float(), bins.float()) ** 2  # [N, Q]
    near, index = d2.topk(k, dim=1, largest=False)  # sorted ascending
    w = torch.softmax(-near / (2 * sigma**2), dim=1)  # exp(-d^2 / 2 sigma^2), normalised
    return index, w


def to_unit_rgb(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A normalised view back to RGB in [0, 1]."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


def from_unit_rgb(rgb: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB in [0, 1] normalised like a view."""
    m = torch.tensor(mean, device=rgb.device, dtype=rgb.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=rgb.device, dtype=rgb.dtype).view(1, -1, 1, 1)
    return (rgb - m) / s


def gray_input(lab: torch.Tensor) -> torch.Tensor:
    """The L channel alone as an RGB image: the gray of the same lightness. ``[B, 3, H, W]``"""
    return lab_to_rgb(torch.cat([lab[:, :1], torch.zeros_like(lab[:, 1:])], 1))


def colour_input(lab: torch.Tensor) -> torch.Tensor:
    """The ab channels alone as an RGB image: L fixed at 50 (mid lightness). ``[B, 3, H, W]``"""
    return lab_to_rgb(torch.cat([torch.full_like(lab[:, :1], 50.0), lab[:, 1:]], 1))


def dense_head(in_dim: int, hidden_dim: int, out_dim: int, upsamples: int) -> nn.Sequential:
    """1x1 conv to `hidden_dim`, `upsamples` x2 transposed convs, 1x1 conv to `out_dim` logits.

    ``[B, in_dim, h, w]`` -> ``[B, out_dim, h * 2^upsamples, w * 2^upsamples]``.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_dim, hidden_dim, 1, bias=False),
        nn.BatchNorm2d(hidden_dim),
        nn.ReLU(inplace=True),
    ]
    for _ in range(upsamples):
        layers += [
            nn.ConvTranspose2d(hidden_dim, hidden_dim, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
        ]
    layers.append(nn.Conv2d(hidden_dim, out_dim, 1))
    return nn.Sequential(*layers)


def soft_cross_entropy(logits: torch.Tensor, index: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a sparse target distribution, per row.

    logits: ``[N, Q]``; index, soft: ``[N, k]`` (target bins and their probabilities) -> ``[N]``.
    """
    return -(soft * torch.log_softmax(logits, 1).gather(1, index)).sum(1)


def flat_targets(lab: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Lab channels area-averaged to the prediction's ``(h, w)``, one row per location.

    lab: ``[B, c, H, W]`` -> ``[B * h * w, c]`` (row-major over b, y, x, like `flat_logits`).
    """
    pooled = torch.nn.functional.adaptive_avg_pool2d(lab, size)  # [B, c, h, w]
    return pooled.permute(0, 2, 3, 1).reshape(-1, lab.shape[1])


def flat_logits(logits: torch.Tensor) -> torch.Tensor:
    """``[B, Q, h, w]`` -> ``[B * h * w, Q]``."""
    return logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])


def colour_views(name: str, data: DataInfo) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The views' (mean, std) of a colour-only method (to recover RGB), after checking the
    data suits it: `Unsupported` on non-RGB data (the run is skipped with this reason)."""
    if data.channels != 3:
        raise Unsupported(
            f"{name.split('.')[0]} needs colour (3-channel) images; this dataset has {data.channels} "
            "channel" + ("s" if data.channels != 1 else "")
        )
    return tuple(data.mean), tuple(data.std)
