"""What a run directory holds: its file names, the DeepSpeed checkpoints with atomic pointers, the
evaluation record (valid-selected, paper protocol, final) and the random-generator state that a
checkpoint carries. The trainer writes them; `report`, `plot` and `eval` read them."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dfa_fast.data.beton import write_json_atomic
from dfa_fast.errors import DfaError

SUMMARY_FILE, METRICS_FILE, CONFIG_FILE = "summary.json", "metrics.jsonl", "config.yaml"


class Record:
    """Evaluation history: the valid-selected, paper-protocol and final results."""

    def __init__(self, report_metric: str):
        self.report_metric = report_metric
        self.selected: Optional[dict] = None   # best valid unbiased (earliest on ties)
        self.paper: Optional[dict] = None      # maximum test report metric (selection on test)
        self.final: Optional[dict] = None

    def add(self, step: int, valid: dict, test: dict) -> bool:
        """Record one evaluation; return True if valid improved (a new selected model)."""
        entry = {"step": step, "valid": valid, "test": test}
        self.final = entry
        if self.paper is None or test[self.report_metric] > self.paper["test"][self.report_metric]:
            self.paper = entry
        if self.selected is None or valid["unbiased"] > self.selected["valid"]["unbiased"]:
            self.selected = entry
            return True
        return False

    def state_dict(self) -> dict:
        """Return the history for a checkpoint."""
        return {"selected": self.selected, "paper": self.paper, "final": self.final}

    def load_state_dict(self, state: dict) -> None:
        """Restore the history."""
        self.selected, self.paper, self.final = state["selected"], state["paper"], state["final"]


def rng_state() -> dict:
    # The step draws only from the method's own generator (saved with the method) and from
    # per-sample hashes (augmentation); the global generators are saved for user code.
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


class Checkpoints:
    """DeepSpeed checkpoints under ``run/checkpoints/<tag>/`` with atomic pointers.

    A pointer file (``latest``, ``best``) names the tag; it is replaced only after the save finished
    on every rank, and older tags are deleted only then, so a crash during a save keeps the previous
    checkpoint usable. Tags never repeat within a run (a resumed session adds ``-r<k>``), so no save
    writes into a checkpoint a pointer names. ``latest.json`` also records the best checkpoint of
    that moment, which is kept until the next ``latest`` save: a resume points ``best`` back at it,
    the model its restored record selected (a newer best belongs to the abandoned continuation).
    """

    def __init__(self, run_dir: Path, rank: int):
        self.folder = run_dir / "checkpoints"
        self.rank = rank
        self.session = 0  # how many times the run was resumed: part of every tag it writes

    def pointer(self, name: str) -> Optional[dict]:
        """Return the pointer {"tag", "step"} of ``latest`` or ``best``, or None."""
        path = self.folder / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save(self, engine, name: str, step: int, client_state: dict) -> None:
        """Save a checkpoint (on every rank) and point ``name`` at it."""
        tag = f"{name}-step{step:07d}" + (f"-r{self.session}" if self.session else "")
        engine.save_checkpoint(str(self.folder), tag=tag, client_state=client_state,
                               save_latest=False)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if self.rank != 0:
            return
        old, best, latest = self.pointer(name), self.pointer("best"), self.pointer("latest")
        pointer = {"tag": tag, "step": step}
        if name == "latest":
            pointer["best"] = best
        write_json_atomic(self.folder / f"{name}.json", pointer)
        # The best that ``latest`` records stays until the next latest save (see `rewind`).
        kept = ((latest or {}).get("best") or {}).get("tag")
        if old and old["tag"] not in (tag, kept):
            shutil.rmtree(self.folder / old["tag"], ignore_errors=True)
        if name == "latest":
            self._drop_best_except(best)

    def _drop_best_except(self, keep: Optional[dict]) -> None:
        for path in self.folder.glob("best-step*"):
            if path.is_dir() and (keep is None or path.name != keep["tag"]):
                shutil.rmtree(path, ignore_errors=True)

    def rewind(self) -> Optional[dict]:
        """Make the folder what it was at the ``latest`` save (rank 0 changes files; every rank
        returns): ``best`` points at the best of that moment again, later best checkpoints are
        deleted. Without a ``latest`` checkpoint, every checkpoint is deleted. Returns the
        ``latest`` pointer or None."""
        latest = self.pointer("latest")
        if self.rank == 0 and (latest is None or "best" in latest):
            keep = latest["best"] if latest else None
            if keep is None:
                (self.folder / "best.json").unlink(missing_ok=True)
            else:
                write_json_atomic(self.folder / "best.json", keep)
            self._drop_best_except(keep)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return latest

    def load(self, engine, name: str) -> dict:
        """Load the checkpoint ``name`` points at into the engine; return its client state."""
        pointer = self.pointer(name)
        if pointer is None:
            raise DfaError(f"{self.folder}: no {name} checkpoint to resume from")
        path, client = engine.load_checkpoint(str(self.folder), tag=pointer["tag"],
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise DfaError(f"{self.folder / pointer['tag']}: unreadable checkpoint")
        return client
