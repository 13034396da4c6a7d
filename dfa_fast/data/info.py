"""Human-readable summaries of prepared splits (`dfa-fast data info`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dfa_fast.data.beton import load_sidecar
from dfa_fast.errors import DfaError


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
    lines = [
        f"{beton}",
        f"  data set {meta.get('dataset')}, split {meta['split']}, "
        f"{'ratio ' + format(ratio * 100, 'g') + '%, ' if ratio is not None else ''}"
        f"seed {meta.get('seed')}, format v{meta['format_version']}",
        f"  {meta['num_samples']} samples, image {shape} {meta['image_encoding']}"
        f"{' q' + str(meta['jpeg_quality']) if 'jpeg_quality' in meta else ''}, "
        f"{meta['num_classes']} classes, {meta['num_biases']} bias classes, "
        f"{meta['beton_bytes'] / 2**20:.1f} MiB{', sha256 verified' if verify else ''}",
        "  builder: " + ", ".join(f"{k}={v}" for k, v in sorted(meta.get("builder", {}).items())),
    ]
    lines += [f"  source {name}: sha256 {digest}" for name, digest in
              sorted(meta.get("sources", {}).items())]
    lines.append(f"  aligned {aligned} ({100 * aligned / total:.2f}%), conflicting "
                 f"{total - aligned} ({100 * (total - aligned) / total:.2f}%)")
    lines += ["  " + line for line in counts_table(meta["counts"]).splitlines()]
    return "\n".join(lines)
