"""Time the Triton kernels against eager PyTorch and torch.compile of the reference, on a GPU.

Usage (a CUDA GPU; writes benchmarks/results/kernels.json and kernels.md):
    python benchmarks/kernels.py
    python benchmarks/kernels.py --dtypes float32,bfloat16 --budget-s 300 --json out.json
CPU dry run of the same code paths under the Triton interpreter (tiny shapes, wall-clock timer):
    python benchmarks/kernels.py --check --json /tmp/kernels-check.json

Every operation is timed forward + backward (sample_weights has no backward) with
``triton.testing.do_bench`` (median of repeated runs, 20th and 80th percentiles kept, L2 flushed
between runs) for three implementations of the same function: the Triton kernels
(``dfa_fast.kernels.triton_ops``), the eager PyTorch reference (``dfa_fast.kernels.reference``, the
same module the tests compare against) and ``torch.compile`` of that reference. The fused DisEnt
head is also timed replayed from a CUDA graph (forward + backward captured once), which is how a
launch-bound step runs best.

Shapes: the published ones (B 256, C 10, D 16: Colored MNIST; B 256, C 10, D 512: Corrupted
CIFAR-10; B 64, C 2, D 512: BFFHQ; N = 60,000 training samples) and a large one (B 65,536, C 10,
D 512, N = 262,144) where bandwidth matters. Bandwidth: ``bytes`` counts the traffic an ideal
implementation cannot avoid (inputs read, outputs and gradients written, the EMA buffers' full
pass for the class maxima); ``triton_gbps`` = bytes / time, compared with a device-to-device copy
measured here (1 GiB, read + write counted), and with a copy of the same number of bytes
(``copy_same_bytes_ms``, which shows what launch latency alone costs at that size).

Goals on an H200: the fused head at least 3x eager and 1.5x torch.compile at the published shapes,
and at least 70 % of copy bandwidth at the large shape; ``goals`` in the JSON says which were met.
Without a CUDA GPU (and without --check) it prints one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

PUBLISHED = [(256, 10, 16), (256, 10, 512), (64, 2, 512)]
LARGE = (65536, 10, 512)
PUBLISHED_N = 60000
LAMBDAS = {"lambda_dis": 10.0, "lambda_swap_b": 10.0, "lambda_swap": 1.0}
ALPHA = 0.7
OPS = ("disent_head", "lff_head", "gce", "weighted_cross_entropy", "sample_weights")
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None,
                        help="output JSON (default benchmarks/results/kernels.json; none in --check)")
    parser.add_argument("--dtypes", default="float32",
                        help="comma-separated input dtypes: float32, bfloat16, float16")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated operations")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="stop starting torch.compile measurements after this many seconds")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-large", action="store_true", help="skip the large shape")
    parser.add_argument("--check", action="store_true",
                        help="CPU dry run under TRITON_INTERPRET=1 with tiny shapes")
    return parser.parse_args(argv)


def essential_bytes(op: str, B: int, C: int, D: int, N: int, itemsize: int) -> int:
    """Bytes an ideal forward + backward must move (inputs, outputs, gradients, EMA pass)."""
    ema_batch = B * (8 + 8 + 8 + 2 * 9)   # index, label, two losses; EMAs + seen read and written
    ema_pass = N * (4 + 4 + 8)            # both EMAs and the labels, for the class maxima
    logits = B * C * itemsize
    features = B * D * itemsize
    weights = 2 * (C * 2 * D + C) * itemsize
    if op == "gce":
        return 2 * logits + 2 * B * 4 + 8 * B             # logits in, grad out, loss, grad_loss
    if op == "weighted_cross_entropy":
        return 2 * logits + B * 4 + 8 * B
    if op == "sample_weights":
        return ema_batch + ema_pass + 4 * B
    if op == "lff_head":
        return 4 * logits + ema_batch + ema_pass
    if op == "disent_head":
        return 6 * features + 2 * weights + ema_batch + ema_pass   # z twice, dz once; W, dW
    raise ValueError(op)


def build_case(op, B, C, D, N, dtype, device, impl):
    """Return a zero-argument callable running one forward + backward of ``op`` with ``impl``."""
    import torch
    from dfa_fast.kernels.reference import Linear, LossSettings, LossState, Swap

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()

    label = torch.randint(0, C, (B,), device=device)
    labels = torch.randint(0, C, (N,), device=device)
    index = torch.randperm(N, device=device)[:B]
    labels[index] = label
    # One loss state for every call, as in training (its EMAs move from call to call).
    state = LossState(torch.rand(N, device=device), torch.rand(N, device=device),
                      torch.ones(N, dtype=torch.bool, device=device), labels, C, ALPHA)
    settings = LossSettings(**LAMBDAS)
    if op == "gce":
        logits = leaf(B, C, scale=3.0)
        upstream = torch.ones(B, device=device)
        return lambda: torch.autograd.grad(impl.gce(logits, label), logits, upstream)
    if op == "weighted_cross_entropy":
        logits = leaf(B, C, scale=3.0)
        weight = torch.rand(B, device=device)
        return lambda: torch.autograd.grad(impl.weighted_cross_entropy(logits, label, weight),
                                           logits)
    if op == "sample_weights":
        ce_i, ce_b = torch.rand(B, device=device), torch.rand(B, device=device)
        return lambda: impl.sample_weights(state, index, label, ce_i, ce_b)
    if op == "lff_head":
        logits = [leaf(B, C, scale=3.0), leaf(B, C, scale=3.0)]
        return lambda: torch.autograd.grad(
            impl.lff_head(*logits, label, index, state, settings)[0], logits)
    if op == "disent_head":
        params = [leaf(B, D), leaf(B, D), leaf(C, 2 * D, scale=(2 * D) ** -0.5), leaf(C),
                  leaf(C, 2 * D, scale=(2 * D) ** -0.5), leaf(C)]
        z_i, z_b, weight_i, bias_i, weight_b, bias_b = params
        fc_i, fc_b = Linear(weight_i, bias_i), Linear(weight_b, bias_b)
        swap = Swap(torch.randperm(B, device=device))
        return lambda: torch.autograd.grad(
            impl.disent_head(z_i, z_b, label, index, fc_i, fc_b, state, swap, settings)[0],
            params)
    raise ValueError(op)


class CompiledReference:
    """The reference module's functions wrapped by torch.compile (one compiled function per op)."""

    def __init__(self, reference):
        import torch
        self._reference = reference
        self._compiled = {}
        self._torch = torch

    def __getattr__(self, name):
        if name not in self._compiled:
            self._compiled[name] = self._torch.compile(getattr(self._reference, name),
                                                       dynamic=False)
        return self._compiled[name]


def gpu_timer(fn):
    """Return (median, p20, p80) milliseconds of fn on the GPU (triton.testing.do_bench)."""
    import triton.testing
    median, low, high = triton.testing.do_bench(fn, warmup=25, rep=100,
                                                quantiles=[0.5, 0.2, 0.8])
    return median, low, high


def cpu_timer(fn):
    """Dry-run timer: one warm-up call, then the median wall-clock of three calls, in ms."""
    fn()
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1e3)
    return statistics.median(runs), min(runs), max(runs)


def graph_timer(fn, timer):
    """Time fn replayed from a CUDA graph captured once (after a warm-up on a side stream)."""
    import torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timer(graph.replay)


def copy_ms(nbytes: int, device, timer) -> float:
    """Median time of a device-to-device copy moving ``nbytes`` (half read, half written)."""
    import torch
    n = max(1, nbytes // 8)
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return timer(lambda: dst.copy_(src))[0]


def environment(device) -> dict:
    import torch
    import triton
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "host": platform.node(),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    info["gpu"] = torch.cuda.get_device_name(device) if device == "cuda" else "cpu (interpreter)"
    return info


def write(path: Path | None, payload: dict) -> None:
    """Write the JSON and, next to it, a Markdown table (atomically: temporary file, rename)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    lines = [f"# Kernel benchmarks: {payload['env']['gpu']}", "",
             f"torch {payload['env']['torch']}, triton {payload['env']['triton']}, "
             f"copy {payload['copy_gbps']:.0f} GB/s", "",
             "| op | shape | dtype | triton ms | graph ms | eager ms | compile ms | x eager "
             "| x compile | GB/s | copy share |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    for row in payload["rows"]:
        shape = row["shape"]
        lines.append(
            f"| {row['op']} | B {shape['B']} C {shape['C']} D {shape['D']} | {row['dtype']} | "
            f"{cell(row['triton_ms'], '.4f')} | {cell(row.get('triton_graph_ms'), '.4f')} | "
            f"{cell(row['eager_ms'], '.4f')} | {cell(row['compile_ms'], '.4f')} | "
            f"{cell(row['speedup_eager'], '.2f')} | {cell(row['speedup_compile'], '.2f')} | "
            f"{cell(row['triton_gbps'], '.0f')} | {cell(row['copy_fraction'], '.2f')} |")
    lines += ["", "Goals: " + json.dumps(payload["goals"])]
    md = path.with_suffix(".md")
    md.with_suffix(".md.tmp").write_text("\n".join(lines) + "\n")
    os.replace(md.with_suffix(".md.tmp"), md)


def evaluate_goals(rows) -> dict:
    """Which of the issue's goals the measured rows meet (None where a number is missing)."""
    goals = {}
    for row in rows:
        shape = (row["shape"]["B"], row["shape"]["C"], row["shape"]["D"])
        name = f"{row['op']} {row['dtype']} B{shape[0]} C{shape[1]} D{shape[2]}"
        if row["op"] == "disent_head" and shape in PUBLISHED:
            best = row.get("triton_graph_ms") or row["triton_ms"]
            goals[name + ": >= 3x eager"] = (None if row["eager_ms"] is None
                                             else row["eager_ms"] / row["triton_ms"] >= 3)
            goals[name + ": >= 1.5x compile"] = (None if row["compile_ms"] is None
                                                 else row["compile_ms"] / row["triton_ms"] >= 1.5)
            goals[name + ": graph replay >= 3x eager"] = (None if row["eager_ms"] is None
                                                          else row["eager_ms"] / best >= 3)
        if shape == LARGE:
            goals[name + ": >= 70% copy bandwidth"] = (None if row["copy_fraction"] is None
                                                       else row["copy_fraction"] >= 0.7)
    return goals


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check:
        # The interpreter must be on before the kernel modules are imported (kernels decorate
        # at import time).
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    if not args.check and not torch.cuda.is_available():
        print("no CUDA GPU: benchmarks/kernels.py measures Triton kernels on a GPU "
              "(use --check for a CPU dry run)")
        return 2
    from dfa_fast.kernels import reference, triton_ops

    device = "cpu" if args.check else "cuda"
    timer = cpu_timer if args.check else gpu_timer
    if args.check:
        shapes = [(8, 3, 16)]
        large = (64, 10, 32)
        n_published, n_large = 64, 256
    else:
        shapes = list(PUBLISHED)
        large = LARGE
        n_published, n_large = PUBLISHED_N, 4 * LARGE[0]
    if not args.no_large:
        shapes.append(large)
    json_path = args.json if (args.json or args.check) else RESULTS / "kernels.json"
    ops = [op for op in args.ops.split(",") if op]
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",") if name]
    compiled = CompiledReference(reference)
    start = time.monotonic()
    peak = 1 << 30 if not args.check else 1 << 20
    copy_gbps = 2 * (peak // 2) / copy_ms(peak, device, timer) / 1e6
    payload = {"env": environment(device), "copy_gbps": copy_gbps, "rows": [], "goals": {}}
    # Operation-major order: the fused head (first in OPS) gets its torch.compile numbers at every
    # shape before the time budget can run out on the others.
    for op in ops:
        for shape in shapes:
            B, C, D = shape
            N = n_large if shape == large else n_published
            for dtype in dtypes:
                row = {"op": op, "shape": {"B": B, "C": C, "D": D, "N": N},
                       "dtype": str(dtype).replace("torch.", ""), "compile_ms": None,
                       "eager_ms": None, "errors": {}}
                for name, impl in (("triton", triton_ops), ("eager", reference)):
                    try:
                        ms, low, high = timer(build_case(op, B, C, D, N, dtype, device, impl))
                        row[f"{name}_ms"], row[f"{name}_p20_ms"], row[f"{name}_p80_ms"] = \
                            ms, low, high
                    except Exception as error:  # noqa: BLE001 - recorded, the run goes on
                        row[f"{name}_ms"] = None
                        row["errors"][name] = f"{type(error).__name__}: {error}"[:500]
                over_budget = time.monotonic() - start > args.budget_s
                if not (args.no_compile or args.check or over_budget):
                    try:
                        row["compile_ms"] = timer(build_case(op, B, C, D, N, dtype, device,
                                                             compiled))[0]
                    except Exception as error:  # noqa: BLE001
                        row["errors"]["compile"] = f"{type(error).__name__}: {error}"[:500]
                elif over_budget and not args.no_compile and not args.check:
                    row["errors"]["compile"] = "skipped: time budget spent"
                if op == "disent_head" and not args.check and row["triton_ms"] is not None:
                    try:
                        row["triton_graph_ms"] = graph_timer(
                            build_case(op, B, C, D, N, dtype, device, triton_ops), timer)[0]
                    except Exception as error:  # noqa: BLE001
                        row["errors"]["graph"] = f"{type(error).__name__}: {error}"[:500]
                nbytes = essential_bytes(op, B, C, D, N, dtype.itemsize)
                row["bytes"] = nbytes
                ms = row["triton_ms"]
                row["triton_gbps"] = nbytes / ms / 1e6 if ms else None
                row["copy_fraction"] = row["triton_gbps"] / copy_gbps if ms else None
                row["copy_same_bytes_ms"] = copy_ms(nbytes, device, timer)
                row["speedup_eager"] = (row["eager_ms"] / ms if ms and row["eager_ms"] else None)
                row["speedup_compile"] = (row["compile_ms"] / ms if ms and row["compile_ms"]
                                          else None)
                payload["rows"].append(row)
                payload["goals"] = evaluate_goals(payload["rows"])
                write(json_path, payload)
                print(f"{op:24s} B {B:6d} C {C:3d} D {D:4d} {row['dtype']:9s} "
                      f"triton {ms if ms is None else round(ms, 4)} ms  "
                      f"eager {row['eager_ms'] and round(row['eager_ms'], 4)} ms  "
                      f"compile {row['compile_ms'] and round(row['compile_ms'], 4)} ms"
                      + (f"  errors {row['errors']}" if row["errors"] else ""), flush=True)
    failed = [row for row in payload["rows"] if row["triton_ms"] is None]
    print(f"wrote {json_path}" if json_path else "no JSON written",
          f"({len(payload['rows'])} rows, {len(failed)} Triton failures)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
