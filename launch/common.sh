# Shared by the launch scripts (sourced): the device, the DeepSpeed config file and a free port.
# Sets: device (cuda|cpu), nproc (ranks on this node), precision, zero, ds_config, port, py, set_args.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${PYTHON:-python3}
if [ "${DFA_DEVICE:-auto}" != cpu ] && command -v nvidia-smi >/dev/null 2>&1 \
        && nvidia-smi -L >/dev/null 2>&1; then
    device=cuda
    nproc=${NPROC:-$(nvidia-smi -L | wc -l)}
    precision=${PRECISION:-bf16}
else
    # DeepSpeed's CPU accelerator (gloo), one OpenMP thread per rank.
    device=cpu
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
    nproc=${NPROC:-2}
    precision=${PRECISION:-fp32}
fi
zero=${ZERO:-0}
suffix=""
if [ "$precision" = bf16 ]; then suffix=_bf16; fi
ds_config=$here/ds_zero${zero}${suffix}.json
[ -f "$ds_config" ] || { echo "launch: no $ds_config (ZERO=0|1|2, PRECISION=fp32|bf16|bf16_mixed)" >&2; exit 2; }
port=${MASTER_PORT:-$("$py" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
# The run config must agree with the DeepSpeed file (dfa-fast checks it).
set_args=(--deepspeed_config "$ds_config" --set "parallel.zero_stage=$zero"
          --set "compute.precision=$precision" --set "compute.device=$device")
if [ "$device" = cpu ]; then set_args+=(--set cpu.threads=1); fi
