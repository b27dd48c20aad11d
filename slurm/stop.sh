#!/usr/bin/env bash
# Stop the local SLURM cluster started by slurm/start.sh (same SLURM_LOCAL_DIR): cancels its jobs,
# then stops slurmd, slurmctld, slurmdbd, MariaDB and munged. Idempotent. The state dir is kept
# (accounting history, munge key, MariaDB data); `rm -rf "$SLURM_LOCAL_DIR"` afterwards wipes it.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

need_root stop.sh
if [ ! -d "$STATE" ]; then
    echo "# slurm-local: nothing to stop ($STATE does not exist)"
    exit 0
fi
exec 9>"$STATE/.lock"
flock -w 300 9 || die "another start.sh/stop.sh holds $STATE/.lock"

# Cancel the jobs while slurmctld still runs, so that their end reaches the accounting database.
if daemon_running slurmctld && timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
    mapfile -t jobs < <(timeout 10 squeue -h -o %A 2>/dev/null || true)
    if [ "${#jobs[@]}" -gt 0 ]; then
        log "cancelling ${#jobs[@]} job(s)"
        timeout 10 scancel "${jobs[@]}" 2>/dev/null || true
        deadline=$((SECONDS + 10))
        while [ -n "$(timeout 5 squeue -h -t R,CG -o %A 2>/dev/null)" ] && [ "$SECONDS" -lt "$deadline" ]; do
            sleep 0.3
        done
    fi
fi

stop_daemon slurmd "$RUN_DIR/slurmd.pid" 15
kill_jobs
stop_daemon slurmctld "$RUN_DIR/slurmctld.pid" 15
stop_daemon slurmdbd "$RUN_DIR/slurmdbd.pid" 15
stop_daemon mariadbd "$MYSQL_DIR/mysqld.pid" 60
stop_daemon munged "$MUNGE_DIR/munged.pid" 10
rm -f "$MUNGE_SOCKET" "$MYSQL_SOCKET"
echo "# slurm-local: stopped (state kept in $STATE)"
