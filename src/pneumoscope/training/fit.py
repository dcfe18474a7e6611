"""Training with Lightning, in the order a run goes: `train` locates the run and opens it, `_fit`
splits the data, loads the train and val images, builds the network, its callbacks and the Trainer,
fits, and `_finish` calibrates the best epoch's weights into the run's bundle, written once and
evaluated from it (runs.finish.save_calibrated); `train` returns what it did (TrainResult).

The run directory's files (runs/rundir.py has the layout) are written through `RunDir` only.
Under torchrun or srun (several processes), only rank 0 writes them; every rank computes the same
seeded split, and validation metrics are gathered over all ranks.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch

from .. import __version__
from ..bundle import ModelMeta
from ..core.config import TrainConfig
from ..core.labels import TASKS
from ..data.datasets import load_pixels, manifest_hash, read_dataset, split_dataset, split_summary
from ..data.transforms import XrayDataset, class_weights, eval_transform, train_transform
from ..nets.registry import count_parameters, create_model, ensure_pretrained, model_spec, trainable_parameters
from ..runs import rundir
from ..runs.finish import TrainResult, git_commit, save_calibrated
from ..runs.rundir import RunDir
from .callbacks import RunCheckpoint, run_callbacks
from .environment import check_precision, environment, is_main_process, trainer_devices, world_size
from .module import LitClassifier, Loaders, init_head

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the run
def train(config: TrainConfig) -> TrainResult:
    """Trains one model into its run directory and returns the result. With `resume`, a run whose
    directory already holds a configuration continues from its last checkpoint with that saved
    configuration (the given one only locates the run, so it needs no data), as
    `pneumoscope train --resume` does. The classes are the dataset's (data.read_dataset)."""
    started = time.perf_counter()
    config, resumed = _located(config)
    config = with_defaults(config)
    dataset = read_dataset(config.data, config.task, config.groups)  # a bad --data: one line, no run directory
    config = with_dataset_task(config, dataset)
    run = RunDir(rundir.resolve(config, world_size()))
    if resumed:
        log.info("resuming %s with its saved configuration", run.path)
    config = replace(config, out=str(run.path))
    L.seed_everything(config.seed, workers=True, verbose=False)
    main = is_main_process()
    if main:
        _open(run, config)
    try:
        result = _fit(config, run, dataset, started)
    except KeyboardInterrupt:
        if main:
            run.write_status("interrupted")
        raise
    except BaseException as err:
        if main:
            run.write_status("failed", error=f"{type(err).__name__}: {err}")
        raise
    return replace(result, config=config, resumed=resumed)


def _located(config: TrainConfig) -> tuple[TrainConfig, bool]:
    """With `resume`, the saved configuration of the run that `config` locates (the folder given is
    the run: a copied run resumes as itself), and True; else `config` itself, which must name data."""
    located = rundir.resolve(config, world_size())
    saved = RunDir(located).config() if config.resume else None
    if saved is not None:
        return replace(saved, resume=True, out=str(located)), True
    if not config.data:
        raise FileNotFoundError(f"{located}: no run to resume there (no config.yaml); give --data to start one")
    return config, False


def _open(run: RunDir, config: TrainConfig) -> None:
    """The run directory with its configuration and a `running` status (rank 0 only)."""
    for path in run.remove_stale_temporaries():  # before this run writes any of its own
        log.info("removed %s, left half-written by an earlier process", path)
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_config(config)
    run.write_status("running", fresh=not config.resume, error=None, world_size=world_size())


def _fit(config: TrainConfig, run: RunDir, dataset, started: float) -> TrainResult:
    """The run's steps. Their order is that of the random draws after the seed (the split, then the
    network's initial weights); each epoch then draws from the seed and the epoch alone."""
    check_precision(config.precision)
    samples = _split(config, run, dataset)
    train_set = _images(config, samples, "train", dataset)
    val_set = _images(config, samples, "val", dataset)
    weights = _class_weights(config, train_set, len(dataset.classes))
    model = _network(config, len(dataset.classes))
    best, callbacks = run_callbacks(config, run, len(train_set), manifest_hash(samples))
    resume_from, resumed_epoch = _resume_point(config, run)
    first_epoch = 0 if resumed_epoch is None else resumed_epoch + 1
    module = LitClassifier(model, dataset.classes, config, weights, first_epoch)
    trainer = _trainer(config, run, callbacks, len(train_set))
    _run_epochs(trainer, module, Loaders(train_set, val_set, config.batch_size), resume_from)
    if not trainer.is_global_zero:
        return TrainResult(run.path, None)
    return _finish(config, run, dataset, samples, best, model, val_set, started, _stopped_early_at(trainer))


def _split(config: TrainConfig, run: RunDir, dataset) -> list:
    """The run's samples with their splits (`prepare_split`), written to its manifest and said."""
    samples, summary = prepare_split(config, dataset)
    if is_main_process():
        run.write_manifest(samples)
        for line in summary:
            log.info("%s", line)
    return samples


def _images(config: TrainConfig, samples, split: str, dataset) -> XrayDataset:
    """One split's images at the run's size (read once; cached in --cache-dir when given), through
    the training augmentation for `train`, the evaluation transform otherwise."""
    chosen = [s for s in samples if s.split == split]
    if not chosen:
        raise ValueError(f"the {split} split is empty; give more data or other fractions")
    pixels, kept, _ = load_pixels(chosen, config.img_size, Path(config.cache_dir) if config.cache_dir else None)
    transform = (train_transform(config.img_size, config.aug, config.aug_policy, config.preprocess)
                 if split == "train" else eval_transform(config.preprocess))
    return XrayDataset(pixels, kept, dataset.classes, dataset.task, transform)


def _class_weights(config: TrainConfig, train_set: XrayDataset, n_classes: int) -> torch.Tensor:
    """The loss's class weights: inverse class frequency to --class-weight-power, averaging 1."""
    weights = class_weights(train_set.targets, n_classes) ** config.class_weight_power
    return weights / weights.mean()


def _network(config: TrainConfig, n_classes: int):
    """The architecture with its (pretrained) weights, channels-last, its head initialised by --head-init."""
    model = create_model(config.arch, n_classes, config.pretrained).to(memory_format=torch.channels_last)
    init_head(model, config.head_init)
    return model


def _resume_point(config: TrainConfig, run: RunDir) -> tuple[Path | None, int | None]:
    """With `resume`, the run's last checkpoint and its epoch; (None, None) for a fresh start."""
    if not config.resume:
        return None, None
    if not run.last_checkpoint.exists():
        log.warning("--resume: no %s yet; starting from the beginning", run.last_checkpoint)
        return None, None
    return run.last_checkpoint, rundir.checkpoint_epoch(run.last_checkpoint)


def _trainer(config: TrainConfig, run: RunDir, callbacks: list, n_train: int) -> L.Trainer:
    trainer = L.Trainer(max_epochs=config.epochs, **trainer_devices(), precision=config.precision,
                        callbacks=callbacks, default_root_dir=run.path, logger=loggers(run.path) or False,
                        deterministic=False, log_every_n_steps=log_interval(n_train, config.batch_size),
                        num_sanity_val_steps=0, enable_model_summary=False)
    for logger in trainer.loggers:  # the configuration, so MLflow/TensorBoard can filter runs by it
        logger.log_hyperparams(config.to_dict())
    return trainer


def _run_epochs(trainer: L.Trainer, module: LitClassifier, loaders: Loaders, resume_from: Path | None) -> None:
    with warnings.catch_warnings():
        # a note about Lightning itself, not the run: torch deprecating a pytree class it builds
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        if resume_from:  # of course it holds checkpoints: the one resumed from
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        trainer.fit(module, datamodule=loaders, ckpt_path=resume_from, weights_only=True)


def _stopped_early_at(trainer: L.Trainer) -> int | None:
    stopper = trainer.early_stopping_callback
    return stopper.stopped_epoch if stopper and stopper.stopped_epoch else None


def _finish(config: TrainConfig, run: RunDir, dataset, samples, best: RunCheckpoint, model, val_set: XrayDataset,
            started: float, stopped_early_at: int | None) -> TrainResult:
    """Best weights -> the meta that names them -> `save_calibrated` -> env and status."""
    state, best_epoch = rundir.checkpoint_weights(best.best_model_path)
    kept = f"kept epoch {best_epoch} (val balanced accuracy {float(best.best_model_score):.3f})"
    log.info("%s", f"stopped early at epoch {stopped_early_at}, {kept}" if stopped_early_at is not None else kept)
    model.load_state_dict(state)
    model.eval()
    meta = _meta(config, run, dataset, samples, model, best_epoch)
    metrics = save_calibrated(model, meta, run, samples, val_set.pixels.numpy(), val_set.targets.numpy(),
                              evaluate_test=config.evaluate_test, calibration=config.calibration)
    wall = time.perf_counter() - started
    run.write_env(environment(config, wall))
    run.write_status("finished", wall_seconds=round(wall, 1),
                     best_val_bacc=None if best.best_model_score is None else float(best.best_model_score))
    return TrainResult(run.path, run.bundle, metrics, best_epoch=best_epoch)


def _meta(config: TrainConfig, run: RunDir, dataset, samples, model, best_epoch: int | None) -> ModelMeta:
    """The bundle's meta before calibration: what the network is and how the run made it."""
    spec = model_spec(config.arch)
    return ModelMeta(
        name=rundir.model_name(run.path, config.project), task=dataset.task, classes=tuple(dataset.classes),
        arch=config.arch, img_size=config.img_size, mean=spec.mean, std=spec.std, params=count_parameters(model),
        preprocess=config.preprocess,
        provenance={"pneumoscope": __version__, "git_commit": git_commit(), "seed": config.seed,
                    "trainable_params": trainable_parameters(model),
                    "manifest_hash": manifest_hash(samples), "best_epoch": best_epoch, "train_config": config.to_dict(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


# ---------------------------------------------------------------- the configuration and the data
def with_defaults(config: TrainConfig) -> TrainConfig:
    """The architecture's defaults made explicit, so that config.yaml says what ran. Also fails fast,
    before any data is read: an unknown architecture, an image size it cannot take, or --pretrained
    weights that are neither cached nor fetchable (models.ensure_pretrained downloads them when the
    hub answers)."""
    spec = model_spec(config.arch)
    if config.img_size < spec.min_size:
        raise ValueError(f"--img-size {config.img_size}: {config.arch} needs at least {spec.min_size} px")
    ensure_pretrained(config.arch, config.pretrained)
    return replace(config, freeze=config.freeze or spec.freeze)


def with_dataset_task(config: TrainConfig, dataset) -> TrainConfig:
    """A Kermany dataset's task made explicit (three unless --task says binary); any other dataset
    keeps task unset: its classes are its folder names (data.read_dataset)."""
    return replace(config, task=config.task or (dataset.task if dataset.task in TASKS else None))


def prepare_split(config: TrainConfig, dataset=None):
    """The run's samples with train/val/test assigned (data.split_dataset: a manifest as given,
    cross-validation folds are manifests too; a tree by its own val/ test/ folders or cut by
    patient), and the lines that say how, for the console."""
    dataset = dataset or read_dataset(config.data, config.task, config.groups)
    if len(dataset.classes) < 2:
        raise ValueError(f"{dataset.source}: one class ({dataset.classes[0]}); a model needs at least 2 class folders")
    samples, notes = split_dataset(dataset, config.val_fraction, config.test_fraction, config.seed)
    if config.max_images:
        samples = subsample_by_patient(samples, config.max_images, config.seed)
        notes.append(f"capped at about {config.max_images} images (--max-images), whole patients")
    return samples, [*split_summary(samples, dataset.classes, dataset.task, dataset.grouping), *notes]


def subsample_by_patient(samples, max_images: int, seed: int):
    """Keeps whole patients, picked at random, until about `max_images` images (for quick runs)."""
    rng = np.random.default_rng(seed)
    patients = sorted({s.patient_id for s in samples})
    rng.shuffle(patients)
    by_patient: dict[str, list] = {}
    for s in samples:
        by_patient.setdefault(s.patient_id, []).append(s)
    kept = []
    for patient in patients:
        if len(kept) >= max_images:
            break
        kept += by_patient[patient]
    return sorted(kept, key=lambda s: s.path)


# ---------------------------------------------------------------- what Lightning reports to
def log_interval(n_train: int, batch_size: int) -> int:
    """Every 10 steps, or once per epoch when an epoch has fewer (Lightning warns otherwise)."""
    return max(1, min(10, n_train // world_size() // batch_size))


def loggers(run_dir: Path) -> list:
    """Lightning's standard loggers that are installed: TensorBoard and MLflow (optional: neither is
    a dependency). With neither, the Trainer gets none: the run's epoch table is its own metrics.csv
    (callbacks.EpochTable), which `runs`, `compare` and the curves read. Loggers write on rank 0 only."""
    found = []
    try:
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger

        found.append(TensorBoardLogger(run_dir, name="logs", version="tensorboard"))
    except ImportError:
        pass
    try:
        import mlflow  # noqa: F401
        from lightning.pytorch.loggers import MLFlowLogger

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the run's own file store: self-contained, no server or database
            uri = (run_dir / "mlruns").resolve().as_uri()
            # MLflow 3 raises on file stores ("maintenance mode") unless this opts in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        found.append(MLFlowLogger(experiment_name=run_dir.resolve().parent.name, run_name=run_dir.name,
                                  tracking_uri=uri))
    except ImportError:
        pass
    return found
