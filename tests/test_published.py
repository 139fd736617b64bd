"""Published numbers beside a leaderboard (issue 15): a run whose conditions match a reference
row gets Δ and a verdict, a mismatched one only the nearest number under a header naming its
conditions; rank agreement (Spearman, Kendall, bootstrap) against scipy; bad references stop
the collation before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats

import gin
from harness import agreement, backbone, collate, ginutil, published, reference
from tests.test_collate import PNG_MAGIC

HEADER = ",".join(reference.COLUMNS)
ROWS = [  # method, dataset, backbone, epochs, batch, protocol, metric, value, spread, source, notes, variant
    'moco,imagenet,resnet50,200,256,linear/mocov2,linear/mocov2/top1,67.5,,"MoCo v2, Table 1",,',
    'moco,imagenet,resnet50,800,256,linear/mocov2,linear/mocov2/top1,71.1,,"MoCo v2, Table 2",,',
    'simclr,imagenet,resnet50,200,,linear/mocov2,linear/mocov2/top1,66.6,0.2,"SimSiam, Table C.1",,',
    'byol,imagenet,resnet50,300,,linear/mocov2,linear/mocov2/top1,72.5,,"SimSiam, Table C.1",,',
    'mae,imagenet,vit_b16,1600,,linear/mae,linear/mae/top1,68.0,,"MAE repo",,',
]
IMAGENET = {"dataset": "imagenet", "backbone": "resnet50", "image_size": 224, "batch_size": 256}


def write_ref(folder: Path, rows: list[str] = ROWS) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / "ref.csv"
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


def write_run(table: Path, run_id: str, method: str, seed: int, value: float, conditions: dict) -> None:
    folder = table / "runs" / run_id
    folder.mkdir(parents=True)
    protocol = {"id": "p1", "params": {}, "metrics": ["linear/mocov2/top1"]}
    record = {
        "run_id": run_id, "pretrain_id": f"p{run_id}", "table": "t", "artefacts": {}, "method": method, "seed": seed, "status": "done",
        "metrics": {"linear/mocov2/top1": value}, "protocols": {"linear/mocov2": protocol},
        "timings": {"pretrain_s": 1.0, "eval_s": 1.0}, "conditions": conditions,
    }  # fmt: skip
    (folder / "run.json").write_text(json.dumps(record))


def test_family_names_what_a_metric_measures_whichever_recipe_made_it():
    assert published.family("linear/top1") == published.family("linear/goyal19/top1") == "linear top-1"
    assert published.family("semisup/mae/10%/top5") == "semi-supervised 10% top-5"
    assert published.family("knn/top1@200") == "kNN top-1" and published.family("retrieval/cosine/mAP") is None
    assert published.backbone_name({"name": "vit_base_patch16_224"}) == "vit_b16"
    assert published.backbone_name({"name": "vit_tiny_patch16_224", "patch_size": 4, "depth": 6}) == "vit_t4-d6"
    assert published.backbone_name({"name": "resnet18", "small_input": True}) == "resnet18+cifar-stem"


def test_matching_conditions_get_delta_and_verdict_and_others_only_the_labelled_nearest(tmp_path):
    table = tmp_path / "t"
    for seed, value in ((0, 67.0), (1, 67.4)):  # mean 67.2: 0.3 under MoCo v2's 67.5 (no spread: ±1)
        write_run(table, f"m{seed}", "moco", seed, value, {**IMAGENET, "pretrain_epochs": 200})
    write_run(table, "s0", "simclr", 0, 66.0, {**IMAGENET, "pretrain_epochs": 200})  # 0.6 under, spread 0.2
    write_run(table, "b0", "byol", 0, 60.0, {**IMAGENET, "pretrain_epochs": 100})  # no 100-epoch BYOL row
    write_run(table, "e0", "exemplar", 0, 50.0, {**IMAGENET, "pretrain_epochs": 100})  # no row at all
    board = collate.collate(table, [write_ref(tmp_path / "ref")]).set_index("method")
    moco, simclr, byol = board.loc["moco"], board.loc["simclr"], board.loc["byol"]
    assert moco["published linear/mocov2/top1"] == 67.5 and moco["verdict linear/mocov2/top1"] == "reproduced"
    assert moco["Δ linear/mocov2/top1"] == pytest.approx(-0.3)
    assert simclr["Δ linear/mocov2/top1"] == pytest.approx(-0.6) and simclr["verdict linear/mocov2/top1"] == "below"
    assert pd.isna(byol["Δ linear/mocov2/top1"]) and pd.isna(byol["published linear/mocov2/top1"])
    assert byol["published linear top-1: imagenet, resnet50"] == 72.5  # nearest, labelled: never a Δ
    assert board.filter(like="published").loc["exemplar"].isna().all()
    md = (table / "leaderboard.md").read_text()
    assert "2 of 3 published numbers below were measured under this table's conditions" in md
    assert "imagenet, resnet50, 300 ep, linear/mocov2 linear/mocov2/top1" in md


def test_a_cifar10_scale_run_is_matched_to_solo_learns_shipped_rows(tmp_path):
    """The conditions a run at gin/scale/cifar10.gin records (its dataset's name, the encoder's
    name from the built backbone, its epochs) meet solo-learn's CIFAR-10 rows in the shipped CSV."""
    ginutil.parse(ginutil.run_files("simclr", "cifar10"), [])
    try:
        cond = {
            "dataset": ginutil.reference("job.run.dataset").name,
            "backbone": published.backbone_name(backbone.create().sslbench_spec),
            "image_size": 32,
            "pretrain_epochs": gin.query_parameter("trainer.Trainer.epochs"),
            "batch_size": 256,
        }
    finally:
        gin.clear_config()
    table = tmp_path / "t"
    write_run(table, "s0", "simclr", 0, 90.0, cond)
    simclr = collate.collate(table).set_index("method").loc["simclr"]
    assert simclr["published linear/mocov2/top1"] == 90.74  # solo-learn README, SimCLR, 1000 epochs
    assert simclr["Δ linear/mocov2/top1"] == pytest.approx(-0.74)
    assert simclr["verdict linear/mocov2/top1"] == "reproduced"


def test_nearest_prefers_our_dataset_then_backbone_then_the_closest_schedule(tmp_path):
    ref = reference.read(write_ref(tmp_path / "ref"))
    near = published.nearest(
        ref, "moco", "linear/top1", "linear/fast", {"dataset": "fashion_mnist", "pretrain_epochs": 20}
    )
    assert near is not None and near["pretrain_epochs"] == "200"  # imagenet (ours has none), closest to 20
    assert published.nearest(ref, "moco", "linear/top1", None, {})["pretrain_epochs"] == "800"  # unknown: longest
    assert published.nearest(ref, "mae", "linear/top1", None, {})["backbone"] == "vit_b16"  # no ResNet-50 row
    assert published.nearest(ref, "moco", "knn/top1@200", None, {}) is None  # no kNN row for MoCo


VARIANTS = [  # before ROWS in the file, so file order alone would pick them
    'moco,imagenet,resnet50,200,256,linear/mocov2,linear/mocov2/top1,69.9,,"SimSiam, Table 4",symmetrized loss,repro+',
    'moco,imagenet,resnet50,200,,linear/mocov2,linear/mocov2/top1,67.0,,"MoCo v2, Sec. 3",no batch stated,',
    'moco,imagenet,resnet50,1000,256,linear/mocov2,linear/mocov2/top1,75.0,,"Later, Table 9",longer,v3',
]


def test_a_variant_never_gets_a_delta_and_a_stated_batch_beats_an_unstated_one(tmp_path):
    """MoCo v2 at 200 epochs, batch 256: SimSiam's improved reproduction (variant repro+) and a row
    that states no batch come first in the file; the Δ is against the standard row with our batch."""
    ref = reference.read(write_ref(tmp_path / "ref", VARIANTS + ROWS))
    cond = {**IMAGENET, "pretrain_epochs": 200}
    hits = published.matches(ref, "moco", "linear/mocov2/top1", "linear/mocov2", cond)
    assert list(hits["value"]) == [67.5, 67.0]  # the variant is not a match; batch 256 stated first
    assert (
        published.matches(ref, "moco", "linear/mocov2/top1", "linear/mocov2", {**cond, "batch_size": 512}).iloc[0][
            "value"
        ]
        == 67.0
    )  # a stated batch that differs is no match
    table = tmp_path / "t"
    write_run(table, "m0", "moco", 0, 69.8, cond)
    moco = collate.collate(table, [tmp_path / "ref" / "ref.csv"]).set_index("method").loc["moco"]
    assert moco["published linear/mocov2/top1"] == 67.5 and moco["verdict linear/mocov2/top1"] == "above"
    # the nearest number prefers the method's standard recipe over a variant at a closer schedule
    near = published.nearest(ref, "moco", "linear/top1", None, {"dataset": "imagenet", "pretrain_epochs": 1000})
    assert near is not None and near["value"] == 71.1 and near["variant"] == ""
    # ... and rank agreement never ranks a method by a variant: MoCo's longest standard row is 800 epochs
    points = agreement.published_at(ref, ["moco"])
    assert list(points["value"]) == [71.1]


def test_rank_agreement_names_the_methods_published_only_as_a_variant(tmp_path):
    sela_v2 = 'sela,imagenet,resnet50,400,4096,linear/mocov2,linear/mocov2/top1,71.8,,"SwAV repo",multi-crop,v2'
    ref = reference.read(write_ref(tmp_path / "ref", [*ROWS, sela_v2]))
    board = pd.DataFrame({"method": ["moco", "simclr", "byol", "sela"], "linear/top1 mean": [70.0, 60.0, 80.0, 99.0]})
    result = agreement.agreement(board, ref, "linear/top1")
    assert result["n"] == 3 and result["variants_only"] == ["sela"] and result["spearman"] == pytest.approx(1.0)
    assert "published only for another recipe (a variant, e.g. SeLa-v2): sela." in agreement.describe(result)
    table = tmp_path / "t"  # a leaderboard may show a variant as the nearest number, and says which it is
    write_run(table, "s0", "sela", 0, 70.0, {**IMAGENET, "pretrain_epochs": 400})
    board = collate.collate(table, [tmp_path / "ref" / "ref.csv"]).set_index("method")
    assert board.loc["sela", "published linear top-1: imagenet, resnet50"] == 71.8
    assert pd.isna(board.loc["sela"].get("Δ linear/mocov2/top1", np.nan))
    assert (
        "400 ep, linear/mocov2 linear/mocov2/top1, variant: v2 (multi-crop)" in (table / "leaderboard.md").read_text()
    )


def test_a_reference_file_without_the_variant_column_still_reads(tmp_path):
    """A user's file in the schema before `variant` existed: every row is a standard-recipe number."""
    path = tmp_path / "old.csv"
    path.write_text("\n".join([",".join(reference.LEGACY_COLUMNS), *(r.removesuffix(",") for r in ROWS)]) + "\n")
    ref = reference.read(path)
    assert list(ref.columns) == reference.COLUMNS and (ref["variant"] == "").all() and len(ref) == len(ROWS)
    cond = {**IMAGENET, "pretrain_epochs": 800}
    assert published.matches(ref, "moco", "linear/mocov2/top1", "linear/mocov2", cond)["value"].tolist() == [71.1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_coefficients_agree_with_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=12).round(1)
    y = (x + rng.normal(size=12)).round(0)  # ties in y
    assert agreement.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic)
    assert agreement.kendall(x, y) == pytest.approx(scipy.stats.kendalltau(x, y).statistic)  # tau-b


def test_rank_agreement_reports_n_coefficients_and_intervals_and_draws_them(tmp_path):
    board = pd.DataFrame({"method": ["moco", "simclr", "byol", "mae"], "linear/top1 mean": [70.0, 60.0, 80.0, 65.0]})
    ref = reference.read(write_ref(tmp_path / "ref"))
    result = agreement.agreement(board, ref, "linear/top1")
    # published at imagenet-linear: byol 72.5, moco 71.1 (800 ep), mae 68.0 (ViT-B), simclr 66.6: the same order
    assert result["n"] == 4 and result["spearman"] == pytest.approx(1.0) and result["kendall"] == pytest.approx(1.0)
    assert result["spearman_ci"] == (1.0, 1.0)
    assert list(result["points"].sort_values("published")["method"]) == ["simclr", "mae", "moco", "byol"]
    lo, hi = agreement.bootstrap(np.arange(8.0), np.array([1, 0, 3, 2, 5, 4, 7, 6.0]), agreement.spearman)
    assert lo < agreement.spearman(np.arange(8.0), np.array([1, 0, 3, 2, 5, 4, 7, 6.0])) <= hi <= 1.0
    agreement.plot(result, tmp_path / "rank.png", "t")
    assert (tmp_path / "rank.png").read_bytes()[:8] == PNG_MAGIC
    assert "over 4 methods: Spearman's rho 1.00" in agreement.describe(result)


def test_rank_agreement_ranks_one_kind_of_network_and_names_the_methods_left_out(tmp_path):
    ref = reference.read(write_ref(tmp_path / "ref"))
    alexnet = ref.iloc[[0]].assign(method="rotnet", backbone="alexnet", value=40.0, pretrain_epochs="")
    board = pd.DataFrame(
        {"method": ["moco", "simclr", "byol", "mae", "rotnet"], "linear/top1 mean": [70.0, 60.0, 80.0, 65.0, 99.0]}
    )
    result = agreement.agreement(board, pd.concat([ref, alexnet], ignore_index=True), "linear/top1")
    assert result["n"] == 4 and "rotnet" not in set(result["points"]["method"]) and result["elsewhere"] == ["rotnet"]
    assert result["spearman"] == pytest.approx(1.0)  # rotnet's 99 against an AlexNet 40 would have broken it
    assert "Left out, published only on other networks (e.g. AlexNet layers): rotnet." in agreement.describe(result)


def test_a_malformed_reference_stops_the_collation_naming_file_and_line(tmp_path, capsys):
    table = tmp_path / "t"
    write_run(table, "m0", "moco", 0, 67.0, {**IMAGENET, "pretrain_epochs": 200})
    bad = write_ref(tmp_path / "ref", [ROWS[0], ROWS[1].replace("moco,", "mocov9,", 1)])
    with pytest.raises(reference.ReferenceError, match=rf"{bad}:3: method 'mocov9'"):
        collate.collate(table, [bad])
    assert collate.main([str(table), "--reference", str(bad)]) == 2
    assert f"{bad}:3" in capsys.readouterr().err
    assert not (table / "leaderboard.csv").exists() and not (table / "leaderboard.md").exists()
