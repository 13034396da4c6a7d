"""The time-to-accuracy schedule search: one row per tried variant (finished or still running),
from the run directories themselves, so the search is evidence and not only its winner.

    python benchmarks/schedule_search.py --name schedule-search-cifar10c runs/search/c1-*

Rows already in benchmarks/results/<name>.json whose run is not given are kept (run folders do not
outlive the machine; the results file does), so a search adds up over sessions; a given run replaces
its old row. Each row: the run's departures from its preset (the variant), steps done of steps planned, the
test number at the best valid evaluation, the best test number (paper protocol) and the last one,
the mean step time and the wall time. Writes benchmarks/results/<name>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

from dfa_fast.published import published  # noqa: E402
from dfa_fast.report import run_preset, run_variant, saved_config  # noqa: E402
from dfa_fast.run_dir import METRICS_FILE  # noqa: E402


def row(run_dir: Path) -> dict:
    """Return the search row of one run directory (finished or not)."""
    saved = saved_config(run_dir)
    if saved is None:
        raise SystemExit(f"{run_dir}: no config.yaml; expected a run directory")
    lines = [json.loads(x) for x in (run_dir / METRICS_FILE).read_text().splitlines()]
    evals = [e for e in lines if e["kind"] == "eval"]
    train = [e for e in lines if e["kind"] == "train"]
    metric = saved["train"]["report_metric"]
    summary = {"dataset": saved["data"]["dataset"], "ratio_pct": saved["data"]["ratio_pct"],
               "method": saved["method"]["name"]}
    best = max(evals, key=lambda e: (e["valid"]["unbiased"], -e["step"]))
    return {"run": run_dir.name, **summary, "preset": run_preset(summary, saved),
            "variant": run_variant(saved, summary), "steps_planned": saved["train"]["steps"],
            "steps_done": (train[-1]["step"] + 1) if train else 0,
            "finished": (run_dir / "summary.json").is_file(),
            "selected": best["test"][metric], "selected_step": best["step"],
            "paper_protocol": max(e["test"][metric] for e in evals),
            "last": evals[-1]["test"][metric], "last_step": evals[-1]["step"],
            "step_ms": sum(e["step_ms"] for e in train) / max(1, len(train)),
            "published": published(summary["dataset"], summary["ratio_pct"], summary["method"])}


def _recorded(name: str) -> list[dict]:
    """The rows of an earlier <name>.json (none if there is none)."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="*", help="run directories (new or updated rows)")
    parser.add_argument("--name", default="schedule-search")
    args = parser.parse_args()
    rows = {r["run"]: r for r in _recorded(args.name)}
    rows.update((r["run"], r) for r in (row(d) for d in args.runs))
    rows = [rows[k] for k in sorted(rows)]
    lines = ["| run | data set | ratio | method | variant (vs the preset) | steps | valid-selected "
             "| paper protocol | last eval | step ms | published |", "| --- " * 11 + "|"]
    for r in rows:
        steps = f"{r['steps_done']}/{r['steps_planned']}" + ("" if r["finished"] else " (not finished)")
        lines.append(f"| {r['run']} | {r['dataset']} | {r['ratio_pct']:g}% | {r['method']} | "
                     f"{r['variant'] or r['preset']} | {steps} | {r['selected']:.2f} "
                     f"(step {r['selected_step']}) | {r['paper_protocol']:.2f} | "
                     f"{r['last']:.2f} | {r['step_ms']:.0f} | "
                     f"{r['published'] if r['published'] is not None else '-'} |")
    table = "\n".join(lines) + (
        "\n\nTest accuracy (%, the preset's report metric) of single runs, seed 0; one thread per "
        "run, two runs at a time on the 2-core machine; step ms is the mean over the logged "
        "windows (evaluation excluded).")
    write_results(args.name, {"rows": rows}, table)
    print(table)


if __name__ == "__main__":
    main()
