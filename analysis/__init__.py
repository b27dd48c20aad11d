"""analysis: the paper's Fig. 3 scaling curves, Table 2, Table 3, the Pareto front and the missing-run report,
rebuilt from the runs in MLflow (read-only)."""
