"""Compose a sweep's job configs once per distinct choice of config groups, not once per job.

Jobs of a grid differ only in plain values (``model.width=64``, ``fold=2``): those are applied to a
copy of the composed config with Hydra's own override code, which is what a full composition does
last anyway. Composing all 192 compound jobs in full took ~25 s on the login node; this takes ~1 s.
"""

from __future__ import annotations

import copy
import typing as tp

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, open_dict


def compose_jobs(loader, master_config: DictConfig, job_overrides: tp.Sequence[tp.Sequence[str]],
                 initial_job_idx: int = 0) -> list[tuple[int, list[str], DictConfig]]:
    """(index, overrides, config) of every job; ``loader``: Hydra's config loader, ``master_config``: the
    multirun's config (its ``hydra.overrides.hydra`` apply to every job, as in ``load_sweep_config``)."""
    parser = OverridesParser.create()
    groups_known: dict[str, bool] = {}

    def is_group(o) -> bool:
        key = o.key_or_group
        if key not in groups_known:
            groups_known[key] = o.package is not None or "/" in key or loader.repository.group_exists(key)
        return groups_known[key]

    composed: dict[tuple, DictConfig] = {}
    out = []
    for i, job in enumerate(job_overrides):
        parsed = parser.parse_overrides(list(job))
        groups = tuple(o.input_line for o in parsed if is_group(o))
        base = composed.get(groups)
        if base is None:
            base = composed[groups] = loader.load_sweep_config(master_config, list(groups))
        cfg = copy.deepcopy(base)
        with open_dict(cfg):
            loader._apply_overrides_to_config([o for o in parsed if not is_group(o)], cfg)
            cfg.hydra.overrides.task = list(job)
        out.append((initial_job_idx + i, list(job), cfg))
    return out
