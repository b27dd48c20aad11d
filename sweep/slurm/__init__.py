"""SLURM: the sbatch text, queue and accounting state, file locks, leases on (config, fold) pairs, sweep records.

May import sweep.core and sweep.tracking."""
