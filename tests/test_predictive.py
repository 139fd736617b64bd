"""PIRL and CPC: tiling and patch grids by hand, losses against loop-based versions,
the context network's causality, and resume of PIRL's memory bank."""

import math

import pytest
import torch

from harness import ginutil, job
from methods.base import Batch, DataInfo
from methods.cpc import CPC, info_nce, patch_grid
from methods.pirl import pirl_nce
from methods.tiles import jigsaw_tiles, jitter_crop, shuffle_tiles
from tests.conftest import assert_resumes_exactly, parse_method


def _info(channels: int = 1, num_images: int = 64, num_classes: int = 4) -> DataInfo:
    """The data facts a directly constructed method gets (the job passes `DataInfo.of` its data)."""
    return DataInfo(
        channels=channels,
        num_classes=num_classes,
        num_images=num_images,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
    )


# --- PIRL -------------------------------------------------------------------------


def test_jigsaw_tiles_reassemble_to_the_image_when_unshuffled():
    torch.manual_seed(0)
    x = torch.randn(4, 2, 11, 11)  # 3x3 cells of 3 px around the central 9x9 square (offset 1)
    tiles = jigsaw_tiles(x, 3)
    assert tiles.shape == (4, 9, 2, 3, 3)
    shuffled, perm = shuffle_tiles(tiles)
    assert sorted(perm[0].tolist()) == list(range(9)) and not all((p == torch.arange(9)).all() for p in perm)
    out = torch.empty(4, 2, 9, 9)
    for b in range(4):
        for k in range(9):  # shuffled[b, k] is cell perm[b, k], row-major
            r, c = divmod(int(perm[b, k]), 3)
            out[b, :, 3 * r : 3 * r + 3, 3 * c : 3 * c + 3] = shuffled[b, k]
    assert torch.equal(out, x[:, :, 1:10, 1:10])


def test_jitter_crop_is_a_window_of_its_tile():
    torch.manual_seed(0)
    tiles = torch.randn(2, 9, 1, 5, 5)
    crops = jitter_crop(tiles, 3)
    assert crops.shape == (2, 9, 1, 3, 3)
    for b in range(2):
        for k in range(9):
            windows = [tiles[b, k, :, i : i + 3, j : j + 3] for i in range(3) for j in range(3)]
            assert any(torch.equal(crops[b, k], w) for w in windows)


def _pirl_nce_by_hand(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, tau: float) -> float:
    """PIRL eqs. 2-3 with python floats: h(a, b) = e(a, b) / (e(a, b) + sum_n e(a, n))."""

    def unit(v):
        norm = math.sqrt(sum(c * c for c in v))
        return [c / norm for c in v]

    def e(a, b):
        return math.exp(sum(x * y for x, y in zip(unit(a), unit(b))) / tau)

    total = 0.0
    for qi, pi in zip(q.tolist(), p.tolist()):
        neg = sum(e(qi, nj) for nj in n.tolist())
        loss = -math.log(e(qi, pi) / (e(qi, pi) + neg))
        for nj in n.tolist():
            loss -= math.log(1 - e(qi, nj) / (e(qi, nj) + neg))
        total += loss
    return total / len(q)


def test_pirl_nce_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    q, p, n = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    for tau in (0.07, 0.5, 1.0):
        assert math.isclose(pirl_nce(q, p, n, tau).item(), _pirl_nce_by_hand(q, p, n, tau), rel_tol=1e-5)


def _build_pirl(data, seed=3):
    parse_method("pirl")
    return job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), data, seed)


def test_pirl_bank_resumes_exactly(tmp_path, tiny_data):
    # checkpoint at step 2, step 3 lost
    run = assert_resumes_exactly(lambda: _build_pirl(tiny_data), tiny_data, tmp_path, steps=4, stop_after=3)
    fresh, _ = _build_pirl(tiny_data)
    assert not torch.equal(run.ref.memory.bank, fresh.memory.bank)  # the bank was updated
    assert torch.allclose(run.ref.memory.bank.norm(dim=1), torch.ones(len(tiny_data)), atol=1e-5)
    assert "memory.bank" in run.ref.state_dict()  # so the helper compared it


# --- CPC --------------------------------------------------------------------------


def test_patch_grid_by_hand():
    x = torch.arange(25.0).view(1, 1, 5, 5)  # x[i, j] = 5 i + j; 2x2 patches of 3 px at stride 2
    p = patch_grid(x, grid=2, patch=3)
    assert p.shape == (1, 2, 2, 1, 3, 3)
    assert p[0, 0, 0, 0].tolist() == [[0, 1, 2], [5, 6, 7], [10, 11, 12]]
    assert p[0, 0, 1, 0].tolist() == [[2, 3, 4], [7, 8, 9], [12, 13, 14]]
    assert p[0, 1, 0, 0].tolist() == [[10, 11, 12], [15, 16, 17], [20, 21, 22]]
    assert p[0, 1, 1, 0].tolist() == [[12, 13, 14], [17, 18, 19], [22, 23, 24]]


@pytest.mark.parametrize("size,grid,patch,stride", [(256, 7, 64, 32), (32, 5, 12, 5)])
def test_patch_grid_geometry(size, grid, patch, stride):
    x = torch.randn(2, 3, size, size)
    p = patch_grid(x, grid, patch)
    for i in (0, grid - 1):
        for j in (0, 2):
            assert torch.equal(p[:, i, j], x[:, :, i * stride : i * stride + patch, j * stride : j * stride + patch])


def test_info_nce_matches_loop():
    g = torch.Generator().manual_seed(0)
    pred, cand = torch.randn(4, 3, generator=g), torch.randn(6, 3, generator=g)
    target = torch.tensor([5, 0, 2, 2])
    expected = 0.0
    for q, t in zip(pred.tolist(), target.tolist()):
        scores = [sum(a * b for a, b in zip(q, c)) for c in cand.tolist()]
        expected -= math.log(math.exp(scores[t]) / sum(math.exp(s) for s in scores))
    loss, _ = info_nce(pred, cand, target)
    assert math.isclose(loss.item(), expected / 4, rel_tol=1e-5)


class _Codes(torch.nn.Module):
    num_features = 6


def test_context_sees_only_rows_above_and_its_own():
    torch.manual_seed(0)
    m = CPC(_Codes(), _info(), grid=5, steps=4, directions=1, context_blocks=3, context_hidden=4)
    z = torch.randn(2, 6, 5, 5)
    c = m.context[0](z)
    for i in range(5):
        z2 = z.clone()
        z2[:, :, i + 1 :] = torch.randn_like(z2[:, :, i + 1 :])
        assert torch.allclose(m.context[0](z2)[:, :, : i + 1], c[:, :, : i + 1])
        if i < 4:
            assert not torch.allclose(m.context[0](z2)[:, :, i + 1 :], c[:, :, i + 1 :])


def test_cpc_loss_matches_a_loop_over_positions():
    """Each context vector at (i, j) predicts the code at (i + k, j) of the same image among
    all B*G*G codes, in each rotated direction; the loss is the mean over (direction, k)."""
    torch.manual_seed(0)
    b, g, d = 2, 4, 6
    m = CPC(_Codes(), _info(), grid=g, steps=2, directions=4, context_blocks=1, context_hidden=3)
    z = torch.randn(b, d, g, g)
    m.codes = lambda x: z  # the loss on known codes
    got = m.loss(Batch(views=[torch.zeros(b, 1, 8, 8)], labels=torch.zeros(b), index=torch.arange(b)))["loss"]
    per = []
    for r in range(4):
        zr = torch.rot90(z, r, dims=(2, 3))
        c = m.context[r](zr)
        for k in (1, 2):
            terms = []
            for bb in range(b):
                for i in range(g - k):
                    for j in range(g):
                        pred = m.predict[r][k - 1](c[bb, :, i, j])
                        scores = torch.stack(
                            [pred @ zr[b2, :, i2, j2] for b2 in range(b) for i2 in range(g) for j2 in range(g)]
                        )
                        terms.append(-torch.log_softmax(scores, 0)[bb * g * g + (i + k) * g + j])
            per.append(torch.stack(terms).mean())
    assert torch.allclose(got, torch.stack(per).mean(), rtol=1e-5)


def test_cpc_patch_size_larger_than_the_image_falls_back_to_the_paper_geometry(tiny_data):
    parse_method("cpc", "cpc.CPC.grid = 7", "cpc.CPC.steps = 5")  # paper: 7x7 grid of 64 px, on 32-px images
    m, views = job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), tiny_data, 0)
    assert m.codes(views(tiny_data.images[:2])[0]).shape == (2, m.backbone.num_features, 7, 7)
