"""Importer of the published DisEnt folder layout (cmnist, cifar10c, bffhq), folder or zip.

Users who hold the released data sets convert them as they are. Label and bias come from the last
two ``_`` fields of each file name (``<id>_<label>_<bias>.<ext>``); files under ``align/`` must have
label == bias and files under ``conflict/`` label != bias.
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np

from dfa_fast.data.beton import refuse_existing, write_splits
from dfa_fast.data.sources import IMAGE_SUFFIXES, FileTree, LazyImages
from dfa_fast.data.splits import ratio_tag
from dfa_fast.errors import DfaError

NUM_CLASSES = {"cmnist": 10, "cifar10c": 10, "bffhq": 2}
# Images up to this side are stored raw in the .beton, larger ones as JPEG.
RAW_MAX_SIDE = 64
EXPECTED_TREE = """expected the published DisEnt layout:
  ROOT/<pct>/align/<k>/<id>_<label>_<bias>.<ext>      e.g. ROOT/1pct/align/3/00017_3_3.png
  ROOT/<pct>/conflict/<k>/<id>_<label>_<bias>.<ext>   e.g. ROOT/1pct/conflict/3/00042_3_7.png
  ROOT/valid/[<k>/]<id>_<label>_<bias>.<ext>          (or ROOT/<pct>/valid/...)
  ROOT/test/[<k>/]<id>_<label>_<bias>.<ext>
with <pct> like 0.5pct, 1pct, 2pct, 5pct"""
_PCT = re.compile(r"^\d+(\.\d+)?pct$")


def parse_name(name: str) -> tuple[int, int]:
    """Return (label, bias) from a file name ending in ``_<label>_<bias>.<ext>``."""
    parts = PurePosixPath(name).name.rsplit(".", 1)[0].split("_")
    try:
        if len(parts) < 3:
            raise ValueError
        return int(parts[-2]), int(parts[-1])
    except ValueError:
        raise DfaError(f"{name}: file name does not end in _<label>_<bias>.<ext> "
                       "(e.g. 00017_3_5.png)") from None


def _images(names: list[str]) -> list[str]:
    return [n for n in names if n.lower().endswith(IMAGE_SUFFIXES)]


def scan(tree: FileTree, tags: Optional[list[str]]) -> dict[str, dict[str, list[str]]]:
    """Return {pct tag: {split: [file names]}} of the published layout, or raise showing it."""
    names = tree.names
    found = sorted({n.split("/", 1)[0] for n in names
                    if _PCT.match(n.split("/", 1)[0]) and "/align/" in n})
    if not found:
        raise DfaError(f"{tree.path}: no <pct>/align/ folder found; {EXPECTED_TREE}")
    for tag in tags or []:
        if tag not in found:
            raise DfaError(f"{tree.path}: no {tag}/ folder (found {', '.join(found)}); "
                           f"{EXPECTED_TREE}")
    layout = {}
    for tag in tags or found:
        splits = {"train": _images([n for n in names if n.startswith((f"{tag}/align/",
                                                                      f"{tag}/conflict/"))])}
        for split in ("valid", "test"):
            own = _images([n for n in names if n.startswith(f"{tag}/{split}/")])
            splits[split] = own or _images([n for n in names if n.startswith(f"{split}/")])
        for split, files in splits.items():
            if not files:
                raise DfaError(f"{tree.path}: no {split} images for {tag}; {EXPECTED_TREE}")
        layout[tag] = splits
    return layout


def _labels(files: list[str], num_classes: int, where: Path) -> tuple[np.ndarray, np.ndarray]:
    pairs = np.asarray([parse_name(n) for n in files], dtype=np.int64).reshape(-1, 2)
    for name, (label, bias) in zip(files, pairs):
        if not (0 <= label < num_classes and 0 <= bias < num_classes):
            raise DfaError(f"{where}:{name}: label {label} / bias {bias} out of range; expected "
                           f"0..{num_classes - 1}")
        part = name.split("/")[1]
        if (part == "align" and label != bias) or (part == "conflict" and label == bias):
            raise DfaError(f"{where}:{name}: in {part}/ but label {label} and bias {bias} "
                           f"{'differ' if part == 'align' else 'agree'}")
    return pairs[:, 0], pairs[:, 1]


def import_folder(src: Path | str, out: Path | str, dataset: str, *,
                  ratios: Optional[list[float]] = None, jpeg_quality: int = 90,
                  overwrite: bool = False, progress: bool = True) -> list[Path]:
    """Convert a published-layout data set into ``out/<pct>/`` `.beton` splits; return them."""
    if dataset not in NUM_CLASSES:
        raise DfaError(f"unknown data set {dataset!r}; expected one of {tuple(NUM_CLASSES)}")
    src, out = Path(src), Path(out)
    if not src.exists():
        raise DfaError(f"{src}: folder not found; {EXPECTED_TREE}")
    tree = FileTree(src)
    layout = scan(tree, [ratio_tag(r) for r in ratios] if ratios else None)
    refuse_existing([out / tag for tag in layout], overwrite)
    num_classes = NUM_CLASSES[dataset]
    checksums = {src.name: tree.checksum()}
    for tag, splits in layout.items():
        arrays = {}
        for split, files in splits.items():
            labels, biases = _labels(files, num_classes, src)
            arrays[split] = (LazyImages(tree.read, files, str(src), None), labels, biases)
        if dataset == "bffhq":
            images, labels, biases = arrays["test"]
            keep = [i for i in range(len(labels)) if labels[i] != biases[i]]
            arrays["test_conflict"] = (LazyImages(tree.read, [images.names[i] for i in keep],
                                                  str(src), None), labels[keep], biases[keep])
        side = max(arrays["train"][0][0].shape[:2])
        encoding = "raw" if side <= RAW_MAX_SIDE else "jpg"
        train_labels, train_biases = arrays["train"][1:]
        info = {"dataset": dataset, "source_layout": "disent-folder",
                "ratio": float(np.mean(train_labels != train_biases)), "ratio_folder": tag,
                "seed": None, "sources": checksums,
                "builder": {"jpeg_quality": jpeg_quality} if encoding == "jpg" else {}}
        write_splits(out / tag, arrays, num_classes=num_classes, num_biases=num_classes,
                     info=info, overwrite=overwrite, encoding=encoding,
                     jpeg_quality=jpeg_quality, progress=progress)
    return [out / tag for tag in layout]
