"""Colored MNIST (LfF protocol): each digit's foreground takes the colour of its bias class.

Train and valid come from MNIST train (valid held out), test from MNIST test with the bias uniform
over the ten colours. Aligned samples have colour = digit; per class, exactly round(ratio * n_y)
training samples are bias-conflicting with a colour drawn uniformly from the other nine.
"""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np

from dfa_fast.data.beton import refuse_existing, write_splits
from dfa_fast.data.sources import load_mnist
from dfa_fast.data.splits import (balanced_biases, check_valid_bias, conflicting_biases,
                                  ratio_key, ratio_tag, rng_for)
from dfa_fast.errors import DfaError

NUM_CLASSES = 10
# The LfF palette (RGB in 0..1) of bias classes 0..9 (docs/data.md, "Colored MNIST").
LFF_PALETTE = np.array([
    (0.9837, 0.3125, 0.1686), (0.9905, 0.9156, 0.3515), (0.6730, 0.4611, 0.5798),
    (0.7833, 0.8316, 0.6013), (0.0880, 0.7780, 0.9818), (0.3214, 0.9611, 0.4464),
    (0.0246, 0.2357, 0.7587), (0.5552, 0.1016, 0.7618), (0.2077, 0.3929, 0.0187),
    (0.8337, 0.2024, 0.2669)])
# Ten fully saturated hues, evenly spaced: an easier, unambiguous colour bias.
HUE_PALETTE = np.array([colorsys.hsv_to_rgb(k / NUM_CLASSES, 1.0, 1.0) for k in range(NUM_CLASSES)])
PALETTES = {"lff": LFF_PALETTE, "hue": HUE_PALETTE}

# Independent random streams of one build (see splits.rng_for).
_HOLDOUT, _TEST, _VALID, _TRAIN = 0, 1, 2, 3


def colorize(gray: np.ndarray, biases: np.ndarray, palette: np.ndarray, jitter_std: float,
             rng: np.random.Generator) -> np.ndarray:
    """Return (N, 28, 28, 3) uint8 images: gray foreground times the jittered colour of its bias.

    Black background pixels stay black, so the colour is only on the digit.
    """
    colors = np.clip(palette[biases] + rng.normal(0.0, jitter_std, size=(len(biases), 3)), 0, 1)
    rgb = gray[..., None].astype(np.float32) * colors[:, None, None, :].astype(np.float32)
    return np.rint(rgb).astype(np.uint8)


def build_cmnist(src: Path | str, out: Path | str, ratios: list[float], *, seed: int = 0,
                 valid_size: int = 5000, valid_bias: str = "balanced", palette: str = "lff",
                 jitter_std: float = 0.005, overwrite: bool = False,
                 progress: bool = True) -> list[Path]:
    """Build Colored MNIST at each ratio into ``out/<ratio>pct/``; return those folders.

    ``valid_bias="balanced"`` draws the validation colours uniformly (like test) so that selection on
    group-balanced accuracy is not noise; ``"ratio"`` reproduces the published protocol (valid at the
    training ratio).
    """
    if palette not in PALETTES:
        raise DfaError(f"unknown palette {palette!r}; expected one of {tuple(PALETTES)}")
    check_valid_bias(valid_bias)
    if jitter_std < 0:
        raise DfaError(f"colour jitter std {jitter_std} is negative; expected >= 0")
    out = Path(out)
    folders = [out / ratio_tag(r) for r in ratios]
    refuse_existing(folders, overwrite)
    source = load_mnist(src)
    train, test = source.splits["train"], source.splits["test"]
    if not 0 < valid_size < len(train.labels):
        raise DfaError(f"valid size {valid_size} out of range; expected 1..{len(train.labels) - 1}")
    colors = PALETTES[palette]
    held = rng_for(seed, _HOLDOUT).permutation(len(train.labels))
    valid_rows, train_rows = np.sort(held[:valid_size]), np.sort(held[valid_size:])
    valid_labels, train_labels = train.labels[valid_rows], train.labels[train_rows]

    def colored(images, biases, *stream):
        return colorize(images, biases, colors, jitter_std, rng_for(seed, *stream, 1))

    test_biases = balanced_biases(test.labels, NUM_CLASSES, rng_for(seed, _TEST))
    test_split = (colored(test.images, test_biases, _TEST), test.labels, test_biases)
    balanced_valid = None
    if valid_bias == "balanced":
        biases = balanced_biases(valid_labels, NUM_CLASSES, rng_for(seed, _VALID))
        balanced_valid = (colored(train.images[valid_rows], biases, _VALID),
                          valid_labels, biases)
    params = {"valid_size": valid_size, "valid_bias": valid_bias, "palette": palette,
              "jitter_std": jitter_std, "source_train": len(train.labels)}
    for ratio, folder in zip(ratios, folders):
        key = ratio_key(ratio)
        biases = conflicting_biases(train_labels, NUM_CLASSES, ratio, rng_for(seed, _TRAIN, key))
        train_split = (colored(train.images[train_rows], biases, _TRAIN, key),
                       train_labels, biases)
        valid_split = balanced_valid
        if valid_split is None:
            biases = conflicting_biases(valid_labels, NUM_CLASSES, ratio,
                                        rng_for(seed, _VALID, key), what="valid")
            valid_split = (colored(train.images[valid_rows], biases, _VALID, key),
                           valid_labels, biases)
        info = {"dataset": "cmnist", "ratio": ratio, "seed": seed, "builder": params,
                "sources": source.checksums}
        write_splits(folder, {"train": train_split, "valid": valid_split, "test": test_split},
                     num_classes=NUM_CLASSES, num_biases=NUM_CLASSES, info=info,
                     overwrite=overwrite, progress=progress)
    return folders
