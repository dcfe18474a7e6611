"""pneumoscope: pediatric chest X-ray classification (NORMAL / BACTERIA / VIRUS) on a CPU."""
__version__ = "0.1.0"

from .predict import Classifier  # noqa: E402,F401  the Python API: Classifier.load().predict(path)
