"""Detection transfer: Faster R-CNN on PASCAL VOC with the pretrained backbone, AP50 on VOC07 test.

Follows the VOC detection protocol of He et al. 2020, "Momentum Contrast for Unsupervised
Visual Representation Learning" (CVPR), with their detectron2 configs
(github.com/facebookresearch/moco/tree/main/detection): Faster R-CNN (Ren et al. 2015)
with an R50-C4 backbone, i.e. the ResNet up to res4 (stride 16) feeds the region
proposal network and RoIAlign (14 x 14), res5 runs on every region as the box head,
followed by an extra BatchNorm (their ``Res5ROIHeadsExtraNorm``); every BatchNorm is
fine-tuned (they sync it across GPUs: here one process sees the whole batch), all layers
train (``FREEZE_AT: 0``). Fine-tuned on VOC07+12 trainval (VOC2012 is used when
``VOCdevkit/VOC2012`` exists) for 24k iterations at batch 16, lr 0.02 with 100 warm-up
iterations and steps at 18k and 22k, shorter image side drawn from 480..800 when
training and 800 at test, horizontal flips; BatchNorm statistics recomputed over 200
iterations before testing (PreciseBN). Scored on VOC07 test with the VOC07 11-point AP
(detectron2's VOC evaluator for 2007): AP50, AP75 and AP (mean over IoU 0.50:0.95).

Here the network is torchvision's ``FasterRCNN`` (no downloaded weights anywhere) on
the exported timm ResNet (``conv1 .. layer3`` as the backbone, ``layer4`` as the box
head), and the data is read through torchvision's ``VOCDetection``. Difficult objects
are trained on (as detectron2 does) and ignored at scoring (as the devkit does).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable, Sequence, cast

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import gin
from harness import optim
from harness.data import DataError
from harness.errors import Unsupported
from harness.evals import Context
from harness.evals.voc import (
    EmbeddedVOC,
    in_channels,
    pixel_stats,
    pr_curve,
    resolve_root,
    voc07_ap,
    voc_classes,
    voc_dir,
)

STEM = ("conv1", "bn1", "act1", "maxpool")


# --- data -------------------------------------------------------------------------


class VOCBoxes(torch.utils.data.Dataset):
    """VOC images and boxes read through torchvision's ``VOCDetection``.

    Item: image float ``[C, H, W]`` in [0, 1], boxes float ``[G, 4]`` (x0, y0, x1, y1;
    0-based, VOC's ``xmin - 1, ymin - 1, xmax, ymax`` as detectron2 reads them), labels
    int64 ``[G]`` (1 + class index; 0 is background) and difficult bool ``[G]``.
    """

    def __init__(self, root: Path, parts: Sequence[tuple[str, str]], classes: Sequence[str], channels: int):
        from torchvision.datasets import VOCDetection

        self.sets = [VOCDetection(str(root), year=year, image_set=split, download=False) for year, split in parts]
        self.index = [(s, i) for s, ds in enumerate(self.sets) for i in range(len(ds))]
        self.label = {c: i + 1 for i, c in enumerate(classes)}
        self.channels = channels

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        s, i = self.index[k]
        ds = self.sets[s]
        image, target = ds[i]
        if self.channels == 1:
            image = image.convert("L")
        x = torch.from_numpy(np.asarray(image, np.uint8).copy()).reshape(image.height, image.width, self.channels)
        boxes, labels, difficult = [], [], []
        for obj in target["annotation"].get("object", []):
            if obj["name"] not in self.label:
                raise DataError(
                    f"{ds.annotations[i]}: object {obj['name']!r} is not one of the classes of "
                    f"ImageSets/Main ({', '.join(self.label)})"
                )
            bb = obj["bndbox"]
            boxes.append([float(bb["xmin"]) - 1, float(bb["ymin"]) - 1, float(bb["xmax"]), float(bb["ymax"])])
            labels.append(self.label[obj["name"]])
            difficult.append(obj.get("difficult", "0") == "1")
        return (
            x.permute(2, 0, 1).float().div_(255),
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            torch.tensor(labels, dtype=torch.int64),
            torch.tensor(difficult, dtype=torch.bool),
        )


def _batch(items: list) -> list:
    return items


# --- AP ---------------------------------------------------------------------------


def detection_ap(
    scores: np.ndarray,
    image_ids: np.ndarray,
    boxes: np.ndarray,
    gts: dict[int, tuple[np.ndarray, np.ndarray]],
    thresholds: Sequence[float] = (0.5,),
) -> list[float]:
    """VOC07 detection AP of one class at each IoU threshold (the devkit's ``VOCevaldet``).

    Detections are taken highest score first; each one is matched to the ground-truth box
    of its image it overlaps most: above the threshold it is a true positive if that box
    is not difficult and not yet taken, ignored if difficult, else a false positive.

    Args:
        scores: ``[K]`` detection scores.
        image_ids: ``[K]`` the image of each detection.
        boxes: ``[K, 4]`` detected boxes (x0, y0, x1, y1).
        gts: per image, ground-truth boxes ``[G, 4]`` and difficult flags ``[G]`` of this class.
        thresholds: IoU thresholds.

    Returns:
        11-point AP per threshold (NaN when the class has no non-difficult box).
    """
    positives = sum(int((~d).sum()) for _, d in gts.values())
    if positives == 0:
        return [math.nan] * len(thresholds)
    order = np.argsort(-scores, kind="stable")
    best, match = np.zeros(len(scores)), np.full(len(scores), -1)
    for k in order:  # each detection's best overlap, computed once for every threshold
        g = gts.get(int(image_ids[k]))
        if g is None or len(g[0]) == 0:
            continue
        gb, b = g[0], boxes[k]
        iw = (np.minimum(gb[:, 2], b[2]) - np.maximum(gb[:, 0], b[0])).clip(0)
        ih = (np.minimum(gb[:, 3], b[3]) - np.maximum(gb[:, 1], b[1])).clip(0)
        inter = iw * ih
        iou = inter / ((b[2] - b[0]) * (b[3] - b[1]) + (gb[:, 2] - gb[:, 0]) * (gb[:, 3] - gb[:, 1]) - inter)
        match[k], best[k] = int(iou.argmax()), float(iou.max())
    out = []
    for t in thresholds:
        tp, fp, taken = np.zeros(len(scores)), np.zeros(len(scores)), set()
        for k in order:
            i, j = int(image_ids[k]), int(match[k])
            if j < 0 or best[k] <= t:
                fp[k] = 1
            elif gts[i][1][j]:
                continue  # a difficult box: neither right nor wrong
            elif (i, j) in taken:
                fp[k] = 1  # a duplicate
            else:
                tp[k] = 1
                taken.add((i, j))
        out.append(voc07_ap(*pr_curve(scores, tp, fp, positives)) if len(scores) else 0.0)
    return out


# --- the model --------------------------------------------------------------------


class Res5Head(nn.Module):
    """The box head of a C4 detector: res5 on each pooled region, an extra BatchNorm, mean pool."""

    def __init__(self, layer4: nn.Module, channels: int, extra_norm: bool):
        super().__init__()
        self.layer4 = layer4
        self.norm = nn.BatchNorm2d(channels) if extra_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layer4(x)).mean((2, 3))  # [K, C, s, s] -> [K, C5]


def require_resnet(encoder: nn.Module) -> None:
    """Raises `Unsupported` unless `encoder` has a timm ResNet's stem and four stages."""
    missing = [n for n in (*STEM, "layer1", "layer2", "layer3", "layer4") if not hasattr(encoder, n)]
    if missing:
        raise Unsupported(
            f"detection/voc07 builds an R-C4 detector from a ResNet-style timm backbone; "
            f"{type(encoder).__name__} has no {', '.join(missing)}"
        )


def c4_parts(encoder: nn.Module) -> tuple[nn.Module, nn.Module, int, int]:
    """Splits a timm ResNet at res4: (backbone to layer3 with ``out_channels``, layer4, C4, C5)."""
    require_resnet(encoder)
    body = nn.Sequential(*(getattr(encoder, n) for n in (*STEM, "layer1", "layer2", "layer3")))
    layer4: nn.Module = getattr(encoder, "layer4")
    with torch.no_grad():
        was = encoder.training
        encoder.eval()
        c4 = body(torch.zeros(1, in_channels(encoder), 64, 64)).shape[1]
        c5 = layer4(torch.zeros(1, c4, 4, 4)).shape[1]
        encoder.train(was)
    body.out_channels = c4
    return body, layer4, c4, c5


@gin.configurable(module="voc_detection")
class Detection:
    """Faster R-CNN R-C4 fine-tuned on VOC trainval, VOC07 11-point AP on VOC07 test.

    Reports ``detection/voc07/AP50``, ``.../AP75`` and ``.../AP`` (IoU 0.50:0.95) in
    percent; per-class AP50 goes to ``self.selected`` (run.json). The training losses
    are kept in ``self.losses``.
    """

    name = "detection/voc07"
    frozen = False

    def __init__(
        self,
        root: str | None = None,
        generate_embedded: bool = False,
        use_2012: bool = True,
        iterations: int = 24000,
        batch_size: int = 16,
        lr: float = 0.02,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        lr_steps: Sequence[float] = (0.75, 22 / 24),
        warmup_iters: int = 100,
        warmup_factor: float = 0.001,
        min_size: Sequence[int] = tuple(range(480, 801, 32)),
        max_size: int = 1333,
        flip: float = 0.5,
        anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        pooled_size: int = 14,
        extra_norm: bool = True,
        rpn_batch_size: int = 256,
        rpn_pre_nms_train: int = 12000,
        rpn_post_nms_train: int = 2000,
        rpn_pre_nms_test: int = 6000,
        rpn_post_nms_test: int = 1000,
        box_batch_size: int = 512,
        detections_per_image: int = 100,
        precise_bn_iters: int = 200,
        test_images: int | None = None,
        test_batch_size: int = 8,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        num_workers: int = 0,
    ) -> None:
        """Args:
        root: the folder holding ``VOCdevkit/VOC2007`` (and optionally ``VOC2012``).
        generate_embedded: without ``root``, generate the Fashion-MNIST tree (`voc.EmbeddedVOC`).
        use_2012: add VOC2012 trainval to training when ``VOCdevkit/VOC2012`` exists.
        iterations: training iterations.
        batch_size: images per iteration.
        lr: base learning rate (SGD).
        momentum: SGD momentum.
        weight_decay: L2 on every weight except BatchNorm's (detectron2's ``WEIGHT_DECAY_NORM: 0``).
        lr_steps: fractions of ``iterations`` where the lr drops 10x (MoCo: 18k and 22k of 24k).
        warmup_iters: linear warm-up length, from ``warmup_factor * lr``.
        warmup_factor: the warm-up's starting fraction of the lr.
        min_size: training shorter sides (one drawn per batch); the last one is used at test.
        max_size: cap on the longer side.
        flip: probability of a horizontal flip per training image.
        anchor_sizes: RPN anchor sides in input pixels (one feature level, stride 16).
        aspect_ratios: RPN anchor aspect ratios.
        pooled_size: RoIAlign output side on the stride-16 map (res5 halves it).
        extra_norm: BatchNorm after res5 in the box head (MoCo's).
        rpn_batch_size: anchors sampled per image for the RPN loss.
        rpn_pre_nms_train: proposals kept before NMS when training.
        rpn_post_nms_train: proposals kept after NMS when training.
        rpn_pre_nms_test: proposals kept before NMS at test.
        rpn_post_nms_test: proposals kept after NMS at test.
        box_batch_size: regions sampled per image for the box head's loss.
        detections_per_image: most detections kept per test image.
        precise_bn_iters: training batches over which BatchNorm statistics are recomputed
            before testing (0: keep the running averages).
        test_images: score a fixed subset of the test images (None: all).
        test_batch_size: images per test batch.
        mean: pixel mean (default: the pretraining data's, as MoCo uses ImageNet's).
        std: pixel std.
        num_workers: data-loading processes.
        """
        if iterations < 1 or batch_size < 1 or lr <= 0 or not min_size or pooled_size < 1 or not anchor_sizes:
            raise ValueError(
                "voc_detection.Detection needs iterations, batch_size, lr, pooled_size >= 1 and non-empty "
                f"min_size and anchor_sizes (check its gin bindings); got {iterations}, {batch_size}, "
                f"{lr}, {pooled_size}, {min_size}, {anchor_sizes}"
            )
        self.root, self.generate_embedded, self.use_2012 = root, generate_embedded, use_2012
        self.iterations, self.batch_size, self.lr, self.momentum = int(iterations), int(batch_size), lr, momentum
        self.weight_decay, self.lr_steps = weight_decay, [float(s) for s in lr_steps]
        self.warmup_iters, self.warmup_factor = int(warmup_iters), warmup_factor
        self.min_size, self.max_size, self.flip = [int(s) for s in min_size], int(max_size), flip
        self.anchor_sizes, self.aspect_ratios = [int(s) for s in anchor_sizes], [float(a) for a in aspect_ratios]
        self.pooled_size, self.extra_norm = int(pooled_size), extra_norm
        self.rpn = {
            "batch": rpn_batch_size,
            "pre_train": rpn_pre_nms_train,
            "post_train": rpn_post_nms_train,
            "pre_test": rpn_pre_nms_test,
            "post_test": rpn_post_nms_test,
        }
        self.box_batch_size, self.detections_per_image = box_batch_size, detections_per_image
        self.precise_bn_iters, self.test_images, self.test_batch_size = precise_bn_iters, test_images, test_batch_size
        self.mean, self.std = (tuple(mean) if mean else None), (tuple(std) if std else None)
        self.num_workers = num_workers
        self.selected: dict = {}
        self.losses: list[float] = []

    def params(self) -> dict:
        """Settings that change the numbers (JSON-serialisable)."""
        out = {
            k: getattr(self, k)
            for k in (
                "root",
                "use_2012",
                "iterations",
                "batch_size",
                "lr",
                "momentum",
                "weight_decay",
                "lr_steps",
                "warmup_iters",
                "warmup_factor",
                "min_size",
                "max_size",
                "flip",
                "anchor_sizes",
                "aspect_ratios",
                "pooled_size",
                "extra_norm",
                "rpn",
                "box_batch_size",
                "detections_per_image",
                "precise_bn_iters",
                "test_images",
                "mean",
                "std",
            )
        }
        out.update(arch="faster_rcnn_c4", ap="voc07-11point")
        if not self.root and self.generate_embedded:
            out["embedded"] = EmbeddedVOC().params()
        return out

    def build(self, encoder: nn.Module, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
        """Faster R-CNN R-C4 around the encoder (its weights are used, not copied)."""
        from torchvision.models.detection import FasterRCNN
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
        from torchvision.ops import MultiScaleRoIAlign

        body, layer4, _, c5 = c4_parts(encoder)
        return FasterRCNN(
            body,
            num_classes=None,
            min_size=tuple(self.min_size),
            max_size=self.max_size,
            image_mean=list(mean),
            image_std=list(std),
            rpn_anchor_generator=AnchorGenerator((tuple(self.anchor_sizes),), (tuple(self.aspect_ratios),)),
            rpn_pre_nms_top_n_train=self.rpn["pre_train"],
            rpn_post_nms_top_n_train=self.rpn["post_train"],
            rpn_pre_nms_top_n_test=self.rpn["pre_test"],
            rpn_post_nms_top_n_test=self.rpn["post_test"],
            rpn_batch_size_per_image=self.rpn["batch"],
            box_roi_pool=MultiScaleRoIAlign(["0"], self.pooled_size, sampling_ratio=0),
            box_head=Res5Head(layer4, c5, self.extra_norm),
            box_predictor=FastRCNNPredictor(c5, num_classes + 1),
            box_batch_size_per_image=self.box_batch_size,
            box_detections_per_img=self.detections_per_image,
        )

    def schedule(self) -> Callable[[int], float]:
        """The lr multiplier per iteration: detectron2's warm-up from ``warmup_factor`` times the 10x steps."""
        return functools.partial(
            optim.lr_factor,
            total=self.iterations,
            warmup=self.warmup_iters,
            warmup_from=self.warmup_factor,
            decay="step",
            milestones=[s * self.iterations for s in self.lr_steps],
        )

    def _batches(self, data: VOCBoxes, count: int, generator: torch.Generator):
        """`count` training batches of images drawn without replacement, epoch after epoch."""
        order = torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=generator)))
        sampler = torch.utils.data.RandomSampler(data, num_samples=count * self.batch_size, generator=order)
        loader = torch.utils.data.DataLoader(
            data, batch_size=self.batch_size, sampler=sampler, collate_fn=_batch, num_workers=self.num_workers
        )
        for items in loader:
            images, targets = [], []
            for x, boxes, labels, _ in items:
                if torch.rand((), generator=generator) < self.flip:
                    x, boxes = (
                        x.flip(-1),
                        torch.stack(
                            [x.shape[-1] - boxes[:, 2], boxes[:, 1], x.shape[-1] - boxes[:, 0], boxes[:, 3]], 1
                        ),
                    )
                images.append(x)
                targets.append({"boxes": boxes, "labels": labels})
            yield images, targets

    def _to(self, images: list, targets: list, device) -> tuple[list, list]:
        return [x.to(device) for x in images], [{k: v.to(device) for k, v in t.items()} for t in targets]

    @torch.no_grad()
    def _precise_bn(self, model: nn.Module, data: VOCBoxes, generator: torch.Generator, device) -> None:
        """Replaces BatchNorm running statistics by their mean over training batches."""
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms or self.precise_bn_iters < 1:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
        model.train()
        for images, targets in self._batches(data, self.precise_bn_iters, generator):
            model(*self._to(images, targets, device))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum

    def budget(self, train: object = None) -> dict[str, dict[str, int]]:
        """Batch, iterations and images seen of the detector's training (the VOC tree's, whatever `train`)."""
        return {
            "": {"batch": self.batch_size, "steps": self.iterations, "images_seen": self.batch_size * self.iterations}
        }

    def check(self) -> None:
        """Preflight (before pretraining): a bound root holds VOCdevkit/VOC2007, or the tree is generated."""
        if self.root or not self.generate_embedded:
            resolve_root(self.root, self.generate_embedded, cast(Context, None), "voc_detection.Detection")

    def evaluate(self, ctx: Context) -> dict[str, float]:
        """Fine-tunes a detector on the fresh encoder copy, then scores VOC07 test."""
        with torch.random.fork_rng(devices=[]):  # the seeding below leaves other protocols' draws alone
            return self._evaluate(ctx)

    def _evaluate(self, ctx: Context) -> dict[str, float]:
        encoder = ctx.encoder()
        require_resnet(encoder)  # before any data is read: raw pixels or a ViT are skipped, not failed
        root = resolve_root(self.root, self.generate_embedded, ctx, "voc_detection.Detection")
        classes = voc_classes(root)
        channels = in_channels(encoder)
        mean, std = pixel_stats(ctx, channels, self.mean, self.std)
        parts = [("2007", "trainval")]
        if self.use_2012 and voc_dir(root, "2012").is_dir():
            parts.append(("2012", "trainval"))
        train = VOCBoxes(root, parts, classes, channels)
        test = VOCBoxes(root, [("2007", "test")], classes, channels)
        torch.manual_seed(ctx.seed)  # the new heads' initialisation and the sizes drawn per batch
        gen = torch.Generator().manual_seed(ctx.seed)
        model = self.build(encoder, len(classes), mean, std)
        opt = torch.optim.SGD(
            optim.param_groups(model, self.weight_decay, norms_only=True), lr=self.lr, momentum=self.momentum
        )
        kernel = optim.Kernel(
            opt,
            self.lr,
            self.schedule(),
            self.iterations,
            f"voc_detection.Detection.lr = {self.lr}",
            "lower voc_detection.Detection.lr",
            name=self.name,
            device=torch.device(ctx.device),
        )
        kernel.prepare(model).train()
        self.losses = []
        bar = tqdm(
            self._batches(train, self.iterations, gen),
            total=self.iterations,
            desc="detection/voc07",
            disable=not ctx.progress,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        for it, (images, targets) in enumerate(bar):
            with kernel.autocast():
                terms = model(*self._to(images, targets, ctx.device))
            loss = sum(terms.values())
            kernel.step(loss, it, terms=terms)
            self.losses.append(loss.item())
            bar.set_postfix(loss=f"{self.losses[-1]:.3f}", refresh=False)
        self._precise_bn(model, train, gen, ctx.device)
        return self.score(model, test, classes, ctx)

    @torch.no_grad()
    def score(self, model: nn.Module, test: VOCBoxes, classes: Sequence[str], ctx: Context) -> dict[str, float]:
        """Detects on the test images and computes the VOC07 APs."""
        model.eval()
        picks = list(range(len(test)))
        if self.test_images is not None and self.test_images < len(picks):
            picks = torch.randperm(len(picks), generator=torch.Generator().manual_seed(0))[: self.test_images].tolist()
        # class -> (scores, image ids, boxes [4]); class -> image id -> (boxes [G, 4], difficult [G])
        dets: dict[int, tuple[list[float], list[int], list[np.ndarray]]] = {
            c: ([], [], []) for c in range(1, len(classes) + 1)
        }
        gts: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {c: {} for c in dets}
        for start in tqdm(
            range(0, len(picks), self.test_batch_size),
            desc="detection/voc07 test",
            disable=not ctx.progress,
            dynamic_ncols=True,
            mininterval=1.0,
        ):
            items = [test[k] for k in picks[start : start + self.test_batch_size]]
            outs = model([x.to(ctx.device) for x, *_ in items])
            for n, ((_, boxes, labels, difficult), out) in enumerate(zip(items, outs)):
                image = start + n
                for c in dets:
                    keep = labels == c
                    if keep.any():
                        gts[c][image] = (boxes[keep].numpy(), difficult[keep].numpy())
                for b, lab, s in zip(out["boxes"].cpu().numpy(), out["labels"].cpu().tolist(), out["scores"].cpu()):
                    dets[lab][0].append(float(s))
                    dets[lab][1].append(image)
                    dets[lab][2].append(b)
        thresholds = [0.5 + 0.05 * i for i in range(10)]
        per_class = []
        for c, (s, i, b) in dets.items():
            per_class.append(
                detection_ap(
                    np.array(s, np.float64),
                    np.array(i, np.int64),
                    np.array(b, np.float64).reshape(-1, 4),
                    gts[c],
                    thresholds,
                )
            )
        aps = np.array(per_class)  # [C, 10]
        scored = ~np.isnan(aps[:, 0])
        if not scored.any():
            raise DataError("detection/voc07: no test image has a (non-difficult) object; cannot compute an AP")
        ap = aps[scored]
        self.selected = {
            "AP50": {cls: (None if math.isnan(a) else round(100 * float(a), 2)) for cls, a in zip(classes, aps[:, 0])},
            "test_images": len(picks),
            "budget": self.budget()[""],
        }
        return {
            "detection/voc07/AP50": 100 * float(ap[:, 0].mean()),
            "detection/voc07/AP75": 100 * float(ap[:, 5].mean()),
            "detection/voc07/AP": 100 * float(ap.mean()),
        }
