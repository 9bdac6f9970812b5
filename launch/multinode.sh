#!/usr/bin/env bash
# Train on the hosts of a hostfile: `deepspeed --hostfile` starts each node's ranks over pdsh/ssh.
# Every host needs passwordless ssh from this one, the repo at the same path and the same Python
# environment. The arguments are agvm-train's (see `agvm-train --help`).
#
# Usage: [MASTER_ADDR=HOST] [MASTER_PORT=29500] [NUM_NODES=N] [NUM_GPUS=G] [LAUNCHER=pdsh]
#        launch/multinode.sh --hostfile PATH --config CONFIG.yaml [--resume auto|PATH] [--dry-run] [key.sub=value ...]
#   --hostfile   (first, or HOSTFILE=PATH) "HOST slots=N" lines (launch/hostfile.example); the first host is rank 0
#   MASTER_ADDR  the rendezvous address (default: deepspeed asks the first host for `hostname -I`)
#   NUM_NODES, NUM_GPUS  use the first N hosts / G ranks per host (deepspeed's --num_nodes/--num_gpus)
#   --dry-run    prints the config, model, DeepSpeed config and the world the hostfile makes
#                (read with DeepSpeed's own parser) without launching anything
#
# Example:
#   MASTER_ADDR=node1 launch/multinode.sh --hostfile launch/hostfile.example \
#       --config configs/coco_mask_rcnn_r50_bs512.yaml deepspeed=ds_configs/zero2_bf16.json
set -euo pipefail
if [[ "${1:-}" == --hostfile ]]; then HOSTFILE="$2" && shift 2; fi
: "${HOSTFILE:?give --hostfile PATH (first) or set HOSTFILE=PATH (see launch/hostfile.example)}"
world=(--hostfile "$HOSTFILE" --num_nodes "${NUM_NODES:-0}" --num_gpus "${NUM_GPUS:-0}")
case " $* " in
    *" --dry-run "*) exec "${PYTHON:-python}" -m agvm_ds.commands.train "${world[@]}" "$@" ;;
esac
master=()
if [[ -n "${MASTER_ADDR:-}" ]]; then master=(--master_addr "$MASTER_ADDR"); fi
# --no_local_rank: ranks read LOCAL_RANK from the environment.
exec "${DEEPSPEED:-deepspeed}" "${world[@]}" "${master[@]}" --master_port "${MASTER_PORT:-29500}" \
    --launcher "${LAUNCHER:-pdsh}" --no_local_rank --module agvm_ds.commands.train "$@"
