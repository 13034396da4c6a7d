"""Train a short Colored MNIST run in this process (single, or one rank of a launcher) and dump what
the distributed tests compare: per-rank EMA buffers, final parameters, sharded vs local evaluation.

Usage: dist_train.py RUN_DIR OVERRIDES_JSON   (the deepspeed launcher adds --local_rank=N first)
Environment: DFA_TEST_FAIL_RANK / DFA_TEST_FAIL_STEP make that rank raise at that step.
"""
import json
import os
import sys
from pathlib import Path

import torch

from dfa_fast import config
from dfa_fast.data.loaders import make_eval_loader
from dfa_fast.evaluate import evaluate
from dfa_fast.trainer import Trainer, build_transform

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
run_dir, overrides = Path(args[0]), json.loads(args[1])
cfg = config.resolve("cmnist", 1, "disent", overrides)
trainer = Trainer(cfg, run_dir)
fail_rank = os.environ.get("DFA_TEST_FAIL_RANK")
if fail_rank is not None and int(fail_rank) == trainer.rank:
    fail_step, real_step = int(os.environ["DFA_TEST_FAIL_STEP"]), trainer.method.step

    def failing(batch, step):
        if step == fail_step:
            raise RuntimeError(f"injected failure on rank {trainer.rank} at step {step}")
        return real_step(batch, step)
    trainer.method.step = failing
summary = trainer.run()
dump = {"ema_i": trainer.method.ema.ema_i, "ema_b": trainer.method.ema.ema_b,
        "seen": trainer.method.ema.seen,
        "params": {k: v.detach().clone() for k, v in trainer.method.model.state_dict().items()},
        "final": summary["final"], "world": trainer.world}
if trainer.rank == 0:  # the whole test split in this rank alone, for comparison
    local = make_eval_loader(Path(cfg.data.path) / "test.beton", cfg.data.eval_batch_size,
                             transform=build_transform(cfg), num_workers=1)
    dump["local_test"] = evaluate(trainer.method, local, trainer.num_classes,
                                  trainer.num_biases)
torch.save(dump, run_dir / f"rank{trainer.rank}.pt")
