"""Wall time of data preparation on this machine: Colored MNIST (four ratios), Corrupted CIFAR-10
Type0 at one ratio (all cores), and the BFFHQ-style faces set.

    python benchmarks/prepare.py --data-root ../shared/data

Writes benchmarks/results/prepare.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def timed(args: list[str]) -> float:
    """Return the wall seconds of one `dfa-fast` command (a fresh process, as a user runs it)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dfa_fast", *args, "--quiet"], check=True, cwd=REPO)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path,
                        default=Path(os.environ.get("DFA_DATA", REPO.parent / "shared" / "data")))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as out:
        out = Path(out)
        rows.append(("cmnist", "0.5, 1, 2, 5", timed(
            ["prepare", "cmnist", "--src", str(REPO / "data" / "mnist"), "--out",
             str(out / "cmnist")])))
        rows.append(("cifar10c type0 level 5", "1", timed(
            ["prepare", "cifar10c", "--src", str(args.data_root / "cifar10-jpeg.zip"),
             "--out", str(out / "cifar10c"), "--ratios", "1"])))
        rows.append(("faces (UTKFace, BFFHQ-style)", "0.5", timed(
            ["prepare", "faces", "--src", str(args.data_root / "utkface-10-29_40-59.zip"),
             "--out", str(out / "faces"), "--ratios", "0.5"])))
    table = "| data set | ratios (%) | wall time (s) |\n| --- | --- | --- |\n" + "\n".join(
        f"| {name} | {ratios} | {seconds:.1f} |" for name, ratios, seconds in rows)
    table += ("\n\nEach build is one `dfa-fast prepare` process (import, decode, build, write "
              "train/valid/test .beton with sidecars); Corrupted CIFAR-10 corrupts on all cores.")
    write_results("prepare", {"rows": [{"dataset": n, "ratios_pct": r, "seconds": s}
                                       for n, r, s in rows]}, table)
    print(table)


if __name__ == "__main__":
    main()
