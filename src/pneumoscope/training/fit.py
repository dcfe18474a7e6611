"""Training with Lightning: a run flows one way, fit -> calibrate in memory -> write the bundle
once -> evaluate from it, and `train` returns what it did (TrainResult).

The run directory's files (rundir.py has the layout) are written through `rundir.RunDir` only.
Under torchrun or srun (several processes), only rank 0 writes them; every rank computes the same
seeded split, and validation metrics are gathered over all ranks.
"""
from __future__ import annotations

import csv
import logging
import os
import platform
import resource
import subprocess
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback, EarlyStopping, EMAWeightAveraging, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from .. import __version__
from ..core.config import CALIBRATIONS, TrainConfig
from ..core.cpu_share import CpuShare
from ..core.files import atomic_write
from ..core.labels import TASKS
from ..data.datasets import load_pixels, manifest_hash, read_dataset, split_dataset, split_summary
from ..data.transforms import XrayDataset, class_weights, eval_transform, train_transform
from ..nets.build import load_network
from ..nets.registry import (
    XrayNet,
    count_parameters,
    create_model,
    ensure_pretrained,
    freeze_model,
    model_spec,
    trainable_parameters,
)
from ..runs import rundir
from ..runs.rundir import RunDir
from ..runtime.backends import cpu_threads
from ..runtime.export import save_with_graph

log = logging.getLogger(__name__)


def _quiet_lightning() -> None:
    """Lightning's console, once per message and without adverts: `lightning` adds its own console
    handler and propagates to the application's too (every line twice under the CLI), sets INFO on
    its loggers whatever the application asked, and logs tips for its cloud services. Its records
    now go through the application's logging alone, at the application's level (-v shows them)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not record.getMessage().startswith("💡 Tip"))


_quiet_lightning()
MONITOR = "val_bacc"  # the validation metric that picks the best checkpoint, stops early and drives `plateau`


@dataclass
class TrainResult:
    """What a training run did: where it is, its model bundle and the headline metrics of each
    evaluated split ("val", "internal_test"; metrics.headline). On ranks other than 0 of a
    multi-process run, `bundle` is None and `metrics` empty: rank 0 finishes alone."""

    run_dir: Path
    bundle: Path | None
    metrics: dict = field(default_factory=dict)
    config: TrainConfig | None = None  # what ran: with --resume, the run's saved configuration
    resumed: bool = False
    best_epoch: int | None = None


def save_calibrated(model, meta, run: RunDir, samples, val_pixels, val_targets, evaluate_test: bool = True,
                    calibration: str = "augmented") -> dict:
    """Temperature from the val pixels (`calibration_temperature`) -> the bundle, written once -> val
    (and internal test) reports from that bundle, through the Classifier users load, on the fp32
    reference (ONNX Runtime: the same figures on every CPU). Returns the headlines {"val", "internal_test"}."""
    from ..bundle import write_metrics
    from ..evaluation.metrics import headline
    from ..evaluation.report import evaluate_samples
    from ..runtime.classifier import Classifier

    temperature = calibration_temperature(Classifier.from_model(model, meta.replace(temperature=1.0), backend="torch"),
                                          val_pixels, val_targets, calibration)
    source = meta.provenance.get("train_config", {}).get("data")
    save_with_graph(model, meta.replace(temperature=temperature, provenance={
        **meta.provenance, "calibration": calibration, "data": rundir.data_facts(samples, source)}), run.bundle)
    classifier = Classifier.load(run.bundle, backend="onnx")
    metrics = {}
    for split, name in (("val", "val"), ("test", "internal_test")):
        chosen = [s for s in samples if s.split == split]
        if chosen and (split == "val" or evaluate_test):
            metrics[name] = headline(evaluate_samples(classifier, chosen, run.report_dir(split), plots=split == "test"))
    write_metrics(run.bundle, {**metrics, "backend": classifier.backend})  # what the web page and card show of it
    return metrics


def calibration_temperature(classifier, val_pixels: np.ndarray, val_targets, method: str = "augmented") -> float:
    """Temperature scaling (metrics.fit_temperature) on the validation logits as they are (`val`), or
    on those of the validation images seen twice through the strong augmentation (`augmented`): a
    simulated change of acquisition, which lowered the ECE on the external group for every model
    measured (docs/benchmarks.md#calibration-under-shift). `classifier` scores at temperature 1."""
    from ..data.transforms import augmented_views
    from ..evaluation.metrics import fit_temperature

    if method not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {method!r}; choose from {', '.join(CALIBRATIONS)}")
    targets = np.asarray(val_targets)
    if method == "val":
        return fit_temperature(classifier.score_pixels(val_pixels).logits, targets)
    views = augmented_views(val_pixels, classifier.meta.img_size, passes=2)
    return fit_temperature(classifier.score_pixels(views).logits, np.tile(targets, 2))


def validation_pixels(samples, meta) -> tuple[np.ndarray, np.ndarray]:
    """The readable validation images of a manifest at the model's input size, and their class
    indices for the model's task: what a temperature is fitted on."""
    from ..data.datasets import class_indices, load_pixels

    pixels, val, _ = load_pixels([s for s in samples if s.split == "val"], meta.img_size)
    return pixels, class_indices(val, meta.classes, meta.task)


def recalibrate(run_dir, calibration: str = "augmented") -> TrainResult:
    """A finished run's temperature fitted again (`calibration_temperature`), its bundle and its val
    and internal test reports rewritten; the weights are untouched."""
    from ..bundle import load_bundle

    run = RunDir(run_dir)
    bundle = load_bundle(run.finished_model())
    meta, samples = bundle.meta, run.samples()
    pixels, targets = validation_pixels(samples, meta)
    if not len(targets):
        raise ValueError(f"{run.path}: no readable validation image to fit a temperature on")
    evaluate_test = meta.provenance.get("train_config", {}).get("evaluate_test", True)
    metrics = save_calibrated(load_network(bundle).eval(), meta, run, samples, pixels, targets, evaluate_test,
                              calibration)
    return TrainResult(run.path, run.bundle, metrics)


# ---------------------------------------------------------------- Lightning module
class LitClassifier(L.LightningModule):
    def __init__(self, model: XrayNet, classes: tuple[str, ...], config: TrainConfig, weights: torch.Tensor,
                 first_epoch: int = 0):
        super().__init__()
        self.model, self.classes, self.config = model, classes, config
        self.first_epoch = first_epoch  # the epoch this process trains first: after the one it resumes from
        self.loss = make_loss(config, weights)
        n = len(classes)
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(n, average="micro")
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(n, average="micro")
        self.val_bacc = torchmetrics.classification.MulticlassAccuracy(n, average="macro")
        # metric objects, not tensors: their states are summed over all ranks before compute()
        self.val_loss = torchmetrics.MeanMetric()
        self.val_n = torchmetrics.SumMetric()
        self.frozen = freeze_model(model, config.freeze)
        log.info("freeze %s: %s of %s parameters trainable", config.freeze, f"{trainable_parameters(model):,}",
                 f"{count_parameters(model):,}")

    def forward(self, x):
        return self.model(x.contiguous(memory_format=torch.channels_last))

    # Each epoch draws its shuffle, augmentation and dropout from (seed, epoch) alone, so a run
    # resumed after epoch k trains epoch k+1 exactly as the uninterrupted run would (a restart
    # seeds once, from the seed, and would replay epoch 0's draws). Seeded before Lightning builds
    # the epoch's iterator, which takes the shuffle and prefetches a batch: the first epoch of the
    # process at fit start (when Lightning has not yet restored its epoch count), the others at the
    # end of the epoch before.
    def on_fit_start(self):
        self._seed_epoch(self.first_epoch)

    def on_train_epoch_end(self):
        self._seed_epoch(self.current_epoch + 1)

    def _seed_epoch(self, epoch: int) -> None:
        L.seed_everything(int(np.random.SeedSequence([self.config.seed, epoch]).generate_state(1)[0]),
                          workers=True, verbose=False)

    def training_step(self, batch, _):
        for module in self.frozen:  # Lightning puts everything in train mode; frozen BN stays in eval
            module.eval()
        x, y = batch
        if self.config.mixup > 0:
            loss, logits = self._mixup_step(x, y)
        else:
            logits = self(x)
            loss = self.loss(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _mixup_step(self, x, y):
        """Mixup: each image blended with another of the batch by lam ~ Beta(a, a), the loss blended
        the same way (so class weights and label smoothing still apply to each target)."""
        lam = float(np.random.beta(self.config.mixup, self.config.mixup))
        partner = torch.randperm(len(y), device=y.device)
        logits = self(lam * x + (1 - lam) * x[partner])
        return lam * self.loss(logits, y) + (1 - lam) * self.loss(logits, y[partner]), logits

    def validation_step(self, batch, _):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.val_bacc(logits, y)
        self.val_loss(self.loss(logits, y), weight=len(y))
        self.val_n(len(y))
        self.log("val_loss", self.val_loss, on_epoch=True, prog_bar=True)
        self.log("val_acc", self.val_acc, on_epoch=True, prog_bar=True)
        self.log("val_bacc", self.val_bacc, on_epoch=True, prog_bar=True)
        self.log("val_n", self.val_n, on_epoch=True)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = make_optimizer(self.config, params)
        schedule = make_schedule(self.config, optimizer, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    optimizer = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[config.optimizer]
    return optimizer(params, lr=config.lr, weight_decay=config.weight_decay)


def make_schedule(config: TrainConfig, optimizer, total_steps: int) -> dict:
    """The learning-rate schedule, as Lightning's lr_scheduler configuration: onecycle and cosine
    move every step, step and plateau once per epoch."""
    schedules = torch.optim.lr_scheduler
    if config.schedule == "onecycle":
        schedule = schedules.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=0.15,
                                        div_factor=20, final_div_factor=100)
        return {"scheduler": schedule, "interval": "step"}
    if config.schedule == "cosine":
        return {"scheduler": schedules.CosineAnnealingLR(optimizer, T_max=total_steps), "interval": "step"}
    if config.schedule == "step":
        milestones = sorted({config.epochs // 2, config.epochs * 3 // 4} - {0})
        return {"scheduler": schedules.MultiStepLR(optimizer, milestones, gamma=0.1), "interval": "epoch"}
    # plateau: cut the rate halfway to early stopping, so the run still has epochs to use it
    schedule = schedules.ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=max(0, config.patience // 2 - 1))
    return {"scheduler": schedule, "interval": "epoch", "monitor": MONITOR}


def make_loss(config: TrainConfig, weights: torch.Tensor) -> nn.Module:
    if config.loss == "focal":
        return FocalLoss(weights, config.focal_gamma)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)


class FocalLoss(nn.Module):
    """Softmax focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true) ** gamma, so that
    images the model already gets right count less; the class weights are alpha. Averaged as
    nn.CrossEntropyLoss averages a weighted loss (over the summed weights of the targets), so
    gamma=0 is exactly the weighted cross-entropy. torchvision's sigmoid_focal_loss is binary only."""

    def __init__(self, weight: torch.Tensor, gamma: float = 2.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        alpha = self.weight[target]
        return (-alpha * (1 - log_p.exp()) ** self.gamma * log_p).sum() / alpha.sum()


def init_head(model: XrayNet, how: str) -> None:
    """`zero`: the last classifier layer starts at zero (as BiT fine-tunes), so that with a pretrained
    body every seed starts from identical weights and differs only in its draws of data and
    augmentation: the setting in which fine-tuned runs average well in weight space (model soups,
    Wortsman et al. 2022). `random`: as the architecture made it."""
    if how == "zero":
        for parameter in model.backbone.get_classifier().parameters():
            nn.init.zeros_(parameter)


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


# ---------------------------------------------------------------- threads and precision
class ThreadsForLoad(Callback):
    """One PyTorch thread per core that other processes leave free, checked every `every` steps
    (cpu_share.py says why: a thread team larger than the free cores waits at every barrier)."""

    def __init__(self, cores: int, every: int = 8):
        self.share, self.every = CpuShare(cores), every

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % self.every:
            return
        wanted = self.share.threads()
        if wanted and wanted != torch.get_num_threads():
            log.info("other processes keep %d of %d cores busy: training on %d thread(s)",
                     self.share.cores - wanted, self.share.cores, wanted)
            torch.set_num_threads(wanted)


def thread_callbacks(config: TrainConfig) -> list[Callback]:
    """A fixed thread count when --threads N is given (or several processes share the machine by
    design, under torchrun/srun); otherwise ThreadsForLoad on the cores this process may use."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
        return []
    if world_size() > 1 or torch.cuda.is_available():
        return []
    cores = cpu_threads()
    torch.set_num_threads(cores)
    return [ThreadsForLoad(cores)]


def check_precision(precision: str) -> None:
    """16-mixed is float16 autocast, which Lightning runs on CUDA only: say so before training."""
    if precision == "16-mixed" and not torch.cuda.is_available():
        raise ValueError("--precision 16-mixed needs a CUDA GPU; on a CPU use bf16-mixed or 32")


# ---------------------------------------------------------------- run bookkeeping callbacks
class EpochTable(Callback):
    """Records every epoch (metrics.csv, curves.png) through the run directory, on rank 0."""

    def __init__(self, run: RunDir, n_train: int):
        self.run, self.n_train = run, n_train

    def on_train_epoch_start(self, trainer, pl_module):
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        seconds = time.perf_counter() - self.started
        self.run.write_epoch({
            "epoch": trainer.current_epoch,
            "train_loss": metrics.get("train_loss_epoch", metrics.get("train_loss")),
            "train_acc": metrics.get("train_acc"),
            "val_loss": metrics.get("val_loss"), "val_acc": metrics.get("val_acc"),
            "val_bacc": metrics.get("val_bacc"),
            "val_n": int(metrics["val_n"]) if "val_n" in metrics else None,  # summed over ranks
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "seconds": round(seconds, 2),
            "images_per_s": round(self.n_train / max(seconds, 1e-9), 1),
        })


def git_commit() -> str | None:
    """The source's commit; $PNEUMOSCOPE_GIT_COMMIT names it where there is no .git (an exported
    snapshot of the tree, a container image)."""
    if os.environ.get("PNEUMOSCOPE_GIT_COMMIT"):
        return os.environ["PNEUMOSCOPE_GIT_COMMIT"]
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(config: TrainConfig, wall_seconds: float) -> dict:
    import lightning
    import timm
    import torchvision

    return {
        "pneumoscope": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "timm": timm.__version__, "lightning": lightning.__version__,
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "precision": config.precision, "seed": config.seed, "git_commit": git_commit(), "wall_seconds": round(wall_seconds, 1),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # process RAM
        "cuda_peak_memory_mb": cuda_peak_memory_mb(),
        "world_size": world_size(),  # peak memory and wall time above are rank 0's
    }


def cuda_peak_memory_mb() -> float | None:
    """The most GPU memory PyTorch held at once in this process (torch.cuda.max_memory_allocated,
    this rank's device); None when the run did not use CUDA."""
    if not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


# ---------------------------------------------------------------- one process or many
def is_main_process() -> bool:
    """Rank 0, or the only process. Lightning reads the rank from torchrun/SLURM's environment at
    import, so this holds before the Trainer (and its process group) exists."""
    return rank_zero_only.rank == 0


def world_size() -> int:
    """How many processes torchrun (WORLD_SIZE) or srun (SLURM_NTASKS) started for this run."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return int(os.environ["SLURM_NTASKS"]) if SLURMEnvironment.detect() else 1


def trainer_devices() -> dict:
    """Trainer arguments for the processes that were launched. Lightning takes ranks and addresses
    from the torchrun/SLURM environment itself, but checks them against devices x num_nodes, and
    on CPU devices="auto" means 1: so several processes need the per-node count spelled out.
    DDP then uses gloo on CPU and NCCL on GPUs. One process trains on one device (a GPU when
    there is one): Lightning's own re-launching for several GPUs would re-run the command without
    the launcher's job id that names the run, so several devices always go through a launcher."""
    world = world_size()
    if world <= 1:
        return {"accelerator": "auto", "devices": 1}
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or world // int(os.environ.get("SLURM_NNODES", 1)))
    return {"accelerator": "auto", "devices": per_node, "num_nodes": world // per_node, "strategy": "ddp"}


class SameSplitOnAllRanks(Callback):
    """Stops every rank (not just the odd one, which would leave the others waiting) when the
    ranks computed different splits: each rank splits on its own, from the same seed."""

    def __init__(self, digest: str):
        self.digest = digest

    def setup(self, trainer, pl_module, stage):
        same = trainer.strategy.broadcast(self.digest, src=0) == self.digest
        if not trainer.strategy.reduce_boolean_decision(same, all=True):
            raise RuntimeError("the ranks computed different train/val splits; is the data the same everywhere?")


# ---------------------------------------------------------------- the run
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


def train(config: TrainConfig) -> TrainResult:
    """Trains one model into its run directory and returns the result. With `resume`, a run whose
    directory already holds a configuration continues from its last checkpoint with that saved
    configuration (the given one only locates the run, so it needs no data), as
    `pneumoscope train --resume` does. The classes are the dataset's (data.read_dataset)."""
    started = time.perf_counter()
    located = rundir.resolve(config)
    saved = RunDir(located).config() if config.resume else None
    if saved is not None:  # the folder given is the run (a copied run resumes as itself)
        config = replace(saved, resume=True, out=str(located))
    elif not config.data:
        raise FileNotFoundError(f"{located}: no run to resume there (no config.yaml); give --data to start one")
    config = with_defaults(config)
    dataset = read_dataset(config.data, config.task, config.groups)  # a bad --data: one line, no run directory
    config = with_dataset_task(config, dataset)
    run = RunDir(rundir.resolve(config))
    if saved is not None:
        log.info("resuming %s with its saved configuration", run.path)
    config = replace(config, out=str(run.path))
    L.seed_everything(config.seed, workers=True, verbose=False)
    main = is_main_process()
    if main:
        for path in run.remove_stale_temporaries():  # before this run writes any of its own
            log.info("removed %s, left half-written by an earlier process", path)
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_config(config)
        run.write_status("running", fresh=not config.resume, error=None, world_size=world_size())
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
    return replace(result, config=config, resumed=saved is not None)


def _fit(config: TrainConfig, run: RunDir, dataset, started: float) -> TrainResult:
    check_precision(config.precision)
    samples, summary = prepare_split(config, dataset)
    classes = dataset.classes
    if is_main_process():
        run.write_manifest(samples)
        for line in summary:
            log.info("%s", line)
    cache = Path(config.cache_dir) if config.cache_dir else None
    datasets = {}
    for split in ("train", "val"):
        chosen = [s for s in samples if s.split == split]
        if not chosen:
            raise ValueError(f"the {split} split is empty; give more data or other fractions")
        pixels, kept, _ = load_pixels(chosen, config.img_size, cache)
        transform = (train_transform(config.img_size, config.aug, config.aug_policy, config.preprocess)
                     if split == "train" else eval_transform(config.preprocess))
        datasets[split] = XrayDataset(pixels, kept, classes, dataset.task, transform)
    train_set, val_set = datasets["train"], datasets["val"]
    weights = class_weights(train_set.targets, len(classes)) ** config.class_weight_power
    weights = weights / weights.mean()
    model = create_model(config.arch, len(classes), config.pretrained).to(memory_format=torch.channels_last)
    init_head(model, config.head_init)

    best = RunCheckpoint(run.checkpoints, filename="best", monitor=MONITOR, mode="max", enable_version_counter=False)
    # Lightning 2.6 writes save_last only when the best improves, so "last" is its own every-epoch
    # checkpoint: --resume must never lose an epoch.
    last = RunCheckpoint(run.checkpoints, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
                         enable_version_counter=False)
    callbacks = [best, last, EpochTable(run, len(train_set)), TQDMProgressBar(refresh_rate=10),
                 EarlyStopping(MONITOR, mode="max", patience=config.patience),
                 SameSplitOnAllRanks(manifest_hash(samples)), *thread_callbacks(config)]
    if config.keep_epochs:  # full checkpoints: with weights only, Lightning skips the hook that stores the EMA
        callbacks.append(EveryEpochCheckpoint(run.checkpoints, filename="epoch-{epoch}", monitor=None, save_top_k=-1,
                                              every_n_epochs=1, auto_insert_metric_name=False,
                                              enable_version_counter=False))
    if config.ema_decay > 0:
        # the step-based condition is the one Lightning checks every batch (the epoch-based one alone
        # would still update from step 0)
        steps_per_epoch = max(1, len(train_set) // world_size() // config.batch_size)
        callbacks.append(EMAWeightAveraging(decay=config.ema_decay,
                                            update_starting_at_step=config.ema_start_epoch * steps_per_epoch))
    resume_from = run.last_checkpoint if config.resume and run.last_checkpoint.exists() else None
    if config.resume and resume_from is None:
        log.warning("--resume: no %s yet; starting from the beginning", run.last_checkpoint)
    resumed_epoch = rundir.checkpoint_epoch(resume_from) if resume_from else None
    first_epoch = 0 if resumed_epoch is None else resumed_epoch + 1
    module = LitClassifier(model, classes, config, weights, first_epoch)
    trainer = L.Trainer(max_epochs=config.epochs, **trainer_devices(), precision=config.precision,
                        callbacks=callbacks, default_root_dir=run.path, logger=_loggers(run.path, resumed_epoch),
                        deterministic=False, log_every_n_steps=log_interval(len(train_set), config.batch_size),
                        num_sanity_val_steps=0, enable_model_summary=False)
    for logger in trainer.loggers:  # the configuration, so MLflow/TensorBoard can filter runs by it
        logger.log_hyperparams(config.to_dict())
    with warnings.catch_warnings():
        # a note about Lightning itself, not the run: torch deprecating a pytree class it builds
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        if resume_from:  # of course it holds checkpoints: the one resumed from
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        trainer.fit(module, datamodule=_Loaders(train_set, val_set, config.batch_size), ckpt_path=resume_from,
                    weights_only=True)
    if not trainer.is_global_zero:
        return TrainResult(run.path, None)
    stopper = trainer.early_stopping_callback
    return _finish(config, run, dataset.task, classes, samples, best, model, val_set, started,
                   stopped_early_at=stopper.stopped_epoch if stopper and stopper.stopped_epoch else None)


def log_interval(n_train: int, batch_size: int) -> int:
    """Every 10 steps, or once per epoch when an epoch has fewer (Lightning warns otherwise)."""
    return max(1, min(10, n_train // world_size() // batch_size))


class RunCheckpoint(ModelCheckpoint):
    """A checkpoint callback for a run directory that may have been copied or moved since its
    checkpoints were written: the paths they saved (the best so far, with its score) are read
    relative to this run's checkpoints/, so a copy resumes as the original would and never reads
    or writes the original. (Lightning, seeing another folder, forgets the best score, so the next
    epoch becomes "best" whatever it scores, and keeps best_model_path pointing at the original.)"""

    def load_state_dict(self, state_dict: dict) -> None:
        saved_dir = state_dict.get("dirpath")
        if saved_dir and saved_dir != self.dirpath:
            state_dict = _relocated(state_dict, saved_dir, self.dirpath)
        super().load_state_dict(state_dict)

    @property
    def state_key(self) -> str:
        """ModelCheckpoint's key (Lightning puts the class name in it), so that the checkpoints of
        runs made before this class still restore into it."""
        return "ModelCheckpoint" + super().state_key.removeprefix(type(self).__qualname__)


def _relocated(state: dict, old_dir: str, new_dir: str) -> dict:
    """A ModelCheckpoint state with its paths under `old_dir` moved to the same places under `new_dir`."""
    def move(path: str) -> str:
        if not path or not Path(path).is_relative_to(old_dir):
            return path
        return str(Path(new_dir) / Path(path).relative_to(old_dir))

    keys = ("best_model_path", "kth_best_model_path", "last_model_path")
    paths = {key: move(state[key]) for key in keys if key in state}
    best_k = {move(path): score for path, score in state.get("best_k_models", {}).items()}
    return {**state, **paths, "best_k_models": best_k, "dirpath": new_dir}


class EveryEpochCheckpoint(RunCheckpoint):
    """Keeps every epoch. Its own state key: Lightning refuses two checkpoint callbacks whose
    settings (monitor, frequency) look alike, as this one and "last" do. No folder in the key:
    a moved or copied run's checkpoints must still restore into it (as RunCheckpoint's do)."""

    @property
    def state_key(self) -> str:
        return self._generate_state_key(kept="every epoch")


class _Loaders(L.LightningDataModule):
    """The run's data loaders. Validation with several processes gets an unpadded distributed
    sampler: Lightning's default DistributedSampler repeats samples to even out the ranks, which
    would count some val images twice."""

    def __init__(self, train_set: XrayDataset, val_set: XrayDataset, batch_size: int):
        super().__init__()
        self.train_set, self.val_set, self.batch_size = train_set, val_set, batch_size

    def train_dataloader(self):
        # drop a ragged last batch, unless that would leave a rank (its share of the set) no batch
        drop_last = len(self.train_set) // self.trainer.world_size > self.batch_size
        # The shuffle draws from the global generator, which the module seeds for each epoch; the
        # loader's own seed draw for each new iterator goes to a private generator so that it
        # cannot shift the shuffle (Lightning builds the first iterator before fit starts).
        return DataLoader(self.train_set, self.batch_size, sampler=RandomSampler(self.train_set),
                          generator=torch.Generator(), num_workers=0, drop_last=drop_last)

    def val_dataloader(self):
        sampler = None
        if self.trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(self.val_set, num_replicas=self.trainer.world_size,
                                                   rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(self.val_set, self.batch_size, sampler=sampler, num_workers=0)


def _loggers(run_dir: Path, resumed_epoch: int | None = None) -> list:
    """Lightning's standard loggers: CSV always (whole-file atomic writes, continuing its file when
    the run resumes from a checkpoint of `resumed_epoch`); TensorBoard and MLflow when they are
    installed (optional: neither is a dependency). Loggers write on rank 0 only."""
    loggers = [AtomicCSVLogger(run_dir, resumed_epoch)]
    try:
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(run_dir, name="logs", version="tensorboard"))
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
        loggers.append(MLFlowLogger(experiment_name=run_dir.resolve().parent.name, run_name=run_dir.name,
                                    tracking_uri=uri))
    except ImportError:
        pass
    return loggers


class AtomicCSVLogger(CSVLogger):
    """Lightning's CSV logger (logs/metrics.csv) writing each save as a whole new file put in place by
    rename. Lightning's own writer appends in place and rewrites the file in place when a column
    appears, so a kill mid-write leaves it empty or torn and its rows are lost. For a resumed run
    (`resumed_epoch` set) it continues the file, where Lightning's writer would delete it."""

    def __init__(self, run_dir: Path, resumed_epoch: int | None = None):
        super().__init__(run_dir, name="logs", version="")
        self.resumed_epoch = resumed_epoch

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._experiment = _AtomicWriter(self.log_dir, self.resumed_epoch)
        return self._experiment


class _AtomicWriter(ExperimentWriter):
    """Keeps every row in memory (a run logs a few hundred) and writes them all on each save."""

    def __init__(self, log_dir: str, resumed_epoch: int | None):
        self.resumed_epoch = resumed_epoch
        self.rows: list[dict] = []
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """(Where Lightning deletes metrics.csv.) A fresh run starts the file anew, as Lightning does;
        a resumed one keeps its rows up to the checkpoint's epoch (the run logs the later ones again)."""
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self.resumed_epoch is None:
            path.unlink()
            return
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            self.rows = [row for row in reader
                         if not row.get("epoch") or int(float(row["epoch"])) <= self.resumed_epoch]
        self.metrics_keys = list(reader.fieldnames or [])
        self._write(self.rows)

    def save(self) -> None:
        if not self.metrics:
            return
        self._record_new_keys()
        self._write(self.rows + self.metrics)
        self.rows += self.metrics  # only once the file holds them
        self.metrics = []

    def _write(self, rows: list[dict]) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        with atomic_write(Path(self.metrics_file_path), "w", newline="") as handle:
            writer = csv.DictWriter(handle, self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


def _finish(config, run: RunDir, task: str, classes, samples, best, model, val_set, started,
            stopped_early_at: int | None = None) -> TrainResult:
    """Best weights -> the meta that names them -> `save_calibrated` -> env and status."""
    from ..bundle import ModelMeta

    state, best_epoch = rundir.checkpoint_weights(best.best_model_path)
    kept = f"kept epoch {best_epoch} (val balanced accuracy {float(best.best_model_score):.3f})"
    log.info("%s", f"stopped early at epoch {stopped_early_at}, {kept}" if stopped_early_at is not None else kept)
    model.load_state_dict(state)
    model.eval()
    spec = model_spec(config.arch)
    meta = ModelMeta(
        name=rundir.model_name(run.path, config.project), task=task, classes=tuple(classes),
        arch=config.arch, img_size=config.img_size, mean=spec.mean, std=spec.std, params=count_parameters(model),
        preprocess=config.preprocess,
        provenance={"pneumoscope": __version__, "git_commit": git_commit(), "seed": config.seed,
                    "trainable_params": trainable_parameters(model),
                    "manifest_hash": manifest_hash(samples), "best_epoch": best_epoch, "train_config": config.to_dict(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    metrics = save_calibrated(model, meta, run, samples, val_set.pixels.numpy(), val_set.targets.numpy(),
                               evaluate_test=config.evaluate_test, calibration=config.calibration)
    wall = time.perf_counter() - started
    run.write_env(environment(config, wall))
    run.write_status("finished", wall_seconds=round(wall, 1),
                     best_val_bacc=None if best.best_model_score is None else float(best.best_model_score))
    return TrainResult(run.path, run.bundle, metrics, best_epoch=best_epoch)
