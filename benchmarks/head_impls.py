"""Does each CPU implementation of the DisEnt head pay for itself in the trainer? (issue 18)

Times the real trainer (Colored MNIST 1 %, DisEnt, swap on from step 0, one thread) with the
implementation that `dfa_fast.ops` chooses for the head, and again with that implementation taken
out of the table, so the next one (the PyTorch reference with autograd) runs. Cases: fp32 in one
process, where the compiled numba head runs; ``precision=bf16`` (bfloat16 features) and a
data-parallel gather (one process with an identity gather: the head's work of a rank, without the
communication, which both implementations would pay alike), which a closed-form PyTorch head
(`kernels/fused_torch.py`, deleted after this measurement) took before. Rounds alternate the two
implementations of a case; each figure is the median over rounds.

    python benchmarks/head_impls.py --data data/cmnist/1pct [--rounds 5 --steps 1500]

Writes benchmarks/results/head_impls.{json,md}.
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

# case -> (precision, with an identity gather)
CASES = {"fp32": ("fp32", False), "bf16": ("bf16", False), "gather": ("fp32", True)}


@contextlib.contextmanager
def without(impl_name: str):
    """Take the head implementation ``impl_name`` out of the chooser's table for the block."""
    from dfa_fast import ops
    kept = ops.TABLE["disent_head"]
    ops.TABLE["disent_head"] = tuple(i for i in kept if i.name != impl_name)
    ops._candidates.cache_clear()
    try:
        yield
    finally:
        ops.TABLE["disent_head"] = kept
        ops._candidates.cache_clear()


@contextlib.contextmanager
def identity_gather(enabled: bool):
    """Give every EMA method an identity gather, as `Method.distribute` does under data
    parallelism."""
    from dfa_fast import methods
    if not enabled:
        yield
        return
    attach = methods._EMAMethod.attach

    def attach_gathering(self, *args, **kwargs):
        attach(self, *args, **kwargs)
        self.distribute(lambda index, ce_i, ce_b: (index, ce_i, ce_b))
    methods._EMAMethod.attach = attach_gathering
    try:
        yield
    finally:
        methods._EMAMethod.attach = attach


def chosen(precision: str, gather: bool) -> str:
    """The head implementation the table picks for this case (a small example call)."""
    from dfa_fast import ops
    args, kwargs = ops.examples()["disent_head"]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    args = tuple(a.to(dtype) if i < 2 else a for i, a in enumerate(args))
    if gather:
        kwargs = dict(kwargs, gather=lambda *t: t)
    return ops.choose("disent_head", *args, **kwargs).name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/cmnist/1pct"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from dfa_fast.engine import keep_freed_memory
    keep_freed_memory()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        data = prepared(args.data, Path(scratch))
        for case in args.cases.split(","):
            precision, gather = CASES[case]
            impl = chosen(precision, gather)
            with without(impl):
                other = chosen(precision, gather)
            times = {impl: [], other: []}
            for _ in range(args.rounds):
                with identity_gather(gather):
                    times[impl].append(run_dfa_fast(data, args.steps, precision=precision)
                                       ["step_ms"])
                    with without(impl):
                        times[other].append(run_dfa_fast(data, args.steps,
                                                           precision=precision)["step_ms"])
            med = {k: statistics.median(v) for k, v in times.items()}
            ratios = [r / c for c, r in zip(times[impl], times[other])]
            rows.append({"case": case, "precision": precision, "gather": gather,
                         "chosen": impl, "chosen_step_ms": med[impl],
                         "next": other, "next_step_ms": med[other],
                         "next_over_chosen": statistics.median(ratios),
                         "ratio_min": min(ratios), "ratio_max": max(ratios),
                         "rounds": times})
            print(rows[-1], flush=True)
    table = ("DisEnt Colored MNIST 1 % training step (batch 256, one thread, swap on): the head the "
             "table chooses against the head it picks with that one taken out (`torch` = the "
             f"PyTorch reference with autograd); median of {args.rounds} alternating rounds of "
             f"{args.steps} steps.\n\n| case | chosen head | step ms | next head | step ms | "
             "next / chosen (min-max over rounds) |\n| --- | --- | --- | --- | --- | --- |\n" +
             "".join(
                 f"| {r['case']} | {r['chosen']} | {r['chosen_step_ms']:.2f} | {r['next']} | "
                 f"{r['next_step_ms']:.2f} | {r['next_over_chosen']:.2f} "
                 f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |\n" for r in rows))
    json_path, md_path = write_results("head_impls", {"steps": args.steps, "rounds": args.rounds,
                                                      "threads": 1, "rows": rows}, table)
    print(table)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
