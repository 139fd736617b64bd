"""GAN: Radford, Metz & Chintala 2016, "Unsupervised Representation Learning with Deep
Convolutional Generative Adversarial Networks" (ICLR). Headline: discriminator features of a
DCGAN trained on ImageNet-1k, L2-SVM on CIFAR-10: 82.8 % accuracy (Table 1).

The shared backbone is the discriminator's trunk (plus a linear real/fake head); a small
DCGAN generator (transposed convolutions, BatchNorm, ReLU, tanh) draws ``[B, C, S, S]`` images
from a Gaussian z. The representation is the backbone's pooled features.

The trainer applies one optimizer to one scalar per step, so the two players' objectives
are routed by what each term can reach (non-saturating losses, DCGAN's Adam for both):
- discriminator term: softplus(-D(x)) + softplus(D(G(z))) on real images and *detached*
  fakes, so it reaches only the discriminator;
- generator term: softplus(-D(G(z))) through a functional copy of the discriminator whose
  parameters are detached (``torch.func.functional_call``), so it reaches only the generator.
BatchNorm running statistics are updated by real images only (the fake passes run on copies
of the buffers): the frozen-feature evaluations see real images.

Choices: DCGAN's generator outputs tanh pixels in [-1, 1]; the views here are normalised by
the dataset's mean and std, which the generator does not read (`DataInfo` has them): a learned
per-channel affine map (initialised to the identity) follows the tanh. The discriminator is the shared ResNet/ViT,
not DCGAN's all-convolutional LeakyReLU network.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import gin
from harness import dist
from methods.base import Batch, DataInfo, Encoder, Method, fp32


def upsampling_plan(size: int) -> tuple[int, int]:
    """(start side, number of x2 upsamplings) so that start * 2^n = size with start in 4..7
    (DCGAN: 4 -> 64 in four steps); a size with no such factorisation starts at `size`."""
    n = 0
    while size % 2 ** (n + 1) == 0 and size // 2 ** (n + 1) >= 4:
        n += 1
    return size // 2**n, n


class Generator(nn.Module):
    """DCGAN generator: z -> [B, channels, size, size].

    Args:
        z_dim: latent size.
        channels: output channels.
        size: output side.
        width: channels of the last hidden layer; each earlier layer doubles it (DCGAN: 64).
    """

    def __init__(self, z_dim: int, channels: int, size: int, width: int):
        super().__init__()
        start, n = upsampling_plan(size)
        widths = [width * 2 ** (n - 1 - i) for i in range(n)] if n else [width]
        self.start, self.z_dim = start, z_dim
        self.project = nn.Sequential(
            nn.Linear(z_dim, widths[0] * start * start, bias=False),
            nn.Unflatten(1, (widths[0], start, start)),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(True),
        )
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(True)]
        last = nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1) if n else nn.Conv2d(widths[-1], channels, 3, 1, 1)
        self.body = nn.Sequential(*layers, last, nn.Tanh())
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))  # tanh -> normalised pixel space
        self.shift = nn.Parameter(torch.zeros(1, channels, 1, 1))
        for m in self.modules():  # DCGAN: weights from N(0, 0.02)
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z)) * self.scale + self.shift


def _call(module: nn.Module, x: torch.Tensor, detach_params: bool) -> torch.Tensor:
    """`module(x)` with copies of its buffers (BatchNorm running statistics stay untouched)
    and, if `detach_params`, detached parameters (no gradient reaches them)."""
    state = {k: (p.detach() if detach_params else p) for k, p in module.named_parameters()}
    state.update({k: b.clone() for k, b in module.named_buffers()})
    return functional_call(module, state, (x,))


@fp32
def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(D(x)) - log(1 - sigmoid(D(G(z)))), averaged. ``[B]`` each."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


@fp32
def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss -log sigmoid(D(G(z))). ``[B]``."""
    return F.softplus(-fake_logits).mean()


@gin.configurable(module="gan")
class GAN(Method):
    """DCGAN with the shared backbone as the discriminator trunk.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): ``channels`` (the generator's output).
        image_size: generated side (the views' size).
        z_dim: latent size (DCGAN: 100).
        width: generator width (DCGAN: 64 at 64 px).
    """

    data_parallel = True  # per-sample adversarial terms; noise drawn for the global batch (harness/dist.py)

    def __init__(
        self, backbone: nn.Module, data: DataInfo, *, image_size: int = gin.REQUIRED, z_dim: int = 100, width: int = 64
    ):
        super().__init__(backbone)
        self.head = nn.Linear(cast(Encoder, backbone).num_features, 1)
        self.generator = Generator(z_dim, data.channels, image_size, width)

    def _logits(self, x: torch.Tensor, real: bool, detach_params: bool = False) -> torch.Tensor:
        """D(x) ``[B]``; only real images update BatchNorm running statistics."""
        if real:
            return self.head(self.backbone(x)).squeeze(1)
        return _call(self.head, _call(self.backbone, x, detach_params), detach_params).squeeze(1)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = batch.views[0]  # [B, C, S, S]
        fake = self.generator(dist.randn(len(x), self.generator.z_dim, device=x.device))  # [B, C, S, S]
        real_logits = self._logits(x, real=True)
        d_loss = discriminator_loss(real_logits, self._logits(fake.detach(), real=False))
        g_loss = generator_loss(self._logits(fake, real=False, detach_params=True))
        with torch.no_grad():
            acc = (real_logits > 0).float().mean()
        return {"loss": d_loss + g_loss, "d_loss": d_loss, "g_loss": g_loss, "d_real_acc": acc}
