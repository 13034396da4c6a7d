"""Shared helpers of the benchmark scripts: machine/version facts and result files."""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """Return the facts about this machine that a figure depends on."""
    facts = {"platform": platform.platform(), "machine": platform.machine(),
             "cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0))}
    try:
        cpu = next(l for l in open("/proc/cpuinfo") if l.startswith("model name"))
        facts["cpu"] = cpu.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        pass
    try:
        import torch
        if torch.cuda.is_available():
            facts["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return facts


def versions() -> dict:
    """Return the versions of Python and the libraries the benchmarks use."""
    import importlib.metadata as md
    found = {"python": platform.python_version()}
    for name in ("torch", "triton", "deepspeed", "ffcv", "numpy", "numba", "dfa-fast"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def command() -> str:
    """Return the command line that is running, as the user would type it."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def write_results(name: str, payload: dict, table: str) -> tuple[Path, Path]:
    """Write results/<name>.json and results/<name>.md (the table plus machine and command)."""
    RESULTS.mkdir(exist_ok=True)
    payload = {**payload, "machine": machine(), "versions": versions(), "command": command()}
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    facts = payload["machine"]
    md_path.write_text(
        f"{table}\n\nMachine: {facts.get('cpu', facts['machine'])}, {facts['cpus']} CPUs"
        f"{', GPU ' + facts['gpu'] if 'gpu' in facts else ''}; "
        + ", ".join(f"{k} {v}" for k, v in payload["versions"].items())
        + f".\n\nCommand: `{payload['command']}`\n")
    return json_path, md_path
