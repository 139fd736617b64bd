"""How well a table's ranking of methods predicts the published one.

Spearman's rho and Kendall's tau-b between the methods' means on one of the table's
metrics and their published numbers at a named reference (`REFERENCES`; default
``imagenet-linear``: ImageNet linear top-1, each method's number picked as
`harness.published.nearest` picks one for a ResNet-50 of unknown epochs, among rows on a
ResNet-50 or a ViT-B/16 (the longest pretraining) of the method's standard recipe (no
``variant``: DeepCluster-v2's number does not rank DeepCluster); methods published only on other
networks are named, not ranked). A percentile
bootstrap over methods (resampled with replacement) gives each coefficient's 95 %
interval. `plot` draws ours against published, one labelled point per method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness import published, store

# A reference ranks methods on one kind of network: ImageNet linear top-1 of a ResNet-50, or of a ViT-B/16
# for the methods published only on ViTs (MAE). A method published only on other networks (AlexNet's
# conv layers, a ResNet-101) is left out of the coefficients and named: 20 % on an AlexNet layer and 70 % on
# a ResNet-50 are not one ranking.
REFERENCES: dict[str, dict[str, Any]] = {
    "imagenet-linear": {
        "dataset": "imagenet",
        "backbone": "resnet50",
        "backbones": ("resnet50", "vit_b16"),
        "metric": "linear/top1",
    }
}
BOOTSTRAP = 2000


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties share their mean rank)."""
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def kendall(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b: (concordant - discordant pairs) / sqrt of the pairs untied in x times in y."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    i, j = np.triu_indices(len(x), k=1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    denominator = np.sqrt(np.count_nonzero(sx) * np.count_nonzero(sy))
    return float((sx * sy).sum() / denominator) if denominator > 0 else float("nan")


def bootstrap(x: np.ndarray, y: np.ndarray, statistic, n: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of `statistic` over `n` resamples of the methods
    (resamples whose coefficient is undefined, e.g. all one method, are dropped)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(x), size=(n, len(x)))
    values = np.array([statistic(x[p], y[p]) for p in picks])
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def published_at(
    ref: pd.DataFrame, methods: list[str], reference: str = "imagenet-linear", variants: bool = False
) -> pd.DataFrame:
    """Each method's published number at the named reference: columns method, value, conditions, source.
    Only standard-recipe rows unless `variants` (a method ranks by its own recipe)."""
    if reference not in REFERENCES:
        raise ValueError(f"reference {reference!r} is not one of {', '.join(REFERENCES)}")
    spec = REFERENCES[reference]
    ref = ref[ref["backbone"].isin(spec["backbones"]) & (published.standard(ref) | variants)]
    rows = []
    for method in methods:
        row = published.nearest(ref, method, spec["metric"], None, {k: spec[k] for k in ("dataset", "backbone")})
        if row is not None:
            epochs = f"{row['pretrain_epochs']} ep" if row["pretrain_epochs"] else "epochs unstated"
            where = f"{row['backbone']}, {epochs}, {row['protocol']}"
            rows.append({"method": method, "value": float(row["value"]), "conditions": where, "source": row["source"]})
    return pd.DataFrame(rows, columns=["method", "value", "conditions", "source"])


def agreement(board: pd.DataFrame, ref: pd.DataFrame, metric: str, reference: str = "imagenet-linear") -> dict:
    """Rank agreement between `board`'s ``<metric> mean`` and the published numbers at `reference`.

    Returns:
        ``{"metric", "reference", "n", "spearman", "kendall", "spearman_ci", "kendall_ci", "points"}``;
        ``points`` is a frame (method, ours, published, conditions, source) of the methods with both.
    """
    column = f"{metric} mean"
    ours = board[["method", column]].dropna() if column in board else pd.DataFrame(columns=["method", column])
    theirs = published_at(ref, list(ours["method"]), reference)
    points = ours.rename(columns={column: "ours"}).merge(theirs.rename(columns={"value": "published"}), on="method")
    x, y = points["ours"].to_numpy(float), points["published"].to_numpy(float)
    everywhere = ref.assign(backbone=REFERENCES[reference]["backbone"])
    anywhere = published_at(everywhere, list(ours["method"]), reference)
    elsewhere = sorted(set(anywhere["method"]) - set(points["method"]))  # published, on other networks only
    as_variants = published_at(everywhere, list(ours["method"]), reference, variants=True)
    variants_only = sorted(set(as_variants["method"]) - set(anywhere["method"]))  # e.g. SeLa: only SeLa-v2
    out = {
        "metric": metric,
        "reference": reference,
        "n": len(points),
        "points": points,
        "elsewhere": elsewhere,
        "variants_only": variants_only,
    }
    for name, statistic in (("spearman", spearman), ("kendall", kendall)):
        out[name] = statistic(x, y) if len(points) >= 3 else float("nan")
        out[f"{name}_ci"] = bootstrap(x, y, statistic) if len(points) >= 3 else (float("nan"), float("nan"))
    return out


def describe(result: dict) -> str:
    """One sentence: the coefficients, their intervals and the number of methods."""
    if result["n"] < 3:
        return (
            f"Rank agreement of {result['metric']} with {result['reference']}: {result['n']} method(s) have a "
            "published number there; at least 3 are needed."
        )
    (rlo, rhi), (tlo, thi) = result["spearman_ci"], result["kendall_ci"]
    elsewhere = result.get("elsewhere") or []
    left_out = (
        f" Left out, published only on other networks (e.g. AlexNet layers): {', '.join(elsewhere)}."
        if elsewhere
        else ""
    )
    if variants := result.get("variants_only"):
        left_out += f" Left out, published only for another recipe (a variant, e.g. SeLa-v2): {', '.join(variants)}."
    return (
        f"Rank agreement of {result['metric']} with {result['reference']} (ResNet-50; ViT-B/16 for methods "
        f"published only on ViTs) over {result['n']} methods: Spearman's rho {result['spearman']:.2f} (95 % "
        f"bootstrap interval {rlo:.2f} to {rhi:.2f}), Kendall's tau {result['kendall']:.2f} ({tlo:.2f} to "
        f"{thi:.2f}).{left_out}"
    )


def plot(result: dict, path: Path, table: str) -> None:
    """Saves ours (x) against published (y), one labelled point per method, to ``path`` (PNG)."""
    fig = Figure(figsize=(6.5, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    points = result["points"]
    if points.empty:
        ax.text(0.5, 0.5, f"no method has a published number at {result['reference']}", ha="center", va="center")
        ax.set_axis_off()
    else:
        ax.scatter(points["ours"], points["published"], color="0.2", s=18)
        for _, p in points.iterrows():
            ax.annotate(p["method"], (p["ours"], p["published"]), textcoords="offset points", xytext=(4, 3), fontsize=8)
        ax.set(xlabel=f"ours: {result['metric']} (mean over seeds, %)", ylabel=f"published: {result['reference']} (%)")
        ax.grid(alpha=0.3)
    rho = (
        "" if np.isnan(result["spearman"]) else f", Spearman {result['spearman']:.2f}, Kendall {result['kendall']:.2f}"
    )
    ax.set_title(f"{table}: rank agreement (n = {result['n']}{rho})", fontsize=10)
    with store.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
