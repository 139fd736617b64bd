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
