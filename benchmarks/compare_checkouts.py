"""The DisEnt Colored MNIST training step of two checkouts, in paired alternating rounds: is a
change within the noise of before?

Each checkout runs its own trainer with its own virtual environment (``CHECKOUT/.venv``, or
``--python``) in a fresh process, through its own ``benchmarks/train_throughput.py`` (the same
measurement that benchmark makes: the median step time of the log windows after the first, swap
on, one thread, the trainer's allocator setting). Rounds alternate before/after (ABBA order), so
a drift of the machine's speed falls on both; each round gives one after/before ratio.

    python benchmarks/compare_checkouts.py --before ../old-checkout --after . \
        --data data/cmnist/1pct --rounds 6 --steps 2000 --precisions fp32,bf16_mixed

Writes benchmarks/results/compare_checkouts.json and .md (``--name`` changes the file name).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_state, write_results  # noqa: E402

CHILD = """
import json, sys, torch
from pathlib import Path
sys.path.insert(0, {bench!r})
torch.set_num_threads(1)
from dfa_fast.engine import keep_freed_memory
keep_freed_memory()
from train_throughput import run_dfa_fast
print("RESULT " + json.dumps(run_dfa_fast(Path({data!r}), {steps}, precision={precision!r})))
"""


def python_of(checkout: Path, given: str | None) -> str:
    python = Path(given) if given else checkout / ".venv" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python}: no Python for checkout {checkout}; expected its .venv "
                         "(make setup there) or --python")
    return str(python)


def measure(checkout: Path, python: str, data: Path, steps: int, precision: str) -> dict:
    """Return run_dfa_fast's figures for one run of ``checkout`` in a fresh process."""
    code = CHILD.format(bench=str(checkout / "benchmarks"), data=str(data), steps=steps,
                        precision=precision)
    done = subprocess.run([python, "-c", code], cwd=checkout, capture_output=True, text=True)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{checkout}: the timed run failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the checkout before")
    parser.add_argument("--after", type=Path, default=Path("."), help="the checkout after")
    parser.add_argument("--before-python", help="its Python (default BEFORE/.venv/bin/python)")
    parser.add_argument("--after-python", help="its Python (default AFTER/.venv/bin/python)")
    parser.add_argument("--data", type=Path, default=Path("data/cmnist/1pct"),
                        help="a prepared Colored MNIST ratio folder")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--precisions", default="fp32,bf16_mixed")
    parser.add_argument("--name", default="compare_checkouts")
    args = parser.parse_args()
    if not (args.data / "train.beton").is_file():
        raise SystemExit(f"{args.data}: no train.beton; expected a prepared Colored MNIST ratio "
                         "folder (dfa-fast prepare cmnist)")
    sides = {"before": (args.before.resolve(), python_of(args.before, args.before_python)),
             "after": (args.after.resolve(), python_of(args.after, args.after_python))}
    data = args.data.resolve()
    rows = []
    for precision in args.precisions.split(","):
        times = {"before": [], "after": []}
        for r in range(args.rounds):
            for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
                checkout, python = sides[side]
                times[side].append(measure(checkout, python, data, args.steps,
                                           precision)["step_ms"])
            print(precision, r, times["before"][-1], times["after"][-1], flush=True)
        ratios = [a / b for a, b in zip(times["after"], times["before"])]
        rows.append({"precision": precision, "before_step_ms": statistics.median(times["before"]),
                     "after_step_ms": statistics.median(times["after"]),
                     "after_over_before": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios), "rounds": times})
    commits = {side: git_state(checkout) for side, (checkout, _) in sides.items()}
    label = {side: (c["commit"] or "?")[:12] + (" (dirty)" if c["dirty"] else "")
             for side, c in commits.items()}
    table = (f"DisEnt Colored MNIST 1 % training step (batch 256, one thread, swap on) of two "
             f"checkouts: before {label['before']}, after {label['after']}; median of "
             f"{args.rounds} paired rounds (ABBA) of {args.steps} steps, each run a fresh process."
             "\n\n| precision | before ms | after ms | after / before (min-max over rounds) |\n"
             "| --- | --- | --- | --- |\n" + "".join(
                 f"| {r['precision']} | {r['before_step_ms']:.2f} | {r['after_step_ms']:.2f} | "
                 f"{r['after_over_before']:.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f}) |\n"
                 for r in rows))
    paths = write_results(args.name, {"steps": args.steps, "rounds": args.rounds, "threads": 1,
                                      "checkouts": commits, "rows": rows}, table)
    print(table)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
