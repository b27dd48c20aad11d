"""Hyperparameter sweeps, SLURM launching and MLflow tracking for the scaling-U-net experiments."""
