"""Is the bias branch still biased? A diagnostic of DisEnt and LfF runs on their training split.

DisEnt and LfF only work while the bias branch (GCE-trained) gets the bias-conflicting training
samples wrong: its per-sample loss is what singles them out for the intrinsic branch (W). This
script reports, on the training split, by aligned and conflicting samples: the label accuracy of
the intrinsic (debiased) and bias branches, for DisEnt also of the bias classifier C_b fed only its
own encoder's features ([0, z_b]) or only the intrinsic ones ([z_i, 0]), and the
relative-difficulty weight W = l_b / (l_b + l_i) recomputed from the model's per-sample losses
(class-wise max normalised, as in training, without the EMA).

Finished runs (their checkpoint is loaded):

    python benchmarks/bias_branch.py runs/accuracy/cmnist/5pct/disent/seed0 runs/accuracy-input1/cmnist

Arguments are run directories or folders of them (every run below with a summary.json).

Over training (``--train``: a fresh preset run, the real trainer's step, measured every
``--every`` steps; here W also from the training EMA buffers, the weight the step really uses):

    python benchmarks/bias_branch.py --train --data data/cmnist --ratio 5 --seeds 0,1 \
        --steps 20000 --every 1000 --name bias-trajectory-cmnist-5pct

Writes benchmarks/results/<--name>.{json,md} (default bias-branch).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402


@torch.no_grad()
def branch_stats(trainer, loader) -> dict:
    """Return the training-split statistics of a trainer's current model (percent; W in [0, 1])."""
    from dfa_fast.kernels.reference import LossState, relative_difficulty
    cfg, model = trainer.cfg, trainer.method.model
    columns: dict[str, list[torch.Tensor]] = {}

    def keep(name, value):
        columns.setdefault(name, []).append(value.float().cpu())
    net = trainer.method.run_net  # the networks in the run's precision
    for batch in loader:
        x, y = batch.image, batch.label
        if cfg.method.name == "disent":
            z_i, z_b = net(model.features, x)
            logits_i = model.fc_i(torch.cat([z_i, z_b], 1))
            logits_b = model.fc_b(torch.cat([z_i, z_b], 1))
            keep("bias_own_features", model.fc_b(torch.cat([torch.zeros_like(z_i), z_b], 1))
                 .argmax(1) == y)
            keep("bias_intrinsic_features", model.fc_b(torch.cat([z_i, torch.zeros_like(z_b)], 1))
                 .argmax(1) == y)
        else:
            logits_i, logits_b = net(model.debiased, x), net(model.biased, x)
        keep("intrinsic", logits_i.argmax(1) == y)
        keep("bias", logits_b.argmax(1) == y)
        keep("loss_i", F.cross_entropy(logits_i.float(), y, reduction="none"))
        keep("loss_b", F.cross_entropy(logits_b.float(), y, reduction="none"))
        keep("label", y)
        keep("index", batch.index)
        keep("conflicting", batch.label != batch.bias)
    data = {name: torch.cat(parts) for name, parts in columns.items()}
    label, conflicting = data.pop("label").long(), data.pop("conflicting").bool()
    index = data.pop("index").long()
    # W as in training, with the model's per-sample losses in place of the EMA buffers.
    rows = torch.arange(len(label))
    losses = LossState(data.pop("loss_i"), data.pop("loss_b"), torch.ones_like(label, dtype=bool),
                       label, trainer.num_classes)
    data["weight"] = relative_difficulty(losses, rows, label)
    ema = trainer.method.ema
    if ema is not None and bool(ema.seen.all()):  # W from the EMA, once every sample has a value
        data["weight_ema"] = relative_difficulty(ema, index.to(ema.labels.device),
                                                 label.to(ema.labels.device)).cpu()
    row = {"n_aligned": int((~conflicting).sum()), "n_conflicting": int(conflicting.sum())}
    for name, values in data.items():
        scale = 1.0 if name.startswith("weight") else 100.0
        row[f"{name}_aligned"] = float(values[~conflicting].mean()) * scale
        row[f"{name}_conflicting"] = float(values[conflicting].mean()) * scale
    return row


def diagnose(summary: dict, checkpoint: str) -> dict:
    """Return the training-split statistics of one run's checkpoint (see the module docstring)."""
    from dfa_fast.trainer import load_run, split_loader
    trainer = load_run(Path(summary["run_dir"]), checkpoint)
    cfg = trainer.cfg
    return {"run": summary["run_dir"], "checkpoint": checkpoint, "method": cfg.method.name,
            "ratio_pct": summary["ratio_pct"], "seed": summary["seed"],
            "input_scale": cfg.model.input_scale,
            "test_selected": summary["selected"]["test"][summary["report_metric"]],
            **branch_stats(trainer, split_loader(trainer, "train"))}


def trajectory(args, seed: int) -> list[dict]:
    """Train a fresh preset run for ``args.steps`` steps with the trainer's own step and return the
    statistics every ``args.every`` steps (no evaluation, no checkpoints)."""
    from dfa_fast import config
    from dfa_fast.trainer import Trainer, resolve_data_dir, split_loader
    overrides = config.parse_overrides(args.set)
    overrides.setdefault("data", {})["path"] = str(resolve_data_dir(args.data, args.ratio))
    overrides.setdefault("train", {}).update(seed=seed, progress=False)
    overrides.setdefault("cpu", {}).update(threads=1)
    cfg = config.resolve(args.dataset, args.ratio, args.method, overrides)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(cfg, Path(scratch) / "run")
        engine, method = trainer.engine, trainer.method
        loader, stream = split_loader(trainer, "train"), trainer.train_loader.stream()
        for step in range(args.steps + 1):
            if step % args.every == 0:
                row = {"method": args.method, "ratio_pct": args.ratio, "seed": seed, "step": step,
                       "overrides": args.set, **branch_stats(trainer, loader)}
                rows.append(row)
                print(trajectory_table([row]).splitlines()[-1], flush=True)
            if step == args.steps:
                break
            loss, _ = method.step(next(stream), step)
            engine.backward(loss)
            engine.step()
    return rows


def _number(row: dict, key: str, digits: int = 1) -> str:
    return f"{row[key]:.{digits}f}" if key in row else "-"


_BRANCH_HEADER = ("intrinsic acc al / cf | bias acc al / cf | C_b on [0, z_b] cf | "
                  "C_b on [z_i, 0] cf | W al / cf")


def _branch_cells(r: dict) -> str:
    """The columns both tables share (`_BRANCH_HEADER`), from a `branch_stats` row."""
    return (f"{_number(r, 'intrinsic_aligned')} / {_number(r, 'intrinsic_conflicting')} | "
            f"{_number(r, 'bias_aligned')} / {_number(r, 'bias_conflicting')} | "
            f"{_number(r, 'bias_own_features_conflicting')} | "
            f"{_number(r, 'bias_intrinsic_features_conflicting')} | "
            f"{_number(r, 'weight_aligned', 3)} / {_number(r, 'weight_conflicting', 3)}")


def _markdown(header: str, rows: list[dict], cells) -> str:
    """A Markdown table: the ``header`` cells (joined by " | ") and ``cells(row)`` for each row."""
    lines = [f"| {header} |", "| --- " * (header.count("|") + 1) + "|"]
    return "\n".join(lines + [f"| {cells(r)} |" for r in rows])


def table(rows: list[dict]) -> str:
    return _markdown(f"run | ckpt | test (selected) | {_BRANCH_HEADER}", rows, lambda r: (
        f"{r['method']} {r['ratio_pct']:g}% seed {r['seed']}, input_scale "
        f"{r['input_scale']:.4g} | {r['checkpoint']} | {r['test_selected']:.2f} | "
        f"{_branch_cells(r)}"))


def trajectory_table(rows: list[dict]) -> str:
    return _markdown(f"run | step | {_BRANCH_HEADER} | W (EMA) al / cf", rows, lambda r: (
        f"{r['method']} {r['ratio_pct']:g}% seed {r['seed']} | {r['step']} | "
        f"{_branch_cells(r)} | {_number(r, 'weight_ema_aligned', 3)} / "
        f"{_number(r, 'weight_ema_conflicting', 3)}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="*", help="run directories or folders of them")
    parser.add_argument("--checkpoint", default="latest", choices=["latest", "best"],
                        help="latest = the final step (default), best = valid-selected")
    parser.add_argument("--train", action="store_true",
                        help="measure over a fresh preset run instead of finished runs")
    parser.add_argument("--dataset", default="cmnist")
    parser.add_argument("--data", type=Path, help="--train: prepared data (all ratios)")
    parser.add_argument("--ratio", type=float, default=5.0)
    parser.add_argument("--method", default="disent", choices=["disent", "lff"])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", default="bias-branch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.train:
        if args.data is None or args.runs:
            parser.error("--train needs --data and takes no run directories")
        rows = [row for seed in args.seeds.split(",") for row in trajectory(args, int(seed))]
        text = trajectory_table(rows) + (
            f"\n\nA fresh {args.dataset} {args.ratio:g}% {args.method} run per seed with the "
            "published preset" + (" and " + ", ".join(f"`--set {o}`" for o in args.set)
                                  if args.set else "") +
            ", the trainer's own step, measured on the training split every "
            f"{args.every} steps (columns as in bias-branch.md; W (EMA) is the weight the step "
            "uses, from the training EMA buffers, once every sample has been seen). One thread.")
        write_results(args.name, {"rows": rows}, text)
        print(text)
        return
    if not args.runs:
        parser.error("give run directories (or --train)")
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
