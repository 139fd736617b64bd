"""Training a classifier on augmented images, shared by the paper linear probe (frozen
encoder, `harness.evals.linear.PaperProbe`) and semi-supervised fine-tuning (the whole
network, `harness.evals.semisup.SemiSupervised`).

Training views are a random resized crop and a horizontal flip (`harness.views.resized_crop`,
the crop of ``views.Augment``), drawn per sample on the training device; evaluation takes
the central ``eval_crop`` of each image resized to the image size (ImageNet's 224 of 256:
0.875). Batches follow ``optim.batch_indices`` (epoch-wise seeded permutations, last
partial batch dropped), so a run is a pure function of its seed. The steps are `harness.optim.Kernel`'s.
Images kept as files (`harness.data.ImageFiles`, an image folder's 256-px copies) are decoded
one batch ahead on a background thread (`decoded`), so decoding overlaps the step before; the
numbers are those of decoding in line.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from harness import optim
from harness.data import ImageSet
from harness.errors import Unsupported
from harness.views import eval_view, normalize, resized_crop

OPTIMIZERS = ("sgd", "lars", "adamw")
SCHEDULES = ("cosine", "step", "constant")
AUGMENTS = ("crop", "flip", "none")
HEAD_NORMS = ("none", "bn", "bn_noaffine")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a classifier is trained (every field changes the numbers).

    Attributes:
        epochs: passes over the labelled images.
        batch_size: images per step (clipped to the number of labelled images).
        lr: learning rate; at batch 256 when `scale_lr` (applied: ``lr * batch / 256``).
        scale_lr: Goyal et al. 2017's linear scaling rule.
        optimizer: ``sgd`` (torch's), ``lars`` (``harness.optim.LARS``) or ``adamw`` (torch's).
        momentum: SGD / LARS momentum.
        betas: AdamW's (beta1, beta2).
        nesterov: Nesterov momentum (SGD only).
        weight_decay: on weights; biases and norm parameters are exempt (and skip LARS).
        schedule: ``cosine`` (to zero), ``step`` (x0.1 at each of `milestones`) or ``constant``.
        milestones: epochs (fractions allowed) at which the ``step`` schedule divides the lr by 10.
        warmup_epochs: linear warm-up before the schedule.
        crop_scale: area range of the random resized crop.
        augment: the training views: ``crop`` (random resized crop of `crop_scale` and a
            horizontal flip, the papers'), ``flip`` (the whole image or its mirror image) or
            ``none`` (the whole image). Without crops a frozen encoder's features are computed
            once (per view) and each step trains only the head, so a probe can take thousands
            of steps for the cost of one or two feature passes; fine-tuning needs ``crop``.
        layer_decay: layer-wise lr decay (Clark et al. 2020, ELECTRA; Bao et al. 2022, BEiT;
            MAE's fine-tuning): block ``i`` of an ``L``-block ViT trains at ``lr * layer_decay **
            (L - i)``, the patch embedding at ``layer_decay ** (L + 1)``, the final norm and the
            head at ``lr``. 1.0: off. Below 1 it needs an encoder with ``blocks`` (a timm ViT).
        label_smoothing: of the cross-entropy (Szegedy et al. 2016), 0: none.
        max_steps: cap on optimizer steps (smoke tests); None: epochs decide.
        precise_bn: after training, recompute the running statistics of the BatchNorm layers
            that trained (`refresh_bn`), weights unchanged, on the centre views that are tested.
    """

    epochs: float
    batch_size: int
    lr: float
    scale_lr: bool = True
    optimizer: str = "sgd"
    momentum: float = 0.9
    betas: Sequence[float] = (0.9, 0.999)
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "cosine"
    milestones: Sequence[float] = ()
    warmup_epochs: float = 0.0
    crop_scale: Sequence[float] = (0.08, 1.0)
    max_steps: int | None = None
    precise_bn: bool = False
    augment: str = "crop"
    layer_decay: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            problems.append("nesterov needs optimizer 'sgd' and momentum > 0")
        if self.epochs <= 0 or self.batch_size < 1 or self.lr <= 0:
            problems.append(
                f"epochs, batch_size and lr must be positive (got {self.epochs}, {self.batch_size}, {self.lr})"
            )
        if self.augment not in AUGMENTS:
            problems.append(f"augment {self.augment!r} is not one of {AUGMENTS}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            problems.append(f"crop_scale {tuple(self.crop_scale)} must be (lo, hi) with 0 < lo <= hi <= 1")
        if not 0 < self.layer_decay <= 1 or not 0 <= self.label_smoothing < 1:
            problems.append(
                f"layer_decay must lie in (0, 1] and label_smoothing in [0, 1) (got {self.layer_decay}, "
                f"{self.label_smoothing})"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas {tuple(self.betas)} must be (beta1, beta2), each in [0, 1)")
        if problems:
            raise ValueError("; ".join(problems))

    def params(self) -> dict:
        out = dataclasses.asdict(self)
        out["milestones"], out["crop_scale"], out["betas"] = (
            list(self.milestones),
            list(self.crop_scale),
            list(self.betas),
        )
        for key, before in (("precise_bn", False), ("augment", "crop"), ("layer_decay", 1.0), ("label_smoothing", 0.0)):
            if out[key] == before:  # settings made before the switch existed keep their protocol ids
                del out[key]
        if self.augment != "crop":  # no crops: the crop range changes nothing
            del out["crop_scale"]
        if self.optimizer != "adamw":  # only AdamW reads betas
            del out["betas"]
        return out

    def budget(self, images: int) -> dict[str, int]:
        """What training on `images` labelled images costs: ``{"batch", "steps", "images_seen"}``
        (last partial batch dropped each epoch, as `train` runs)."""
        batch = min(self.batch_size, images)
        steps = max(1, math.ceil(self.epochs * (images // batch)))
        steps = min(steps, self.max_steps) if self.max_steps else steps
        return {"batch": batch, "steps": steps, "images_seen": steps * batch}


def recipe_of(settings: Mapping[str, Any], **fixed: Any) -> Recipe:
    """The `Recipe` of a protocol's constructor arguments (`settings`, e.g. its ``locals()``): every
    argument named like a Recipe field, sequences as tuples, then `fixed` on top (what the protocol
    derives itself, such as one percentage's epochs)."""
    names = {f.name for f in dataclasses.fields(Recipe)}
    chosen = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items() if k in names}
    return Recipe(**{**chosen, **fixed})


def schedule(recipe: Recipe, per_epoch: int, total: int) -> Callable[[int], float]:
    """The recipe's lr multiplier per step (`optim.lr_factor`; `per_epoch` steps an epoch, `total` steps)."""
    return functools.partial(
        optim.lr_factor,
        total=total,
        warmup=round(recipe.warmup_epochs * per_epoch),
        decay=recipe.schedule,
        milestones=[m * per_epoch for m in recipe.milestones],
    )


def layer_groups(encoder: nn.Module, head: nn.Module, weight_decay: float, decay: float) -> list[dict]:
    """Parameter groups of a ViT encoder and its head with layer-wise lr decay: each group's
    ``lr_scale`` is ``decay ** (L + 1 - layer)``, layer 0 the patch embedding, class token and
    position embeddings, layer ``i + 1`` block ``i``, layer ``L + 1`` the rest (final norm, head);
    decayed and exempt parameters (``ndim <= 1``, and the class token and position embeddings
    that timm's ``no_weight_decay`` names, as MAE's fine-tuning) as `optim.param_groups`.

    Raises:
        Unsupported: when `encoder` has no ``blocks`` (layers are a ViT's blocks).
    """
    blocks = getattr(encoder, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise Unsupported(
            f"layer-wise lr decay needs a ViT's blocks; {type(encoder).__name__} has none "
            "(bind layer_decay = 1.0 for other encoders)"
        )
    top = len(blocks) + 1
    named_exempt = set(getattr(encoder, "no_weight_decay", set)())  # timm: class token, position embeddings

    def layer(name: str) -> int:
        if name.startswith(("patch_embed", "cls_token", "pos_embed", "reg_token")):
            return 0
        return int(name.split(".")[1]) + 1 if name.startswith("blocks.") else top

    groups: dict[tuple[int, bool], dict] = {}
    named = [*encoder.named_parameters(), *(("head." + n, p) for n, p in head.named_parameters())]
    for name, p in named:
        if not p.requires_grad:
            continue
        exempt = p.ndim <= 1 or name in named_exempt
        key = (layer(name), exempt)
        group = groups.setdefault(
            key,
            {"params": [], "weight_decay": 0.0 if exempt else weight_decay, "lr_scale": decay ** (top - key[0])},
        )
        if exempt:
            group["lars"] = False
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def optimizer(recipe: Recipe, model: nn.Module, lr: float, head: nn.Module | None = None) -> torch.optim.Optimizer:
    """The recipe's optimizer over `model`'s trainable parameters (and `head`'s: with the
    recipe's `layer_decay` below 1, `model` is the encoder and `head` trains at the full lr)."""
    if recipe.layer_decay < 1:
        groups = layer_groups(
            model, head if head is not None else nn.Identity(), recipe.weight_decay, recipe.layer_decay
        )
    else:
        whole = model if head is None else nn.ModuleList([model, head])
        groups = [g for g in optim.param_groups(whole, recipe.weight_decay) if g["params"]]
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(
            groups, lr=lr, betas=(recipe.betas[0], recipe.betas[1]), weight_decay=recipe.weight_decay
        )
    if recipe.optimizer == "lars":
        return optim.LARS(groups, lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay, eta=0.001)
    return torch.optim.SGD(
        groups, lr=lr, momentum=recipe.momentum, nesterov=recipe.nesterov, weight_decay=recipe.weight_decay
    )


def classifier(dim: int, num_classes: int, norm: str = "none", std: float = 0.0) -> nn.Module:
    """A linear classifier over `dim` features: weights ~ N(0, `std`) (0: zeros, SimCLR's
    zero-initialised logits layer), zero bias, after the chosen normalisation: ``none``, ``bn``
    (BatchNorm with affine parameters, VISSL's head for Goyal et al. 2019) or ``bn_noaffine``
    (MAE's linear probe, He et al. 2022, sec. A.2: features whose scale differs between encoders,
    such as a ViT's nearly constant class token, reach the linear layer standardised)."""
    if norm not in HEAD_NORMS:
        raise ValueError(f"head norm {norm!r} is not one of {HEAD_NORMS}")
    linear = nn.Linear(dim, num_classes)
    nn.init.normal_(linear.weight, std=std) if std > 0 else nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    if norm == "none":
        return linear
    return nn.Sequential(nn.BatchNorm1d(dim, affine=norm == "bn"), linear)


def feature_dim(encoder: nn.Module, data: ImageSet, image_size: int, device: torch.device | str) -> int:
    """Width of the encoder's pooled output, from a forward pass in eval mode."""
    was_training = encoder.training
    with torch.no_grad():
        d = (
            encoder.eval()(
                eval_view(data.images[torch.arange(min(2, len(data)))].to(device), image_size, data.mean, data.std)
            )
            .flatten(1)
            .shape[1]
        )
    encoder.train(was_training)
    return d


_END = object()


def decoded(images: Any, indices: Iterable[Any], pin: bool = False) -> Iterator[tuple[Any, torch.Tensor]]:
    """``(idx, images[idx])`` for each of `indices` (index tensors or slices), in order.

    In-memory images are indexed when asked. File-backed ones (`harness.data.ImageFiles`) are
    decoded one batch ahead on a background thread (pinned when `pin`, for a non-blocking copy
    to CUDA), so the decoding of a batch overlaps the step that uses the one before; a file
    that cannot be decoded raises its `DataError` when its batch is asked for.
    """
    if isinstance(images, torch.Tensor):
        for idx in indices:
            yield idx, images[idx]
        return

    def load(idx: Any) -> torch.Tensor:
        x = images[idx]  # uint8 [b, C, S, S]
        return x.pin_memory() if pin else x

    it = iter(indices)
    with ThreadPoolExecutor(1, thread_name_prefix="decode-ahead") as pool:
        idx = next(it, _END)
        pending: Future | None = pool.submit(load, idx) if idx is not _END else None
        while pending is not None:
            batch = pending.result()
            following = next(it, _END)
            pending = pool.submit(load, following) if following is not _END else None
            yield idx, batch
            idx = following


def _pin(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def train(
    encoder: nn.Module,
    head: nn.Module,
    data: ImageSet,
    index: torch.Tensor,
    recipe: Recipe,
    image_size: int,
    *,
    fine_tune: bool,
    seed: int,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "classifier",
) -> dict:
    """Trains `head` on the encoder's features of augmented views of ``data[index]``; with
    `fine_tune` the encoder trains too (train mode), else it stays frozen in eval mode.

    Augmentations draw from torch's RNG, seeded with `seed` inside a fork of it (the caller's
    RNG state is left as it was).

    Returns:
        ``Recipe.budget`` (batch, steps, images seen) and ``"final_loss"``.
    Raises:
        optim.NonFiniteLoss: when the loss stops being finite (names the step and the lr).
    """
    if recipe.augment != "crop" and fine_tune:
        raise ValueError(
            f"{desc}: augment {recipe.augment!r} caches a frozen encoder's features; fine-tuning needs augment 'crop'"
        )
    n = len(index)
    budget = recipe.budget(n)
    batch, per_epoch, total = budget["batch"], n // budget["batch"], budget["steps"]
    lr, source = optim.scaled_lr(recipe.lr, batch, recipe.scale_lr)
    for p in encoder.parameters():
        p.requires_grad_(fine_tune)
    opt = (
        optimizer(recipe, encoder, lr, head)
        if fine_tune
        else optimizer(dataclasses.replace(recipe, layer_decay=1.0), head, lr)
    )
    kernel = optim.Kernel(
        opt,
        lr,
        schedule(recipe, per_epoch, total),
        total,
        source,
        "lower the protocol's lr",
        name=desc,
        device=torch.device(device),
    )
    kernel.prepare(encoder).train(fine_tune)
    kernel.prepare(head).train()
    loss = torch.zeros(())
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    cached = (
        None if recipe.augment == "crop" else _view_features(encoder, data, index, image_size, kernel, recipe.augment)
    )
    bar = functools.partial(tqdm, total=total, desc=desc, disable=not progress, dynamic_ncols=True, mininterval=1.0)
    picks = (optim.batch_indices(n, batch, seed, step) for step in range(total))  # [b] positions in `index`
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if cached is not None:
            for step, pick in enumerate(bar(picks)):
                h = cached[0][pick]  # [b, D]
                if len(cached) == 2:  # augment 'flip'
                    h = torch.where((torch.rand(len(pick)) < 0.5)[:, None], cached[1][pick], h)
                with kernel.autocast():
                    loss = F.cross_entropy(
                        head(h.to(device)), data.labels[index[pick]].to(device), label_smoothing=recipe.label_smoothing
                    )
                kernel.step(loss, step)
            return {**budget, "final_loss": loss.item()}
        batches = decoded(data.images, (index[pick] for pick in picks), _pin(device))  # idx [b], uint8 [b, C, H, W]
        for step, (idx, images) in enumerate(bar(batches)):
            x = images.to(device, non_blocking=True).float().div_(255)  # [b, C, H, W]
            x = resized_crop(x, image_size, recipe.crop_scale, (3 / 4, 4 / 3), 0.5)
            x = normalize(x, data.mean, data.std)  # [b, C, S, S]
            with kernel.autocast():
                with torch.set_grad_enabled(fine_tune):
                    h = encoder(x).flatten(1)  # [b, D]
                loss = F.cross_entropy(head(h), data.labels[idx].to(device), label_smoothing=recipe.label_smoothing)
            kernel.step(loss, step)
    return {**budget, "final_loss": loss.item()}


@torch.no_grad()
def _view_features(
    encoder: nn.Module,
    data: ImageSet,
    index: torch.Tensor,
    image_size: int,
    kernel: optim.Kernel,
    augment: str,
    batch_size: int = 512,
) -> list[torch.Tensor]:
    """The frozen encoder's features (eval mode) of ``data[index]``'s whole images and, for
    ``augment='flip'``, of their mirror images: each ``[n, D]``, on the CPU."""
    encoder.eval()
    views: list[list[torch.Tensor]] = [[] for _ in range(2 if augment == "flip" else 1)]
    chunks_of = (index[i : i + batch_size] for i in range(0, len(index), batch_size))
    for _, images in decoded(data.images, chunks_of, _pin(kernel.device)):
        x = eval_view(images.to(kernel.device, non_blocking=True), image_size, data.mean, data.std)
        with kernel.autocast():
            for k, chunks in enumerate(views):
                chunks.append(encoder(x.flip(-1) if k else x).flatten(1).float().cpu())  # [b, D]
    return [torch.cat(chunks) for chunks in views]


@torch.no_grad()
def refresh_bn(
    encoder: nn.Module,
    head: nn.Module,
    data: ImageSet,
    index: torch.Tensor,
    image_size: int,
    eval_crop: float,
    *,
    fine_tune: bool,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> int:
    """Recomputes the running mean and variance of the BatchNorm layers that trained (the head's;
    the encoder's too with `fine_tune`) as averages over the centre views of ``data[index]``;
    weights are unchanged. Precise BN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm",
    arXiv:2105.07576, sec. 3): after a short schedule the momentum averages lag the weights,
    and statistics of random crops do not describe the whole images that are tested.

    Returns:
        The number of BatchNorm layers refreshed.
    """
    trained = [head, encoder] if fine_tune else [head]
    norms = [
        m
        for module in trained
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    encoder.train(fine_tune)
    head.train()
    stop = len(index) - (len(index) % batch_size == 1)  # a last batch of one image is left out: BatchNorm needs two
    chunks_of = (index[i : min(i + batch_size, stop)] for i in range(0, stop, batch_size))
    for _, images in decoded(data.images, chunks_of, _pin(device)):
        x = center_view(images.to(device, non_blocking=True), image_size, eval_crop, data.mean, data.std)
        head(encoder(x).flatten(1))  # x: [b, C, S, S]
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return len(norms)


def center_view(
    images: torch.Tensor, size: int, crop: float, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """The central `crop` fraction of each image, resized to `size`, normalised. uint8 [B,C,H,W] -> float."""
    h, w = images.shape[-2:]
    ch, cw = max(1, round(h * crop)), max(1, round(w * crop))
    top, left = (h - ch) // 2, (w - cw) // 2
    return eval_view(images[..., top : top + ch, left : left + cw], size, mean, std)


@torch.no_grad()
def test(
    encoder: nn.Module,
    head: nn.Module,
    data: ImageSet,
    image_size: int,
    eval_crop: float,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) of ``head(encoder(x))`` on centre views; top-5 only with more than 5 classes."""
    encoder.eval()
    head.eval()
    num_classes = len(data.classes)
    k = min(5, num_classes)
    hits = torch.zeros(k)
    slices = (slice(i, i + batch_size) for i in range(0, len(data), batch_size))
    for part, images in decoded(data.images, slices, _pin(device)):
        x = center_view(images.to(device, non_blocking=True), image_size, eval_crop, data.mean, data.std)
        top = head(encoder(x).flatten(1)).topk(k, dim=1).indices.cpu()  # [b, k]
        hits += (top == data.labels[part, None]).cumsum(1).sum(0).float()
    out = {"top1": 100.0 * float(hits[0]) / len(data)}
    if num_classes > 5:
        out["top5"] = 100.0 * float(hits[k - 1]) / len(data)
    return out
