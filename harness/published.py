"""Published numbers beside a leaderboard, matched on the conditions they were measured under.

A leaderboard number gets the published value, ``Δ`` (ours minus published) and a verdict
only when a reference row (``reference/published.csv`` or a user's file in its schema,
`harness.reference`) was measured under the run's conditions: the same method, dataset,
backbone, pretraining epochs, protocol and metric, and batch size where the reference
states one, with the method's standard recipe (an empty ``variant``: never an ablation, a
"v2" or another changed recipe). Where several rows match, one that states our batch size
comes before one that states none, then file order. The verdict is ``reproduced`` when
``|Δ|`` is within the source's reported spread, or `DEFAULT_TOLERANCE` points where it
reports none; else ``below`` or ``above``.

Anything else (the embedded scale: Fashion-MNIST, a ResNet-18, tens of epochs) gets no Δ:
the nearest published number of the same kind (`family`) is shown in a column whose header
names the conditions it was measured under (``published linear top-1: imagenet, resnet50``),
with its epochs, protocol and source in the markdown's list of published numbers.

run.json records a run's conditions (``conditions``: dataset, backbone, image size,
pretraining epochs and batch size; `harness.job`).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
import pandas as pd

DEFAULT_TOLERANCE = 1.0  # points of top-1 / mAP / AP, where the source reports no spread
REFERENCE_DATASET = "imagenet"  # where a method's nearest number comes from when none is on our dataset
REFERENCE_BACKBONE = "resnet50"  # the field's common backbone, preferred when ours has no number
CONDITION_KEYS = ("dataset", "backbone", "pretrain_epochs", "batch_size")

_FAMILIES = [  # (metric pattern, family label from the match)
    (r"linear(?:/\w+)?/top([15])", lambda m: f"linear top-{m[1]}"),
    (r"knn/top1@\d+", lambda m: "kNN top-1"),
    (r"semisup/\w+/(\d+)%/top([15])", lambda m: f"semi-supervised {m[1]}% top-{m[2]}"),
    (r"svm/voc07/mAP", lambda m: "VOC07 SVM mAP"),
    (r"detection/voc07/(AP50|AP75|AP)", lambda m: f"VOC07 detection {m[1]}"),
    (r"zeroshot/top1", lambda m: "zero-shot top-1"),
]


def family(metric: str) -> str | None:
    """What a metric measures, whichever protocol's recipe made it: ``linear/goyal19/top1`` and
    ``linear/top1`` are both ``linear top-1``; None for metrics no paper reports (low-shot, retrieval)."""
    for pattern, label in _FAMILIES:
        if m := re.fullmatch(pattern, metric):
            return label(m)
    return None


def backbone_name(spec: Mapping[str, Any]) -> str:
    """The reference CSV's name of an exported encoder (``encoder.json``): a ResNet by its timm
    name (``resnet18``; ``+cifar-stem`` with `small_input`), a ViT as ``vit_<size><patch>``
    (``vit_b16``; a changed depth as ``-d<depth>``)."""
    name = str(spec.get("name", "?"))
    if m := re.fullmatch(r"vit_(tiny|small|base|large|huge)_patch(\d+)_\d+", name):
        out = f"vit_{m[1][0] if m[1] != 'tiny' else 't'}{spec.get('patch_size', m[2])}"
        return out + (f"-d{spec['depth']}" if "depth" in spec else "")
    return name + ("+cifar-stem" if spec.get("small_input") else "")


def _epochs(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return np.nan


def variant_of(row: Mapping[str, Any]) -> str:
    """A reference row's ``variant`` ("" for the method's standard recipe, also when missing or NaN)."""
    value = row.get("variant")
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()


def standard(ref: pd.DataFrame) -> pd.Series:
    """Which rows report the method's standard recipe (no ``variant``; a frame without the column: all)."""
    if "variant" not in ref:
        return pd.Series(True, index=ref.index)
    return ref["variant"].fillna("").astype(str).str.strip() == ""


def matches(ref: pd.DataFrame, method: str, metric: str, protocol: str | None, cond: Mapping[str, Any]) -> pd.DataFrame:
    """The standard-recipe reference rows measured under exactly our conditions (empty when any is
    unknown), those stating our batch size first, then in file order."""
    if not protocol or any(cond.get(k) in (None, "") for k in ("dataset", "backbone", "pretrain_epochs")):
        return ref.iloc[:0]
    same = (
        standard(ref)
        & (ref["method"] == method)
        & (ref["metric"] == metric)
        & (ref["protocol"] == protocol)
        & (ref["dataset"] == str(cond["dataset"]))
        & (ref["backbone"] == str(cond["backbone"]))
        & (ref["pretrain_epochs"].map(_epochs) == _epochs(cond["pretrain_epochs"]))
        & ((ref["batch_size"] == "") | (ref["batch_size"].map(_epochs) == _epochs(cond.get("batch_size"))))
    )
    hits = ref[same]
    return hits.iloc[np.argsort((hits["batch_size"] == "").to_numpy(), kind="stable")]


def nearest(
    ref: pd.DataFrame, method: str, metric: str, protocol: str | None, cond: Mapping[str, Any]
) -> pd.Series | None:
    """The method's published number of the same `family` measured nearest to our conditions:
    on our dataset if it has one (else `REFERENCE_DATASET`), on our backbone if there (else
    `REFERENCE_BACKBONE`, else the one most reported), the method's standard recipe before any
    ``variant``, the pretraining closest to ours (the longest when ours is unknown; unstated epochs
    last), our protocol first, then file order."""
    kind = family(metric)
    pool = ref[(ref["method"] == method) & (ref["metric"].map(family) == kind)] if kind else ref.iloc[:0]
    if pool.empty:
        return None
    datasets = set(pool["dataset"])
    dataset = cond.get("dataset") if cond.get("dataset") in datasets else REFERENCE_DATASET
    pool = pool[pool["dataset"] == dataset]
    if pool.empty:
        return None
    backbones = pool.groupby("backbone", sort=False).size().sort_values(ascending=False, kind="stable")
    for choice in (cond.get("backbone"), REFERENCE_BACKBONE, backbones.index[0]):  # most reported, then file order
        if choice in backbones.index:
            pool = pool[pool["backbone"] == choice]
            break
    ours = _epochs(cond.get("pretrain_epochs"))
    theirs = pool["pretrain_epochs"].map(_epochs)
    distance = (theirs - ours).abs() if not np.isnan(ours) else -theirs
    order = pd.DataFrame(
        {
            "variant": ~standard(pool),
            "unstated": theirs.isna(),
            "distance": distance.fillna(0),
            "other_protocol": pool["protocol"] != protocol,
            "line": range(len(pool)),
        },  # fmt: skip
        index=pool.index,
    ).sort_values(["variant", "unstated", "distance", "other_protocol", "line"])
    return pool.loc[order.index[0]]


def verdict(delta: float, spread: float) -> str:
    """``reproduced`` when ``|delta|`` is within `spread` (`DEFAULT_TOLERANCE` when NaN), else ``below``/``above``."""
    tolerance = DEFAULT_TOLERANCE if pd.isna(spread) else float(spread)
    if abs(delta) <= tolerance:
        return "reproduced"
    return "below" if delta < 0 else "above"


def annotate(
    board: pd.DataFrame, conditions: Mapping[str, Mapping[str, Any]], protocols: Mapping[str, str], ref: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Published numbers for every ``<metric> mean`` of `board` (one row per method).

    Args:
        board: `harness.collate.leaderboard`'s frame.
        conditions: method -> its runs' conditions (run.json ``conditions``; empty when unrecorded).
        protocols: metric -> the protocol that made it.
        ref: checked reference rows (`harness.reference.read`), batch size and epochs as strings.

    Returns:
        The board with ``published <metric>``, ``Δ <metric>`` and ``verdict <metric>`` where a
        reference matched, and ``published <family>: <dataset>, <backbone>`` where only a nearest
        one exists; and a long frame (method, metric, ours, published, Δ, verdict, matched,
        conditions, source) of every published number placed.
    """
    board = board.copy()
    placed = []
    metrics = [c.removesuffix(" mean") for c in board.columns if c.endswith(" mean")]
    for i, row in board.iterrows():
        method = str(row["method"])
        cond = conditions.get(method) or {}
        for metric in metrics:
            ours = row[f"{metric} mean"]
            if pd.isna(ours):
                continue
            protocol = protocols.get(metric)
            hit = matches(ref, method, metric, protocol, cond)
            if not hit.empty:
                top = hit.iloc[0]
                delta = float(ours) - float(top["value"])
                board.loc[i, f"published {metric}"] = top["value"]
                board.loc[i, f"Δ {metric}"] = round(delta, 2)
                board.loc[i, f"verdict {metric}"] = verdict(delta, top["spread"])
                placed.append(_placed(method, metric, ours, top, delta, verdict(delta, top["spread"])))
                continue
            near = nearest(ref, method, metric, protocol, cond)
            if near is None:
                continue
            column = f"published {family(metric)}: {near['dataset']}, {near['backbone']}"
            board.loc[i, column] = near["value"]
            placed.append(_placed(method, metric, ours, near, np.nan, ""))
    columns = ["method", "metric", "ours", "published", "Δ", "verdict", "matched", "conditions", "source"]
    return board, pd.DataFrame(placed, columns=columns)


def _placed(method: str, metric: str, ours: float, row: pd.Series, delta: float, word: str) -> dict:
    epochs = f"{row['pretrain_epochs']} ep" if row["pretrain_epochs"] else "epochs unstated"
    where = f"{row['dataset']}, {row['backbone']}, {epochs}, {row['protocol']} {row['metric']}"
    variant = variant_of(row)
    return {
        "method": method,
        "metric": metric,
        "ours": float(ours),
        "published": float(row["value"]),
        "Δ": delta,
        "verdict": word,
        "matched": bool(word),
        "conditions": where
        + (f", variant: {variant}" if variant else "")
        + (f" ({row['notes']})" if row.get("notes") else ""),
        "source": row["source"],
    }
