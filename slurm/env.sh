# shellcheck shell=sh
# Source this file to use the local SLURM cluster of slurm/start.sh from the current shell:
#     . slurm/env.sh        (bash, zsh, sh; honours SLURM_LOCAL_DIR like start.sh)
# The SLURM client commands (sbatch, squeue, sacct, ...) are in /usr/bin already; only SLURM_CONF
# is needed. The munge socket and the slurmdbd port are named inside slurm.conf.
SLURM_CONF="${SLURM_LOCAL_DIR:-/tmp/scaling-unet-slurm}/slurm.conf"
export SLURM_CONF
if [ ! -f "$SLURM_CONF" ]; then
    echo "slurm/env.sh: $SLURM_CONF does not exist yet: run slurm/start.sh (as root) first" >&2
fi
