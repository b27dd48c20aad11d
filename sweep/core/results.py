"""What a job returns to its sweeper, and one line per failure for the summary."""

from __future__ import annotations

import typing as tp

from omegaconf import DictConfig


def objective_values(cfg: DictConfig, metrics: tp.Mapping[str, float]) -> tp.Any:
    """What a job returns to the sweeper: mean IoU, or the metrics named in ``objectives`` (Optuna)."""
    names = cfg.get("objectives")
    if not names:
        return float(metrics["mean_iou"])
    return [float(metrics[str(n)]) for n in names]


def failure_reason(exc: BaseException, limit: int = 600) -> str:
    """One line per failure for the summary: the exception type and the end of its message."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[-limit:]}"
