"""Shared helpers of the benchmark scripts: machine/version facts and result files."""
from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from dfa_fast.environment import machine, versions

RESULTS = Path(__file__).resolve().parent / "results"


def command() -> str:
    """Return the command line that is running, as the user would type it."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def git_state(where: Path = Path(__file__).resolve().parent) -> dict:
    """Return the checkout's commit and whether tracked files differ from it ({"commit": None}
    outside a git checkout)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_results(name: str, payload: dict, table: str,
                  folder: Path = RESULTS) -> tuple[Path, Path]:
    """Write <folder>/<name>.json and .md (the table plus the date, git commit, machine, versions
    and command); the folder is benchmarks/results unless given. Each file is written under a
    temporary name and renamed, so an interrupted write leaves the previous file."""
    folder.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    payload = {**payload, "date": date, "git": git_state(), "machine": machine(),
               "versions": versions(), "command": command()}
    json_path, md_path = folder / f"{name}.json", folder / f"{name}.md"
    facts, git = payload["machine"], payload["git"]
    commit = "not a git checkout" if git["commit"] is None else \
        git["commit"][:12] + (" with uncommitted changes" if git["dirty"] else "")
    _write_atomic(json_path, json.dumps(payload, indent=1) + "\n")
    _write_atomic(md_path,
        f"{table}\n\nMachine: {facts.get('cpu', facts['machine'])}, {facts['cpus']} CPUs"
        f"{', GPU ' + facts['gpu'] if 'gpu' in facts else ''}; "
        + ", ".join(f"{k} {v}" for k, v in payload["versions"].items())
        + f".\n\nCommit: {commit}; {date}.\n\nCommand: `{payload['command']}`\n")
    return json_path, md_path
