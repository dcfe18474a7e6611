"""The callbacks of a training run (`run_callbacks`): its checkpoints (best, last, every epoch),
its epoch table, early stopping, EMA, the thread count, and the check that every rank split alike."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, EMAWeightAveraging, ModelCheckpoint, TQDMProgressBar

from ..core.config import TrainConfig
from ..core.cpu_share import CpuShare
from ..runs.rundir import RunDir
from ..runtime.backends import cpu_threads
from .environment import world_size
from .module import MONITOR

log = logging.getLogger(__name__)


def run_callbacks(config: TrainConfig, run: RunDir, n_train: int, manifest_digest: str
                  ) -> tuple[RunCheckpoint, list[Callback]]:
    """The checkpoint of the best epoch (what the run keeps), and every callback of the run."""
    best = RunCheckpoint(run.checkpoints, filename="best", monitor=MONITOR, mode="max", enable_version_counter=False)
    # Lightning 2.6 writes save_last only when the best improves, so "last" is its own every-epoch
    # checkpoint: --resume must never lose an epoch.
    last = RunCheckpoint(run.checkpoints, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
                         enable_version_counter=False)
    callbacks = [best, last, EpochTable(run, n_train), TQDMProgressBar(refresh_rate=10),
                 EarlyStopping(MONITOR, mode="max", patience=config.patience),
                 SameSplitOnAllRanks(manifest_digest), *thread_callbacks(config)]
    if config.keep_epochs:  # full checkpoints: with weights only, Lightning skips the hook that stores the EMA
        callbacks.append(EveryEpochCheckpoint(run.checkpoints, filename="epoch-{epoch}", monitor=None, save_top_k=-1,
                                              every_n_epochs=1, auto_insert_metric_name=False,
                                              enable_version_counter=False))
    if config.ema_decay > 0:
        # the step-based condition is the one Lightning checks every batch (the epoch-based one alone
        # would still update from step 0)
        steps_per_epoch = max(1, n_train // world_size() // config.batch_size)
        callbacks.append(EMAWeightAveraging(decay=config.ema_decay,
                                            update_starting_at_step=config.ema_start_epoch * steps_per_epoch))
    return best, callbacks


# ---------------------------------------------------------------- threads
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


# ---------------------------------------------------------------- the run's own records
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


# ---------------------------------------------------------------- several processes
class SameSplitOnAllRanks(Callback):
    """Stops every rank (not just the odd one, which would leave the others waiting) when the
    ranks computed different splits: each rank splits on its own, from the same seed."""

    def __init__(self, digest: str):
        self.digest = digest

    def setup(self, trainer, pl_module, stage):
        same = trainer.strategy.broadcast(self.digest, src=0) == self.digest
        if not trainer.strategy.reduce_boolean_decision(same, all=True):
            raise RuntimeError("the ranks computed different train/val splits; is the data the same everywhere?")
