"""Drift: how far a batch of images is from the test images the model was scored on, without labels.

evaluate writes a reference profile of the test set (`reference_profile`); batch_predict and
the HTTP service compare each batch or window with it (`compare`). Every feature is one number
per image: its channels' mean and spread, its brightness, its sharpness, the model's confidence,
and where its penultimate-layer embedding lies (norm, and standardised distance from the test
set's mean embedding). Each is scored by the population stability index (PSI) over the
reference's deciles; the predicted-class mix by a chi-square test against the reference's mix.

The profile is a tracked output, so it is computed to be the same bytes on every CPU: integer
sums of pixels (exact in float64), quantile edges that are data values, counts, and math.fsum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PROFILE_VERSION = 1
QUANTILE_BINS = 10  # PSI over the reference's deciles
HISTOGRAM_BINS = 16  # the brightness and confidence histograms, for people (the plots), not the test
# PSI: under 0.1 no shift, 0.1-0.2 a moderate one, over 0.2 a real one (the usual credit-scoring rule).
PSI_DRIFT = 0.2
# A predicted-class mix this unlikely (chi-square p) under the reference's mix is drift.
CLASS_MIX_ALPHA = 0.001
# Below this many images a PSI over 10 bins is mostly sampling noise (its mean is about 9 / n): no verdict.
MIN_IMAGES = 200
PSI_FLOOR = 1e-4  # an empty bin's share, so that PSI stays finite
CHANNELS = ("red", "green", "blue")
LUMA_WEIGHTS = (299, 587, 114)  # ITU-R 601 luma, in thousandths: integer sums stay exact


@dataclass(frozen=True)
class DriftReport:
    images: int
    scores: dict[str, float]  # feature -> PSI; "class_mix" -> chi-square p-value
    drifted: tuple[str, ...]  # the features past their threshold, in the order of `scores`

    @property
    def verdict(self) -> str:
        """`no drift`, `drift: <features>`, or why there is no verdict (too few images)."""
        if self.images < MIN_IMAGES:
            return f"no verdict: {self.images} images, fewer than {MIN_IMAGES}"
        return f"drift: {', '.join(self.drifted)}" if self.drifted else "no drift"

    def as_dict(self) -> dict:
        """The report as JSON-ready values (the batch's summary, the service's /drift)."""
        return {"images": self.images, "verdict": self.verdict, "drifted": list(self.drifted), "scores": self.scores}


def _exact_ratio(numerator: np.ndarray, denominator: int) -> np.ndarray:
    # Integer numerators below 2**53: one rounding, at the division, on every CPU.
    return numerator.astype(np.float64) / denominator


def pixel_features(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: each channel's mean and spread (0-1), brightness (0-1) and sharpness (mean neighbour step)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (n, height, width, 3), got {images.dtype} {images.shape}")
    pixels = images.shape[1] * images.shape[2]
    values = images.astype(np.int64)
    sums = values.sum(axis=(1, 2))
    squares = (values * values).sum(axis=(1, 2))
    features = {}
    for index, channel in enumerate(CHANNELS):
        total, total_squares = sums[:, index], squares[:, index]
        features[f"mean_{channel}"] = _exact_ratio(total, 255 * pixels)
        # Variance as one exact integer over another: n * sum(x^2) - sum(x)^2, divided once, sqrt once.
        variance = _exact_ratio(pixels * total_squares - total * total, (255 * pixels) ** 2)
        features[f"spread_{channel}"] = np.sqrt(variance)
    luma = values @ np.asarray(LUMA_WEIGHTS, dtype=np.int64)  # integers: exact whatever the BLAS
    features["brightness"] = _exact_ratio(luma.sum(axis=(1, 2)), 1000 * 255 * pixels)
    steps = np.abs(np.diff(luma, axis=1)).sum(axis=(1, 2)) + np.abs(np.diff(luma, axis=2)).sum(axis=(1, 2))
    neighbours = (images.shape[1] - 1) * images.shape[2] + images.shape[1] * (images.shape[2] - 1)
    features["sharpness"] = _exact_ratio(steps, 1000 * 255 * neighbours)
    return features


def _row_fsums(matrix: np.ndarray) -> np.ndarray:
    return np.array([math.fsum(row) for row in matrix.tolist()])


def embedding_moments(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per dimension: the embeddings' mean and standard deviation, correctly rounded sums (math.fsum)."""
    values = embeddings.astype(np.float64)
    count = len(values)
    mean = _row_fsums(values.T) / count
    spread = np.sqrt(_row_fsums(((values - mean) ** 2).T) / count)
    return mean, spread


def model_features(
    probabilities: np.ndarray, embeddings: np.ndarray, embedding_mean: np.ndarray, embedding_spread: np.ndarray
) -> dict[str, np.ndarray]:
    """Per image: the top probability, the embedding's norm and its standardised distance from the reference mean."""
    values = embeddings.astype(np.float64)
    # A dimension the reference never moved would divide by zero: it counts in units of 1.
    scale = np.where(embedding_spread > 0, embedding_spread, 1.0)
    standardised = (values - embedding_mean) / scale
    return {
        "confidence": probabilities.max(axis=1).astype(np.float64),
        "embedding_norm": np.sqrt(_row_fsums(values * values)),
        "embedding_distance": np.sqrt(_row_fsums(standardised * standardised) / values.shape[1]),
    }


def _counts(values: np.ndarray, edges: list[float]) -> np.ndarray:
    # Bin i holds edges[i-1] < value <= edges[i]; the first and last bins are open-ended.
    return np.bincount(np.searchsorted(np.asarray(edges), values, side="left"), minlength=len(edges) + 1)


def _quantile_edges(values: np.ndarray) -> list[float]:
    # inverted_cdf picks data values (no interpolation arithmetic); ties merge bins.
    inner = np.quantile(values, np.arange(1, QUANTILE_BINS) / QUANTILE_BINS, method="inverted_cdf")
    return sorted({float(edge) for edge in inner})


def _histogram(values: np.ndarray, low: float, high: float) -> list[int]:
    edges = np.linspace(low, high, HISTOGRAM_BINS + 1)[1:-1]
    return _counts(values, edges.tolist()).tolist()


def reference_profile(
    images: np.ndarray, probabilities: np.ndarray, embeddings: np.ndarray, class_names: list[str]
) -> dict:
    """The profile batches are compared with: each feature's decile edges and shares, histograms, class mix."""
    if not (len(images) == len(probabilities) == len(embeddings)) or len(images) == 0:
        raise ValueError(
            f"expected as many images, probabilities and embeddings (> 0), got {len(images)}, "
            f"{len(probabilities)}, {len(embeddings)}"
        )
    count = len(images)
    mean, spread = embedding_moments(embeddings)
    features = {**pixel_features(images), **model_features(probabilities, embeddings, mean, spread)}
    profiled = {}
    for name, values in features.items():
        edges = _quantile_edges(values)
        profiled[name] = {
            "edges": edges,
            "shares": _exact_ratio(_counts(values, edges), count).tolist(),
            "mean": math.fsum(values.tolist()) / count,
        }
    predicted = np.bincount(probabilities.argmax(axis=1), minlength=len(class_names))
    return {
        "version": PROFILE_VERSION,
        "images": count,
        "test": {
            "feature": f"PSI over {QUANTILE_BINS} reference quantile bins, drift above {PSI_DRIFT}",
            "class_mix": f"chi-square against the reference mix, drift below p = {CLASS_MIX_ALPHA}",
            "min_images": MIN_IMAGES,
        },
        "features": profiled,
        "class_mix": dict(zip(class_names, _exact_ratio(predicted, count).tolist(), strict=True)),
        "histograms": {
            "brightness": _histogram(features["brightness"], 0.0, 1.0),
            "confidence": _histogram(features["confidence"], 0.0, 1.0),
        },
        "embedding": {"dimensions": int(embeddings.shape[1]), "mean": mean.tolist(), "spread": spread.tolist()},
    }


def batch_features(profile: dict, images: np.ndarray, probabilities: np.ndarray, embeddings: np.ndarray) -> dict:
    """The per-image features of a batch, measured as the profile's were (its embedding mean and spread)."""
    embedding = profile["embedding"]
    if embeddings.shape[1] != embedding["dimensions"]:
        raise ValueError(
            f"the embeddings have {embeddings.shape[1]} dimensions, the reference profile {embedding['dimensions']}: "
            "a profile of another model"
        )
    mean, spread = np.asarray(embedding["mean"]), np.asarray(embedding["spread"])
    return {
        **pixel_features(images),
        **model_features(probabilities, embeddings, mean, spread),
        "predicted": probabilities.argmax(axis=1),
    }


def population_stability(reference_shares: list[float], counts: np.ndarray) -> float:
    """PSI = sum over bins of (batch share - reference share) x ln(batch share / reference share)."""
    expected = np.maximum(np.asarray(reference_shares), PSI_FLOOR)
    actual = np.maximum(counts / max(counts.sum(), 1), PSI_FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def class_mix_p_value(reference_mix: dict[str, float], predicted: np.ndarray) -> float:
    """Chi-square p-value of the batch's predicted-class counts under the reference's mix."""
    expected_shares = np.maximum(np.asarray(list(reference_mix.values())), PSI_FLOOR)
    expected = expected_shares / expected_shares.sum() * len(predicted)
    observed = np.bincount(predicted, minlength=len(expected))
    statistic = float(np.sum((observed - expected) ** 2 / expected))
    # scipy.stats.chi2.sf's own kernel, imported here: evaluate, which only builds the profile,
    # then never loads scipy.stats (0.3 s of CPU per evaluate).
    from scipy.special import chdtrc

    return float(chdtrc(len(expected) - 1, statistic))


def compare(profile: dict, features: dict) -> DriftReport:
    """Score each feature of a batch against the profile: PSI per feature, chi-square on the class mix."""
    images = len(features["predicted"])
    scores, drifted = {}, []
    for name, reference in profile["features"].items():
        score = population_stability(reference["shares"], _counts(features[name], reference["edges"]))
        scores[name] = round(score, 4)
        if score > PSI_DRIFT:
            drifted.append(name)
    p_value = class_mix_p_value(profile["class_mix"], features["predicted"])
    scores["class_mix"] = float(f"{p_value:.3g}")
    if p_value < CLASS_MIX_ALPHA:
        drifted.append("class_mix")
    return DriftReport(images=images, scores=scores, drifted=tuple(drifted))


def concatenate_features(parts: list[dict]) -> dict:
    """One batch's features from several (the service's window of requests)."""
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
