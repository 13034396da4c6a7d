"""Does each CPU implementation of a method's head pay for itself in the trainer? (issue 18)

Times the real trainer (Colored MNIST 1 %, one thread; DisEnt with its swap on from step 0, or LfF)
with the implementation that `dfa_fast.ops` chooses for the method's head, and again with that
implementation taken out of the table, so the next one (the PyTorch reference with autograd) runs.
Cases (``--cases``): DisEnt in fp32 and bf16_mixed, where the compiled numba head runs, and LfF in
fp32 and bf16_mixed, where the reference head with the compiled EMA pass
(`kernels/numba_weighting.py`) runs. (bfloat16 features and a data-parallel gather already go to
the reference: a closed-form PyTorch head for them, `kernels/fused_torch.py`, was within the noise
of it here and was deleted; `results/head_impls-before-fused-torch-removal.md`.) Rounds alternate
the two implementations of a case; each figure is the median over rounds.

    python benchmarks/head_impls.py --data data/cmnist/1pct [--rounds 5 --steps 1500 --cases fp32]

Writes benchmarks/results/<--name, default head_impls>.{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from train_throughput import prepared, run_dfa_fast  # noqa: E402

# case -> (method, precision); the head is the method's operation.
CASES = {"fp32": ("disent", "fp32"), "bf16_mixed": ("disent", "bf16_mixed"),
         "lff-fp32": ("lff", "fp32"), "lff-bf16_mixed": ("lff", "bf16_mixed")}


@contextlib.contextmanager
def without(operation: str, impl_name: str):
    """Take the implementation ``impl_name`` of ``operation`` out of the chooser's table."""
    from dfa_fast import ops
    kept = ops.TABLE[operation]
    ops.TABLE[operation] = tuple(i for i in kept if i.name != impl_name)
    ops._candidates.cache_clear()
    try:
        yield
    finally:
        ops.TABLE[operation] = kept
        ops._candidates.cache_clear()


def chosen(operation: str, precision: str) -> str:
    """The implementation the table picks for this case (a small example call)."""
    from dfa_fast import ops
    args, kwargs = ops.examples()[operation]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16_mixed" else \
        contextlib.nullcontext()
    with autocast:
        return ops.choose(operation, *args, **kwargs).name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/cmnist/1pct"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    parser.add_argument("--name", default="head_impls", help="results file name")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from dfa_fast.engine import keep_freed_memory
    keep_freed_memory()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        data = prepared(args.data, Path(scratch))
        for case in args.cases.split(","):
            method, precision = CASES[case]
            operation = f"{method}_head"
            impl = chosen(operation, precision)
            with without(operation, impl):
                other = chosen(operation, precision)
            times = {impl: [], other: []}
            for _ in range(args.rounds):
                times[impl].append(run_dfa_fast(data, args.steps, precision=precision,
                                                method=method)["step_ms"])
                with without(operation, impl):
                    times[other].append(run_dfa_fast(data, args.steps, precision=precision,
                                                     method=method)["step_ms"])
            med = {k: statistics.median(v) for k, v in times.items()}
            ratios = [r / c for c, r in zip(times[impl], times[other])]
            rows.append({"case": case, "method": method, "precision": precision,
                         "chosen": impl, "chosen_step_ms": med[impl],
                         "next": other, "next_step_ms": med[other],
                         "next_over_chosen": statistics.median(ratios),
                         "ratio_min": min(ratios), "ratio_max": max(ratios),
                         "rounds": times})
            print(rows[-1], flush=True)
    table = ("Colored MNIST 1 % training step (batch 256, one thread, DisEnt's swap on): the head "
             "the table chooses against the head it picks with that one taken out (`torch` = the "
             f"PyTorch reference with autograd); median of {args.rounds} alternating rounds of "
             f"{args.steps} steps.\n\n| case | chosen head | step ms | next head | step ms | "
             "next / chosen (min-max over rounds) |\n| --- | --- | --- | --- | --- | --- |\n" +
             "".join(
                 f"| {r['case']} | {r['chosen']} | {r['chosen_step_ms']:.2f} | {r['next']} | "
                 f"{r['next_step_ms']:.2f} | {r['next_over_chosen']:.2f} "
                 f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |\n" for r in rows))
    json_path, md_path = write_results(args.name, {"steps": args.steps, "rounds": args.rounds,
                                                      "threads": 1, "rows": rows}, table)
    print(table)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
