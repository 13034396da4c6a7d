"""Run under torchrun: each rank writes the sample indices its distributed loaders yield.

Usage: torchrun --nproc_per_node 2 tests/scripts/loader_ranks.py BETON OUT_PREFIX
"""
import json
import sys

import torch
import torch.distributed as dist

from dfa_fast.data.loaders import make_eval_loader, make_train_loader

dist.init_process_group("gloo")
beton, out = sys.argv[1], sys.argv[2]
rank = dist.get_rank()
train = make_train_loader(beton, 10, seed=3, distributed=True, num_workers=1)
epochs = [[b.index.tolist() for b in train] for _ in range(2)]
evaluation = torch.cat([b.index for b in make_eval_loader(beton, 64, distributed=True,
                                                          num_workers=1)]).tolist()
with open(f"{out}.{rank}.json", "w") as handle:
    json.dump({"train": epochs, "eval": evaluation}, handle)
dist.destroy_process_group()
