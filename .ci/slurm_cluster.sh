#!/usr/bin/env bash
# A real one-node SLURM cluster (Debian's slurm-wlm + munge) for the tests and CI, everything in one folder.
#
#   .ci/slurm_cluster.sh install      apt-get install slurm-wlm munge unless sbatch and slurmctld are there (root)
#   .ci/slurm_cluster.sh start DIR    install if needed, write key + slurm.conf under DIR, start munged, slurmctld,
#                                     slurmd; return once `sinfo` shows the node idle
#   .ci/slurm_cluster.sh stop DIR     kill the cluster's running jobs (their slurmstepd and process groups), stop
#                                     exactly the daemons `start DIR` started (their pid files under DIR, checked
#                                     against their command lines) and wait for them to exit (about 2 s)
#   .ci/slurm_cluster.sh env DIR      print the `export ...` lines a client needs (eval "$(... env DIR)")
#
# Nothing in /etc is changed: the munge key, munged's socket/pid/log/seed, slurm.conf (with AuthInfo=socket=...
# pointing the clients and daemons at that munged), the state and spool folders, pid files and logs all live
# under DIR; clients find the cluster through SLURM_CONF=DIR/slurm.conf. Both commands are idempotent: `start`
# on a running cluster only waits for it, `stop` on a stopped one does nothing. The daemons run as root (SlurmUser
# and SlurmdUser root; munged as user munge when it exists), so `start` needs root.
#
# DIR and every folder above it must be searchable by all (munged refuses a socket in a folder that other users
# cannot reach: pytest's own tmp folders, mode 700, do not work; a folder made by mktemp -d under /tmp does).
# SlurmctldPort and SlurmdPort are free ports picked at the first start (kept in slurm.conf), so two clusters on
# one machine (two pytest-xdist workers) do not clash. SLURM_CLUSTER_TIMEOUT (seconds, default 60) bounds the wait
# for the node to come up idle. Tuned for tests (read at the first start of DIR): AuthInfo cred_expire=5 (its
# minimum; SLURM_CLUSTER_CRED_EXPIRE), so a requeued job may start again 6 s after the requeue instead of 121 s;
# SchedulerParameters sched_interval=1,bf_interval=1 (SLURM_CLUSTER_SCHED_PARAMS), so it then starts within a
# second; KillWait=10 (SLURM_CLUSTER_KILL_WAIT); MinJobAge=3600, so scontrol shows finished jobs for an hour.
set -euo pipefail

die() {
    echo "slurm_cluster.sh: $*" >&2
    exit 1
}

usage() {
    echo "usage: $0 install | start DIR | stop DIR | env DIR" >&2
    exit 2
}

have_slurm() {
    command -v sbatch >/dev/null 2>&1 && command -v slurmctld >/dev/null 2>&1 &&
        command -v slurmd >/dev/null 2>&1 && command -v munged >/dev/null 2>&1
}

cmd_install() {
    if have_slurm; then
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "SLURM is not installed and installing it needs root (apt-get install slurm-wlm munge)"
    command -v apt-get >/dev/null 2>&1 || die "SLURM is not installed and there is no apt-get to install slurm-wlm munge"
    local log
    log=$(mktemp)
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >"$log" 2>&1; then
        # a stale package index (fresh container): update once and try again
        if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } >>"$log" 2>&1; then
            tail -n 20 "$log" >&2
            rm -f "$log"
            die "apt-get install slurm-wlm munge failed (output above)"
        fi
    fi
    rm -f "$log"
    have_slurm || die "apt-get installed slurm-wlm munge but sbatch/slurmctld/slurmd/munged are still not on PATH"
}

# The pid in PIDFILE if that process is alive and is the daemon NAME started for this DIR (its command line names
# DIR), else nothing: a stale pid file, or a pid reused by another process, is never taken for our daemon.
our_pid() { # NAME PIDFILE
    local name=$1 pidfile=$2 pid cmdline
    [ -s "$pidfile" ] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    case "$cmdline" in
    *"$name"*"$DIR/"*) echo "$pid" ;;
    *) return 1 ;;
    esac
}

alive() { # PID: running (a zombie, exited but not yet reaped by its parent, is not)
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    case "$state" in
    Z*) return 1 ;;
    esac
    [ -n "$state" ]
}

set_paths() {
    [ -n "${1:-}" ] || usage
    DIR=$(cd "$1" 2>/dev/null && pwd -P) || die "no such folder: $1"
    CONF=$DIR/slurm.conf
    MUNGE=$DIR/munge
    SOCKET=$MUNGE/munge.socket
    LOGS=$DIR/log
    RUN=$DIR/run
}

client_env() {
    export SLURM_CONF=$CONF
}

free_ports() { # two distinct free TCP ports, one a line
    python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(('', 0))
print('\n'.join(str(s.getsockname()[1]) for s in socks))
EOF
}

check_searchable() { # munged wants every folder above its socket searchable by all
    local d=$MUNGE
    while [ "$d" != / ]; do
        d=$(dirname "$d")
        if [ "$(($(stat -c '%a' "$d" | sed 's/^/0/') & 1))" -eq 0 ]; then
            die "$d is not searchable by all (mode $(stat -c '%a' "$d")); munged needs that for its socket under $DIR: use a folder such as \$(mktemp -d) under /tmp"
        fi
    done
}

write_config() {
    mkdir -p "$MUNGE" "$LOGS" "$RUN" "$DIR/state" "$DIR/spool"
    chmod 755 "$DIR"
    local munge_user=root
    if id -u munge >/dev/null 2>&1; then
        munge_user=munge
    fi
    if [ ! -s "$MUNGE/munge.key" ]; then
        head -c 1024 /dev/urandom >"$MUNGE/munge.key.tmp"
        mv "$MUNGE/munge.key.tmp" "$MUNGE/munge.key"
    fi
    chown -R "$munge_user:" "$MUNGE"
    chmod 755 "$MUNGE" # munged's socket must be reachable by all; the key stays 400
    chmod 400 "$MUNGE/munge.key"
    check_searchable
    [ -s "$CONF" ] && return 0 # an earlier start: same ports, same state

    local host node ports ctld_port slurmd_port
    host=$(hostname -s)
    # slurmd -C: this machine's CPUs, sockets, cores, threads and memory, as slurmd will report them
    node=$(slurmd -C | sed -n 's/^NodeName=[^ ]* //p' | head -n 1)
    [ -n "$node" ] || die "slurmd -C printed no node line"
    ports=$(free_ports) || die "could not pick free ports (python3 missing?)"
    ctld_port=$(echo "$ports" | sed -n 1p)
    slurmd_port=$(echo "$ports" | sed -n 2p)
    cat >"$DIR/plugstack.conf" <<EOF
EOF
    cat >"$CONF.tmp" <<EOF
# A one-node test cluster written by .ci/slurm_cluster.sh; everything it uses lives in $DIR.
ClusterName=nnunetext
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$SOCKET,cred_expire=${SLURM_CLUSTER_CRED_EXPIRE:-5}
MpiDefault=none
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
# the main scheduler every second, backfill every second (defaults 60 s and 30 s): a job whose begin time has
# passed (a requeued one) or whose dependency was met starts within about a second, not at the next 30 s pass
SchedulerParameters=${SLURM_CLUSTER_SCHED_PARAMS:-sched_interval=1,bf_interval=1}
PlugStackConfig=$DIR/plugstack.conf
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ReturnToService=2
# finished jobs stay visible to scontrol show job / squeue -t all for an hour (no accounting: no sacct)
MinJobAge=3600
# seconds between SIGTERM and SIGKILL at a time limit or scancel
KillWait=${SLURM_CLUSTER_KILL_WAIT:-10}
NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host $node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE OverSubscribe=FORCE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

tail_logs() {
    local f
    for f in "$LOGS/slurmctld.log" "$LOGS/slurmd.log" "$MUNGE/munged.log"; do
        if [ -s "$f" ]; then
            echo "--- last lines of $f" >&2
            tail -n 15 "$f" >&2
        fi
    done
}

start_munged() {
    our_pid munged "$MUNGE/munged.pid" >/dev/null && return 0
    rm -f "$SOCKET" "$SOCKET.lock" "$MUNGE/munged.pid"
    local as=()
    if [ "$(stat -c '%U' "$MUNGE")" != root ]; then
        as=(runuser -u "$(stat -c '%U' "$MUNGE")" --)
    fi
    "${as[@]}" munged --key-file="$MUNGE/munge.key" --socket="$SOCKET" --pid-file="$MUNGE/munged.pid" \
        --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed" ||
        { tail_logs; die "munged did not start (log above)"; }
    local i
    for i in $(seq 50); do
        if munge -n -S "$SOCKET" 2>/dev/null | unmunge -S "$SOCKET" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    tail_logs
    die "munged did not answer on $SOCKET within 5 s"
}

start_daemon() { # NAME
    local name=$1
    our_pid "$name" "$RUN/$name.pid" >/dev/null && return 0
    # the daemons fork into the background once their configuration is read; a bad one fails here
    if ! "$name" -f "$CONF" >>"$LOGS/$name.stderr" 2>&1; then
        cat "$LOGS/$name.stderr" >&2
        tail_logs
        die "$name did not start (output above)"
    fi
}

wait_idle() {
    local timeout=${SLURM_CLUSTER_TIMEOUT:-60} start state=""
    start=$(date +%s)
    while :; do
        state=$(sinfo -h -N -o '%t' 2>/dev/null | head -n 1) || state=""
        case "$state" in
        idle | mix | alloc) return 0 ;; # alloc/mix: a restarted cluster still running jobs
        esac
        if [ $(($(date +%s) - start)) -ge "$timeout" ]; then
            tail_logs
            die "the node did not come up idle within ${timeout} s (sinfo state: '${state:-no answer}'; logs above)"
        fi
        sleep 0.2
    done
}

cmd_start() {
    set_paths "$@"
    [ "$(id -u)" -eq 0 ] || die "starting the test cluster needs root (slurmd runs jobs as their users)"
    cmd_install
    write_config
    client_env
    start_munged
    start_daemon slurmctld
    start_daemon slurmd
    wait_idle
}

# The job steps this cluster's slurmd started: each slurmstepd holding this cluster's slurmd.log open (it logs
# there; a slurmstepd outlives slurmd), its children's process groups (a job's processes: proctrack/pgid) and it,
# killed. The jobs of a test cluster need no grace: scancel and waiting for the jobs to complete would take seconds.
stop_steps() {
    local pid fd child pgid own_pgid
    own_pgid=$(ps -o pgid= -p $$ | tr -d ' ')
    for pid in $(pgrep -x slurmstepd 2>/dev/null); do
        for fd in /proc/"$pid"/fd/*; do
            if [ "$(readlink "$fd" 2>/dev/null)" = "$LOGS/slurmd.log" ]; then
                for child in $(pgrep -P "$pid" 2>/dev/null); do
                    pgid=$(ps -o pgid= -p "$child" 2>/dev/null | tr -d ' ')
                    if [ -n "$pgid" ] && [ "$pgid" != "$own_pgid" ] && [ "$pgid" != 0 ]; then
                        kill -KILL -- "-$pgid" 2>/dev/null || true
                    fi
                done
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
        done
    done
}

# SIGTERM to the daemons that start DIR started (the pids in their pid files, checked by our_pid), all at once;
# wait up to 15 s for them to exit (each takes 1 to 2 s), then SIGKILL what is left.
cmd_stop() {
    set_paths "$@"
    [ -f "$CONF" ] || return 0 # never started here
    local name pidfile pid pids=() i left
    stop_steps
    for name in slurmd slurmctld munged; do
        pidfile=$RUN/$name.pid
        [ "$name" != munged ] || pidfile=$MUNGE/munged.pid
        if pid=$(our_pid "$name" "$pidfile"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
        rm -f "$pidfile"
    done
    for i in $(seq 200); do
        left=()
        for pid in ${pids[@]+"${pids[@]}"}; do
            ! alive "$pid" || left+=("$pid")
        done
        [ ${#left[@]} -gt 0 ] || break
        if [ "$i" -eq 150 ]; then
            echo "slurm_cluster.sh: daemons still running 15 s after SIGTERM (pids ${left[*]}); killing them" >&2
            kill -KILL "${left[@]}" 2>/dev/null || true
        fi
        sleep 0.1
    done
    [ ${#left[@]} -eq 0 ] || die "daemons still running after SIGKILL: pids ${left[*]}"
    stop_steps
    rm -f "$SOCKET" "$SOCKET.lock"
}

cmd_env() {
    set_paths "$@"
    [ -f "$CONF" ] || die "no cluster configured in $DIR (run: $0 start $DIR)"
    printf "export SLURM_CONF='%s'\n" "$CONF"
}

case "${1:-}" in
install) cmd_install ;;
start)
    shift
    [ $# -eq 1 ] || usage
    mkdir -p "$1"
    cmd_start "$1"
    ;;
stop)
    shift
    [ $# -eq 1 ] || usage
    cmd_stop "$1"
    ;;
env)
    shift
    [ $# -eq 1 ] || usage
    cmd_env "$1"
    ;;
*) usage ;;
esac
