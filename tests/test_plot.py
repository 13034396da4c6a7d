"""`dfa-fast plot` and `dfa-fast report --plot`: the data behind each figure equals the metrics
file's (the figures themselves are only checked to be written), runs in progress are drawn, and a
folder that is not a run is a one-line error. The logged weight statistics of a real DisEnt run
give the conflicting samples the larger weight."""
import json
import shutil

import pytest

from dfa_fast import config
from dfa_fast.cli import main
from dfa_fast.plot import grid_series, run_series
from dfa_fast.trainer import train
from test_report import write_run


@pytest.fixture(scope="module")
def disent_run(cmnist_full, tmp_path_factory):
    run = tmp_path_factory.mktemp("plot") / "disent"
    cfg = config.resolve("cmnist", 1, "disent", {
        "data": {"path": str(cmnist_full / "1pct")},
        "train": {"progress": False, "steps": 400, "eval_every": 100, "log_every": 50,
                  "ckpt_every": 400, "schedule_length": 0},
        "method": {"swap_start": 200}})
    train(cfg, run)
    return run


def records(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind]


def test_the_log_has_the_weights_of_aligned_and_conflicting_samples(disent_run):
    logged = records(disent_run, "train")
    assert all(0 < r["weight_aligned"] < 1 and 0 < r["weight_conflicting"] < 1 for r in logged)
    # The bias branch has learnt the colour: its loss, and so W, is larger on conflicting samples.
    assert logged[-1]["weight_conflicting"] > 2 * logged[-1]["weight_aligned"], logged[-1]


def test_the_plotted_series_are_the_metrics_files(disent_run, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert main(["plot", str(disent_run), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000 and f"wrote {out}" in capsys.readouterr().out
    series = run_series(disent_run)
    evals, trains = records(disent_run, "eval"), records(disent_run, "train")
    assert series["eval_steps"] == [e["step"] for e in evals] == [0, 100, 200, 300, 399]
    for split in ("valid", "test"):
        for group in ("unbiased", "aligned", "conflicting"):
            assert series["accuracy"][split][group] == [e[split][group] for e in evals]
    assert set(series["loss"]) == {"ce_i", "gce_b", "loss", "loss_dis", "loss_swap"}
    steps, values = series["loss"]["gce_b"]
    assert steps == [t["step"] for t in trains] and values == [t["gce_b"] for t in trains]
    assert series["lr"] == ([t["step"] for t in trains], [t["lr"] for t in trains])
    assert series["weight"]["conflicting"][1] == [t["weight_conflicting"] for t in trains]
    summary = json.loads((disent_run / "summary.json").read_text())
    assert series["finished"] and series["selected_step"] == summary["selected"]["step"]
    assert "disent, 1%, seed 0" in series["label"]


def test_several_runs_and_a_run_in_progress(disent_run, tmp_path):
    # A run in progress: no summary yet, and a last line half written.
    running = tmp_path / "running"
    shutil.copytree(disent_run, running)
    (running / "summary.json").unlink()
    lines = (running / "metrics.jsonl").read_text().splitlines()
    (running / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    series = run_series(running)
    evals = records(disent_run, "eval")[:-1]
    assert not series["finished"] and series["eval_steps"] == [e["step"] for e in evals]
    best = max(evals, key=lambda e: (e["valid"]["unbiased"], -e["step"]))
    assert series["selected_step"] == best["step"]
    out = tmp_path / "both.svg"
    assert main(["plot", str(disent_run), str(running), "--out", str(out)]) == 0
    assert out.read_text().lstrip().startswith("<?xml")
    assert main(["plot", str(running)]) == 0 and (running / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["{tmp}"], "no metrics.jsonl; expected a run directory"),
    (["{run}", "--out", "{tmp}/curves.jpg"], "unknown figure format '.jpg'"),
    (["{run}", "--out", "{tmp}/missing/curves.png"], "no such folder"),
])
def test_bad_input_is_a_one_line_error(disent_run, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path, run=disent_run) for a in args]
    assert main(["plot", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not list(tmp_path.rglob("*.partial*"))


def test_report_plot_draws_accuracy_against_ratio(tmp_path, capsys):
    root = tmp_path / "runs"
    for ratio, values in ((1.0, (80.0, 84.0)), (5.0, (88.0, 90.0))):
        for seed, value in enumerate(values):
            write_run(root / f"{ratio:g}pct" / "disent" / f"seed{seed}", method="disent",
                      ratio=ratio, seed=seed, selected=value, paper=value, final=value,
                      evals=[(500, 99.0, 50.0, value)])
    write_run(root / "1pct" / "vanilla" / "seed0", method="vanilla", ratio=1.0, seed=0,
              selected=55.0, paper=56.0, final=54.0, evals=[(500, 99.0, 40.0, 50.0)])
    out = tmp_path / "grid.png"
    assert main(["report", str(root), "--plot", str(out)]) == 0
    assert out.stat().st_size > 10_000 and f"wrote {out}" in capsys.readouterr().out
    from dfa_fast.report import aggregate, find_summaries
    lines = grid_series(aggregate(find_summaries([root])))["cmnist"]
    assert lines["disent"]["ratio"] == [1.0, 5.0]
    assert lines["disent"]["mean"] == pytest.approx([82.0, 89.0])
    assert lines["disent"]["std"] == pytest.approx([2 ** 1.5, 2 ** 0.5])
    assert lines["disent"]["published"] == [81.73, 89.66]
    assert lines["vanilla"] == {"ratio": [1.0], "mean": [55.0], "std": [0.0],
                                "published": [52.09]}
