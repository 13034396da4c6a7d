"""Readers of the raw data sets: MNIST IDX, CIFAR-10 (pickle batches, image tree or zip) and UTKFace.

Every reader returns decoded uint8 arrays (or, for the faces, lazily decoded files) plus the sha256
of each source file it read, which the builders record in the sidecars. Every failure is a
`DfaError` whose one-line message names the file and what was expected.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from dfa_fast.errors import DfaError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


@dataclass
class RawSplit:
    """Decoded images (N, H, W[, 3]) uint8 and their integer labels (N,)."""
    images: np.ndarray
    labels: np.ndarray


@dataclass
class RawSource:
    """The splits a reader found (e.g. "train", "test") and the sha256 of every file it read."""
    splits: dict[str, RawSplit]
    checksums: dict[str, str] = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Return the RGB uint8 (H, W, 3) array of an encoded image, or raise naming ``name``."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DfaError(f"{name}: cannot decode image ({err}); expected a PNG or JPEG file") from None


# ----------------------------------------------------------------------------------------- MNIST
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Return the uint8 array stored in an IDX file (gzip-compressed or not)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DfaError(f"{path}: cannot read ({err.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DfaError(f"{path}: corrupt or truncated gzip data ({err})") from None
    elif path.suffix == ".gz":
        raise DfaError(f"{path}: not a gzip file (magic {raw[:2].hex() or 'empty'}, expected 1f8b)")
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DfaError(f"{path}: bad IDX magic {raw[:4].hex() or 'empty'}; expected 000008NN "
                       "(unsigned bytes, NN dimensions)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DfaError(f"{path}: truncated IDX header; expected {ndim} dimension sizes")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise DfaError(f"{path}: IDX data has {len(raw) - header} bytes, expected {expected} "
                       f"for shape {tuple(shape)} (truncated or corrupt file)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DfaError(f"MNIST file {stem}[.gz] not found in {root}; expected the four IDX files "
                   f"{', '.join(s for pair in MNIST_FILES.values() for s in pair)}")


def load_mnist(root: Path | str) -> RawSource:
    """Return MNIST train and test as gray (N, 28, 28) uint8 images with their digit labels."""
    root = Path(root)
    if not root.is_dir():
        raise DfaError(f"{root}: MNIST folder not found; expected a folder with the four IDX files")
    source = RawSource(splits={})
    for split, (image_stem, label_stem) in MNIST_FILES.items():
        image_path, label_path = _find_idx(root, image_stem), _find_idx(root, label_stem)
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DfaError(f"{image_path}: shape {images.shape} does not match labels "
                           f"{labels.shape} in {label_path.name}; expected (N, 28, 28) and (N,)")
        if labels.max() > 9:
            raise DfaError(f"{label_path}: label {labels.max()} out of range; expected 0..9")
        source.splits[split] = RawSplit(images, labels.astype(np.int64))
        for path in (image_path, label_path):
            source.checksums[path.name] = sha256_file(path)
    return source


# -------------------------------------------------------------------------------------- CIFAR-10
def _unpickle_batch(data: bytes, name: str) -> RawSplit:
    try:
        # The official CIFAR-10 python release is a pickle; only open files you trust.
        batch = pickle.loads(data, encoding="bytes")
        pixels = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt batch
        raise DfaError(f"{name}: not a CIFAR-10 python batch ({type(err).__name__}); expected a "
                       "pickled dict with b'data' (N x 3072) and b'labels'") from None
    if pixels.ndim != 2 or pixels.shape[1] != 3072 or len(pixels) != len(labels):
        raise DfaError(f"{name}: data shape {pixels.shape}, expected (N, 3072) matching labels")
    return RawSplit(pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels)


def _concat(parts: list[RawSplit]) -> RawSplit:
    return RawSplit(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


BATCH_NAMES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _cifar_from_batches(read: Callable[[str], bytes], where: str) -> dict[str, RawSplit]:
    return {split: _concat([_unpickle_batch(read(name), f"{where}/{name}") for name in names])
            for split, names in BATCH_NAMES.items()}


class FileTree:
    """Uniform read access to a folder or a zip archive of files (relative POSIX paths)."""

    def __init__(self, path: Path):
        self.path = path
        self.zip = None
        if path.is_file():
            try:
                self.zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as err:
                raise DfaError(f"{path}: not a readable zip archive ({err})") from None
            names = [n for n in self.zip.namelist() if not n.endswith("/")]
        else:
            names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
        self.names = sorted(names)

    def read(self, name: str) -> bytes:
        try:
            return self.zip.read(name) if self.zip else (self.path / name).read_bytes()
        except (OSError, zipfile.BadZipFile, zlib.error, KeyError) as err:
            raise DfaError(f"{self.path}:{name}: cannot read ({err})") from None

    def checksum(self) -> str:
        """Return a sha256 of the archive file, or of all (path, bytes) pairs of a folder."""
        if self.zip:
            return sha256_file(self.path)
        digest = hashlib.sha256()
        for name in self.names:
            digest.update(name.encode() + b"\0" + self.read(name))
        return digest.hexdigest()


CIFAR_TREE_HELP = ("expected cifar-10-batches-py/ (data_batch_1..5, test_batch), "
                   "cifar-10-python.tar.gz, or an image tree / zip train/<class>/*.jpg|png and "
                   f"test/<class>/*.jpg|png with classes {', '.join(CIFAR10_CLASSES)}")


def _cifar_from_tree(tree: FileTree) -> dict[str, RawSplit]:
    # Strip one optional top folder (e.g. cifar10/train/...) so both zip styles work.
    prefix = ""
    if not any(n.startswith("train/") for n in tree.names):
        tops = {n.split("/", 1)[0] for n in tree.names if n.count("/") >= 3}
        prefix = next((t + "/" for t in sorted(tops) if any(n.startswith(f"{t}/train/")
                                                            for n in tree.names)), "")
    splits = {}
    for split in ("train", "test"):
        images, labels = [], []
        for label, cls in enumerate(CIFAR10_CLASSES):
            head = f"{prefix}{split}/{cls}/"
            files = [n for n in tree.names if n.startswith(head) and
                     n.lower().endswith(IMAGE_SUFFIXES)]
            if not files:
                raise DfaError(f"{tree.path}: no images under {head}; {CIFAR_TREE_HELP}")
            for name in files:  # class, then file name: a deterministic order
                images.append(decode_image(tree.read(name), f"{tree.path}:{name}"))
                labels.append(label)
        shapes = {im.shape for im in images}
        if shapes != {(32, 32, 3)}:
            raise DfaError(f"{tree.path}: CIFAR-10 images must be 32x32 RGB, found {sorted(shapes)}")
        splits[split] = RawSplit(np.stack(images), np.asarray(labels, dtype=np.int64))
    return splits


def load_cifar10(src: Path | str) -> RawSource:
    """Return CIFAR-10 train and test as (N, 32, 32, 3) uint8 images with labels 0..9."""
    src = Path(src)
    if not src.exists():
        raise DfaError(f"{src}: CIFAR-10 source not found; {CIFAR_TREE_HELP}")
    if src.is_file() and src.name.endswith((".tar.gz", ".tgz", ".tar")):
        try:
            with tarfile.open(src) as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}

                def read(name: str) -> bytes:
                    if name not in members:
                        raise DfaError(f"{src}: {name} missing from the archive; {CIFAR_TREE_HELP}")
                    return tar.extractfile(members[name]).read()
                splits = _cifar_from_batches(read, str(src))
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            raise DfaError(f"{src}: corrupt or truncated tar archive ({err})") from None
        return RawSource(splits, {src.name: sha256_file(src)})
    batches = next((d for d in (src, src / "cifar-10-batches-py") if (d / "data_batch_1").is_file()),
                   None)
    if batches is not None:
        def read(name: str) -> bytes:
            path = batches / name
            if not path.is_file():
                raise DfaError(f"{path}: missing; {CIFAR_TREE_HELP}")
            return path.read_bytes()
        splits = _cifar_from_batches(read, str(batches))
        checksums = {name: sha256_file(batches / name)
                     for names in BATCH_NAMES.values() for name in names}
        return RawSource(splits, checksums)
    tree = FileTree(src)
    return RawSource(_cifar_from_tree(tree), {src.name: tree.checksum()})


# --------------------------------------------------------------------------------------- UTKFace
@dataclass
class FaceFiles:
    """UTKFace files (relative names), their ages and genders (0 male, 1 female), and a reader."""
    names: list[str]
    ages: np.ndarray
    genders: np.ndarray
    read: Callable[[str], bytes]
    checksums: dict[str, str]


def parse_utkface_name(name: str) -> tuple[int, int]:
    """Return (age, gender) from a UTKFace name ``{age}_{gender}_{race}_{datetime}.jpg[.chip.jpg]``."""
    parts = Path(name).name.split("_")
    try:
        age, gender = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise DfaError(f"{name}: not a UTKFace file name; expected "
                       "{age}_{gender}_{race}_{datetime}.jpg.chip.jpg") from None
    if gender not in (0, 1) or not 0 <= age <= 130:
        raise DfaError(f"{name}: age {age} / gender {gender} out of range; expected gender 0 "
                       "(male) or 1 (female) and an age in years")
    return age, gender


def load_utkface(src: Path | str) -> FaceFiles:
    """Return the UTKFace images of a folder or zip (any depth), with ages and genders."""
    src = Path(src)
    if not src.exists():
        raise DfaError(f"{src}: UTKFace source not found; expected a folder or zip of "
                       "{age}_{gender}_{race}_{datetime}.jpg.chip.jpg files")
    tree = FileTree(src)
    names = [n for n in tree.names if n.lower().endswith(IMAGE_SUFFIXES)]
    if not names:
        raise DfaError(f"{src}: no face images found; expected "
                       "{age}_{gender}_{race}_{datetime}.jpg.chip.jpg files")
    parsed = np.asarray([parse_utkface_name(n) for n in names], dtype=np.int64)
    return FaceFiles(names, parsed[:, 0], parsed[:, 1], tree.read, {src.name: tree.checksum()})


class LazyImages:
    """Decodes (and optionally resizes to ``size`` x ``size``) file ``names[i]`` on access."""

    def __init__(self, read, names: list[str], where: str, size: Optional[int]):
        self.read, self.names, self.where, self.size = read, names, where, size
        self.shape: Optional[tuple] = None

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> np.ndarray:
        from PIL import Image
        name = f"{self.where}:{self.names[i]}"
        image = decode_image(self.read(self.names[i]), name)
        if self.size is not None and image.shape[:2] != (self.size, self.size):
            image = np.asarray(Image.fromarray(image).resize((self.size, self.size),
                                                             Image.BICUBIC))
        if self.shape is None:
            self.shape = image.shape
        elif image.shape != self.shape:
            raise DfaError(f"{name}: image is {image.shape[1]}x{image.shape[0]}, the others "
                           f"{self.shape[1]}x{self.shape[0]}; pass --size to resize all images")
        return image

