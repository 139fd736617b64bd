"""CLIP: Radford, Kim, Hallacy, Ramesh, Goh, Agarwal, Sastry, Askell, Mishkin, Clark, Krueger &
Sutskever 2021, "Learning Transferable Visual Models From Natural Language Supervision" (ICML).
Headline: ViT-L/14 at 336 px, trained on 400M image-text pairs, 76.2 % zero-shot top-1 on
ImageNet (Table 1).

An image encoder (the shared backbone and a linear projection) and a text transformer
(causal, pre-LN, pooled at the end-of-text token, linearly projected) embed a batch of
image-caption pairs in one space; a symmetric cross-entropy over the batch's cosine
similarity matrix, scaled by a learned temperature, pulls each image to its own caption.

Simplifications, stated: the tokenizer is a word-level one whose vocabulary is the
pretraining captions' words (sorted, so deterministic), not CLIP's byte-pair encoding;
the image side is the shared backbone's pooled features with a linear projection (CLIP's
ResNets end in attention pooling); under data parallelism each process contrasts its own
shard of the batch (CLIP gathers every GPU's embeddings into one similarity matrix; a
method's loss here makes no distributed calls). Captions come from the data (`data.ImageCaptions`, or
class-name prompts by `data.Captioned`); the text tower, both projections, the temperature
and the vocabulary are exported next to the encoder for `harness.evals.zeroshot`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn

import gin
from harness import dist, store
from harness.errors import Unsupported
from methods.base import Batch, DataInfo, Encoder, Method, fp32

SPECIALS = ("<pad>", "<unk>", "<sot>", "<eot>")  # ids 0-3
PAD, UNK, SOT, EOT = range(4)
_WORD = re.compile(r"[a-z0-9]+|[^a-z0-9\s]")


def words(text: str) -> list[str]:
    """Lower-cased runs of letters/digits, and each other non-space character on its own."""
    return _WORD.findall(text.lower())


class Tokenizer:
    """Word-level tokenizer: ``<sot> words <eot>`` padded to a fixed context.

    Args:
        vocab: the words, in id order after the four special tokens.
    """

    def __init__(self, vocab: Sequence[str]):
        self.vocab = list(vocab)
        self.ids = {w: i + len(SPECIALS) for i, w in enumerate(self.vocab)}

    @classmethod
    def build(cls, texts: Sequence[str], max_words: int | None = None) -> "Tokenizer":
        """The vocabulary of `texts`: by frequency when capped at `max_words` (ties by
        spelling), sorted by spelling; independent of the texts' order."""
        counts: dict[str, int] = {}
        for t in texts:
            for w in words(t):
                counts[w] = counts.get(w, 0) + 1
        kept = sorted(counts, key=lambda w: (-counts[w], w))[:max_words] if max_words else counts
        return cls(sorted(kept))

    def __len__(self) -> int:
        """Token ids in use, special tokens included."""
        return len(SPECIALS) + len(self.vocab)

    def encode(self, texts: Sequence[str], context: int) -> torch.Tensor:
        """int64 ``[N, context]``: sot, word ids (unknown words: unk; cut to fit), eot, padding."""
        out = torch.full((len(texts), context), PAD, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [SOT, *(self.ids.get(w, UNK) for w in words(t))][: context - 1] + [EOT]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: torch.Tensor) -> str:
        """The words between sot and eot of one row, joined by spaces."""
        table = [*SPECIALS, *self.vocab]
        out = []
        for i in ids.tolist():
            if i == EOT:
                break
            if i != SOT:
                out.append(table[i])
        return " ".join(out)


@fp32
def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over the scaled cosine similarities (CLIP, Fig. 3).

    Args:
        image: image embeddings ``[N, D]``; row i pairs with text row i.
        text: text embeddings ``[N, D]``.
        scale: the logit scale, 1 / temperature (a scalar).
    """
    logits = scale * F.normalize(image, dim=1) @ F.normalize(text, dim=1).T  # [N, N]
    target = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class Block(nn.Module):
    """Pre-LN transformer block with causal self-attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, n, w/heads]
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.ln2(x))


class TextTower(nn.Module):
    """Token and position embeddings, causal pre-LN blocks, final LN, the eot token's state
    projected to the joint space.

    Args:
        vocab_size: token ids (special tokens included).
        context: tokens per caption.
        width: transformer width.
        layers: blocks.
        heads: attention heads (must divide `width`).
        embed_dim: joint embedding size.
    """

    def __init__(self, vocab_size: int, context: int, width: int, layers: int, heads: int, embed_dim: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"clip.CLIP.text_width = {width} must be a multiple of clip.CLIP.text_heads = {heads}")
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.01)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.token.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: int64 ``[N, context]`` -> ``[N, embed_dim]``."""
        x = self.ln(self.blocks(self.token(tokens) + self.position))  # [N, context, width]
        eot = (tokens == EOT).int().argmax(1)  # [N] every row has one eot
        return self.proj(x[torch.arange(len(x), device=x.device), eot])


@gin.configurable(module="clip")
class CLIP(Method):
    """Image-text contrastive pretraining of the shared backbone.

    Args:
        backbone: the shared timm encoder (the image tower).
        data: the pretraining data's facts (`DataInfo`): ``captions``, one per pretraining image
            (`Unsupported` without them).
        embed_dim: joint embedding size (paper: 1024 for ResNet-50, 512 for ViT-B).
        context: tokens per caption (paper: 77).
        text_width: text transformer width (paper: 512).
        text_layers: text transformer blocks (paper: 12).
        text_heads: attention heads (paper: 8).
        max_words: vocabulary cap (the most frequent words).
        init_temperature: initial temperature (paper: 0.07, a logit scale of 1/0.07).
        max_scale: the logit scale is clipped to this (paper: 100).
    """

    data_parallel = True  # the contrastive loss over every gathered image-text pair (harness/dist.py)

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        embed_dim: int = 1024,
        context: int = 77,
        text_width: int = 512,
        text_layers: int = 12,
        text_heads: int = 8,
        max_words: int = 49152,
        init_temperature: float = 0.07,
        max_scale: float = 100.0,
    ):
        super().__init__(backbone)
        if data.captions is None:
            raise Unsupported(
                "clip needs captions: wrap the dataset in data.Captioned "
                "(`job.run.dataset = @data.Captioned()`) or use data.ImageCaptions"
            )
        self.captions = list(data.captions)
        self.tokenizer = Tokenizer.build(self.captions, max_words)
        self.text_config = {
            "vocab_size": len(self.tokenizer),
            "context": context,
            "width": text_width,
            "layers": text_layers,
            "heads": text_heads,
            "embed_dim": embed_dim,
        }
        self.text = TextTower(**self.text_config)
        self.image_proj = nn.Linear(cast(Encoder, backbone).num_features, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.max_scale = max_scale

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), at most `max_scale`."""
        return self.logit_scale.exp().clamp(max=self.max_scale)

    def tokens(self, index: torch.Tensor) -> torch.Tensor:
        """The captions of images `index`, tokenized: int64 ``[B, context]`` on index's device."""
        picked = [self.captions[i] for i in index.tolist()]
        return self.tokenizer.encode(picked, self.text_config["context"]).to(index.device)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        image = self.image_proj(self.backbone(batch.views[0]))  # [B, embed_dim]
        text = self.text(self.tokens(batch.index))  # [B, embed_dim]
        scale = self.scale()
        loss = clip_loss(dist.gather(image), dist.gather(text), scale)  # every pair of the global batch
        with torch.no_grad():  # image -> text retrieval accuracy within the batch
            sim = F.normalize(image, dim=1) @ F.normalize(text, dim=1).T
            acc = (sim.argmax(1) == torch.arange(len(sim), device=sim.device)).float().mean()
        return {"loss": loss, "acc": acc, "scale": scale.detach()}

    def after_step(self, step: int, total: int) -> None:
        """Clips the logit scale's parameter at log(max_scale), as the paper does."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=math.log(self.max_scale))

    def export(self, folder: Path) -> None:
        """``text.pt`` (text tower, image projection, logit scale) and ``text.json`` (its sizes and vocabulary)."""
        state = {
            k: v.detach().cpu().clone()
            for k, v in self.state_dict().items()
            if k.startswith(("text.", "image_proj.", "logit_scale"))
        }
        store.save_torch(folder / "text.pt", state)
        store.write_json(
            folder / "text.json",
            {
                **self.text_config,
                "image_features": self.image_proj.in_features,
                "max_scale": self.max_scale,
                "vocab": self.tokenizer.vocab,
            },
        )


class TextSide(nn.Module):
    """What zero-shot classification needs from a CLIP run: the text tower with its
    tokenizer, and the image projection."""

    def __init__(self, config: dict):
        super().__init__()
        self.tokenizer = Tokenizer(config["vocab"])
        self.context = config["context"]
        self.text = TextTower(
            **{k: config[k] for k in ("vocab_size", "context", "width", "layers", "heads", "embed_dim")}
        )
        self.image_proj = nn.Linear(config["image_features"], config["embed_dim"], bias=False)
        self.logit_scale = nn.Parameter(torch.zeros(()))

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``[N, embed_dim]``."""
        device = self.logit_scale.device
        return F.normalize(self.text(self.tokenizer.encode(texts, self.context).to(device)), dim=1)

    def embed_image(self, features: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings from the backbone's pooled features ``[N, F]``."""
        return F.normalize(self.image_proj(features), dim=1)


def load_text_side(folder: Path) -> TextSide:
    """Rebuilds the exported text side of a CLIP run from ``folder/text.{json,pt}``."""
    side = TextSide(json.loads((folder / "text.json").read_text()))
    side.load_state_dict(store.load_torch(folder / "text.pt"), strict=True)
    return side.eval()
