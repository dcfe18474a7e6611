"""Training-time image transforms (torchvision v2 on uint8 tensors), the training dataset, and class weights."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ..core.config import AUG_POLICIES
from .datasets import Sample, class_indices
from .images import input_step


# ---------------------------------------------------------------- datasets
class RandomGamma(torch.nn.Module):
    """Gamma in [1/g, g]: exposure differs between X-ray machines."""

    def __init__(self, max_gamma: float):
        super().__init__()
        self.log_gamma = float(np.log(max_gamma))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        gamma = float(np.exp(np.random.uniform(-self.log_gamma, self.log_gamma)))
        return v2.functional.adjust_gamma(image, gamma)


class RandomJpeg(torch.nn.Module):
    """JPEG re-compression at a quality drawn from [low, high] (torch's RNG, so the seeded stream
    decides it), through Pillow: torchvision's v2.JPEG goes through its image codecs, deprecated
    since torchvision 0.29. Clinics store radiographs at different JPEG qualities."""

    def __init__(self, quality: tuple[int, int]):
        super().__init__()
        self.low, self.high = quality

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        import io

        from PIL import Image

        quality = int(torch.randint(self.low, self.high + 1, ()))
        buffer = io.BytesIO()
        Image.fromarray(image[0].numpy()).save(buffer, "JPEG", quality=quality)
        buffer.seek(0)
        return torch.from_numpy(np.asarray(Image.open(buffer).convert("L")).copy())[None]


class InputStep(torch.nn.Module):
    """The model's fixed input step (images.input_step) on a 1 x S x S uint8 tensor: after every
    simulated acquisition change of the training augmentation (only float noise follows it), as it
    will come after a real one."""

    def __init__(self, method: str | None):
        super().__init__()
        self.method = method

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.method in (None, "none"):
            return image
        return torch.from_numpy(input_step(image[0].numpy(), self.method))[None]


def train_transform(size: int, strength: float = 1.0, policy: str = "standard", preprocess: str | None = None
                    ) -> v2.Compose:
    """Augmentation for radiographs. `standard`: crop, small rotations and shifts, exposure,
    contrast, gamma, blur and noise. `strong` adds what changes between hospitals' machines and
    post-processing: wider crops, shear, histogram equalisation, JPEG re-compression, sharpening
    and stronger exposure changes. No horizontal flip: the heart is on the left in every chest film."""
    if strength <= 0:
        return eval_transform(preprocess)
    if policy not in AUG_POLICIES:
        raise ValueError(f"unknown augmentation policy {policy!r}; choose from {', '.join(AUG_POLICIES)}")
    s = strength
    if policy == "strong":
        return v2.Compose([
            v2.RandomResizedCrop(size, scale=(1 - 0.4 * s, 1.0), ratio=(1 - 0.15 * s, 1 + 0.15 * s), antialias=True),
            v2.RandomAffine(degrees=15 * s, translate=(0.06 * s, 0.06 * s), shear=(-8 * s, 8 * s, -8 * s, 8 * s)),
            v2.RandomApply([v2.ColorJitter(brightness=0.4 * s, contrast=0.4 * s)], p=0.8),
            v2.RandomApply([RandomGamma(1 + 0.6 * s)], p=0.5),
            v2.RandomAutocontrast(p=0.3 * s),
            v2.RandomEqualize(p=0.3 * s),
            v2.RandomApply([RandomJpeg((40, 95))], p=0.3 * s),
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.3 * s),
            v2.RandomAdjustSharpness(2.0, p=0.2 * s),
            InputStep(preprocess),
            v2.ToDtype(torch.float32, scale=True),
            v2.RandomApply([v2.GaussianNoise(sigma=0.03 * s, clip=True)], p=0.3 * s),
        ])
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(1 - 0.25 * s, 1.0), ratio=(1 - 0.1 * s, 1 + 0.1 * s), antialias=True),
        v2.RandomAffine(degrees=10 * s, translate=(0.05 * s, 0.05 * s)),
        v2.RandomApply([v2.ColorJitter(brightness=0.3 * s, contrast=0.3 * s)], p=0.8),
        v2.RandomApply([RandomGamma(1 + 0.5 * s)], p=0.5),
        v2.RandomAutocontrast(p=0.2 * s),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.3 * s),
        InputStep(preprocess),
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomApply([v2.GaussianNoise(sigma=0.02 * s, clip=True)], p=0.3 * s),
    ])


def eval_transform(preprocess: str | None = None) -> v2.Compose:
    return v2.Compose([InputStep(preprocess), v2.ToDtype(torch.float32, scale=True)])


def augmented_views(pixels: np.ndarray, size: int, passes: int = 2, seed: int = 0) -> np.ndarray:
    """`passes` strong-augmentation views of every N x S x S uint8 image (pass-major: the targets of
    the result are the originals' repeated `passes` times), seeded and without touching the global
    random state: the same views on every call."""
    augment = train_transform(size, 1.0, "strong")
    numpy_state = np.random.get_state()  # RandomGamma draws from NumPy
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            np.random.seed(seed)
            views = [augment(torch.from_numpy(image)[None]).mul(255).round().clamp(0, 255).byte()[0].numpy()
                     for _ in range(passes) for image in pixels]
    finally:
        np.random.set_state(numpy_state)
    return np.stack(views) if views else pixels[:0]


class XrayDataset(Dataset):
    """Cached uint8 pixels -> (1 x S x S float tensor in [0, 1], class index)."""

    def __init__(self, pixels: np.ndarray, samples: list[Sample], classes: tuple[str, ...], task: str,
                 transform: v2.Compose):
        self.pixels = torch.from_numpy(pixels)
        self.targets = torch.from_numpy(class_indices(samples, classes, task))
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.transform(self.pixels[index][None]), self.targets[index]


def class_weights(targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1, so each class counts equally in the loss."""
    counts = torch.bincount(targets, minlength=n_classes).float().clamp(min=1)
    weights = counts.sum() / (n_classes * counts)
    return weights / weights.mean()
