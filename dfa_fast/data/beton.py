"""Writing FFCV `.beton` splits atomically with their JSON sidecars, and reading the sidecars back.

A split is one `.beton` with the fields image (RGB), label, bias and index (0..N-1, the row of the
sample in the per-sample loss EMA), plus `<split>.json` next to it: the builder's parameters, seed,
source checksums, image shape and encoding, per-(label, bias) counts, the `.beton`'s size and sha256,
and the format version. Training refuses a `.beton` whose sidecar is missing or does not match.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from dfa_fast.data.sources import sha256_file
from dfa_fast.data.splits import count_matrix
from dfa_fast.errors import DfaError

FORMAT_VERSION = 1
FIELDS = ("image", "label", "bias", "index")
ENCODINGS = ("raw", "jpg")
# FFCV's file header (ffcv/types.py HeaderType), read here without importing FFCV (seconds).
_FFCV_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                         ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)


class _Samples:
    """The indexable data set FFCV's writer reads: (image, label, bias, index) per row.

    It runs in FFCV's writer process, whose parent waits for a sample count and would hang if the
    worker died; so a failure (say, an image that does not decode) is written to ``error_file``, a
    black image stands in, and the parent raises the recorded error once the writer returns.
    """

    def __init__(self, images: Sequence[np.ndarray], labels: np.ndarray, biases: np.ndarray,
                 shape: tuple, error_file: Path):
        self.images, self.labels, self.biases = images, labels, biases
        self.shape, self.error_file = shape, error_file

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        try:
            image = np.ascontiguousarray(self.images[i])
        except Exception as err:  # noqa: BLE001 - reported by the parent, see the class docstring
            if not self.error_file.exists():
                self.error_file.write_text(str(err) if isinstance(err, DfaError)
                                           else f"sample {i}: {type(err).__name__}: {err}")
            image = np.zeros(self.shape, np.uint8)
        return image, int(self.labels[i]), int(self.biases[i]), int(i)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename; returns None."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextmanager
def own_threads():
    """Keep the calling thread's PyTorch and numba thread counts across a call into FFCV: its
    compiler sets both to 1 when FFCV is first imported, and its `Loader` to the worker count when
    made and at every epoch, in the calling thread; a CPU training step would then run with
    ``data.num_workers`` threads instead of ``cpu.threads``."""
    import numba
    import torch

    threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if numba.get_num_threads() != numba_threads:
            numba.set_num_threads(numba_threads)


def import_ffcv() -> None:
    """Import FFCV (seconds, so only when needed) without changing the caller's thread counts."""
    if "ffcv.loader" not in sys.modules:
        with own_threads():
            import ffcv.loader  # noqa: F401


def write_split(folder: Path, split: str, images: Sequence[np.ndarray], labels: np.ndarray,
                biases: np.ndarray, *, num_classes: int, num_biases: int, encoding: str = "raw",
                jpeg_quality: int = 90, info: dict | None = None,
                progress: bool = True, label: str | None = None) -> dict:
    """Write ``<folder>/<split>.beton`` and its sidecar atomically; return the sidecar dict.

    ``images`` is any indexable of (H, W, 3) uint8 arrays of one shape (decoded lazily if it likes).
    One writer process keeps the file byte-identical for the same input (several race for pages).
    """
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    import ffcv.writer
    from tqdm import tqdm

    if encoding not in ENCODINGS:
        raise DfaError(f"image encoding {encoding!r} unknown; expected one of {ENCODINGS}")
    if not 1 <= jpeg_quality <= 100:
        raise DfaError(f"JPEG quality {jpeg_quality} out of range; expected 1..100")
    if len(images) != len(labels) or len(labels) != len(biases):
        raise DfaError(f"split {split}: {len(images)} images, {len(labels)} labels and "
                       f"{len(biases)} biases; expected equal counts")
    first = np.asarray(images[0])
    if first.ndim != 3 or first.shape[2] != 3 or first.dtype != np.uint8:
        raise DfaError(f"split {split}: images must be (H, W, 3) uint8, got {first.shape} "
                       f"{first.dtype}")
    final = folder / f"{split}.beton"
    tmp = folder / f".{split}.beton.partial"
    error_file = folder / f".{split}.error"
    fields = {"image": RGBImageField(write_mode=encoding, jpeg_quality=jpeg_quality),
              "label": IntField(), "bias": IntField(), "index": IntField()}
    writer = ffcv.writer.DatasetWriter(str(tmp), fields, num_workers=1)
    # FFCV draws its own bar; give it our label, or silence it.
    ffcv.writer.tqdm = functools.partial(tqdm, desc=f"write {label or folder.name + '/' + split}",
                                         disable=not progress, leave=False, unit="img")
    try:
        writer.from_indexed_dataset(_Samples(images, labels, biases, first.shape, error_file),
                                    chunksize=500)
        if error_file.exists():
            raise DfaError(error_file.read_text())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
        error_file.unlink(missing_ok=True)
    sidecar = {
        "format_version": FORMAT_VERSION,
        "split": split,
        "fields": list(FIELDS),
        "num_samples": int(len(labels)),
        "num_classes": int(num_classes),
        "num_biases": int(num_biases),
        "image_shape": list(first.shape),
        "image_encoding": encoding,
        "counts": count_matrix(np.asarray(labels), np.asarray(biases), num_classes,
                               num_biases).tolist(),
        "beton_bytes": final.stat().st_size,
        "beton_sha256": sha256_file(final),
        **(info or {}),
    }
    if encoding == "jpg":
        sidecar["jpeg_quality"] = jpeg_quality
    write_json_atomic(folder / f"{split}.json", sidecar)
    return sidecar


def load_sidecar(beton: Path | str, verify: bool = False) -> dict:
    """Return the sidecar of a `.beton` after checking that it matches the file.

    Always checks presence, format version, size and sample count; ``verify`` also checks the sha256.
    """
    beton = Path(beton)
    if not beton.is_file():
        raise DfaError(f"{beton}: no such .beton file; build it with `dfa-fast prepare ...`")
    side = beton.with_suffix(".json")
    if not side.is_file():
        raise DfaError(f"{beton}: sidecar {side.name} is missing; expected the JSON written by "
                       "`dfa-fast prepare` next to every .beton (rebuild the data set)")
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DfaError(f"{side}: unreadable sidecar ({err}); rebuild the data set") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise DfaError(f"{side}: format version {meta.get('format_version')!r}, expected "
                       f"{FORMAT_VERSION}; rebuild the data set with this dfa-fast")
    size = beton.stat().st_size
    if size != meta.get("beton_bytes"):
        raise DfaError(f"{beton}: {size} bytes but its sidecar says {meta.get('beton_bytes')}; "
                       "the file does not match its sidecar (rebuild the data set)")
    header = np.fromfile(beton, dtype=_FFCV_HEADER, count=1)
    if len(header) != 1 or int(header[0]["num_samples"]) != meta.get("num_samples"):
        raise DfaError(f"{beton}: header does not match the sidecar's "
                       f"{meta.get('num_samples')} samples (rebuild the data set)")
    if verify and sha256_file(beton) != meta.get("beton_sha256"):
        raise DfaError(f"{beton}: sha256 differs from its sidecar (corrupt file; rebuild it)")
    return meta


def read_int_field(beton: Path | str, field: str) -> np.ndarray:
    """Return every value of an integer field (label, bias or index) of a `.beton`, in file order."""
    import_ffcv()
    from ffcv.reader import Reader
    reader = Reader(str(beton))
    names = list(reader.handlers)
    if field not in names:
        raise DfaError(f"{beton}: no field {field!r}; expected fields {FIELDS}")
    return np.asarray(reader.metadata[f"f{names.index(field)}"], dtype=np.int64)


@contextmanager
def atomic_folder(final: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``final`` only if the block finishes without error.

    An existing ``final`` is refused without ``overwrite``; with it, the old folder is removed only
    after the new one is complete, so an interrupted build loses nothing and leaves no `.beton`.
    """
    refuse_existing([final], overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def refuse_existing(folders: Sequence[Path], overwrite: bool) -> None:
    """Raise before any work if an output folder exists and ``overwrite`` is not set."""
    for folder in folders:
        if folder.exists() and not overwrite:
            raise DfaError(f"{folder} already exists; pass --overwrite to replace it")


def write_splits(folder: Path, splits: dict[str, tuple], *, num_classes: int, num_biases: int,
                 info: dict, overwrite: bool, encoding: str = "raw", jpeg_quality: int = 90,
                 progress: bool = True) -> dict[str, dict]:
    """Write every (images, labels, biases) split into ``folder`` as one atomic unit.

    Returns the sidecars by split name.
    """
    with atomic_folder(folder, overwrite) as tmp:
        return {name: write_split(tmp, name, images, labels, biases, num_classes=num_classes,
                                  num_biases=num_biases, encoding=encoding,
                                  jpeg_quality=jpeg_quality, info=info, progress=progress,
                                  label=f"{folder.name}/{name}")
                for name, (images, labels, biases) in splits.items()}
