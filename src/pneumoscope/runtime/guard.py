"""The learned input guard: does an input's feature vector look like those of the training X-rays?

Two checks, both here. The image checks (`image_warnings`, on the decoded image) catch colour photos, blank, tiny and oddly shaped
pictures; a gray photo, a text page or an MRI slice passes them. This check works in the model's
own feature space (the pooled penultimate features the network computes anyway, so it needs no
second forward pass):

- Mahalanobis distance (Lee et al. 2018): class means and one shared covariance of the TRAINING
  X-rays' features; an input's score is its distance to the nearest class. The features (1280 for
  EfficientNet-Lite0) are first projected on their top principal components; projection and
  precision are stored folded into one whitening matrix (projection @ cholesky(precision)), so
  scoring is one F x k matrix product and the statistics stay small.
- energy score (Liu et al. 2020): -T * logsumexp(logits / T), from the logits alone. Kept for the
  side-by-side comparison; it needs the classifier's own logits (a merged binary read of a 3-class
  network has log-probabilities as outputs, whose logsumexp is always 0).

`fit_guard` returns plain JSON (arrays as base64); the threshold is set so that at most
`max_flagged` of held-out VALIDATION X-rays score above it. `ModelMeta.guard` holds one such set
per graph kind, {"fp32": ..., "int8": ...} (`stats_for` picks the one a backend needs): the int8
graph's features differ from the fp32 ones by about half their mean size, so fp32 statistics
flag ~14% of real X-rays there. Scoring is NumPy only; scikit-learn (Ledoit-Wolf shrinkage of the
covariance) is used at fit time only. docs/inputs.md has the measured rates.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

GUARD_VERSION = 1
METHODS = ("mahalanobis", "energy")
NOT_XRAY = "not a chest X-ray: "  # the prefix that makes a record unreliable (classifier.py uses it)
MESSAGE = "does not look like a chest X-ray the model was trained on"

# The input guard (docs/inputs.md). Over all 5,232 images of the training data the smallest gray-level
# standard deviation is 19.8 and the fewest distinct gray levels 113, so these limits leave real
# radiographs alone.
MAX_COLOUR = 0.04  # mean channel spread (images.colour_spread): 0 for gray, 0.15-0.45 for photos
MIN_STD = 8.0  # gray levels: below this the image is blank or nearly so
MIN_LEVELS = 32  # fewer distinct gray levels: a drawing, mask, phantom or binary image
MIN_SIDE = 64  # px
MAX_ASPECT = 2.5  # longer side / shorter side
MAX_ENTROPY = 0.9  # normalized entropy of the calibrated probabilities above which the model is unsure


@dataclass(frozen=True)
class GuardConfig:
    method: str = "mahalanobis"  # the score that decides; the other one is stored for comparison
    # Chosen by benchmarks/guard_rates.py on Lite0's 1280 features (docs/inputs.md). max_flagged:
    # 0.5% of the 264 validation X-rays of the 80/5/15 split is one image, too coarse a threshold
    # (92% of the non-X-rays flagged against 97% at 1%, with 0.6% of the external group).
    dims: int = 256  # principal components of the features kept for the Mahalanobis distance
    max_flagged: float = 0.01  # share of validation X-rays allowed above the threshold
    temperature: float = 1.0  # of the energy score (Liu et al. use 1)


# ------------------------------------------------------------------ JSON arrays
def encode_array(array: np.ndarray, dtype: str = "float32") -> dict:
    """An array as JSON: dtype, shape and base64 of its little-endian bytes (~1.4x the binary size)."""
    array = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<"))
    return {"dtype": dtype, "shape": list(array.shape), "base64": base64.b64encode(array.tobytes()).decode()}


def decode_array(blob: dict) -> np.ndarray:
    """-> float32 (a float16 blob is widened: scoring runs in float32)."""
    dtype = np.dtype(blob["dtype"]).newbyteorder("<")
    return np.frombuffer(base64.b64decode(blob["base64"]), dtype=dtype).reshape(blob["shape"]).astype(np.float32)


# ------------------------------------------------------------------ fitting
def fit_guard(features: np.ndarray, labels: np.ndarray, val_features: np.ndarray, val_logits: np.ndarray,
              config: GuardConfig = GuardConfig()) -> dict:
    """Statistics of the training X-rays' features (N x F, labels N class indices), with
    thresholds (one per method) that flag at most `config.max_flagged` of the validation X-rays
    (their features and logits)."""
    if config.method not in METHODS:
        raise ValueError(f"unknown guard method {config.method!r}; choose one of {', '.join(METHODS)}")
    features, labels = np.asarray(features, np.float64), np.asarray(labels)
    dims = min(config.dims, features.shape[1], len(features) - 1)
    center = features.mean(0)
    # Principal directions by SVD (deterministic, no sampling); their sign does not change distances.
    projection = np.linalg.svd(features - center, full_matrices=False)[2][:dims].T
    reduced = (features - center) @ projection
    classes = np.unique(labels)
    means = np.stack([reduced[labels == c].mean(0) for c in classes])
    within = reduced - means[np.searchsorted(classes, labels)]
    chol = np.linalg.cholesky(_shrunk_precision(within))  # precision = chol @ chol.T
    stats = {
        "version": GUARD_VERSION, "method": config.method, "features": int(features.shape[1]), "dims": int(dims),
        "center": encode_array(center),
        # float16 halves the largest array; distances move by ~1e-4 (relative), and the thresholds
        # below are measured with these very stored values.
        "whiten": encode_array(projection @ chol, "float16"), "class_means": encode_array(means @ chol),
        "temperature": float(config.temperature), "max_flagged": float(config.max_flagged),
        "fitted_on": {"train": int(len(features)), "val": int(len(val_features))},
    }
    val_scores = all_scores(val_features, val_logits, stats)
    stats["thresholds"] = {m: _threshold(s, config.max_flagged) for m, s in val_scores.items()}
    stats["threshold"] = stats["thresholds"][config.method]
    return stats


def _shrunk_precision(centred: np.ndarray) -> np.ndarray:
    """Inverse of the Ledoit-Wolf shrunk covariance: a plain sample covariance of a few thousand
    1280-d (or 128-d) vectors is too noisy to invert well."""
    from sklearn.covariance import LedoitWolf

    return LedoitWolf(assume_centered=True).fit(centred).precision_


def _threshold(scores: np.ndarray, max_flagged: float) -> float:
    """A value with at most `max_flagged` of `scores` above it: halfway between the highest score
    kept below and the lowest one allowed above (0.1% over the top score when none is), so float
    rounding (a single row vs a batch) never moves a validation X-ray across it."""
    scores = np.sort(np.asarray(scores, np.float64))
    keep = len(scores) - int(np.floor(max_flagged * len(scores)))  # scores[:keep] stay below
    above = scores[keep] if keep < len(scores) else scores[-1] + 1e-3 * abs(scores[-1])
    return float((scores[keep - 1] + above) / 2)


def stats_for(guard: dict | None, graph_kind: str) -> dict | None:
    """The statistics for the features of the graph a backend computes (`Backend.graph_kind`: "fp32"
    or "int8") from ModelMeta.guard, or None when the model has none for it (then only the image
    checks run: statistics of another graph would misjudge real X-rays)."""
    if not guard:
        return None
    return guard.get(graph_kind)


# ------------------------------------------------------------------ scoring (NumPy only)
@dataclass(frozen=True)
class Guard:
    """Decoded statistics: ((x - center) @ whiten - means[c]) squared and summed is the squared
    Mahalanobis distance to class c (whiten = projection @ cholesky(precision); means whitened too)."""
    center: np.ndarray
    whiten: np.ndarray
    means: np.ndarray
    temperature: float
    method: str
    threshold: float


def load_guard(stats: dict) -> Guard:
    """Decodes `stats` once (callers that score many images keep the result)."""
    if stats.get("version", GUARD_VERSION) > GUARD_VERSION:
        raise ValueError(f"guard statistics version {stats['version']} is newer than this pneumoscope reads "
                         f"({GUARD_VERSION}); upgrade pneumoscope")
    try:
        center, whiten, means = decode_array(stats["center"]), decode_array(stats["whiten"]), decode_array(stats["class_means"])
    except (KeyError, TypeError, ValueError) as err:  # binascii.Error is a ValueError
        raise ValueError(f"guard statistics cannot be decoded ({type(err).__name__}: {err})") from None
    if center.ndim != 1 or whiten.shape != (len(center), whiten.shape[-1]) or means.ndim != 2 \
            or means.shape[1] != whiten.shape[1]:
        raise ValueError(f"guard statistics do not fit together (center {center.shape}, whiten {whiten.shape}, "
                         f"class means {means.shape})")
    return Guard(center=center, whiten=whiten, means=means, temperature=float(stats.get("temperature", 1.0)),
                 method=stats["method"], threshold=float(stats.get("threshold", np.inf)))


def _as_guard(stats: dict | Guard) -> Guard:
    """Decoding takes about a millisecond: callers that score many images pass a `load_guard` result."""
    return stats if isinstance(stats, Guard) else load_guard(stats)


def mahalanobis(features: np.ndarray, stats: dict | Guard) -> np.ndarray:
    """Distance (not squared) to the nearest class mean in the reduced, whitened feature space."""
    guard = _as_guard(stats)
    z = (np.atleast_2d(np.asarray(features, np.float32)) - guard.center) @ guard.whiten
    squared = ((z[:, None, :] - guard.means[None]) ** 2).sum(-1)
    return np.sqrt(squared.min(1))


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """-T * logsumexp(logits / T): low for inputs the classifier is sure about, higher for others."""
    from scipy.special import logsumexp  # lazy: 0.13-0.18 s at import, which only an energy guard needs

    return -temperature * logsumexp(np.atleast_2d(np.asarray(logits, np.float64)) / temperature, axis=1)


def all_scores(features: np.ndarray, logits: np.ndarray, stats: dict | Guard) -> dict[str, np.ndarray]:
    guard = _as_guard(stats)
    return {"mahalanobis": mahalanobis(features, guard), "energy": energy(logits, guard.temperature)}


def guard_scores(features: np.ndarray, stats: dict | Guard, logits: np.ndarray | None = None) -> np.ndarray:
    """The deciding score of each row (higher = less like the training X-rays); compare it with
    stats["threshold"]. The energy method needs `logits`."""
    guard = _as_guard(stats)
    if guard.method == "energy":
        if logits is None:
            raise ValueError("the energy guard needs the logits")
        return energy(logits, guard.temperature)
    return mahalanobis(features, guard)


def guard_warnings(features_row: np.ndarray, logits_row: np.ndarray | None, stats: dict | Guard | None) -> list[str]:
    """The warning for one image, or [] (also when the model has no guard statistics, or the
    features are not finite because the image could not be decoded)."""
    if not stats:
        return []
    guard = _as_guard(stats)
    score = float(guard_scores(features_row, guard, logits_row)[0])
    if not np.isfinite(score) or score <= guard.threshold:
        return []
    what = "feature distance" if guard.method == "mahalanobis" else "energy score"
    return [f"{NOT_XRAY}{MESSAGE} ({what} {score:.1f} > threshold {guard.threshold:.1f})"]


# ------------------------------------------------------------------ the image checks (before the network)
def image_warnings(gray: np.ndarray, info: dict) -> list[str]:
    """Measurable signs, on the decoded image before it is squashed, that it is no chest radiograph."""
    height, width = gray.shape
    short, long = min(height, width), max(height, width)
    histogram = np.bincount(gray.ravel(), minlength=256)  # one pass; std and levels follow from it
    levels = np.arange(256)
    mean = (histogram * levels).sum() / gray.size
    std = float(np.sqrt((histogram * (levels - mean) ** 2).sum() / gray.size))
    distinct = int((histogram > 0).sum())
    checks = [
        (info.get("colour", 0.0) > MAX_COLOUR,
         f"colour image (mean channel spread {info.get('colour', 0.0):.3f} > {MAX_COLOUR})"),
        (std < MIN_STD, f"blank or nearly constant image (gray-level std {std:.1f} < {MIN_STD:g})"),
        (distinct < MIN_LEVELS, f"only {distinct} distinct gray levels (< {MIN_LEVELS}): a drawing or mask"),
        (short < MIN_SIDE, f"tiny image ({width}x{height}, a side under {MIN_SIDE} px)"),
        (long > MAX_ASPECT * short, f"extreme aspect ratio ({width}x{height}, over {MAX_ASPECT:g}:1)"),
    ]
    return [NOT_XRAY + text for failed, text in checks if failed]


def model_warnings(probabilities: np.ndarray) -> list[str]:
    """The model's own doubt: normalized entropy (0 = certain, 1 = all classes equally likely)."""
    p = np.clip(probabilities.astype(np.float64), 1e-12, 1.0)
    entropy = float(-(p * np.log(p)).sum() / np.log(len(p)))
    if entropy > MAX_ENTROPY:
        return [f"low confidence: normalized entropy {entropy:.2f} > {MAX_ENTROPY} "
                f"(highest probability {float(probabilities.max()):.2f})"]
    return []
