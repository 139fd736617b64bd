"""Zero-shot classification by prompts (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision", ICML, section 3.1).

Reads the text side a CLIP run exported next to its encoder (``text.pt``, ``text.json``):
each class name is written into every prompt template, the normalised text embeddings
are averaged per class (and normalised again), and each test image is assigned the
class whose embedding is most similar to its own. The image embedding is the exported
image projection of the encoder's pooled features: the run's frozen test features
(computed once by `harness.evals.features` with `ctx.encoder()`), so the images pass
through the encoder once for every protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

import gin
from harness.data import PROMPT_TEMPLATES
from harness.evals import Context
from methods.clip import TextSide, load_text_side


def _method_name() -> str:
    """The run's method as its gin name (``rotnet.RotNet``), when gin knows it."""
    try:
        ref = gin.query_parameter("job.run.method")
        return getattr(ref, "selector", None) or str(ref)
    except (ValueError, KeyError):
        return "this run's method"


@gin.configurable(module="zeroshot")
class ZeroShot:
    """Top-1 accuracy in percent of prompt-based classification of the test split.

    Args:
        templates: prompt templates, each with one ``{}`` for the class name.
    """

    name = "zeroshot/clip"
    frozen = False

    def __init__(self, templates: Sequence[str] = PROMPT_TEMPLATES):
        bad = [t for t in templates if t.count("{}") != 1]
        if not templates or bad:
            raise ValueError(
                f"zeroshot.ZeroShot.templates: each template needs exactly one '{{}}'; got {bad or 'none'}"
            )
        self.templates = tuple(templates)

    def params(self) -> dict:
        """Settings that change the numbers (JSON-serialisable)."""
        return {"templates": list(self.templates)}

    @torch.no_grad()
    def class_embeddings(self, side: TextSide, classes: Sequence[str]) -> torch.Tensor:
        """Per class, the normalised mean of its prompts' normalised embeddings: ``[C, D]``."""
        emb = torch.stack([side.embed_text([t.format(c) for t in self.templates]).mean(0) for c in classes])
        return torch.nn.functional.normalize(emb, dim=1)

    @torch.no_grad()
    def evaluate(self, ctx: Context) -> dict[str, float]:
        """``{"zeroshot/top1": accuracy in percent}`` on the run's test features."""
        folder = Path(ctx.pretrain_dir)
        if not (folder / "text.pt").is_file() or not (folder / "text.json").is_file():
            raise FileNotFoundError(
                f"zeroshot.ZeroShot: {folder} holds no text tower (text.pt, text.json): {_method_name()} exports "
                "none, only an image-text method (clip) does. Fix: evaluate zero-shot only in a table of clip runs "
                "(drop @zeroshot.ZeroShot() from job.run.evaluations for the other methods)"
            )
        side = load_text_side(folder).to(ctx.device)
        classes = ctx.dataset.split("test").classes
        text = self.class_embeddings(side, classes)  # [C, D]
        test = ctx.features["test"]
        image = side.embed_image(test.x.to(ctx.device))  # [N, D]
        pred = (image @ text.T).argmax(1).cpu()  # [N]
        return {"zeroshot/top1": 100.0 * (pred == test.y).float().mean().item()}
