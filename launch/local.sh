#!/usr/bin/env bash
# Train on this machine: NUM_GPUS ranks started by the deepspeed launcher (on a machine without
# GPUs, CPU ranks on gloo). The arguments are agvm-train's (see `agvm-train --help`).
#
# Usage: [MASTER_PORT=29500] launch/local.sh [--num-gpus N] [--config CONFIG.yaml] [--resume auto|PATH]
#                                          [--dry-run] [key.sub=value ...]
#   --num-gpus N (first, or NUM_GPUS=N): ranks on this machine, default 2.
#   --config defaults to configs/synthetic_tiny.yaml (relative paths are read from the current
#   directory: run from the repo root). --dry-run prints the config, model, DeepSpeed config and
#   world layout without launching. On CPU use an fp32 DeepSpeed config (ds_configs/zero2_fp32.json).
#
# Examples:
#   launch/local.sh --dry-run
#   launch/local.sh --num-gpus 8 --config configs/coco_faster_rcnn_r50_bs256.yaml deepspeed=ds_configs/zero2_bf16.json
set -euo pipefail
num_gpus="${NUM_GPUS:-2}"
if [[ "${1:-}" == --num-gpus || "${1:-}" == --num_gpus ]]; then num_gpus="$2" && shift 2; fi
args=(--config configs/synthetic_tiny.yaml "$@")  # a later --config wins
case " $* " in
    *" --dry-run "*) exec "${PYTHON:-python}" -m agvm_ds.commands.train --num-gpus "$num_gpus" "${args[@]}" ;;
esac
# --no_local_rank: ranks read LOCAL_RANK from the environment.
exec "${DEEPSPEED:-deepspeed}" --num_gpus "$num_gpus" --master_port "${MASTER_PORT:-29500}" --no_local_rank \
    --module agvm_ds.commands.train "${args[@]}"
