"""The ResNet-18 training step on a CPU: images/s, step time, FLOPs and achieved GFLOP/s of the
DisEnt Corrupted CIFAR-10 step (batch 256, 32 px) and the faces step (batch 64, the prepared
size), fp32 and bf16_mixed, one and two threads, against a measured floor.

    python benchmarks/resnet_throughput.py --cifar10c data/cifar10c --faces data/faces64

FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` over one encoder's forward and
backward at the step's shape (a DisEnt step runs two encoders; its heads add < 0.1 %). The floor is
this core's time for the same convolutions alone: every convolution of the encoder run in
isolation (forward, input gradient, weight gradient; channels-last, in fp32 or in bf16 tensors)
at the step's shapes, summed over both encoders; what a step spends above it is batch norm,
ReLU, pooling, the loss head, Adam and the input. Each trainer figure is the real `dfa-fast
train` (the fast preset, the feature swap on from step 0) in a fresh process, the median of the
log windows after the first. `--concurrency` also times two single-threaded runs at once against
one run with two threads (how `benchmarks/accuracy.py` should fill this machine).
Writes benchmarks/results/resnet_throughput.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

WORKLOADS = {"cifar10c": ("cifar10c-fast", "1", 256), "faces": ("bffhq-fast", "0.5", 64)}


# ------------------------------------------------------------------------------ FLOPs and floor
def encoder(stem: str = "imagenet") -> nn.Module:
    from dfa_fast.models import ResNet18Encoder
    return ResNet18Encoder(stem).to(memory_format=torch.channels_last)


def encoder_flops(batch: int, size: int) -> int:
    """FLOPs (multiply-adds counted as 2) of one encoder's forward and backward at this shape."""
    from torch.utils.flop_counter import FlopCounterMode
    model = encoder()
    x = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops()


def conv_shapes(batch: int, size: int) -> list[tuple]:
    """(input shape, conv module, first) of every convolution of the encoder at this shape."""
    model, found = encoder(), []
    hooks = [m.register_forward_hook(lambda m, i, o: found.append((tuple(i[0].shape), m)))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last))
    for hook in hooks:
        hook.remove()
    return [(shape, conv, k == 0) for k, (shape, conv) in enumerate(found)]


def conv_floor_ms(batch: int, size: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """This core's time (ms) for one encoder's convolutions alone, forward and backward (no input
    gradient for the first, whose input is the image), median of ``repeats`` per convolution."""
    total = 0.0
    for shape, conv, first in conv_shapes(batch, size):
        x = torch.randn(shape, dtype=dtype).to(memory_format=torch.channels_last)
        x.requires_grad_(not first)
        weight = conv.weight.detach().to(dtype).requires_grad_()
        with torch.no_grad():
            grad = torch.randn_like(nn.functional.conv2d(x, weight, None, conv.stride,
                                                         conv.padding))
        times = []
        for _ in range(repeats + 2):
            start = time.perf_counter()
            out = nn.functional.conv2d(x, weight, None, conv.stride, conv.padding)
            out.backward(grad)
            times.append(time.perf_counter() - start)
        total += statistics.median(times[2:])
    return 1e3 * total


# ------------------------------------------------------------------------------- trainer steps
def train_command(workload: str, data: Path, out: Path, steps: int, precision: str,
                  threads: int) -> list[str]:
    preset, ratio, _ = WORKLOADS[workload]
    return [sys.executable, "-m", "dfa_fast", "train", "--preset", preset, "--ratio", ratio,
            "--method", "disent", "--data", str(data), "--out", str(out), "--steps", str(steps),
            "--set", "train.schedule_length=0", "--set", "method.swap_start=0",
            "--set", f"compute.precision={precision}", "--set", f"cpu.threads={threads}",
            "--set", "train.log_every=10", "--set", f"train.eval_every={10 ** 9}",
            "--set", f"train.ckpt_every={10 ** 9}", "--set", "train.progress=false"]


def windows(run_dir: Path) -> dict:
    """Median step ms, images/s and data share of a run's log windows after the first."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"][1:]
    if not train:
        raise SystemExit(f"{run_dir}: fewer than two log windows; give more --steps")
    return {k: statistics.median(x[k] for x in train)
            for k in ("step_ms", "images_per_s", "data_share")}


def time_runs(workload: str, data: Path, steps: int, precision: str, threads: int,
              at_once: int = 1) -> list[dict]:
    """Run ``at_once`` trainers side by side; return each one's window medians."""
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        outs = [Path(scratch) / f"run{k}" for k in range(at_once)]
        processes = [subprocess.Popen(train_command(workload, data, out, steps, precision,
                                                    threads), env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True) for out in outs]
        for process in processes:
            _, err = process.communicate()
            if process.returncode:
                raise SystemExit(f"dfa-fast train failed ({workload}, {precision}, {threads} "
                                 f"threads):\n{err[-2000:]}")
        return [windows(out) for out in outs]


def step_size(workload: str, data: Path) -> int:
    """The side of the images the step trains on: the preset's resize, else the stored size."""
    from dfa_fast import config
    preset, ratio, _ = WORKLOADS[workload]
    meta_path = data / f"{ratio}pct" / "train.json"
    try:
        stored = json.loads(meta_path.read_text())["image_shape"][0]
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"{meta_path}: not a prepared split ({err}); expected the folder "
                         f"that `dfa-fast prepare` wrote for {workload}") from None
    return config.resolve(preset, float(ratio), "disent", {}).data.resize or stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar10c", type=Path, default=Path("data/cifar10c"),
                        help="prepared Corrupted CIFAR-10 (with its 1pct folder)")
    parser.add_argument("--faces", type=Path, default=Path("data/faces64"),
                        help="prepared faces (with its 0.5pct folder)")
    parser.add_argument("--steps", type=int, default=30, help="trainer steps per measurement "
                                                              "(log windows of 10)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--workloads", default="cifar10c,faces")
    parser.add_argument("--no-concurrency", action="store_true",
                        help="skip two 1-thread runs at once against one 2-thread run")
    parser.add_argument("--name", default="resnet_throughput")
    args = parser.parse_args()
    from dfa_fast.environment import native_bf16
    precisions = ["fp32"] + (["bf16_mixed"] if native_bf16() else [])
    dtypes = {"fp32": torch.float32, "bf16_mixed": torch.bfloat16}
    rows = []
    for workload in args.workloads.split(","):
        data = getattr(args, workload)
        batch, size = WORKLOADS[workload][2], step_size(workload, data)
        flops = 2 * encoder_flops(batch, size)  # two encoders per DisEnt step
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for precision in precisions:  # floor and step back to back: the speed drifts
                floor = 2 * conv_floor_ms(batch, size, dtypes[precision])
                step = time_runs(workload, data, args.steps, precision, threads)[0]
                rows.append({"workload": workload, "batch": batch, "size": size,
                             "threads": threads, "precision": precision,
                             "flops_per_step": flops, "floor_ms": floor, **step,
                             "gflop_per_s": flops / step["step_ms"] / 1e6,
                             "floor_gflop_per_s": flops / floor / 1e6,
                             "over_floor": step["step_ms"] / floor})
                print(json.dumps(rows[-1]), flush=True)
    concurrency = None
    if not args.no_concurrency and "cifar10c" in args.workloads:
        precision = precisions[-1]
        pair = time_runs("cifar10c", args.cifar10c, args.steps, precision, 1, at_once=2)
        single = time_runs("cifar10c", args.cifar10c, args.steps, precision, 2)[0]
        concurrency = {"precision": precision,
                       "two_runs_1_thread_images_per_s": sum(r["images_per_s"] for r in pair),
                       "two_runs_step_ms": [r["step_ms"] for r in pair],
                       "one_run_2_threads_images_per_s": single["images_per_s"],
                       "one_run_2_threads_step_ms": single["step_ms"]}
        concurrency["two_runs_over_one"] = (concurrency["two_runs_1_thread_images_per_s"]
                                            / single["images_per_s"])
        print(json.dumps(concurrency), flush=True)
    by = {(r["workload"], r["threads"], r["precision"]): r for r in rows}
    lines = ["| step (DisEnt, 2 encoders) | threads | precision | images/s | step ms | "
             "data share | GFLOP/step | GFLOP/s | conv floor ms | step / floor | "
             "bf16_mixed speed-up (its floor's) |", "| --- " * 11 + "|"]
    for r in rows:
        fp32 = by.get((r["workload"], r["threads"], "fp32"))
        speedup = (f"{fp32['step_ms'] / r['step_ms']:.2f}x "
                   f"({fp32['floor_ms'] / r['floor_ms']:.2f}x)"
                   if r["precision"] != "fp32" and fp32 else "")
        name = (f"Corrupted CIFAR-10, batch {r['batch']}, {r['size']} px"
                if r["workload"] == "cifar10c" else
                f"faces, batch {r['batch']}, {r['size']} px")
        lines.append(f"| {name} | {r['threads']} | {r['precision']} | {r['images_per_s']:.0f} "
                     f"| {r['step_ms']:.0f} | {100 * r['data_share']:.1f} % | "
                     f"{r['flops_per_step'] / 1e9:.1f} | {r['gflop_per_s']:.0f} | "
                     f"{r['floor_ms']:.0f} | {r['over_floor']:.2f}x | {speedup} |")
    table = "\n".join(lines) + (
        "\n\nThe DisEnt step of the fast presets (`dfa-fast train`, channels-last input, the "
        "feature swap on), the median of the 10-step log windows after the first of a "
        f"{args.steps}-step run in a fresh process. GFLOP/step: FlopCounterMode over both "
        "encoders' forward and backward. Conv floor: the same convolutions (channels-last, fp32 "
        "or bf16 tensors, forward and both gradients) timed alone on this core with the same "
        "threads, measured just before the step; step / floor is what the step spends above "
        "them. bf16_mixed speed-up: against the fp32 row of the same step and threads, in brackets the "
        "same ratio of the two conv floors (what bf16 convolutions alone gain on this core). Goals "
        "(issue 17): fp32 within 1.3x of the floor, bf16_mixed at least 1.7x faster than "
        "fp32, data share under 5 %.")
    if concurrency:
        table += (f"\n\nFilling the 2-core machine ({concurrency['precision']} Corrupted "
                  "CIFAR-10 DisEnt): two single-threaded runs at once "
                  f"{concurrency['two_runs_1_thread_images_per_s']:.0f} images/s together, one "
                  f"run with two threads {concurrency['one_run_2_threads_images_per_s']:.0f} "
                  f"images/s: {concurrency['two_runs_over_one']:.2f}x.")
    write_results(args.name, {"rows": rows, "concurrency": concurrency,
                              "steps_per_measurement": args.steps}, table)
    print(table)


if __name__ == "__main__":
    main()
