"""Images/s of DisEnt Colored MNIST (global batch 256) at 1 and 2 ranks through launch/train.sh.

On this 2-core CPU machine the figure is a correctness-level one (two ranks share two cores with
their loader threads, and gloo all-reduces go through memory); on a GPU machine it measures real
data-parallel scaling.

    python benchmarks/scaling.py --data data/cmnist/1pct [--ranks 1,2] [--steps 600]

Writes benchmarks/results/scaling.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def measure(data: Path, ranks: int, steps: int, device: str) -> dict:
    """Return the median images/s and step time of one launch with ``ranks`` ranks."""
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch) / "run"
        env = {**os.environ, "NPROC": str(ranks), "PYTHON": sys.executable, "ZERO": "0",
               "DFA_DEVICE": device, "PRECISION": "fp32"}
        subprocess.run(["bash", str(REPO / "launch" / "train.sh"), "--preset", "cmnist",
                        "--ratio", "1", "--method", "disent", "--data", str(data),
                        "--out", str(run_dir), "--steps", str(steps),
                        "--set", "train.eval_every=1000000", "--set", "train.log_every=100",
                        "--set", "train.ckpt_every=1000000", "--set", "train.progress=false",
                        "--set", "method.swap_start=0"],
                       check=True, env=env, cwd=REPO, capture_output=True)
        lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [l for l in lines if l["kind"] == "train"][1:-1] or \
        [l for l in lines if l["kind"] == "train"]
    return {"ranks": ranks, "images_per_s": statistics.median(l["images_per_s"] for l in windows),
            "step_ms": statistics.median(l["step_ms"] for l in windows),
            "data_share": statistics.median(l["data_share"] for l in windows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/cmnist/1pct"))
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    rows = [measure(args.data.resolve(), int(r), args.steps, args.device)
            for r in args.ranks.split(",")]
    base = rows[0]["images_per_s"]
    for row in rows:
        row["speedup"] = row["images_per_s"] / base
        row["efficiency"] = row["speedup"] / (row["ranks"] / rows[0]["ranks"])
    table = "| ranks | images/s | step (ms) | data share | speed-up | efficiency |\n"
    table += "| --- | --- | --- | --- | --- | --- |\n" + "\n".join(
        f"| {r['ranks']} | {r['images_per_s']:.0f} | {r['step_ms']:.1f} | "
        f"{r['data_share']:.2f} | {r['speedup']:.2f}x | {100 * r['efficiency']:.0f}% |"
        for r in rows)
    note = ("\n\nDisEnt on Colored MNIST 1%, global batch 256 split over the ranks, swap on from "
            f"step 1, ZeRO 0, {args.device}")
    if args.device == "cpu":
        note += (", one OpenMP thread per rank (DS_ACCELERATOR=cpu, gloo). On a 2-core machine "
                 "this is a correctness-level figure, not a scaling result: the ranks and their "
                 "loader threads share two cores.")
    write_results(f"scaling-{args.device}", {"rows": rows, "device": args.device,
                                             "steps": args.steps}, table + note)
    print(table + note)


if __name__ == "__main__":
    main()
