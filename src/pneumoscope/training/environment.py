"""The processes a run trains in: how many the launcher (torchrun, srun) started and which one this
is, the devices and precision the Trainer gets, what env.json records of the machine, and
Lightning's console."""
from __future__ import annotations

import logging
import os
import platform
import resource

import lightning
import timm
import torch
import torchvision
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only

from .. import __version__
from ..core.config import TrainConfig
from ..runs.finish import git_commit


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


_quiet_lightning()  # once Lightning is imported (above), which is when it sets up its console


# ---------------------------------------------------------------- one process or many
def is_main_process() -> bool:
    """Rank 0, or the only process. Lightning reads the rank from torchrun/SLURM's environment at
    import, so this holds before the Trainer (and its process group) exists."""
    return rank_zero_only.rank == 0


def world_size() -> int:
    """How many processes torchrun (WORLD_SIZE) or srun (SLURM_NTASKS) started for this run."""
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


def check_precision(precision: str) -> None:
    """16-mixed is float16 autocast, which Lightning runs on CUDA only: say so before training."""
    if precision == "16-mixed" and not torch.cuda.is_available():
        raise ValueError("--precision 16-mixed needs a CUDA GPU; on a CPU use bf16-mixed or 32")


# ---------------------------------------------------------------- env.json
def environment(config: TrainConfig, wall_seconds: float) -> dict:
    """The versions, machine and cost of a run, as env.json records them."""
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
