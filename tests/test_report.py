"""`dfa-fast report` and benchmarks/accuracy.py's aggregation: seeds grouped per (data set, ratio,
method), mean and sample std, the published number beside them, and the selection a valid split at
the training ratio would make (the published protocol's trap)."""
import json
import math

import pytest

from dfa_fast.cli import main
from dfa_fast.report import aggregate, find_summaries, markdown_table


def metrics(aligned: float, conflicting: float, test: float) -> dict:
    return {"accuracy": test, "aligned": aligned, "conflicting": conflicting, "unbiased": test,
            "worst_group": 0.0}


def write_run(run_dir, *, method, ratio, seed, selected, paper, final, evals):
    """A finished run as the trainer leaves it: summary.json and the eval lines of metrics.jsonl.

    ``evals`` are (step, valid aligned, valid conflicting, test unbiased)."""
    run_dir.mkdir(parents=True)
    lines = [{"kind": "train", "step": 9, "loss": 1.0}]
    lines += [{"kind": "eval", "step": step, "valid": metrics(a, c, 0.0),
               "test": metrics(0.0, 0.0, t)} for step, a, c, t in evals]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))

    def point(step, value):
        return {"step": step, "test": metrics(0.0, 0.0, value), "valid": metrics(0, 0, 0)}
    summary = {"dataset": "cmnist", "method": method, "ratio_pct": ratio, "seed": seed,
               "steps": 1000, "report_metric": "unbiased", "wall_seconds": 10.0 + seed,
               "selected": point(500, selected), "paper_protocol": point(700, paper),
               "final": point(999, final)}
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def grid(tmp_path):
    root = tmp_path / "runs"
    # DisEnt 1%, two seeds. At 1% a ratio-valid split weighs aligned 0.99 and conflicting 0.01:
    # it picks step 500 (aligned 99) over step 1000 (aligned 90, conflicting 80).
    for seed, (sel, pap, fin) in enumerate([(80.0, 82.0, 78.0), (84.0, 86.0, 80.0)]):
        write_run(root / "1pct" / "disent" / f"seed{seed}", method="disent", ratio=1.0, seed=seed,
                  selected=sel, paper=pap, final=fin,
                  evals=[(500, 99.0, 10.0, 30.0 + seed), (1000, 90.0, 80.0, sel)])
    write_run(root / "1pct" / "vanilla" / "seed0", method="vanilla", ratio=1.0, seed=0,
              selected=55.0, paper=56.0, final=54.0, evals=[(500, 99.0, 40.0, 50.0)])
    return root


def test_aggregate_groups_seeds_with_sample_std_and_published(grid):
    rows = aggregate(find_summaries([grid]))
    assert [(r["method"], r["n_seeds"]) for r in rows] == [("vanilla", 1), ("disent", 2)]
    disent = rows[1]
    assert disent["seeds"] == [0, 1] and disent["ratio_pct"] == 1.0
    assert disent["test_acc_selected_mean"] == pytest.approx(82.0)
    assert disent["test_acc_selected_std"] == pytest.approx(math.sqrt(8.0))  # ddof=1
    assert disent["test_acc_paper_protocol_mean"] == pytest.approx(84.0)
    assert disent["test_acc_final_mean"] == pytest.approx(79.0)
    assert disent["selected_minus_paper"] == pytest.approx(-2.0)
    assert disent["published"] == pytest.approx(81.73)
    # The published protocol's valid split would have picked the early, biased checkpoint.
    assert disent["test_acc_ratio_valid_mean"] == pytest.approx(30.5)
    assert rows[0]["test_acc_selected_std"] == 0.0


def test_table_shows_spread_only_with_several_seeds(grid):
    table = markdown_table(aggregate(find_summaries([grid]))).splitlines()
    vanilla, disent = table[2], table[3]
    assert "| 55.00 | 56.00 | 54.00 |" in vanilla and "±" not in vanilla
    assert "82.00 ± 2.83" in disent and "| 81.73 |" in disent


def test_report_cli_prints_and_writes_json(grid, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["report", str(grid), "--json", str(out)]) == 0
    assert "| cmnist | 1% | disent | 2 |" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {"vanilla", "disent"}


def test_report_of_a_folder_without_runs_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no summary.json found" in err and len(err.splitlines()) == 1


def test_runs_of_other_settings_are_separate_rows_named_by_their_variant(tmp_path):
    """Seeds that differ only in where and how they ran are one cell; a config change (say the
    precision) makes its own row, named by how it departs from the preset."""
    from dfa_fast import config
    root = tmp_path / "runs"
    settings = [(0, {"cpu": {"threads": 1}, "train": {"progress": False}}),
                (1, {"cpu": {"threads": 2}, "data": {"path": "/elsewhere"}}),
                (0, {"compute": {"precision": "bf16_mixed"}}),
                (1, {"compute": {"precision": "bf16_mixed"}, "method": {"q": 0.8}})]
    for i, (seed, overrides) in enumerate(settings):
        run_dir = root / f"run{i}"
        write_run(run_dir, method="disent", ratio=1.0, seed=seed, selected=80.0 + i,
                  paper=81.0 + i, final=79.0 + i, evals=[(500, 90.0, 80.0, 80.0 + i)])
        config.save(config.resolve("cmnist", 1, "disent", overrides), run_dir / "config.yaml")
    rows = aggregate(find_summaries([root]))
    assert [(r["variant"], r["n_seeds"], r["test_acc_selected_mean"]) for r in rows] == [
        ("", 2, 80.5), ("compute.precision=bf16_mixed", 1, 82.0),
        ("method.q=0.8, compute.precision=bf16_mixed", 1, 83.0)]
    table = markdown_table(rows).splitlines()
    assert "| variant |" in table[0] and "| preset | 2 |" in table[2]
    assert "| compute.precision=bf16_mixed | 1 |" in table[3]
    # the preset alone keeps the table without the column
    assert "variant" not in markdown_table(rows[:1])


def test_what_a_presets_auto_precision_chose_is_the_preset_not_a_variant(tmp_path):
    """cifar10c-fast says compute.precision: auto; its runs save fp32 or bf16_mixed by machine and
    stay one cell, with the precisions they ran in listed."""
    from dfa_fast import config
    root = tmp_path / "runs"
    for seed, precision in ((0, "fp32"), (1, "bf16_mixed")):
        run_dir = root / f"run{seed}"
        write_run(run_dir, method="disent", ratio=1.0, seed=seed, selected=30.0, paper=31.0,
                  final=29.0, evals=[(500, 90.0, 30.0, 30.0)])
        cfg = config.resolve("cifar10c-fast", 1, "disent", {"compute": {"precision": precision}})
        config.save(cfg, run_dir / "config.yaml")
    for summary in root.rglob("summary.json"):  # write_run's summaries are Colored MNIST's
        summary.write_text(summary.read_text().replace('"cmnist"', '"cifar10c"'))
    rows = aggregate(find_summaries([root]))
    assert [(r["variant"], r["n_seeds"], r["precisions"]) for r in rows] == [
        ("", 2, ["bf16_mixed", "fp32"])]
