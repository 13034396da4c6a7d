"""BFFHQ-style faces from UTKFace: target age (young 10-29 / old 40-59), bias gender.

Bias labels: 0 = female, 1 = male, so aligned (label == bias) means young women and old men, as in
BFFHQ. Valid and test take the same number of faces from each of the four (age, gender) groups;
`test_conflict` is the bias-conflicting half of test, the number BFFHQ reports. Training keeps every
remaining aligned face and draws, per class, enough conflicting faces for the requested ratio.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from dfa_fast.data.beton import refuse_existing, write_splits
from dfa_fast.data.sources import FaceFiles, LazyImages, load_utkface
from dfa_fast.data.splits import ratio_key, ratio_tag, rng_for
from dfa_fast.errors import DfaError

NUM_CLASSES = 2
AGE_RANGES = ((10, 29), (40, 59))  # label 0 young, 1 old
CLASS_NAMES = ("young", "old")
BIAS_NAMES = ("female", "male")
_GROUPS, _TRAIN = 0, 1


def face_labels(files: FaceFiles) -> tuple[np.ndarray, np.ndarray]:
    """Return (label, bias) per file: label 0/1 young/old (-1 outside both age ranges),
    bias 0/1 female/male."""
    labels = np.full(len(files.ages), -1, dtype=np.int64)
    for label, (low, high) in enumerate(AGE_RANGES):
        labels[(files.ages >= low) & (files.ages <= high)] = label
    return labels, 1 - files.genders  # UTKFace gender: 0 male, 1 female


def build_faces(src: Path | str, out: Path | str, ratios: list[float], *, seed: int = 0,
                valid_per_group: int = 250, test_per_group: int = 250, size: Optional[int] = None,
                jpeg_quality: int = 90, overwrite: bool = False,
                progress: bool = True) -> list[Path]:
    """Build the faces set at each ratio into ``out/<ratio>pct/``; return those folders."""
    out = Path(out)
    folders = [out / ratio_tag(r) for r in ratios]
    refuse_existing(folders, overwrite)
    if valid_per_group < 1 or test_per_group < 1:
        raise DfaError("valid and test need at least one face per group; expected sizes >= 1")
    files = load_utkface(src)
    labels, biases = face_labels(files)
    rng = rng_for(seed, _GROUPS)
    held = {"valid": [], "test": []}
    pools = {}
    for y in range(NUM_CLASSES):
        for b in range(NUM_CLASSES):
            members = rng.permutation(np.flatnonzero((labels == y) & (biases == b)))
            need = valid_per_group + test_per_group
            if len(members) <= need:
                raise DfaError(f"{src}: only {len(members)} {CLASS_NAMES[y]} {BIAS_NAMES[b]} faces; "
                               f"expected more than {need} (valid + test per group)")
            held["valid"].append(members[:valid_per_group])
            held["test"].append(members[valid_per_group:need])
            pools[y, b] = np.sort(members[need:])

    def split(rows: np.ndarray):  # the faces of these rows, decoded when written
        rows = np.sort(rows)
        return (LazyImages(files.read, [files.names[r] for r in rows], str(src), size),
                labels[rows], biases[rows])

    valid_rows, test_rows = (np.concatenate(held[k]) for k in ("valid", "test"))
    conflict_rows = test_rows[labels[test_rows] != biases[test_rows]]
    params = {"age_ranges": AGE_RANGES, "valid_per_group": valid_per_group,
              "test_per_group": test_per_group, "size": size, "bias": "gender (0 female, 1 male)",
              "label": "age (0 young, 1 old)"}
    for ratio, folder in zip(ratios, folders):
        rng = rng_for(seed, _TRAIN, ratio_key(ratio))
        train_rows = []
        for y in range(NUM_CLASSES):
            aligned, conflicting = pools[y, y], pools[y, 1 - y]
            # n_c / (n_a + n_c) = ratio  =>  n_c = ratio / (1 - ratio) * n_a
            n_conflict = int(round(ratio / (1.0 - ratio) * len(aligned)))
            if n_conflict == 0:
                raise DfaError(f"ratio {ratio * 100:g}% leaves class {CLASS_NAMES[y]} "
                               f"({len(aligned)} aligned faces) without bias-conflicting faces; "
                               "expected a larger ratio")
            if n_conflict > len(conflicting):
                raise DfaError(f"ratio {ratio * 100:g}% needs {n_conflict} conflicting "
                               f"{CLASS_NAMES[y]} faces but only {len(conflicting)} are left; "
                               "expected a smaller ratio")
            train_rows += [aligned, rng.choice(conflicting, n_conflict, replace=False)]
        info = {"dataset": "faces", "ratio": ratio, "seed": seed, "builder": params,
                "sources": files.checksums}
        write_splits(folder, {"train": split(np.concatenate(train_rows)),
                              "valid": split(valid_rows), "test": split(test_rows),
                              "test_conflict": split(conflict_rows)},
                     num_classes=NUM_CLASSES, num_biases=NUM_CLASSES, info=info,
                     overwrite=overwrite, encoding="jpg", jpeg_quality=jpeg_quality,
                     progress=progress)
    return folders

