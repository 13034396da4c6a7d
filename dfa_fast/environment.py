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
    """Return whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere torch
    emulates bf16 products, slower than fp32."""
    import torch
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def versions() -> dict:
    """Return the versions of Python and of the libraries dfa-fast runs on."""
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found
