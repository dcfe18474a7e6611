"""pneumoscope: pediatric chest X-ray classification (NORMAL / BACTERIA / VIRUS) on a CPU.

The public Python API is the names below, imported from the package itself
(`from pneumoscope import Classifier`, or `import pneumoscope; pneumoscope.read_dataset(...)`); the
submodules are the implementation and may move. Importing the package imports nothing heavy: each
name is loaded on first access (PEP 562), and only what it needs follows, so `pneumoscope --help`
and a one-image prediction never import PyTorch.

Predicting
    Classifier          `Classifier.load(bundle=None, task="three", backend="auto").predict(path)`;
                        `.scores(paths)` for arrays, `Classifier.from_model(net, meta)` for a network in memory
    read_xray           the one decoder: a file, bytes or array -> 2-D uint8 gray (DICOM included)
    load_bundle         a model bundle directory: `.meta` (a typed ModelMeta), `.state_dict()`, `.metrics()`
    load_network        a bundle's PyTorch network (eval mode), its weights loaded
Data
    read_dataset        a manifest CSV or a tree of class folders, read as every command reads it
    split_dataset       train / val / test by patient, as `pneumoscope split` and `train` cut them
    patient_folds       the held-out indices of K patient-grouped, class-stratified folds
    class_indices       samples' labels as indices into a model's classes
    load_pixels         samples decoded and resized once, cached on disk
    augmented_views     seeded strong-augmentation views of pixels (what calibration fits on)
    train_transform     the training augmentation, and XrayDataset the pixels -> tensors dataset
    XrayDataset
Networks and training
    freeze_model        freeze the stem and first N stages (or all but the head), as training does
    TrainConfig         every training option (`pneumoscope train --help` lists the same)
    train               `pneumoscope train`: train(TrainConfig(data=...)) -> TrainResult (.bundle, .metrics)
    RunDir              a run directory's files: config, manifest, epochs, reports, checkpoints, model
    checkpoint_weights  the network's state dict in a run's Lightning checkpoint (best, last, epoch-N)
    adapt_bundle        `pneumoscope adapt`: a copy of a bundle adapted to a new site's unlabelled images
Evaluating and guarding
    compute_metrics     accuracy with its bootstrap interval, balanced accuracy, per-class figures, ECE
    fit_temperature     the temperature that calibrates logits on labelled data
    GuardConfig         options of the input guard's learned check, fitted by fit_guard
    fit_guard           statistics of training features (the JSON a bundle's meta carries as `guard`)
    guard_scores        the learned check's score of features (above stats["threshold"]: flagged)
Serving and utilities
    create_app          the web page and REST API (an ASGI app); serve_in_thread runs it on loopback
    serve_in_thread
    describe_machine    CPU model, its speed flags, cores and load: printed with every measured figure
    atomic_write        write a file under a temporary name and rename it into place
    default_cache_dir   $PNEUMOSCOPE_CACHE, else ~/.cache/pneumoscope
    INTENDED_USE        what pneumoscope is for (and not), as the model card, web page and DICOM SR say it
"""
from importlib import import_module as _import_module

__version__ = "0.1.0"

# name -> the module that defines it: the one place to change when a module moves
_PUBLIC = {
    "Classifier": "pneumoscope.runtime.classifier",
    "read_xray": "pneumoscope.data.images",
    "load_bundle": "pneumoscope.bundle.store",
    "load_network": "pneumoscope.nets.build",
    "read_dataset": "pneumoscope.data.datasets",
    "split_dataset": "pneumoscope.data.datasets",
    "patient_folds": "pneumoscope.data.datasets",
    "class_indices": "pneumoscope.data.datasets",
    "load_pixels": "pneumoscope.data.datasets",
    "augmented_views": "pneumoscope.data.transforms",
    "train_transform": "pneumoscope.data.transforms",
    "XrayDataset": "pneumoscope.data.transforms",
    "freeze_model": "pneumoscope.nets.registry",
    "TrainConfig": "pneumoscope.core.config",
    "train": "pneumoscope.training.fit",
    "RunDir": "pneumoscope.runs.rundir",
    "checkpoint_weights": "pneumoscope.runs.rundir",
    "adapt_bundle": "pneumoscope.workflows.adapt",
    "compute_metrics": "pneumoscope.evaluation.metrics",
    "fit_temperature": "pneumoscope.evaluation.metrics",
    "GuardConfig": "pneumoscope.runtime.guard",
    "fit_guard": "pneumoscope.runtime.guard",
    "guard_scores": "pneumoscope.runtime.guard",
    "create_app": "pneumoscope.serve",
    "serve_in_thread": "pneumoscope.serve",
    "describe_machine": "pneumoscope.runtime.backends",
    "atomic_write": "pneumoscope.core.files",
    "default_cache_dir": "pneumoscope.core.files",
}
# What pneumoscope is for, said once: the model card, the web page and API, and the DICOM SR quote it.
INTENDED_USE = ("Not for diagnostic use: pneumoscope is research software for research, teaching and second "
                "reading, not a medical device, and its output is not a diagnosis; a qualified clinician must "
                "read every X-ray.")
__all__ = [*_PUBLIC, "INTENDED_USE", "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'pneumoscope' has no attribute {name!r}")
    value = getattr(_import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
