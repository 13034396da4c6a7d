"""Corrupted CIFAR-10: bias class k = corruption k of the chosen type (Type0 is the published one).

Train and valid come from CIFAR-10 train (valid held out), test from CIFAR-10 test with the
corruption uniform over the ten. Each image is corrupted with its own generator seeded by
(seed, split, row, corruption), so an image gets the same corruption in every ratio's build and the
work is shared between ratios and spread over processes without changing a byte.
"""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Optional

import numpy as np

from dfa_fast.data.beton import refuse_existing, write_splits
from dfa_fast.data.corruptions import CORRUPTION_TYPES, LEVELS, corrupt
from dfa_fast.data.sources import load_cifar10
from dfa_fast.data.splits import (balanced_biases, check_valid_bias, conflicting_biases,
                                  ratio_key, ratio_tag, rng_for)
from dfa_fast.errors import DfaError

NUM_CLASSES = 10
_HOLDOUT, _TEST, _VALID, _TRAIN, _CORRUPT = 0, 1, 2, 3, 4
_SOURCE_TRAIN, _SOURCE_TEST = 0, 1

# What every job needs, set once per process (the pool's initializer, or the caller).
_WORK: dict = {}


def _init_worker(work: dict) -> None:
    import cv2
    cv2.setNumThreads(1)  # one process per core already
    _WORK.update(work)


def _corrupt_chunk(jobs: list[tuple[int, int, int]]) -> list[np.ndarray]:
    sources, names, level, seed = (_WORK[k] for k in ("sources", "names", "level", "seed"))
    return [corrupt(sources[split][row], names[bias], level,
                    rng_for(seed, _CORRUPT, split, row, bias)) for split, row, bias in jobs]


def corrupt_all(sources: dict[int, np.ndarray], jobs: list[tuple[int, int, int]], names: tuple,
                level: int, seed: int, workers: int, progress: bool) -> dict:
    """Return {(source split, row, bias): corrupted image} for every job, using ``workers``."""
    from tqdm import tqdm
    work = {"sources": sources, "names": names, "level": level, "seed": seed}
    chunks = [jobs[i:i + 256] for i in range(0, len(jobs), 256)]
    bar = tqdm(total=len(jobs), desc=f"corrupt (level {level})", unit="img", disable=not progress)
    results = []
    try:
        if workers > 1:
            # "spawn": forking a parent that runs threads (FFCV, numba, OpenCV) can deadlock.
            with multiprocessing.get_context("spawn").Pool(workers, _init_worker,
                                                           (work,)) as pool:
                for chunk, images in zip(chunks, pool.imap(_corrupt_chunk, chunks)):
                    results += images
                    bar.update(len(chunk))
        else:
            _WORK.update(work)
            for chunk in chunks:
                results += _corrupt_chunk(chunk)
                bar.update(len(chunk))
    finally:
        bar.close()
        _WORK.clear()
    return dict(zip(jobs, results))


def build_cifar10c(src: Path | str, out: Path | str, ratios: list[float], *, seed: int = 0,
                   corruption_type: str = "type0", level: int = 5, valid_size: int = 5000,
                   valid_bias: str = "balanced", workers: Optional[int] = None,
                   overwrite: bool = False, progress: bool = True) -> list[Path]:
    """Build Corrupted CIFAR-10 at each ratio into ``out/<ratio>pct/``; return those folders."""
    if corruption_type not in CORRUPTION_TYPES:
        raise DfaError(f"unknown corruption type {corruption_type!r}; expected one of "
                       f"{tuple(CORRUPTION_TYPES)}")
    if level not in LEVELS:
        raise DfaError(f"corruption level {level} out of range; expected one of {LEVELS}")
    check_valid_bias(valid_bias)
    out = Path(out)
    folders = [out / ratio_tag(r) for r in ratios]
    refuse_existing(folders, overwrite)
    source = load_cifar10(src)
    train, test = source.splits["train"], source.splits["test"]
    if not 0 < valid_size < len(train.labels):
        raise DfaError(f"valid size {valid_size} out of range; expected 1..{len(train.labels) - 1}")
    held = rng_for(seed, _HOLDOUT).permutation(len(train.labels))
    valid_rows, train_rows = np.sort(held[:valid_size]), np.sort(held[valid_size:])

    # (source split, rows, biases) of every split to write, per ratio.
    test_plan = (_SOURCE_TEST, np.arange(len(test.labels)),
                 balanced_biases(test.labels, NUM_CLASSES, rng_for(seed, _TEST)))
    plans = {}
    for ratio in ratios:
        key = ratio_key(ratio)
        if valid_bias == "balanced":
            valid_biases = balanced_biases(train.labels[valid_rows], NUM_CLASSES,
                                           rng_for(seed, _VALID))
        else:
            valid_biases = conflicting_biases(train.labels[valid_rows], NUM_CLASSES, ratio,
                                              rng_for(seed, _VALID, key), what="valid")
        plans[ratio] = {
            "train": (_SOURCE_TRAIN, train_rows,
                      conflicting_biases(train.labels[train_rows], NUM_CLASSES, ratio,
                                         rng_for(seed, _TRAIN, key))),
            "valid": (_SOURCE_TRAIN, valid_rows, valid_biases),
            "test": test_plan,
        }
    jobs = sorted({(split, int(r), int(b)) for plan in plans.values()
                   for split, rows, biases in plan.values() for r, b in zip(rows, biases)})
    images = corrupt_all({_SOURCE_TRAIN: train.images, _SOURCE_TEST: test.images}, jobs,
                         CORRUPTION_TYPES[corruption_type], level, seed,
                         workers or len(os.sched_getaffinity(0)), progress)
    labels = {_SOURCE_TRAIN: train.labels, _SOURCE_TEST: test.labels}
    params = {"corruption_type": corruption_type, "corruptions": list(CORRUPTION_TYPES[
        corruption_type]), "level": level, "valid_size": valid_size, "valid_bias": valid_bias}
    for ratio, folder in zip(ratios, folders):
        splits = {name: (np.stack([images[split, int(r), int(b)] for r, b in zip(rows, biases)]),
                         labels[split][rows], biases)
                  for name, (split, rows, biases) in plans[ratio].items()}
        info = {"dataset": "cifar10c", "ratio": ratio, "seed": seed, "builder": params,
                "sources": source.checksums}
        write_splits(folder, splits, num_classes=NUM_CLASSES, num_biases=NUM_CLASSES, info=info,
                     overwrite=overwrite, progress=progress)
    return folders
