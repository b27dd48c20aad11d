# shellcheck shell=bash
# Settings and helpers shared by start.sh and stop.sh (sourced, not executed).
# Every path of the local cluster lives under one state directory, so a second cluster only needs
# another SLURM_LOCAL_DIR and other ports.

SLURM_LOCAL_DIR="${SLURM_LOCAL_DIR:-/tmp/scaling-unet-slurm}"
STATE="$(realpath -m -- "$SLURM_LOCAL_DIR")"
SLURM_LOCAL_CLUSTER="${SLURM_LOCAL_CLUSTER:-scaling-unet-local}"
SLURM_LOCAL_NODE="${SLURM_LOCAL_NODE:-$(hostname -s)}"
SLURM_LOCAL_CTLD_PORT="${SLURM_LOCAL_CTLD_PORT:-6817}"
SLURM_LOCAL_SLURMD_PORT="${SLURM_LOCAL_SLURMD_PORT:-6818}"
SLURM_LOCAL_DBD_PORT="${SLURM_LOCAL_DBD_PORT:-6819}"
SLURM_LOCAL_CPUS="${SLURM_LOCAL_CPUS:-8}"
SLURM_LOCAL_GPUS="${SLURM_LOCAL_GPUS:-8}"
SLURM_LOCAL_MEM_MB="${SLURM_LOCAL_MEM_MB:-16000}"
SLURM_LOCAL_MAXTIME="${SLURM_LOCAL_MAXTIME:-2:00:00}"

SLURM_CONF_FILE="$STATE/slurm.conf"
RUN_DIR="$STATE/run"
LOG_DIR="$STATE/log"
MUNGE_DIR="$STATE/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
MYSQL_DIR="$STATE/mysql"
MYSQL_DATA="$MYSQL_DIR/data"
MYSQL_SOCKET="$MYSQL_DIR/mysqld.sock"
MYSQL_CNF="$STATE/my.cnf"
CTLD_STATE="$STATE/slurmctld"
SLURMD_SPOOL="$STATE/slurmd"
DEV_DIR="$STATE/dev"

export SLURM_CONF="$SLURM_CONF_FILE"
export MYSQL_UNIX_PORT="$MYSQL_SOCKET"   # libmariadb (slurmdbd, mariadb client) connects here for "localhost"

# Process names (/proc/PID/comm) of the daemons, in stop order.
DAEMONS_STOP_ORDER=(slurmd slurmctld slurmdbd mariadbd munged)

log() { printf '[slurm-local %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# PIDs of processes named $1 (exactly, as in /proc/PID/comm) that belong to THIS state dir:
# their command line or environment mentions "$STATE/" (config file, socket or SLURM_CONF).
# Pidfiles alone are not enough: after a crash they may be gone or point to a recycled PID.
daemon_pids() {
    local name="$1" d pid comm
    for d in /proc/[0-9]*; do
        pid="${d#/proc/}"
        [ "$pid" = "$$" ] && continue
        { read -r comm <"$d/comm"; } 2>/dev/null || continue
        [ "$comm" = "$name" ] || continue
        if tr '\0' '\n' 2>/dev/null <"$d/cmdline" | grep -qF -- "$STATE/" \
           || tr '\0' '\n' 2>/dev/null <"$d/environ" | grep -qxF -- "SLURM_CONF=$SLURM_CONF_FILE"; then
            echo "$pid"
        fi
    done
}

# PIDs of job processes of this cluster (anything launched by slurmstepd with our SLURM_CONF and a job id).
job_pids() {
    local d pid env
    for d in /proc/[0-9]*; do
        pid="${d#/proc/}"
        [ "$pid" = "$$" ] && continue
        env="$(tr '\0' '\n' 2>/dev/null <"$d/environ")" || continue
        if grep -qxF -- "SLURM_CONF=$SLURM_CONF_FILE" <<<"$env" && grep -q '^SLURM_JOB_ID=' <<<"$env"; then
            echo "$pid"
        fi
    done
}

daemon_running() { [ -n "$(daemon_pids "$1")" ]; }

# Send TERM to the given PIDs, wait up to $1 seconds, then KILL what is left.
terminate_pids() {
    local timeout="$1"; shift
    [ "$#" -gt 0 ] || return 0
    kill -TERM "$@" 2>/dev/null || true
    local deadline=$((SECONDS + timeout)) p alive
    while :; do
        alive=()
        for p in "$@"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
        [ "${#alive[@]}" -eq 0 ] && return 0
        [ "$SECONDS" -ge "$deadline" ] && break
        sleep 0.1
    done
    log "killing ${alive[*]} (no exit after ${timeout}s)"
    kill -KILL "${alive[@]}" 2>/dev/null || true
    sleep 0.2
}

# Stop every process named $1 of this cluster; remove its pidfile $2 (if given).
stop_daemon() {
    local name="$1" pidfile="${2:-}" timeout="${3:-15}"
    local pids
    mapfile -t pids < <(daemon_pids "$name")
    if [ "${#pids[@]}" -gt 0 ]; then
        log "stopping $name (pid ${pids[*]})"
        terminate_pids "$timeout" "${pids[@]}"
    fi
    [ -n "$pidfile" ] && rm -f -- "$pidfile"
    return 0
}

kill_jobs() {
    local pids
    mapfile -t pids < <(daemon_pids slurmstepd; job_pids)
    if [ "${#pids[@]}" -gt 0 ]; then
        log "killing leftover job processes (pid ${pids[*]})"
        kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
    return 0
}

# wait_for DESCRIPTION TIMEOUT_S COMMAND...: poll COMMAND every 0.2 s until it succeeds.
wait_for() {
    local what="$1" timeout="$2"; shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "timeout after ${timeout}s waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

need_root() {
    [ "$(id -u)" = 0 ] || die "$1 must run as root (daemons switch to the users munge and mysql); try: sudo -E $0"
}
