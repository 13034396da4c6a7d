"""Draw a results file's accuracy rows (accuracy against ratio per method, mean and std over seeds,
published numbers as markers), the figure of `dfa-fast report --plot`, from a committed
benchmarks/results/accuracy-*.json when its runs are not at hand.

    python benchmarks/plot_results.py benchmarks/results/accuracy-cmnist.json \\
        --out docs/figures/cmnist-accuracy.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dfa_fast.errors import DfaError
from dfa_fast.plot import plot_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="accuracy results JSON files")
    parser.add_argument("--out", type=Path, required=True, help="the figure (.png, .svg, .pdf)")
    args = parser.parse_args()
    rows = []
    for path in args.results:
        try:
            rows += json.loads(path.read_text())["rows"]
        except (OSError, ValueError, KeyError) as err:
            sys.exit(f"{path}: not an accuracy results file with rows ({err})")
    try:
        print(f"wrote {plot_grid(rows, args.out)}")
    except DfaError as err:
        sys.exit(str(err))


if __name__ == "__main__":
    main()
