#!/usr/bin/env bash
# Start (or check) a single-node SLURM cluster with accounting on localhost:
# munged -> MariaDB -> slurmdbd -> slurmctld -> slurmd, all state under $SLURM_LOCAL_DIR
# (default /tmp/scaling-unet-slurm). Idempotent: daemons already running are kept, stale ones
# (after a crash) are killed and the slurmctld state is wiped. Prints on stdout
#     export SLURM_CONF=<state>/slurm.conf
#     # <one-line status>
# so `eval "$(slurm/start.sh)"` sets up the current shell. Progress goes to stderr.
# Settings (environment): SLURM_LOCAL_DIR, SLURM_LOCAL_CTLD_PORT (6817), SLURM_LOCAL_SLURMD_PORT
# (6818), SLURM_LOCAL_DBD_PORT (6819), SLURM_LOCAL_CLUSTER, SLURM_LOCAL_NODE, SLURM_LOCAL_CPUS (8),
# SLURM_LOCAL_GPUS (8), SLURM_LOCAL_MEM_MB (16000), SLURM_LOCAL_MAXTIME (2:00:00).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"
T0="$(date +%s.%N)"

need_root start.sh
for b in munged mariadbd mariadb-install-db mariadb-admin mariadb slurmdbd slurmctld slurmd sacctmgr scontrol sinfo; do
    command -v "$b" >/dev/null 2>&1 || die "$b not found: run slurm/install.sh first"
done
[ "${#MUNGE_SOCKET}" -lt 100 ] || die "state dir path too long for a unix socket: $STATE"
[ "$SLURM_LOCAL_GPUS" -ge 1 ] || die "SLURM_LOCAL_GPUS must be >= 1"

mkdir -p "$STATE" "$RUN_DIR" "$LOG_DIR" "$MUNGE_DIR" "$MYSQL_DIR" "$CTLD_STATE" "$SLURMD_SPOOL" "$DEV_DIR"
chmod 755 "$STATE" "$RUN_DIR" "$LOG_DIR" "$DEV_DIR"

# One start/stop at a time per state dir (parallel test workers, a user and CI, ...).
# Daemons are started with 9>&-: an inherited lock fd would hold the lock for their lifetime.
exec 9>"$STATE/.lock"
flock -w 300 9 || die "another start.sh/stop.sh holds $STATE/.lock"

# ---------------------------------------------------------------- configuration files
render() {  # render TEMPLATE DEST MODE -> returns 0 if DEST changed
    local tmpl="$HERE/templates/$1" dest="$2" mode="$3" tmp
    tmp="$(mktemp "$dest.XXXXXX")"
    sed -e "s|@STATE@|$STATE|g" \
        -e "s|@CLUSTER@|$SLURM_LOCAL_CLUSTER|g" \
        -e "s|@NODE@|$SLURM_LOCAL_NODE|g" \
        -e "s|@CTLD_PORT@|$SLURM_LOCAL_CTLD_PORT|g" \
        -e "s|@SLURMD_PORT@|$SLURM_LOCAL_SLURMD_PORT|g" \
        -e "s|@DBD_PORT@|$SLURM_LOCAL_DBD_PORT|g" \
        -e "s|@MUNGE_SOCKET@|$MUNGE_SOCKET|g" \
        -e "s|@CPUS@|$SLURM_LOCAL_CPUS|g" \
        -e "s|@GPUS@|$SLURM_LOCAL_GPUS|g" \
        -e "s|@LAST_GPU@|$((SLURM_LOCAL_GPUS - 1))|g" \
        -e "s|@MEM_MB@|$SLURM_LOCAL_MEM_MB|g" \
        -e "s|@DEF_MEM_PER_CPU@|$((SLURM_LOCAL_MEM_MB / SLURM_LOCAL_CPUS))|g" \
        -e "s|@MAXTIME@|$SLURM_LOCAL_MAXTIME|g" \
        "$tmpl" >"$tmp"
    chmod "$mode" "$tmp"
    if [ -f "$dest" ] && cmp -s "$tmp" "$dest"; then
        rm -f "$tmp"; return 1
    fi
    mv -f "$tmp" "$dest"; return 0
}

[ -f "$STATE/firstjobid.conf" ] || echo "FirstJobId=1" >"$STATE/firstjobid.conf"
slurm_changed=0; dbd_changed=0; mysql_changed=0
render slurm.conf.in "$SLURM_CONF_FILE" 644 && slurm_changed=1
render gres.conf.in "$STATE/gres.conf" 644 && slurm_changed=1
render slurmdbd.conf.in "$STATE/slurmdbd.conf" 600 && dbd_changed=1   # slurmdbd refuses a readable one
render my.cnf.in "$MYSQL_CNF" 644 && mysql_changed=1
chown root:root "$STATE/slurmdbd.conf"   # owned by SlurmUser (root)

for ((i = 0; i < SLURM_LOCAL_GPUS; i++)); do
    [ -L "$DEV_DIR/nvidia$i" ] || ln -sfn /dev/null "$DEV_DIR/nvidia$i"
done

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
check_port() {  # check_port PORT WHAT ENVVAR: fail early if a foreign process listens there
    if port_taken "$1"; then
        die "port $1 ($2) is in use by another program: choose another one with $3=<port>"
    fi
}
show_log() { [ -f "$1" ] && { log "last lines of $1:"; tail -n 20 "$1" >&2; }; return 0; }
started=()

# ---------------------------------------------------------------- munge
if [ ! -s "$MUNGE_DIR/munge.key" ]; then
    log "creating munge key"
    dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
fi
chown -R munge:munge "$MUNGE_DIR"
chmod 755 "$MUNGE_DIR"
chmod 400 "$MUNGE_DIR/munge.key"
munge_ok() { munge -n -S "$MUNGE_SOCKET" </dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null; }
if ! daemon_running munged || ! munge_ok >/dev/null 2>&1; then
    stop_daemon munged "$MUNGE_DIR/munged.pid" 5
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    log "starting munged"
    runuser -u munge -- munged --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" 9>&- || { show_log "$MUNGE_DIR/munged.log"; die "munged failed"; }
    wait_for munged 10 munge_ok || { show_log "$MUNGE_DIR/munged.log"; die "munged does not answer"; }
    started+=(munged)
fi

# ---------------------------------------------------------------- MariaDB
mysql_cli() { mariadb --defaults-file="$MYSQL_CNF" -uroot "$@"; }
mysql_ok() { mariadb-admin --defaults-file="$MYSQL_CNF" -uroot --connect-timeout=2 ping; }
if [ "$mysql_changed" = 1 ] || ! daemon_running mariadbd || ! mysql_ok >/dev/null 2>&1; then
    stop_daemon mariadbd "$MYSQL_DIR/mysqld.pid" 30
    if [ ! -f "$MYSQL_DIR/.initialised" ]; then
        log "initialising the MariaDB data dir"
        rm -rf "$MYSQL_DATA"; mkdir -p "$MYSQL_DATA"
        chown -R mysql:mysql "$MYSQL_DIR"
        mariadb-install-db --defaults-file="$MYSQL_CNF" --auth-root-authentication-method=socket \
            --skip-test-db >"$LOG_DIR/mariadb-install-db.log" 2>&1 \
            || { show_log "$LOG_DIR/mariadb-install-db.log"; die "mariadb-install-db failed"; }
        touch "$MYSQL_DIR/.initialised"
    fi
    chown -R mysql:mysql "$MYSQL_DIR"
    rm -f "$MYSQL_SOCKET"
    log "starting mariadbd"
    setsid mariadbd --defaults-file="$MYSQL_CNF" </dev/null >>"$LOG_DIR/mariadbd.out" 2>&1 9>&- &
    wait_for mariadbd 60 mysql_ok || { show_log "$MYSQL_DIR/mysqld.log"; die "mariadbd does not answer"; }
    started+=(mariadbd)
fi
mysql_cli -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db" || die "cannot create slurm_acct_db"

# ---------------------------------------------------------------- slurmdbd
dbd_ok() { timeout 10 sacctmgr -n -P show cluster format=cluster; }
if [ "$dbd_changed" = 1 ] || ! daemon_running slurmdbd || ! dbd_ok >/dev/null 2>&1; then
    stop_daemon slurmdbd "$RUN_DIR/slurmdbd.pid" 15
    check_port "$SLURM_LOCAL_DBD_PORT" slurmdbd SLURM_LOCAL_DBD_PORT
    log "starting slurmdbd"
    slurmdbd 9>&- || { show_log "$LOG_DIR/slurmdbd.log"; die "slurmdbd failed"; }
    wait_for slurmdbd 60 dbd_ok || { show_log "$LOG_DIR/slurmdbd.log"; die "slurmdbd does not answer"; }
    started+=(slurmdbd)
fi

# Register the cluster, an account and the users (root; the sudo caller; SLURM_LOCAL_USERS).
if ! dbd_ok 2>/dev/null | grep -qxF "$SLURM_LOCAL_CLUSTER"; then
    log "registering cluster $SLURM_LOCAL_CLUSTER"
    sacctmgr -i add cluster "$SLURM_LOCAL_CLUSTER" >/dev/null
fi
assoc_users="$(sacctmgr -n -P show assoc cluster="$SLURM_LOCAL_CLUSTER" account=scaling-unet format=user 2>/dev/null || true)"
if ! grep -qx root <<<"$assoc_users"; then
    sacctmgr -i add account scaling-unet cluster="$SLURM_LOCAL_CLUSTER" \
        description="scaling-unet local cluster" organization=scaling-unet >/dev/null 2>&1 || true
fi
for u in root ${SUDO_USER:-} ${SLURM_LOCAL_USERS:-}; do
    if [ "$u" != "" ] && id "$u" >/dev/null 2>&1 && ! grep -qxF "$u" <<<"$assoc_users"; then
        sacctmgr -i add user "$u" account=scaling-unet cluster="$SLURM_LOCAL_CLUSTER" >/dev/null 2>&1 || true
    fi
done

# ---------------------------------------------------------------- slurmctld + slurmd
ctld_ok() { timeout 10 scontrol ping | grep -q 'is UP'; }
node_state() { timeout 10 sinfo -h -N -n "$SLURM_LOCAL_NODE" -o %T 2>/dev/null | head -n 1; }
if [ "$slurm_changed" = 1 ] || ! daemon_running slurmctld || ! daemon_running slurmd || ! ctld_ok >/dev/null 2>&1; then
    # Cold start: a slurmctld that recovers old state would re-run the jobs of a crashed cluster.
    stop_daemon slurmd "$RUN_DIR/slurmd.pid" 15
    stop_daemon slurmctld "$RUN_DIR/slurmctld.pid" 15
    kill_jobs
    rm -rf "${CTLD_STATE:?}"/* "${SLURMD_SPOOL:?}"/*
    # Continue job ids after the ones already in the accounting database (sacct -j must stay unique).
    table="$(tr '[:upper:]' '[:lower:]' <<<"$SLURM_LOCAL_CLUSTER")_job_table"
    last_id="$(mysql_cli -N -B -e "SELECT COALESCE(MAX(id_job),0) FROM slurm_acct_db.\`$table\`" 2>/dev/null || echo 0)"
    echo "FirstJobId=$((last_id + 1))" >"$STATE/firstjobid.conf"
    check_port "$SLURM_LOCAL_CTLD_PORT" slurmctld SLURM_LOCAL_CTLD_PORT
    check_port "$SLURM_LOCAL_SLURMD_PORT" slurmd SLURM_LOCAL_SLURMD_PORT
    log "starting slurmctld (first job id $((last_id + 1)))"
    slurmctld -f "$SLURM_CONF_FILE" 9>&- || { show_log "$LOG_DIR/slurmctld.log"; die "slurmctld failed"; }
    wait_for slurmctld 30 ctld_ok || { show_log "$LOG_DIR/slurmctld.log"; die "slurmctld does not answer"; }
    log "starting slurmd"
    slurmd -f "$SLURM_CONF_FILE" -N "$SLURM_LOCAL_NODE" 9>&- || { show_log "$LOG_DIR/slurmd.log"; die "slurmd failed"; }
    started+=(slurmctld slurmd)
fi

# The node must be usable: idle (or busy with jobs of an earlier session). Undrain it if needed.
node_usable() { [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing)$ ]]; }
resumed=0
deadline=$((SECONDS + 40))
until node_usable; do
    st="$(node_state)"
    if [[ "$st" =~ drain|down|inval|fail ]] && [ "$resumed" = 0 ] && [[ ! "$st" =~ \*$ ]]; then
        log "node $SLURM_LOCAL_NODE is '$st' ($(sinfo -h -R -n "$SLURM_LOCAL_NODE" -o %E 2>/dev/null)): resuming it"
        scontrol update nodename="$SLURM_LOCAL_NODE" state=resume || true
        resumed=1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        show_log "$LOG_DIR/slurmd.log"
        die "node $SLURM_LOCAL_NODE is '$st', not idle"
    fi
    sleep 0.2
done

elapsed="$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
if [ "${#started[@]}" -gt 0 ]; then what="started ${started[*]}"; else what="already running"; fi
echo "export SLURM_CONF=$SLURM_CONF_FILE"
echo "# slurm-local: cluster $SLURM_LOCAL_CLUSTER up ($what, ${elapsed}s): node $SLURM_LOCAL_NODE $(node_state)," \
     "${SLURM_LOCAL_CPUS} CPUs, ${SLURM_LOCAL_GPUS} fake GPUs, partition gpu, state $STATE," \
     "ports ctld=$SLURM_LOCAL_CTLD_PORT slurmd=$SLURM_LOCAL_SLURMD_PORT dbd=$SLURM_LOCAL_DBD_PORT"
