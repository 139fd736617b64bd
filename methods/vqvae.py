"""VQ-VAE: van den Oord, Vinyals & Kavukcuoglu 2017, "Neural Discrete Representation
Learning" (NeurIPS).

A 1x1 convolution projects the backbone's spatial map to ``z_e`` ``[B, D, h, h]``; each
position is replaced by its nearest of K codebook vectors (``z_q``), and the light
decoder (methods/decoder.py) reconstructs the view from ``z_q``. The decoder's gradient
reaches the encoder by the straight-through estimator, ``z_e + sg(z_q - z_e)`` (paper
sec. 3.2). Loss (eq. 3), with mean squared errors:

    ||x - dec(z_q)||² + ||sg(z_e) - e||² + beta ||z_e - sg(e)||²,    beta = 0.25.

EMA codebook (``ema = True``; paper appendix A.1, decay 0.99): the codebook is no
parameter but a buffer, set after each optimizer step (`after_step`, from the statistics
the step's loss computed without gradient) to the running mean of the vectors assigned
to each code: ``N_i <- g N_i + (1 - g) n_i``, ``m_i <- g m_i + (1 - g) sum of z_e
assigned to i``, ``e_i = m_i / N~_i`` where ``N~`` is N with Laplace smoothing, ``(N_i +
eps) / (sum N + K eps) * sum N``. N starts at 1 and m at the initial codes, so a code
that is never chosen stays where it is. The codebook term is then dropped from the
loss (the commitment term stays). Codebook, N and m are buffers saved in checkpoints.
Under data parallelism the buffers follow rank 0 (DDP broadcasts buffers at each forward),
so the EMA sees rank 0's shard.

The codebook starts uniform in ``[-1/K, 1/K]``.

Representation for probing: the backbone's pooled features, i.e. the average of the
spatial map *before* the projection and the quantisation (``method.encoder()`` is the
backbone). At the embedded scale the map is 1x1 (resnet18, normal stem, 32 px): each
image is one code. No ImageNet linear-probe number in the paper.
"""

from __future__ import annotations

from typing import Callable, cast

import torch
import torch.nn.functional as F
from torch import nn

import gin
from methods.base import Batch, DataInfo, Encoder, Method
from methods.decoder import Decoder, feature_map_shape


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code (squared Euclidean) of each row: ``[N, D]``, ``[K, D]`` -> ``[N]``."""
    d = (z**2).sum(1, keepdim=True) - 2 * z @ codebook.T + (codebook**2).sum(1)  # [N, K]
    return d.argmin(1)


def straight_through(z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """``z_q`` forward; the identity to ``z_e`` backward."""
    return z_e + (z_q - z_e).detach()


def vq_terms(z_e: torch.Tensor, z_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook loss ``||sg(z_e) - z_q||²``, commitment loss ``||z_e - sg(z_q)||²``), as means."""
    return F.mse_loss(z_q, z_e.detach()), F.mse_loss(z_e, z_q.detach())


@torch.no_grad()
def ema_update(
    codebook: torch.Tensor,
    count: torch.Tensor,
    total: torch.Tensor,
    n: torch.Tensor,
    s: torch.Tensor,
    decay: float,
    eps: float,
) -> None:
    """One EMA codebook step, in place.

    Args:
        codebook: ``[K, D]`` the codes.
        count: ``[K]`` running assignment counts N.
        total: ``[K, D]`` running sums m of the assigned vectors.
        n: ``[K]`` this step's assignment counts.
        s: ``[K, D]`` this step's sums of the assigned vectors.
        decay: gamma.
        eps: Laplace smoothing of the counts.
    """
    count.mul_(decay).add_(n, alpha=1 - decay)
    total.mul_(decay).add_(s, alpha=1 - decay)
    k, all_ = len(count), count.sum()
    smoothed = (count + eps) / (all_ + k * eps) * all_  # [K]
    codebook.copy_(total / smoothed[:, None])


@gin.configurable(module="vqvae")
class VQVAE(Method):
    """Vector-quantised autoencoder on the backbone's spatial map.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): ``channels`` (the decoder's output).
        image_size: side of the views (``%IMAGE_SIZE``).
        decoder: the decoder's constructor, e.g. ``@decoder.Decoder``.
        num_codes: K.
        code_dim: D.
        beta: commitment weight.
        ema: EMA codebook updates instead of the codebook loss.
        decay: EMA decay gamma.
        eps: Laplace smoothing of the EMA counts.
    """

    codebook: torch.Tensor
    ema_count: torch.Tensor
    ema_sum: torch.Tensor

    data_parallel = True  # per-image reconstruction and codebook terms (harness/dist.py)

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        image_size: int = gin.REQUIRED,
        decoder: Callable[..., nn.Module] = Decoder,
        num_codes: int = 512,
        code_dim: int = 64,
        beta: float = 0.25,
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
    ):
        super().__init__(backbone)
        c, h = feature_map_shape(backbone, data.channels, image_size)
        self.project = nn.Conv2d(c, code_dim, 1)
        codes = torch.empty(num_codes, code_dim).uniform_(-1 / num_codes, 1 / num_codes)
        if ema:
            self.register_buffer("codebook", codes)
            self.register_buffer("ema_count", torch.ones(num_codes))
            self.register_buffer("ema_sum", codes.clone())
        else:
            self.codebook = nn.Parameter(codes)
        self.decoder = decoder(in_channels=code_dim, out_channels=data.channels, in_size=h, out_size=image_size)
        self.beta, self.ema, self.decay, self.eps = beta, ema, decay, eps
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's (n, s), for after_step

    def quantize(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z_e`` ``[B, D, h, w]`` -> (``z_q`` of the same shape, code indices ``[B, h, w]``)."""
        b, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)  # [B h w, D]
        idx = nearest_code(flat.detach(), self.codebook.detach())
        z_q = self.codebook[idx].view(b, h, w, d).permute(0, 3, 1, 2)
        return z_q, idx.view(b, h, w)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = batch.views[0]  # [B, C, S, S]
        z_e = self.project(cast(Encoder, self.backbone).forward_features(x))  # [B, D, h, w]
        z_q, idx = self.quantize(z_e)
        recon = self.decoder(straight_through(z_e, z_q))  # [B, C, S, S]
        rec = F.mse_loss(recon, x)
        codebook_loss, commitment = vq_terms(z_e, z_q)
        loss = rec + self.beta * commitment + (0 if self.ema else codebook_loss)
        with torch.no_grad():
            one_hot = F.one_hot(idx.flatten(), len(self.codebook)).to(z_e.dtype)  # [N, K]
            n = one_hot.sum(0)  # [K]
            p = n / n.sum()
            perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
            if self.ema and self.training:
                flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])  # [N, D]
                self._stats = (n, one_hot.T @ flat)
        return {"loss": loss, "rec": rec.detach(), "commitment": commitment.detach(), "perplexity": perplexity}

    def after_step(self, step: int, total: int) -> None:
        if self._stats is not None:
            ema_update(self.codebook, self.ema_count, self.ema_sum, *self._stats, self.decay, self.eps)
            self._stats = None
