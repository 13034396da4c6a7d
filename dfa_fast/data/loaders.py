"""FFCV loaders that yield device batches (image, label, bias, index).

Train: random order (QUASI_RANDOM only in one process), last partial batch dropped, a new shuffle
each epoch from the run seed, distributed-aware: every rank draws the same permutation of the whole
split and takes every world-th sample, so the ranks' k-th batches together hold exactly the samples
of the k-th batch of one process reading the global batch (what makes N ranks equal one process). Eval: SEQUENTIAL, every sample exactly once; under
data parallelism each rank reads a disjoint contiguous shard (no padding duplicates), so summing the
ranks' counts gives exactly the single-process numbers. Decoding happens in FFCV's compiled pipeline;
on a GPU the uint8 batch moves to the device asynchronously and `ImageTransform` prepares it there.
On the CPU the device is the host, so the uint8 -> float conversion and scaling (the transform's
most expensive part there) run in FFCV's loader thread instead, ahead of the training step
(`ScaleToFloat`; straight to bf16 under the bf16 precisions when nothing but crop and flip
follows, so the training thread reads half the bytes); the rest of the transform (crop, flip,
normalisation) still runs per batch. For CPU training the trainer wraps the train loader in
`process_loader.load_in_child`, which runs it in a child process: its Python then never takes the
GIL from the training thread. (That module builds on this one, never the other way round.)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from dfa_fast.data.augment import ImageTransform, sample_keys
from dfa_fast.data.beton import import_ffcv, load_sidecar, own_threads
from dfa_fast.config import TRAIN_ORDERS
from dfa_fast.distributed import rank_and_world
from dfa_fast.errors import DfaError


@dataclass
class Batch:
    """One batch on the device: image (float NCHW in the transform's dtype, or uint8 NHWC without a
    transform), and int64 label, bias and index (the sample's row in the split)."""
    image: torch.Tensor
    label: torch.Tensor
    bias: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return self.label.shape[0]


class DeviceLoader:
    """Iterates an FFCV loader and yields `Batch` objects with the transform applied.

    ``epoch`` and ``position`` (batches already taken in that epoch) are the loader's place in the
    run; `stream` continues from them forever, which is what checkpoints save and resume restores.
    """

    def __init__(self, loader, meta: dict, device: torch.device,
                 transform: Optional[ImageTransform], train: bool, seed: int = 0,
                 sharded: bool = False):
        self.loader, self.meta, self.device, self.transform = loader, meta, device, transform
        self.train, self.seed, self.epoch, self.position = train, seed, 0, 0
        self.sharded = sharded  # this rank reads only its part: results are summed over ranks

    def __len__(self) -> int:
        return len(self.loader)

    def image_of(self, image: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Return the batch's image, transformed (``index``: the samples, for augmentation keys);
        never FFCV's buffer itself."""
        image = image.to(self.device, non_blocking=True)
        if self.transform is None:
            return image.clone()
        augment = self.train and self.transform.augments
        keys = sample_keys(self.seed, self.epoch, index) if augment else None
        return self.transform(image, self.train, keys)

    def raw_epoch(self) -> Iterator[tuple]:
        """Yield FFCV's outputs (image, label, bias, index) for the rest of the current epoch,
        keeping ``epoch`` and ``position`` up to date; the tensors are FFCV's reused buffers."""
        self.loader.next_epoch = self.epoch
        skip = self.position
        with own_threads():
            batches = iter(self.loader)
        for i, raw in enumerate(batches):
            if i < skip:
                continue
            self.position = i + 1
            yield raw
        self.epoch += 1
        self.position = 0

    def __iter__(self) -> Iterator[Batch]:
        """Yield the batches of one epoch (the next one, or the rest of a resumed one)."""
        for image, *raw_ints in self.raw_epoch():
            # FFCV reuses its output buffers a few batches later: everything kept must be a copy.
            label, bias, index = (t.reshape(-1).to(self.device, torch.int64, non_blocking=True,
                                                   copy=True) for t in raw_ints)
            yield Batch(self.image_of(image, index), label, bias, index)

    def stream(self) -> Iterator[Batch]:
        """Yield batches forever, epoch after epoch, from the current place."""
        while True:
            yield from self

    def close(self) -> None:
        """Nothing to stop: FFCV's thread ends with its epoch (see `ProcessLoader.close`)."""

    def state_dict(self) -> dict:
        """Return the loader's place in the run (epoch and batches taken)."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a place saved by `state_dict`."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def _global_shuffle_order():
    """Return the FFCV traversal order class described in the module docstring (made lazily:
    FFCV costs seconds to import)."""
    from ffcv.traversal_order.base import TraversalOrder

    class GlobalShuffle(TraversalOrder):
        def sample_order(self, epoch: int) -> np.ndarray:
            rank, world = rank_and_world() if self.distributed else (0, 1)
            order = self.indices[np.random.default_rng([self.seed, epoch]).permutation(
                len(self.indices))]
            return order[: len(order) - len(order) % world][rank::world]
    return GlobalShuffle


def _scale_to_float(scale: float, dtype: torch.dtype = torch.float32):
    """Return an FFCV operation that turns the uint8 image batch into ``float32 * scale`` (rounded
    to ``dtype``) in the loader's thread, as a new tensor (so nothing aliases FFCV's reused
    buffers); made lazily: FFCV costs seconds to import."""
    from dataclasses import replace

    from ffcv.pipeline.operation import Operation

    class ScaleToFloat(Operation):
        def generate_code(self):
            def scale_to_float(inp, dst):
                out = inp.to(torch.float32).mul_(scale)
                return out if dtype == torch.float32 else out.to(dtype)
            return scale_to_float

        def declare_state_and_memory(self, previous_state):
            return replace(previous_state, jit_mode=False, dtype=dtype), None
    return ScaleToFloat()


def _pipelines(device: torch.device, transform: Optional[ImageTransform] = None) -> dict:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor

    def to_device():
        return [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    ints = lambda: [IntDecoder(), ToTensor(), Squeeze()] + to_device()  # noqa: E731
    image = [SimpleRGBImageDecoder(), ToTensor()] + to_device()
    if device.type == "cpu" and transform is not None:
        image.append(_scale_to_float(transform.scale, transform.loader_dtype))
    return {"image": image, "label": ints(), "bias": ints(), "index": ints()}


def _workers(num_workers: Optional[int]) -> int:
    cores = len(os.sched_getaffinity(0))  # the cores this process may run on
    return cores if num_workers is None or num_workers < 1 else min(num_workers, cores)


def make_train_loader(path: Path | str, batch_size: int, *, seed: int,
                      device: torch.device | str = "cpu", order: str = "random",
                      distributed: bool = False, transform: Optional[ImageTransform] = None,
                      num_workers: Optional[int] = None, os_cache: bool = True) -> DeviceLoader:
    """Return the training loader of a split: shuffled every epoch from ``seed``, drop_last
    (`process_loader.load_in_child` runs it in a child process)."""
    import_ffcv()
    from ffcv.loader import Loader, OrderOption
    from ffcv.loader.loader import ORDER_MAP

    meta = load_sidecar(path)
    if order not in TRAIN_ORDERS:
        raise DfaError(f"train order {order!r} unknown; expected one of "
                       f"{', '.join(TRAIN_ORDERS)}")
    if order == "quasi_random" and distributed:
        raise DfaError("order 'quasi_random' is not supported with distributed=True (FFCV cannot "
                       "split it across ranks); use order 'random'")
    _, world = rank_and_world() if distributed else (0, 1)
    if batch_size < 1 or batch_size * world > meta["num_samples"]:
        raise DfaError(f"batch size {batch_size} x {world} rank(s) does not fit the "
                       f"{meta['num_samples']} samples of {path}")
    device = torch.device(device)
    ORDER_MAP.setdefault("global_shuffle", _global_shuffle_order())
    with own_threads():
        loader = Loader(str(path), batch_size=batch_size, num_workers=_workers(num_workers),
                        order="global_shuffle" if order == "random" else OrderOption.QUASI_RANDOM,
                        distributed=distributed, seed=int(seed), drop_last=True,
                        os_cache=os_cache, pipelines=_pipelines(device, transform))
    return DeviceLoader(loader, meta, device, transform, train=True, seed=int(seed))


def make_eval_loader(path: Path | str, batch_size: int, *, device: torch.device | str = "cpu",
                     distributed: bool = False, transform: Optional[ImageTransform] = None,
                     num_workers: Optional[int] = None, os_cache: bool = True) -> DeviceLoader:
    """Return the evaluation loader of a split: sequential, every sample once (this rank's shard)."""
    import_ffcv()
    from ffcv.loader import Loader, OrderOption

    meta = load_sidecar(path)
    rank, world = rank_and_world() if distributed else (0, 1)
    shard = np.array_split(np.arange(meta["num_samples"], dtype=np.uint64), world)[rank]
    device = torch.device(device)
    with own_threads():
        loader = Loader(str(path), batch_size=batch_size, num_workers=_workers(num_workers),
                        order=OrderOption.SEQUENTIAL, indices=shard, drop_last=False,
                        os_cache=os_cache, pipelines=_pipelines(device, transform))
    return DeviceLoader(loader, meta, device, transform, train=False, sharded=world > 1)
