"""The LightningModule a run trains (LitClassifier: loss, optimiser and schedule from the
TrainConfig) and the data module that feeds it (Loaders)."""
from __future__ import annotations

import logging

import lightning.pytorch as L
import numpy as np
import torch
import torchmetrics
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from ..core.config import TrainConfig
from ..data.transforms import XrayDataset
from ..nets.registry import XrayNet, count_parameters, freeze_model, trainable_parameters

log = logging.getLogger(__name__)
MONITOR = "val_bacc"  # the validation metric that picks the best checkpoint, stops early and drives `plateau`


class LitClassifier(L.LightningModule):
    """The network trained with the run's loss, optimiser and schedule, logging the metrics that
    EpochTable records and the checkpoints monitor (Lightning gathers them over all ranks)."""

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


class Loaders(L.LightningDataModule):
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
