"""The launch kit in its CPU form: train.sh (one node), multinode.sh (a hostfile of localhost) and
slurm.sbatch (with stand-ins for srun and scontrol), each running 2 CPU ranks for a few steps."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"


def run_kit(script, run_dir, data_dir, extra_env, tmp_path):
    env = {**os.environ, "DFA_DEVICE": "cpu", "NPROC": "2", "PYTHON": sys.executable,
           "ZERO": "1", "PATH": f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:"
                                f"{os.environ['PATH']}", **extra_env}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    args = ["--preset", "cmnist", "--ratio", "1", "--method", "disent", "--data", str(data_dir),
            "--out", str(run_dir), "--steps", "6", "--set", "train.eval_every=5",
            "--set", "train.log_every=3", "--set", "train.progress=false"]
    return subprocess.run(["bash", str(script), *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=400)


@pytest.mark.parametrize("script", ["train.sh", "multinode.sh", "slurm.sbatch"])
def test_launch_script_cpu_form(script, cmnist_full, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    extra = {}
    if script == "multinode.sh":
        (tmp_path / "hostfile").write_text("# test\nlocalhost slots=2\n")
        extra = {"HOSTFILE": str(tmp_path / "hostfile"), "SSH_CHECK": "0"}
    if script == "slurm.sbatch":  # srun runs the command here; scontrol names this node
        (bin_dir / "srun").write_text('#!/usr/bin/env bash\nshift\nexec "$@"\n')
        (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho localhost\n")
        for tool in ("srun", "scontrol"):
            (bin_dir / tool).chmod(0o755)
        extra = {"SLURM_NNODES": "1", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "localhost",
                 "SLURM_SUBMIT_DIR": str(REPO)}
    done = run_kit(LAUNCH / script, tmp_path / "run", cmnist_full / "1pct", extra, tmp_path)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final"]["step"] == 5
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "zero_stage: 1" in config and "device: cpu" in config


def test_kit_files_agree_with_the_run_config_checks():
    from dfa_fast import config
    from dfa_fast.engine import load_ds_config
    for path in sorted(LAUNCH.glob("ds_zero*.json")):
        stage = int(path.name[len("ds_zero")])
        precision = "bf16" if "bf16" in path.name else "fp32"
        cfg = config.resolve("bffhq", 0.5, "disent", {"parallel": {"zero_stage": stage},
                                                      "compute": {"precision": precision}})
        merged = load_ds_config(path, cfg, 8)
        assert merged["train_micro_batch_size_per_gpu"] == 8
        other = config.resolve("bffhq", 0.5, "disent", {"parallel": {"zero_stage": (stage + 1) % 3},
                                                        "compute": {"precision": precision}})
        from dfa_fast.errors import DfaError
        with pytest.raises(DfaError, match="zero_optimization.stage"):
            load_ds_config(path, other, 8)
