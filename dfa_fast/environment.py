"""What a measured figure depends on: the machine and the library versions."""
from __future__ import annotations

import importlib.metadata
import os
import platform

LIBRARIES = ("torch", "triton", "deepspeed", "ffcv", "numpy", "numba", "dfa-fast")


def machine() -> dict:
    """Return the platform, CPU model and counts, and the GPU name if there is one."""
    facts = {"platform": platform.platform(), "machine": platform.machine(),
             "cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0))}
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line for line in handle if line.startswith("model name"))
        facts["cpu"] = cpu.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        pass
    import torch
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def native_bf16() -> bool:
    """Return whether oneDNN runs bf16 products on this CPU in bf16 kernels (AVX-512 core, with
    AVX512-BF16 or AMX the fast ones; Arm BF16); elsewhere torch emulates them, up to 10x slower
    than fp32 (measured on an AVX2-only EPYC)."""
    from dfa_fast.compat import mkldnn_bf16_probe
    probe = mkldnn_bf16_probe()
    return bool(probe()) if probe is not None else cpuinfo_bf16()


def cpuinfo_bf16() -> bool:
    """The public fallback of `native_bf16`, torch's rule read from /proc/cpuinfo: x86 AVX512 BW,
    VL and DQ, or Arm's bf16 feature (False where there is no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as handle:
            line = next((x for x in handle if x.startswith(("flags", "Features"))), ":")
        flags = set(line.split(":", 1)[1].split())
    except OSError:
        return False
    return {"avx512bw", "avx512vl", "avx512dq"} <= flags or "bf16" in flags


def resolve_precision(precision: str, device) -> str:
    """Return the concrete ``compute.precision`` of ``precision`` on ``device``: ``auto`` is
    bf16_mixed where bf16 products are native (a CUDA device with bf16, a CPU with AVX512-BF16 or
    AMX) and fp32 elsewhere; any other value is returned as it is."""
    if precision != "auto":
        return precision
    import torch
    if device.type == "cuda":
        return "bf16_mixed" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16_mixed" if native_bf16() else "fp32"


def versions() -> dict:
    """Return the versions of Python and of the libraries dfa-fast runs on."""
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found
