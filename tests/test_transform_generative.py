"""AET / AETv2 / AVT, GAN and MAE: warps and transformations by hand, losses against
independent computations (python loops, scipy, torch.distributions), the GAN's gradient
routing between its two players, MAE's masking, unshuffling and visible-only encoder."""

import copy
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from harness import ginutil, job
from methods.aet import (
    aet_mse,
    affine_matrices,
    entries,
    gaussian_nll,
    geodesic_loss,
    homography_from_points,
    matrices,
    polar_rotation,
    projective_matrices,
    warp,
)
from methods.base import Batch, DataInfo
from methods.gan import GAN, Generator, discriminator_loss, generator_loss, upsampling_plan
from methods.mae import MAE, masked_patch_loss, patchify, random_masking, sincos_pos_embed
from tests.conftest import assert_resumes_exactly, parse_method

# The embedded-scale ViT of gin/scale/embedded/mae.gin, at test size.
SMALL_VIT = [
    "vit/backbone.create.name = 'vit_tiny_patch16_224'",
    "vit/backbone.create.patch_size = 4",
    "vit/backbone.create.depth = 2",
    "mae.MAE.decoder_dim = 32",
    "mae.MAE.decoder_depth = 1",
    "mae.MAE.decoder_heads = 2",
]


def _build(name, data, *bindings, seed=0):
    parse_method(name, *bindings)
    return job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), data, seed)


def _batch(views, data, n=16):
    torch.manual_seed(1)
    return Batch(views=views(data.images[:n]), labels=data.labels[:n], index=torch.arange(n))


# --- AET: transformations and warps -------------------------------------------------


def test_identity_map_gives_the_identity_warp():
    x = torch.randn(2, 3, 7, 9)
    assert torch.allclose(warp(x, torch.eye(3).expand(2, 3, 3)), x, atol=1e-6)


def test_a_translation_moves_a_pixel_where_expected():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2, 3] = 1.0  # row 2, column 3
    m = torch.eye(3).unsqueeze(0)
    m[0, 0, 2], m[0, 1, 2] = 2 * 2 / 8, -1 * 2 / 8  # +2 px in x (right), -1 px in y (up); a side is 2 units
    y = warp(x, m)
    assert y[0, 0, 1, 5] == pytest.approx(1.0, abs=1e-6)
    assert y.sum() == pytest.approx(1.0, abs=1e-6)


def test_a_quarter_turn_warp_is_rot90():
    x = torch.randn(1, 2, 6, 6)
    m = torch.tensor([[[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])  # (x, y) -> (y, -x)
    assert torch.allclose(warp(x, m), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5)


def test_affine_ranges():
    torch.manual_seed(0)
    m = affine_matrices(500, rotation=0.0, translation=0.0, scale=(1.0, 1.0), shear=0.0)
    assert torch.allclose(m, torch.eye(3).expand(500, 3, 3))
    m = affine_matrices(500, rotation=0.0, translation=0.2, scale=(1.0, 1.0), shear=0.0)
    assert m[:, :2, 2].abs().max() <= 0.4 and m[:, :2, 2].abs().max() > 0.35  # 0.2 of a 2-unit side
    m = affine_matrices(500, rotation=180.0, translation=0.0, scale=(1.0, 1.0), shear=0.0)
    a = m[:, :2, :2]
    assert torch.allclose(a @ a.transpose(1, 2), torch.eye(2).expand(500, 2, 2), atol=1e-5)
    m = affine_matrices(500, rotation=0.0, translation=0.0, scale=(0.7, 1.3), shear=30.0)
    det = torch.linalg.det(m[:, :2, :2])  # shear keeps areas: det = scale^2
    assert det.min() >= 0.49 - 1e-5 and det.max() <= 1.69 + 1e-5
    assert (m[:, 0, 1] / m[:, 1, 1]).abs().max() <= math.tan(math.radians(30)) + 1e-5


def test_homography_maps_the_four_points():
    g = torch.Generator().manual_seed(0)
    src = torch.tensor([[[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]]).repeat(3, 1, 1)
    dst = src * 0.9 + torch.rand(3, 4, 2, generator=g) * 0.3
    h = homography_from_points(src, dst)
    p = torch.cat([src, torch.ones(3, 4, 1)], 2) @ h.transpose(1, 2)
    assert torch.allclose(p[..., :2] / p[..., 2:], dst, atol=1e-5)
    shifted = homography_from_points(src[:1], src[:1] + torch.tensor([0.1, -0.2]))  # a pure translation
    assert torch.allclose(shifted[0], torch.tensor([[1.0, 0.0, 0.1], [0.0, 1.0, -0.2], [0.0, 0.0, 1.0]]), atol=1e-5)


def test_projective_corners_move_within_the_papers_ranges():
    torch.manual_seed(0)
    m = projective_matrices(400, shift=0.125, scale=(0.8, 1.2))
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]])
    p = corners @ m.transpose(1, 2)
    p = p[..., :2] / p[..., 2:]  # [400, 4, 2]
    assert p.abs().min() >= 0.8 - 0.25 - 1e-4 and p.abs().max() <= 1.2 + 0.25 + 1e-4
    # a 90-degree turn of the corners: each corner lands in some quadrant, all four different
    quadrant = (p[..., 0] > 0).long() * 2 + (p[..., 1] > 0).long()
    assert all(len(set(q.tolist())) == 4 for q in quadrant)
    turns = {tuple(q.tolist()) for q in quadrant}
    assert len(turns) == 4  # all four rotations occur


def test_entries_round_trip():
    torch.manual_seed(0)
    m = projective_matrices(5)
    assert torch.allclose(matrices(entries(m, True)), m / m[:, 2:, 2:], atol=1e-6)
    a = affine_matrices(5)
    assert torch.allclose(matrices(entries(a, False)), a)


# --- AET / AETv2 / AVT losses ---------------------------------------------------------


def test_aet_mse_by_hand():
    pred = torch.tensor([[1.0, 0.0, 0.5], [0.0, 2.0, -1.0]])
    target = torch.tensor([[1.5, 0.0, 0.0], [1.0, 2.0, 1.0]])
    by_hand = (0.25 + 0 + 0.25 + 1 + 0 + 4) / 6
    assert aet_mse(pred, target).item() == pytest.approx(by_hand)


def _geodesic_by_scipy(p: np.ndarray, t: np.ndarray, w: float) -> float:
    """det-1 scaling, polar decomposition and the matrix logarithm from numpy / scipy."""
    total = 0.0
    for a, b in zip(p, t):
        a, b = a / np.cbrt(np.linalg.det(a)), b / np.cbrt(np.linalg.det(b))
        (ra, sa), (rb, sb) = scipy.linalg.polar(a), scipy.linalg.polar(b)  # a = R S
        angle = np.linalg.norm(np.real(scipy.linalg.logm(ra.T @ rb))) / math.sqrt(2)
        total += angle**2 + w * np.sum((sa - sb) ** 2)
    return total / len(p)


def test_geodesic_loss_matches_scipy():
    torch.manual_seed(0)
    t = projective_matrices(6).double()
    p = t + 0.2 * torch.randn(6, 3, 3, dtype=torch.float64)
    p[1] = -p[1]  # a negative scale is the same homography; its det-1 representative has det 1
    for w in (0.0, 0.5):
        want = _geodesic_by_scipy(p.numpy(), t.numpy(), w)
        assert geodesic_loss(p, t, w).item() == pytest.approx(want, rel=1e-6)


def test_geodesic_of_two_plane_rotations_is_the_angle_between_them():
    def rot(deg):
        a = math.radians(deg)
        return torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])

    got = geodesic_loss(rot(30).unsqueeze(0), rot(100).unsqueeze(0))
    assert got.item() == pytest.approx(math.radians(70) ** 2, rel=1e-5)
    assert geodesic_loss(rot(30).unsqueeze(0), rot(30).unsqueeze(0)).item() == pytest.approx(0.0, abs=1e-8)


def test_polar_rotation_against_scipy_and_finite_gradient_at_the_identity():
    torch.manual_seed(0)
    m = torch.eye(3) + 0.3 * torch.randn(4, 3, 3, dtype=torch.float64)
    for a, r in zip(m.numpy(), polar_rotation(m).numpy()):
        assert np.allclose(scipy.linalg.polar(a)[0], r, atol=1e-8)
    pred = torch.eye(3).unsqueeze(0).clone().requires_grad_(True)  # equal singular values: SVD's gradient fails
    geodesic_loss(pred, torch.eye(3).unsqueeze(0) + 0.1).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_gaussian_nll_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    t, mu, lv = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    want = -torch.distributions.Normal(mu, torch.exp(0.5 * lv)).log_prob(t).mean()
    assert torch.allclose(gaussian_nll(t, mu, lv), want, atol=1e-6)


def test_avt_samples_the_transformed_representation(tiny_data):
    method, views = _build("avt", tiny_data)
    method.train()
    batch = _batch(views, tiny_data)
    torch.manual_seed(3)
    a = method.loss(batch)["loss"]
    with torch.no_grad():  # no noise: the variance head switched off
        method.feature_log_var.weight.zero_()
        method.feature_log_var.bias.fill_(-200.0)
    torch.manual_seed(3)
    b = method.loss(batch)["loss"]
    torch.manual_seed(3)
    c = method.loss(batch)["loss"]
    assert not torch.isclose(a, b) and torch.isclose(b, c)


# --- GAN ------------------------------------------------------------------------------


@pytest.mark.parametrize("size,plan", [(32, (4, 3)), (28, (7, 2)), (64, (4, 4)), (224, (7, 5)), (5, (5, 0))])
def test_generator_sizes(size, plan):
    assert upsampling_plan(size) == plan
    g = Generator(z_dim=6, channels=3, size=size, width=4)
    assert g(torch.randn(2, 6)).shape == (2, 3, size, size)


def test_gan_losses_by_hand():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sp = lambda v: math.log(1 + math.exp(v))  # noqa: E731 - -log sigmoid(v) = softplus(-v)
    want_d = (sp(-2.0) + sp(1.0)) / 2 + (sp(0.5) + sp(-3.0)) / 2
    assert discriminator_loss(real, fake).item() == pytest.approx(want_d, rel=1e-6)
    assert generator_loss(fake).item() == pytest.approx((sp(-0.5) + sp(3.0)) / 2, rel=1e-6)


def _players(method: GAN):
    d = [p for n, p in method.named_parameters() if not n.startswith("generator.")]
    g = list(method.generator.parameters())
    return d, g


def test_each_gan_term_reaches_only_its_player(tiny_data):
    method, views = _build("gan", tiny_data)
    method.train()
    for m in method.modules():  # timm zero-initialises residual BN scales, which blocks gradients at init
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
    out = method.loss(_batch(views, tiny_data))
    d, g = _players(method)
    for term, own, other in (("d_loss", d, g), ("g_loss", g, d)):
        grads = torch.autograd.grad(out[term], own + other, retain_graph=True, allow_unused=True)
        own_g, other_g = grads[: len(own)], grads[len(own) :]
        assert all(x is None or not x.abs().sum() > 0 for x in other_g), term
        assert all(x is not None and x.abs().sum() > 0 for x in own_g), term


def test_gan_generator_term_is_a_plain_discriminator_forward_and_bn_sees_real_images_only(tiny_data):
    method, views = _build("gan", tiny_data)
    method.train()
    batch = _batch(views, tiny_data)
    twin = copy.deepcopy(method)
    torch.manual_seed(5)
    out = method.loss(batch)
    torch.manual_seed(5)
    fake = twin.generator(torch.randn(len(batch.views[0]), twin.generator.z_dim))
    d_fake = twin.head(copy.deepcopy(twin.backbone)(fake)).squeeze(1)  # a copy: its BN statistics are thrown away
    assert torch.allclose(out["g_loss"], torch.nn.functional.softplus(-d_fake).mean(), atol=1e-5)
    twin.backbone(batch.views[0])  # the real images only, once
    for (k, a), b in zip(method.backbone.named_buffers(), twin.backbone.buffers()):
        assert torch.equal(a, b), k


def test_each_gan_player_learns_against_a_fixed_opponent(tiny_data):
    """The summed loss of a two-player game need not fall (test_methods excludes gan from that
    check): with the other player frozen, each player's own term falls."""
    for term in ("d_loss", "g_loss"):
        method, views = _build("gan", tiny_data)
        method.train()
        batch = _batch(views, tiny_data)
        d, g = _players(method)
        for p in g if term == "d_loss" else d:
            p.requires_grad_(False)
        opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-3)
        values = []
        for _ in range(8):
            torch.manual_seed(7)  # the same z every step
            out = method.loss(batch)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            values.append(out[term].item())
        assert values[-1] < 0.9 * values[0], (term, values)


def test_gan_resumes_exactly(tmp_path, tiny_data):
    run = assert_resumes_exactly(lambda: _build("gan", tiny_data, seed=3), tiny_data, tmp_path, steps=4, stop_after=3)
    assert any(k.startswith("generator.") for k in run.ref.state_dict())


# --- MAE ------------------------------------------------------------------------------


def test_patchify_by_hand():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    p = patchify(x, 2)
    assert p.tolist() == [[[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]]
    x = torch.arange(8.0).view(1, 2, 2, 2)  # two channels: pixel-major, channel-minor
    assert patchify(x, 2)[0, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.mark.parametrize("n,ratio", [(64, 0.75), (16, 0.75), (10, 0.5), (49, 0.9)])
def test_masking_keeps_exactly_one_minus_ratio_per_image(n, ratio):
    torch.manual_seed(0)
    keep, restore, mask = random_masking(6, n, ratio)
    k = int(n * (1 - ratio))
    assert keep.shape == (6, k) and mask.shape == (6, n)
    assert (mask.sum(1) == n - k).all()
    for b in range(6):
        assert len(set(keep[b].tolist())) == k
        assert all(mask[b, i] == 0 for i in keep[b].tolist())
    assert not torch.equal(keep[0], keep[1])  # a different mask per image


def test_unshuffling_restores_the_order():
    torch.manual_seed(0)
    b, n, ratio = 4, 12, 0.75
    keep, restore, mask = random_masking(b, n, ratio)
    tokens = torch.randn(b, n, 3)
    for i in range(b):  # the shuffled order, rebuilt from `restore` by a python sort
        order = sorted(range(n), key=lambda j: int(restore[i, j]))
        assert order[: keep.shape[1]] == keep[i].tolist()
        assert all(mask[i, j] == 1 for j in order[keep.shape[1] :])
        shuffled = tokens[i, order]
        assert torch.equal(shuffled[restore[i]], tokens[i])


def test_masked_patch_loss_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 6, generator=g) * 3 + 1
    mask = torch.tensor([[1.0, 0, 1, 1, 0], [0, 0, 1, 0, 1]])
    for norm in (True, False):
        errs = []
        for b in range(2):
            for i in range(5):
                if mask[b, i] == 0:
                    continue
                t = target[b, i].tolist()
                if norm:
                    mean = sum(t) / len(t)
                    var = sum((v - mean) ** 2 for v in t) / (len(t) - 1)
                    t = [(v - mean) / math.sqrt(var + 1e-6) for v in t]
                errs.append(sum((p - v) ** 2 for p, v in zip(pred[b, i].tolist(), t)) / len(t))
        got = masked_patch_loss(pred, target, mask, norm_pix=norm).item()
        assert got == pytest.approx(sum(errs) / len(errs), rel=1e-5)


def test_sincos_position_embeddings():
    e = sincos_pos_embed(8, (2, 3))  # [6, 8]: (sin, cos) of the row at 2 frequencies, then of the column
    assert e.shape == (6, 8)
    r, c = 1, 2  # patch 5
    want = [
        math.sin(r),
        math.sin(r / 100),
        math.cos(r),
        math.cos(r / 100),
        math.sin(c),
        math.sin(c / 100),
        math.cos(c),
        math.cos(c / 100),
    ]
    assert e[5].tolist() == pytest.approx(want, abs=1e-6)


def _mae(data):
    method, views = _build("mae", data, *SMALL_VIT)
    return method.eval(), views


def test_mae_builds_a_vit_with_fixed_position_embeddings(tiny_data):
    method, _ = _mae(tiny_data)
    assert type(method.backbone).__name__ == "VisionTransformer" and method.encoder() is method.backbone
    assert method.patch == 4 and method.backbone.patch_embed.grid_size == (8, 8)
    assert not method.backbone.pos_embed.requires_grad
    assert torch.allclose(method.backbone.pos_embed[0, 1:], sincos_pos_embed(192, (8, 8)))


def test_mae_tokens_follow_patchify_order(tiny_data):
    """The encoder's n-th token and the n-th target patch are the same image region."""
    method, _ = _mae(tiny_data)
    pe = method.backbone.patch_embed
    with torch.no_grad():  # channel 0 of each token reads the patch's top-left pixel
        pe.proj.weight.zero_()
        pe.proj.bias.zero_()
        pe.proj.weight[0, 0, 0, 0] = 1.0
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(pe(x)[..., 0], patchify(x, 4)[..., 0])


def test_mae_encoder_sees_only_the_visible_patches(tiny_data):
    method, _ = _mae(tiny_data)
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32)
    keep, restore, mask = random_masking(2, 64, 0.75)
    patches = patchify(x, 4)
    changed = patches + mask.unsqueeze(-1) * torch.randn_like(patches)  # new pixels in masked patches only
    x2 = changed.view(2, 8, 8, 4, 4, 1).permute(0, 5, 1, 3, 2, 4).reshape(2, 1, 32, 32)  # un-patchify
    assert torch.equal(patchify(x2, 4) * (1 - mask.unsqueeze(-1)), patches * (1 - mask.unsqueeze(-1)))
    with torch.no_grad():
        h = method.encode(x, keep)
        assert h.shape == (2, 1 + 16, 192)
        assert torch.allclose(method.encode(x2, keep), h, atol=1e-6)
        x3 = x.clone()
        r, c = divmod(int(keep[0, 0]), 8)
        x3[0, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 1.0  # a visible patch changes the encoding
        assert not torch.allclose(method.encode(x3, keep)[0], h[0])


def test_mae_decoder_puts_tokens_back_in_place(tiny_data):
    method, _ = _mae(tiny_data)
    torch.manual_seed(0)
    h = torch.randn(2, 1 + 16, 192)
    keep, restore, mask = random_masking(2, 64, 0.75)
    seen = {}
    hook = method.decoder_blocks.register_forward_pre_hook(lambda mod, args: seen.setdefault("t", args[0]))
    with torch.no_grad():
        out = method.decode(h, restore)
        embedded = method.decoder_embed(h)
    hook.remove()
    assert out.shape == (2, 64, 16)
    t = seen["t"] - method.decoder_pos  # [2, 65, E] without position embeddings
    for b in range(2):
        assert torch.allclose(t[b, 0], embedded[b, 0])  # the class token first
        for j, i in enumerate(keep[b].tolist()):
            assert torch.allclose(t[b, 1 + i], embedded[b, 1 + j], atol=1e-6)
        for i in torch.nonzero(mask[b]).flatten().tolist():
            assert torch.allclose(t[b, 1 + i], method.mask_token[0, 0], atol=1e-6)


def test_mae_without_a_vit_says_how_to_bind_one():
    from harness import backbone

    with pytest.raises(ValueError, match="vit/backbone.create"):
        MAE(
            backbone.create("test_resnet", in_chans=1),
            DataInfo(channels=1, num_classes=4, num_images=64, mean=(0.5,), std=(0.25,)),
        )


def test_avt_log_variances_are_bounded_so_the_loss_stays_finite(tiny_data):
    """Extreme log-variances (a decoder or feature head gone far) must not overflow exp()."""
    from tests.conftest import parse_method

    parse_method("avt")
    method, views = job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), tiny_data, 0)
    with torch.no_grad():
        last = method.decoder[-1]
        last.bias[len(method.identity) :] = -200.0  # log-variance of t: exp(200) is inf in float32
        method.feature_log_var.bias.fill_(200.0)  # log-variance of the features
    method.train()
    batch = Batch(views(tiny_data.images[:8]), tiny_data.labels[:8], torch.arange(8))
    loss = method.loss(batch)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in method.parameters() if p.grad is not None)
