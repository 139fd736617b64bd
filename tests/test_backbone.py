"""The exported encoder is a plain timm state dict."""

import timm
import torch

from harness import backbone


def test_export_loads_strictly_into_a_fresh_timm_model(tmp_path):
    torch.manual_seed(0)
    net = backbone.create("test_resnet", in_chans=1)
    net.train()
    net(torch.randn(8, 1, 32, 32))  # move BN statistics away from their defaults
    backbone.export(net, tmp_path)
    fresh = timm.create_model("test_resnet", num_classes=0, in_chans=1)
    fresh.load_state_dict(torch.load(tmp_path / "encoder.pt", weights_only=True), strict=True)
    x = torch.randn(4, 1, 32, 32)
    assert torch.equal(net.eval()(x), fresh.eval()(x))
    assert torch.equal(backbone.load(tmp_path)(x), fresh(x))


def test_small_input_stem_keeps_the_resolution():
    net = backbone.create("test_resnet", in_chans=3, small_input=True)
    assert net.forward_features(torch.randn(2, 3, 32, 32)).shape[-1] == 4  # 32 / 8; the normal stem gives 1


def test_unknown_backbone_suggests_names():
    try:
        backbone.create("resnet18x")
    except ValueError as err:
        assert "resnet18x" in str(err) and "resnet18" in str(err)
    else:
        raise AssertionError("expected ValueError")


def test_small_vit_pools_to_num_features_and_round_trips(tmp_path):
    torch.manual_seed(0)
    net = backbone.create("vit_tiny_patch16_224", in_chans=1, img_size=32, patch_size=4, depth=2)
    x = torch.randn(3, 1, 32, 32)
    assert net.forward_features(x).shape == (3, 1 + 64, 192)  # class token + an 8x8 grid of patches
    assert net(x).shape == (3, net.num_features) and net.num_features == 192
    with torch.no_grad():
        net.pos_embed.normal_()  # away from any default
    backbone.export(net, tmp_path)
    loaded = backbone.load(tmp_path)
    assert len(loaded.blocks) == 2 and loaded.patch_embed.patch_size == (4, 4)
    assert torch.equal(loaded(x), net.eval()(x))
    fresh = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=1, img_size=32, patch_size=4, depth=2)
    fresh.load_state_dict(torch.load(tmp_path / "encoder.pt", weights_only=True), strict=True)
    assert torch.equal(fresh.eval()(x), loaded(x))
