#!/usr/bin/env bash
# One node's part of a job started by cluster_run (scripts/cluster/common.sh):
#     bash scripts/cluster/node.sh LOG_DIR/settings.env [NODE_RANK]
# Sources the settings, fills this node's rank into the launcher command (argument, else SLURM_NODEID
# inside srun, else 0), runs it with its output appended to LOG_DIR/node<rank>.log and echoed, and on
# SIGUSR1 or SIGTERM sends SIGUSR1 to the workers so that they checkpoint and exit. Exits with the
# launcher's status.
set -u
# a signal that arrives before the launcher runs is remembered and forwarded once its workers exist
pending=""
trap 'pending=USR1' USR1
trap 'pending=TERM' TERM
settings="${1:?usage: node.sh SETTINGS_FILE [NODE_RANK]}"
# shellcheck source=/dev/null
source "$settings"
NODE_RANK="${2:-${SLURM_NODEID:-0}}"
export NODE_RANK
cd "${REPO_DIR:-.}" || exit 2

cmd=()
for word in "${NODE_CMD[@]}"; do
    if [[ "$word" == @NODE_RANK@ ]]; then cmd+=("$NODE_RANK"); else cmd+=("$word"); fi
done
log="$LOG_DIR/node${NODE_RANK}.log"
echo "[$(date '+%F %T')] [node $NODE_RANK on $(hostname)] ${cmd[*]}" >>"$log"

# tee must not die from a signal sent to the whole job (the launcher would then lose its output pipe);
# the launcher starts with the default dispositions (bash resets trapped signals in children), which
# shielded_launch.py replaces at once
"${cmd[@]}" > >(trap '' USR1 TERM INT HUP && exec tee -a "$log") 2>&1 &
pid=$!

# shellcheck disable=SC2317  # called by the traps
forward() {
    echo "[$(date '+%F %T')] [node $NODE_RANK] SIG$1: SIGUSR1 to the workers" >>"$log"
    if [[ "$LAUNCHER" == python ]]; then
        kill -USR1 "$pid" 2>/dev/null
    else
        # the workers are the launcher's children (torchrun and accelerate start them directly)
        pkill -USR1 -P "$pid" 2>/dev/null
    fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
if [[ -n "$pending" ]]; then
    if [[ "$LAUNCHER" != python ]]; then
        until pgrep -P "$pid" >/dev/null || ! kill -0 "$pid" 2>/dev/null; do sleep 1; done
    fi
    forward "$pending"
fi

while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
wait "$pid"
rc=$?
echo "[$(date '+%F %T')] [node $NODE_RANK] launcher exited with status $rc" >>"$log"
exit "$rc"
