"""AET and its variants: predict the transformation between an image and its warped copy.

- ``aet``: Zhang, Qi, Wang & Luo 2019, "AET vs. AED: Unsupervised Representation Learning by
  Auto-Encoding Transformations rather than Data" (CVPR). A random affine or projective
  transformation t warps the image; the backbone encodes both, and a decoder on the two
  concatenated feature vectors regresses t's matrix entries with the mean squared error.
- ``aetv2``: Lin, Xu, Li, Xiong & Qi 2019, "AETv2: AutoEncoding Transformations for
  Self-Supervised Representation Learning by Minimizing Geodesic Distances in Lie Groups"
  (arXiv:1911.07004; AAAI 2021 as "Auto-Encoding Transformations in Reparameterized Lie Groups
  for Unsupervised Learning"). Homographies are compared along the group instead of in the
  ambient Euclidean space; the paper projects PG(2) onto the rotation group SO(3), where the
  geodesic has a closed form. Our reading, `geodesic_loss`: both matrices are scaled to
  determinant 1, split by the polar decomposition M = R S (R in SO(3), S symmetric positive
  definite); the rotation parts are compared by their SO(3) geodesic angle, the stretch parts
  S (what the projection discards) by the Euclidean distance, weighted by `stretch_weight`.
- ``avt``: Qi, Zhang, Wang & Tian 2019, "AVT: Unsupervised Learning of Transformation
  Equivariant Representations by Autoencoding Variational Transformations" (ICCV). The
  transformed image's representation is Gaussian, sampled by the reparameterization trick,
  and the decoder outputs a Gaussian posterior q(t | z, z~) over t's parameters; the loss is
  its negative log-likelihood (a variational lower bound of the mutual information between
  the transformation and the representations).

Matrices act on normalised image coordinates ([-1, 1], x right, y down, as
``F.affine_grid``), so their entries are O(1) for any image size (the AET code
standardises pixel-coordinate entries per entry instead). The evaluated representation is
the backbone's pooled features (the representation's mean, for AVT). The papers' encoders
are NIN / AlexNet trunks with part of the trunk in the decoder; here the whole shared
backbone encodes and the decoder is an MLP (linear by default, as the AET CIFAR code).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

import gin
from harness import dist
from methods.base import Batch, DataInfo, Encoder, Method, fp32, mlp


def _uniform(b: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    return dist.rand(b, device=device) * (hi - lo) + lo


def affine_matrices(
    b: int,
    rotation: float = 180.0,
    translation: float = 0.2,
    scale: tuple[float, float] = (0.7, 1.3),
    shear: float = 30.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Random affine maps (AET's CIFAR ranges): ``[B, 3, 3]``, translate @ rotate @ scale @ shear.

    Args:
        rotation: angle uniform in +-`rotation` degrees.
        translation: shift uniform in +-`translation` of the image width / height.
        scale: isotropic scale range.
        shear: x-shear angle uniform in +-`shear` degrees.
    """
    device = torch.device(device)
    a = torch.deg2rad(_uniform(b, -rotation, rotation, device))
    s = _uniform(b, scale[0], scale[1], device)
    sh = torch.tan(torch.deg2rad(_uniform(b, -shear, shear, device)))
    tx, ty = (_uniform(b, -2 * translation, 2 * translation, device) for _ in range(2))  # width = 2 units
    m = torch.zeros(b, 3, 3, device=device)
    c, sn = torch.cos(a) * s, torch.sin(a) * s
    m[:, 0, 0], m[:, 0, 1], m[:, 0, 2] = c, c * sh - sn, tx  # rotate(scale(shear(p)))
    m[:, 1, 0], m[:, 1, 1], m[:, 1, 2] = sn, sn * sh + c, ty
    m[:, 2, 2] = 1.0
    return m


def homography_from_points(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The homographies mapping 4 points onto 4 points: src, dst ``[B, 4, 2]`` -> ``[B, 3, 3]``
    with ``H[2, 2] = 1`` (the direct linear transform, an exact 8x8 solve)."""
    x, y, u, v = src[..., 0], src[..., 1], dst[..., 0], dst[..., 1]  # [B, 4]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)  # [B, 4, 8]
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
    a = torch.cat([rows_u, rows_v], 1)  # [B, 8, 8]
    h = torch.linalg.solve(a, torch.cat([u, v], 1))  # [B, 8]
    return torch.cat([h, torch.ones_like(h[:, :1])], 1).view(-1, 3, 3)


def projective_matrices(
    b: int, shift: float = 0.125, scale: tuple[float, float] = (0.8, 1.2), device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Random homographies (AET's CIFAR setting): the image corners are scaled, rotated by a
    multiple of 90 degrees, and each moved by up to +-`shift` of the side. ``[B, 3, 3]``."""
    device = torch.device(device)
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], device=device)
    k = dist.randint(0, 4, (b,), device=device)
    rot = torch.stack([torch.roll(corners, int(i), 0) for i in range(4)])[k]  # [B, 4, 2]: a 90-degree turn
    s = _uniform(b, scale[0], scale[1], device).view(b, 1, 1)
    dst = rot * s + (dist.rand(b, 4, 2, device=device) * 2 - 1) * 2 * shift
    return homography_from_points(corners.expand(b, 4, 2), dst)


def warp(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Warps images by maps `m` ``[B, 3, 3]`` (input coordinates -> output coordinates), one
    ``grid_sample``; pixels from outside the image are 0 (the data mean once normalised).
    x: ``[B, C, H, W]``."""
    b, _, h, w = x.shape
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) * 2 + 1) / h - 1  # pixel centres
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) * 2 + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    out = torch.stack([gx, gy, torch.ones_like(gx)], -1).view(1, h * w, 3)  # [1, HW, 3]
    src = out @ torch.linalg.inv(m).transpose(1, 2)  # [B, HW, 3]: where each output pixel comes from
    grid = (src[..., :2] / src[..., 2:]).view(b, h, w, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def entries(m: torch.Tensor, projective: bool) -> torch.Tensor:
    """The free entries of maps ``[B, 3, 3]`` (scaled to ``M[2, 2] = 1``): 8 (projective) or 6."""
    m = m / m[:, 2:, 2:]
    return m.flatten(1)[:, :8] if projective else m[:, :2].flatten(1)


def matrices(p: torch.Tensor) -> torch.Tensor:
    """Inverse of `entries`: ``[B, 6 or 8]`` -> ``[B, 3, 3]``."""
    b = len(p)
    if p.shape[1] == 6:
        return torch.cat([p.view(b, 2, 3), p.new_tensor([0.0, 0.0, 1.0]).expand(b, 1, 3)], 1)
    return torch.cat([p, p.new_ones(b, 1)], 1).view(b, 3, 3)


def aet_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """AET's loss: the mean squared error over the matrix entries. ``[B, K]`` each."""
    return F.mse_loss(pred, target)


def unit_determinant(m: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``m / cbrt(det m)``: the representative of a homography in SL(3). ``[B, 3, 3]``."""
    d = torch.linalg.det(m)
    d = torch.where(d.abs() < eps, torch.full_like(d, eps), d)
    return m / (torch.sign(d) * d.abs().pow(1 / 3)).view(-1, 1, 1)


def polar_rotation(m: torch.Tensor, iters: int = 12) -> torch.Tensor:
    """The orthogonal polar factor of ``[B, 3, 3]`` matrices (their nearest rotation in the
    Frobenius norm when det > 0), by the scaled Newton iteration X <- (g X + X^-T / g) / 2
    (Higham 1986); differentiable without an SVD, whose gradient fails on equal singular values."""
    x = m
    for _ in range(iters):
        inv_t = torch.linalg.inv(x).transpose(1, 2)
        g = (inv_t.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).sqrt().view(-1, 1, 1)
        x = 0.5 * (g * x + inv_t / g)
    return x


def rotation_angle(r1: torch.Tensor, r2: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Geodesic distance on SO(3), the angle of ``r1^T r2`` (``||log(r1^T r2)||_F / sqrt 2``),
    as atan2(sin, cos) so its gradient stays finite at 0. ``[B]``."""
    q = r1.transpose(1, 2) @ r2
    cos = (q.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2
    sin = ((q - q.transpose(1, 2)).pow(2).sum((1, 2)) / 8 + eps).sqrt()  # ||Q - Q^T||_F = 2 sqrt2 sin
    return torch.atan2(sin, cos)


@fp32
def geodesic_loss(pred: torch.Tensor, target: torch.Tensor, stretch_weight: float = 1.0) -> torch.Tensor:
    """AETv2-style distance between homographies ``[B, 3, 3]`` (module docstring): mean over the
    batch of angle(R^, R)^2 + stretch_weight * ||S^ - S||_F^2, with M / cbrt(det M) = R S."""
    mp, mt = unit_determinant(pred), unit_determinant(target)
    rp, rt = polar_rotation(mp), polar_rotation(mt)
    sp, st = rp.transpose(1, 2) @ mp, rt.transpose(1, 2) @ mt
    return (rotation_angle(rp, rt).pow(2) + stretch_weight * (sp - st).pow(2).sum((1, 2))).mean()


# AVT's log-variances are clamped: the transformation's to [-8, 8] (variances 3e-4 .. 3e3),
# the features' noise to [-8, 0] (std <= 1). Unbounded, exp() of a large log-variance
# overflowed and both embedded seeds went NaN; with the features' noise up to std 55 (the
# first bound, [-8, 8], for both) one seed still diverged at step 55.
LOG_VAR_BOUND = 8.0


def gaussian_nll(target: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """AVT's loss: -log N(target | mean, diag(exp(log_var))), averaged over the batch and the
    parameters. ``[B, K]`` each."""
    return 0.5 * ((target - mean).pow(2) * torch.exp(-log_var) + log_var + math.log(2 * math.pi)).mean()


@gin.configurable(module="aet")
class AET(Method):
    """Transformation prediction from an image and its warped copy (AET, AETv2, AVT).

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): unused.
        transformation: ``affine`` (6 entries) or ``projective`` (8 entries).
        objective: ``mse`` (AET), ``geodesic`` (AETv2) or ``variational`` (AVT).
        hidden_dim: decoder hidden width; 0 for a linear decoder (AET's CIFAR code).
        stretch_weight: weight of the stretch term of the geodesic objective.
        rotation, translation, affine_scale, shear: affine ranges (`affine_matrices`).
        shift, projective_scale: projective ranges (`projective_matrices`).
    """

    identity: torch.Tensor

    data_parallel = (
        True  # per-image transformation regression; transformations drawn for the global batch (harness/dist.py)
    )

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        transformation: str = "projective",
        objective: str = "mse",
        hidden_dim: int = 0,
        stretch_weight: float = 1.0,
        rotation: float = 180.0,
        translation: float = 0.2,
        affine_scale: tuple[float, float] = (0.7, 1.3),
        shear: float = 30.0,
        shift: float = 0.125,
        projective_scale: tuple[float, float] = (0.8, 1.2),
    ):
        super().__init__(backbone)
        if transformation not in ("affine", "projective"):
            raise ValueError(f"aet.AET.transformation = {transformation!r}; use 'affine' or 'projective'")
        if objective not in ("mse", "geodesic", "variational"):
            raise ValueError(f"aet.AET.objective = {objective!r}; use 'mse', 'geodesic' or 'variational'")
        self.projective, self.objective, self.stretch_weight = transformation == "projective", objective, stretch_weight
        self.affine_args: dict[str, Any] = dict(
            rotation=rotation, translation=translation, scale=tuple(affine_scale), shear=shear
        )
        self.projective_args: dict[str, Any] = dict(shift=shift, scale=tuple(projective_scale))
        d, k = cast(Encoder, backbone).num_features, 8 if self.projective else 6
        out = 2 * k if objective == "variational" else k  # AVT: mean and log-variance of t
        self.decoder = mlp([2 * d, hidden_dim, out] if hidden_dim else [2 * d, out])
        # AVT: log-variance of the transformed image's representation
        self.feature_log_var = nn.Linear(d, d) if objective == "variational" else None
        self.register_buffer("identity", entries(torch.eye(3).unsqueeze(0), self.projective)[0], persistent=False)

    def sample(self, b: int, device: torch.device) -> torch.Tensor:
        """Random transformations ``[B, 3, 3]``."""
        if self.projective:
            return projective_matrices(b, device=device, **self.projective_args)
        return affine_matrices(b, device=device, **self.affine_args)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = batch.views[0]  # [B, C, S, S]
        b = len(x)
        m = self.sample(b, x.device)  # [B, 3, 3]
        f = self.backbone(torch.cat([x, warp(x, m)]))  # [2B, D]
        z, zt = f[:b], f[b:]
        if self.feature_log_var is not None:  # reparameterization: z~ = mu + sigma * eps
            log_var = self.feature_log_var(zt).clamp(-LOG_VAR_BOUND, 0.0)  # [B, D]; noise std <= 1
            zt = zt + torch.exp(0.5 * log_var) * dist.randn_like(zt)
        out = self.decoder(torch.cat([z, zt], 1))  # [B, K] or [B, 2K]
        target = entries(m, self.projective)  # [B, K]
        pred = self.identity + out[:, : len(self.identity)]  # offsets from the identity map
        if self.objective == "mse":
            loss = aet_mse(pred, target)
        elif self.objective == "geodesic":
            loss = geodesic_loss(matrices(pred), matrices(target), self.stretch_weight)
        else:
            loss = gaussian_nll(target, pred, out[:, len(self.identity) :].clamp(-LOG_VAR_BOUND, LOG_VAR_BOUND))
        with torch.no_grad():
            mse = F.mse_loss(pred, target)
        return {"loss": loss, "mse": mse}
