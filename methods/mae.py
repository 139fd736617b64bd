"""MAE: He, Chen, Xie, Li, Dollár & Girshick 2022, "Masked Autoencoders Are Scalable Vision
Learners" (CVPR). Headline: ViT-B/16 pretrained 1600 epochs on ImageNet-1k, 83.6 % top-1
fine-tuned (Table 3); 68.0 % linear probe.

A random 75 % of the patches is dropped per image; the ViT encoder sees only the visible
ones (plus its class token); a lightweight transformer decoder receives the encoded visible
tokens and a shared mask token at every masked position, and predicts each masked patch's
pixels, normalised by that patch's own mean and variance (the paper's better target). The
loss is the mean squared error over masked patches only.

MAE is the one method on a different backbone: its encoder must be a ViT (the method
needs patches), so it builds its own with `encoder` (``@vit/backbone.create`` in mae.gin)
instead of the shared ResNet the job passes. The encoder's position embeddings are fixed
2-D sine-cosine (as the paper's); the evaluated features are timm's pooled output (the
class token, the paper's linear-probe feature).
"""

from __future__ import annotations

from typing import Callable, cast

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

import gin
from harness import dist
from methods.base import Batch, DataInfo, Method, fp32


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, N, p*p*C]``, patches row-major (timm's token order)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)  # [B, h, w, p, p, C]
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def random_masking(
    b: int, n: int, ratio: float, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keeps ``int(n * (1 - ratio))`` random patches per image.

    Returns:
        keep: indices of the visible patches ``[B, K]`` (in shuffled order).
        restore: ``[B, N]``, the position in ``cat(visible, masked)`` of each patch; gathering
            by it undoes the shuffle.
        mask: ``[B, N]``, 1 for masked patches, 0 for visible, in the original order.
    """
    k = int(n * (1 - ratio))
    shuffle = dist.rand(b, n, device=device).argsort(1)  # [B, N]: random permutation per image
    restore = shuffle.argsort(1)
    mask = (restore >= k).float()
    return shuffle[:, :k], restore, mask


def sincos_pos_embed(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings ``[h*w, dim]`` (half the channels encode the
    row, half the column; Vaswani et al. 2017 frequencies)."""
    if dim % 4:
        raise ValueError(f"sine-cosine position embeddings need a width divisible by 4, not {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # [dim/4]
    ys, xs = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )

    def embed(pos: torch.Tensor) -> torch.Tensor:
        a = pos.reshape(-1, 1) * omega  # [hw, dim/4]
        return torch.cat([a.sin(), a.cos()], 1)

    return torch.cat([embed(ys), embed(xs)], 1).float()


@fp32
def masked_patch_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Mean squared error over masked patches; each target patch normalised by its own mean
    and (unbiased) variance when `norm_pix`. pred, target ``[B, N, P]``; mask ``[B, N]``."""
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred - target).pow(2).mean(-1)  # [B, N]
    return (per_patch * mask).sum() / mask.sum()


@gin.configurable(module="mae")
class MAE(Method):
    """Masked autoencoder on a timm ViT.

    Args:
        backbone: the shared encoder from the job; replaced by `encoder`'s ViT when given.
        data: the pretraining data's facts (`DataInfo`): ``channels`` (the ViT's input channels).
        encoder: builds the ViT, called with ``in_chans`` (``@vit/backbone.create``).
        mask_ratio: fraction of patches dropped (paper: 0.75).
        decoder_dim: decoder width (paper: 512).
        decoder_depth: decoder blocks (paper: 8).
        decoder_heads: decoder attention heads (paper: 16).
        norm_pix: normalise each target patch (paper: yes).
    """

    decoder_pos: torch.Tensor

    data_parallel = True  # per-image reconstruction; masks drawn for the global batch (harness/dist.py)

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        encoder: Callable[..., nn.Module] | None = None,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix: bool = True,
    ):
        vit = encoder(in_chans=data.channels, small_input=False) if encoder is not None else backbone
        if (
            not isinstance(vit, VisionTransformer)
            or vit.cls_token is None
            or vit.pos_embed is None
            or vit.reg_token is not None
            or vit.no_embed_class
            or getattr(vit, "dynamic_img_size", False)
        ):
            raise ValueError(
                f"mae.MAE needs a plain timm ViT (class token, position-embedding table, no "
                f"register tokens), not {type(vit).__name__}; bind mae.MAE.encoder = "
                "@vit/backbone.create and vit/backbone.create.name = 'vit_base_patch16_224'"
            )
        super().__init__(vit)
        self.mask_ratio, self.norm_pix = mask_ratio, norm_pix
        self.patch = vit.patch_embed.patch_size[0]
        grid, dim = vit.patch_embed.grid_size, vit.embed_dim
        with torch.no_grad():  # fixed sine-cosine position embeddings, zero for the class token
            vit.pos_embed.copy_(torch.cat([torch.zeros(1, dim), sincos_pos_embed(dim, grid)]).unsqueeze(0))
        vit.pos_embed.requires_grad_(False)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        pos = torch.cat([torch.zeros(1, decoder_dim), sincos_pos_embed(decoder_dim, grid)]).unsqueeze(0)
        self.register_buffer("decoder_pos", pos, persistent=False)  # [1, 1 + N, decoder_dim]
        self.decoder_blocks = nn.Sequential(
            *[Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch * data.channels)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def encode(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The ViT on the visible patches `keep` ``[B, K]`` -> ``[B, 1 + K, D]`` (class token first)."""
        vit = cast(VisionTransformer, self.backbone)
        # __init__ checked the ViT has both (timm types them as optional)
        pos_embed, cls_token = cast(torch.Tensor, vit.pos_embed), cast(torch.Tensor, vit.cls_token)
        t = vit.patch_embed(x) + pos_embed[:, 1:]  # [B, N, D]
        t = torch.gather(t, 1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # [B, K, D]
        cls = (cls_token + pos_embed[:, :1]).expand(len(t), -1, -1)
        t = vit.norm_pre(torch.cat([cls, t], 1))
        return vit.norm(vit.blocks(t))

    def decode(self, h: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Encoded tokens ``[B, 1 + K, D]`` -> per-patch pixel predictions ``[B, N, p*p*C]``."""
        h = self.decoder_embed(h)  # [B, 1 + K, E]
        b, n = restore.shape
        tokens = torch.cat([h[:, 1:], self.mask_token.expand(b, n - h.shape[1] + 1, -1)], 1)  # [B, N, E]
        tokens = torch.gather(tokens, 1, restore.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # original order
        t = torch.cat([h[:, :1], tokens], 1) + self.decoder_pos
        t = self.decoder_norm(self.decoder_blocks(t))
        return self.decoder_pred(t[:, 1:])

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = batch.views[0]  # [B, C, S, S]
        target = patchify(x, self.patch)  # [B, N, p*p*C]
        keep, restore, mask = random_masking(len(x), target.shape[1], self.mask_ratio, x.device)
        pred = self.decode(self.encode(x, keep), restore)  # [B, N, p*p*C]
        return {"loss": masked_patch_loss(pred, target, mask, self.norm_pix)}
