"""Jigsaw, Relative Location, Colorization and Split-Brain: permutation selection and tile
and patch geometry by hand, Lab against known values, soft-encoding and rebalancing
against direct computations, each loss against an independently computed value, the
colour methods on colour data (and Unsupported on gray), resume of the bin counts."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from harness import backbone, ginutil
from harness.data import ImageSet
from harness.errors import Unsupported
from methods.base import Batch, DataInfo, build_method
from methods.color import ab_bins, colour_input, gray_input, lab_to_rgb, rgb_to_lab, soft_encode
from methods.colorization import Colorization, colorization_loss, rebalance_weights
from methods.jigsaw import Jigsaw, hamming_permutations, normalize_tiles
from methods.relative_location import RelativeLocation, drop_colours, gray_project, patch_pair
from methods.split_brain import SplitBrain, l_bin, split_brain_loss
from tests.conftest import assert_resumes_exactly, make_colour_images, make_images, parse_method


def _info(channels: int = 1, num_images: int = 64, num_classes: int = 4) -> DataInfo:
    """The data facts a directly constructed method gets (the job passes `DataInfo.of` its data)."""
    return DataInfo(
        channels=channels,
        num_classes=num_classes,
        num_images=num_images,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
    )


def _hamming(p, q) -> int:
    return sum(a != b for a, b in zip(p, q))


def _log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


class _Pool(torch.nn.Module):
    """A stand-in backbone: 2x2 average pooling, flattened (``num_features = 4 C``); its
    ``forward_features`` is a learnable 1x1 conv on a 2x2 pooled map."""

    def __init__(self, channels: int):
        super().__init__()
        self.num_features = 4 * channels
        self.conv = torch.nn.Conv2d(channels, self.num_features, 1)

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, 2).flatten(1)

    def forward_features(self, x):
        return self.conv(F.adaptive_avg_pool2d(x, 2))


tinted_images = make_colour_images  # gray blobs tinted per class: real colour


# --- Jigsaw --------------------------------------------------------------------------


@pytest.mark.parametrize("n,num", [(4, 24), (5, 30)])
def test_hamming_permutations_follow_the_greedy_max_min_rule(n, num):
    """Each pick maximises the minimum Hamming distance to the earlier picks, first in
    lexicographic order among ties; checked by brute force over all n! permutations."""
    chosen = [tuple(p) for p in hamming_permutations(num, n, seed=3).tolist()]
    everything = list(itertools.permutations(range(n)))
    assert len(set(chosen)) == num and all(p in everything for p in chosen)
    for i in range(1, num):
        score = {p: min(_hamming(p, q) for q in chosen[:i]) for p in everything if p not in chosen[:i]}
        best = max(score.values())
        assert chosen[i] == next(p for p in everything if score.get(p) == best), i


def test_hamming_permutations_of_nine_tiles_are_deterministic_and_far_apart():
    a, b, c = hamming_permutations(50), hamming_permutations(50), hamming_permutations(50, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert all(sorted(p) == list(range(9)) for p in a.tolist())
    rows = a.tolist()
    pairwise = min(_hamming(p, q) for p, q in itertools.combinations(rows, 2))
    last = min(_hamming(rows[-1], q) for q in rows[:-1])  # greedy max-min: the last pick is the closest
    assert pairwise == last and pairwise >= 6  # random sets of 50 have pairs at distance 2-4
    assert _hamming(rows[0], rows[1]) == 9


def test_normalize_tiles_standardises_each_tile_on_its_own():
    torch.manual_seed(0)
    tiles = torch.randn(2, 9, 3, 4, 4) * torch.rand(2, 9, 1, 1, 1) * 5 + torch.randn(2, 9, 1, 1, 1) * 3
    out = normalize_tiles(tiles)
    vals = tiles[1, 4].flatten().tolist()  # one tile by hand
    mu = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals) + 1e-5)
    assert torch.allclose(out[1, 4].flatten(), torch.tensor([(v - mu) / sd for v in vals]), atol=1e-5)
    assert torch.allclose(out.mean((2, 3, 4)), torch.zeros(2, 9), atol=1e-5)
    # affine changes of one tile (brightness, contrast) leave it unchanged, and no other tile
    moved = tiles.clone()
    moved[0, 2] = moved[0, 2] * 3 + 7
    assert torch.allclose(normalize_tiles(moved), out, atol=1e-4)


def test_puzzle_puts_cell_perm_k_at_position_k_by_hand():
    m = Jigsaw(_Pool(2), _info(2), num_permutations=10, tile_frac=1.0, tile_dim=4, hidden_dim=8)
    torch.manual_seed(0)
    x = torch.randn(3, 2, 11, 11)  # cells of 3 px around the central 9x9 square (offset 1)
    index = torch.tensor([0, 7, 9])
    tiles = m.puzzle(x, index)
    assert tiles.shape == (3, 9, 2, 3, 3)
    for b in range(3):
        for k, cell in enumerate(m.permutations[index[b]].tolist()):
            r, c = divmod(cell, 3)
            patch = x[b, :, 1 + 3 * r : 4 + 3 * r, 1 + 3 * c : 4 + 3 * c]
            assert torch.allclose(tiles[b, k], (patch - patch.mean()) / patch.std(unbiased=False), atol=1e-3)


def test_puzzle_tiles_are_jittered_windows_inside_their_cells():
    m = Jigsaw(_Pool(1), _info(1), num_permutations=5, tile_frac=64 / 75, tile_dim=4, hidden_dim=8)
    x = torch.arange(32 * 32.0).view(1, 1, 32, 32)  # cells of 10 px from pixel 1, tiles of 8
    torch.manual_seed(0)
    tiles = m.puzzle(x, torch.tensor([3]))
    assert tiles.shape == (1, 9, 1, 8, 8)
    for k, cell in enumerate(m.permutations[3].tolist()):
        r, c = divmod(cell, 3)
        windows = [
            x[0, :, 1 + 10 * r + i : 9 + 10 * r + i, 1 + 10 * c + j : 9 + 10 * c + j]
            for i in range(3)
            for j in range(3)
        ]
        assert any(torch.allclose(tiles[0, k], normalize_tiles(w), atol=1e-4) for w in windows), k


def test_jigsaw_loss_matches_an_independent_computation():
    torch.manual_seed(0)
    m = Jigsaw(_Pool(2), _info(2), num_permutations=12, tile_frac=1.0, tile_dim=5, hidden_dim=6).eval()
    x = torch.randn(4, 2, 12, 12)  # cells of 4 px from the corner
    index = torch.tensor([11, 0, 5, 5])
    m.draw = lambda b, device: index
    got = m.loss(Batch(views=[x], labels=torch.zeros(4), index=torch.arange(4)))["loss"]
    expected = 0.0
    for b in range(4):
        feats = []
        for cell in m.permutations[index[b]].tolist():
            r, c = divmod(cell, 3)
            tile = x[b, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4]
            vals = tile.flatten().tolist()
            mu = sum(vals) / len(vals)
            sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals) + 1e-5)
            tile = (tile - mu) / sd
            pooled = [
                tile[ch, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean()
                for ch in range(2)
                for i in range(2)
                for j in range(2)
            ]
            feats.append(m.tile_fc(torch.stack(pooled)[None]))
        logits = m.classifier(torch.cat(feats, 1))[0].tolist()
        expected -= _log_softmax(logits)[int(index[b])]
    assert math.isclose(got.item(), expected / 4, rel_tol=1e-4)


def test_jigsaw_permutations_are_a_buffer_that_a_checkpoint_restores():
    a = Jigsaw(_Pool(1), _info(1), num_permutations=20, permutation_seed=0, tile_dim=4, hidden_dim=8)
    b = Jigsaw(_Pool(1), _info(1), num_permutations=20, permutation_seed=5, tile_dim=4, hidden_dim=8)
    assert "permutations" in a.state_dict() and not torch.equal(a.permutations, b.permutations)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.permutations, b.permutations)


# --- Relative Location ---------------------------------------------------------------

OFFSETS = {0: (-1, -1), 1: (-1, 0), 2: (-1, 1), 3: (0, -1), 4: (0, 1), 5: (1, -1), 6: (1, 0), 7: (1, 1)}


def test_neighbour_labels_map_to_offsets_by_hand():
    x = (100 * torch.arange(30.0)[:, None] + torch.arange(30.0)).view(1, 1, 30, 30).repeat(8, 1, 1, 1)  # 100 row + col
    pair = patch_pair(x, torch.arange(8), patch=10, jitter=0)  # whole 10-px cells
    assert pair.shape == (8, 2, 1, 10, 10)
    for label, (dy, dx) in OFFSETS.items():
        assert pair[label, 0, 0, 0, 0] == 100 * 10 + 10  # the centre cell starts at (10, 10)
        assert pair[label, 1, 0, 0, 0] == 100 * (10 + 10 * dy) + (10 + 10 * dx), label


def test_patches_are_jittered_around_the_centre_of_their_cells():
    x = (100 * torch.arange(32.0)[:, None] + torch.arange(32.0)).view(1, 1, 32, 32).repeat(64, 1, 1, 1)
    m = RelativeLocation(_Pool(1), _info(1), patch_dim=0, hidden_dim=8)
    patch, jitter = m.geometry(32)
    assert (patch, jitter) == (6, 1)  # cells of 10 px: 2/3 of a cell, 7/144 of it rounded up
    assert m.geometry(432) == (96, 7)  # the paper's 96-px patches, 48-px gaps, 7-px jitter
    torch.manual_seed(0)
    labels = torch.randint(0, 8, (64,))
    pair = patch_pair(x, labels, patch, jitter)
    starts = set()
    for b in range(64):
        for which, (dy, dx) in ((0, (0, 0)), (1, OFFSETS[int(labels[b])])):
            top, left = divmod(int(pair[b, which, 0, 0, 0]), 100)
            cy, cx = 1 + 10 * (1 + dy) + 2, 1 + 10 * (1 + dx) + 2  # centred 6-px window of its cell
            assert abs(top - cy) <= 1 and abs(left - cx) <= 1
            starts.add((top - cy, left - cx))
            assert torch.equal(pair[b, which, 0], x[0, 0, top : top + 6, left : left + 6])
    assert len(starts) == 9  # every shift in [-1, 1]^2 occurs


def test_colour_dropping_keeps_one_channel_and_noise_elsewhere():
    torch.manual_seed(0)
    x = torch.randn(200, 3, 8, 8) * 2
    out = drop_colours(x, 0.01)
    kept = [(out[i] == x[i]).flatten(1).all(1) for i in range(200)]
    assert all(int(k.sum()) == 1 for k in kept)
    assert {int(k.nonzero()) for k in kept} == {0, 1, 2}
    for i in range(3):
        k = int(kept[i].nonzero())
        for ch in set(range(3)) - {k}:
            assert 0.3 * 0.02 < out[i, ch].std() < 3 * 0.02  # 1/100 of the kept channel's std (2)
    gray = torch.randn(4, 1, 8, 8)
    assert torch.equal(drop_colours(gray, 0.01), gray) and torch.equal(gray_project(gray), gray)


def test_gray_projection_puts_the_luminance_in_every_channel():
    x = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(gray_project(x), torch.full((1, 3, 2, 2), 0.299))


def test_relative_location_loss_matches_an_independent_computation():
    torch.manual_seed(0)
    m = RelativeLocation(
        _Pool(3), _info(3), patch_frac=1.0, jitter_frac=0.0, aberration="none", patch_dim=5, hidden_dim=6
    ).eval()
    x = torch.randn(8, 3, 12, 12)  # cells of 4 px, patches = whole cells
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    m.draw = lambda b, device: labels
    got = m.loss(Batch(views=[x], labels=torch.zeros(8), index=torch.arange(8)))["loss"]
    expected = 0.0
    for b, label in enumerate(labels.tolist()):
        dy, dx = OFFSETS[label]
        centre = x[b : b + 1, :, 4:8, 4:8]
        other = x[b : b + 1, :, 4 + 4 * dy : 8 + 4 * dy, 4 + 4 * dx : 8 + 4 * dx]
        f = torch.cat([m.patch_fc(F.avg_pool2d(p, 2).flatten(1)) for p in (centre, other)], 1)
        expected -= _log_softmax(m.classifier(f)[0].tolist())[label]
    assert math.isclose(got.item(), expected / 8, rel_tol=1e-4)


def test_relative_location_rejects_an_unknown_counter_measure():
    with pytest.raises(ValueError, match="aberration"):
        RelativeLocation(_Pool(1), _info(1), aberration="blur")


# --- Lab, bins, soft-encoding, rebalancing -------------------------------------------


@pytest.mark.parametrize(
    "rgb,lab",
    [
        ((1, 1, 1), (100, 0, 0)),
        ((0, 0, 0), (0, 0, 0)),
        ((1, 0, 0), (53.24, 80.09, 67.20)),
        ((0, 1, 0), (87.73, -86.18, 83.18)),
        ((0, 0, 1), (32.30, 79.19, -107.86)),
        ((0.5, 0.5, 0.5), (53.39, 0, 0)),
    ],
)
def test_rgb_to_lab_known_values(rgb, lab):
    got = rgb_to_lab(torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1)).flatten().tolist()
    assert all(abs(g - e) < 0.02 for g, e in zip(got, lab)), got


def test_lab_round_trip_and_neutral_inputs():
    torch.manual_seed(0)
    rgb = torch.rand(2, 3, 5, 5)
    lab = rgb_to_lab(rgb)
    assert torch.allclose(lab_to_rgb(lab), rgb, atol=1e-4)
    g = gray_input(lab)  # a gray of the same lightness
    assert torch.allclose(g[:, 0], g[:, 1], atol=1e-5) and torch.allclose(g[:, 1], g[:, 2], atol=1e-5)
    assert torch.allclose(rgb_to_lab(g)[:, 0], lab[:, 0], atol=1e-2)
    c = rgb_to_lab(colour_input(lab))  # in gamut: L = 50 with the same ab
    inside = (colour_input(lab) > 1e-4).all(1) & (colour_input(lab) < 1 - 1e-4).all(1)
    assert inside.any()
    assert torch.allclose(c[:, 0][inside], torch.full_like(c[:, 0][inside], 50.0), atol=1e-2)
    assert torch.allclose(c[:, 1:].permute(0, 2, 3, 1)[inside], lab[:, 1:].permute(0, 2, 3, 1)[inside], atol=1e-2)


def test_ab_bins_cover_the_srgb_gamut_on_the_grid():
    bins = ab_bins(10)
    assert bins.shape == (261, 2)
    assert torch.equal(bins, (bins / 10).round() * 10) and (bins == 0).all(1).any()
    torch.manual_seed(0)
    ab = rgb_to_lab(torch.rand(1, 3, 100, 100))[0, 1:].flatten(1).T  # [10000, 2]
    nearest = torch.cdist(ab, bins).min(1).values
    assert nearest.max() <= 5 * math.sqrt(2) + 1e-3  # every colour lies in some bin's cell


def test_soft_encoding_by_hand():
    bins = ab_bins(10)
    ab = torch.tensor([[3.0, -4.0], [21.0, 38.0], [0.0, 0.0]])
    index, w = soft_encode(ab, bins, k=5, sigma=5.0)
    assert torch.allclose(w.sum(1), torch.ones(3))
    for i, (a, b) in enumerate(ab.tolist()):
        d2 = sorted(((a - p) ** 2 + (b - q) ** 2, j) for j, (p, q) in enumerate(bins.tolist()))[:5]
        assert sorted(j for _, j in d2) == sorted(index[i].tolist())  # the 5 nearest (ties in any order)
        e = {j: math.exp(-d / 50) for d, j in d2}
        assert torch.allclose(w[i], torch.tensor([e[j] / sum(e.values()) for j in index[i].tolist()]), atol=1e-5)
        assert w[i, 0] == w[i].max()  # the largest weight on the nearest bin
    assert w[2, 0] > 0.5  # a value on a bin centre: its bin outweighs the 4 neighbours at distance 10


def test_rebalancing_weights_by_hand():
    bins = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [50.0, 50.0]])
    counts = torch.tensor([90.0, 6.0, 4.0, 0.0])
    w = rebalance_weights(counts, bins, sigma=5.0, lam=0.5)
    p = [c / 100 for c in counts.tolist()]
    k = [[math.exp(-((a - c) ** 2 + (b - d) ** 2) / 50) for (c, d) in bins.tolist()] for (a, b) in bins.tolist()]
    smooth = [sum(k[i][j] * p[j] for j in range(4)) for i in range(4)]
    smooth = [s / sum(smooth) for s in smooth]
    raw = [1 / (0.5 * s + 0.5 / 4) for s in smooth]
    z = sum(s * r for s, r in zip(smooth, raw))
    assert torch.allclose(w, torch.tensor([r / z for r in raw], dtype=w.dtype), rtol=1e-6)
    assert math.isclose(sum(s * v for s, v in zip(smooth, w.tolist())), 1.0, rel_tol=1e-9)  # E_p~[w] = 1
    assert w[3] > w[1] > w[0]  # rarer colours weigh more
    assert torch.allclose(rebalance_weights(counts, bins, lam=1.0), torch.ones(4, dtype=w.dtype))


def test_colorization_loss_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g)
    index = torch.stack([torch.randperm(7, generator=g)[:3] for _ in range(5)])
    soft = torch.softmax(torch.randn(5, 3, generator=g), 1)
    weights = torch.rand(7, generator=g) + 0.5
    expected = 0.0
    for i in range(5):
        logp = _log_softmax(logits[i].tolist())
        expected -= weights[index[i, 0]].item() * sum(s * logp[j] for s, j in zip(soft[i].tolist(), index[i].tolist()))
    assert math.isclose(colorization_loss(logits, index, soft, weights).item(), expected / 5, rel_tol=1e-5)


def test_split_brain_loss_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    ab_logits, l_logits = torch.randn(4, 6, generator=g), torch.randn(3, 5, generator=g)
    index = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(4)])
    soft = torch.softmax(torch.randn(4, 2, generator=g), 1)
    target = torch.tensor([4, 0, 2])
    ab_exp = (
        -sum(
            sum(s * _log_softmax(ab_logits[i].tolist())[j] for s, j in zip(soft[i].tolist(), index[i].tolist()))
            for i in range(4)
        )
        / 4
    )
    l_exp = -sum(_log_softmax(l_logits[i].tolist())[t] for i, t in enumerate(target.tolist())) / 3
    got_ab, got_l = split_brain_loss(ab_logits, index, soft, l_logits, target)
    assert math.isclose(got_ab.item(), ab_exp, rel_tol=1e-5) and math.isclose(got_l.item(), l_exp, rel_tol=1e-5)
    assert l_bin(torch.tensor([0.0, 1.99, 2.0, 55.0, 100.0]), 50).tolist() == [0, 0, 1, 27, 49]


# --- Colour methods on data ------------------------------------------------------------

COLOUR = ["colorization", "split_brain"]


def _colour_method(name: str, data: ImageSet, seed: int = 0):
    parse_method(name)
    torch.manual_seed(seed)
    net = backbone.create(in_chans=data.channels)
    method = build_method(ginutil.reference("job.run.method"), net, DataInfo.of(data))
    return method, ginutil.reference("job.run.views")(mean=data.mean, std=data.std)


@pytest.mark.parametrize("name", COLOUR)
def test_colour_methods_are_unsupported_on_grayscale_data(name):
    with pytest.raises(Unsupported, match=rf"{name} needs colour .3-channel. images; this dataset has 1 channel\b"):
        _colour_method(name, make_images())
    info = DataInfo(channels=3, num_classes=4, num_images=8, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    m = {"colorization": Colorization, "split_brain": SplitBrain}[name](_Pool(3), info)
    assert (m.mean, m.std) == (info.mean, info.std)  # the views' normalisation, to recover RGB


@pytest.mark.parametrize("name", COLOUR)
def test_colour_methods_train_on_colour_data(name):
    """tests/test_methods.py's two checks, on tinted 3-channel images."""
    data = tinted_images()
    method, views = _colour_method(name, data)
    method.train()
    torch.manual_seed(1)
    batch = Batch(views=views(data.images[:32]), labels=data.labels[:32], index=torch.arange(32))
    opt = torch.optim.Adam(method.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = method.loss(batch)["loss"]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(0, 8)
        losses.append(loss.item())
    missing = [n for n, p in method.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert losses[-1] < 0.9 * losses[0], losses


def test_colorization_sees_colour_targets_and_gray_inputs():
    data = tinted_images(16)
    m, views = _colour_method("colorization", data)
    seen = {}
    d = m.backbone.num_features
    m.backbone.forward_features = lambda x: (seen.setdefault("x", x), torch.zeros(len(x), d, 1, 1))[1]
    torch.manual_seed(0)
    m.loss(Batch(views=views(data.images), labels=data.labels, index=torch.arange(16)))
    x = seen["x"]  # normalised per channel: back to RGB, the three channels must be equal (gray)
    rgb = x * torch.tensor(data.std).view(1, 3, 1, 1) + torch.tensor(data.mean).view(1, 3, 1, 1)
    assert torch.allclose(rgb[:, 0], rgb[:, 1], atol=1e-4) and torch.allclose(rgb[:, 1], rgb[:, 2], atol=1e-4)
    assert m._pending.sum() == 16 * 8 * 8  # one nearest bin per target location (1x1 map, 3 upsamplings)
    assert (m._pending > 0).sum() > 3  # the tints spread the targets over several bins


def test_colorization_bin_counts_resume_exactly(tmp_path):
    data = tinted_images()
    # checkpoint at step 2, step 3 lost
    run = assert_resumes_exactly(lambda: _colour_method("colorization", data, 3), data, tmp_path, steps=4, stop_after=3)
    assert run.ref.counts.sum() == 4 * 16 * 8 * 8  # four steps of 16 images, 8x8 targets each
    assert "counts" in run.ref.state_dict()  # so the helper compared the bin counts
