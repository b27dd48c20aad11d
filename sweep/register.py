"""``python -m sweep.register``: the chosen config's fold models as ONE new version in MLflow's Model Registry.

Config: conf/register.yaml (the training config plus ``model_uri`` and ``register.*``), so the overrides that named
the training sweep name its experiment here too. ``model_uri=best`` (default) or a 12-hex config key; the version
holds ``model/fold<k>.keras`` (one per fold), is tagged (config key, folds, mean IoU ± SE, FLOPs, parameters, the
training experiment and fold run ids) and gets the alias ``register.alias`` (default ``best``). Running it again for
the same config registers nothing new. See sweep/jobs/registry.py and docs/prediction.md.

    python -m sweep.register mlflow=server mlflow.tracking_uri=http://mlflow-host:5000
    python -m model.predict models:/scaling-unet@best scan.h5 --out seg.h5 --tracking-uri http://mlflow-host:5000
"""

from __future__ import annotations

import os
import sys

# MLflow's HTTP layer retries for minutes on its own; ours (sweep.tracking) retries and then fails loudly.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

import hydra
from omegaconf import DictConfig

from sweep.jobs.registry import register
from sweep.tracking.store import TrackingError, redact_uri


@hydra.main(version_base="1.3", config_path="../conf", config_name="register")
def main(cfg: DictConfig) -> None:
    try:
        done = register(cfg)
    except (ValueError, TrackingError) as exc:
        print(f"error: {' '.join(redact_uri(str(exc)).split())}", file=sys.stderr)  # one line, no credentials
        sys.exit(2)
    ens = done.ensemble
    se = f" ± {ens.se_iou:.4f}" if ens.se_iou is not None else ""
    what = "registered" if done.new else "already registered (nothing new)"
    alias = f", alias {done.alias}: models:/{done.name}@{done.alias}" if done.alias else ""
    print(f"{done.uri}: {what}: config {ens.config_key}, {len(ens.folds)} folds, mean IoU {ens.mean_iou:.4f}{se}"
          f"{alias}")


if __name__ == "__main__":
    main()
