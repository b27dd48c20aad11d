"""What one job does: train one (config, fold), the fusing methods of Table 2.

May import sweep.core, sweep.tracking, sweep.slurm, sweep.resources (and model/, data/)."""
