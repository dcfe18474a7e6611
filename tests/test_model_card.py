"""`pneumoscope card`: docs/model-card.md rendered from templates/model_card.md, every figure read
from the shipped bundles (meta.json, metrics.json) and the reports ship wrote under docs/model-card/.
The expected figures below are read from those files, never typed."""
from __future__ import annotations

import ast
import csv
import json
import re
from pathlib import Path

import jinja2
import pytest

from conftest import ROOT
from pneumoscope import INTENDED_USE
from pneumoscope.cli import main
from pneumoscope.data.datasets import Sample, read_dataset
from pneumoscope.data.images import CLAHE_CLIP_LIMIT, CLAHE_TILES
from pneumoscope.evaluation.metrics import ECE_BINS
from pneumoscope.runs.rundir import data_facts
from pneumoscope.workflows import release

MODELS, DOCS = ROOT / "models", ROOT / "docs"
TASKS = ("three", "binary")


def _snapshot() -> dict:
    """Every file under docs/ and models/ with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for root in (DOCS, MODELS) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def shipped() -> dict:
    """task -> (meta.json, metrics.json, the internal test report's metrics.json) of the shipped bundles."""
    if not all((MODELS / task / "meta.json").is_file() for task in TASKS):
        pytest.skip("the shipped models are not bundles yet")
    read = lambda path: json.loads(path.read_text())  # noqa: E731
    return {task: (read(MODELS / task / "meta.json"), read(MODELS / task / "metrics.json"),
                   read(DOCS / "model-card" / task / "test" / "metrics.json")) for task in TASKS}


@pytest.fixture(scope="module")
def card(shipped, tmp_path_factory) -> str:
    """`pneumoscope card --out` on the shipped bundles: writes the card there, nothing under docs/ or models/."""
    out = tmp_path_factory.mktemp("card") / "model-card.md"
    before = _snapshot()
    assert main(["card", "--models-dir", str(MODELS), "--docs-dir", str(DOCS), "--out", str(out)]) == 0
    assert _snapshot() == before
    return out.read_text()


def section(card: str, name: str) -> str:
    """One model's section of the card, from its heading to the next."""
    start = card.index(f"## `{name}`")
    return card[start:card.index("\n## ", start + 1)]


def table(text: str, header: str) -> list[list[str]]:
    """The cells of the Markdown table whose header line starts with `header`."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[first + 2:]:  # past the header and its |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def group_label(key: str) -> str:
    return "external (used for selection)" if key == "external" else key


def f3(x: float) -> str:
    return f"{x:.3f}"


def test_card_rows_are_the_bundles_metrics(card, shipped):
    """Every group of metrics.json, on every runtime, is one row of its model's table, with the
    bundle's figures; no row more."""
    for meta, metrics, _ in shipped.values():
        classes = meta["classes"]
        expected = {group_label(k): m for k, m in metrics.items() if isinstance(m, dict) and "accuracy" in m}
        expected |= {f"{group_label(k)} ({runtime})": m for runtime in ("int8", "openvino")
                     for k, m in metrics.get(runtime, {}).items()}
        rows = {row[0]: row[1:] for row in table(section(card, meta["name"]), "| split |")}
        assert set(rows) == set(expected)
        for name, m in expected.items():
            (lo, hi) = m["accuracy_ci95"]
            assert rows[name] == [str(m["n"]), f"{f3(m['accuracy'])} ({f3(lo)}-{f3(hi)})", f3(m["balanced_accuracy"]),
                                  f3(m["macro_f1"]), f3(m["macro_auc"]), f"{f3(m['ece_uncalibrated'])} -> {f3(m['ece'])}",
                                  *(f3(m["recall"][c]) for c in classes)], name


def test_card_gap_confusion_and_curve_are_the_bundles(card, shipped):
    for meta, metrics, test_report in shipped.values():
        text = section(card, meta["name"])
        internal, external = metrics["internal_test"], metrics["external"]
        gap = {row[0]: row[1:] for row in table(text, "| | internal test |")}
        for c in meta["classes"]:
            cells = [f"{f3(m['recall'][c])} ({f3(m['recall_ci95'][c][0])}-{f3(m['recall_ci95'][c][1])})"
                     for m in (internal, external)]
            assert gap[f"recall {c}"] == [*cells, f"{external['recall'][c] - internal['recall'][c]:+.3f}"]
        assert gap[f"ECE ({ECE_BINS} bins)"] == [f3(internal["ece"]), f3(external["ece"]),
                                                f"{external['ece'] - internal['ece']:+.3f}"]
        confusion = table(text, "| | " + " | ".join(test_report["classes"]))
        assert [[int(v) for v in row[1:]] for row in confusion] == test_report["confusion_matrix"]
        curve = meta["provenance"]["training"]["curve"]
        assert table(text, "| epoch |") == [[str(c["epoch"]), str(c["train_seconds"]), f3(c["val_acc"]), f3(c["val_bacc"])]
                                            for c in curve]


def test_card_mistakes_are_the_test_reports(card, shipped):
    """The most confident mistakes: the wrong rows of the internal test predictions.csv, by probability."""
    for task, (meta, _, _) in shipped.items():
        with open(DOCS / "model-card" / task / "test" / "predictions.csv", newline="") as handle:
            wrong = [r for r in csv.DictReader(handle) if r["true"] != r["predicted"]]
        wrong.sort(key=lambda r: -float(r[f"p_{r['predicted']}"]))
        expected = [[Path(r["path"]).name, r["true"], r["predicted"], f3(float(r[f"p_{r['predicted']}"]))]
                    for r in wrong[:release.MISTAKES_SHOWN]]
        assert table(section(card, meta["name"]), "| file |") == expected


def test_card_model_lines_are_the_bundles(card, shipped):
    """Architecture, training, data, temperature and guard lines carry meta.json's figures."""
    for meta, metrics, _ in shipped.values():
        text = section(card, meta["name"])
        training = meta["provenance"]["training"]
        config = meta["provenance"]["train_config"]
        assert f"{meta['params']:,} parameters, input {meta['img_size']}x{meta['img_size']} gray" in text
        assert (f"{training['epochs_run']} epochs, {training['train_seconds']} s in training epochs "
                f"({training['wall_seconds']} s wall in all) on {training['cpu_count']} CPU cores "
                f"(peak memory {training['peak_memory_mb']} MB)") in text
        assert f"lr {config['lr']} with a {config['schedule']} schedule" in text
        assert f"batch {config['batch_size']}, augmentation {config['aug_policy']} at strength {config['aug']}" in text
        # the split sizes: the images the guard was fitted on (train) and metrics.json measured
        train = next(iter(meta["guard"].values()))["fitted_on"]["train"]
        val, test = metrics["val"]["n"], metrics["internal_test"]["n"]
        assert (f"trained and measured on {train + val + test:,} images (train {train:,}, val {val:,}, "
                f"internal test {test:,}), cut by patient") in text
        assert f"manifest hash `{meta['provenance']['manifest_hash']}`" in text
        assert f"temperature {f3(meta['temperature'])}," in text
        for graph, guard in meta["guard"].items():
            assert (f"{graph}: {guard['method']} on {guard['dims']} PCA dims of the {guard['features']} pooled "
                    f"features, threshold {guard['threshold']:.2f} (<= {guard['max_flagged']:.1%}") in text


def test_card_page_figures_are_the_bundles(card, shipped):
    """The page-wide figures: the external group's size, the validation share, ECE bins, input size,
    and the one intended-use text."""
    for meta, metrics, _ in shipped.values():
        assert f"one half ({metrics['external']['n']}) is the **external" in card
        train = next(iter(meta["guard"].values()))["fitted_on"]["train"]
        share = metrics["val"]["n"] / (train + metrics["val"]["n"] + metrics["internal_test"]["n"])
        assert f"the {share:.0%} validation share" in card
        assert f"- {meta['img_size']}x{meta['img_size']} squashed inputs" in card
    assert f"ECE uses {ECE_BINS} equal-width bins" in card
    assert f"## Intended use\n- {INTENDED_USE}\n" in card
    # the shipped bundles predate ship's count of patients with two labels: the card says so
    assert "is not recorded in these bundles" in card


def test_card_links_the_reports_from_where_it_is_written(card):
    for link in re.findall(r"\]\(([^)]+\.png)\)", card):
        assert not Path(link).is_absolute() and link.endswith(".png")
    assert "](../" in card  # written outside docs/: the links climb back to docs/model-card/


def test_the_committed_card_is_the_rendered_one(shipped, tmp_path):
    """`pneumoscope card` reproduces docs/model-card.md: written beside a link to docs/model-card,
    the links are the committed card's."""
    (tmp_path / "model-card").symlink_to(DOCS / "model-card")
    out = release.write_model_card(MODELS, tmp_path)
    assert out.read_text() == (DOCS / "model-card.md").read_text()


# ---------------------------------------------------------------- the template
def _variant_context(tmp_path) -> dict:
    """The shipped bundles' context, with the first model changed into an ensemble read through
    CLAHE, without guard, external group or test report: the sentences no shipped bundle has."""
    context = release.card_context(MODELS, DOCS, tmp_path)
    model = context["models"][0]
    members = [{"arch": arch, "seed": seed, "training": {"epochs_run": 3, "wall_seconds": 12.5},
                "train_config": {"lr": 0.01, "label_smoothing": 0.1, "freeze": freeze}} for arch, seed, freeze in
               (("efficientnet_lite0", 1, "base"), ("resnet18", 2, "none"))]
    model.update(meta=model["meta"].replace(arch="ensemble", members=("efficientnet_lite0", "resnet18"),
                                            preprocess="clahe", guard=None),
                 members=members, test=None, metrics={k: v for k, v in model["metrics"].items() if k != "external"})
    context["patients_across_labels"] = [{"labels": ["BACTERIA", "VIRUS"], "patients": 1234}]
    return context


def test_template_renders_every_branch_with_every_field_filled(tmp_path):
    text = release.card_template().render(_variant_context(tmp_path))
    assert "ensemble of `efficientnet_lite0` + `resnet18`" in text and "averaged in logit space" in text
    assert "`resnet18` seed 2 (3 epochs, 12.5 s wall" in text and "nothing frozen" in text
    assert "all but the classifier frozen" in text
    assert f"through CLAHE (clip {CLAHE_CLIP_LIMIT:g}, {CLAHE_TILES}x{CLAHE_TILES} tiles)" in text
    assert "image checks only (no feature statistics in this bundle)" in text
    assert "1,234 patient ids hold files of both BACTERIA and VIRUS" in text
    assert not re.search(r"\{\{|\{%|\{#|\$\w|None\b|Undefined", text)


def test_a_field_the_context_lacks_is_an_error_not_a_blank(tmp_path):
    context = _variant_context(tmp_path)
    del context["ece_bins"]
    with pytest.raises(jinja2.UndefinedError, match="ece_bins"):
        release.card_template().render(context)


def test_the_template_is_package_data():
    """An installed wheel carries the template (pyproject's package-data)."""
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["pneumoscope"]
    from importlib import resources

    template = Path(str(resources.files("pneumoscope") / "templates" / release.CARD_TEMPLATE))
    assert template.is_file() and any(template.match(f"pneumoscope/{pattern}") for pattern in data)


def test_no_card_figure_or_prose_is_typed_in_python():
    """release.py holds no string with a figure in it (docstrings aside): the card's figures come from
    the bundles, its prose from the template."""
    tree = ast.parse(Path(release.__file__).read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    typed = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and id(node) not in docstrings and re.search(r"(?<![\w.])\d", node.value)]
    assert typed == []


# ---------------------------------------------------------------- what ship records for the card
def test_data_facts_count_the_patients_whose_images_hold_two_labels():
    samples = [Sample("a.jpeg", "BACTERIA", "person1", "train"), Sample("b.jpeg", "VIRUS", "person1", "test"),
               Sample("c.jpeg", "NORMAL", "IM-0001", "train"), Sample("d.jpeg", "VIRUS", "person2", "val")]
    assert data_facts(samples)["patients_across_labels"] == [{"labels": ["BACTERIA", "VIRUS"], "patients": 1}]


def test_data_facts_count_the_kermany_pool_as_its_manifest_does(full_data):
    """On the shipped models' pool (train/ + val/), as many personN ids with both a bacterial and a
    viral file as the data's MANIFEST.csv shows."""

    labels: dict[str, set] = {}
    with open(full_data / "MANIFEST.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            labels.setdefault(row["patient_id"], set()).add(row["label3"])
    both = sum(held == {"BACTERIA", "VIRUS"} for held in labels.values())
    assert data_facts(read_dataset(full_data).samples)["patients_across_labels"] == \
        [{"labels": ["BACTERIA", "VIRUS"], "patients": both}]
