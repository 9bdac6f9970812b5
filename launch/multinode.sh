#!/usr/bin/env bash
# Train on several nodes listed in a hostfile, with the deepspeed launcher (pdsh over ssh by default).
#
# Usage: launch/multinode.sh --hostfile HOSTFILE --config CONFIG.yaml [--master-addr ADDR]
#          [--master-port P] [--num-nodes N] [--num-gpus G] [--launcher pdsh|openmpi|mpich|impi|mvapich]
#          [--launcher-args "ARGS"] [--resume auto|PATH] [--dry-run] [key.sub=value ...] [-- TRAINER_FLAGS ...]
#   --hostfile PATH    "host slots=N" lines (see launch/hostfile.example; default $HOSTFILE)
#   --master-addr A    rendezvous address (default: the first host of the hostfile, or $MASTER_ADDR)
#   --master-port P    rendezvous port (default 29500, or $MASTER_PORT)
#   --num-nodes N      use only the first N hosts of the hostfile
#   --num-gpus G       use G GPUs on every host (otherwise each host's slots)
#   --launcher L       deepspeed's multi-node backend (default pdsh). For Slurm clusters use
#                      launch/slurm_swinv2_1b_coco.sbatch instead: deepspeed's slurm backend gives
#                      the tasks no RANK/LOCAL_RANK.
#   --launcher-args S  extra arguments for that backend, one quoted string
#   other options as in launch/local.sh (--config, --resume, --dry-run, overrides, -- FLAGS)
# Needs: passwordless ssh from this node to every host, pdsh (for pdsh), the repo and data at the
# same path on every host. Variables named NCCL*, PYTHON*, UCX*, MV2* are forwarded to the hosts;
# put anything else (conda paths, NCCL_SOCKET_IFNAME) in ./.deepspeed_env as KEY=VALUE lines.
#
# Examples:
#   launch/multinode.sh --hostfile launch/hostfile.example --dry-run --config configs/coco_faster_rcnn_r50_bs256.yaml
#   launch/multinode.sh --hostfile hosts --master-addr 10.0.0.1 --config configs/coco_faster_rcnn_r50_bs256.yaml \
#       deepspeed=ds_configs/zero2_bf16.json
set -euo pipefail
AGVM_SCRIPT="${BASH_SOURCE[0]}"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$AGVM_SCRIPT")/common.sh"

HOSTFILE="${HOSTFILE:-}"
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-29500}"
NUM_NODES=""
NUM_GPUS=""
LAUNCHER="pdsh"
LAUNCHER_ARGS=""

agvm_script_option() {
    case "$(agvm_option_name "$1")" in
        --hostfile) agvm_option_value "$@" && HOSTFILE="$AGVM_VALUE" ;;
        --master-addr) agvm_option_value "$@" && MASTER_ADDR="$AGVM_VALUE" ;;
        --master-port) agvm_option_value "$@" && MASTER_PORT="$AGVM_VALUE" ;;
        --num-nodes) agvm_option_value "$@" && NUM_NODES="$AGVM_VALUE" ;;
        --num-gpus) agvm_option_value "$@" && NUM_GPUS="$AGVM_VALUE" ;;
        --launcher) agvm_option_value "$@" && LAUNCHER="$AGVM_VALUE" ;;
        --launcher-args) agvm_option_value "$@" && LAUNCHER_ARGS="$AGVM_VALUE" ;;
        *) return 1 ;;
    esac
}

AGVM_CONFIG=""
AGVM_RESUME=""
agvm_parse_args "$@"
[[ -n "$HOSTFILE" ]] || agvm_die "no hostfile given (--hostfile PATH; see launch/hostfile.example)"
agvm_require_positive_int --master-port "$MASTER_PORT"
if [[ -n "$NUM_NODES" ]]; then agvm_require_positive_int --num-nodes "$NUM_NODES"; fi
if [[ -n "$NUM_GPUS" ]]; then agvm_require_positive_int --num-gpus "$NUM_GPUS"; fi
if [[ "${LAUNCHER,,}" == slurm ]]; then
    agvm_die "--launcher slurm starts tasks without RANK/LOCAL_RANK; use launch/slurm_swinv2_1b_coco.sbatch as a template"
fi
agvm_validate_args
agvm_trainer_args
agvm_read_hostfile "$HOSTFILE" "${NUM_NODES:-0}" "${NUM_GPUS:-0}"
MASTER_ADDR="${MASTER_ADDR:-${AGVM_HOSTS[0]}}"

world_size=0
layout=""
uniform=1
for i in "${!AGVM_HOSTS[@]}"; do
    world_size=$((world_size + AGVM_SLOTS[i]))
    layout+="${layout:+ + }${AGVM_HOSTS[i]} x${AGVM_SLOTS[i]}"
    ((AGVM_SLOTS[i] == AGVM_SLOTS[0])) || uniform=0
done
if ((uniform)); then
    layout="${#AGVM_HOSTS[@]} nodes x ${AGVM_SLOTS[0]} gpus: ${AGVM_HOSTS[*]}"
else
    layout="${#AGVM_HOSTS[@]} nodes: $layout"
fi

cmd=("${DEEPSPEED:-deepspeed}" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [[ -n "$NUM_NODES" ]]; then cmd+=(--num_nodes "$NUM_NODES"); fi
if [[ -n "$NUM_GPUS" ]]; then cmd+=(--num_gpus "$NUM_GPUS"); fi
cmd+=(--launcher "$LAUNCHER")
if [[ -n "$LAUNCHER_ARGS" ]]; then cmd+=(--launcher_args "$LAUNCHER_ARGS"); fi
# --no_local_rank: ranks read LOCAL_RANK from the environment; no --local_rank=N appended to the CLI.
cmd+=(--no_local_rank --module "$AGVM_ENTRY_MODULE" "${AGVM_ARGS[@]}")

if ((AGVM_DRY_RUN)); then
    agvm_print_plan "deepspeed/$LAUNCHER" "$world_size" "$layout" -- "${cmd[@]}"
    echo "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
    exit 0
fi
exec "${cmd[@]}"
