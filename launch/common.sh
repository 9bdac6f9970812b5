# shellcheck shell=bash disable=SC2034  # the AGVM_* variables set here are read by the scripts
# Shared by launch/local.sh, launch/multinode.sh, launch/slurm_task.sh and the sbatch script.
# Source it; it defines functions and variables only and runs nothing.
#
# Arguments every launch script accepts (agvm_parse_args):
#   --config PATH          experiment config (configs/*.yaml)
#   --resume auto|PATH     forwarded to the trainer
#   --dry-run              print the resolved command and world size, launch nothing (or DRY_RUN=1)
#   key.sub=value ...      config overrides, forwarded in order (e.g. deepspeed=ds_configs/zero2_bf16.json)
#   -- ARGS...             everything after -- goes to the trainer verbatim (e.g. -- --dry-run)
# A script adds its own options by defining agvm_script_option (see below) before calling agvm_parse_args.
#
# Environment: DEEPSPEED (launcher binary, default deepspeed), PYTHON (default python),
# AGVM_ENTRY_MODULE (default agvm_ds.engine.cli).

AGVM_LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
AGVM_ROOT="$(dirname "$AGVM_LAUNCH_DIR")"
AGVM_ENTRY_MODULE="${AGVM_ENTRY_MODULE:-agvm_ds.engine.cli}"
# The repo on PYTHONPATH, so `-m agvm_ds.engine.cli` works without `pip install -e .`.
# The deepspeed launcher forwards PYTHON* variables to remote nodes.
export PYTHONPATH="$AGVM_ROOT${PYTHONPATH:+:$PYTHONPATH}"

agvm_die() {
    echo "error: $*" >&2
    exit 2
}

agvm_is_true() {
    case "${1,,}" in
        1 | true | yes | on) return 0 ;;
        *) return 1 ;;
    esac
}

agvm_require_positive_int() {  # NAME VALUE
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || agvm_die "$1 must be a positive integer, got '$2'"
}

# Value of an option given as `--opt VALUE` or `--opt=VALUE`. Sets AGVM_VALUE and AGVM_CONSUMED (1 or 2).
agvm_option_value() {
    if [[ "$1" == *=* ]]; then
        AGVM_VALUE="${1#*=}"
        AGVM_CONSUMED=1
    else
        (($# >= 2)) || agvm_die "option $1 needs a value"
        AGVM_VALUE="$2"
        AGVM_CONSUMED=2
    fi
}

# Option name without its =value, with '_' spelled '-' (so --num_gpus and --num-gpus both work).
agvm_option_name() {
    local name="${1%%=*}"
    printf '%s' "${name//_/-}"
}

# Parses "$@" into AGVM_CONFIG, AGVM_RESUME, AGVM_DRY_RUN, AGVM_OVERRIDES[], AGVM_TRAINER_ARGS[].
# Defaults: AGVM_CONFIG and AGVM_RESUME keep the values set before the call.
# Script options: if the function agvm_script_option exists, it is called with the remaining
# arguments for every unknown --option; it returns 0 and sets AGVM_CONSUMED if it took them.
agvm_parse_args() {
    AGVM_CONFIG="${AGVM_CONFIG:-}"
    AGVM_RESUME="${AGVM_RESUME:-}"
    AGVM_DRY_RUN=0
    if agvm_is_true "${DRY_RUN:-0}"; then AGVM_DRY_RUN=1; fi
    AGVM_OVERRIDES=()
    AGVM_TRAINER_ARGS=()
    while (($#)); do
        case "$1" in
            --)
                shift
                AGVM_TRAINER_ARGS+=("$@")
                break
                ;;
            -*) agvm_parse_option "$@" ;;
            *=*) AGVM_OVERRIDES+=("$1") && AGVM_CONSUMED=1 ;;
            *) agvm_die "unexpected argument '$1': overrides are key.sub=value, trainer flags go after --" ;;
        esac
        shift "$AGVM_CONSUMED"
    done
}

agvm_parse_option() {
    case "$(agvm_option_name "$1")" in
        --config) agvm_option_value "$@" && AGVM_CONFIG="$AGVM_VALUE" ;;
        --resume) agvm_option_value "$@" && AGVM_RESUME="$AGVM_VALUE" ;;
        --dry-run)
            [[ "$1" != *=* ]] || agvm_die "--dry-run takes no value (or set DRY_RUN=1)"
            AGVM_DRY_RUN=1
            AGVM_CONSUMED=1
            ;;
        -h | --help)
            agvm_usage
            exit 0
            ;;
        *)
            if ! { declare -F agvm_script_option >/dev/null && agvm_script_option "$@"; }; then
                agvm_die "unknown option '$1' (see --help; trainer flags go after --)"
            fi
            ;;
    esac
}

# Prints the script's header comment (the lines after the shebang that start with '#') as usage.
agvm_usage() {
    sed -n '2,/^\([^#]\|$\)/{/^#SBATCH/d;/^#/s/^# \{0,1\}//p}' "${AGVM_SCRIPT:-$0}"
}

# Fails with a message naming what is missing: the config, a deepspeed=... JSON, a --resume path.
agvm_validate_args() {
    [[ -n "$AGVM_CONFIG" ]] || agvm_die "no experiment config given (--config configs/NAME.yaml)"
    [[ -f "$AGVM_CONFIG" ]] || agvm_die "config file not found: $AGVM_CONFIG (cwd: $PWD)"
    local override
    for override in "${AGVM_OVERRIDES[@]}"; do
        if [[ "$override" == deepspeed=* && ! -f "${override#deepspeed=}" ]]; then
            agvm_die "DeepSpeed config not found: ${override#deepspeed=} (from override '$override')"
        fi
    done
    if [[ -n "$AGVM_RESUME" && "$AGVM_RESUME" != auto && ! -e "$AGVM_RESUME" ]]; then
        agvm_die "--resume path not found: $AGVM_RESUME (use --resume auto to pick up the latest checkpoint)"
    fi
}

# The trainer's arguments, in the order of its contract:
#   --config CONFIG [--resume R] [flags after --] [key=value ...]
agvm_trainer_args() {
    AGVM_ARGS=(--config "$AGVM_CONFIG")
    if [[ -n "$AGVM_RESUME" ]]; then AGVM_ARGS+=(--resume "$AGVM_RESUME"); fi
    AGVM_ARGS+=("${AGVM_TRAINER_ARGS[@]}" "${AGVM_OVERRIDES[@]}")
}

# One line, shell-quoted, so it can be copied and run.
agvm_quote() {
    local out="" arg
    for arg in "$@"; do
        out+="$(printf '%q' "$arg") "
    done
    printf '%s' "${out% }"
}

# Dry-run report. Usage: agvm_print_plan LAUNCHER WORLD_SIZE LAYOUT -- COMMAND...
agvm_print_plan() {
    local launcher="$1" world_size="$2" layout="$3"
    shift 4
    echo "launcher: $launcher"
    echo "command: $(agvm_quote "$@")"
    echo "world_size: $world_size ($layout)"
}

# ---------------------------------------------------------------------------------------------
# Hostfiles (MPI style, as the deepspeed launcher reads them: "host slots=N", '#' comments).
# ---------------------------------------------------------------------------------------------

# Parses HOSTFILE into AGVM_HOSTS[] and AGVM_SLOTS[] with the launcher's rules: a bad line or a
# repeated host is an error. Then applies --num_nodes (first N hosts) and --num_gpus (N slots on
# every host, as deepspeed's apply_num_nodes_and_gpus does; 0 or empty means unset).
agvm_read_hostfile() {  # HOSTFILE [NUM_NODES] [NUM_GPUS]
    local hostfile="$1" num_nodes="${2:-0}" num_gpus="${3:-0}" line host seen
    [[ -f "$hostfile" ]] || agvm_die "hostfile not found: $hostfile"
    AGVM_HOSTS=()
    AGVM_SLOTS=()
    while IFS= read -r line || [[ -n "$line" ]]; do
        line="${line#"${line%%[![:space:]]*}"}"
        [[ -z "$line" || "$line" == \#* ]] && continue
        [[ "$line" =~ ^([^[:space:]]+)[[:space:]]+slots=([0-9]+) ]] \
            || agvm_die "bad hostfile line in $hostfile: '$line' (expected 'HOST slots=N')"
        host="${BASH_REMATCH[1]}"
        for seen in "${AGVM_HOSTS[@]}"; do
            [[ "$seen" != "$host" ]] || agvm_die "host $host is listed twice in $hostfile"
        done
        AGVM_HOSTS+=("$host")
        AGVM_SLOTS+=("${BASH_REMATCH[2]}")
    done <"$hostfile"
    ((${#AGVM_HOSTS[@]})) || agvm_die "hostfile $hostfile lists no hosts"
    if ((num_nodes > 0)); then
        ((num_nodes <= ${#AGVM_HOSTS[@]})) \
            || agvm_die "--num_nodes $num_nodes but $hostfile lists only ${#AGVM_HOSTS[@]} hosts"
        AGVM_HOSTS=("${AGVM_HOSTS[@]:0:num_nodes}")
        AGVM_SLOTS=("${AGVM_SLOTS[@]:0:num_nodes}")
    fi
    if ((num_gpus > 0)); then
        local i
        for i in "${!AGVM_SLOTS[@]}"; do AGVM_SLOTS[i]="$num_gpus"; done
    fi
}

# ---------------------------------------------------------------------------------------------
# Slurm: compact node lists and the SLURM_* -> torch.distributed mapping.
# deepspeed.init_distributed never reads SLURM_*; each task needs RANK, LOCAL_RANK, WORLD_SIZE,
# MASTER_ADDR and MASTER_PORT in its environment.
# ---------------------------------------------------------------------------------------------

# Expands a Slurm node list ("gpu[01-03,07],cpu5") to one host per line: `scontrol show hostnames`
# when it exists (set AGVM_NO_SCONTROL=1 to skip it), else agvm_expand_nodelist_fallback.
agvm_expand_nodelist() {
    if ! agvm_is_true "${AGVM_NO_SCONTROL:-0}" && command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$1"
    else
        agvm_expand_nodelist_fallback "$1"
    fi
}

# Pure bash: top-level commas separate hosts; each [..] holds comma-separated numbers or ranges,
# zero padding kept from the range start (gpu[08-10] -> gpu08 gpu09 gpu10); several bracket
# groups in one name (r[1-2]n[1-2]) expand as a product. No step syntax (1-9:2).
agvm_expand_nodelist_fallback() {
    local list="$1" depth=0 part="" char i
    for ((i = 0; i < ${#list}; i++)); do
        char="${list:i:1}"
        case "$char" in
            "[") depth=$((depth + 1)) ;;
            "]") depth=$((depth - 1)) ;;
        esac
        if [[ "$char" == "," && $depth -eq 0 ]]; then
            [[ -n "$part" ]] && _agvm_expand_host "$part"
            part=""
        else
            part+="$char"
        fi
    done
    ((depth == 0)) || agvm_die "unbalanced brackets in node list '$list'"
    [[ -n "$part" ]] && _agvm_expand_host "$part"
    return 0
}

_agvm_expand_host() {
    local host="$1"
    if [[ "$host" != *"["* ]]; then
        printf '%s\n' "$host"
        return 0
    fi
    local prefix="${host%%\[*}" rest="${host#*\[}"
    local inner="${rest%%\]*}" suffix="${rest#*\]}" item start end width n
    local -a items
    IFS=, read -r -a items <<<"$inner"
    for item in "${items[@]}"; do
        if [[ "$item" =~ ^([0-9]+)-([0-9]+)$ ]]; then
            start="${BASH_REMATCH[1]}"
            end="${BASH_REMATCH[2]}"
            width=${#start}
            ((10#$start <= 10#$end)) || agvm_die "bad range '$item' in node list"
            for ((n = 10#$start; n <= 10#$end; n++)); do
                _agvm_expand_host "$prefix$(printf '%0*d' "$width" "$n")$suffix"
            done
        elif [[ "$item" =~ ^[0-9]+$ ]]; then
            _agvm_expand_host "$prefix$item$suffix"
        else
            agvm_die "bad item '$item' in node list '$host'"
        fi
    done
}

# The first host of the allocation: every rank must agree on it, so it is the rendezvous.
agvm_first_host() {
    local hosts
    hosts="$(agvm_expand_nodelist "$1")"
    printf '%s\n' "${hosts%%$'\n'*}"
}

# A per-job port, so two jobs sharing a node do not collide; MASTER_PORT wins if set.
agvm_slurm_master_port() {
    if [[ -n "${MASTER_PORT:-}" ]]; then
        printf '%s\n' "$MASTER_PORT"
    elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
        printf '%s\n' "$((20000 + SLURM_JOB_ID % 20000))"
    else
        printf '%s\n' 29500
    fi
}

# Exports RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT for this task.
# MASTER_ADDR/MASTER_PORT are kept when already set (the batch script computes them once, so 256
# tasks do not each call scontrol); otherwise the first host of SLURM_JOB_NODELIST.
agvm_slurm_map_env() {
    local var
    for var in SLURM_PROCID SLURM_LOCALID SLURM_NTASKS SLURM_JOB_NODELIST; do
        [[ -n "${!var:-}" ]] || agvm_die "$var is not set: not inside a Slurm task (fake it for a dry run)"
    done
    export RANK="$SLURM_PROCID"
    export LOCAL_RANK="$SLURM_LOCALID"
    export WORLD_SIZE="$SLURM_NTASKS"
    if [[ -n "${SLURM_NNODES:-}" ]] && ((SLURM_NTASKS % SLURM_NNODES == 0)); then
        export LOCAL_WORLD_SIZE=$((SLURM_NTASKS / SLURM_NNODES))
    fi
    MASTER_ADDR="${MASTER_ADDR:-$(agvm_first_host "$SLURM_JOB_NODELIST")}"
    MASTER_PORT="$(agvm_slurm_master_port)"
    export MASTER_ADDR MASTER_PORT
}

agvm_print_slurm_mapping() {
    echo "RANK=$RANK LOCAL_RANK=$LOCAL_RANK WORLD_SIZE=$WORLD_SIZE MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
}
