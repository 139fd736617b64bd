"""Reconstruction and generative-latent methods (autoencoder, denoising_autoencoder,
context_encoder, vae, vqvae): the decoder's geometry, corruptions and masks by hand,
losses against independent computations, gradient routing (straight-through, the
context encoder's adversarial terms), the EMA codebook by hand and its exact resume."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import backbone as backbone_lib
from harness import ginutil, job
from methods.autoencoder import AutoEncoder, corrupt, random_pixels
from methods.base import Batch, DataInfo
from methods.context_encoder import ContextEncoder, block_mask, center_mask, inpainting_loss, region_mask, ring
from methods.decoder import Decoder, feature_map_shape
from methods.vae import VAE, bernoulli_nll, gaussian_kl, gaussian_nll
from methods.vqvae import VQVAE, ema_update, nearest_code, straight_through, vq_terms
from tests.conftest import assert_resumes_exactly, parse_method


def _info(channels: int = 1, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> DataInfo:
    """The data facts a directly constructed method gets (the job passes `DataInfo.of` its data)."""
    return DataInfo(
        channels=channels, num_classes=4, num_images=64, mean=mean or (0.5,) * channels, std=std or (0.25,) * channels
    )


class _Stub(nn.Module):
    """A backbone whose spatial map is a 1x1 convolution of the input; remembers its input."""

    def __init__(self, c: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.num_features = c
        self.seen = None

    def forward_features(self, x):
        self.seen = x
        return self.conv(x)

    def forward(self, x):
        return self.forward_features(x).mean((2, 3))


def _batch(x: torch.Tensor) -> Batch:
    return Batch(views=[x], labels=torch.zeros(len(x), dtype=torch.long), index=torch.arange(len(x)))


# --- decoder ---------------------------------------------------------------------


@pytest.mark.parametrize("small_input,side,stages", [(False, 1, 5), (True, 4, 3)])
def test_decoder_output_shape_at_the_embedded_geometry(small_input, side, stages):
    """resnet18 at 32 px: a 512 x 1 x 1 map with the normal stem, 512 x 4 x 4 with the CIFAR stem."""
    net = backbone_lib.create(name="resnet18", in_chans=1, small_input=small_input)
    net.train()
    assert feature_map_shape(net, 1, 32) == (512, side)
    assert net.training  # mode restored
    dec = Decoder(512, 1, side, 32)
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in dec.modules()) == stages
    x = torch.randn(2, 1, 32, 32)
    assert dec(net.forward_features(x)).shape == (2, 1, 32, 32)


def test_decoder_resizes_to_sides_that_are_not_a_power_of_two_times_the_map():
    assert Decoder(8, 3, 1, 28)(torch.randn(2, 8, 1, 1)).shape == (2, 3, 28, 28)
    assert Decoder(8, 3, 7, 224, width=16, min_width=4)(torch.randn(1, 8, 7, 7)).shape == (1, 3, 224, 224)


def test_feature_map_shape_rejects_token_backbones():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(1))

        def forward_features(self, x):
            return torch.zeros(len(x), 5, 8)

    with pytest.raises(ValueError, match="convolutional backbone"):
        feature_map_shape(Tokens(), 3, 32)


# --- corruptions -----------------------------------------------------------------


def test_random_pixels_picks_exactly_the_fraction():
    torch.manual_seed(0)
    m = random_pixels(5, 8, 8, 0.25)
    assert m.shape == (5, 1, 8, 8) and m.dtype == torch.bool
    assert m.flatten(1).sum(1).tolist() == [16] * 5
    assert not all(torch.equal(m[0], m[i]) for i in range(1, 5))


def test_masking_zeroes_the_stated_fraction_and_nothing_else():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 10, 10) + 1  # no zeros
    y = corrupt(x, "masking", 0.3, None, None)
    zero = (y == 0).all(1)  # [B, H, W]
    assert zero.flatten(1).sum(1).tolist() == [30] * 4
    assert not (y == 0).any(1)[~zero].any()  # a hit pixel loses all its channels
    assert torch.equal(y.permute(0, 2, 3, 1)[~zero], x.permute(0, 2, 3, 1)[~zero])


def test_salt_and_pepper_sets_the_stated_fraction_to_black_or_white():
    torch.manual_seed(0)
    mean, std = torch.tensor([0.2, 0.5, 0.7]), torch.tensor([0.3, 0.2, 0.1])
    black, white = -mean / std, (1 - mean) / std
    x = torch.randn(6, 3, 16, 16) * 0.01  # no pixel is black or white
    y = corrupt(x, "salt_and_pepper", 0.2, black, white)
    px = y.permute(0, 2, 3, 1)  # [B, H, W, C]
    is_black, is_white = (px == black).all(-1), (px == white).all(-1)
    hit = is_black | is_white
    assert hit.flatten(1).sum(1).tolist() == [round(0.2 * 256)] * 6
    assert 0.35 < is_white.sum().item() / hit.sum().item() < 0.65  # a fair coin
    assert torch.equal(px[~hit], x.permute(0, 2, 3, 1)[~hit])


def test_gaussian_noise_has_the_stated_std_everywhere():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 32, 32)
    d = corrupt(x, "gaussian", 0.4, None, None) - x
    assert (d != 0).all()
    assert abs(d.std().item() - 0.4) < 0.01 and abs(d.mean().item()) < 0.01


def test_salt_and_pepper_takes_black_and_white_from_the_datas_normalisation():
    m = AutoEncoder(_Stub(), _info(mean=(0.3,), std=(0.2,)), image_size=8, noise="salt_and_pepper")
    assert torch.allclose(m.black, torch.tensor([-1.5])) and torch.allclose(m.white, torch.tensor([3.5]))
    with pytest.raises(ValueError, match="noise"):
        AutoEncoder(_Stub(), _info(), image_size=8, noise="blur")


@pytest.mark.parametrize("noise", [None, "masking"])
def test_autoencoder_reconstructs_the_clean_view_from_the_corrupted_one(noise):
    torch.manual_seed(0)
    m = AutoEncoder(_Stub(), _info(), image_size=6, decoder=lambda **_: nn.Identity(), noise=noise, noise_level=0.5)
    m.backbone.conv.weight.data.fill_(1.0)
    m.backbone.conv.bias.data.zero_()
    x = torch.rand(3, 1, 6, 6) + 1
    loss = m.loss(_batch(x))["loss"].item()
    seen = m.backbone.seen
    expected, hits = 0.0, []
    for b in range(3):
        hits.append(sum(1 for i in range(6) for j in range(6) if seen[b, 0, i, j] == 0))
        for i in range(6):
            for j in range(6):
                expected += (seen[b, 0, i, j].item() - x[b, 0, i, j].item()) ** 2
    assert hits == ([18] * 3 if noise else [0] * 3)
    assert math.isclose(loss, expected / x.numel(), rel_tol=1e-5, abs_tol=1e-9)
    if noise is None:
        assert loss < 1e-10


# --- context encoder -------------------------------------------------------------


def test_center_mask_is_the_central_square():
    m = center_mask(2, 8, 0.25)  # side 4 of 8: rows and columns 2..5
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 2:6] = True
    assert torch.equal(m[0, 0], expected) and torch.equal(m[1, 0], expected)
    m = center_mask(1, 32, 0.25)
    assert m.sum() == 256 and m[0, 0, 8:24, 8:24].all()


def test_block_masks_are_random_squares_covering_at_most_the_area():
    torch.manual_seed(0)
    one = block_mask(20, 16, 0.25, blocks=1)  # one square of side 8
    for m in one[:, 0]:
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        assert m.sum() == 64 and len(rows) == len(cols) == 8 and m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
    assert len({tuple(m.flatten().nonzero().flatten()[:1].tolist()) for m in one}) > 1
    four = block_mask(50, 16, 0.25, blocks=4)  # four squares of side 4
    cover = four.flatten(1).sum(1)
    assert (cover >= 16).all() and (cover <= 64).all() and (cover < 64).any() and (cover == 64).any()


def test_region_masks_remove_exactly_the_area():
    torch.manual_seed(0)
    m = region_mask(4, 16, 0.25)
    assert m.flatten(1).sum(1).tolist() == [64] * 4 and not torch.equal(m[0], m[1])


def test_ring_is_the_border_around_the_mask():
    m = center_mask(1, 10, 0.16)  # side 4: rows 3..6
    r = ring(m, 1)
    expected = torch.zeros(10, 10, dtype=torch.bool)
    expected[2:8, 2:8] = True
    expected[3:7, 3:7] = False
    assert torch.equal(r[0, 0], expected)
    assert not ring(m, 0).any()


def test_inpainting_loss_weights_inside_border_and_outside():
    m, r = center_mask(1, 10, 0.16), ring(center_mask(1, 10, 0.16), 1)  # 16 inside, 20 on the border, 64 out
    x = torch.zeros(1, 2, 10, 10)
    recon = torch.where(m, 1.0, torch.where(r, 2.0, 3.0)).expand(1, 2, 10, 10)  # squared errors 1, 4, 9
    for wb, wo in [(10.0, 0.0), (1.0, 1.0), (10.0, 0.1)]:
        expected = (16 * 1 + wb * 20 * 4 + wo * 64 * 9) / (16 + wb * 20 + wo * 64)
        got = inpainting_loss(recon, x, m, r, wb, wo).item()
        assert math.isclose(got, expected, rel_tol=1e-6)
    base = inpainting_loss(recon, x, m, r, 10.0, 0.0)
    outside = recon.clone()
    outside[..., 0, 0] = 100.0
    assert inpainting_loss(outside, x, m, r, 10.0, 0.0) == base  # the paper's loss ignores the context


def test_context_encoder_fills_the_hole_with_the_mean():
    m = ContextEncoder(_Stub(), _info(), image_size=8, decoder=lambda **_: nn.Identity(), overlap=0.0)
    x = torch.rand(2, 1, 8, 8) + 1
    m.loss(_batch(x))
    hole = center_mask(2, 8, 0.25)
    assert (m.backbone.seen[hole.expand_as(x)] == 0).all()
    assert torch.equal(m.backbone.seen[~hole.expand_as(x)], x[~hole.expand_as(x)])


def _adversarial(lam=0.001):
    torch.manual_seed(0)
    m = ContextEncoder(
        _Stub(2),
        _info(2),
        image_size=8,
        decoder=lambda **_: nn.Conv2d(2, 2, 3, padding=1),
        adversarial=lam,
        disc_width=4,
    )
    return m, _batch(torch.randn(4, 2, 8, 8))


def _grads(m, loss):
    m.zero_grad(set_to_none=True)
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in m.named_parameters()}


def test_adversarial_terms_move_only_their_own_player():
    m, batch = _adversarial()
    gen = [n for n, _ in m.named_parameters() if not n.startswith("discriminator.")]
    disc = [n for n, _ in m.named_parameters() if n.startswith("discriminator.")]
    g = _grads(m, m.loss(batch)["adv_g"])
    assert all(g[n].abs().sum() == 0 for n in disc) and all(g[n].abs().sum() > 0 for n in gen)
    g = _grads(m, m.loss(batch)["adv_d"])
    assert all(g[n].abs().sum() == 0 for n in gen) and all(g[n].abs().sum() > 0 for n in disc)


def test_adversarial_loss_gives_each_player_its_own_gans_gradient():
    """The one scalar's gradients equal two separate GAN updates: the discriminator's on
    BCE(D(real), 1) + BCE(D(fake), 0) with the fake fixed, the generator's on
    0.999 L_rec + 0.001 BCE(D(fake), 1) with D fixed."""
    lam = 0.001
    m, batch = _adversarial(lam)
    both = _grads(m, m.loss(batch)["loss"])
    x = batch.views[0]
    hole = center_mask(4, 8, 0.25)
    d = m.discriminator
    # the discriminator's update, written the usual two-optimizer way
    fake = m.decoder(m.backbone.forward_features(x.masked_fill(hole, 0))) * hole
    ones, zeros = torch.ones(4), torch.zeros(4)
    d_loss = F.binary_cross_entropy_with_logits(d(x * hole), ones) + F.binary_cross_entropy_with_logits(
        d(fake.detach()), zeros
    )
    d_grads = torch.autograd.grad(d_loss, list(d.parameters()))
    for (n, _), gd in zip(d.named_parameters(), d_grads):
        assert torch.allclose(both["discriminator." + n], gd, rtol=1e-5, atol=1e-7), n
    # the generator's update, with the discriminator's parameters frozen
    for p in d.parameters():
        p.requires_grad_(False)
    recon = m.decoder(m.backbone.forward_features(x.masked_fill(hole, 0)))
    sq = (recon - x) ** 2 * hole + 10 * (recon - x) ** 2 * ring(hole, round(8 * 4 / 128))
    w = hole.float() + 10 * ring(hole, round(8 * 4 / 128)).float()
    g_loss = (1 - lam) * sq.sum() / (w.sum() * 2) + lam * F.binary_cross_entropy_with_logits(d(recon * hole), ones)
    gen = [(n, p) for n, p in m.named_parameters() if not n.startswith("discriminator.")]
    g_grads = torch.autograd.grad(g_loss, [p for _, p in gen])
    for (n, _), gg in zip(gen, g_grads):
        assert torch.allclose(both[n], gg, rtol=1e-5, atol=1e-8), n


# --- VAE ---------------------------------------------------------------------------


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    assert torch.allclose(gaussian_kl(mu, logvar), torch.distributions.kl_divergence(q, p).sum(1), rtol=1e-5)


def test_likelihoods_match_torch_distributions_and_hand_computation():
    g = torch.Generator().manual_seed(0)
    recon, x = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    for sigma in (1.0, 0.3):
        expected = -torch.distributions.Normal(recon, sigma).log_prob(x).flatten(1).sum(1)
        assert torch.allclose(gaussian_nll(recon, x, math.log(sigma)), expected, rtol=1e-5)
        assert torch.allclose(gaussian_nll(recon, x, torch.tensor(math.log(sigma))), expected, rtol=1e-5)
    x01 = torch.rand(2, 1, 3, 3, generator=g)
    logits = torch.randn(2, 1, 3, 3, generator=g)
    for b in range(2):
        by_hand = 0.0
        for t, s in zip(x01[b].flatten().tolist(), logits[b].flatten().tolist()):
            p = 1 / (1 + math.exp(-s))
            by_hand -= t * math.log(p) + (1 - t) * math.log(1 - p)
        assert math.isclose(bernoulli_nll(logits, x01)[b].item(), by_hand, rel_tol=1e-5)


@pytest.mark.parametrize("likelihood,sigma", [("gaussian", 0.5), ("gaussian", None), ("bernoulli", None)])
def test_vae_loss_is_the_negative_elbo(likelihood, sigma):
    torch.manual_seed(0)
    mean, std = (0.3,), (0.2,)
    m = VAE(
        _Stub(),
        _info(mean=mean, std=std),
        image_size=4,
        decoder=lambda **_: nn.Upsample(size=4),
        latent_dim=1,
        likelihood=likelihood,
        sigma=sigma,
        beta=2.0,
    )
    x = torch.randn(6, 1, 4, 4)
    torch.manual_seed(1)
    out = m.loss(_batch(x))
    torch.manual_seed(1)
    eps = torch.randn(6, 1)
    mu, logvar = m.posterior(m.backbone.conv(x).mean((2, 3))).chunk(2, 1)  # the stub's pooled features
    z = mu + (0.5 * logvar).exp() * eps
    dec = z.view(6, 1, 1, 1).expand(6, 1, 4, 4)
    if likelihood == "gaussian":  # sigma = None: the maximum-likelihood sigma, by a grid search
        s = sigma or min(
            (0.01 * k for k in range(1, 500)),
            key=lambda v: -torch.distributions.Normal(dec, v).log_prob(x).sum().item(),
        )
        nll = -torch.distributions.Normal(dec, s).log_prob(x).flatten(1).sum(1)
    else:
        target = (x * 0.2 + 0.3).clamp(0, 1)
        nll = F.binary_cross_entropy_with_logits(dec, target, reduction="none").flatten(1).sum(1)
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    ).sum(1)
    tol = 1e-4 if likelihood == "gaussian" and sigma is None else 1e-5  # the grid's resolution
    assert torch.allclose(out["loss"], (nll + 2.0 * kl).mean(), rtol=tol)


def test_vae_bernoulli_maps_the_views_back_with_the_datas_normalisation():
    m = VAE(_Stub(), _info(mean=(0.3,), std=(0.2,)), image_size=4, likelihood="bernoulli")
    assert m.pixel_mean.flatten().tolist() == [torch.tensor(0.3).item()]
    assert m.pixel_std.flatten().tolist() == [torch.tensor(0.2).item()]


# --- VQ-VAE ------------------------------------------------------------------------


def test_nearest_code_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    z, codes = torch.randn(20, 3, generator=g), torch.randn(7, 3, generator=g)
    expected = [
        min(range(7), key=lambda k: sum((a - b) ** 2 for a, b in zip(v, codes[k].tolist()))) for v in z.tolist()
    ]
    assert nearest_code(z, codes).tolist() == expected


def test_vq_terms_by_hand_and_where_their_gradients_go():
    z_e = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    z_q = torch.tensor([[1.5, 2.0], [1.0, 1.0]], requires_grad=True)
    codebook, commit = vq_terms(z_e, z_q)
    expected = (0.25 + 0 + 1 + 4) / 4
    assert math.isclose(codebook.item(), expected) and math.isclose(commit.item(), expected)
    codebook.backward()
    assert z_e.grad is None and torch.allclose(z_q.grad, 2 * (z_q - z_e).detach() / 4)
    z_q.grad = None
    commit.backward()
    assert z_q.grad is None and torch.allclose(z_e.grad, 2 * (z_e - z_q).detach() / 4)


def test_straight_through_gives_the_encoder_the_decoders_gradient_exactly():
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 1, 1))
    z_e = torch.randn(2, 3, 4, 4, requires_grad=True)
    z_q = torch.randn(2, 3, 4, 4)
    st = straight_through(z_e, z_q)
    assert torch.allclose(st, z_q)
    at_decoder = []
    st.register_hook(at_decoder.append)
    dec(st).square().sum().backward()
    assert torch.equal(z_e.grad, at_decoder[0])
    zq = z_q.clone().requires_grad_()
    dec(zq).square().sum().backward()
    assert torch.allclose(z_e.grad, zq.grad, rtol=1e-5, atol=1e-6)  # the decoder's gradient at z_q


def test_ema_update_by_hand_on_two_codes():
    codebook = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    count, total = torch.ones(2), codebook.clone()
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]])  # -> codes 0, 0, 1
    idx = nearest_code(z, codebook)
    assert idx.tolist() == [0, 0, 1]
    n = torch.tensor([2.0, 1.0])
    s = torch.tensor([[1.0, 1.0], [9.0, 9.0]])
    g, eps = 0.9, 1e-2
    ema_update(codebook, count, total, n, s, g, eps)
    N = [0.9 * 1 + 0.1 * 2, 0.9 * 1 + 0.1 * 1]  # 1.1, 1.0
    m = [[0.1, 0.1], [0.9 * 10 + 0.1 * 9] * 2]  # [0.1, 0.1], [9.9, 9.9]
    smooth = [(c + eps) / (sum(N) + 2 * eps) * sum(N) for c in N]
    assert torch.allclose(count, torch.tensor(N)) and torch.allclose(total, torch.tensor(m))
    assert torch.allclose(codebook, torch.tensor([[v / smooth[k] for v in m[k]] for k in range(2)]), rtol=1e-6)


def _vq_stub(ema: bool) -> VQVAE:
    torch.manual_seed(0)
    m = VQVAE(
        _Stub(2),
        _info(2),
        image_size=1,
        decoder=lambda **_: nn.Conv2d(2, 2, 1),
        num_codes=2,
        code_dim=2,
        ema=ema,
        decay=0.9,
        eps=1e-2,
    )
    with torch.no_grad():
        m.backbone.conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        m.backbone.conv.bias.zero_()
        m.project.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        m.project.bias.zero_()
        m.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
        if ema:
            m.ema_sum.copy_(m.codebook)
    return m


def test_vqvae_quantises_to_the_nearest_code_and_adds_the_right_terms():
    for ema in (False, True):
        m = _vq_stub(ema)
        x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]).view(3, 2, 1, 1)
        z_q, idx = m.quantize(x)
        assert idx.flatten().tolist() == [0, 0, 1] and torch.equal(z_q.flatten(1), m.codebook[[0, 0, 1]])
        out = m.loss(_batch(x))
        recon = m.decoder(z_q)
        dist = ((x - z_q) ** 2).mean()  # codebook and commitment terms have the same value
        expected = F.mse_loss(recon, x) + 0.25 * dist + (0 if ema else dist)
        assert torch.allclose(out["loss"], expected, rtol=1e-6)
        assert ("codebook" in dict(m.named_parameters())) != ema


def test_vqvae_ema_codebook_moves_only_after_the_step():
    m = _vq_stub(ema=True)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]).view(3, 2, 1, 1)
    m.train()
    m.loss(_batch(x))
    assert torch.equal(m.codebook, torch.tensor([[0.0, 0.0], [10.0, 10.0]]))  # the loss changes nothing
    m.after_step(0, 1)
    expected, count = torch.tensor([[0.0, 0.0], [10.0, 10.0]]), torch.ones(2)
    total = expected.clone()
    ema_update(expected, count, total, torch.tensor([2.0, 1.0]), torch.tensor([[1.0, 1.0], [9.0, 9.0]]), 0.9, 1e-2)
    assert torch.allclose(m.codebook, expected) and torch.allclose(m.ema_count, count)
    before = m.codebook.clone()
    m.after_step(1, 2)  # no new statistics: nothing happens
    assert torch.equal(m.codebook, before)


def _build(name, data, *bindings, seed=3):
    parse_method(name, *bindings)
    return job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), data, seed)


def test_vqvae_ema_resume_restores_the_codebook_exactly(tmp_path, tiny_data):
    ema = ["vqvae.VQVAE.ema = True", "vqvae.VQVAE.num_codes = 16", "vqvae.VQVAE.code_dim = 8"]

    # checkpoint at step 2, step 3 lost
    run = assert_resumes_exactly(lambda: _build("vqvae", tiny_data, *ema), tiny_data, tmp_path, steps=4, stop_after=3)
    fresh, _ = _build("vqvae", tiny_data, *ema)
    assert not torch.equal(run.ref.codebook, fresh.codebook) and not torch.equal(run.ref.ema_count, fresh.ema_count)
    assert {"codebook", "ema_count", "ema_sum"} <= run.ref.state_dict().keys()


# --- options that tests/test_methods.py (the gin files' defaults) does not reach -----


@pytest.mark.parametrize(
    "name,bindings",
    [
        (
            "context_encoder",
            [
                "context_encoder.ContextEncoder.adversarial = 0.001",
                "context_encoder.ContextEncoder.mask = 'block'",
                "context_encoder.ContextEncoder.disc_width = 8",
            ],
        ),
        ("context_encoder", ["context_encoder.ContextEncoder.mask = 'region'"]),
        (
            "denoising_autoencoder",
            ["autoencoder.AutoEncoder.noise = 'gaussian'", "autoencoder.AutoEncoder.noise_level = 0.5"],
        ),
        ("vqvae", ["vqvae.VQVAE.ema = True"]),
    ],
)
def test_options_train_and_reach_every_parameter(name, bindings, tiny_data):
    method, views = _build(name, tiny_data, *bindings)
    method.train()
    torch.manual_seed(1)
    batch = Batch(views=views(tiny_data.images[:16]), labels=tiny_data.labels[:16], index=torch.arange(16))
    opt = torch.optim.SGD(method.parameters(), lr=0.01)
    for step in range(2):
        out = method.loss(batch)
        assert torch.isfinite(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.after_step(step, 2)
    missing = [
        n for n, p in method.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not missing
