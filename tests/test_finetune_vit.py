"""MAE's fine-tuning recipe (gin/protocols/semisup_mae.gin): layer-wise lr decay over a ViT's
blocks, AdamW, label smoothing, a normalised head, and the skip on encoders without blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import backbone, optim
from harness.errors import Unsupported
from harness.evals import finetune
from harness.evals.semisup import SemiSupervised
from tests.conftest import make_images


def tiny_vit(depth: int = 3) -> nn.Module:
    return backbone.create("vit_tiny_patch16_224", in_chans=1, img_size=16, patch_size=4, depth=depth)


def test_layer_decay_gives_each_block_its_power_and_the_head_the_full_lr():
    encoder, head = tiny_vit(depth=3), nn.Linear(192, 4)
    groups = finetune.layer_groups(encoder, head, weight_decay=0.05, decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(encoder.named_parameters())
    trainable = [*encoder.parameters(), *head.parameters()]
    assert sorted(map(id, trainable)) == sorted(scale)  # every parameter once
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    assert scale[id(named["patch_embed.proj.weight"])] == scale[id(named["cls_token"])] == 0.5**4
    assert scale[id(named["blocks.0.attn.qkv.weight"])] == 0.5**3
    assert scale[id(named["blocks.2.mlp.fc2.weight"])] == 0.5
    assert scale[id(named["norm.weight"])] == scale[id(head.weight)] == 1.0
    assert decay[id(named["blocks.1.attn.qkv.weight"])] == 0.05 and decay[id(head.weight)] == 0.05
    assert decay[id(named["pos_embed"])] == decay[id(named["cls_token"])] == decay[id(head.bias)] == 0.0


def test_the_kernel_sets_each_groups_lr_times_its_scale():
    encoder, head = tiny_vit(depth=2), nn.Linear(192, 4)
    recipe = finetune.Recipe(epochs=1, batch_size=4, lr=1e-3, optimizer="adamw", layer_decay=0.5)
    opt = finetune.optimizer(recipe, encoder, 1e-3, head)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)
    kernel = optim.Kernel(opt, 1e-3, lambda step: 0.25, 1, "lr = 1e-3", "lower it")
    x = torch.randn(4, 1, 16, 16)
    kernel.step(F.cross_entropy(head(encoder(x)), torch.arange(4)), 0)
    lrs = sorted({round(g["lr"] / 2.5e-4, 9) for g in opt.param_groups})
    assert lrs == [0.5**3, 0.5**2, 0.5, 1.0]  # patch embedding, block 0, block 1, norm and head


def test_layer_decay_needs_a_vits_blocks_and_other_encoders_are_skipped():
    resnet = backbone.create("resnet18", in_chans=1)
    with pytest.raises(Unsupported, match="needs a ViT's blocks"):
        finetune.layer_groups(resnet, nn.Linear(512, 4), 0.05, 0.65)
    data = make_images(16, classes=4)
    recipe = finetune.Recipe(epochs=1, batch_size=8, lr=1e-3, optimizer="adamw", layer_decay=0.65)
    with pytest.raises(Unsupported):
        finetune.train(resnet, nn.Linear(512, 4), data, torch.arange(16), recipe, 16, fine_tune=True, seed=0)
    # a frozen probe trains its head alone: layer decay does not apply and nothing is refused
    done = finetune.train(resnet, nn.Linear(512, 4), data, torch.arange(16), recipe, 16, fine_tune=False, seed=0)
    assert done["steps"] == 2


class NearlyConstant(nn.Module):
    """A frozen 'encoder' like a briefly pretrained ViT's class token: a large constant vector plus
    a small image-dependent part (each quadrant's mean, where make_images puts the class blob)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10.0 + 0.02 * F.adaptive_avg_pool2d(x, 2).flatten(1)  # [B, 4C]


def test_a_normalised_head_reads_features_that_barely_vary_between_images():
    data = make_images(96, classes=4, seed=4)
    recipe = finetune.Recipe(epochs=20, batch_size=16, lr=5e-3, optimizer="adamw", label_smoothing=0.1, augment="none")
    top1 = {}
    for norm in ("none", "bn_noaffine"):
        head = finetune.classifier(4, 4, norm)
        finetune.train(NearlyConstant(), head, data, torch.arange(96), recipe, 16, fine_tune=False, seed=0)
        finetune.refresh_bn(NearlyConstant(), head, data, torch.arange(96), 16, 1.0, fine_tune=False)
        top1[norm] = finetune.test(NearlyConstant(), head, data, 16, 1.0)["top1"]
    assert top1["bn_noaffine"] >= 60.0, top1  # measured 80.2; the plain head 25.0 (chance)
    assert top1["bn_noaffine"] >= top1["none"] + 20.0, top1


def test_mae_recipe_settings_are_recorded_and_simclrs_ids_do_not_change():
    simclr = SemiSupervised(image_size=32)
    assert not {"betas", "layer_decay", "label_smoothing", "norm"} & simclr.params().keys()
    assert simclr.params()["warmup_epochs"] == 0.0
    mae = SemiSupervised(
        image_size=32,
        epochs=[60, 5],
        warmup_epochs=[3, 0.25],
        optimizer="adamw",
        nesterov=False,
        layer_decay=0.65,
        label_smoothing=0.1,
        norm="bn_noaffine",
    )
    assert [r.warmup_epochs for r in mae.recipes] == [3.0, 0.25] and [r.epochs for r in mae.recipes] == [60.0, 5.0]
    p = mae.params()
    assert (p["warmup_epochs"], p["layer_decay"], p["betas"], p["norm"]) == (
        [3.0, 0.25],
        0.65,
        [0.9, 0.999],
        "bn_noaffine",
    )
    with pytest.raises(ValueError, match="one entry per labelled share"):
        SemiSupervised(image_size=32, warmup_epochs=[1, 2, 3])
    with pytest.raises(ValueError, match="norm be one of"):
        SemiSupervised(image_size=32, norm="ln")
    with pytest.raises(ValueError, match="layer_decay must lie in"):
        finetune.Recipe(epochs=1, batch_size=8, lr=0.1, layer_decay=1.5)
