"""Images/s of the FFCV train loader against a torch DataLoader over the same split stored as PNG
files in the published DisEnt layout (the reference implementation's input path).

Both: batch 256, shuffled, 2 workers, first epoch excluded (FFCV compiles its pipeline then),
median of 3 epochs; each loader yields uint8/float batches ready for the step on the CPU.

    python benchmarks/loader.py --cmnist data/cmnist/1pct --cifar10c data/cifar10c/1pct

Writes benchmarks/results/loader.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from train_throughput import PngFolder, export_pngs  # noqa: E402


def epochs_per_second(loader, epochs: int = 4) -> float:
    """Return the median images/s over epochs 2..``epochs`` of a loader."""
    rates = []
    for epoch in range(epochs):
        start, seen = time.perf_counter(), 0
        for batch in loader:
            seen += len(batch[1]) if isinstance(batch, (list, tuple)) else len(batch)
        if epoch > 0:
            rates.append(seen / (time.perf_counter() - start))
    return statistics.median(rates)


def measure(split: Path) -> dict:
    """Return {"ffcv_images_per_s", "png_images_per_s"} of one prepared split."""
    from dfa_fast.data.loaders import make_train_loader
    ffcv = epochs_per_second(make_train_loader(split / "train.beton", 256, seed=0, num_workers=2))
    with tempfile.TemporaryDirectory() as pngs:
        export_pngs(split / "train.beton", Path(pngs))
        loader = torch.utils.data.DataLoader(PngFolder(Path(pngs)), batch_size=256, shuffle=True,
                                             num_workers=2, drop_last=True,
                                             persistent_workers=True)
        png = epochs_per_second(loader)
    return {"ffcv_images_per_s": ffcv, "png_images_per_s": png, "speedup": ffcv / png,
            "split": str(split / "train.beton")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cmnist", type=Path, default=Path("data/cmnist/1pct"))
    parser.add_argument("--cifar10c", type=Path, default=Path("data/cifar10c/1pct"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"cmnist": measure(args.cmnist), "cifar10c": measure(args.cifar10c)}
    table = "| split | FFCV images/s | PNG DataLoader images/s | speed-up |\n| --- | --- | --- | --- |\n"
    table += "\n".join(f"| {name} train | {r['ffcv_images_per_s']:.0f} | "
                       f"{r['png_images_per_s']:.0f} | {r['speedup']:.1f}x |"
                       for name, r in results.items())
    table += ("\n\nBatch 256, random order, 2 workers each, first epoch excluded, median of 3 "
              "epochs; torch.set_num_threads(1) in the main process. Goal: FFCV at least 20x.")
    write_results("loader", {**results, "workers": 2, "batch_size": 256}, table)
    print(table)


if __name__ == "__main__":
    main()
