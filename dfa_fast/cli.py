"""The `dfa-fast` command line: prepare data, inspect it, train, evaluate and report.

    dfa-fast prepare cmnist --src data/mnist --out data/cmnist --ratios 0.5,1,2,5
    dfa-fast prepare cifar10c --src cifar10-jpeg.zip --out data/cifar10c --ratios 1
    dfa-fast prepare faces --src utkface.zip --out data/faces --ratios 0.5
    dfa-fast prepare folder --dataset bffhq --src bffhq/ --out data/bffhq
    dfa-fast data info data/cmnist/1pct
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
    parser.add_argument("--valid-bias", choices=("balanced", "ratio"), default="balanced",
                        help="validation biases: uniform like test (default, so selection is "
                             "not noise) or at the training ratio (the published protocol)")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="dfa-fast", description=__doc__.split("\n\n")[0])
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
    p.add_argument("--dataset", required=True, choices=("cmnist", "cifar10c", "bffhq"))
    p.add_argument("--jpeg-quality", type=int, default=90)

    data = commands.add_parser("data", help="inspect prepared data")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    info = data_commands.add_parser("info", help="print sidecars and (label, bias) counts")
    info.add_argument("path", type=Path, help="a .beton, its .json, or a folder of them")
    info.add_argument("--verify", action="store_true", help="also check each file's sha256")
    return parser


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


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for a user error)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prepare":
            for folder in run_prepare(args):
                print(f"wrote {folder}")
        elif args.command == "data":
            run_data_info(args)
    except DfaError as err:
        print(f"dfa-fast: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dfa-fast: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
