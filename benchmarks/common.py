"""Shared helpers of the benchmark scripts: machine/version facts and result files."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from dfa_fast.environment import machine, versions

RESULTS = Path(__file__).resolve().parent / "results"


def command() -> str:
    """Return the command line that is running, as the user would type it."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def write_results(name: str, payload: dict, table: str,
                  folder: Path = RESULTS) -> tuple[Path, Path]:
    """Write <folder>/<name>.json and .md (the table plus machine and command); the folder is
    benchmarks/results unless given."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "machine": machine(), "versions": versions(), "command": command()}
    json_path, md_path = folder / f"{name}.json", folder / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    facts = payload["machine"]
    md_path.write_text(
        f"{table}\n\nMachine: {facts.get('cpu', facts['machine'])}, {facts['cpus']} CPUs"
        f"{', GPU ' + facts['gpu'] if 'gpu' in facts else ''}; "
        + ", ".join(f"{k} {v}" for k, v in payload["versions"].items())
        + f".\n\nCommand: `{payload['command']}`\n")
    return json_path, md_path
