"""Is the bias branch still biased? A diagnostic of finished DisEnt and LfF runs on their training split.

DisEnt and LfF only work while the bias branch (GCE-trained) gets the bias-conflicting training
samples wrong: its per-sample loss is what singles them out for the intrinsic branch (W). This
script loads a run's checkpoint and reports, on the training split, by aligned and conflicting
samples: the label accuracy of the intrinsic (debiased) and bias branches, for DisEnt also of the
bias classifier C_b fed only its own encoder's features ([0, z_b]) or only the intrinsic ones
([z_i, 0]), and the relative-difficulty weight W = l_b / (l_b + l_i) recomputed from the
checkpoint's per-sample losses (class-wise max normalised, as in training, without the EMA).

    python benchmarks/bias_branch.py runs/accuracy/cmnist/5pct/disent/seed0 runs/accuracy-input1/cmnist

Arguments are run directories or folders of them (every run below with a summary.json). Writes
benchmarks/results/<--name>.{json,md} (default bias-branch).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402


@torch.no_grad()
def diagnose(summary: dict, checkpoint: str) -> dict:
    """Return the training-split statistics of one run's checkpoint (see the module docstring)."""
    from dfa_fast.kernels.reference import relative_difficulty
    from dfa_fast.trainer import load_run, split_loader
    trainer = load_run(Path(summary["run_dir"]), checkpoint)
    cfg, model = trainer.cfg, trainer.method.model
    loader = split_loader(trainer, "train")
    columns: dict[str, list[torch.Tensor]] = {}

    def keep(name, value):
        columns.setdefault(name, []).append(value.float().cpu())
    for batch in loader:
        x, y = batch.image.to(trainer.method.dtype), batch.label
        if cfg.method.name == "disent":
            z_i, z_b = model.features(x)
            logits_i = model.fc_i(torch.cat([z_i, z_b], 1))
            logits_b = model.fc_b(torch.cat([z_i, z_b], 1))
            keep("bias_own_features", model.fc_b(torch.cat([torch.zeros_like(z_i), z_b], 1))
                 .argmax(1) == y)
            keep("bias_intrinsic_features", model.fc_b(torch.cat([z_i, torch.zeros_like(z_b)], 1))
                 .argmax(1) == y)
        else:
            logits_i, logits_b = model.debiased(x), model.biased(x)
        keep("intrinsic", logits_i.argmax(1) == y)
        keep("bias", logits_b.argmax(1) == y)
        keep("loss_i", F.cross_entropy(logits_i.float(), y, reduction="none"))
        keep("loss_b", F.cross_entropy(logits_b.float(), y, reduction="none"))
        keep("label", y)
        keep("conflicting", batch.label != batch.bias)
    data = {name: torch.cat(parts) for name, parts in columns.items()}
    label, conflicting = data.pop("label").long(), data.pop("conflicting").bool()
    # W as in training, with the checkpoint's per-sample losses in place of the EMA buffers.
    rows = torch.arange(len(label))
    data["weight"] = relative_difficulty(data.pop("loss_i"), data.pop("loss_b"), label, rows,
                                         label, trainer.num_classes)
    row = {"run": summary["run_dir"], "checkpoint": checkpoint, "method": cfg.method.name,
           "ratio_pct": summary["ratio_pct"], "seed": summary["seed"],
           "input_scale": cfg.model.input_scale,
           "test_selected": summary["selected"]["test"][summary["report_metric"]],
           "n_aligned": int((~conflicting).sum()), "n_conflicting": int(conflicting.sum())}
    for name, values in data.items():
        scale = 1.0 if name == "weight" else 100.0
        row[f"{name}_aligned"] = float(values[~conflicting].mean()) * scale
        row[f"{name}_conflicting"] = float(values[conflicting].mean()) * scale
    return row


def table(rows: list[dict]) -> str:
    def number(row, key, digits=1):
        return f"{row[key]:.{digits}f}" if key in row else "-"
    lines = ["| run | ckpt | test (selected) | intrinsic acc al / cf | bias acc al / cf | "
             "C_b on [0, z_b] cf | C_b on [z_i, 0] cf | W al / cf |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['method']} {r['ratio_pct']:g}% seed {r['seed']}, input_scale "
            f"{r['input_scale']:.4g} | {r['checkpoint']} | {r['test_selected']:.2f} | "
            f"{number(r, 'intrinsic_aligned')} / {number(r, 'intrinsic_conflicting')} | "
            f"{number(r, 'bias_aligned')} / {number(r, 'bias_conflicting')} | "
            f"{number(r, 'bias_own_features_conflicting')} | "
            f"{number(r, 'bias_intrinsic_features_conflicting')} | "
            f"{number(r, 'weight_aligned', 3)} / {number(r, 'weight_conflicting', 3)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run directories or folders of them")
    parser.add_argument("--checkpoint", default="latest", choices=["latest", "best"],
                        help="latest = the final step (default), best = valid-selected")
    parser.add_argument("--name", default="bias-branch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from dfa_fast.report import find_summaries
    rows = [diagnose(summary, args.checkpoint) for summary in find_summaries(args.runs)
            if summary["method"] in ("disent", "lff")]  # Vanilla has no bias branch
    rows.sort(key=lambda r: (r["method"], r["input_scale"], r["ratio_pct"], r["seed"]))
    text = table(rows) + (
        "\n\nOn the training split, percent: label accuracy of the intrinsic (DisEnt C_i, LfF "
        "debiased) and bias (C_b, LfF biased) branches on aligned (al) and conflicting (cf) "
        "samples; C_b fed only the bias encoder's features ([0, z_b]) or only the intrinsic ones "
        "([z_i, 0]); W = e_b / (e_b + e_i) from the checkpoint's per-sample losses, class-max "
        "normalised (the EMA is not used). A biased bias branch gets the conflicting samples "
        "wrong and gives them a large W. One thread.")
    write_results(args.name, {"rows": rows}, text)
    print(text)


if __name__ == "__main__":
    main()
