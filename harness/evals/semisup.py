"""Semi-supervised evaluation: fine-tune the whole network on 1 % and 10 % of the labels.

Follows SimCLR (Chen, Kornblith, Norouzi & Hinton 2020, "A Simple Framework for
Contrastive Learning of Visual Representations", ICML; its fine-tuning recipe): the
pretrained encoder plus a zero-initialised linear head are fine-tuned on a labelled subset
with random crops and flips only, Nesterov-momentum SGD at lr 0.05 x batch/256 (batch
4096), no weight decay and no warm-up, cosine decay, 60 epochs on 1 % and 30 on 10 %;
top-1/top-5 on centre crops of the test split. On ImageNet the subsets are SimCLR's files
(``imagenet_subsets/1percent.txt``, ``10percent.txt`` of github.com/google-research/simclr:
one train image file name per line); on other data a class-balanced subset is drawn from
``subset_seed`` (the same for every method and seed of a table).

Each percentage fine-tunes its own fresh copy of the exported encoder (`Context.encoder`);
the exported encoder and the frozen features other protocols read are never changed.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

import torch

import gin
from harness.data import ImageSet
from harness.evals import finetune
from harness.evals.subsets import balanced_indices, check_subset_file, per_class_for, read_subset_file

if TYPE_CHECKING:
    from harness.evals import Context


@gin.configurable(module="semisup")
class SemiSupervised:
    """Whole-network fine-tuning on few labels, one run per labelled percentage.

    Args:
        name: the protocol's name and the prefix of its metrics (``<name>/<p>%/top1``).
        image_size: side of the training crops and evaluation views (``%IMAGE_SIZE``).
        percents: labelled shares of the training split, in percent.
        epochs: fine-tuning epochs, one per percentage (SimCLR: 60 for 1 %, 30 for 10 %).
        subset_files: one file per percentage naming the labelled images (SimCLR's ImageNet
            lists), or None to draw class-balanced subsets; a None entry draws that one.
        subset_seed: seed of the class-balanced draws.
        batch_size, lr, scale_lr, optimizer, momentum, betas, nesterov, weight_decay, layer_decay,
            label_smoothing, schedule, crop_scale, max_steps, precise_bn: the recipe
            (`harness.evals.finetune.Recipe`).
        warmup_epochs: linear warm-up, one value for every percentage or one per percentage.
        norm: the head's normalisation before its zero-initialised linear layer
            (`harness.evals.finetune.classifier`): ``none`` (SimCLR) or ``bn_noaffine`` (MAE's).
        eval_crop: central fraction of each test image that is evaluated (ImageNet: 224/256).
        test_size: test images (a fixed subset); None: all.
    """

    frozen = False

    def __init__(
        self,
        name: str = "semisup/simclr",
        image_size: int = gin.REQUIRED,
        percents: Sequence[float] = (1, 10),
        epochs: Sequence[float] = (60, 30),
        subset_files: Sequence[str | None] | None = None,
        subset_seed: int = 0,
        batch_size: int = 4096,
        lr: float = 0.05,
        scale_lr: bool = True,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        betas: Sequence[float] = (0.9, 0.999),
        nesterov: bool = True,
        weight_decay: float = 0.0,
        layer_decay: float = 1.0,
        label_smoothing: float = 0.0,
        schedule: str = "cosine",
        warmup_epochs: float | Sequence[float] = 0.0,
        crop_scale: Sequence[float] = (0.08, 1.0),
        eval_crop: float = 0.875,
        test_size: int | None = None,
        max_steps: int | None = None,
        precise_bn: bool = False,
        norm: str = "none",
    ) -> None:
        files = list(subset_files) if subset_files is not None else [None] * len(percents)
        warmups = [warmup_epochs] * len(percents) if isinstance(warmup_epochs, (int, float)) else list(warmup_epochs)
        if not percents or not len(epochs) == len(files) == len(warmups) == len(percents):
            raise ValueError(
                f"semisup.SemiSupervised: percents, epochs, subset_files and warmup_epochs (when a list) need one "
                f"entry per labelled share (check its gin bindings); got {list(percents)}, {list(epochs)}, {files}, "
                f"{warmups}"
            )
        if not all(0 < p <= 100 for p in percents) or not 0 < eval_crop <= 1 or norm not in finetune.HEAD_NORMS:
            raise ValueError(
                f"semisup.SemiSupervised: percents must lie in (0, 100], eval_crop in (0, 1] and norm be one of "
                f"{finetune.HEAD_NORMS}; got {list(percents)}, {eval_crop}, {norm!r}"
            )
        self.name, self.image_size, self.eval_crop = str(name), int(image_size), float(eval_crop)
        self.percents, self.epochs, self.subset_files = [float(p) for p in percents], [float(e) for e in epochs], files
        self.warmups, self.norm = [float(w) for w in warmups], norm
        self.subset_seed, self.test_size = int(subset_seed), test_size
        base = finetune.recipe_of(locals(), epochs=self.epochs[0], warmup_epochs=self.warmups[0])
        self.recipes = [dataclasses.replace(base, epochs=e, warmup_epochs=w) for e, w in zip(self.epochs, self.warmups)]

    def check(self) -> None:
        """Preflight (before pretraining): every subset file is there."""
        for file in self.subset_files:
            if file is not None:
                check_subset_file(file)

    def params(self) -> dict:
        """Settings that change the numbers (JSON-serialisable)."""
        recipe = {k: v for k, v in self.recipes[0].params().items() if k not in ("epochs", "milestones")}
        if len(set(self.warmups)) > 1:  # one warm-up per percentage (a single value keeps the old ids)
            recipe["warmup_epochs"] = self.warmups
        if self.norm != "none":  # settings made before heads had a norm keep their protocol ids
            recipe["norm"] = self.norm
        return {
            "percents": self.percents,
            "epochs": self.epochs,
            "subset_files": self.subset_files,
            "subset_seed": self.subset_seed,
            **recipe,
            "image_size": self.image_size,
            "eval_crop": self.eval_crop,
            "test_size": self.test_size,
        }

    def _subset(self, percent: float, file: str | None, train: ImageSet) -> tuple[torch.Tensor, str]:
        """The labelled images of one percentage (indices into `train`) and where they came from."""
        if file:
            return read_subset_file(file, train), file
        per_class = per_class_for(percent, train.labels)
        source = f"class-balanced draw, seed {self.subset_seed}"
        return balanced_indices(train.labels, per_class, self.subset_seed), source

    def budget(self, train: ImageSet) -> dict[str, dict[str, int]]:
        """Batch, steps and images seen of each percentage's fine-tuning on `train` (as `evaluate` runs)."""
        return {
            f"{percent:g}%": recipe.budget(len(self._subset(percent, file, train)[0]))
            for percent, recipe, file in zip(self.percents, self.recipes, self.subset_files)
        }

    def evaluate(self, ctx: Context) -> dict[str, float]:
        """Fine-tunes a fresh encoder copy per percentage and scores the test split.

        Returns:
            ``<name>/<p>%/top1`` and ``/top5`` (with more than 5 classes) per percentage, in
            percent. ``self.selected`` records each subset's size and where it came from.
        """
        train, test = ctx.dataset.split("train"), ctx.dataset.split("test").subset(self.test_size)
        out, self.selected = {}, {}
        for percent, recipe, file in zip(self.percents, self.recipes, self.subset_files):
            index, source = self._subset(percent, file, train)
            tag = f"{percent:g}%"
            self.selected[tag] = {"images": len(index), "source": source}
            encoder = ctx.encoder()
            dim = finetune.feature_dim(encoder, train, self.image_size, ctx.device)
            head = finetune.classifier(dim, len(train.classes), self.norm)  # zero-initialised logits (SimCLR)
            done = finetune.train(
                encoder,
                head,
                train,
                index,
                recipe,
                self.image_size,
                fine_tune=True,
                seed=ctx.seed,
                device=ctx.device,
                progress=ctx.progress,
                desc=f"{self.name}/{tag}",
            )
            self.selected[tag]["budget"] = {k: done[k] for k in ("batch", "steps", "images_seen")}
            if recipe.precise_bn:
                finetune.refresh_bn(
                    encoder, head, train, index, self.image_size, self.eval_crop, fine_tune=True, device=ctx.device
                )
            scores = finetune.test(encoder, head, test, self.image_size, self.eval_crop, ctx.device)
            out.update({f"{self.name}/{tag}/{k}": v for k, v in scores.items()})
        return out
