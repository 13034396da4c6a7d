#!/usr/bin/env bash
# GPU check kit: what a session with a lent H200 runs, in one device call of about 8 minutes.
#
# 1. Here, on the CPU machine (reaches PyPI), once:  .venv/bin/python benchmarks/prepare_gpu_wheels.py
#    (fills the ignored .whl/ with DeepSpeed, FFCV built for Python 3.12 with its libraries, and their
#    missing dependencies; about 15 MiB, checked to install for cp312 and to fit the 64 MiB carry).
# 2. One device call:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#    The step limits below add up to 480 s (60+40+130+30+120+100); a typical run takes less.
#
# Steps, each under its own time limit so that the JSON always comes back:
#   install   the carried wheels and this project (from the working tree) into /tmp/dfa-site
#   env       GPU, driver and versions; whether DeepSpeed and FFCV import
#   tests     the kernel tests and the dispatch tests on CUDA (TRITON_INTERPRET=0: no interpreter),
#             bf16 and CUDA-graph capture included, in parallel over 12 workers; then the tests marked
#             `cuda` elsewhere in tests/
#   kernels   benchmarks/kernels.py (Triton vs eager vs torch.compile, GB/s against a copy)
#   train     benchmarks/train_throughput.py --device cuda: DisEnt Colored MNIST steps through the real
#             trainer (FFCV, DeepSpeed), Triton kernels against the PyTorch reference ops
# Files in $OUT (at most 8 come back): gpu_check.json (summary), gpu_check.log (everything printed),
# pytest_cuda.xml, kernels.json, kernels.md, train_throughput_gpu.json.
#
# GPU_CHECK_DRY_RUN=1 runs the same plumbing on a CPU machine with the current Python environment
# (no install; tests marked `cuda` only, which skip; kernels.py --check): how the kit is checked here.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: >"$LOG"
PY=${PYTHON:-python3}
SITE=/tmp/dfa-site
DRY=${GPU_CHECK_DRY_RUN:-0}
START=$SECONDS
STEPS=()

# step NAME LIMIT_S COMMAND...: run COMMAND under a time limit, log its output, record rc and time.
step() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s, at $((SECONDS - START))s) ===" | tee -a "$LOG"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: rc=$rc after $((SECONDS - t0))s ===" | tee -a "$LOG"
    STEPS+=("$name $rc $((SECONDS - t0))")
}

install() {
    local pip=("$PY" -m pip install -q --root-user-action=ignore --disable-pip-version-check
        --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
    "${pip[@]}" .whl/*.whl || return 1
    # This project from the working tree, so the kit always runs the current code; the wheel
    # prepared with the others is the fallback (for a Python without setuptools, say).
    if ! "${pip[@]}" --no-build-isolation . >/tmp/dfa-project-install.log 2>&1; then
        echo "installing the working tree failed ($(grep -E "Error" /tmp/dfa-project-install.log | tail -1));" \
            "installing .whl/project instead"
        "${pip[@]}" .whl/project/*.whl
    fi
}

environment() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    "$PY" - "$OUT/env.json" <<'EOF'
import importlib, json, platform, sys
info = {"python": platform.python_version()}
for name in ("torch", "triton", "numpy", "numba", "deepspeed", "ffcv", "dfa_fast"):
    try:
        module = importlib.import_module(name)
        info[name] = getattr(module, "__version__", "imported")
    except Exception as error:  # reported, not fatal
        info[name] = f"FAILED: {type(error).__name__}: {error}"[:300]
import torch
info["cuda"] = torch.version.cuda
info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
EOF
}

# `timeout` runs programs, not shell functions: export them to a child bash.
export PY SITE OUT
export -f install environment
if [ "$DRY" = 1 ]; then
    echo "dry run: current environment, no install, CPU" | tee -a "$LOG"
else
    step install 60 bash -c install
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    # The kernels must compile for the GPU, not run in the interpreter that tests/conftest.py
    # turns on by default.
    export TRITON_INTERPRET=0
fi
step env 40 bash -c environment
FFCV_OK=0
"$PY" -c 'import ffcv' >/dev/null 2>&1 && FFCV_OK=1

# PYTHONSAFEPATH: `python -m pytest` must not put the repository root first on sys.path, where
# dfa_fast/ lacks dfa_fast.kernels (installed from kernels/); tests/ still goes on sys.path.
KERNEL_TESTS=(tests/test_kernel_gce.py tests/test_kernel_weighting.py tests/test_kernel_head.py
    tests/test_ops_dispatch.py)
XDIST=()
"$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n 12)
if [ "$DRY" = 1 ]; then
    step tests 120 "$PY" -m pytest -q -p no:cacheprovider -m cuda "${KERNEL_TESTS[@]}" \
        --junitxml "$OUT/pytest_cuda.xml"
else
    step tests 130 env PYTHONSAFEPATH=1 "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" \
        "${KERNEL_TESTS[@]}" --junitxml "$OUT/pytest_cuda.xml"
    # Tests marked `cuda` outside the kernel files (exit 5, none collected, is fine).
    step tests_cuda_elsewhere 30 env PYTHONSAFEPATH=1 "$PY" -m pytest -q -p no:cacheprovider \
        -m cuda tests $(printf -- '--ignore=%s ' "${KERNEL_TESTS[@]}")
fi

if [ "$DRY" = 1 ]; then
    step kernels 300 "$PY" benchmarks/kernels.py --check --json "$OUT/kernels.json"
else
    step kernels 120 "$PY" benchmarks/kernels.py --json "$OUT/kernels.json" --budget-s 70
fi

if [ -f benchmarks/train_throughput.py ]; then
    TRAIN=(--device cuda --json "$OUT/train_throughput_gpu.json" --steps 1500)
    [ "$FFCV_OK" = 1 ] || echo "FFCV does not import: the training step will fail" | tee -a "$LOG"
    [ "$DRY" = 1 ] && TRAIN=(--help)
    step train 100 "$PY" benchmarks/train_throughput.py "${TRAIN[@]}"
else
    echo "benchmarks/train_throughput.py is missing: no training benchmark" | tee -a "$LOG"
    STEPS+=("train missing 0")
fi

"$PY" - "$OUT" "$((SECONDS - START))" "${STEPS[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, total, steps = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
summary = {"seconds": total, "steps": {}}
for line in steps:
    name, rc, seconds = line.split()
    state = {"0": "ok", "124": "timed out", "137": "killed", "missing": "missing"}.get(rc, "failed")
    if name == "tests_cuda_elsewhere" and rc == "5":
        state = "ok (no tests marked cuda elsewhere)"
    summary["steps"][name] = {"status": state, "rc": rc, "seconds": int(seconds)}
for name in ("env", "kernels"):
    path = out / f"{name}.json"
    if path.exists():
        data = json.loads(path.read_text())
        summary[name] = data if name == "env" else {"goals": data.get("goals"),
                                                     "copy_gbps": data.get("copy_gbps")}
manifest = Path(".whl/MANIFEST.json")
if manifest.exists():
    summary["wheels"] = json.loads(manifest.read_text()).get("wheels")
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary["steps"], indent=2))
EOF
rm -f "$OUT/env.json"  # folded into gpu_check.json
