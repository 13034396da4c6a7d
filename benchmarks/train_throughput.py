"""Images/s of a DisEnt Colored MNIST training step on one CPU thread: dfa-fast against a
deliberately naive loop with the reference implementation's structure.

The naive loop (written here) reads PNG files in the published DisEnt layout through a torch
DataLoader, keeps two models with two Adam optimizers, finds the class-wise maximum of the loss EMA
with a Python loop over classes, draws the swap permutation with NumPy and calls `.item()` on the
losses every step. dfa-fast runs its real trainer (FFCV, DeepSpeed engine, device-side EMA), in
fp32 and, where the CPU multiplies bf16 natively, with ``compute.precision=bf16_mixed``.

    python benchmarks/train_throughput.py --data data/cmnist/1pct [--full-run-summary RUN/summary.json]
    python benchmarks/train_throughput.py --device cuda --json OUT/train_throughput_gpu.json

Writes benchmarks/results/train_throughput.{json,md} (or ``--json PATH``). ``full_run_seconds`` is
the wall time of a whole published run (50,000 steps, 101 evaluations) taken from that run's
summary.json. On a GPU (``--device cuda``) it times dfa-fast with the Triton kernels and with the
PyTorch reference ops (``DFA_KERNELS=torch``), and with the kernels under
``compute.precision=bf16_mixed``; the naive loop is a CPU baseline only. Without a
prepared ``--data`` folder it builds Colored MNIST 1% from the embedded MNIST files first.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402


# ---------------------------------------------------------------------------- the naive loop
def export_pngs(beton: Path, out: Path) -> None:
    """Write a split as PNG files in the published layout: {align,conflict}/<label>/<i>_<y>_<b>.png."""
    from PIL import Image
    from dfa_fast.data.loaders import make_eval_loader
    for batch in make_eval_loader(beton, 1000, num_workers=1):
        for image, y, b, i in zip(batch.image.numpy(), batch.label.tolist(), batch.bias.tolist(),
                                  batch.index.tolist()):
            folder = out / ("align" if y == b else "conflict") / str(y)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}_{y}_{b}.png")


class PngFolder(torch.utils.data.Dataset):
    """PNG files of the published layout, decoded with PIL one by one (the reference's input)."""

    def __init__(self, root: Path):
        self.files = sorted(root.glob("*/*/*.png"))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        path = self.files[i]
        _, y, b = path.stem.split("_")
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(pixels).permute(2, 0, 1), int(y), int(b), int(path.stem.split("_")[0])


def naive_mlp():
    features = nn.Sequential(nn.Linear(2352, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                             nn.Linear(100, 16), nn.ReLU())
    return nn.ModuleDict({"features": features, "fc": nn.Linear(32, 10)})


class NaiveEMA:
    """Per-sample loss EMA with a Python loop over classes for the class maximum."""

    def __init__(self, labels: torch.Tensor, alpha: float = 0.7):
        self.labels, self.alpha = labels, alpha
        self.values = torch.zeros(len(labels))
        self.updated = torch.zeros(len(labels))

    def update(self, loss, index):
        self.values[index] = (self.alpha * self.values[index]
                              + (1 - self.alpha * self.updated[index]) * loss)
        self.updated[index] = 1

    def class_max(self, c):
        return self.values[torch.where(self.labels == c)[0]].max()


def naive_loader(root: Path):
    """The naive loop's input: the PNG folder through a torch DataLoader with one worker."""
    return torch.utils.data.DataLoader(PngFolder(root), batch_size=256, shuffle=True,
                                       num_workers=1, drop_last=True, persistent_workers=True)


def naive_loader_rate(root: Path, batches: int, warmup: int = 5) -> float:
    """Return images/s of the naive loop's DataLoader alone (PNG decoding in its one worker)."""
    stream = iter(naive_loader(root))
    for _ in range(warmup):
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * 256 / (time.perf_counter() - start)


def first_layer_ms(repeats: int = 20, onednn: bool = False) -> float:
    """Return the time of the DisEnt step's first-layer products alone on this core (ms): two
    encoders' 256 x 2352 x 100 forward products and their weight gradients (the median of
    ``repeats``) in float32, through PyTorch's own products (MKL's sgemm) or, with ``onednn``,
    through oneDNN as the trainer's fp32 MLP runs them (`kernels.onednn_linear`)."""
    x, grad = torch.rand(256, 2352), torch.rand(256, 100)
    weight, bias = torch.rand(100, 2352), torch.rand(100)
    if onednn:
        from dfa_fast.kernels import onednn_linear

        def products():
            onednn_linear.product(x, weight, bias)
            onednn_linear.product(grad.t(), x.t())
    else:
        def products():
            torch.addmm(bias, x, weight.t())
            grad.t().mm(x)
    times = []
    for _ in range(repeats + 3):
        start = time.perf_counter()
        for _ in range(2):
            products()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[3:])


def run_naive(root: Path, labels: torch.Tensor, steps: int, warmup: int,
              in_memory: bool = False) -> float:
    """Return images/s of the naive DisEnt loop over ``steps`` timed steps; ``in_memory``: on 20
    batches decoded beforehand and cycled, i.e. the loop's compute without its input."""
    loader = naive_loader(root)
    model_i, model_b = naive_mlp(), naive_mlp()
    opt_i = torch.optim.Adam(model_i.parameters(), lr=1e-2)
    opt_b = torch.optim.Adam(model_b.parameters(), lr=1e-2)
    ema_i, ema_b = NaiveEMA(labels), NaiveEMA(labels)
    ce = nn.CrossEntropyLoss(reduction="none")

    def gce(logits, y, q=0.7):
        p_y = torch.softmax(logits, 1).gather(1, y[:, None]).squeeze(1).detach()
        return ce(logits, y) * q * p_y ** q

    def batches():
        if in_memory:
            kept = [b for _, b in zip(range(20), loader)]
            while True:
                yield from kept
        while True:
            yield from loader
    stream = batches()
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        x, y, _, index = next(stream)
        x = x.reshape(len(x), -1) / 255  # the reference's second division by 255
        z_i, z_b = model_i["features"](x), model_b["features"](x)
        logit_i = model_i["fc"](torch.cat([z_i, z_b.detach()], 1))
        logit_b = model_b["fc"](torch.cat([z_i.detach(), z_b], 1))
        loss_i, loss_b = ce(logit_i, y).detach(), ce(logit_b, y).detach()
        ema_i.update(loss_i, index)
        ema_b.update(loss_b, index)
        loss_i, loss_b = ema_i.values[index].clone(), ema_b.values[index].clone()
        for c in range(10):
            members = torch.where(y == c)[0]
            loss_i[members] /= ema_i.class_max(c)
            loss_b[members] /= ema_b.class_max(c)
        weight = loss_b / (loss_b + loss_i + 1e-8)
        loss = (ce(logit_i, y) * weight).mean() + 10 * gce(logit_b, y).mean()
        perm = np.random.permutation(len(y))  # swapping on, as after step 10,000
        swap_i = model_i["fc"](torch.cat([z_i, z_b[perm].detach()], 1))
        swap_b = model_b["fc"](torch.cat([z_i.detach(), z_b[perm]], 1))
        loss = loss + (ce(swap_i, y) * weight).mean() + 10 * gce(swap_b, y[perm]).mean()
        opt_i.zero_grad()
        opt_b.zero_grad()
        loss.backward()
        opt_i.step()
        opt_b.step()
        if not np.isfinite(loss.item()):  # the per-step host checks of a typical loop
            raise RuntimeError("NaN")
    return steps * 256 / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------- dfa-fast
def run_dfa_fast(data: Path, steps: int, device: str = "cpu", precision: str = "fp32",
                 method: str = "disent") -> dict:
    """Return dfa-fast's images/s: the median of log windows after the first, swap on."""
    from dfa_fast import config
    from dfa_fast.trainer import Trainer
    cfg = config.resolve("cmnist", 1, method, {
        "data": {"path": str(data)},
        "train": {"steps": steps, "eval_every": 10 ** 9, "log_every": 250,
                  "ckpt_every": 10 ** 9, "progress": False},
        "compute": {"device": device, "precision": precision}, "cpu": {"threads": 1},
        "method": {"swap_start": 0} if method == "disent" else {}})
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(cfg, Path(run_dir) / "run").run()
        lines = [json.loads(l) for l in (Path(run_dir) / "run" / "metrics.jsonl").read_text()
                 .splitlines()]
    windows = [l for l in lines if l["kind"] == "train"][1:-1]
    return {"images_per_s": statistics.median(l["images_per_s"] for l in windows),
            "step_ms": statistics.median(l["step_ms"] for l in windows),
            "data_share": statistics.median(l["data_share"] for l in windows)}


def prepared(data: Path, scratch: Path) -> Path:
    """Return ``data`` if it holds a prepared split, else build Colored MNIST 1% under ``scratch``."""
    if (data / "train.beton").is_file():
        return data
    from dfa_fast.data.cmnist import build_cmnist
    repo = Path(__file__).resolve().parents[1]
    build_cmnist(repo / "data" / "mnist", scratch, [0.01], progress=False)
    return scratch / "1pct"


def gpu(args) -> None:
    """Time the GPU step with the Triton kernels and with the PyTorch reference ops."""
    import torch
    with tempfile.TemporaryDirectory() as scratch:
        data = prepared(args.data, Path(scratch))
        result = {"gpu": torch.cuda.get_device_name(0)}
        for backend in ("triton", "torch"):
            os.environ["DFA_KERNELS"] = backend
            result[f"dfa_fast_{backend}"] = run_dfa_fast(data, args.steps, "cuda")
        os.environ["DFA_KERNELS"] = "triton"
        result["dfa_fast_triton_bf16_mixed"] = run_dfa_fast(data, args.steps, "cuda",
                                                            precision="bf16_mixed")
    result["kernels_speedup"] = (result["dfa_fast_triton"]["images_per_s"]
                                 / result["dfa_fast_torch"]["images_per_s"])
    args.json.write_text(json.dumps({"cmnist_disent_gpu": result}, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def full_run(summary_path: Path, precision: str) -> dict:
    """Return the wall time and setting of a finished full published run (its summary.json and
    the config.yaml beside it), after checking it is one: Colored MNIST DisEnt, the preset's
    50,000 steps with an evaluation every 500, one thread, in ``precision``."""
    from dfa_fast import config
    try:
        summary = json.loads(summary_path.read_text())
        cfg = config.load(summary_path.parent / "config.yaml")
    except (OSError, ValueError) as err:
        raise SystemExit(f"{summary_path}: not a finished run ({err})") from None
    found = {"dataset": cfg.data.dataset, "method": cfg.method.name, "steps": cfg.train.steps,
             "eval_every": cfg.train.eval_every, "threads": cfg.cpu.threads,
             "precision": cfg.compute.precision,
             "device": summary.get("environment", {}).get("device")}
    wanted = {"dataset": "cmnist", "method": "disent", "steps": 50_000, "eval_every": 500,
              "threads": 1, "precision": precision, "device": "cpu"}
    wrong = {k: v for k, v in found.items() if v != wanted[k]}
    if wrong:
        raise SystemExit(f"{summary_path}: not a full published run in {precision}: "
                         + ", ".join(f"{k}={v} (expected {wanted[k]})" for k, v in wrong.items()))
    return {"full_run_seconds": summary["wall_seconds"], "full_run_steps": summary["steps"],
            "full_run_ratio_pct": cfg.data.ratio_pct, "full_run_precision": precision,
            "full_run_summary": str(summary_path)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/cmnist/1pct"),
                        help="a prepared Colored MNIST ratio folder")
    parser.add_argument("--steps", type=int, default=2000, help="dfa-fast steps to time")
    parser.add_argument("--naive-steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternate the two measurements this often; report the medians")
    parser.add_argument("--full-run-summary", type=Path,
                        help="summary.json of a full 50,000-step DisEnt preset run")
    parser.add_argument("--bf16-full-run-summary", type=Path,
                        help="summary.json of the same run with --set compute.precision=bf16_mixed")
    from dfa_fast.config import DEVICES
    parser.add_argument("--device", choices=[d for d in DEVICES if d != "auto"], default="cpu")
    parser.add_argument("--json", type=Path, help="write the JSON here (GPU kit) instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # The allocator setting of the trainer's CPU runs is process-wide: made here, both loops run
    # with it (it keeps freed memory in the process; engine.keep_freed_memory).
    from dfa_fast.engine import keep_freed_memory
    kept = keep_freed_memory()
    full_runs = {prefix: full_run(path, precision) for prefix, path, precision in (
        ("", args.full_run_summary, "fp32"), ("bf16_mixed_", args.bf16_full_run_summary,
                                              "bf16_mixed")) if path}
    if args.device == "cuda":
        if args.json is None:
            parser.error("--device cuda needs --json PATH")
        return gpu(args)
    from dfa_fast.data.beton import read_int_field
    from dfa_fast.environment import native_bf16
    from dfa_fast.kernels import onednn_linear
    with tempfile.TemporaryDirectory() as scratch:
        data = prepared(args.data, Path(scratch) / "cmnist")
        labels = torch.from_numpy(read_int_field(data / "train.beton", "label").copy())
        png = Path(scratch) / "png"
        export_pngs(data / "train.beton", png)
        # bf16_mixed is timed only where the CPU multiplies bf16 natively (else it is emulated).
        bf16 = native_bf16()
        onednn = onednn_linear.available()
        # Alternating rounds: this machine's speed drifts, so each figure is a median of rounds,
        # and within a round the naive loop runs between the two dfa-fast measurements.
        rounds = []
        for _ in range(args.rounds):
            ours_fp32 = run_dfa_fast(data, args.steps)
            naive_rate = run_naive(png, labels, args.naive_steps, warmup=20)
            ours_bf16 = run_dfa_fast(data, args.steps, precision="bf16_mixed") if bf16 else None
            rounds.append((ours_fp32, naive_rate,
                           run_naive(png, labels, args.naive_steps, warmup=20, in_memory=True),
                           naive_loader_rate(png, args.naive_steps // 4), first_layer_ms(),
                           ours_bf16, first_layer_ms(onednn=True) if onednn else None))
    ours = {key: statistics.median(r[0][key] for r in rounds) for key in rounds[0][0]}
    naive, naive_compute, naive_input, floor = (statistics.median(r[i] for r in rounds)
                                                for i in (1, 2, 3, 4))
    floor_onednn = statistics.median(r[6] for r in rounds) if onednn else None
    mixed = ({key: statistics.median(r[5][key] for r in rounds) for key in rounds[0][5]}
             if bf16 else None)
    result = {"dfa_fast_images_per_s": ours["images_per_s"], "naive_images_per_s": naive,
              "speedup": ours["images_per_s"] / naive, "dfa_fast_step_ms": ours["step_ms"],
              "naive_step_ms": 256_000 / naive,
              "naive_compute_images_per_s": naive_compute,
              "naive_loader_images_per_s": naive_input,
              "first_layer_ms": floor, "first_layer_onednn_ms": floor_onednn,
              "step_ms_needed_for_5x": 256_000 / naive / 5,
              "rounds": [{"dfa_fast_images_per_s": r[0]["images_per_s"],
                          "naive_images_per_s": r[1], "naive_compute_images_per_s": r[2],
                          "naive_loader_images_per_s": r[3], "first_layer_ms": r[4],
                          "first_layer_onednn_ms": r[6],
                          "dfa_fast_bf16_mixed_images_per_s": r[5] and r[5]["images_per_s"],
                          "speedup": r[0]["images_per_s"] / r[1],
                          "speedup_bf16_mixed": r[5] and r[5]["images_per_s"] / r[1]}
                         for r in rounds],
              "dfa_fast_data_share": ours["data_share"],
              "malloc_keeps_freed_memory": kept,
              "goal": "dfa-fast at least 5x the naive loop; a full run at most 12 minutes"}
    if mixed:  # the same step with compute.precision=bf16_mixed (fp32 weights, bf16 products)
        result.update(dfa_fast_bf16_mixed_images_per_s=mixed["images_per_s"],
                      dfa_fast_bf16_mixed_step_ms=mixed["step_ms"],
                      speedup_bf16_mixed=mixed["images_per_s"] / naive)
    for prefix, run in full_runs.items():
        result.update({f"{prefix}{key}": value for key, value in run.items()})

    def full(prefix):
        return (f"{result[prefix + 'full_run_seconds'] / 60:.1f} min "
                f"({result[prefix + 'full_run_steps']} steps)"
                if prefix + "full_run_seconds" in result else "not measured")
    mixed_row = (f"| dfa-fast, `compute.precision=bf16_mixed` (bf16 products, fp32 weights and "
                 f"losses) | {mixed['images_per_s']:.0f} | {mixed['step_ms']:.2f} |\n"
                 if mixed else "")
    table = ("| Colored MNIST DisEnt, batch 256, 1 CPU thread | images/s | step (ms) |\n"
             "| --- | --- | --- |\n"
             f"| dfa-fast (FFCV + DeepSpeed engine, device EMA) | {ours['images_per_s']:.0f} | "
             f"{ours['step_ms']:.2f} |\n" + mixed_row +
             f"| naive loop (PNG DataLoader, Python class loop, .item()) | {naive:.0f} | "
             f"{256_000 / naive:.2f} |\n"
             f"| naive loop's compute alone (20 batches in memory) | {naive_compute:.0f} | "
             f"{256_000 / naive_compute:.2f} |\n"
             f"| naive loop's input alone (PNG DataLoader, 1 worker) | {naive_input:.0f} | "
             f"{256_000 / naive_input:.2f} |\n"
             f"| the step's first-layer products alone (2 x 256x2352x100, forward + weight "
             f"gradient), PyTorch's fp32 products (MKL) | {256_000 / floor:.0f} | {floor:.2f} |\n"
             + (f"| the same products through oneDNN (dfa-fast's fp32 MLP) | "
                f"{256_000 / floor_onednn:.0f} | {floor_onednn:.2f} |\n" if onednn else "")
             + "\n"
             f"Speed-up {result['speedup']:.1f}x (fp32)"
             + (f", {result['speedup_bf16_mixed']:.1f}x (bf16_mixed)" if mixed else
                " (bf16_mixed not timed: no native bf16 on this CPU)")
             + "; within each round: " + ", ".join(
                 f"{r['speedup']:.1f}x" + (f" / {r['speedup_bf16_mixed']:.1f}x" if mixed else "")
                 for r in result["rounds"])
             + f"; 5x needs a {result['step_ms_needed_for_5x']:.2f} "
             "ms step on this machine. Full published run (50,000 steps, 101 "
             f"evaluations): {full('')} in fp32, {full('bf16_mixed_')} in bf16_mixed. "
             f"Medians of {args.rounds} alternating rounds (dfa-fast "
             f"{args.steps} steps with the feature swap on, naive {args.naive_steps} steps, run "
             "between the fp32 and the bf16_mixed measurement); one "
             "torch thread per process (`torch.set_num_threads(1)`); each loader has one worker "
             "(dfa-fast's in a child process on the CPU, `data.loader_process`)"
             + ("; both loops with glibc malloc keeping freed memory (the trainer's CPU setting, "
                "process-wide)." if kept else "."))
    payload = {"cmnist_disent": result, "threads": 1}
    if args.json:
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    else:
        write_results("train_throughput", payload, table)
    print(table)


if __name__ == "__main__":
    main()
