#!/bin/bash
# A one-node Slurm cluster on this machine (slurmctld + slurmd on localhost), for trying
# train.sbatch and for its test. Debian's slurm-wlm and munge; run as root.
#
#   examples/slurm/local-cluster.sh install      apt-get the packages if they are missing
#   examples/slurm/local-cluster.sh start DIR    config, state and logs under DIR; prints
#                                                the SLURM_CONF to export for sbatch & co
#   examples/slurm/local-cluster.sh stop DIR     stop what start started
#
# Ports: SLURMCTLD_PORT and SLURMD_PORT (default 6817 and 6818).
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
       command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    echo "local-cluster: installing ${PACKAGES[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >&2
}

# munge authenticates every Slurm message; one daemon per machine, shared with any other user.
start_munge() {
    local dir="$1"
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=128 count=1 status=none
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    if munge -n </dev/null >/dev/null 2>&1; then
        return 0  # already running: leave it to whoever started it
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$dir/munged.ours"
    wait_until 20 "munged to answer" munge -n
}

# wait_until SECONDS WHAT COMMAND...: poll COMMAND until it succeeds, fail after SECONDS.
wait_until() {
    local limit="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@" </dev/null >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "local-cluster: no $what after ${limit}s" >&2
            return 1
        fi
        sleep 0.2
    done
}

node_idle() {
    [ "$(sinfo -h -N -o %T 2>/dev/null)" = "idle" ]
}

start() {
    local dir
    dir="$(realpath -m "$1")"
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    start_munge "$dir"
    local host cpus
    host="$(hostname -s)"
    cpus="$(nproc)"
    # SlurmUser=root and no cgroups: proctrack/linuxproc follows the process tree and
    # task/none binds nothing, which is what works inside a container.
    cat >"$dir/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF="$dir/slurm.conf"
    # -i: ignore state left by an earlier cluster in this folder
    slurmctld -f "$SLURM_CONF" -i
    slurmd -f "$SLURM_CONF"
    wait_until 60 "idle node in sinfo" node_idle
    echo "$SLURM_CONF"
}

stop_pidfile() {
    local pidfile="$1" pid
    [ -s "$pidfile" ] || return 0
    pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    local dir
    dir="$(realpath -m "$1")"
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    if [ -e "$dir/munged.ours" ]; then
        /usr/sbin/munged --stop >/dev/null 2>&1 || true
        rm -f "$dir/munged.ours"
    fi
}

case "${1:-}" in
    install) install ;;
    start) [ $# -eq 2 ] || { echo "usage: $0 start DIR" >&2; exit 2; }; install; start "$2" ;;
    stop) [ $# -eq 2 ] || { echo "usage: $0 stop DIR" >&2; exit 2; }; stop "$2" ;;
    *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
esac
