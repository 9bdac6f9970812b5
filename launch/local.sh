#!/usr/bin/env bash
# Train on this machine: N ranks started by the deepspeed launcher (GPUs; on a machine without
# GPUs, N CPU processes using gloo).
#
# Usage: launch/local.sh [--num-gpus N] [--master-port P] [--config CONFIG.yaml] [--resume auto|PATH]
#                        [--dry-run] [key.sub=value ...] [-- TRAINER_FLAGS ...]
#   --num-gpus N       ranks on this machine (default 2, or $NUM_GPUS)
#   --master-port P    rendezvous port (default 29500, or $MASTER_PORT); change it for a second job
#   --config PATH      experiment config (default configs/synthetic_tiny.yaml)
#   --resume auto|PATH forwarded to the trainer
#   --dry-run          print the command and world size, launch nothing (same as DRY_RUN=1)
#   key.sub=value      config overrides, forwarded in order
#   -- FLAGS           passed to the trainer verbatim (e.g. -- --dry-run for the trainer's own dry run)
# Relative paths (config, deepspeed=...) are read from the current directory: run from the repo root.
# On CPU use an fp32 DeepSpeed config (deepspeed=ds_configs/zero2_fp32.json): no fp16 there, bf16 is slow.
# If /job/hostfile exists, the deepspeed launcher reads it and may start ranks on its hosts.
#
# Examples:
#   launch/local.sh --dry-run
#   launch/local.sh --config configs/synthetic_tiny.yaml deepspeed=ds_configs/zero2_fp32.json train.epochs=1
#   launch/local.sh --num-gpus 8 --config configs/coco_faster_rcnn_r50_bs256.yaml deepspeed=ds_configs/zero2_bf16.json
set -euo pipefail
AGVM_SCRIPT="${BASH_SOURCE[0]}"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$AGVM_SCRIPT")/common.sh"

NUM_GPUS="${NUM_GPUS:-2}"
MASTER_PORT="${MASTER_PORT:-29500}"

agvm_script_option() {
    case "$(agvm_option_name "$1")" in
        --num-gpus)
            agvm_option_value "$@"
            NUM_GPUS="$AGVM_VALUE"
            ;;
        --master-port)
            agvm_option_value "$@"
            MASTER_PORT="$AGVM_VALUE"
            ;;
        *) return 1 ;;
    esac
}

AGVM_CONFIG="configs/synthetic_tiny.yaml"
AGVM_RESUME=""
agvm_parse_args "$@"
agvm_require_positive_int --num-gpus "$NUM_GPUS"
agvm_require_positive_int --master-port "$MASTER_PORT"
agvm_validate_args
agvm_trainer_args

# --no_local_rank: ranks read LOCAL_RANK from the environment; no --local_rank=N appended to the CLI.
cmd=("${DEEPSPEED:-deepspeed}" --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" --no_local_rank
    --module "$AGVM_ENTRY_MODULE" "${AGVM_ARGS[@]}")

if [[ -f /job/hostfile ]]; then
    echo "warning: /job/hostfile exists; the deepspeed launcher reads it by default" >&2
fi
if ((AGVM_DRY_RUN)); then
    agvm_print_plan local "$NUM_GPUS" "1 node x $NUM_GPUS gpus" -- "${cmd[@]}"
    exit 0
fi
exec "${cmd[@]}"
