"""Data parallelism on the CPU (gloo): 2 ranks x batch b equal 1 process x batch 2b for ZeRO 0/1/2,
through torchrun and the deepspeed launcher; global EMA; sharded evaluation; a checkpoint of 2 ranks
resumed by 1; a failing rank ends the job."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dfa_fast.engine import free_port
from dfa_fast.trainer import Trainer

SCRIPT = Path(__file__).parent / "scripts" / "dist_train.py"
STEPS = 30


def overrides(data_dir, zero_stage=0, steps=STEPS):
    # Swap from step 11 (the global permutation), LR decay from step 20, EMA from step 0.
    return {"data": {"path": str(data_dir), "batch_size": 64, "eval_batch_size": 1000},
            "method": {"swap_start": 10},
            "optim": {"lr_decay_start": 10, "lr_decay_step": 10},
            "train": {"steps": steps, "eval_every": 15, "log_every": 1, "ckpt_every": 20,
                      "progress": False},
            "parallel": {"zero_stage": zero_stage}}


def env():
    variables = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        variables.pop(key, None)
    return variables


def launch(launcher, run_dir, settings, extra_env=None, timeout=400):
    """Run the driver script with 1 process (no launcher) or 2 ranks; return the process."""
    payload = [str(run_dir), json.dumps(settings)]
    if launcher == "single":
        command = [sys.executable, str(SCRIPT), *payload]
    elif launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_port", str(free_port()), str(SCRIPT), *payload]
    else:
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                   "--master_port", str(free_port()), str(SCRIPT), *payload]
    return subprocess.run(command, env={**env(), **(extra_env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def losses(run_dir):
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [l["loss"] for l in lines if l["kind"] == "train"]


@pytest.fixture(scope="module")
def single(cmnist_full, tmp_path_factory):
    """The reference: one process, global batch 64."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    done = launch("single", run_dir, overrides(cmnist_full / "1pct"))
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, torch.load(run_dir / "rank0.pt")


@pytest.mark.parametrize("launcher, zero_stage", [("torchrun", 0), ("deepspeed", 1),
                                                  ("torchrun", 2)])
def test_two_ranks_equal_one_process(single, cmnist_full, tmp_path, launcher, zero_stage):
    reference_dir, reference = single
    run_dir = tmp_path / "run"
    done = launch(launcher, run_dir, overrides(cmnist_full / "1pct", zero_stage))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(run_dir / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["world"] == 2
    # The same (global) loss at every step.
    assert losses(run_dir) == pytest.approx(losses(reference_dir), rel=1e-5, abs=1e-6)
    assert len(losses(run_dir)) == STEPS
    # The same parameters at the end, on both ranks.
    for name, value in reference["params"].items():
        for rank in ranks:
            assert torch.allclose(rank["params"][name], value, rtol=1e-5, atol=1e-5), name
    # The EMA buffers: identical on both ranks and equal to the single process's.
    for buffer in ("ema_i", "ema_b", "seen"):
        assert torch.equal(ranks[0][buffer], ranks[1][buffer])
    assert torch.equal(ranks[0]["seen"], reference["seen"])
    for buffer in ("ema_i", "ema_b"):
        assert torch.allclose(ranks[0][buffer], reference[buffer], rtol=1e-5, atol=1e-6)
    # Evaluation sharded over the ranks equals one process reading the whole split.
    assert ranks[0]["final"]["test"] == ranks[0]["local_test"]
    assert ranks[0]["final"]["test"] == ranks[1]["final"]["test"]


def test_checkpoint_of_two_ranks_resumes_in_one(cmnist_full, tmp_path):
    run_dir = tmp_path / "run"
    done = launch("torchrun", run_dir, overrides(cmnist_full / "1pct"))
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(run_dir / "rank1.pt")
    from dfa_fast import config
    cfg = config.resolve("cmnist", 1, "disent", overrides(cmnist_full / "1pct", steps=STEPS + 4))
    resumed = Trainer(cfg, run_dir, resume=True)
    assert resumed.world == 1 and resumed.start_step == STEPS
    assert torch.equal(resumed.method.ema.ema_i, saved["ema_i"])
    assert torch.equal(resumed.method.ema.ema_b, saved["ema_b"])
    for name, value in resumed.method.model.state_dict().items():
        assert torch.equal(value, saved["params"][name]), name
    summary = resumed.run()
    assert summary["final"]["step"] == STEPS + 3


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_a_failing_rank_ends_the_job(cmnist_full, tmp_path, launcher):
    settings = overrides(cmnist_full / "1pct", steps=200)
    settings["parallel"]["dist_timeout_s"] = 60
    start = time.monotonic()
    done = launch(launcher, tmp_path / "run", settings,
                  {"DFA_TEST_FAIL_RANK": "1", "DFA_TEST_FAIL_STEP": "3"}, timeout=300)
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    assert "injected failure on rank 1 at step 3" in done.stdout + done.stderr
    assert elapsed < 150, elapsed
