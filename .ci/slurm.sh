#!/usr/bin/env bash
# A one-node Slurm on localhost for the test suite (tests/test_slurm.py): munged, slurmctld and slurmd started by
# hand (no systemd in the CI container), every job running as root on this machine.
#
#   .ci/slurm.sh [start]   install slurm-wlm + munge if missing, configure, start, wait until the node is idle
#   .ci/slurm.sh stop      stop the daemons this script started
#   .ci/slurm.sh status    exit 0 when the controller answers and the node is up
#
# Idempotent: a second `start` with everything up returns at once. On failure it prints one line starting with
# "slurm.sh: cannot start Slurm:" and exits nonzero; callers (.ci/run) go on and the Slurm tests skip.
#
# What works in a container without systemd or a writable cgroup tree (found by trying):
# - proctrack/linuxproc + task/none + jobacct_gather/none: nothing touches cgroups. With proctrack/cgroup the
#   daemons start but every job step dies ("cgroup namespace 'freezer' not mounted") while the job reads COMPLETED.
#   Signals (scancel --signal, the --signal=B:SIG@N warning, KillWait's SIGTERM) still reach the job's processes.
# - The node's CPUs and RealMemory come from `slurmd -C` (what slurmd itself will measure), so the node never drains
#   for "Low RealMemory" or a CPU mismatch on a machine of another size.
# - NodeAddr/SlurmctldHost address 127.0.0.1: the container's hostname need not resolve.
# - munged runs as the munge user: the package's key and log belong to it, and munged run as root refuses them as
#   insecure. The key is created if absent.
set -uo pipefail

STATE=${SLURM_CI_STATE:-/var/spool/slurm-ci}
CONF=/etc/slurm/slurm.conf
MARK="# written by diffcompress .ci/slurm.sh"

die() {
    echo "slurm.sh: cannot start Slurm: $*" >&2
    exit 1
}

node_idle() {  # the controller answers and our node is idle or running jobs (a rerun while tests run is fine)
    local state
    state=$(timeout 10 sinfo -h -N -o '%t' 2>/dev/null | head -n1) || return 1
    [[ $state =~ ^(idle|mix|alloc|comp)$ ]]
}

install_packages() {
    command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v munged >/dev/null && return 0
    [[ $(id -u) == 0 ]] || die "slurm-wlm/munge are not installed and installing them needs root"
    command -v apt-get >/dev/null || die "slurm-wlm/munge are not installed and there is no apt-get"
    local log=/tmp/slurm-ci-apt.log
    # policy-rc.d-less containers would try to start the services; they are started below instead.
    if ! { DEBIAN_FRONTEND=noninteractive apt-get -y -qq --no-install-recommends install slurm-wlm munge ||
        { apt-get -qq update && DEBIAN_FRONTEND=noninteractive apt-get -y -qq --no-install-recommends \
            install slurm-wlm munge; }; } >"$log" 2>&1; then
        die "apt-get install slurm-wlm munge failed ($(tail -n1 "$log"))"
    fi
}

start_munge() {
    if timeout 5 munge -n </dev/null 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then return 0; fi
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1 ||
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none ||
            die "could not create /etc/munge/munge.key"
    fi
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged >/tmp/slurm-ci-munged.log 2>&1 ||
        die "munged did not start ($(tail -n1 /tmp/slurm-ci-munged.log))"
    for _ in $(seq 50); do
        if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    die "munged started but munge/unmunge does not work"
}

write_conf() {
    if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script (refusing to overwrite a real configuration)"
    fi
    local node hw
    node=$(hostname -s)
    # "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
    hw=$(slurmd -C 2>/dev/null | head -n1 | sed -E 's/^NodeName=[^ ]+ //')
    [[ $hw == *CPUs=* ]] || hw="CPUs=$(nproc) RealMemory=1024"
    mkdir -p "$STATE/ctld" "$STATE/d" /etc/slurm
    cat >"$CONF.new" <<EOF
$MARK: a one-node test cluster
ClusterName=ci
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also delays a requeued job's restart (Slurm sets its BeginTime to now + cred_expire; the default 120 s
# doubled the preemption test's time); 10 s is ample for a job start on localhost.
AuthInfo=cred_expire=10
MailProg=/bin/true
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# No cgroups in a container: see the header of .ci/slurm.sh.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Pending jobs are otherwise only retried every 30-60 s: a requeued job would idle that long once eligible.
SchedulerParameters=sched_interval=2,bf_interval=1
# A requeued job (scontrol requeue from the job's USR1 trap) keeps its id and runs again.
JobRequeue=1
# The job gets SIGTERM, then KillWait seconds to write its checkpoint before SIGKILL.
KillWait=60
# Finished jobs stay visible to 'scontrol show job' this long (the tests poll it).
MinJobAge=300
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=30
ReturnToService=2
NodeName=$node NodeAddr=127.0.0.1 $hw State=UNKNOWN
# FORCE:2: two jobs may share a core, so tests/test_slurm.py runs its three one-CPU jobs at once on 2 cores.
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
EOF
    if cmp -s "$CONF.new" "$CONF"; then
        rm "$CONF.new"
        return 1
    fi
    mv "$CONF.new" "$CONF"
}

running() {  # the daemon named by pid file $1 is alive
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

start() {
    install_packages
    start_munge
    if write_conf; then  # a new or changed configuration: daemons started with an older one must restart
        stop_slurm
    elif node_idle; then
        echo "slurm.sh: Slurm already up ($(sinfo -h -N -o '%N %t' | head -n1))"
        return 0
    fi
    if ! running "$STATE/slurmctld.pid"; then
        # -i: start even when the state saved by an earlier start does not match a changed configuration.
        slurmctld -i >>"$STATE/slurmctld.out" 2>&1 || die "slurmctld exited ($(tail -n1 "$STATE/slurmctld.log" 2>/dev/null))"
    fi
    if ! running "$STATE/slurmd.pid"; then
        slurmd >>"$STATE/slurmd.out" 2>&1 || die "slurmd exited ($(tail -n1 "$STATE/slurmd.log" 2>/dev/null))"
    fi
    for _ in $(seq 60); do
        if node_idle; then
            echo "slurm.sh: Slurm up ($(sinfo -h -N -o '%N %t %c CPUs' | head -n1))"
            return 0
        fi
        state=$(timeout 5 sinfo -h -N -o '%t' 2>/dev/null | head -n1)
        if [[ $state == down* || $state == drain* ]]; then
            scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1
        fi
        sleep 1
    done
    die "the node did not become idle in 60 s (sinfo: $(timeout 5 sinfo -h -N -o '%N %t %E' 2>&1 | head -n1); \
slurmctld: $(tail -n1 "$STATE/slurmctld.log" 2>/dev/null); slurmd: $(tail -n1 "$STATE/slurmd.log" 2>/dev/null))"
}

stop_slurm() {  # $@: extra pid files
    local pidfile pid
    for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$@"; do
        if running "$pidfile"; then
            pid=$(cat "$pidfile")
            kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
}

stop() {
    stop_slurm /run/munge/munged.pid
    echo "slurm.sh: stopped"
}

case ${1:-start} in
start) start ;;
stop) stop ;;
status) node_idle ;;
*)
    echo "usage: $0 [start|stop|status]" >&2
    exit 2
    ;;
esac
