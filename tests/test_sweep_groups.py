"""Resources per config: runs grouped into a few arrays by predicted time (sweep.resources.groups), and the job
configs composed once per config-group choice (sweep.core.compose) equal to Hydra's full composition."""

from __future__ import annotations

import itertools

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from sweep.core.compose import compose_jobs
from sweep.resources.groups import group_by_time, share_parallelism, time_limit_min
from sweep.orchestration.planning import CONF_DIR


def test_groups_minimise_reserved_time_longest_first_with_their_own_limits():
    # 65× apart in cost, as the compound grid: 6 long, 6 medium, 12 short runs (seconds).
    pred = [65 * 3600.0] * 6 + [10 * 3600.0] * 6 + [3600.0] * 12
    items = list(range(len(pred)))
    groups = group_by_time(items, pred, 3, factor=2.0, margin_min=30, cap_min=48 * 60)
    assert [len(g.items) for g in groups] == [6, 6, 12]
    assert [g.time_min for g in groups] == [48 * 60, 1230, 150]  # 2× predicted + 30 min, capped at 48 h
    assert all(g.predicted_s == sorted(g.predicted_s, reverse=True) for g in groups)
    reserved = sum(g.time_min * len(g.items) for g in groups)
    one = group_by_time(items, pred, 1, factor=2.0, margin_min=30, cap_min=48 * 60)
    assert len(one) == 1 and one[0].time_min == 48 * 60 and reserved < 0.45 * one[0].time_min * len(items)
    # Equal predictions never split: one array, no matter how many groups are allowed.
    assert len(group_by_time(items, [60.0] * len(items), 3, factor=2.0, margin_min=30, cap_min=600)) == 1


def test_time_limit_leaves_room_for_the_usr2_signal_and_never_exceeds_the_cap():
    assert time_limit_min(1.0, 2.0, 0.0, 600, floor_min=10) == 10
    assert time_limit_min(10 * 3600.0, 2.0, 30.0, 600) == 600


def test_parallelism_is_shared_by_predicted_work_and_sums_to_the_launchers():
    pred = [65 * 3600.0] * 6 + [10 * 3600.0] * 6 + [3600.0] * 12
    groups = group_by_time(list(range(24)), pred, 3, factor=2.0, margin_min=30, cap_min=48 * 60)
    share_parallelism(groups, 8)
    assert sum(g.parallelism for g in groups) == 8 and all(g.parallelism >= 1 for g in groups)
    assert groups[0].parallelism == max(g.parallelism for g in groups)


def test_composing_once_per_group_choice_equals_hydras_full_composition(tmp_path):
    GlobalHydra.instance().clear()
    jobs = [["+experiment=compound", "hydra/launcher=slurm_v100", f"paths.work={tmp_path}", "hydra.launcher.mem_gb=7",
             f"model.width={w}", f"model.depth={d}", f"model.input_size={s}", f"fold={f}", "train.learning_rate=1e-3"]
            for w, d, s, f in itertools.islice(itertools.product((32, 112), (3, 6), (384, 640), (0, 3)), 12)]
    jobs.append(["+experiment=depth", "profile=paper", f"paths.work={tmp_path}", "model.depth=4", "fold=1"])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        master = compose("config", return_hydra_config=True)
        loader = GlobalHydra.instance().config_loader()
        fast = compose_jobs(loader, master, jobs)
        for (_, overrides, cfg), job in zip(fast, jobs):
            full = loader.load_sweep_config(master, job)
            assert overrides == job
            user = lambda c: OmegaConf.to_container(OmegaConf.masked_copy(c, [k for k in c if k != "hydra"]),  # noqa: E731
                                                    resolve=True)
            assert user(cfg) == user(full)
            # Unresolved: submitit_folder is ${hydra.sweep.dir}/..., and the sweep dir holds ${now:...}, which
            # resolves to the second it is read (two reads can straddle a second).
            same = OmegaConf.to_container(cfg.hydra.launcher) == OmegaConf.to_container(full.hydra.launcher)
            assert same and list(cfg.hydra.overrides.task) == job
    GlobalHydra.instance().clear()
