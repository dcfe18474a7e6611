"""pneumoscope: pediatric chest X-ray classification (NORMAL / BACTERIA / VIRUS) on a CPU.

The Python API is `Classifier.load().predict(path)` (see `pneumoscope.runtime.classifier`). Importing the package
imports nothing heavy: `Classifier` is loaded on first access, and only what a call needs follows.
"""
__version__ = "0.1.0"
__all__ = ["Classifier", "__version__"]


def __getattr__(name: str):
    if name == "Classifier":  # PEP 562: `from pneumoscope import Classifier` imports predict only now
        from .runtime.classifier import Classifier

        return Classifier
    raise AttributeError(f"module 'pneumoscope' has no attribute {name!r}")
