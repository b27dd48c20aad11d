#!/usr/bin/env bash
# Install the Debian packages for a single-node SLURM cluster with accounting (slurmctld, slurmd,
# slurmdbd, munge, MariaDB) and PostgreSQL for the tests' MLflow server (slurm/postgres.sh). Idempotent: a fast no-op when everything is already installed.
set -euo pipefail

PACKAGES=(slurm-wlm slurm-client slurmdbd munge mariadb-server postgresql)  # postgresql: the tests' MLflow server
# Binaries that prove the packages are present (checked first: cheaper than dpkg-query).
BINARIES=(slurmctld slurmd slurmdbd sbatch sacct sacctmgr munged mariadbd mariadb-install-db pg_ctlcluster)

missing_bins=0
for b in "${BINARIES[@]}"; do
    if ! command -v "$b" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$b" ] && [ ! -x "/usr/bin/$b" ]; then
        missing_bins=1
        break
    fi
done

missing=()
if [ "$missing_bins" = 1 ]; then
    for p in "${PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$p")
        fi
    done
fi

if [ "$missing_bins" = 0 ] || [ "${#missing[@]}" = 0 ]; then
    echo "slurm/install.sh: already installed (${PACKAGES[*]})"
    exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "slurm/install.sh: need root or sudo to install ${missing[*]}" >&2; exit 1; }
    SUDO="sudo"
fi

echo "slurm/install.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Package post-install scripts try to start services; without systemd/init that fails or hangs.
# A policy-rc.d that denies every start keeps the install quiet; start.sh starts the daemons itself.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then $SUDO rm -f "$policy"; fi; }
trap cleanup EXIT

$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
echo "slurm/install.sh: installed ${PACKAGES[*]}"
