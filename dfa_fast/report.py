"""Aggregating finished runs: mean and std over seeds per (data set, ratio, method, variant), with
the published numbers beside them (`dfa-fast report`, benchmarks/accuracy.py). A run's variant is
how its saved config departs from its preset (say `compute.precision=bf16_mixed`), so runs of
different settings are never averaged together."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from dfa_fast import config
from dfa_fast.errors import DfaError
from dfa_fast.published import published
from dfa_fast.run_dir import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE
from dfa_fast.trainer import headline

METHOD_ORDER = {name: i for i, name in enumerate(config.BUILTIN_METHODS)}
# Config keys that say where a run read its data, how it was watched and on how many cores, not
# what it computed: runs that differ only in these (and the seed) are seeds of one cell.
NOT_VARIANT = {("train", "seed"), ("train", "progress"), ("train", "tensorboard"),
               ("cpu", "threads"), ("compute", "device"), ("train", "log_every"),
               ("train", "ckpt_every"), ("parallel", "dist_timeout_s"), ("data", "path"),
               ("data", "num_workers"), ("train", "preset")}


def run_preset(summary: dict, saved: dict | None) -> str:
    """Return the preset a run was resolved from (runs saved before presets were recorded: the
    data set's published preset)."""
    return (saved or {}).get("train", {}).get("preset") or summary["dataset"]


def saved_config(run_dir: Path) -> dict | None:
    """Return a run's saved config as dicts, or None when it has none."""
    path = Path(run_dir) / CONFIG_FILE
    return config.load(path).to_dict() if path.is_file() else None


def run_variant(saved: dict | None, summary: dict) -> str:
    """Return how a run's saved config departs from its preset, as "section.key=value, ...":
    "" for the preset itself, and for a run without a saved config or without a preset."""
    if saved is None:
        return ""
    try:
        preset = config.resolve(run_preset(summary, saved), summary["ratio_pct"],
                                summary["method"]).to_dict()
    except DfaError:
        return ""
    return ", ".join(f"{section}.{key}={value}" for section, values in saved.items()
                     for key, value in values.items()
                     if value != preset[section][key] and (section, key) not in NOT_VARIANT
                     # what the preset's ``auto`` resolved to on the run's machine (precision
                     # auto) is the preset itself, not a variant of it
                     and preset[section][key] != "auto")


def find_summaries(paths: list[Path]) -> list[dict]:
    """Return the summaries of the runs at or below ``paths``."""
    found = []
    for path in map(Path, paths):
        files = [path / SUMMARY_FILE] if (path / SUMMARY_FILE).is_file() else \
            sorted(path.rglob(SUMMARY_FILE)) if path.is_dir() else []
        if not files:
            raise DfaError(f"{path}: no {SUMMARY_FILE} found; expected a finished run directory "
                           "(or a folder of them)")
        for f in files:
            summary = json.loads(f.read_text()) | {"run_dir": str(f.parent)}
            saved = saved_config(f.parent)
            found.append(summary | {"variant": run_variant(saved, summary),
                                    "preset": run_preset(summary, saved),
                                    "precision": (saved or {}).get("compute", {}).get("precision")})
    return found


def ratio_valid_selection(run_dir: Path, ratio_pct: float, metric: str) -> float:
    """Return the test number at the step a published-protocol valid split would select.

    That split has the training ratio (99% aligned at 1%) and selection takes its plain accuracy,
    which is (1 - r) x aligned + r x conflicting accuracy: computed from our balanced valid split's
    aligned and conflicting accuracies at every evaluation (earliest step on ties).
    """
    r = ratio_pct / 100
    evals = [e for e in map(json.loads, (Path(run_dir) / METRICS_FILE).read_text().splitlines())
             if e["kind"] == "eval"]
    best = max(evals, key=lambda e: ((1 - r) * e["valid"]["aligned"] +
                                     r * e["valid"]["conflicting"], -e["step"]))
    return best["test"][metric]


def aggregate(summaries: list[dict]) -> list[dict]:
    """Return one row per (data set, ratio, method, variant): seeds, means and stds of the test
    numbers."""
    groups = defaultdict(list)
    for summary in summaries:
        groups[summary.get("preset") or summary["dataset"], float(summary["ratio_pct"]),
               summary["method"], summary.get("variant", ""), summary["dataset"]].append(summary)
    rows = []
    for (preset, ratio, method, variant, dataset), runs in sorted(groups.items(), key=lambda item: (
            item[0][0], item[0][1], METHOD_ORDER.get(item[0][2], 9), item[0][3])):
        numbers = [headline(run) for run in runs]
        row = {"dataset": dataset, "preset": preset, "method": method, "variant": variant,
               "ratio_pct": ratio, "n_seeds": len(runs),
               "seeds": sorted(run["seed"] for run in runs),
               "steps": sorted({run["steps"] for run in runs}),
               "precisions": sorted({run.get("precision") or "fp32" for run in runs}),
               "report_metric": runs[0]["report_metric"]}
        for run, n in zip(runs, numbers):
            n["ratio_valid"] = ratio_valid_selection(run["run_dir"], ratio, run["report_metric"])
        for name in ("selected", "paper_protocol", "final", "ratio_valid"):
            values = np.asarray([n[name] for n in numbers], dtype=float)
            row[f"test_acc_{name}_mean"] = float(values.mean())
            row[f"test_acc_{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        row["selected_minus_paper"] = row["test_acc_selected_mean"] - \
            row["test_acc_paper_protocol_mean"]
        row["published"] = published(dataset, ratio, method)
        row["wall_seconds_mean"] = float(np.mean([run["wall_seconds"] for run in runs]))
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Return the rows as a Markdown table (percent, mean +- std over seeds); a variant column
    appears when some row is not its preset."""
    variants = any(r.get("variant") for r in rows)
    lines = ["| data set | ratio | method | " + ("variant | " if variants else "") +
             "seeds | valid-selected | paper protocol | final | selected - paper | "
             "ratio-valid selected | published |",
             "| --- " * (11 if variants else 10) + "|"]
    for r in rows:
        def cell(name):  # one seed has no spread to show
            mean = f"{r[f'test_acc_{name}_mean']:.2f}"
            return mean if r["n_seeds"] < 2 else f"{mean} ± {r[f'test_acc_{name}_std']:.2f}"
        pub = f"{r['published']:.2f}" if r["published"] is not None else "-"
        variant = f"{r.get('variant') or 'preset'} | " if variants else ""
        name = r["dataset"] if r.get("preset", r["dataset"]) == r["dataset"] else \
            f"{r['dataset']} ({r['preset']} preset)"
        lines.append(f"| {name} | {r['ratio_pct']:g}% | {r['method']} | {variant}"
                     f"{r['n_seeds']} | {cell('selected')} | {cell('paper_protocol')} | "
                     f"{cell('final')} | {r['selected_minus_paper']:+.2f} | "
                     f"{cell('ratio_valid')} | {pub} |")
    return "\n".join(lines)
