"""``hydra/sweeper=optuna_async``: Optuna without a batch barrier (sweep.trials), on our two launchers.

The same settings as hydra-optuna-sweeper (sampler, direction, storage, study_name, n_trials, n_jobs,
params, max_failure_rate), but ``n_jobs`` is the number of worker slots that each pull the next trial
as soon as their last one ended, instead of a batch size that waits for its slowest trial.
On ``hydra/launcher=slurm_v100`` the slots are ONE SLURM job array of ``n_jobs`` tasks, each requeued on
preemption with its trial; on the local pool they are ``n_jobs`` processes. ``n_trials`` counts every
trial the study holds, so rerunning the command resumes a half-done study instead of adding trials.
"""

import dataclasses
import itertools
import logging
import math
import sys
import time
import typing as tp
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclasses.dataclass
class AsyncOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.scaling_unet.optuna_async.AsyncOptunaSweeper"
    _recursive_: bool = False  # the sampler stays a config: each worker builds its own, with its own seed
    poll_interval_s: float = 10.0  # how often a slot looks again at a trial that another slot runs with the same params
    lease_wait_s: float = 600.0  # how long it waits for that trial, then gives its duplicate up (FAIL) and asks again
    # An Optuna pruner as a _target_ node, like the sampler (conf/hydra/sweeper/pruner/: asha, hyperband, median,
    # wilcoxon); each trial reports its validation objective at every checkpoint. Single-objective studies only.
    pruner: tp.Any = None


ConfigStore.instance().store(group="hydra/sweeper", name="optuna_async", node=AsyncOptunaSweeperConf,
                             provider="scaling_unet")

CHECK_LIMIT = 1024  # configs composed and checked before any trial runs (every categorical combination up to this)


class AsyncOptunaSweeper(Sweeper):
    def __init__(self, sampler: tp.Any, direction: tp.Any, storage: tp.Optional[str], study_name: tp.Optional[str],
                 n_trials: int, n_jobs: int, max_failure_rate: float, search_space: tp.Any = None,
                 custom_search_space: tp.Optional[str] = None, params: tp.Any = None,
                 poll_interval_s: float = 10.0, lease_wait_s: float = 600.0, pruner: tp.Any = None) -> None:
        if search_space or custom_search_space:
            raise ValueError("hydra.sweeper: search_space and custom_search_space are not supported by optuna_async; "
                             "use hydra.sweeper.params")
        self.sampler_cfg = sampler
        self.direction = direction
        self.storage = storage
        self.study_name = study_name
        self.n_trials = n_trials  # checked in sweep(): one error line, exit 2
        self.n_jobs = n_jobs
        self.max_failure_rate = max_failure_rate
        self.params = params
        self.poll_interval_s = float(poll_interval_s)
        self.lease_wait_s = float(lease_wait_s)
        self.pruner_cfg = pruner

    def _check_settings(self) -> tp.Optional[str]:
        """The sweeper's numbers, checked before anything is written; the problem in one line, or None."""
        for name in ("n_trials", "n_jobs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                return f"hydra.sweeper.{name}: must be an integer >= 1, got {value!r}"
        rate = self.max_failure_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            return f"hydra.sweeper.max_failure_rate: must be a number in [0, 1], got {rate!r}"
        for name in ("poll_interval_s", "lease_wait_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                return f"hydra.sweeper.{name}: must be a finite number of seconds >= 0, got {value}"
        return None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)
        self.wait = bool(getattr(self.launcher, "wait", True))  # hydra.launcher.wait=false: start the slots and exit

    def _directions(self) -> list[str]:
        d = self.direction
        d = list(d) if isinstance(d, (list, tuple)) or OmegaConf.is_list(d) else [d]
        return [str(getattr(x, "name", x)) for x in d]

    def _search_space(self, arguments: tp.Sequence[str]) -> tuple[dict, dict]:
        import warnings

        from hydra_plugins.hydra_optuna_sweeper._impl import (
            create_params_from_overrides,
        )
        from optuna.distributions import (
            _convert_old_distribution_to_new_distribution as to_new,
        )

        conf = [f"{k!s}={v}" for k, v in (self.params or {}).items()] + list(arguments)
        with warnings.catch_warnings():  # hydra-optuna-sweeper builds Optuna 2's distribution classes
            warnings.simplefilter("ignore", FutureWarning)
            distributions, fixed = create_params_from_overrides(conf)
            distributions = {k: to_new(v) for k, v in distributions.items() if k not in fixed}
        return distributions, fixed

    def _check(self, distributions: dict, fixed: dict) -> DictConfig:
        """Compose and check every categorical combination (continuous parameters at their low end) before
        any slot starts: a bad config, dataset or tracking server is one error line, not N failed workers."""
        from hydra_plugins.scaling_unet.pool import sweep_dir
        from sweep.core.compose import compose_jobs
        from sweep.orchestration.prepare import prepare_sweep_or_exit

        names = list(distributions)
        axes = [list(getattr(distributions[n], "choices", None) or [distributions[n].low]) for n in names]
        combos = list(itertools.islice(itertools.product(*axes), CHECK_LIMIT))
        overrides = [[f"{n}={v}" for n, v in zip(names, combo)] + [f"{k}={v}" for k, v in fixed.items()]
                     for combo in combos]
        composed = compose_jobs(self.hydra_context.config_loader, self.config, overrides)
        prepare_sweep_or_exit(composed)
        sweep_dir(self.config)
        log.info("optuna_async: checked %d configs (every categorical combination%s)", len(combos),
                 f", the first {CHECK_LIMIT}" if len(combos) == CHECK_LIMIT else "")
        return composed[0][2]

    def sweep(self, arguments: tp.List[str]) -> None:
        import optuna
        from hydra.core.singleton import Singleton

        from hydra_plugins.scaling_unet.pool import PoolLauncher
        from hydra_plugins.scaling_unet.slurm_array import SlurmArrayLauncher
        from sweep.orchestration import trials

        problem = self._check_settings()
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            raise SystemExit(2)
        self.max_failure_rate = float(self.max_failure_rate)
        distributions, fixed = self._search_space(arguments)
        directions = self._directions()
        study_name = self.study_name or "scaling-unet"
        try:  # before anything is written
            storage = trials.check_storage(
                self.storage or f"journal:{Path(str(self.config.paths.work)) / 'optuna' / (study_name + '.journal')}")
            pruner = self._pruner(directions)
        except trials.StudyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        cfg0 = self._check(distributions, fixed)
        study = optuna.create_study(study_name=study_name, storage=trials.open_storage(storage),
                                    directions=directions, load_if_exists=True, pruner=trials.make_pruner(
                                        pruner, len(directions)))
        if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in directions]:
            print(f"error: hydra.sweeper.direction: study {study_name!r} in {storage} was created with "
                  f"{[d.name.lower() for d in study.directions]}, not {directions}; choose another study_name",
                  file=sys.stderr)
            raise SystemExit(2)
        have = len(study.get_trials(deepcopy=False))
        n_slots = max(1, min(self.n_jobs, max(1, self.n_trials - have) + self._running(study)))
        spec = trials.StudySpec(study_name=study_name, storage=str(storage), directions=directions,
                                n_trials=self.n_trials, n_slots=n_slots, distributions=distributions,
                                fixed_params=fixed, sampler=self.sampler_cfg,
                                folder=str(trials.study_folder(Path(str(cfg0.paths.work)), study_name)),
                                max_failure_rate=self.max_failure_rate, poll_interval_s=self.poll_interval_s,
                                lease_wait_s=self.lease_wait_s, pruner=pruner)
        if pruner is not None:
            log.info("pruner: %s; every trial reports its validation %s at each checkpoint", pruner["_target_"],
                     (self.config.get("objectives") or ["mean_iou"])[0])
            every, cap = OmegaConf.select(cfg0, "train.checkpoint_every"), OmegaConf.select(cfg0, "train.max_iters")
            if isinstance(every, int) and isinstance(cap, int) and every >= cap:
                log.warning("pruner: one validation per trial (train.checkpoint_every=%d, train.max_iters=%d): no "
                            "trial can be stopped early; more checkpoints give the pruner rungs", every, cap)
        log.info("study %s (%s): %d of %d trials exist; %d worker slots, each asks for its next trial when its "
                 "last one ends (no batches)", study_name, storage, have, self.n_trials, n_slots)
        worker = trials.TrialWorker(self.hydra_context, self.config, self.task_function, [], spec,
                                    Singleton.get_state())
        if isinstance(self.launcher, SlurmArrayLauncher):
            self._on_slurm(worker, spec)
        elif isinstance(self.launcher, PoolLauncher):
            self._local(worker, spec)
        else:
            print(f"error: hydra/sweeper=optuna_async runs on hydra/launcher=local or slurm_v100, not "
                  f"{type(self.launcher).__name__}", file=sys.stderr)
            raise SystemExit(2)
        if self.wait:
            self._report(study, spec)

    def _pruner(self, directions: list[str]) -> tp.Optional[dict]:
        """``hydra.sweeper.pruner`` resolved to a plain node (the slots get it pickled), checked by building it once."""
        from sweep.orchestration import trials

        if self.pruner_cfg is None:
            return None
        try:
            node = OmegaConf.to_container(self.pruner_cfg, resolve=True) if OmegaConf.is_config(self.pruner_cfg) \
                else dict(self.pruner_cfg)
        except Exception as exc:  # noqa: BLE001 - an interpolation that does not resolve
            raise trials.StudyError(f"hydra.sweeper.pruner: {' '.join(str(exc).split())[:300]}") from None
        if not isinstance(node, dict) or "_target_" not in node:
            raise trials.StudyError(f"hydra.sweeper.pruner: expected a node with _target_ (e.g. "
                                    f"+hydra/sweeper/pruner=asha), got {node!r}")
        trials.make_pruner(node, len(directions))
        return node

    @staticmethod
    def _running(study) -> int:
        import optuna

        return sum(t.state == optuna.trial.TrialState.RUNNING for t in study.get_trials(deepcopy=False))

    def _on_slurm(self, worker, spec) -> None:
        from sweep.orchestration import trials

        executor = self.launcher.executor()
        executor.update_parameters(slurm_array_parallelism=spec.n_slots)
        jobs = executor.map_array(worker, list(range(spec.n_slots)))
        array_id = jobs[0].job_id.split("_")[0]
        record = trials.write_record(spec, array_ids=[array_id])
        log.info("started %d worker slots as ONE SLURM job array %s; study record %s\n"
                 "  follow:  python -m sweep.trials %s\n  cancel:  scancel %s",
                 spec.n_slots, array_id, record, spec.folder, array_id)
        if not self.wait:
            return
        pending = list(jobs)
        while pending:
            pending[0].watcher.update()
            for job in [j for j in pending if j.done()]:
                pending.remove(job)
                try:
                    log.info("worker %s ended: %s", job.job_id, job.results()[0])
                except Exception as exc:  # cancelled, or out of requeues: its RUNNING trial is adopted on a rerun
                    log.error("worker %s FAILED: %s", job.job_id, " ".join(str(exc).split())[-600:])
            if pending:
                time.sleep(self.launcher.poll_interval_s)

    def _local(self, worker, spec) -> None:
        import concurrent.futures as cf
        import multiprocessing
        import os

        import cloudpickle

        from hydra_plugins.scaling_unet.pool import init_worker
        from sweep.orchestration import trials

        trials.write_record(spec)
        threads = self.launcher.threads_per_worker or max(1, (os.cpu_count() or 1) // spec.n_slots)
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(spec.n_slots, mp_context=ctx, initializer=init_worker,
                                    initargs=(threads,)) as pool:
            futures = [pool.submit(_run_slot, cloudpickle.dumps((worker, slot))) for slot in range(spec.n_slots)]
            for fut in cf.as_completed(futures):
                try:
                    log.info("worker ended: %s", fut.result())
                except Exception as exc:  # a dead process: a rerun adopts its RUNNING trial
                    log.error("worker FAILED: %s: %s", type(exc).__name__, exc)

    def _report(self, study, spec) -> None:
        """Pareto front or best trial (as hydra-optuna-sweeper writes them) and the idle slot-time."""
        import optuna

        from sweep.orchestration import trials

        trials_ = study.get_trials(deepcopy=False)
        states = {s.name: sum(t.state == s for t in trials_) for s in optuna.trial.TrialState}
        log.info("study %s: %s", spec.study_name, ", ".join(f"{v} {k}" for k, v in states.items() if v))
        complete = [t for t in trials_ if t.state == optuna.trial.TrialState.COMPLETE]
        if not complete:
            log.error("no trial COMPLETED")
            results: dict = {"name": "optuna", "solutions": []}
        elif len(spec.directions) < 2:
            best = study.best_trial
            results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
            log.info("Best parameters: %s", best.params)
            log.info("Best value: %s", best.value)
        else:
            front = study.best_trials
            results = {"name": "optuna", "solutions": [{"params": t.params, "values": t.values} for t in front]}
            log.info("Number of Pareto solutions: %d", len(front))
            for t in front:
                log.info("    Values: %s, Params: %s", t.values, t.params)
        idle = trials.idle_share(trials.trial_intervals(trials.read_timelines(spec.path)), spec.n_slots)
        results["idle_slot_time"] = {k: float(v) for k, v in idle.items()}
        log.info("idle slot-time: %s", trials.format_idle(idle))
        OmegaConf.save(OmegaConf.create(results), f"{self.config.hydra.sweep.dir}/optimization_results.yaml")


def _run_slot(payload: bytes) -> dict:
    import cloudpickle

    worker, slot = cloudpickle.loads(payload)
    return worker(slot)
