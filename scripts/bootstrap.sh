#!/usr/bin/env bash
# Set up what `make demo` and `make test` need on a fresh Debian/Ubuntu machine, idempotently:
# the system libraries FFCV builds and runs against, a virtual environment, the pinned CPU stack of
# requirements-cpu.txt, and this package (editable). Usage: scripts/bootstrap.sh [VENV]
set -euo pipefail
venv=${1:-.venv}
cd "$(dirname "$0")/.."

if ! { command -v pkg-config >/dev/null && pkg-config --exists libturbojpeg opencv4; }; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    echo "bootstrap: installing pkg-config, libturbojpeg and libopencv (needed by FFCV)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        pkg-config libturbojpeg0-dev libopencv-dev >/dev/null
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
echo "bootstrap: installing the pinned stack into $venv (a few minutes on a fresh machine)"
"$venv/bin/pip" install -q --disable-pip-version-check -r requirements-cpu.txt
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
