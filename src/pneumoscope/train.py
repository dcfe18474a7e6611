"""Training with Lightning: one run directory that explains itself, best checkpoint, resume.

Run directory layout (`TrainConfig.out`):
    config.yaml        the resolved configuration
    manifest.csv       the patient-grouped split actually used
    status.json        running / finished / failed / interrupted, with timings, pid and hostname
    metrics.csv        one row per epoch: losses, accuracies, learning rate, seconds
    curves.png         loss and accuracy vs epoch, train vs val
    checkpoints/       Lightning's last.ckpt (for --resume) and best.ckpt
    model.pt/.json     the best weights in pneumoscope's format, calibrated (temperature)
    env.json           versions, seed, git commit, wall time, peak memory, world size
    test/              evaluation of the internal test split (when it has one)
    logs/              Lightning's CSVLogger (and TensorBoard's events when tensorboard is installed)
    mlruns/            MLflow's file store, when mlflow is installed (MLFLOW_TRACKING_URI wins when set)

Under torchrun or srun (several processes), only rank 0 writes these files; every rank computes
the same seeded split, and validation metrics are gathered over all ranks.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import platform
import resource
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch
import torchmetrics
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.utils.data import DataLoader

from . import __version__
from .data import (XrayDataset, atomic_write, class_weights, discover, eval_transform, load_pixels,
                   load_samples, manifest_hash, patient_folds, split_by_patient, train_transform,
                   write_manifest)
from .labels import classes_for
from .models import DEFAULT_ARCH, XrayNet, count_parameters, create_model, model_spec, save_checkpoint

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str
    out: str = "runs/default/run"
    task: str = "three"
    arch: str = DEFAULT_ARCH
    pretrained: bool | None = None  # None: the architecture's default (True for efficientnet_lite0)
    epochs: int = 8  # the 20-minute budget on 2 cores at 192 px (~110 s an epoch with validation)
    img_size: int = 192
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    class_weight_power: float = 1.0  # loss weights = inverse class frequency ** power (0: unweighted)
    aug: float = 1.0  # augmentation strength, 0 disables it
    aug_policy: str = "standard"  # data.AUG_POLICIES: "strong" adds acquisition changes (equalise, JPEG, shear)
    freeze_blocks: int = 2  # efficientnet: keep the stem and this many first blocks at ImageNet values
    ema_decay: float = 0.995  # 0 disables the exponential moving average of weights
    ema_start_epoch: int = 1  # average from here on: an average that starts at step 0 remembers the init
    patience: int = 4  # early stopping on validation balanced accuracy
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    max_images: int | None = None  # cap the pool (by patient) for quick runs
    keep_epochs: bool = False  # also keep every epoch's weights (checkpoints/epoch-N.ckpt), for stability studies
    evaluate_test: bool = True
    resume: bool = False
    cache_dir: str | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- Lightning module
class LitClassifier(L.LightningModule):
    def __init__(self, model: XrayNet, classes: tuple[str, ...], config: TrainConfig, weights: torch.Tensor):
        super().__init__()
        self.model, self.classes, self.config = model, classes, config
        self.loss = nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)
        n = len(classes)
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(n, average="micro")
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(n, average="micro")
        self.val_bacc = torchmetrics.classification.MulticlassAccuracy(n, average="macro")
        # metric objects, not tensors: their states are summed over all ranks before compute()
        self.val_loss = torchmetrics.MeanMetric()
        self.val_n = torchmetrics.SumMetric()
        self.frozen = freeze_early_layers(model, config.freeze_blocks)

    def forward(self, x):
        return self.model(x.contiguous(memory_format=torch.channels_last))

    def training_step(self, batch, _):
        for module in self.frozen:  # Lightning puts everything in train mode; frozen BN stays in eval
            module.eval()
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

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
        optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.config.lr, total_steps=self.trainer.estimated_stepping_batches,
            pct_start=0.15, div_factor=20, final_div_factor=100)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def freeze_early_layers(model: XrayNet, n_blocks: int) -> list[nn.Module]:
    """Freezes the stem and the first `n_blocks` blocks of an EfficientNet-style backbone: their
    ImageNet edge detectors suit radiographs, and not back-propagating through the high-resolution
    layers nearly doubles CPU training speed. Other architectures are left as they are."""
    backbone = model.backbone
    if n_blocks <= 0 or not hasattr(backbone, "blocks") or not hasattr(backbone, "conv_stem"):
        return []
    frozen = [backbone.conv_stem, backbone.bn1, *list(backbone.blocks[:n_blocks])]
    for module in frozen:
        module.requires_grad_(False)
    return frozen


# ---------------------------------------------------------------- run bookkeeping callbacks
class EpochTable(Callback):
    """Writes metrics.csv (one row per epoch) and curves.png after every epoch, atomically."""

    COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_bacc", "val_n", "lr", "seconds",
               "images_per_s")

    def __init__(self, run_dir: Path, n_train: int):
        self.run_dir, self.n_train = run_dir, n_train
        self.path = run_dir / "metrics.csv"

    def on_train_epoch_start(self, trainer, pl_module):
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        seconds = time.perf_counter() - self.started
        row = {
            "epoch": trainer.current_epoch,
            "train_loss": metrics.get("train_loss_epoch", metrics.get("train_loss")),
            "train_acc": metrics.get("train_acc"),
            "val_loss": metrics.get("val_loss"), "val_acc": metrics.get("val_acc"),
            "val_bacc": metrics.get("val_bacc"),
            "val_n": int(metrics["val_n"]) if "val_n" in metrics else None,  # summed over ranks
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "seconds": round(seconds, 2),
            "images_per_s": round(self.n_train / max(seconds, 1e-9), 1),
        }
        rows = [r for r in read_metrics(self.path) if int(r["epoch"]) < row["epoch"]] + [row]
        with atomic_write(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, self.COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        plot_curves(rows, self.run_dir / "curves.png")


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def plot_curves(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in rows]
    series = lambda key: [float(r[key]) if r.get(key) not in (None, "") else np.nan for r in rows]  # noqa: E731
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("train", "-o"), ("val", "--s")):
        ax_loss.plot(epochs, series(f"{key}_loss"), style, label=key)
        ax_acc.plot(epochs, series(f"{key}_acc"), style, label=key)
    ax_acc.plot(epochs, series("val_bacc"), ":^", label="val balanced")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_write(out) as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)


def write_status(run_dir: Path, status: str, **extra) -> None:
    path = run_dir / "status.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(status=status, updated=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra)
    with atomic_write(path, "w") as handle:
        json.dump(current, handle, indent=2)


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
        "seed": config.seed, "git_commit": git_commit(), "wall_seconds": round(wall_seconds, 1),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "world_size": world_size(),  # peak memory and wall time above are rank 0's
    }


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
def prepare_split(config: TrainConfig, run_dir: Path):
    """The run's samples with train/val/test assigned: from a manifest as given, or split by patient."""
    data = Path(config.data)
    fold = config.extra.get("cv_fold")  # cross-validation: set by experiments.cross_validate
    if data.suffix.lower() == ".csv":
        samples = load_samples(data)
    elif fold is None:
        samples = split_by_patient(discover(data)[0], config.val_fraction, config.test_fraction, config.seed)
    else:
        samples = discover(data)[0]
    if config.max_images:
        samples = subsample_by_patient(samples, config.max_images, config.seed)
    if fold is not None:
        samples = cross_validation_split(samples, config.extra["cv_folds"], fold, config.seed)
    if is_main_process():
        write_manifest(samples, run_dir / "manifest.csv")
    return samples


def cross_validation_split(samples, n_folds: int, fold: int, seed: int):
    """Fold `fold` of a patient-grouped, class-stratified K-fold as val, the other folds as train.
    A manifest's test rows stay out of it: cross-validation never sees the held-out test set."""
    pool = [s for s in samples if s.split != "test"]
    held = set(patient_folds(pool, n_folds, seed)[fold].tolist())
    return [replace(s, split="val" if i in held else "train") for i, s in enumerate(pool)]


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


def train(config: TrainConfig) -> Path:
    """Trains one model and returns the path of its calibrated best checkpoint (model.pt)."""
    started = time.perf_counter()
    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(config.seed, workers=True, verbose=False)
    classes = classes_for(config.task)
    model_spec(config.arch)  # fail fast on an unknown name
    main = is_main_process()
    if main:
        with atomic_write(run_dir / "config.yaml", "w") as handle:
            yaml.safe_dump(asdict(config), handle, sort_keys=False)
        if not config.resume:
            (run_dir / "status.json").unlink(missing_ok=True)
        # pid and host let `pneumoscope runs` tell a live run from one whose process was killed
        write_status(run_dir, "running", started=time.strftime("%Y-%m-%dT%H:%M:%S"), error=None,
                     pid=os.getpid(), hostname=socket.gethostname(), world_size=world_size())
    try:
        checkpoint = _fit(config, run_dir, classes, started)
    except KeyboardInterrupt:
        if main:
            write_status(run_dir, "interrupted")
        raise
    except BaseException as err:
        if main:
            write_status(run_dir, "failed", error=f"{type(err).__name__}: {err}")
        raise
    return checkpoint


def _fit(config: TrainConfig, run_dir: Path, classes, started: float) -> Path:
    samples = prepare_split(config, run_dir)
    cache = Path(config.cache_dir) if config.cache_dir else None
    datasets = {}
    for split in ("train", "val"):
        chosen = [s for s in samples if s.split == split]
        if not chosen:
            raise ValueError(f"the {split} split is empty; give more data or other fractions")
        pixels, kept, _ = load_pixels(chosen, config.img_size, cache)
        transform = train_transform(config.img_size, config.aug, config.aug_policy) if split == "train" else eval_transform()
        datasets[split] = XrayDataset(pixels, kept, classes, config.task, transform)
    train_set, val_set = datasets["train"], datasets["val"]
    weights = class_weights(train_set.targets, len(classes)) ** config.class_weight_power
    weights = weights / weights.mean()
    model = create_model(config.arch, len(classes), config.pretrained).to(memory_format=torch.channels_last)
    module = LitClassifier(model, classes, config, weights)

    checkpoints = run_dir / "checkpoints"
    best = ModelCheckpoint(checkpoints, filename="best", monitor="val_bacc", mode="max",
                           enable_version_counter=False)
    # Lightning 2.6 writes save_last only when the best improves, so "last" is its own every-epoch
    # checkpoint: --resume must never lose an epoch.
    last = ModelCheckpoint(checkpoints, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
                           enable_version_counter=False)
    callbacks = [best, last, EpochTable(run_dir, len(train_set)), TQDMProgressBar(refresh_rate=10),
                 EarlyStopping("val_bacc", mode="max", patience=config.patience),
                 SameSplitOnAllRanks(manifest_hash(samples))]
    if config.keep_epochs:  # full checkpoints: with weights only, Lightning skips the hook that stores the EMA
        callbacks.append(EveryEpochCheckpoint(checkpoints, filename="epoch-{epoch}", monitor=None, save_top_k=-1,
                                              every_n_epochs=1, auto_insert_metric_name=False,
                                              enable_version_counter=False))
    if config.ema_decay > 0:
        # the step-based condition is the one Lightning checks every batch (the epoch-based one alone
        # would still update from step 0)
        steps_per_epoch = max(1, len(train_set) // world_size() // config.batch_size)
        callbacks.append(EMAWeightAveraging(decay=config.ema_decay,
                                            update_starting_at_step=config.ema_start_epoch * steps_per_epoch))
    trainer = L.Trainer(max_epochs=config.epochs, **trainer_devices(), callbacks=callbacks,
                        default_root_dir=run_dir, logger=_loggers(run_dir), deterministic=False,
                        log_every_n_steps=10, num_sanity_val_steps=0, enable_model_summary=False)
    for logger in trainer.loggers:  # the configuration, so MLflow/TensorBoard can filter runs by it
        logger.log_hyperparams(asdict(config))
    resume_from = checkpoints / "last.ckpt" if config.resume and (checkpoints / "last.ckpt").exists() else None
    if config.resume and resume_from is None:
        log.warning("--resume: no %s yet; starting from the beginning", checkpoints / "last.ckpt")
    trainer.fit(module, datamodule=_Loaders(train_set, val_set, config.batch_size), ckpt_path=resume_from,
                weights_only=True)
    if not trainer.is_global_zero:
        return run_dir / "model.pt"
    return _finish(config, run_dir, classes, samples, best, model, val_set, started)


class EveryEpochCheckpoint(ModelCheckpoint):
    """Keeps every epoch. Its own state key: Lightning refuses two checkpoint callbacks whose
    settings (monitor, frequency) look alike, as this one and "last" do."""

    @property
    def state_key(self) -> str:
        return self._generate_state_key(kept="every epoch", dirpath=str(self.dirpath))


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
        return DataLoader(self.train_set, self.batch_size, shuffle=True, num_workers=0, drop_last=drop_last)

    def val_dataloader(self):
        sampler = None
        if self.trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(self.val_set, num_replicas=self.trainer.world_size,
                                                   rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(self.val_set, self.batch_size, sampler=sampler, num_workers=0)


def _loggers(run_dir: Path) -> list:
    """Lightning's standard loggers: CSV always; TensorBoard and MLflow when they are installed
    (optional: neither is a dependency). Loggers write on rank 0 only."""
    from lightning.pytorch.loggers import CSVLogger

    loggers = [CSVLogger(run_dir, name="logs", version="")]
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


def _finish(config, run_dir, classes, samples, best, model, val_set, started) -> Path:
    from .evaluate import evaluate_samples, fit_temperature

    best_path = Path(best.best_model_path)
    best_checkpoint = torch.load(best_path, map_location="cpu", weights_only=True)  # read once: ~40 MB
    model.load_state_dict(network_weights(best_checkpoint["state_dict"]))
    model.eval()
    logits = predict_logits(model, val_set)
    temperature = fit_temperature(logits, val_set.targets)
    spec = model_spec(config.arch)
    meta = {
        "name": f"pneumoscope-{config.arch}-{config.task}", "version": __version__,
        "arch": config.arch, "task": config.task, "classes": list(classes), "img_size": config.img_size,
        "input": "1-channel grayscale in [0, 1], squashed to img_size x img_size",
        "normalization": {"mean": spec.mean, "std": spec.std}, "temperature": temperature,
        "params": count_parameters(model), "manifest_hash": manifest_hash(samples),
        "git_commit": git_commit(), "seed": config.seed, "best_epoch": best_checkpoint.get("epoch"),
        "train_config": asdict(config), "metrics": {},
    }
    checkpoint = save_checkpoint(model, meta, run_dir / "model.pt")
    val_metrics = evaluate_samples(checkpoint, [s for s in samples if s.split == "val"], run_dir / "val",
                                   plots=False)
    meta["metrics"]["val"] = _headline(val_metrics)
    if config.evaluate_test and any(s.split == "test" for s in samples):
        test_metrics = evaluate_samples(checkpoint, [s for s in samples if s.split == "test"], run_dir / "test")
        meta["metrics"]["internal_test"] = _headline(test_metrics)
    save_checkpoint(model, meta, checkpoint)
    wall = time.perf_counter() - started
    with atomic_write(run_dir / "env.json", "w") as handle:
        json.dump(environment(config, wall), handle, indent=2)
    write_status(run_dir, "finished", wall_seconds=round(wall, 1), best_val_bacc=best.best_model_score
                 and float(best.best_model_score))
    return checkpoint


def network_weights(lightning_state: dict) -> dict:
    """The XrayNet's state dict inside a LitClassifier's (a Lightning checkpoint's "state_dict")."""
    return {k.removeprefix("model."): v for k, v in lightning_state.items() if k.startswith("model.")}


def _headline(metrics: dict) -> dict:
    keys = ("n", "accuracy", "accuracy_ci95", "balanced_accuracy", "macro_f1", "macro_auc", "ece")
    out = {k: metrics[k] for k in keys if k in metrics}
    out["recall"] = {c: v["recall"] for c, v in metrics["per_class"].items()}
    return out



@torch.inference_mode()
def predict_logits(model: nn.Module, dataset: XrayDataset, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    outputs = []
    for start in range(0, len(dataset), batch_size):
        batch = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])
        outputs.append(model(batch.contiguous(memory_format=torch.channels_last)))
    return torch.cat(outputs)
