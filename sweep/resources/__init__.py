"""What a run needs: GPU memory (on_oom), time groups of a SLURM sweep, the stand-in rule.

May import sweep.core, sweep.tracking (and model/)."""
