"""CLIP: the loss against a python loop, the learned and clipped temperature, the tokenizer,
the text tower's causality, export and reload, and zero-shot classification."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from harness import ginutil, job
from harness.data import ImageSet, with_captions
from harness.evals import Context, Features
from harness.evals.zeroshot import ZeroShot
from harness.trainer import Trainer
from harness.views import eval_view
from methods.base import Batch, Unsupported
from methods.clip import EOT, SOT, UNK, TextTower, Tokenizer, clip_loss, load_text_side, words
from tests.conftest import make_images, parse_method

# The embedded scale's text tower (the paper's 12 x 512 is for paper scale).
SMALL = [
    "clip.CLIP.embed_dim = 32",
    "clip.CLIP.context = 16",
    "clip.CLIP.text_width = 32",
    "clip.CLIP.text_layers = 2",
    "clip.CLIP.text_heads = 4",
]


def _clip_loss_by_loop(image, text, scale):
    """Both directions of CLIP's cross-entropy with python floats."""

    def unit(v):
        n = math.sqrt(sum(c * c for c in v))
        return [c / n for c in v]

    im, tx = [unit(v) for v in image.tolist()], [unit(v) for v in text.tolist()]
    n = len(im)
    sim = [[scale * sum(a * b for a, b in zip(im[i], tx[j])) for j in range(n)] for i in range(n)]
    i2t = sum(-sim[i][i] + math.log(sum(math.exp(sim[i][j]) for j in range(n))) for i in range(n)) / n
    t2i = sum(-sim[j][j] + math.log(sum(math.exp(sim[i][j]) for i in range(n))) for j in range(n)) / n
    return (i2t + t2i) / 2


def test_clip_loss_matches_a_python_loop():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    for scale in (1.0, 14.3, 100.0):
        assert math.isclose(
            clip_loss(image, text, torch.tensor(scale)).item(), _clip_loss_by_loop(image, text, scale), rel_tol=1e-5
        )


def _captioned(n: int = 64, channels: int = 1) -> ImageSet:
    return with_captions(make_images(n, channels=channels))


def _build(data, *bindings):
    parse_method("clip", *SMALL, *bindings)
    return job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), data, 0)


def _batch(views, data, n=32):
    torch.manual_seed(1)
    return Batch(views=views(data.images[:n]), labels=data.labels[:n], index=torch.arange(n))


def test_temperature_is_learned_and_clipped():
    data = _captioned()
    method, views = _build(data)
    assert math.isclose(method.scale().item(), 1 / 0.07, rel_tol=1e-6)
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    before = method.logit_scale.item()
    method.loss(_batch(views, data))["loss"].backward()
    assert method.logit_scale.grad is not None and method.logit_scale.grad.abs() > 0
    opt.step()
    assert method.logit_scale.item() != before  # learned
    with torch.no_grad():
        method.logit_scale.fill_(math.log(1000.0))
    assert math.isclose(method.scale().item(), 100.0, rel_tol=1e-6)  # the loss never scales by more than 100
    assert math.isclose(method.loss(_batch(views, data))["scale"].item(), 100.0, rel_tol=1e-6)
    method.after_step(0, 1)
    assert math.isclose(method.logit_scale.item(), math.log(100.0), rel_tol=1e-6)  # and the parameter is clipped


def test_tokenizer_round_trip_determinism_and_edges():
    texts = ["A photo of a T-shirt/top.", "a black and white photo of a dress.", "an Ankle boot, close-up!"]
    tok = Tokenizer.build(texts)
    shuffled = texts[:]
    random.Random(0).shuffle(shuffled)
    assert Tokenizer.build(shuffled).vocab == tok.vocab == sorted(tok.vocab)  # independent of order
    assert "t" in tok.vocab and "/" in tok.vocab and "shirt" in tok.vocab and "A" not in tok.vocab
    ids = tok.encode(texts, context=16)
    assert ids.shape == (3, 16) and (ids[:, 0] == SOT).all() and ((ids == EOT).sum(1) == 1).all()
    for text, row in zip(texts, ids):
        assert tok.decode(row) == " ".join(words(text))
        assert torch.equal(tok.encode([tok.decode(row)], 16)[0], row)  # decode then encode: the same ids
    assert tok.decode(tok.encode(["a photo of a zebra"], 16)[0]) == "a photo of a <unk>"
    assert tok.encode(["a zebra"], 8)[0, 2] == UNK
    cut = tok.encode([texts[1]], context=5)[0]  # too long: cut, eot kept last
    assert cut.tolist()[-1] == EOT and tok.decode(cut) == "a black and"
    capped = Tokenizer.build(["a a a b b c"], max_words=2)
    assert capped.vocab == ["a", "b"]


def test_text_tower_is_causal_and_pools_the_eot_token():
    torch.manual_seed(0)
    tower = TextTower(vocab_size=20, context=8, width=16, layers=2, heads=2, embed_dim=4).eval()
    a = torch.tensor([[SOT, 5, 6, EOT, 0, 0, 0, 0]])
    after_eot = a.clone()
    after_eot[0, 5] = 9  # a token after eot cannot reach eot through a causal mask
    before_eot = a.clone()
    before_eot[0, 2] = 9
    assert torch.allclose(tower(a), tower(after_eot), atol=1e-6)
    assert not torch.allclose(tower(a), tower(before_eot), atol=1e-4)


def test_clip_without_captions_is_unsupported():
    with pytest.raises(Unsupported, match="clip needs captions.*data.Captioned"):
        _build(make_images())


def test_clip_trains_every_parameter_and_its_loss_falls():
    data = _captioned()
    method, views = _build(data)
    method.train()
    batch = _batch(views, data)
    opt = torch.optim.Adam(method.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = method.loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        if len(losses) == 1:  # after a step: zero-initialised residual BNs block gradients at init
            missing = [n for n, p in method.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing, missing
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_export_and_reload_the_text_side(tmp_path):
    data = _captioned(32)
    method, views = _build(data)
    Trainer(max_steps=2, batch_size=16, progress=False).fit(method, data, views, tmp_path, seed=0)
    method.export(tmp_path)
    config = json.loads((tmp_path / "text.json").read_text())
    assert config["vocab"] == method.tokenizer.vocab and config["context"] == 16
    side = load_text_side(tmp_path)
    method.eval()
    texts = ["a photo of a 2.", "a black and white photo of a 0."]
    with torch.no_grad():
        expected = F.normalize(method.text(method.tokenizer.encode(texts, 16)), dim=1)
        assert torch.allclose(side.embed_text(texts), expected, atol=1e-6)
        feats = torch.randn(3, method.image_proj.in_features)
        assert torch.allclose(side.embed_image(feats), F.normalize(method.image_proj(feats), dim=1), atol=1e-6)
    assert side.logit_scale.item() == method.logit_scale.item()


class _Data:
    def __init__(self, test: ImageSet):
        self.test = test

    def split(self, which):
        return self.test


def _zeroshot_case(tmp_path, classes, n_per_class=20):
    """A saved text side, and test features whose projection is exactly their class's
    prompt embedding (image_proj = identity)."""
    torch.manual_seed(0)
    zs = ZeroShot(templates=["a photo of a {}.", "a sketch of the {}."])
    tok = Tokenizer.build([t.format(c) for c in classes for t in zs.templates])
    config = {
        "vocab_size": len(tok),
        "context": 12,
        "width": 32,
        "layers": 2,
        "heads": 4,
        "embed_dim": 32,
        "image_features": 32,
        "max_scale": 100.0,
        "vocab": tok.vocab,
    }
    tower = TextTower(**{k: config[k] for k in ("vocab_size", "context", "width", "layers", "heads", "embed_dim")})
    state = {
        **{f"text.{k}": v for k, v in tower.state_dict().items()},
        "image_proj.weight": torch.eye(32),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    torch.save(state, tmp_path / "text.pt")
    (tmp_path / "text.json").write_text(json.dumps(config))
    class_emb = zs.class_embeddings(load_text_side(tmp_path), classes)  # [C, 32]
    y = torch.arange(len(classes)).repeat(n_per_class)
    test = Features(x=class_emb[y] * 3.0, y=y)  # any positive scale: cosine similarity ignores it
    labels = ImageSet(
        images=torch.zeros(len(y), 1, 2, 2, dtype=torch.uint8), labels=y, classes=list(classes), mean=(0.5,), std=(0.5,)
    )
    ctx = Context(
        encoder=lambda: None, dataset=_Data(labels), pretrain_dir=tmp_path, features={"train": test, "test": test}
    )
    return zs, ctx, state


def test_zeroshot_perfect_alignment_scores_100_and_a_scrambled_tower_chance(tmp_path):
    classes = [f"class{i} thing" for i in range(20)]
    zs, ctx, state = _zeroshot_case(tmp_path, classes)
    assert zs.evaluate(ctx) == {"zeroshot/top1": 100.0}
    torch.manual_seed(123)  # a text tower unrelated to the images
    scrambled = {
        k: (torch.randn_like(v) * 0.5 if k.startswith("text.") and v.ndim > 1 else v) for k, v in state.items()
    }
    torch.save(scrambled, tmp_path / "text.pt")
    assert zs.evaluate(ctx)["zeroshot/top1"] <= 20.0  # chance is 5 %; 20 % is 4 classes of 20 right by luck
    assert zs.params() == {"templates": ["a photo of a {}.", "a sketch of the {}."]}


def test_zeroshot_on_a_run_without_a_text_tower_says_which_method_and_the_fix(tmp_path):
    parse_method("rotnet")
    ctx = Context(encoder=lambda: None, dataset=None, pretrain_dir=tmp_path, features={})
    with pytest.raises(FileNotFoundError) as err:
        ZeroShot().evaluate(ctx)
    msg = str(err.value)
    assert "rotnet.RotNet" in msg and str(tmp_path) in msg and "job.run.evaluations" in msg


@pytest.mark.slow
def test_clip_learns_zero_shot_classification_on_captioned_blobs(tmp_path):
    """Trained for 60 steps on captioned blobs, zero-shot beats chance (25 %) by far (~80 %)."""
    data = _captioned(128)
    method, views = _build(data)
    Trainer(max_steps=60, batch_size=32, base_lr=5e-4, scale_lr=False, optimizer=torch.optim.AdamW, progress=False).fit(
        method, data, views, tmp_path, seed=0
    )
    method.export(tmp_path)
    method.eval()
    with torch.no_grad():
        x = method.backbone(eval_view(data.images, 32, data.mean, data.std))
    ctx = Context(
        encoder=lambda: None,
        dataset=_Data(data),
        pretrain_dir=tmp_path,
        features={"test": Features(x=x, y=data.labels)},
    )
    assert ZeroShot().evaluate(ctx)["zeroshot/top1"] > 50.0
