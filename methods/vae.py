"""VAE: Kingma & Welling 2014, "Auto-Encoding Variational Bayes" (ICLR).

The backbone's pooled features give a diagonal Gaussian posterior q(z|x) = N(mu, diag
exp(logvar)) through one linear layer; one sample z = mu + exp(logvar / 2) * eps (the
reparameterisation trick, L = 1 sample per image as in the paper) is decoded, as a 1x1
map, by the light decoder (methods/decoder.py). The loss is the negative ELBO per image,

    -ELBO = -log p(x|z) + beta KL(q(z|x) || N(0, I)),

with the KL in closed form (paper appendix B) and p(x|z) either
  - ``gaussian``: N(x; decoder(z), sigma² I) on the normalised view, with its constant;
    sigma is fixed (`sigma`, in units of the data's std) or, with ``sigma = None``, the
    batch's maximum-likelihood sigma shared by all pixels, the root mean squared error
    (without gradient; at that optimum the gradients are the same with or without), so
    the KL's weight follows the reconstruction's quality (the "optimal sigma" of Rybkin,
    Daniilidis & Levine 2021, "Simple and Effective VAE Training with Calibrated
    Decoders", ICML). The paper's Gaussian decoder learns a variance per pixel (appendix
    C.2), which on images with constant backgrounds (Fashion-MNIST) can shrink without
    bound; or
  - ``bernoulli``: Bernoulli(x_01; sigmoid(decoder(z))) of the view mapped back to [0, 1]
    (needs the normalisation's `mean` and `std`; the paper's MNIST model).
beta = 1 is the paper's ELBO (beta != 1: Higgins et al. 2017's beta-VAE).

Representation for probing: the backbone's pooled features (``method.encoder()`` is the
backbone), of which mu is a linear function. No ImageNet number in the paper (MNIST and
Frey Face).
"""

from __future__ import annotations

import math
from typing import Callable, cast

import torch
import torch.nn.functional as F
from torch import nn

import gin
from harness import dist
from methods.base import Batch, DataInfo, Encoder, Method
from methods.decoder import Decoder

LIKELIHOODS = ("gaussian", "bernoulli")


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per row: ``[B, D]`` -> ``[B]``."""
    return 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)


def gaussian_nll(recon: torch.Tensor, x: torch.Tensor, log_sigma: torch.Tensor | float) -> torch.Tensor:
    """-log N(x; recon, sigma² I) per image: ``[B, C, S, S]`` -> ``[B]``."""
    log_sigma = torch.as_tensor(log_sigma, dtype=x.dtype, device=x.device)
    d = x[0].numel()
    sq = ((x - recon) ** 2).flatten(1).sum(1)  # [B]
    return 0.5 * sq * torch.exp(-2 * log_sigma) + d * (log_sigma + 0.5 * math.log(2 * math.pi))


def bernoulli_nll(logits: torch.Tensor, x01: torch.Tensor) -> torch.Tensor:
    """-log Bernoulli(x01; sigmoid(logits)) per image (x01 in [0, 1]): -> ``[B]``."""
    return F.binary_cross_entropy_with_logits(logits, x01, reduction="none").flatten(1).sum(1)


@gin.configurable(module="vae")
class VAE(Method):
    """Variational autoencoder with the backbone as the inference network's trunk.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): ``channels`` (the decoder's output);
            ``mean``, ``std`` (the views' normalisation, for the Bernoulli likelihood).
        image_size: side of the views (``%IMAGE_SIZE``).
        decoder: the decoder's constructor, e.g. ``@decoder.Decoder``.
        latent_dim: size of z.
        likelihood: ``gaussian`` or ``bernoulli``.
        sigma: the Gaussian likelihood's std, in units of the data's std; None: the batch's
            root mean squared error.
        beta: weight of the KL term (1: the ELBO).
    """

    data_parallel = True  # per-image ELBO; noise and the ML sigma of the global batch (harness/dist.py)
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        image_size: int = gin.REQUIRED,
        decoder: Callable[..., nn.Module] = Decoder,
        latent_dim: int = 128,
        likelihood: str = "gaussian",
        sigma: float | None = None,
        beta: float = 1.0,
    ):
        super().__init__(backbone)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"vae.VAE.likelihood = {likelihood!r}: use one of {', '.join(LIKELIHOODS)}")
        if likelihood == "bernoulli":  # the views' normalisation, to map them back to [0, 1]
            self.register_buffer(
                "pixel_mean", torch.tensor(data.mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
            )
            self.register_buffer(
                "pixel_std", torch.tensor(data.std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
            )
        self.likelihood, self.sigma, self.beta = likelihood, sigma, beta
        self.posterior = nn.Linear(cast(Encoder, backbone).num_features, 2 * latent_dim)  # -> [mu, logvar]
        self.decoder = decoder(in_channels=latent_dim, out_channels=data.channels, in_size=1, out_size=image_size)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = batch.views[0]  # [B, C, S, S]
        mu, logvar = self.posterior(self.backbone(x)).chunk(2, dim=1)  # [B, D] each
        z = mu + (0.5 * logvar).exp() * dist.randn_like(mu)  # reparameterisation
        out = self.decoder(z[:, :, None, None])  # [B, C, S, S]
        logs = {}
        if self.likelihood == "gaussian":
            if self.sigma is None:  # the batch's maximum-likelihood sigma
                err = dist.all_reduce_sum(
                    torch.stack([(out - x).detach().pow(2).sum(), torch.tensor(float(x.numel()))])
                )
                sigma = (err[0] / err[1]).sqrt()  # over the global batch
            else:
                sigma = torch.tensor(self.sigma, device=x.device)
            nll = gaussian_nll(out, x, sigma.log())  # [B]
            logs["sigma"] = sigma
        else:
            nll = bernoulli_nll(out, (x * self.pixel_std + self.pixel_mean).clamp(0, 1))
        kl = gaussian_kl(mu, logvar)  # [B]
        return {"loss": (nll + self.beta * kl).mean(), "nll": nll.mean().detach(), "kl": kl.mean().detach(), **logs}
