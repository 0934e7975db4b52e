# shellcheck shell=bash
# scripts/cluster/common.sh: everything the batch scripts in scripts/slurm and scripts/pbs share.
#
# ------------------------------------------------------------------------------------------ INTERFACE
# A batch script sets its variables (`${VAR:-default}`, or `${VAR-default}` where empty means "leave the flag
# out", so the environment overrides each), then
#     cd "${REPO_DIR:-${SLURM_SUBMIT_DIR:-.}}"      # PBS: ${PBS_O_WORKDIR}; Slurm/PBS run a spooled copy
#     source scripts/cluster/common.sh
#     cluster_run torchrun train.py --model ... --resume auto "${EXTRA[@]}"
# with the launcher one of
#     torchrun    torchrun --nnodes NNODES --nproc_per_node NPROC_PER_NODE --rdzv_backend c10d
#                 --rdzv_endpoint MASTER_ADDR:MASTER_PORT --rdzv_id JOB_ID ENTRY ARGS
#                 (ENTRY: a script, or -m module; c10d assigns the ranks, so no --node_rank)
#     accelerate  accelerate launch --num_machines NNODES --machine_rank NODE_RANK --main_process_ip
#                 MASTER_ADDR --main_process_port MASTER_PORT --num_processes NNODES*NPROC_PER_NODE
#                 [--multi_gpu when more than one process] ENTRY ARGS
#     python      PYTHON ENTRY ARGS (one process on one node; the evaluator)
#
# Environment read (all optional; the scheduler's own variables are read as they are set by it):
#   REPO_DIR          the repository (default: the submission folder); the job runs there
#   PYTHON            interpreter (default: REPO_DIR/.venv/bin/python if present, else python3)
#   DEVICE            cpu: hide the GPUs (CUDA_VISIBLE_DEVICES=""), so torchrun/accelerate use gloo
#   NPROC_PER_NODE    processes per node (default: GPUS_PER_NODE, SLURM_GPUS_ON_NODE, NGPUS, the count of
#                     CUDA_VISIBLE_DEVICES or `nvidia-smi -L`; 1 with DEVICE=cpu or no GPU)
#   MASTER_ADDR       rendezvous host (default: the job's first node)
#   MASTER_PORT       rendezvous port (default: 20000 + cksum(JOB_ID) % 20000: every node computes the same)
#   LOG_ROOT          parent of the per-job log folder (default: logs)
#   EXTRA_ARGS        whitespace-separated arguments appended to the entry point's (see cluster_extra_args)
#   REQUEUE_CMD       how to requeue (default Slurm: scontrol requeue $SLURM_JOB_ID; PBS: qrerun $PBS_JOBID)
#   REQUEUE_SIGNALS   signals that mean "checkpoint, then requeue" (default Slurm: USR1, PBS: TERM USR1);
#                     the other trapped one (Slurm: TERM, from scancel or the time limit) checkpoints only
#   PBS_REMOTE        PBS only, how to start node k>0: a command prefix with {host} and {index} (default
#                     "pbsdsh -n {index} --": PBS's own task manager, no ssh); e.g. "ssh {host}"
#   CLUSTER_HOSTNAME  this node's name when matching PBS_NODEFILE (default: hostname; tests set it)
#   DRY_RUN=1         write LOG_DIR/settings.env and print the node commands instead of running them
#
# Variables set when sourced (the rendezvous, also written to the log folder):
#   SCHEDULER (slurm | pbs | local), JOB_ID, JOB_NAME, HOSTS (array), NNODES, NODE_RANK, MASTER_ADDR,
#   MASTER_PORT, NPROC_PER_NODE, ARRAY_INDEX (Slurm SLURM_ARRAY_TASK_ID, PBS Pro PBS_ARRAY_INDEX, Torque
#   PBS_ARRAYID; empty outside arrays), RESTART_COUNT (SLURM_RESTART_COUNT, else the runs recorded in
#   LOG_DIR), LOG_DIR = LOG_ROOT/JOB_NAME-JOB_ID (JOB_ID with [ ] / replaced by _).
#   Slurm: JOB_ID = SLURM_JOB_ID (array tasks: SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID), hosts from
#   `scontrol show hostnames $SLURM_JOB_NODELIST`, NNODES = SLURM_JOB_NUM_NODES, NODE_RANK = SLURM_NODEID.
#   PBS: JOB_ID = PBS_JOBID, hosts = the unique lines of PBS_NODEFILE in order (the first is the master),
#   NODE_RANK = this host's position among them.
#
# Outputs of cluster_run, in LOG_DIR:
#   settings.env   the resolved settings and the command (sourced by node.sh on every node)
#   launch.log     one line per run: start, signals, requeue, exit status (also on the job's stdout)
#   node<k>.log    the launcher's output on node k (node 0's also goes to the job's stdout); appended
#                  across requeued runs; with c10d the node holding global rank 0 (the one that prints)
#                  is whichever joined first, not always node 0
# The training outputs go where the entry point's own flags say (RESULTS_DIR in the stage scripts).
#
# Multi-node: Slurm starts one node.sh per node with `srun --nodes N --ntasks N --ntasks-per-node 1`; PBS
# starts node.sh itself on the first host and with PBS_REMOTE on the others; one node runs it directly.
#
# Preemption and requeue: the batch shell traps SIGUSR1 and SIGTERM (Slurm: `#SBATCH --signal=B:USR1@T`
# delivers SIGUSR1 to the batch shell T seconds before the end; PBS sends SIGTERM before SIGKILL, after its
# kill_delay) and sends SIGUSR1 to node.sh (or to srun, which forwards it to every node's node.sh).
# node.sh sends SIGUSR1 to the workers (the launcher's children; the launcher itself runs through
# shielded_launch.py, which ignores the signal). The training loops checkpoint on SIGUSR1 at the end of
# the current step and exit 0 (their stop flag is all-reduced, so the ranks of every node stop at the same
# step). When all launchers have exited the batch shell runs REQUEUE_CMD (if the signal is in
# REQUEUE_SIGNALS) and exits 0. Stages without checkpoints (features, sampling, filtering, generation,
# evaluation) die on the signal and redo only their missing outputs when requeued.
# Resume needs no detection: the stage scripts always pass the resume flag (TinyFusion `--resume auto`,
# APTP `logging.resume_from_checkpoint=latest`), which starts from scratch when there is no checkpoint.
# A requeued Slurm job keeps its id, so it logs to the same folder; RESTART_COUNT tells the runs apart.
# On PBS with several nodes only the first node's workers are signalled; the all-reduced flag stops the rest.
#
# Exit status of the batch shell: the launchers' (the first non-zero), or 0 after a preemption signal.
# What a harness can check in LOG_DIR/launch.log:
#   "run start (job ID, SCHEDULER, restart N)"  one per run (N = SLURM_RESTART_COUNT or earlier runs here)
#   "received SIGUSR1" / "received SIGTERM"      the signal reached the batch shell
#   "requeueing: <REQUEUE_CMD>"                 the requeue command ran ("not requeued" when not wanted)
#   "run end: status S"                         a run that was not preempted ended
# A CPU-only Slurm (no GRES): DEVICE=cpu NPROC_PER_NODE=2 sbatch --gpus-per-node=0 --cpus-per-task=2 SCRIPT;
# command-line options override the #SBATCH lines, and sbatch passes the environment (--export=ALL).
# -----------------------------------------------------------------------------------------------------

CLUSTER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

cluster_log() {
    local line
    line="[$(date '+%F %T')] [cluster] $*"
    echo "$line"
    if [[ -n "${LOG_DIR:-}" && -d "$LOG_DIR" ]]; then echo "$line" >>"$LOG_DIR/launch.log"; fi
}

cluster_die() {
    echo "error: $*" >&2
    exit 2
}

# This node's hosts list position; the names in PBS_NODEFILE may be short or fully qualified.
_cluster_host_index() {
    local me="${CLUSTER_HOSTNAME:-$(hostname)}" i
    for i in "${!HOSTS[@]}"; do
        if [[ "${HOSTS[$i]}" == "$me" || "${HOSTS[$i]%%.*}" == "${me%%.*}" ]]; then
            echo "$i"
            return 0
        fi
    done
    return 1
}

_cluster_count_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
        local ids
        IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU'
    else
        echo 0
    fi
}

cluster_detect() {
    HOSTS=()
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        SCHEDULER=slurm
        if [[ -n "${SLURM_ARRAY_JOB_ID:-}" ]]; then
            JOB_ID="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
        else
            JOB_ID="$SLURM_JOB_ID"
        fi
        JOB_NAME="${SLURM_JOB_NAME:-job}"
        ARRAY_INDEX="${SLURM_ARRAY_TASK_ID:-}"
        local nodelist="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
        if [[ -n "$nodelist" ]]; then
            if command -v scontrol >/dev/null 2>&1; then
                mapfile -t HOSTS < <(scontrol show hostnames "$nodelist")
            elif [[ "$nodelist" != *"["* ]]; then
                IFS=, read -r -a HOSTS <<<"$nodelist"
            else
                cluster_die "scontrol is needed to expand SLURM_JOB_NODELIST=$nodelist"
            fi
        fi
        NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-${#HOSTS[@]}}}"
        NODE_RANK="${SLURM_NODEID:-0}"
        RESTART_COUNT="${SLURM_RESTART_COUNT:-}"
        _default_requeue="scontrol requeue $SLURM_JOB_ID"
        _default_requeue_signals="USR1"
    elif [[ -n "${PBS_JOBID:-}" ]]; then
        SCHEDULER=pbs
        JOB_ID="$PBS_JOBID"
        JOB_NAME="${PBS_JOBNAME:-job}"
        ARRAY_INDEX="${PBS_ARRAY_INDEX:-${PBS_ARRAYID:-}}"
        if [[ -n "${PBS_NODEFILE:-}" ]]; then
            [[ -r "$PBS_NODEFILE" ]] || cluster_die "PBS_NODEFILE=$PBS_NODEFILE cannot be read"
            # one line per CPU or chunk: keep the first occurrence of each host, in order
            mapfile -t HOSTS < <(awk 'NF && !seen[$1]++ {print $1}' "$PBS_NODEFILE")
        fi
        NNODES="${#HOSTS[@]}"
        NODE_RANK="$(_cluster_host_index)" || NODE_RANK=0 # the batch shell runs on the first host
        RESTART_COUNT=""
        _default_requeue="qrerun $PBS_JOBID"
        _default_requeue_signals="TERM USR1"
    else
        SCHEDULER=local
        JOB_ID="${JOB_ID:-local-$$}"
        JOB_NAME="${JOB_NAME:-$(basename "${0%.*}")}" # the batch script's name
        ARRAY_INDEX="${ARRAY_INDEX:-}"
        RESTART_COUNT=""
        _default_requeue=""
        _default_requeue_signals="TERM USR1"
    fi
    ((${#HOSTS[@]})) || HOSTS=("${CLUSTER_HOSTNAME:-$(hostname)}")
    NNODES="${NNODES:-1}"
    ((NNODES > 0)) || NNODES=1
    MASTER_ADDR="${MASTER_ADDR:-${HOSTS[0]}}"
    local sum
    sum="$(printf '%s' "$JOB_ID" | cksum | cut -d' ' -f1)"
    MASTER_PORT="${MASTER_PORT:-$((20000 + sum % 20000))}"
    if [[ -z "${NPROC_PER_NODE:-}" ]]; then
        if [[ "${DEVICE:-}" == cpu ]]; then
            NPROC_PER_NODE=1
        else
            NPROC_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${NGPUS:-$(_cluster_count_gpus)}}}"
            NPROC_PER_NODE="${NPROC_PER_NODE%%(*}" # Slurm may write "4(x2)"
            ((NPROC_PER_NODE > 0)) || NPROC_PER_NODE=1
        fi
    fi
    REQUEUE_CMD="${REQUEUE_CMD-$_default_requeue}"
    REQUEUE_SIGNALS="${REQUEUE_SIGNALS:-$_default_requeue_signals}"
    LOG_DIR="${LOG_ROOT:-logs}/${JOB_NAME}-${JOB_ID//[\[\]\/]/_}"
    if [[ -z "${PYTHON:-}" ]]; then
        if [[ -x .venv/bin/python ]]; then PYTHON="$PWD/.venv/bin/python"; else PYTHON=python3; fi
    fi
    export MASTER_ADDR MASTER_PORT NNODES NODE_RANK NPROC_PER_NODE JOB_ID PYTHON
}

# EXTRA_ARGS split on whitespace into the array EXTRA (no globbing, no quotes: one word per argument).
cluster_extra_args() {
    # shellcheck disable=SC2034  # EXTRA is for the calling batch script
    read -r -a EXTRA <<<"${EXTRA_ARGS:-}"
}

_cluster_preempt_signal=""
_cluster_pids=()

_cluster_on_signal() {
    local sig="$1" pid
    cluster_log "received SIG$sig: asking the workers to checkpoint and stop"
    # the first requeue signal decides; a later TERM (the scheduler's kill) does not undo the requeue
    if [[ -z "$_cluster_preempt_signal" || " $REQUEUE_SIGNALS " != *" $_cluster_preempt_signal "* ]]; then
        _cluster_preempt_signal="$sig"
    fi
    for pid in "${_cluster_pids[@]}"; do kill -USR1 "$pid" 2>/dev/null || true; done
}

# The command one node runs, as words: the launcher with this job's rendezvous, then the entry point.
# The rank is left as the word @NODE_RANK@, which node.sh replaces by its own.
_cluster_node_command() {
    local launcher="$1"
    shift
    local total=$((NNODES * NPROC_PER_NODE))
    case "$launcher" in
    torchrun)
        NODE_CMD=("$PYTHON" "$CLUSTER_DIR/shielded_launch.py" torchrun --nnodes "$NNODES"
            --nproc_per_node "$NPROC_PER_NODE" --rdzv_backend c10d
            --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$JOB_ID" "$@") ;;
    accelerate)
        NODE_CMD=("$PYTHON" "$CLUSTER_DIR/shielded_launch.py" accelerate --num_machines "$NNODES"
            --machine_rank @NODE_RANK@ --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
            --num_processes "$total" --dynamo_backend no)
        if ((total > 1)); then NODE_CMD+=(--multi_gpu); fi
        NODE_CMD+=("$@") ;;
    python)
        ((NNODES == 1)) || cluster_die "the python launcher runs one process: submit it to one node"
        NPROC_PER_NODE=1
        NODE_CMD=("$PYTHON" "$@") ;;
    *) cluster_die "unknown launcher '$launcher' (torchrun | accelerate | python)" ;;
    esac
}

_cluster_write_settings() {
    mkdir -p "$LOG_DIR"
    {
        echo "# written by scripts/cluster/common.sh for job $JOB_ID ($SCHEDULER) on $(date '+%F %T')"
        local v
        for v in SCHEDULER JOB_ID JOB_NAME NNODES MASTER_ADDR MASTER_PORT NPROC_PER_NODE ARRAY_INDEX \
            RESTART_COUNT REQUEUE_CMD REQUEUE_SIGNALS LOG_DIR PYTHON DEVICE REPO_DIR PATH CUDA_VISIBLE_DEVICES \
            OMP_NUM_THREADS VIRTUAL_ENV HF_HOME HF_HUB_OFFLINE WANDB_MODE; do
            if [[ -n "${!v+x}" ]]; then printf 'export %s=%q\n' "$v" "${!v}"; fi
        done
        printf 'LAUNCHER=%q\n' "$1"
        echo "HOSTS=(${HOSTS[*]@Q})"
        echo "NODE_CMD=(${NODE_CMD[*]@Q})"
    } >"$LOG_DIR/settings.env"
}

# cluster_run LAUNCHER ENTRY [ARGS...]: run the stage on every node of the job; see the header.
cluster_run() {
    local launcher="$1"
    shift
    [[ $# -gt 0 ]] || cluster_die "cluster_run: no entry point given"
    REPO_DIR="${REPO_DIR:-$PWD}"
    if [[ "${DEVICE:-}" == cpu ]]; then export CUDA_VISIBLE_DEVICES=""; fi
    _cluster_node_command "$launcher" "$@"
    RESTART_COUNT="${RESTART_COUNT:-$(grep -c ' run start' "$LOG_DIR/launch.log" 2>/dev/null || true)}"
    RESTART_COUNT="${RESTART_COUNT:-0}"
    _cluster_write_settings "$launcher"
    cluster_log "run start (job $JOB_ID, $SCHEDULER, restart $RESTART_COUNT): $NNODES node(s) x" \
        "$NPROC_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT, logs in $LOG_DIR"
    cluster_log "command: ${NODE_CMD[*]}"
    local node="$CLUSTER_DIR/node.sh" settings="$LOG_DIR/settings.env"
    settings="$(cd "$(dirname "$settings")" && pwd)/settings.env"
    if [[ "${DRY_RUN:-}" == 1 ]]; then
        _cluster_spawn() { echo "DRY_RUN: $*"; }
    else
        _cluster_spawn() {
            "$@" &
            _cluster_pids+=($!)
        }
    fi
    if [[ -n "$_cluster_preempt_signal" ]]; then
        cluster_log "signalled before the launch: not starting"
    elif ((NNODES == 1)); then
        _cluster_spawn bash "$node" "$settings" 0
    elif [[ "$SCHEDULER" == slurm ]]; then
        # one node.sh per node; it reads its rank from SLURM_NODEID. srun forwards SIGUSR1 to all of them.
        # (recent Slurm versions do not pass the job's --cpus-per-task on to srun by themselves)
        _cluster_spawn srun --nodes "$NNODES" --ntasks "$NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1 \
            ${SLURM_CPUS_PER_TASK:+--cpus-per-task "$SLURM_CPUS_PER_TASK"} bash "$node" "$settings"
    elif [[ "$SCHEDULER" == pbs ]]; then
        _cluster_spawn bash "$node" "$settings" 0
        local k idx remote pbsdsh="pbsdsh -n {index} --"
        for ((k = 1; k < NNODES; k++)); do
            # pbsdsh -n takes an index into the job's vnode list (= the lines of PBS_NODEFILE)
            idx="$(awk -v h="${HOSTS[$k]}" '$1 == h {print NR - 1; exit}' "$PBS_NODEFILE")"
            remote="${PBS_REMOTE:-$pbsdsh}"
            remote="${remote//\{host\}/${HOSTS[$k]}}"
            remote="${remote//\{index\}/$idx}"
            # shellcheck disable=SC2086  # the prefix is a command line
            _cluster_spawn $remote /bin/bash "$node" "$settings" "$k"
        done
    else
        cluster_die "NNODES=$NNODES needs Slurm or PBS to start the other nodes"
    fi
    [[ "${DRY_RUN:-}" == 1 ]] && return 0

    local status=0 pid rc
    for pid in "${_cluster_pids[@]}"; do
        # a trapped signal interrupts `wait` (status > 128): wait until the process is gone, then once more
        # for its exit status, which bash keeps
        while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
        wait "$pid"
        rc=$?
        ((rc == 0)) || status=$rc
    done
    if [[ -n "$_cluster_preempt_signal" ]]; then
        if [[ " $REQUEUE_SIGNALS " == *" $_cluster_preempt_signal "* && -n "$REQUEUE_CMD" ]]; then
            cluster_log "workers stopped (status $status); requeueing: $REQUEUE_CMD"
            bash -c "$REQUEUE_CMD" || cluster_log "requeue command failed (status $?): resubmit this job"
        else
            cluster_log "workers stopped (status $status) after SIG$_cluster_preempt_signal; not requeued"
        fi
        exit 0
    fi
    cluster_log "run end: status $status"
    exit "$status"
}

cluster_detect
# Trap from the start: a signal during setup is remembered and prevents the launch.
trap '_cluster_on_signal USR1' USR1
trap '_cluster_on_signal TERM' TERM
