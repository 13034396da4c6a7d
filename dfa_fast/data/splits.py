"""Bias assignment shared by the builders: ratios, conflicting samples, balanced biases, counts."""
from __future__ import annotations

import numpy as np

from dfa_fast.errors import DfaError

# How a builder biases its valid split: uniformly like test, or at the training ratio (published).
VALID_BIAS_MODES = ("balanced", "ratio")


def check_valid_bias(valid_bias: str) -> None:
    """Refuse an unknown valid bias mode with a one-line error."""
    if valid_bias not in VALID_BIAS_MODES:
        raise DfaError(f"unknown valid bias mode {valid_bias!r}; expected one of "
                       f"{VALID_BIAS_MODES}")


def parse_ratios(text: str | list) -> list[float]:
    """Return bias-conflicting ratios as fractions from percentages like "0.5,1,2,5"."""
    items = text.split(",") if isinstance(text, str) else list(text)
    ratios = []
    for item in items:
        try:
            pct = float(item)
        except (TypeError, ValueError):
            raise DfaError(f"ratio {item!r} is not a number; expected percentages like 0.5,1,2,5") \
                from None
        if not 0.0 < pct < 100.0:
            raise DfaError(f"ratio {pct:g}% is outside (0%, 100%); expected percentages of "
                           "bias-conflicting samples like 0.5,1,2,5")
        ratios.append(pct / 100.0)
    if not ratios:
        raise DfaError("no ratio given; expected percentages like 0.5,1,2,5")
    return sorted(set(ratios))


def ratio_tag(ratio: float) -> str:
    """Return the folder name of a ratio, as in the published layout (0.005 -> "0.5pct")."""
    return f"{ratio * 100:g}pct"


def ratio_key(ratio: float) -> int:
    """Return an integer that identifies a ratio in seed sequences (parts per million)."""
    return int(round(ratio * 1_000_000))


def rng_for(seed: int, *stream: int) -> np.random.Generator:
    """Return the generator of one purpose (``stream``) of a build seeded with ``seed``."""
    return np.random.default_rng([int(seed), *map(int, stream)])


def conflicting_biases(labels: np.ndarray, num_classes: int, ratio: float,
                       rng: np.random.Generator, what: str = "train") -> np.ndarray:
    """Return bias labels with exactly round(ratio * n_y) conflicting samples in each class y.

    Aligned samples get b = y; each conflicting one gets a bias drawn uniformly from the others.
    """
    biases = labels.copy()
    for y in range(num_classes):
        members = np.flatnonzero(labels == y)
        n_conflict = int(round(ratio * len(members)))
        if n_conflict == 0:
            raise DfaError(f"ratio {ratio * 100:g}% leaves class {y} of the {what} split "
                           f"({len(members)} samples) without bias-conflicting samples; "
                           "expected a larger ratio")
        chosen = rng.choice(members, size=n_conflict, replace=False)
        # Uniform over the other classes: shift by 1..C-1 modulo C.
        biases[chosen] = (y + rng.integers(1, num_classes, size=n_conflict)) % num_classes
    return biases


def balanced_biases(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Return bias labels uniform over all classes within each class (cell counts differ by <= 1)."""
    biases = np.empty_like(labels)
    for y in range(num_classes):
        members = np.flatnonzero(labels == y)
        biases[members] = rng.permutation(np.resize(np.arange(num_classes), len(members)))
    return biases


def count_matrix(labels: np.ndarray, biases: np.ndarray, num_classes: int,
                 num_biases: int) -> np.ndarray:
    """Return the (label, bias) count matrix, shape (num_classes, num_biases)."""
    return np.bincount(labels * num_biases + biases,
                       minlength=num_classes * num_biases).reshape(num_classes, num_biases)
