"""Optimizers and learning-rate schedules, registered for gin as ``optim.<Name>``.

LARS (You et al. 2017) is written here; SGD, Adam and AdamW are torch's.
"""
from __future__ import annotations

import math
from typing import Iterable

import gin
import torch

for _cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
    gin.external_configurable(_cls, module="optim")


@gin.configurable(module="optim")
class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017), as used by SimCLR
    and BYOL. Parameter groups with ``lars=False`` (biases, norms) skip the trust ratio.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=g["weight_decay"])
                if g["lars"]:
                    pn, dn = p.norm(), d.norm()
                    d = d.mul(torch.where((pn > 0) & (dn > 0), g["eta"] * pn / dn, torch.ones_like(pn)))
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


@gin.configurable(module="optim")
def warmup_cosine(step: int, total: int, warmup: float = 0.0, final: float = 0.0) -> float:
    """Multiplier of the base learning rate: linear warm-up over `warmup` (a fraction of
    `total` when < 1, else steps), then cosine decay to `final` (Loshchilov & Hutter 2017)."""
    w = warmup * total if warmup < 1 else warmup
    if step < w:
        return (step + 1) / w
    t = (step - w) / max(1.0, total - w)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@gin.configurable(module="optim")
def constant(step: int, total: int) -> float:
    """No schedule."""
    return 1.0
