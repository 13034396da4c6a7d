"""The `dfa-fast` command line: prepare data, inspect it, train, evaluate and report.

    dfa-fast prepare cmnist --src data/mnist --out data/cmnist --ratios 0.5,1,2,5
    dfa-fast prepare cifar10c --src cifar10-jpeg.zip --out data/cifar10c --ratios 1
    dfa-fast prepare faces --src utkface.zip --out data/faces --ratios 0.5
    dfa-fast prepare folder --dataset bffhq --src bffhq/ --out data/bffhq
    dfa-fast data info data/cmnist/1pct
    dfa-fast train --preset cmnist --ratio 1 --method disent --data data/cmnist --out runs/c1
    dfa-fast train --resume runs/c1
    dfa-fast eval runs/c1 --split test
    dfa-fast report runs/ --plot runs/grid.png
    dfa-fast plot runs/c1 runs/c2 --out runs/c1-c2.png
    dfa-fast ops
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dfa_fast.errors import DfaError


def _prepare_common(parser: argparse.ArgumentParser, ratios: str | None) -> None:
    parser.add_argument("--src", required=True, type=Path, help="the raw data (folder or archive)")
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder; each ratio goes to OUT/<ratio>pct/")
    parser.add_argument("--ratios", default=ratios,
                        help="bias-conflicting percentages, comma separated"
                             + (f" (default {ratios})" if ratios else " (default: all found)"))
    parser.add_argument("--overwrite", action="store_true", help="replace existing ratio folders")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_valid(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--valid-size", type=int, default=5000,
                        help="images held out of the training source for validation")
    from dfa_fast.data.splits import VALID_BIAS_MODES
    parser.add_argument("--valid-bias", choices=VALID_BIAS_MODES, default="balanced",
                        help="validation biases: uniform like test (default, so selection is "
                             "not noise) or at the training ratio (the published protocol)")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="dfa-fast", description=__doc__.split("\n\n")[0])
    # The deepspeed launcher inserts --local_rank=N right after the module name (before the
    # sub-command); LOCAL_RANK in the environment says the same, so it is accepted and ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="build biased splits as FFCV .beton files")
    kinds = prepare.add_subparsers(dest="kind", required=True)
    p = kinds.add_parser("cmnist", help="Colored MNIST from the MNIST IDX files")
    _prepare_common(p, "0.5,1,2,5")
    p.add_argument("--seed", type=int, default=0)
    _add_valid(p)
    p.add_argument("--palette", choices=("lff", "hue"), default="lff",
                   help="LfF colours (default) or ten pure hues")
    p.add_argument("--jitter", type=float, default=0.005, help="colour jitter std (default 0.005)")

    p = kinds.add_parser("cifar10c", help="Corrupted CIFAR-10 from CIFAR-10")
    _prepare_common(p, "0.5,1,2,5")
    p.add_argument("--seed", type=int, default=0)
    _add_valid(p)
    p.add_argument("--type", dest="corruption_type", choices=("type0", "type1"), default="type0")
    p.add_argument("--level", type=int, default=5, help="corruption level 1..5 (default 5)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")

    p = kinds.add_parser("faces", help="BFFHQ-style faces (age x gender) from UTKFace")
    _prepare_common(p, "0.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--valid-per-group", type=int, default=250)
    p.add_argument("--test-per-group", type=int, default=250)
    p.add_argument("--size", type=int, default=None, help="resize faces to SIZE x SIZE")
    p.add_argument("--jpeg-quality", type=int, default=90)

    p = kinds.add_parser("folder", help="a data set in the published DisEnt folder layout")
    _prepare_common(p, None)
    # config.DATASETS (not imported here: config imports torch, 1.4 s; a test keeps them equal)
    p.add_argument("--dataset", required=True, choices=("cmnist", "cifar10c", "bffhq"))
    p.add_argument("--jpeg-quality", type=int, default=90)

    data = commands.add_parser("data", help="inspect prepared data")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    info = data_commands.add_parser("info", help="print sidecars and (label, bias) counts")
    info.add_argument("path", type=Path, help="a .beton, its .json, or a folder of them")
    info.add_argument("--verify", action="store_true", help="also check each file's sha256")

    train = commands.add_parser("train", help="train a method on prepared data")
    # config.available_presets(), read here from the folder (importing config costs 1.4 s)
    presets = sorted(p.stem for p in (Path(__file__).parent / "presets").glob("*.yaml"))
    train.add_argument("--preset", help=" | ".join(presets))
    train.add_argument("--ratio", type=float, help="bias-conflicting percentage, e.g. 1")
    train.add_argument("--method", help="vanilla | lff | disent")
    train.add_argument("--data", type=Path,
                       help="prepared data: the output folder of `prepare` or one ratio folder")
    train.add_argument("--out", type=Path, help="the run directory to create")
    train.add_argument("--seed", type=int, help="run seed (default 0)")
    train.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run")
    train.add_argument("--force", action="store_true",
                       help="resume even if the config differs from the saved one")
    train.add_argument("--deepspeed_config", type=Path,
                       help="a DeepSpeed JSON config (checked against the run config)")

    ev = commands.add_parser("eval", help="evaluate a run's checkpoint")
    ev.add_argument("run_dir", type=Path)
    ev.add_argument("--split", action="append", help="split(s) to evaluate (default valid, test)")
    ev.add_argument("--checkpoint", choices=("best", "latest"), default="best")

    report = commands.add_parser("report", help="mean and std over seeds of finished runs")
    report.add_argument("runs", type=Path, nargs="+", help="run directories or folders of them")
    report.add_argument("--json", type=Path, help="also write the rows as JSON")
    report.add_argument("--plot", type=Path, metavar="FILE",
                        help="also draw accuracy against ratio per method (.png, .svg or .pdf)")

    plot = commands.add_parser("plot", help="draw the curves of one run or several overlaid")
    plot.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR",
                      help="run directories (finished or in progress)")
    plot.add_argument("--out", type=Path, metavar="FILE",
                      help="the figure (.png, .svg or .pdf; default RUN_DIR/curves.png of the "
                           "first run)")

    commands.add_parser("ops", help="print which implementation each operation gets here")
    return parser


def run_ops(args: argparse.Namespace) -> None:
    """Print the implementation each operation gets on this machine, per case, with versions."""
    import torch
    from dfa_fast import ops
    from dfa_fast.environment import versions
    print(", ".join(f"{k} {v}" for k, v in versions().items()))
    forced = ops.forced_backend()
    print(f"DFA_KERNELS={forced}" if forced else "DFA_KERNELS not set (the default choice)")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cases = ("fp32", "bf16", "bf16_mixed", "gather")
    print("| operation | " + " | ".join(f"{d} {c}" for d in devices for c in cases) + " |")
    print("| --- |" + " --- |" * (len(devices) * len(cases)))
    rows = {d: ops.describe(d) for d in devices}
    for i, row in enumerate(rows["cpu"]):
        print(f"| {row['operation']} | " + " | ".join(rows[d][i][c] for d in devices
                                                      for c in cases) + " |")


def train_config(args: argparse.Namespace):
    """Return the run config of `dfa-fast train` arguments (None when resuming unchanged)."""
    from dfa_fast import config
    overrides = config.parse_overrides(args.set)
    if args.seed is not None:
        overrides.setdefault("train", {})["seed"] = args.seed
    if args.steps is not None:
        overrides.setdefault("train", {})["steps"] = args.steps
    if args.resume:
        if args.preset or args.data or args.out:
            raise DfaError("--resume RUN_DIR takes the run's saved config; give only --steps, "
                           "--set and --force with it")
        if not overrides:
            return None
        saved = config.load(args.resume / "config.yaml") if (args.resume / "config.yaml").is_file() \
            else None
        if saved is None:
            raise DfaError(f"{args.resume}: no config.yaml; expected a run directory")
        return config.override(saved, overrides, where="--set")
    missing = [flag for flag, value in (("--preset", args.preset), ("--ratio", args.ratio),
                                        ("--method", args.method), ("--data", args.data),
                                        ("--out", args.out)) if value is None]
    if missing:
        raise DfaError(f"train needs {', '.join(missing)} (or --resume RUN_DIR)")
    if args.method not in config.METHODS:
        raise DfaError(f"unknown method {args.method!r}; available: {', '.join(config.METHODS)}")
    config.check_selection(args.preset, args.ratio, args.method)  # before looking for the data
    config.check_keys(overrides, "--set")
    from dfa_fast.trainer import resolve_data_dir
    data_dir = resolve_data_dir(args.data, args.ratio)
    overrides.setdefault("data", {})["path"] = str(data_dir.resolve())
    return config.resolve(args.preset, args.ratio, args.method, overrides)


def print_headline(summary: dict) -> None:
    """Print the final table of a run: valid-selected, paper protocol and final test numbers."""
    from dfa_fast.published import published
    from dfa_fast.trainer import headline
    numbers = headline(summary)
    metric = summary["report_metric"]
    pub = published(summary["dataset"], summary["ratio_pct"], summary["method"])
    sel, paper = summary["selected"], summary["paper_protocol"]
    print(f"\n{summary['method']} on {summary['dataset']} {summary['ratio_pct']:g}% "
          f"(seed {summary['seed']}, {summary['steps']} steps, "
          f"{summary['wall_seconds'] / 60:.1f} min, "
          f"{summary['throughput']['images_per_s']:.0f} images/s)")
    print(f"| test {metric} accuracy (%) | value | step |")
    print("| --- | --- | --- |")
    print(f"| valid-selected | {numbers['selected']:.2f} | {sel['step'] if sel else '-'} |")
    print(f"| paper protocol (max test) | {numbers['paper_protocol']:.2f} | "
          f"{paper['step'] if paper else '-'} |")
    print(f"| final | {numbers['final']:.2f} | {summary['final']['step']} |")
    if pub is not None:
        print(f"| published (paper) | {pub:.2f} | |")


def run_prepare(args: argparse.Namespace) -> list[Path]:
    """Run one `prepare` sub-command; return the folders it wrote."""
    from dfa_fast.data.splits import parse_ratios
    ratios = parse_ratios(args.ratios) if args.ratios else None
    common = {"overwrite": args.overwrite, "progress": not args.quiet}
    if args.kind == "cmnist":
        from dfa_fast.data.cmnist import build_cmnist
        return build_cmnist(args.src, args.out, ratios, seed=args.seed, valid_size=args.valid_size,
                            valid_bias=args.valid_bias, palette=args.palette,
                            jitter_std=args.jitter, **common)
    if args.kind == "cifar10c":
        from dfa_fast.data.cifar10c import build_cifar10c
        return build_cifar10c(args.src, args.out, ratios, seed=args.seed,
                              corruption_type=args.corruption_type, level=args.level,
                              valid_size=args.valid_size, valid_bias=args.valid_bias,
                              workers=args.workers, **common)
    if args.kind == "faces":
        from dfa_fast.data.faces import build_faces
        return build_faces(args.src, args.out, ratios, seed=args.seed,
                           valid_per_group=args.valid_per_group,
                           test_per_group=args.test_per_group, size=args.size,
                           jpeg_quality=args.jpeg_quality, **common)
    from dfa_fast.data.folder import import_folder
    return import_folder(args.src, args.out, args.dataset, ratios=ratios,
                         jpeg_quality=args.jpeg_quality, **common)


def run_data_info(args: argparse.Namespace) -> None:
    """Print the summary of every split under the path."""
    from dfa_fast.data.info import describe, find_betons
    print("\n\n".join(describe(beton, verify=args.verify) for beton in find_betons(args.path)))


def run_train(args: argparse.Namespace) -> None:
    """Train (or resume) a run and print its final table."""
    import os
    from dfa_fast.trainer import train
    cfg = train_config(args)
    run_dir = args.resume or args.out
    summary = train(cfg, run_dir, resume=args.resume is not None, force=args.force,
                    ds_config=args.deepspeed_config)
    if int(os.environ.get("RANK", 0)) == 0:
        print_headline(summary)
        print(f"run directory: {run_dir}")


def run_eval(args: argparse.Namespace) -> None:
    """Evaluate a run's checkpoint and print the metrics of each split."""
    from dfa_fast.evaluate import METRICS
    from dfa_fast.trainer import evaluate_run
    results = evaluate_run(args.run_dir, args.split or ["valid", "test"], args.checkpoint)
    print(f"| split | {' | '.join(METRICS)} |")
    print("| --- |" + " --- |" * len(METRICS))
    for split, metrics in results.items():
        print(f"| {split} | " + " | ".join(f"{metrics[m]:.2f}" for m in METRICS) + " |")


def run_report(args: argparse.Namespace) -> None:
    """Print (and optionally write) the seed-aggregated table of finished runs."""
    import json
    from dfa_fast.report import aggregate, find_summaries, markdown_table
    rows = aggregate(find_summaries(args.runs))
    print(markdown_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    if args.plot:
        from dfa_fast.plot import plot_grid
        print(f"wrote {plot_grid(rows, args.plot)}")


def run_plot(args: argparse.Namespace) -> None:
    """Draw the curves of the runs and print the figure's path."""
    from dfa_fast.plot import plot_runs
    print(f"wrote {plot_runs(args.runs, args.out or args.runs[0] / 'curves.png')}")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for a user error)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prepare":
            for folder in run_prepare(args):
                print(f"wrote {folder}")
        else:
            {"data": run_data_info, "train": run_train, "eval": run_eval, "report": run_report,
             "plot": run_plot, "ops": run_ops}[args.command](args)
    except DfaError as err:
        import os
        world = int(os.environ.get("WORLD_SIZE", 1))
        where = f" (rank {os.environ.get('RANK', 0)} of {world})" if world > 1 else ""
        print(f"dfa-fast: error{where}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dfa-fast: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
