#!/usr/bin/env bash
# One node, NPROC GPUs (default: all of them; without a GPU: NPROC CPU ranks, default 2), through
# the deepspeed launcher. Arguments are those of `dfa-fast train`:
#
#   launch/train.sh --preset bffhq --ratio 0.5 --method disent --data data/faces --out runs/bffhq
#   NPROC=4 ZERO=2 PRECISION=bf16 launch/train.sh --preset cifar10c --ratio 1 --method disent ...
#
# Environment: NPROC, ZERO (0|1|2, default 0), PRECISION (fp32|bf16|bf16_mixed; default bf16 on GPUs),
# DFA_DEVICE=cpu (force CPU ranks), MASTER_PORT (default: a free port), PYTHON.
set -euo pipefail
source "$(dirname "$0")/common.sh"
exec "$py" -m deepspeed.launcher.runner --num_gpus "$nproc" --master_port "$port" \
    --module dfa_fast train "$@" "${set_args[@]}"
