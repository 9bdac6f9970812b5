#!/usr/bin/env bash
# One Slurm task = one rank. srun runs this once per task; it exports RANK=SLURM_PROCID,
# LOCAL_RANK=SLURM_LOCALID, WORLD_SIZE=SLURM_NTASKS, LOCAL_WORLD_SIZE, MASTER_ADDR (kept if the
# batch script exported it, else the first host of SLURM_JOB_NODELIST) and MASTER_PORT, then execs
# its arguments. deepspeed.init_distributed reads only those variables, never SLURM_*.
# Each task must see all GPUs of its node (no per-task GPU binding): LOCAL_RANK picks the device.
#
# Usage: srun ... bash launch/slurm_task.sh python -u -m agvm_ds.engine.cli --config ...
#        DRY_RUN=1 prints the mapping and the command instead of running it.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

agvm_slurm_map_env
if agvm_is_true "${DRY_RUN:-0}"; then
    agvm_print_slurm_mapping
    echo "command: $(agvm_quote "$@")"
    exit 0
fi
(($#)) || agvm_die "no command given"
exec "$@"
