"""Human-readable summaries of prepared splits (`dfa-fast data info`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dfa_fast.data.beton import load_sidecar
from dfa_fast.errors import DfaError


# A (label, bias) cell of a valid split with fewer images than this makes the group-balanced
# selection metric rest on a few images (docs/data.md, "The valid split").
THIN_CELL = 10


def thin_cell_note(counts) -> str | None:
    """Return a note on the cells of a count matrix that hold fewer than THIN_CELL samples, among
    the cells present (those the unbiased accuracy averages), or None when there are none."""
    matrix = np.asarray(counts)
    present = matrix[matrix > 0]
    thin = int((present < THIN_CELL).sum())
    if not thin:
        return None
    return (f"{thin} of the {present.size} (label, bias) cells that the unbiased accuracy "
            f"averages hold fewer than {THIN_CELL} images (fewest {int(present.min())})")


def find_betons(path: Path | str) -> list[Path]:
    """Return the `.beton` files a path names: the file itself (or its sidecar) or all below a folder."""
    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".beton")
    if path.is_file() or path.suffix == ".beton":
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*.beton") if not p.name.startswith("."))
        if found:
            return found
        raise DfaError(f"{path}: no .beton files below this folder; expected the output of "
                       "`dfa-fast prepare`")
    raise DfaError(f"{path}: not found; expected a .beton, its .json sidecar or a folder of them")


def counts_table(counts: list[list[int]]) -> str:
    """Return the (label x bias) count matrix as aligned text, aligned cells marked with '*'."""
    matrix = np.asarray(counts)
    width = max(6, len(str(matrix.max())) + 2)
    lines = ["label\\bias" + "".join(f"{b:>{width}} " for b in range(matrix.shape[1]))]
    for y, row in enumerate(matrix):
        cells = "".join(f"{v:>{width}}{'*' if y == b else ' '}" for b, v in enumerate(row))
        lines.append(f"{y:>10}" + cells)
    return "\n".join(lines)


def describe(beton: Path, verify: bool = False) -> str:
    """Return the summary of one split: sidecar fields, counts table, aligned/conflicting totals."""
    meta = load_sidecar(beton, verify=verify)
    counts = np.asarray(meta["counts"])
    aligned = int(np.trace(counts)) if counts.shape[0] == counts.shape[1] else 0
    total = int(counts.sum())
    shape = "x".join(map(str, meta["image_shape"]))
    ratio = meta.get("ratio")
    jpeg = meta["image_encoding"] == "jpg" and "jpeg_quality" in meta
    # The ratio is the training split's (the others show their own shares below); imported data
    # has no seed.
    facts = [f"data set {meta.get('dataset')}", f"split {meta['split']}"]
    if ratio is not None and meta["split"] == "train":
        facts.append(f"ratio {ratio * 100:g}%")
    if meta.get("seed") is not None:
        facts.append(f"seed {meta['seed']}")
    lines = [
        f"{beton}",
        "  " + ", ".join(facts + [f"format v{meta['format_version']}"]),
        f"  {meta['num_samples']} samples, image {shape} {meta['image_encoding']}"
        f"{' q' + str(meta['jpeg_quality']) if jpeg else ''}, "
        f"{meta['num_classes']} classes, {meta['num_biases']} bias classes, "
        f"{meta['beton_bytes'] / 2**20:.1f} MiB{', sha256 verified' if verify else ''}",
        "  builder: " + ", ".join(f"{k}={v}" for k, v in sorted(meta.get("builder", {}).items())),
    ]
    lines += [f"  source {name}: sha256 {digest}" for name, digest in
              sorted(meta.get("sources", {}).items())]
    lines.append(f"  aligned {aligned} ({100 * aligned / total:.2f}%), conflicting "
                 f"{total - aligned} ({100 * (total - aligned) / total:.2f}%)")
    note = thin_cell_note(counts) if meta["split"].startswith("valid") else None
    if note:
        lines.append(f"  selection: {note}; a checkpoint selected on this split rests on them")
    lines += ["  " + line for line in counts_table(meta["counts"]).splitlines()]
    return "\n".join(lines)
