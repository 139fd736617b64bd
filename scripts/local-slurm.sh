#!/usr/bin/env bash
# local-slurm.sh — start/stop a real single-node SLURM cluster on localhost.
#
# Used by sslbench's `slurm`-marked tests and by CI (root, Debian 12, fresh
# machine, no services running). Everything listens on 127.0.0.1 only.
#
# Usage (as root):
#   scripts/local-slurm.sh up      # install slurm-wlm + munge if missing, start
#                                  # munged, slurmctld, slurmd; wait until the
#                                  # node is idle (idempotent)
#   scripts/local-slurm.sh down    # cancel all jobs, stop slurmd + slurmctld
#                                  # (+ munged if this script started it)
#   scripts/local-slurm.sh status  # print sinfo/squeue; exit 0 if up, 1 if down
#
# Cluster: name `sslbench`, one node (`hostname -s`, CPUs=`nproc` without OMP_NUM_THREADS, RealMemory
# = 90% of MemAvailable), partition `debug` (Default, MaxTime=INFINITE) and
# partition `urgent` (same node, higher PriorityTier): a job in `urgent`
# preempts jobs in `debug`, which are signalled, get a 10 s GraceTime, and are
# requeued. No slurmdbd, so `sacct` does not work; use `squeue` or
# `scontrol show job <id>` (finished jobs stay visible for MinJobAge=300 s).
# A requeued job restarts after ~6 s (Slurm default: ~2 min), see below.
#
# Config file: $SLURM_CONF if set, else /etc/slurm/slurm.conf (the path the
# Slurm clients read by default). If you set SLURM_CONF, export it for the
# clients (sbatch, squeue, submitit, ...) too.
#
# Environment knobs:
#   SLURM_CONF                  config path (see above)
#   LOCAL_SLURM_TIMEOUT=60      seconds to wait for the node to become idle
#   LOCAL_SLURM_CRED_EXPIRE=5   AuthInfo cred_expire; also the delay before a
#                               requeued job may start again (Slurm default:
#                               120 s; Slurm's minimum: 5 s)
#
# `up` is a no-op when the cluster is already up (it does not rewrite the
# config then: run `down` first to apply a change). Otherwise it (re)starts
# slurmctld with -c (clean state): no jobs or node DOWN/DRAIN state survive a
# down/up cycle (job ids keep counting up). If `up` fails it leaves whatever
# it started running for inspection; `down` cleans up.
# Logs: /var/log/slurm/slurm{ctld,d}.log, /var/log/munge/munged.log.
set -euo pipefail

CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
UP_TIMEOUT=${LOCAL_SLURM_TIMEOUT:-60}
CRED_EXPIRE=${LOCAL_SLURM_CRED_EXPIRE:-5}

LOG_DIR=/var/log/slurm
PID_DIR=/run/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
CTLD_PID=$PID_DIR/slurmctld.pid
SLURMD_PID=$PID_DIR/slurmd.pid
CTLD_LOG=$LOG_DIR/slurmctld.log
SLURMD_LOG=$LOG_DIR/slurmd.log
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
MUNGE_LOG=/var/log/munge/munged.log
# Marker: exists while a munged started by this script is running.
MUNGE_MARKER=$PID_DIR/munged.started-by-local-slurm

[[ $CRED_EXPIRE =~ ^[0-9]+$ && $CRED_EXPIRE -ge 5 ]] \
    || { echo "local-slurm: ERROR: LOCAL_SLURM_CRED_EXPIRE must be an integer >= 5 (Slurm ignores smaller values and uses 120)" >&2; exit 2; }

NODE=$(hostname -s)
export SLURM_CONF=$CONF

log() { echo "local-slurm: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "'$1' must run as root (it writes /etc and starts daemons)"
}

# --- helpers ----------------------------------------------------------------

# pid_alive PIDFILE NAME: true when PIDFILE names a live process called NAME.
pid_alive() {
    local pid
    [[ -r $1 ]] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == "$2" ]] || return 1
    # A daemon that exited may linger as a zombie until PID 1 reaps it.
    [[ $(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null) != Z ]]
}

# Live (non-zombie) pids of processes named slurmctld or slurmd.
other_slurm_pids() { { ps -C slurmctld,slurmd -o pid=,stat= || true; } | awk '$2 !~ /^Z/ { print $1 }' | tr '\n' ' '; }

# stop_pidfile PIDFILE NAME: SIGTERM the process, wait up to 20 s, then SIGKILL.
stop_pidfile() {
    local pid i
    pid_alive "$1" "$2" || return 0
    pid=$(cat "$1")
    log "stopping $2 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
        pid_alive "$1" "$2" || { rm -f "$1"; return 0; }
        sleep 0.5
    done
    log "$2 (pid $pid) ignored SIGTERM for 20 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$1"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

ctld_ok() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }

# Node state as sinfo reports it (e.g. idle, mixed, allocated, down*, drained).
node_state() { timeout 15 sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1; }

node_usable() {
    case $(node_state) in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

cluster_up() {
    [[ -r $CONF ]] && pid_alive "$CTLD_PID" slurmctld && pid_alive "$SLURMD_PID" slurmd \
        && ctld_ok && node_usable
}

show_logs() {
    local f
    for f in "$CTLD_LOG" "$SLURMD_LOG" "$MUNGE_LOG"; do
        [[ -r $f ]] || continue
        echo "----- tail -n 25 $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

# --- up -----------------------------------------------------------------------

install_packages() {
    local bin missing=0
    for bin in slurmctld slurmd sinfo sbatch munged munge; do
        command -v "$bin" >/dev/null 2>&1 || missing=1
    done
    [[ $missing -eq 1 ]] || return 0
    log "installing slurm-wlm and munge with apt"
    local apt=(apt-get install -y -q --no-install-recommends slurm-wlm munge)
    export DEBIAN_FRONTEND=noninteractive
    if ! "${apt[@]}" >/tmp/local-slurm-apt.log 2>&1; then
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update -q >>/tmp/local-slurm-apt.log 2>&1 || true
        "${apt[@]}" >>/tmp/local-slurm-apt.log 2>&1 \
            || { tail -n 20 /tmp/local-slurm-apt.log >&2; die "apt-get install slurm-wlm munge failed"; }
    fi
}

start_munge() {
    install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -m 0755 "$PID_DIR"
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating $MUNGE_KEY"
        rm -f "$MUNGE_KEY"
        (umask 0277 && dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none)
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"

    munge_ok && return 0
    log "starting munged"
    if ! runuser -u munge -- /usr/sbin/munged 2>/dev/null; then
        log "munged as user munge failed; trying as root (--force)"
        /usr/sbin/munged --force || { show_logs; die "could not start munged"; }
    fi
    touch "$MUNGE_MARKER"
    local i
    for ((i = 0; i < 20; i++)); do
        munge_ok && return 0
        sleep 0.5
    done
    show_logs
    die "munged started but munge -n | unmunge still fails"
}

write_conf() {
    local cpus avail_mb mem_mb def_mem
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # GNU nproc obeys OMP_NUM_THREADS: not the cores
    avail_mb=$(awk '/^MemAvailable:/ { print int($2 / 1024) }' /proc/meminfo)
    # A bit below what is free, rounded down to 256 MB so that repeated `up`s
    # produce the same file; slurmd drains a node whose RealMemory is too high.
    mem_mb=$((avail_mb * 9 / 10 / 256 * 256))
    ((mem_mb >= 256)) || mem_mb=256
    # With CR_Core_Memory a job that asks for no memory gets the whole node's
    # memory (so only one job could run at a time) unless DefMemPerCPU is set.
    def_mem=$((mem_mb / cpus))

    mkdir -p "$(dirname "$CONF")"
    if [[ -e $CONF ]] && ! grep -q '^# Generated by scripts/local-slurm.sh' "$CONF"; then
        log "backing up existing $CONF to $CONF.bak"
        cp -p "$CONF" "$CONF.bak"
    fi
    cat >"$CONF.tmp" <<EOF
# Generated by scripts/local-slurm.sh — single-node test cluster; rewritten by every 'up'.
ClusterName=sslbench
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again
# (Slurm default 120 s, minimum 5 s).
AuthInfo=cred_expire=${CRED_EXPIRE}
StateSaveLocation=${CTLD_SPOOL}
SlurmdSpoolDir=${SLURMD_SPOOL}
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${CTLD_LOG}
SlurmdLogFile=${SLURMD_LOG}
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
# A requeued job is held until its begin time (requeue + cred_expire + 1 s);
# after that only the *periodic* main scheduling pass starts it (backfill
# skips it), and that pass runs every sched_interval (default 60 s).
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=${def_mem}
# No slurmdbd: sacct is unavailable.
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Requeue / preemption: jobs are requeueable by default; a job in partition
# 'urgent' preempts (requeues) jobs in 'debug' when the node is full.
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# A preempted job gets its --signal (submitit: USR2) at once, else SIGTERM,
# then GraceTime (partition debug) seconds before it is killed and requeued.
SlurmctldParameters=preempt_send_user_signal
KillWait=5
InactiveLimit=0
MinJobAge=300
ReturnToService=2
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=10
PartitionName=urgent Nodes=${NODE} Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
    mv "$CONF.tmp" "$CONF"
    chmod 0644 "$CONF"
}

start_slurm() {
    install -d -m 0755 "$LOG_DIR" "$PID_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"
    # Start from a clean slate so the new config and a fresh node state apply.
    stop_pidfile "$SLURMD_PID" slurmd
    stop_pidfile "$CTLD_PID" slurmctld
    local others
    others=$(other_slurm_pids)
    [[ -z $others ]] || die "slurmctld/slurmd not started by this script are running (pids: $others); stop them first"
    write_conf
    log "starting slurmctld and slurmd (config $CONF)"
    slurmctld -c -f "$CONF" || { show_logs; die "slurmctld failed to start"; }
    slurmd -f "$CONF" || { show_logs; die "slurmd failed to start"; }

    local deadline=$((SECONDS + UP_TIMEOUT)) state=""
    while ((SECONDS < deadline)); do
        state=$(node_state || true)
        [[ $state == idle ]] && return 0
        sleep 1
    done
    {
        echo "local-slurm: ERROR: node $NODE not idle after ${UP_TIMEOUT}s (state: '${state:-no answer}')"
        timeout 15 sinfo -R 2>&1 || true
    } >&2
    show_logs
    exit 1
}

cmd_up() {
    need_root up
    install_packages
    start_munge
    if cluster_up; then
        log "already up"
    else
        start_slurm
        log "up: node $NODE is idle"
    fi
    cmd_status
}

# --- down -------------------------------------------------------------------

cmd_down() {
    need_root down
    local i
    if pid_alive "$CTLD_PID" slurmctld && ctld_ok; then
        # Cancel jobs first so no job processes outlive slurmd.
        local jobs
        mapfile -t jobs < <(squeue -h -o %A 2>/dev/null || true)
        if ((${#jobs[@]})); then
            log "cancelling ${#jobs[@]} job(s)"
            scancel --quiet "${jobs[@]}" 2>/dev/null || true
            for ((i = 0; i < 30; i++)); do
                [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
    fi
    stop_pidfile "$SLURMD_PID" slurmd
    stop_pidfile "$CTLD_PID" slurmctld
    if [[ -e $MUNGE_MARKER ]]; then
        stop_pidfile "$MUNGE_PID" munged
        rm -f "$MUNGE_MARKER"
    fi
    log "down"
}

# --- status -------------------------------------------------------------------

cmd_status() {
    if [[ ! -r $CONF ]] || ! pid_alive "$CTLD_PID" slurmctld || ! ctld_ok; then
        echo "slurm is down (slurmctld not running or not answering; config: $CONF)"
        return 1
    fi
    timeout 15 sinfo || true
    timeout 15 squeue || true
    if ! pid_alive "$SLURMD_PID" slurmd || ! node_usable; then
        echo "slurm is down (slurmctld up, but node $NODE is '$(node_state)')"
        return 1
    fi
    return 0
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 up|down|status" >&2
        exit 2
        ;;
esac
