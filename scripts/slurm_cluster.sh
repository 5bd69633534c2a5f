#!/usr/bin/env bash
# A real one-node SLURM cluster with accounting, for tests and CI on Debian 12 run as root
# without systemd: munged, MariaDB, slurmdbd, slurmctld and slurmd, started directly.
#
#   scripts/slurm_cluster.sh up      install what is missing, configure, start, wait until ready
#   scripts/slurm_cluster.sh down    stop the daemons that `up` started (and only those)
#   scripts/slurm_cluster.sh status  print each daemon's state and the node; exit 0 when ready
#
# Every step is idempotent: `up` starts only what is not already running and records the pid of
# each daemon it starts in $MASEP_SLURM_STATE_DIR; `down` stops exactly those pids. Daemons that
# were already running (started by someone else) are used as they are and never stopped.
#
# Environment:
#   MASEP_SLURM_STATE_DIR    where pids of started daemons are kept (default /run/masep-slurm)
#   MASEP_SLURM_MIN_CPUS     CPUs the node declares at least (default 4), so that a 4-rank job
#                            runs on a 2-core machine
#   MASEP_SLURM_UP_TIMEOUT_S how long `up` waits for the node to become usable (default 120)
set -euo pipefail

STATE_DIR=${MASEP_SLURM_STATE_DIR:-/run/masep-slurm}
MIN_CPUS=${MASEP_SLURM_MIN_CPUS:-4}
UP_TIMEOUT_S=${MASEP_SLURM_UP_TIMEOUT_S:-120}

CLUSTER_NAME=masep
PARTITION=debug
HOST=$(hostname -s)
SLURM_CONF_DIR=/etc/slurm
SLURM_CONF=$SLURM_CONF_DIR/slurm.conf
SLURMDBD_CONF=$SLURM_CONF_DIR/slurmdbd.conf
LOG_DIR=/var/log/slurm
DB_NAME=slurm_acct_db
DB_USER=slurm
PACKAGES=(munge slurm-wlm slurmdbd mariadb-server)
# Start order; `down` goes in reverse.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

log() { echo "slurm_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

# ------------------------------------------------------------------ processes

pid_alive() {
    [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null || return 1
    local stat tasks
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} == Z ]] || return 0
    # A zombie counts as gone (containers without an init may never reap it), unless it is a
    # main thread that exited while its other threads are still shutting the daemon down.
    tasks=(/proc/"$1"/task/*)
    ((${#tasks[@]} > 1))
}

# Process names as the kernel shows them; MariaDB may still run under its old name.
process_names() {
    case $1 in
        mariadbd) echo "mariadbd mysqld" ;;
        *) echo "$1" ;;
    esac
}

pid_is() {  # pid_is PID DAEMON: the pid is alive and is that daemon (pids get reused)
    local pid=$1 name comm
    pid_alive "$pid" || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    for name in $(process_names "$2"); do [[ $comm == "$name" ]] && return 0; done
    return 1
}

# Pid of the daemon that THIS state dir started, if it still runs; forgets stale records.
started_pid() {
    local file=$STATE_DIR/$1.pid pid
    [[ -f $file ]] || return 1
    pid=$(<"$file")
    if pid_is "$pid" "$1"; then echo "$pid"; return 0; fi
    rm -f "$file"
    return 1
}

# Pid of any running instance of the daemon (ours or not).
running_pid() {
    local name pid
    for name in $(process_names "$1"); do
        for pid in $(pgrep -x "$name" 2>/dev/null); do
            pid_alive "$pid" && { echo "$pid"; return 0; }
        done
    done
    return 1
}

record_pid() {
    mkdir -p "$STATE_DIR"
    echo "$2" >"$STATE_DIR/$1.pid.tmp"
    mv -f "$STATE_DIR/$1.pid.tmp" "$STATE_DIR/$1.pid"
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.5 s until it succeeds.
wait_for() {
    local timeout=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
    log "$what ready"
}

# start_daemon NAME PIDFILE COMMAND...: run a self-daemonizing COMMAND unless NAME already runs,
# then record the pid it writes to PIDFILE.
start_daemon() {
    local name=$1 pidfile=$2 pid
    shift 2
    if pid=$(started_pid "$name"); then
        log "$name already running (pid $pid, started by this script)"
        return 0
    fi
    if pid=$(running_pid "$name"); then
        log "$name already running (pid $pid, not started here: left alone)"
        return 0
    fi
    rm -f "$pidfile"
    "$@" || die "$name failed to start (command: $*)"
    local deadline=$((SECONDS + 30))
    until [[ -s $pidfile ]] && pid_is "$(<"$pidfile")" "$name"; do
        ((SECONDS < deadline)) || die "$name did not write a live pid to $pidfile within 30 s; see $LOG_DIR and /var/log"
        sleep 0.2
    done
    pid=$(<"$pidfile")
    record_pid "$name" "$pid"
    log "started $name (pid $pid)"
}

# ------------------------------------------------------------------ install

package_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o DPkg::Lock::Timeout=600 -o Dpkg::Options::=--force-confold "$@"
}

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do package_installed "$p" || missing+=("$p"); done
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]}"
    # Keep package scripts from starting daemons we would not know about (Debian's policy-rc.d
    # convention; docker images ship one already).
    local own_policy=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        own_policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$own_policy"
        chmod 755 "$own_policy"
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    # The package lists are refreshed only when installing from them fails.
    if ! apt_install "${missing[@]}"; then
        log "apt-get install failed; refreshing package lists and retrying"
        DEBIAN_FRONTEND=noninteractive apt-get update -q -o DPkg::Lock::Timeout=600
        apt_install "${missing[@]}"
    fi
    if [[ -n $own_policy ]]; then rm -f "$own_policy"; trap - EXIT; fi
}

# ------------------------------------------------------------------ configuration

# write_if_changed PATH MODE < content: replace PATH atomically when the content differs.
# Returns 0 when the file changed.
write_if_changed() {
    local path=$1 mode=$2 tmp
    tmp=$(mktemp "$path.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $path ]] && cmp -s "$tmp" "$path"; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$path"
    log "wrote $path"
}

node_cpus() {
    local n
    n=$(nproc)
    ((n > MIN_CPUS)) && echo "$n" || echo "$MIN_CPUS"
}

node_memory_mb() {  # what slurmd sees, less 1 GiB for the daemons themselves
    awk '/^MemTotal:/ { mb = int($2 / 1024) - 1024; print (mb > 512 ? mb : 512) }' /proc/meminfo
}

db_password() {  # keep the password of an earlier `up`, else make a new one
    if [[ -f $SLURMDBD_CONF ]] && grep -q '^StoragePass=' "$SLURMDBD_CONF"; then
        sed -n 's/^StoragePass=//p' "$SLURMDBD_CONF"
    else
        od -An -N16 -tx1 /dev/urandom | tr -d ' \n'
    fi
}

slurm_conf_text() {
    cat <<EOF
# Written by scripts/slurm_cluster.sh: a one-node cluster for tests. Regenerated on every 'up'.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only after its credential expired (default 120 s).
AuthInfo=cred_expire=10
MpiDefault=none
# No systemd/cgroups here: track processes by parentage, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/lib/slurm/slurmd
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Short timers so that tests of cancellation, time limits and requeues resolve in seconds.
KillWait=5
OverTimeLimit=0
MinJobAge=30
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
JobRequeue=1
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# The node declares at least $MIN_CPUS CPUs even on smaller machines (multi-rank CPU jobs);
# config_overrides makes slurmd accept the declared count instead of draining the node.
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
# No mail here; the default /bin/mail does not exist and slurmctld logs an error for it.
MailProg=/bin/true
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$(node_cpus) RealMemory=$(node_memory_mb) State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

slurmdbd_conf_text() {
    cat <<EOF
# Written by scripts/slurm_cluster.sh.
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$LOG_DIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=$DB_NAME
StorageUser=$DB_USER
StoragePass=$1
EOF
}

# ------------------------------------------------------------------ daemons

start_munge() {
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        log "made a new /etc/munge/munge.key"
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    start_daemon munged /run/munge/munged.pid runuser -u munge -- /usr/sbin/munged
    wait_for 30 munge bash -c 'munge -n | unmunge' || die "munge does not answer; see /var/log/munge/munged.log"
}

start_mariadb() {
    install -d -o mysql -g mysql -m 0755 /run/mysqld
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        log "initialising the MariaDB data directory"
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    fi
    # mariadbd does not daemonize itself: run it detached with its own pid file.
    start_daemon mariadbd /run/mysqld/mysqld.pid \
        bash -c "setsid nohup /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
                 </dev/null >>'$LOG_DIR/mariadb.log' 2>&1 &"
    wait_for 60 MariaDB mariadb-admin ping || die "MariaDB does not answer; see $LOG_DIR/mariadb.log"
    local password=$1
    mariadb <<EOF
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$password';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$password';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
EOF
}

cluster_registered() { sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER_NAME"; }

node_state() { sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1; }

node_usable() {  # idle, or running jobs; no flags such as '*' (not responding) or drain
    case $(node_state) in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

accounting_works() { sacct -n -X -S now-1minutes >/dev/null 2>&1; }

cluster_ready() { node_usable && accounting_works; }

# True when a SLURM daemon runs that this state dir did not start: its configuration is then
# someone else's and is not rewritten.
foreign_slurm_running() {
    local name
    for name in slurmctld slurmd slurmdbd; do
        if running_pid "$name" >/dev/null && ! started_pid "$name" >/dev/null; then return 0; fi
    done
    return 1
}

stop_pid() {  # stop_pid NAME PID: TERM, wait up to 30 s, then KILL
    local name=$1 pid=$2 deadline=$((SECONDS + 30))
    kill -TERM "$pid" 2>/dev/null || true
    while pid_is "$pid" "$name"; do
        if ((SECONDS >= deadline)); then
            log "$name (pid $pid) ignored SIGTERM for 30 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    log "stopped $name (pid $pid)"
}

cmd_up() {
    local t0=$SECONDS
    [[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts system daemons)"
    install_packages
    mkdir -p "$STATE_DIR" "$LOG_DIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd "$SLURM_CONF_DIR"

    local password config_changed=0
    password=$(db_password)
    if foreign_slurm_running; then
        log "SLURM daemons not started by this script are running: keeping their configuration"
    else
        slurmdbd_conf_text "$password" | write_if_changed "$SLURMDBD_CONF" 600 || true
        if slurm_conf_text | write_if_changed "$SLURM_CONF" 644; then config_changed=1; fi
    fi
    if ((config_changed)); then  # daemons started earlier by this script must read the new file
        local name pid
        for name in slurmd slurmctld; do
            if pid=$(started_pid "$name"); then stop_pid "$name" "$pid"; rm -f "$STATE_DIR/$name.pid"; fi
        done
    fi

    start_munge
    start_mariadb "$password"
    start_daemon slurmdbd /run/slurmdbd.pid /usr/sbin/slurmdbd
    wait_for 60 slurmdbd sacctmgr -n list cluster || die "slurmdbd does not answer; see $LOG_DIR/slurmdbd.log"
    if ! cluster_registered; then
        sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
        log "registered cluster $CLUSTER_NAME in the accounting database"
    fi
    # -i: start even if state files of an earlier run do not match the configuration.
    start_daemon slurmctld /run/slurmctld.pid /usr/sbin/slurmctld -i
    start_daemon slurmd /run/slurmd.pid /usr/sbin/slurmd

    if ! wait_for "$UP_TIMEOUT_S" "node $HOST and accounting" cluster_ready; then
        sinfo -N -l >&2 || true
        scontrol show node "$HOST" 2>/dev/null | grep -E 'State=|Reason=' >&2 || true
        tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
        die "cluster not usable within ${UP_TIMEOUT_S} s (node state: $(node_state || echo unknown))"
    fi
    log "up in $((SECONDS - t0)) s: partition $PARTITION, node $HOST ($(sinfo -h -n "$HOST" -o '%c CPUs, %m MB'))"
}

cmd_down() {
    local i name pid stopped=0
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        name=${DAEMONS[i]}
        if pid=$(started_pid "$name"); then
            stop_pid "$name" "$pid"
            rm -f "$STATE_DIR/$name.pid"
            stopped=$((stopped + 1))
        elif pid=$(running_pid "$name"); then
            log "$name (pid $pid) was not started here: left running"
        fi
    done
    log "stopped $stopped daemon(s)"
}

cmd_status() {
    local name pid
    for name in "${DAEMONS[@]}"; do
        if pid=$(started_pid "$name"); then
            echo "$name: running (pid $pid, started by slurm_cluster.sh)"
        elif pid=$(running_pid "$name"); then
            echo "$name: running (pid $pid, not started by slurm_cluster.sh)"
        else
            echo "$name: not running"
        fi
    done
    if command -v sinfo >/dev/null && sinfo -h -o '%P %a %D %T %c %m' 2>/dev/null | sed 's/^/sinfo: /'; then
        if accounting_works; then echo "accounting: sacct works"; else echo "accounting: sacct fails"; fi
    else
        echo "sinfo: controller not reachable"
    fi
    if cluster_ready 2>/dev/null; then echo "ready: yes"; else echo "ready: no"; return 1; fi
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
