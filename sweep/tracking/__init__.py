"""MLflow: the store checks, the run recorder, the outbox, offline stores and their sync, parent runs.

May import sweep.core (and model/, data/)."""
