"""`pneumoscope adapt`: re-estimated BatchNorm statistics (and priors) and nothing else."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from conftest import FIXTURE_DATA

from pneumoscope.bundle import ModelMeta, load_bundle, save_bundle
from pneumoscope.nets.registry import create_model
from pneumoscope.workflows.adapt import adapt_bundle, estimate_priors, prior_shift_bias

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture()
def tiny_bundle(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet18", 3, pretrained=False).eval()
    meta = ModelMeta(name="tiny", task="three", classes=("NORMAL", "BACTERIA", "VIRUS"), arch="resnet18",
                     img_size=48, mean=0.449, std=0.226, temperature=1.3)
    return save_bundle(model, meta, tmp_path / "in")


@pytest.fixture()
def new_site(tmp_path):
    """Real X-rays, made darker: an acquisition shift the model never saw."""
    from PIL import Image

    folder = tmp_path / "site"
    folder.mkdir()
    for path in sorted(FIXTURE_DATA.rglob("*.jpeg"))[:12]:
        gray = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
        Image.fromarray((255 * (gray / 255) ** 1.8).astype(np.uint8)).save(folder / path.name)
    return folder


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_adapt_changes_batchnorm_statistics_and_nothing_else(tiny_bundle, new_site, tmp_path):
    before_files = _digests(tiny_bundle)
    report = adapt_bundle(tiny_bundle, new_site, tmp_path / "out")
    assert _digests(tiny_bundle) == before_files  # the input model is untouched
    old = load_bundle(tiny_bundle).state_dict()
    adapted = load_bundle(tmp_path / "out")
    new = adapted.state_dict()
    assert old.keys() == new.keys()
    stats = [k for k in old if k.endswith(BN_STATS)]
    others = [k for k in old if not k.endswith(BN_STATS)]
    assert stats and others
    assert all(torch.equal(old[k], new[k]) for k in others)
    moved = [k for k in stats if k.endswith("running_mean") and not torch.allclose(old[k], new[k])]
    assert len(moved) == len([k for k in stats if k.endswith("running_mean")])
    assert adapted.meta.adaptation["method"] == "adabn" and adapted.meta.adaptation["images"] == 12
    assert set(report["predicted_mix_after"]) == {"NORMAL", "BACTERIA", "VIRUS"}
    assert adapted.fingerprint != load_bundle(tiny_bundle).fingerprint


def test_adapt_with_priors_also_shifts_only_the_classifier_bias(tiny_bundle, new_site, tmp_path):
    adapt_bundle(tiny_bundle, new_site, tmp_path / "bn")
    adapt_bundle(tiny_bundle, new_site, tmp_path / "priors", priors=True)
    bn, priors = load_bundle(tmp_path / "bn"), load_bundle(tmp_path / "priors")
    a, b = bn.state_dict(), priors.state_dict()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed == ["backbone.fc.bias"]
    assert len(priors.meta.adaptation["priors"]) == 3


def test_adapt_refuses_a_folder_without_images(tiny_bundle, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images found") as err:
        adapt_bundle(tiny_bundle, empty, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_adapt_command_reports_an_empty_folder_in_one_line(tiny_bundle, tmp_path, capsys):
    from pneumoscope.cli import main

    empty = tmp_path / "nothing-here"
    empty.mkdir()
    code = main(["adapt", "--images", str(empty), "--checkpoint", str(tiny_bundle), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "nothing-here" in err and len(err.splitlines()) == 1


def test_prior_em_recovers_a_known_class_mix():
    rng = np.random.default_rng(0)
    source = np.array([0.5, 0.5])
    # a calibrated classifier under equal priors: p(class 1 | x) from two overlapping Gaussians
    labels = rng.random(4000) < 0.2  # the new site: 20% class 1
    x = rng.normal(labels.astype(float) * 1.5, 1.0)
    logit = 1.5 * x - 1.125
    p1 = 1 / (1 + np.exp(-logit))
    estimated = estimate_priors(np.stack([1 - p1, p1], 1), source)
    assert abs(estimated[1] - 0.2) < 0.03
    bias = prior_shift_bias(source, estimated, temperature=2.0)
    assert bias[1] < 0 < bias[0]



def test_the_prior_shift_moves_an_ensembles_logits_by_the_whole_bias():
    """An ensemble averages its members' logits, so the prior shift goes into every member's
    classifier bias (it went into the last member's only: half the shift for two members)."""
    from pneumoscope.workflows.adapt import add_logit_bias
    from pneumoscope.nets.registry import Ensemble

    torch.manual_seed(0)
    x = torch.rand(4, 1, 48, 48)
    bias = np.array([0.7, -0.2, -0.5])
    for model in (create_model("resnet18", 3, pretrained=False).eval(),
                  Ensemble([create_model("resnet18", 3, pretrained=False) for _ in range(2)]).eval()):
        with torch.no_grad():
            before = model(x)
            add_logit_bias(model, bias)
            shift = model(x) - before
        np.testing.assert_allclose(shift.numpy(), np.broadcast_to(bias, (4, 3)), atol=1e-5)
