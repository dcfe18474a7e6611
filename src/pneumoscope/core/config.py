"""The training configuration, and the `train`/`tune` command-line options made from it.

`TrainConfig` is the one description of a training run: the CLI generates its options from the
fields (type, default, help and choices live on the field), a YAML file given with `--config` sets
defaults that the command line overrides (timm's pattern), and a run's own `config.yaml` is such
a file. Nothing here imports torch, so `pneumoscope --help` stays fast.
"""
from __future__ import annotations

import argparse
import functools
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from .labels import TASKS

DEFAULT_ARCH = "efficientnet_lite0"
AUG_POLICIES = ("standard", "strong")  # data.train_transform
OPTIMIZERS = ("adamw", "adam", "sgd")  # train.make_optimizer
SCHEDULES = ("onecycle", "cosine", "step", "plateau")  # train.make_schedule
LOSSES = ("ce", "focal")  # train.make_loss
CALIBRATIONS = ("augmented", "val")  # train.calibration_temperature
PRECISIONS = ("32", "bf16-mixed", "16-mixed")  # Lightning's names; 16-mixed is for CUDA
HEAD_INITS = ("random", "zero")  # training init_head
INPUT_STEPS = ("none", "clahe")  # ModelMeta.preprocess / train --preprocess (data.images.input_step)
BACKENDS = ("auto", "int8", "onnx", "torch", "openvino", "openvino-int8")  # runtime.backends.open_backend
OUTPUT_FORMATS = ("table", "csv", "json")  # predict --format (workflows.batch writes them)
TUNED = ("lr", "aug", "img_size", "label_smoothing", "class_weight_power")  # what `tune` searches
# Patients' shares of a dataset folder (data.split_by_patient), test first. 5% validation (not 15%)
# gives training 13% more images; chosen on the external group: docs/benchmarks.md, session 7.
VAL_FRACTION, TEST_FRACTION = 0.05, 0.15


def _option(default, help: str, **cli):
    """A field with its command-line help; `cli` holds extra argparse settings (choices, flag)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    data: str = field(metadata={"help": "dataset: a manifest CSV, or a tree of class folders (plain, or train/ val/ "
                                        "test/ each holding them)"})
    groups: str | None = _option(None, "CSV of image -> group (patient) id, columns path or filename, and group: no "
                                       "split puts one group on two sides (default: Kermany file names, else per image)")
    out: str | None = _option(None, "run directory; default <root>/<project>/<name>")
    project: str = _option("default", "experiment group: runs go to <root>/<project>/")
    name: str | None = _option(None, "experiment name (default <task>-<arch>-<timestamp>)")
    root: str = _option("runs", "folder of all projects")
    task: str | None = _option(None, "on a Kermany tree (NORMAL/ PNEUMONIA/ ...): three (NORMAL/BACTERIA/VIRUS, the "
                                     "default) or binary (NORMAL/PNEUMONIA); any other tree learns its folder names "
                                     "as classes", choices=tuple(TASKS))
    arch: str = _option(DEFAULT_ARCH, "architecture, see `pneumoscope models`")
    pretrained: bool | None = _option(None, "start from pretrained weights (default: only where they ship, "
                                            "efficientnet_lite*); --no-pretrained trains from scratch")
    epochs: int = _option(8, "at most this many epochs (8 at 224 px: 17-25 min on the idle 2-core CPUs measured)")
    # The default recipe (224 px, strong augmentation, EMA 0.998) was chosen on the external group
    # over 192 px / standard: docs/benchmarks.md#recipes-side-by-side.
    img_size: int = _option(224, "input side in pixels")
    batch_size: int = _option(32, "images per step (per process)")
    lr: float = _option(1e-3, "peak learning rate (the schedule starts or peaks there)")
    optimizer: str = _option("adamw", "optimiser (sgd: momentum 0.9, Nesterov)", choices=OPTIMIZERS)
    weight_decay: float = _option(0.01, "weight decay (decoupled for adamw, an L2 term for adam and sgd)")
    schedule: str = _option("onecycle", "learning-rate schedule: onecycle (warm-up to --lr, then down), cosine "
                                        "(down from --lr), step (x0.1 at 1/2 and 3/4 of the epochs), plateau (x0.1 "
                                        "when val balanced accuracy stalls)", choices=SCHEDULES)
    loss: str = _option("ce", "ce: cross-entropy; focal: focal loss, class weights as alpha, no label smoothing",
                        choices=LOSSES)
    focal_gamma: float = _option(2.0, "focal loss focusing parameter (0: weighted cross-entropy)")
    label_smoothing: float = _option(0.1, "cross-entropy label smoothing")
    mixup: float = _option(0.0, "mixup (Zhang et al. 2018): blend image pairs with a Beta(a, a) weight and their "
                                "losses alike; a = this, 0 disables it")
    class_weight_power: float = _option(1.0, "loss weights = inverse class frequency ** this (0: unweighted)")
    aug: float = _option(1.0, "augmentation strength, 0 disables it")
    aug_policy: str = _option("strong", "augmentation policy (strong: acquisition changes such as "
                                          "equalisation, JPEG, shear)", choices=AUG_POLICIES)
    preprocess: str = _option("none", "fixed input step after resizing, in training and in every prediction "
                                      "(clahe: adaptive histogram equalisation)", choices=INPUT_STEPS)
    freeze: str | None = _option(None, "weights kept as they start: none, base (all but the classifier head) or N "
                                       "(the stem and the first N stages); default: the architecture's (2 on "
                                       "efficientnet_lite*, none on the others)")
    head_init: str = _option("random", "classifier head at the start: random (the architecture's own) or zero "
                                       "(every seed then starts from the same weights, so runs can be averaged "
                                       "with `pneumoscope soup`)", choices=HEAD_INITS)
    ema_decay: float = _option(0.998, "decay of the moving average of weights (EMA); 0 disables it")
    # an average that starts at step 0 remembers the random head
    ema_start_epoch: int = _option(1, "average weights from this epoch on")
    # augmented: lower external-group ECE than plain validation for every model measured
    # (docs/benchmarks.md#calibration-under-shift)
    calibration: str = _option("augmented", "the temperature is fitted on the validation images: augmented = seen "
                                            "twice through the strong augmentation (a simulated change of "
                                            "acquisition), val = as they are", choices=CALIBRATIONS)
    patience: int = _option(4, "early stopping: epochs without a better validation balanced accuracy")
    val_fraction: float = _option(VAL_FRACTION, "validation share of the patients (data folders only)")
    test_fraction: float = _option(TEST_FRACTION, "internal test share of the patients (data folders only)")
    seed: int = _option(0, "seed of the split, the initialisation and the augmentation")
    max_images: int | None = _option(None, "cap the pool (whole patients) for quick runs")
    keep_epochs: bool = _option(False, "also keep every epoch's weights (checkpoints/epoch-N.ckpt), for "
                                       "stability studies")
    evaluate_test: bool = _option(True, "evaluate the internal test split at the end (--no-test: do not)",
                                  flag="--test")
    resume: bool = _option(False, "continue the run from its last checkpoint, with its saved configuration")
    cache_dir: str | None = _option(None, "pixel cache folder (default $PNEUMOSCOPE_CACHE or ~/.cache/pneumoscope)")
    # 32 by default: bf16 autocast made no step faster on the AVX512-BF16 EPYC measured
    # (docs/benchmarks.md, "Training under load and in bf16")
    precision: str = _option("32", "arithmetic (Lightning's names): 32, bf16-mixed (autocast to bfloat16; "
                                   "CPUs with AVX512-BF16/AMX, recent GPUs), 16-mixed (CUDA)", choices=PRECISIONS)
    threads: int = _option(0, "CPU threads for training; 0: one per core, one fewer for each core other "
                              "processes keep busy (checked every few steps)")

    def __post_init__(self):
        if self.freeze is not None:  # one spelling: 2 and "2" are the same
            self.freeze = str(parse_freeze(self.freeze))

    @classmethod
    def from_dict(cls, values: dict, source: str = "configuration") -> "TrainConfig":
        """A configuration from plain values (a YAML file, a run's config.yaml), type-checked;
        `source` names the file in the one-line error."""
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(map(str, set(values) - set(known)))  # a YAML key may be a number
        if unknown:
            raise ValueError(f"{source}: unknown option(s) {', '.join(unknown)}")
        coerced = {k: _coerce(k, v, hints[k], source) for k, v in values.items() if k in known}
        for name, value in coerced.items():
            choices = known[name].metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ValueError(f"{source}: {name} must be one of {', '.join(choices)}, not {value!r}")
        try:
            return cls(**coerced)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def to_dict(self) -> dict:
        return asdict(self)


def parse_freeze(value: str | int) -> str | int:
    """A --freeze value: "none", "base", or a number of stages N (a non-negative int)."""
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    if value in ("none", "base"):
        return value
    raise ValueError(f"--freeze {value!r}: choose none, base, or a number of stages (0, 1, 2, ...)")


def _coerce(name: str, value, hint, source: str):
    """YAML reads 1e-3 as a string and 2 as an int where a float is meant: convert like argparse
    would, and refuse what does not fit."""
    base, optional = _base_type(hint)
    if value is None and optional:
        return None
    if not isinstance(value, (str, int, float)):  # bool is an int; str() of a list of aliases can be gigabytes
        raise ValueError(f"{source}: {name} must be {base.__name__}, not a {type(value).__name__}")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        return base(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {name} must be {base.__name__}, not {value!r}") from None


def _base_type(hint) -> tuple[type, bool]:
    """int | None -> (int, True); float -> (float, False)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        return args[0], True
    return hint, False


# ---------------------------------------------------------------- the command line
def add_train_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """Adds `--config FILE` and one option per TrainConfig field (except `exclude`). Defaults are
    left out of the namespace (SUPPRESS), so `config_from_args` can tell what was given."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML file of options (TrainConfig fields; a run's config.yaml works); "
                             "the command line overrides it")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name in exclude:
            continue
        base, _ = _base_type(hints[f.name])
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        required = f.default is MISSING
        help_text = f.metadata["help"] + ("" if required or f.default is None else f" (default: {f.default})")
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=base, choices=f.metadata.get("choices"),
                          metavar=None if "choices" in f.metadata else {int: "N", float: "X"}.get(base, f.name.upper()))
        if required:  # may come from --config instead: checked in config_from_args
            kwargs["help"] += " (required, here or in --config)"
        parser.add_argument(flag, **kwargs)
    parser.set_defaults(train_parser=parser)


def config_from_args(args: argparse.Namespace, **overrides) -> TrainConfig:
    """TrainConfig's defaults < the --config file < the options given on the command line <
    `overrides`. A missing --data or a bad file is a usage error (exit 2) naming the file."""
    parser: argparse.ArgumentParser = args.train_parser
    names = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    values = {}
    if args.config:
        values = _read_yaml(parser, args.config)
        if "out" not in given and given.keys() & {"project", "name", "root"}:
            values.pop("out", None)  # --name on the command line beats the file's run directory
    values.update(given)
    values.update(overrides)
    if "data" not in values and values.get("resume"):
        values["data"] = ""  # the run's own config.yaml names it (train.train)
    if "data" not in values:
        parser.error("the following arguments are required: --data (on the command line or in --config; "
                     "--resume reads it from the run)")
    try:
        return TrainConfig.from_dict(values, source=args.config or "command line")
    except ValueError as err:
        parser.error(str(err))


def _read_yaml(parser: argparse.ArgumentParser, path: str) -> dict:
    import yaml

    try:
        values = yaml.load(Path(path).read_bytes(), Loader=options_loader())  # bytes: yaml checks the encoding
    except OSError as err:
        parser.error(f"{path}: cannot read ({err.strerror})")
    except yaml.YAMLError as err:
        parser.error(f"{path}: not valid YAML ({_yaml_reason(err)})")
    except RecursionError:
        parser.error(f"{path}: nested too deeply for a file of options")
    if not isinstance(values, dict):
        parser.error(f"{path}: expected a mapping of option: value")
    return values


def _yaml_reason(err) -> str:
    """A YAMLError in one line: where and what (its str() quotes the offending lines)."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(err).split())[:300]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


@functools.cache
def options_loader():
    """yaml.SafeLoader (plain data only) that refuses an alias of a list or a mapping. Options are
    single values, and such aliases are how a few hundred bytes of YAML ("billion laughs") become a
    structure whose every walk, str() included, takes gigabytes. Aliases of single values stay."""
    import yaml

    class OptionsLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                if not isinstance(self.anchors.get(event.anchor), (yaml.ScalarNode, type(None))):
                    raise yaml.composer.ComposerError(
                        None, None, f"alias *{event.anchor} repeats a list or mapping; a file of options holds "
                        "single values", event.start_mark)
            return super().compose_node(parent, index)

    return OptionsLoader
