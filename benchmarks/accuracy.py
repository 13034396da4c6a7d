"""Accuracy grid: data set x ratio x method x seed from the published presets, run as parallel
single-threaded processes (up to the usable cores), then aggregated against the published numbers.

    python benchmarks/accuracy.py --dataset cmnist --data data/cmnist --seeds 0,1,2

Each run lives in RUNS/<preset>/<ratio>pct/<method>/seed<S>; interrupted runs are resumed from
their latest checkpoint. A finished run's summary, config and metrics (kilobytes, no checkpoints)
are copied into the committed archive, benchmarks/results/accuracy-runs/<preset>/..., and a cell
found there is finished: a grid longer than a session adds up over sessions, even when each one
starts from a fresh checkout without RUNS. Writes benchmarks/results/accuracy-<preset>.{json,md}
from the archive. A variant of the presets (`--set
model.input_scale=1`) is a grid of its own: give it its own --runs and --name.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

from dfa_fast.config import load_preset  # noqa: E402
from dfa_fast.errors import DfaError  # noqa: E402
from dfa_fast.plot import plot_grid  # noqa: E402
from dfa_fast.report import aggregate, find_summaries, markdown_table  # noqa: E402
from dfa_fast.run_dir import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE  # noqa: E402

ARCHIVED = (SUMMARY_FILE, CONFIG_FILE, METRICS_FILE)


def cell_path(ratio: str, method: str, seed: int) -> Path:
    """Return a cell's folder below a grid's runs or archive root."""
    return Path(f"{ratio}pct") / method / f"seed{seed}"


def archive_run(run_dir: Path, archived: Path) -> None:
    """Copy a finished run's summary, config and metrics into ``archived`` (once). The files go
    to a temporary folder renamed at the end: an interrupted copy leaves no half-archived cell."""
    if (archived / SUMMARY_FILE).is_file() or not (run_dir / SUMMARY_FILE).is_file():
        return
    partial = archived.with_name(archived.name + ".partial")
    for stale in (partial, archived):
        shutil.rmtree(stale, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in ARCHIVED:
        shutil.copy2(run_dir / name, partial / name)
    partial.rename(archived)


def run_command(args, ratio: str, method: str, seed: int, run_dir: Path) -> list[str]:
    """Return the `dfa-fast train` command of one grid cell (a resume if it was interrupted: from
    its last checkpoint, or over from step 0 when it stopped before the first)."""
    common = ["--set", "train.progress=false", "--set", f"cpu.threads={args.threads}"]
    if (run_dir / "config.yaml").is_file():
        return [sys.executable, "-m", "dfa_fast", "train", "--resume", str(run_dir), *common]
    command = [sys.executable, "-m", "dfa_fast", "train", "--preset", args.preset, "--ratio",
               ratio, "--method", method, "--data", str(args.data), "--out", str(run_dir),
               "--seed", str(seed), *common]
    if args.steps:
        command += ["--steps", str(args.steps)]
    for override in args.set:
        command += ["--set", override]
    return command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="cmnist")
    parser.add_argument("--preset", help="preset of the runs (default: the data set's published "
                                         "one; e.g. cifar10c-fast)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--data", type=Path, required=True, help="prepared data (all ratios)")
    parser.add_argument("--ratios", help="comma-separated percentages (default: the preset's)")
    parser.add_argument("--methods", default="vanilla,lff,disent")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, help="override the preset's steps (not published)")
    parser.add_argument("--runs", type=Path, default=Path("runs/accuracy"))
    parser.add_argument("--jobs", type=int, help="runs at a time (default: cores / threads)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override passed to every run (not a published setting: use its own "
                             "--runs and --name)")
    parser.add_argument("--name", help="results name (default: accuracy-<dataset>)")
    parser.add_argument("--report-only", action="store_true",
                        help="start nothing: write the table from the runs finished so far")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder of the results files (default: benchmarks/results)")
    parser.add_argument("--archive", type=Path,
                        help="folder of the finished runs' records (default: "
                             "RESULTS/accuracy-runs; commit it)")
    args = parser.parse_args()
    args.preset = args.preset or args.dataset
    args.jobs = args.jobs or max(1, len(os.sched_getaffinity(0)) // args.threads)
    ratios = args.ratios.split(",") if args.ratios else list(load_preset(args.preset)["ratios"])
    cells = [(r, m, int(s)) for s in args.seeds.split(",") for r in ratios
             for m in args.methods.split(",")]
    root = args.runs / args.preset
    archive = (args.archive or args.results / "accuracy-runs") / args.preset

    def archive_finished() -> None:
        for cell in cells:
            archive_run(root / cell_path(*cell), archive / cell_path(*cell))

    archive_finished()
    pending = [c for c in cells if not (archive / cell_path(*c) / SUMMARY_FILE).is_file()]
    running: list[tuple[subprocess.Popen, tuple]] = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    while (pending or running) and not args.report_only:
        while pending and len(running) < args.jobs:
            ratio, method, seed = cell = pending.pop(0)
            run_dir = root / cell_path(*cell)
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            log = open(run_dir.parent / f"seed{seed}.log", "a")
            print(f"start {cell}", flush=True)
            running.append((subprocess.Popen(run_command(args, ratio, method, seed, run_dir),
                                             stdout=log, stderr=subprocess.STDOUT, env=env), cell))
        time.sleep(5)
        for process, cell in list(running):
            if process.poll() is not None:
                running.remove((process, cell))
                print(f"done {cell} exit {process.returncode}", flush=True)
                archive_finished()
    wanted = {(float(r), m, s) for r, m, s in cells}
    archive_finished()
    try:
        summaries = [s for s in find_summaries([archive])
                     if (float(s["ratio_pct"]), s["method"], s["seed"]) in wanted]
    except DfaError as err:
        raise SystemExit(f"{err}; nothing written") from None
    found = {(float(s["ratio_pct"]), s["method"], s["seed"]) for s in summaries}
    missing = [f"{r:g}% {m} seed {s}" for r, m, s in sorted(wanted - found)]
    if not summaries:  # keep the results already written rather than replace them by nothing
        raise SystemExit(f"{archive}: no finished run of the requested cells; nothing written")
    if missing:
        print(f"warning: {len(missing)} cell(s) have no finished run and are left out: "
              f"{', '.join(missing)}", file=sys.stderr)
    rows = aggregate(summaries)
    table = markdown_table(rows)
    steps = sorted({s for row in rows for s in row["steps"]})
    table += (f"\n\nTest {rows[0]['report_metric'] if rows else ''} accuracy (%), mean ± std over "
              f"seeds; {steps} steps; valid-selected = the checkpoint with the best valid "
              "unbiased accuracy (our headline), paper protocol = the best test accuracy over "
              "the evaluations (selection on test, as published; with two classes a constant "
              "prediction already scores 50 % conflicting, so an untrained evaluation can be "
              "that maximum), final = the "
              "last step, ratio-valid selected = the checkpoint a valid split at the training "
              "ratio would pick by plain accuracy (the published protocol's valid split; computed "
              "as (1 - r) x aligned + r x conflicting valid accuracy): the trap of selecting on "
              "it. Arithmetic (compute.precision as the runs resolved it): "
              f"{', '.join(sorted({p for row in rows for p in row['precisions']}))}.")
    changes = [f"`--set {o}`" for o in args.set] + ([f"`--steps {args.steps}`"] if args.steps
                                                     else [])
    if changes:
        table += "\n\nNot the published presets: every run had " + ", ".join(changes) + "."
    else:
        table += ("\n\nLfF uses the benchmark's lr, batch and steps with EMA alpha 0.7 and q 0.7, "
                  "no LR decay (docs/method.md).")
    if missing:
        table += "\n\nLeft out (no finished run): " + ", ".join(missing) + "."
    name = args.name or f"accuracy-{args.preset}"
    write_results(name, {"rows": rows, "dataset": args.dataset, "overrides": args.set,
                         "missing_cells": missing}, table, args.results)
    plot_grid(rows, args.results / f"{name}.png")
    print(table)


if __name__ == "__main__":
    main()
