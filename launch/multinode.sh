#!/usr/bin/env bash
# Several nodes from a hostfile (see hostfile.example), started from the first node; the deepspeed
# launcher reaches the others over passwordless ssh (pdsh). Every node needs the same code, the same
# environment and the data at the same path. Arguments are those of `dfa-fast train`:
#
#   HOSTFILE=launch/hostfile launch/multinode.sh --preset bffhq --ratio 0.5 --method disent \
#       --data /shared/data/faces --out /shared/runs/bffhq-64gpu
#
# Environment: HOSTFILE (required), MASTER_ADDR (default: the first host of the hostfile),
# ZERO, PRECISION, MASTER_PORT, DFA_DEVICE=cpu as in train.sh; SSH_CHECK=0 skips the launcher's
# ssh check (a hostfile of localhost only, as in the CPU test).
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${HOSTFILE:?set HOSTFILE to a hostfile (see launch/hostfile.example)}"
master=${MASTER_ADDR:-$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')}
extra=()
if [ "${SSH_CHECK:-1}" = 0 ]; then extra+=(--no_ssh_check); fi
exec "$py" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_addr "$master" \
    --master_port "$port" "${extra[@]}" --module dfa_fast train "$@" "${set_args[@]}"
