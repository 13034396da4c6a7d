"""Figures of runs and grids (matplotlib, Agg backend): `dfa-fast plot` and `dfa-fast report --plot`.

The numbers behind a figure are read first (`run_series`, `grid_series`) and drawn second
(`plot_runs`, `plot_grid`), so the tests check the data, not the pixels. The output format is the
file's extension (png, svg or pdf); a figure is written to a temporary name and renamed, so an
interrupted call leaves no half-written file.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from dfa_fast.errors import DfaError
from dfa_fast.published import published
from dfa_fast.run_dir import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE

FORMATS = (".png", ".svg", ".pdf")
GROUPS = ("unbiased", "aligned", "conflicting")
STYLE = {"unbiased": "-", "aligned": ":", "conflicting": "--"}
# Train-record keys that are not loss terms.
NOT_LOSS = {"kind", "step", "lr", "images_per_s", "data_share", "step_ms", "peak_memory_gib",
            "weight", "weight_aligned", "weight_conflicting"}


def read_records(run_dir: Path) -> list[dict]:
    """Return a run's metrics records; a last line still being written is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise DfaError(f"{run_dir}: no {METRICS_FILE}; expected a run directory (the --out of "
                       "`dfa-fast train`)")
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines) - 1:
                raise DfaError(f"{path}: line {number + 1} is not JSON; expected one record a "
                               "line") from None
    return records


def run_label(run_dir: Path) -> str:
    """Return "<folder> (<method>, <ratio>%, seed <s>)" from the run's saved config."""
    run_dir = Path(run_dir)
    try:
        import yaml
        saved = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
        m, t, d = saved["method"], saved["train"], saved["data"]
        return f"{run_dir.name} ({m['name']}, {d['ratio_pct']:g}%, seed {t['seed']})"
    except (OSError, KeyError, TypeError, ValueError):
        return run_dir.name


def run_series(run_dir: Path) -> dict:
    """Return the series of one run (finished or in progress): evaluation steps with the valid and
    test unbiased, aligned and conflicting accuracies, train-record steps with the loss terms, the
    learning rate and the mean weights of aligned and conflicting samples, and the selected step
    (the summary's; for a run in progress, the best valid unbiased so far, earliest on ties)."""
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    evals = [r for r in records if r.get("kind") == "eval"]
    trains = [r for r in records if r.get("kind") == "train"]
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    selected = (summary.get("selected") or {}).get("step") if summary else None
    if summary is None and evals:
        selected = max(evals, key=lambda e: (e["valid"]["unbiased"], -e["step"]))["step"]
    losses = sorted({k for r in trains for k, v in r.items()
                     if k not in NOT_LOSS and isinstance(v, (int, float))})

    def column(rows, key):  # (steps, values) of the rows that have the key
        pairs = [(r["step"], r[key]) for r in rows if key in r]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    return {
        "label": run_label(run_dir), "finished": summary is not None, "selected_step": selected,
        "eval_steps": [e["step"] for e in evals],
        "accuracy": {split: {g: [e[split][g] for e in evals] for g in GROUPS}
                     for split in ("valid", "test")},
        "loss": {k: column(trains, k) for k in losses},
        "lr": column(trains, "lr"),
        "weight": {g: column(trains, f"weight_{g}") for g in ("aligned", "conflicting")},
    }


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise DfaError("plotting needs matplotlib; install it with `pip install matplotlib`") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _check_out(out: Path) -> Path:
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise DfaError(f"{out}: unknown figure format {out.suffix or '(none)'!r}; expected a file "
                       f"name ending in {', '.join(FORMATS)}")
    if not out.parent.is_dir():
        raise DfaError(f"{out.parent}: no such folder to write the figure into")
    return out


def _save(plt, fig, out: Path) -> Path:
    """Lay the figure out, write it under a temporary name renamed to ``out``, close it."""
    partial = out.with_name(f".{out.name}.partial{out.suffix}")
    try:
        fig.tight_layout()
        fig.savefig(partial, dpi=110, bbox_inches="tight")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
        plt.close(fig)
    return out


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Draw one or several runs overlaid (accuracies, loss terms, learning rate, weights) into
    ``out``; return it."""
    out = _check_out(out)
    series = [run_series(d) for d in run_dirs]
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    (ax_valid, ax_test, ax_loss), (ax_lr, ax_w, ax_key) = axes
    for i, s in enumerate(series):
        color = colors[i % len(colors)]
        for split, ax in (("valid", ax_valid), ("test", ax_test)):
            for group in GROUPS:
                ax.plot(s["eval_steps"], s["accuracy"][split][group], STYLE[group], color=color)
            if s["selected_step"] is not None:
                ax.axvline(s["selected_step"], color=color, alpha=0.4, linewidth=1)
        for j, (name, (steps, values)) in enumerate(s["loss"].items()):
            if len(series) == 1:  # one run: a colour per loss term
                ax_loss.plot(steps, values, color=colors[j % len(colors)], label=name)
            else:  # several: the run's colour, a line style per loss term
                ax_loss.plot(steps, values, color=color, label=f"{name} [{i + 1}]",
                             linestyle=["-", "--", ":", "-."][j % 4],
                             marker=None if j < 4 else ".")
        ax_lr.plot(*s["lr"], color=color)
        for group in ("aligned", "conflicting"):
            ax_w.plot(*s["weight"][group], STYLE[group], color=color)
        ax_key.plot([], [], color=color, linewidth=3,
                    label=f"[{i + 1}] {s['label']}" + ("" if s["finished"] else " (in progress)"))
    for group in GROUPS:
        ax_key.plot([], [], STYLE[group], color="gray", label=f"accuracy: {group}")
    for group in ("aligned", "conflicting"):
        ax_key.plot([], [], STYLE[group], color="black", label=f"weight W: {group}")
    ax_key.plot([], [], color="gray", alpha=0.4, label="selected checkpoint (best valid unbiased)")
    ax_key.legend(loc="center", frameon=False)
    ax_key.axis("off")
    for ax, title, ylabel in ((ax_valid, "valid accuracy", "%"), (ax_test, "test accuracy", "%"),
                              (ax_loss, "loss terms (train)", "loss"),
                              (ax_lr, "learning rate", "lr"),
                              (ax_w, "mean weight W, aligned vs conflicting", "W")):
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
    if not any(s["weight"][g][0] for s in series for g in ("aligned", "conflicting")):
        ax_w.text(0.5, 0.5, "no per-sample weights\n(vanilla, or a run logged before them)",
                  ha="center", va="center", transform=ax_w.transAxes, color="gray")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if any(s["loss"] for s in series):
        ax_loss.set_yscale("log")
        ax_loss.legend(fontsize=8)
    return _save(plt, fig, out)


def grid_series(rows: list[dict]) -> dict:
    """Return, per data set (and preset), per method (and variant): ratios, means and stds of the
    valid-selected test accuracy, and the published numbers at those ratios."""
    panels: dict = defaultdict(dict)
    for r in sorted(rows, key=lambda r: r["ratio_pct"]):
        panel = r["dataset"] if r.get("preset", r["dataset"]) == r["dataset"] else \
            f"{r['dataset']} ({r['preset']} preset)"
        name = r["method"] + (f" [{r['variant']}]" if r.get("variant") else "")
        line = panels[panel].setdefault(name, {"ratio": [], "mean": [], "std": [],
                                               "published": []})
        line["ratio"].append(r["ratio_pct"])
        line["mean"].append(r["test_acc_selected_mean"])
        line["std"].append(r["test_acc_selected_std"])
        line["published"].append(published(r["dataset"], r["ratio_pct"], r["method"]))
    return dict(panels)


def plot_grid(rows: list[dict], out: Path) -> Path:
    """Draw accuracy against ratio, one panel per data set, mean and std over seeds, published
    numbers as markers, into ``out``; return it."""
    out = _check_out(out)
    if not rows:
        raise DfaError("no finished run to plot")
    panels = grid_series(rows)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel, lines) in zip(axes[0], panels.items()):
        metric = "conflicting" if panel.startswith("bffhq") else "unbiased"
        for i, (name, line) in enumerate(lines.items()):
            color = colors[i % len(colors)]
            ax.errorbar(line["ratio"], line["mean"], yerr=line["std"], color=color, marker="o",
                        capsize=3, label=name)
            pub = [(x, p) for x, p in zip(line["ratio"], line["published"]) if p is not None]
            if pub:
                ax.plot(*zip(*pub), linestyle="none", marker="x", markersize=9, color=color)
        ax.plot([], [], linestyle="none", marker="x", color="gray", label="published")
        ax.set_xscale("log")
        ratios = sorted({x for line in lines.values() for x in line["ratio"]})
        ax.set_xticks(ratios, [f"{x:g}%" for x in ratios])
        ax.minorticks_off()
        ax.set(title=panel, xlabel="bias-conflicting ratio",
               ylabel=f"test {metric} accuracy (%), valid-selected")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, out)
