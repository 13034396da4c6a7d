"""Batched, on-device image preparation: uint8 NHWC -> float NCHW, resize, crop+flip, normalise.

The augmentations of docs/method.md, "Published hyperparameters" (random crop with zero padding,
horizontal flip; resize for faces) run on the whole batch at once on the batch's device, so no
per-image Python work and no host synchronisation. Their random numbers are a hash of (run seed,
epoch, sample index): a pure function of the sample, not of which rank or batch position reads it,
so N ranks augment exactly like one process and a resumed run like an uninterrupted one, with no
generator state to carry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


@dataclass
class ImageTransform:
    """Turns a uint8 NHWC batch into the model's float NCHW input (see the module docstring).

    Pixels are multiplied by ``scale`` (1/255: [0, 1]); ``mean``/``std`` None means no
    normalisation; ``resize`` is the side length the image is resized to first; ``crop_padding`` > 0
    and ``flip`` apply only when ``train``.
    """
    scale: float = 1.0 / 255.0
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    resize: Optional[int] = None
    crop_padding: int = 0
    flip: bool = False
    channels_last: bool = False
    dtype: torch.dtype = torch.float32  # of the model input (bf16 under the bf16 precisions)
    _constants: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __call__(self, images: torch.Tensor, train: bool,
                 keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Return the NCHW batch (of ``dtype``) for a uint8 (B, H, W, C) batch; ``keys`` (B,)
        int64 seed each sample's augmentation (see `sample_keys`), needed when ``train`` augments.

        A float32 or `loader_dtype` batch is taken as already converted and multiplied by
        ``scale`` (what the CPU loaders do in their own thread) and may be modified in place."""
        # Convert and scale in the loader's NHWC layout (a transposing copy costs several
        # times more), then view it as NCHW: channels-last memory, no copy.
        if images.dtype == torch.uint8:
            x = images.to(torch.float32).mul_(self.scale).permute(0, 3, 1, 2)
        elif images.dtype in (torch.float32, self.loader_dtype):
            x = images.permute(0, 3, 1, 2)
        else:
            raise TypeError(f"image batch of dtype {images.dtype}; expected uint8 (or "
                            f"{self.loader_dtype} already scaled)")
        if self.resize is not None and x.shape[-2:] != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear",
                              align_corners=False, antialias=x.shape[-1] > self.resize)
        if train and self.augments:
            x = random_crop_flip(x, self.crop_padding, self.flip, keys)
        if self.mean is not None:
            mean, std = self._normalisation(x.device)
            x = x.sub_(mean).div_(std)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.to(self.dtype).contiguous(memory_format=fmt)

    @property
    def loader_dtype(self) -> torch.dtype:
        """The dtype a CPU loader converts to in its own thread: ``dtype`` when scaling is all the
        arithmetic left (crop and flip only move pixels; scaled in float32 first, then rounded
        once, so the values equal this transform's), float32 when resize or normalisation follow."""
        return self.dtype if self.resize is None and self.mean is None else torch.float32

    @property
    def augments(self) -> bool:
        """Whether training batches get a random crop or flip."""
        return self.crop_padding > 0 or self.flip

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Made once per device: a host-to-device copy every step would stall the stream.
        if device not in self._constants:
            self._constants[device] = tuple(torch.tensor(v, device=device).view(1, -1, 1, 1)
                                            for v in (self.mean, self.std))
        return self._constants[device]


_MASK32 = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Return a 32-bit avalanche hash of int64 values in [0, 2**32) (same range), elementwise.

    Products may wrap in int64; their low 32 bits, which are kept, are exact anyway.
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def sample_keys(seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
    """Return the augmentation key of each sample of an epoch: a hash of (seed, epoch, index)."""
    head = mix32(torch.tensor([seed * 0x9E3779B1 + epoch], dtype=torch.int64))
    return mix32(index.to(torch.int64) ^ head.to(index.device))


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, keys: torch.Tensor) -> torch.Tensor:
    """Return a random HxW crop of each zero-padded image, mirrored with probability 1/2 if ``flip``;
    the randomness of image i comes from ``keys[i]`` only.

    One gather does both: the crop picks rows/columns at a random offset into the padded image and
    a flip reverses the column order, so the batch is touched once.
    """
    b, _, h, w = x.shape
    device = x.device
    padded = F.pad(x, (padding,) * 4) if padding else x
    bits = mix32(keys.to(device=device, dtype=torch.int64))
    span = 2 * padding + 1
    offsets = torch.stack([bits % span, (bits >> 8) % span], 1)
    rows = offsets[:, :1] + torch.arange(h, device=device)
    cols = torch.arange(w, device=device).expand(b, w)
    if flip:
        mirrored = ((bits >> 31) & 1).bool()[:, None]
        cols = torch.where(mirrored, w - 1 - cols, cols)
    cols = offsets[:, 1:] + cols
    batch = torch.arange(b, device=device)[:, None, None]
    # Advanced indices around the channel slice come first: the result is (B, H, W, C).
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
