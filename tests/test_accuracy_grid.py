"""benchmarks/accuracy.py continues a grid across sessions: an interrupted run resumes from its
latest checkpoint (not over from step 0), a cell never started is started, a finished cell is
archived and counts as finished in a fresh checkout without the runs, and the table is written from
whatever has finished, naming the cells left out."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from dfa_fast import config
from dfa_fast.trainer import Trainer
from test_trainer import interrupt_at

REPO = Path(__file__).resolve().parents[1]
# Set by the in-process trainer's single-process rendezvous: a grid's runs must pick their own.
LAUNCH = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
OVERRIDES = ["train.eval_every=20", "train.log_every=10", "train.ckpt_every=20"]


def grid(cmnist_full, tmp_path, seeds, *extra):
    command = [sys.executable, str(REPO / "benchmarks" / "accuracy.py"), "--dataset", "cmnist",
               "--data", str(cmnist_full), "--ratios", "1", "--methods", "vanilla",
               "--seeds", seeds, "--steps", "50", "--runs", str(tmp_path / "runs"),
               "--results", str(tmp_path / "results"), "--name", "grid", "--jobs", "1",
               *[a for o in OVERRIDES for a in ("--set", o)], *extra]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          env={**{k: v for k, v in os.environ.items() if k not in LAUNCH},
                               "PYTHONPATH": str(REPO)})


def test_accuracy_grid_resumes_interrupted_runs_and_reports_what_finished(cmnist_full, tmp_path,
                                                                          monkeypatch):
    run_dir = tmp_path / "runs" / "cmnist" / "1pct" / "vanilla" / "seed0"
    cfg = config.resolve("cmnist", 1, "vanilla", {
        **config.parse_overrides(OVERRIDES + ["train.progress=false", "cpu.threads=1"]),
        "data": {"path": str(cmnist_full / "1pct")}})
    cfg.train.steps = 50
    interrupt_at(Trainer(cfg, run_dir), 33, monkeypatch)  # the session ended during step 33
    assert not (run_dir / "summary.json").exists()

    done = grid(cmnist_full, tmp_path, "0,1")
    assert done.returncode == 0, done.stderr
    # seed 0 went on from its step-20 checkpoint (a resumed session tags its saves -r1) ...
    tags = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["tag"]
    assert tags.endswith("-r1")
    train_steps = [json.loads(line)["step"] for line in
                   (run_dir / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line)["kind"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 49
    # ... and seed 1, never started, ran from the beginning.
    assert json.loads((run_dir.parent / "seed1" / "summary.json").read_text())["steps"] == 50
    written = json.loads((tmp_path / "results" / "grid.json").read_text())
    rows = written["rows"]
    assert [(r["method"], r["seeds"]) for r in rows] == [("vanilla", [0, 1])]
    # The shared result helper records the checkout's commit, the date and the command, and the
    # grid's figure is drawn beside its table.
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    table = (tmp_path / "results" / "grid.md").read_text()
    if head.returncode == 0:
        head = head.stdout.strip()
        assert written["git"]["commit"] == head and isinstance(written["git"]["dirty"], bool)
        assert f"Commit: {head[:12]}" in table
    else:  # a source tree without git
        assert written["git"] == {"commit": None, "dirty": None}
        assert "Commit: not a git checkout" in table
    assert written["date"].endswith("UTC") and "accuracy.py" in written["command"]
    assert (tmp_path / "results" / "grid.png").stat().st_size > 10_000
    assert not list((tmp_path / "results").glob(".*partial*"))

    # A table from what has finished: seed 2 has no run and is named, not invented.
    report = grid(cmnist_full, tmp_path, "0,1,2", "--report-only")
    assert report.returncode == 0, report.stderr
    assert "1 cell(s) have no finished run" in report.stderr and "seed 2" in report.stderr
    written = json.loads((tmp_path / "results" / "grid.json").read_text())
    assert written["missing_cells"] == ["1% vanilla seed 2"]
    assert not (run_dir.parent / "seed2").exists()

    # A fresh checkout: the runs are gone, the committed archive is not; nothing runs again.
    archived = tmp_path / "results" / "accuracy-runs" / "cmnist" / "1pct" / "vanilla"
    assert sorted(p.name for p in archived.iterdir()) == ["seed0", "seed1"]
    assert sorted(p.name for p in (archived / "seed0").iterdir()) == [
        "config.yaml", "metrics.jsonl", "summary.json"]
    shutil.rmtree(tmp_path / "runs")
    again = grid(cmnist_full, tmp_path, "0,1")
    assert again.returncode == 0, again.stderr
    assert "start" not in again.stdout and not (tmp_path / "runs").exists()
    assert json.loads((tmp_path / "results" / "grid.json").read_text())["rows"] == rows
