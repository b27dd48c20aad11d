"""One training run from a Hydra config: check everything, make the data, train, record in MLflow.

Data flow: conf/ → sweep (this module) → data/, model/ → MLflow. Every check that can fail is
done before the first training step: config fields, the dataset, the tracking server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
import typing as tp
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from data.atomic import atomic_write_json, atomic_write_text
from data.errors import DataError
from data.fingerprint import dataset_digest, samples_digest
from data.folds import split_fold
from data.manifest import MANIFEST_NAMES, load_dataset
from data.prepare import dataset_preprocessing
from model.complexity import (
    count_flops,
    count_params,
    paper_receptive_field,
    receptive_field,
)
from model.schedule import load_state
from sweep.core import trial_report
from sweep.core.errors import ConfigError
from sweep.core.fold_pruning import (
    TAG_FOLD_PRUNED,
    fold_pruning_setting,
    skip_remaining_folds,
)
from sweep.core.runplan import RunPlan, plan_run
from sweep.resources.memory import halved_tags, record_skipped
from sweep.slurm import lease, locks
from sweep.tracking import client as tracking
from sweep.tracking.cost import SystemMetrics
from sweep.tracking.offline import offline_uri
from sweep.tracking.outbox import (
    DEFAULT_END_WAIT_S,
    DEFAULT_TOLERANCE_S,
    OfflineEnding,
    Outbox,
    end_offline,
)

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
USAGE_FILE = "usage.json"  # what the run's attempts used so far (sweep.tracking.cost), beside its checkpoint
DATASET_LOCK_TIMEOUT_S = 3600.0  # making a synthetic dataset takes seconds to minutes
START_POLL_S = 15.0  # a SLURM job that starts while the tracking server is away asks it again this often
_SAVE_USAGE: tp.Optional[tp.Callable[[], None]] = None  # writes the running run's usage.json (the USR2 hook calls it)


def ensure_dataset(cfg: DictConfig) -> Path:
    """The prepared dataset (refused if data.prepare did not make it); with ``data.synthesize`` it is generated
    and prepared once (under a file lock)."""
    target = _make_dataset(cfg)
    check_dataset(cfg)
    return target


def check_dataset(cfg: DictConfig) -> None:
    """The dataset checks of :func:`ensure_dataset` without making anything (for ``sweep.plan``): a synthetic
    dataset not made yet passes, it is made and checked when the sweep starts."""
    from data.prepare import check_prepared

    target = Path(cfg.data.dataset)
    if not any((target / name).is_file() for name in MANIFEST_NAMES):
        if cfg.data.synthesize:
            return
        raise ConfigError("data.dataset", f"{target} has no manifest (prepare it with `python -m data.prepare`)")
    try:
        check_prepared(target)
    except DataError as exc:
        raise ConfigError("data.dataset", str(exc)) from None


def _make_dataset(cfg: DictConfig) -> Path:
    target = Path(cfg.data.dataset)

    def has_manifest() -> bool:
        return any((target / name).is_file() for name in MANIFEST_NAMES)

    if has_manifest():
        return target
    if not cfg.data.synthesize:
        raise ConfigError("data.dataset", f"{target} has no manifest (prepare it with `python -m data.prepare`)")
    from data.prepare import prepare_dataset
    from data.synth import main as synth_main

    target.parent.mkdir(parents=True, exist_ok=True)
    # Parallel jobs on any nodes: one makes the data, the others wait for it (a lock file, not flock: sweep.slurm.locks).
    with locks.locked(target.parent / ".lock.held", timeout_s=DATASET_LOCK_TIMEOUT_S, poll_s=1.0):
        if not has_manifest():
            raw = target.parent / "raw"
            s = cfg.data.synth
            if not (raw / "manifest.yaml").is_file():
                synth_main(["--out", str(raw), "--size", str(s.size), "--n-train", str(s.n_train), "--n-test",
                            str(s.n_test), "--seed", str(s.seed), "--voxel-size-um", str(s.voxel_size_um),
                            "--degradation-scale", str(s.get("degradation_scale", 1.0)), "--overwrite"])
            prepare_dataset(raw, target, voxel_size_um=float(cfg.data.prepare.voxel_size_um),
                            clip_percentiles=tuple(cfg.data.prepare.clip_percentiles), overwrite=True)
    return target


def process_start_time() -> float:
    """Wall-clock start of this process (Linux /proc), for the job overhead metric ``startup_s``.

    In a long-lived local worker that is the worker's start, so ``startup_s`` is only meaningful for
    the first run of a worker and for SLURM jobs (one process per run).
    """
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORT_TIME


_IMPORT_TIME = time.time()


def training_curves_png(history: tp.Sequence[dict], path: Path) -> Path:
    """Loss, validation mean IoU and learning rate against iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [h["iteration"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(it, [h["train_loss"] for h in history], label="train loss")
    ax1.plot(it, [h["val_loss"] for h in history], label="validation loss")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax2.plot(it, [h["mean_iou"] for h in history], color="C2", label="validation mean IoU")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("mean IoU")
    ax3 = ax2.twinx()
    ax3.step(it, [h["learning_rate"] for h in history], color="C3", where="post", label="learning rate")
    ax3.set_ylabel("learning rate")
    fig.legend(loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _params(cfg: DictConfig, plan: RunPlan) -> dict:
    params = tracking.flatten(OmegaConf.to_container(cfg, resolve=True))
    params = {k: v for k, v in params.items() if not k.startswith(("optuna_trial", "batch_halved"))}  # tags
    params.update({"effective.width": plan.width, "effective.input_size": plan.input_size,
                   "effective.batch_size": plan.settings.batch_size})
    return params


def _finished(plan: RunPlan, experiment_id: str) -> tp.Optional[dict[str, float]]:
    done = tracking.find_runs(plan.tracking_uri, experiment_id, config_key=plan.config_key, fold=plan.fold,
                              status="FINISHED")
    if not done:
        return None
    log.info("%s already FINISHED as MLflow run %s; skipping", plan.run_name, done[0].info.run_id)
    return {k: v for k, v in done[0].data.metrics.items()}


def _fold_pruned(cfg: DictConfig, plan: RunPlan, experiment_id: str) -> tp.Optional[dict[str, float]]:
    """Fold pruning (opt-in, sweep.core.fold_pruning): this fold is not trained when its config's finished folds are
    significantly worse than the best config's; a KILLED run tagged ``skipped_reason`` and ``fold_pruned`` says why."""
    setting = fold_pruning_setting(cfg, plan.num_folds)
    if not setting.on:
        return None
    finished: dict[str, dict[int, float]] = {}
    for (key, fold), metrics in tracking.finished_fold_runs(plan.tracking_uri, experiment_id).items():
        if "mean_iou" in metrics:
            finished.setdefault(key, {})[fold] = float(metrics["mean_iou"])
    skip = skip_remaining_folds(plan.config_key, plan.fold, finished, setting)
    if skip is None:
        return None
    log.warning("%s: not trained: %s", plan.run_name, skip.reason)
    earlier = tracking.find_runs(plan.tracking_uri, experiment_id, config_key=plan.config_key, fold=plan.fold)
    if not any(r.data.tags.get(TAG_FOLD_PRUNED) == "true" for r in earlier):  # a rerun records it once
        record_skipped(plan.tracking_uri, experiment_id, plan, skip.reason, str(cfg.get("experiment_name", "single")),
                       extra_tags={TAG_FOLD_PRUNED: "true", "fold_pruning_p": f"{skip.p:.4g}",
                                   "fold_pruning_best": skip.best_key})
    return {"mean_iou": float("nan"), "flops": plan.flops, "params": plan.params, "fold_pruned": 1.0}


def checkpoint_before_requeue(what: str = "the run") -> None:
    """submitit's USR2 hook (preemption, time-out) of a job running ``what``: save the running training, if any.

    Never raises: the job is requeued anyway, and the last chunk checkpoint is still there.
    """
    try:
        from model.training import save_active_checkpoint

        saved = save_active_checkpoint()
        log.warning("USR2: %s; requeueing %s", "checkpoint saved" if saved else "no training running", what)
    except Exception as exc:
        log.error("USR2: saving the checkpoint failed: %s", exc)
    try:
        if _SAVE_USAGE is not None:  # the requeued attempt adds to it: this attempt's time up to now is not lost
            _SAVE_USAGE()
    except Exception as exc:
        log.error("USR2: writing %s failed: %s", USAGE_FILE, exc)


@contextlib.contextmanager
def _usage_saved_on_requeue(path: Path, usage: SystemMetrics) -> tp.Iterator[None]:
    """While the block runs, the USR2 hook (:func:`checkpoint_before_requeue`) writes ``usage``'s totals to ``path``."""
    global _SAVE_USAGE
    _SAVE_USAGE = lambda: atomic_write_json(path, usage.totals())  # noqa: E731
    try:
        yield
    finally:
        _SAVE_USAGE = None


def check_offline_resume(plan: RunPlan) -> None:
    """``mlflow.offline=true`` on a run its checkpoint says was started on the server: resuming it offline would start
    an empty offline store that knows nothing of the server run (its metrics, FINISHED); refused, nothing written."""
    run_id_file = plan.ckpt_dir / RUN_ID_FILE
    store = Path(offline_uri(plan.ckpt_dir).removeprefix("sqlite:///"))
    if run_id_file.is_file() and not store.is_file():
        raise ConfigError("mlflow.offline", f"{plan.run_name} was started online (MLflow run "
                          f"{run_id_file.read_text().strip()} at mlflow.tracking_uri; checkpoint {plan.ckpt_dir}): "
                          "run it with mlflow.offline=false where the server answers")


def run(cfg: DictConfig) -> dict[str, float]:
    """Train one (config, fold), recorded as ONE MLflow run; resumes a killed run; skips a finished one."""
    t_setup = time.perf_counter()
    plan = plan_run(cfg)
    if OmegaConf.select(cfg, "mlflow.offline", default=False):
        check_offline_resume(plan)
        # A compute node without the server: this run's own store, synced later (python -m sweep.sync).
        plan = dataclasses.replace(plan, tracking_uri=offline_uri(plan.ckpt_dir))
    _check_tracking_at_start(cfg, plan.tracking_uri)
    dataset = load_dataset(ensure_dataset(cfg))
    try:
        train_samples, val_samples = split_fold(dataset, plan.fold, plan.num_folds, seed=int(cfg.data.fold_seed))
    except DataError as exc:
        raise ConfigError("data.dataset", str(exc)) from None
    experiment_id = tracking.ensure_experiment(plan.tracking_uri, plan.experiment)
    done = _finished(plan, experiment_id)
    if done is not None:
        return done
    skipped = _fold_pruned(cfg, plan, experiment_id)
    if skipped is not None:
        return skipped
    # Before the checkpoint or the MLflow run is touched: another live job may be training this pair.
    mine = lease.acquire(plan.ckpt_dir, plan.run_name)
    try:
        done = _finished(plan, experiment_id)  # the last holder may have finished it just before its lease went
        if done is not None:
            lease.release(plan.ckpt_dir, mine)
            return done
        metrics = _train(cfg, plan, experiment_id, train_samples, val_samples, t_setup, dataset)
    except Exception:
        lease.release(plan.ckpt_dir, mine)
        raise
    lease.release(plan.ckpt_dir, mine)  # not on SystemExit (USR2 requeue): the requeued job keeps its lease
    return metrics


def dataset_inputs(dataset, plan: RunPlan, train_samples, val_samples) -> list[tuple[str, str, str, dict, str]]:
    """What the run trained and validated on, as MLflow dataset inputs: the fold's sample ids, a digest of the
    prepared files (data.fingerprint), contexts training and validation."""
    digest = dataset_digest(dataset)
    name = Path(dataset.root).name
    out = []
    for context, samples in (("training", train_samples), ("validation", val_samples)):
        profile = {"fold": plan.fold, "num_folds": plan.num_folds, "dataset_digest": digest,
                   "samples": sorted(s.id for s in samples)}
        out.append((f"{name}/fold{plan.fold}/{context}", samples_digest(digest, samples), str(dataset.root), profile,
                    context))
    return out


def _train(cfg: DictConfig, plan: RunPlan, experiment_id: str, train_samples, val_samples,
           t_setup: float, dataset: tp.Any) -> dict[str, float]:
    run_id_file = plan.ckpt_dir / RUN_ID_FILE
    run_id = run_id_file.read_text().strip() if run_id_file.is_file() else None
    if run_id and load_state(plan.ckpt_dir) is None:
        # The last attempt died before its first checkpoint: nothing to resume, so its run can never finish.
        tracking.end_run(plan.tracking_uri, run_id, "KILLED")
        run_id = None
    tags = {tracking.TAG_CONFIG_KEY: plan.config_key, tracking.TAG_FOLD: str(plan.fold),
            "experiment": str(cfg.get("experiment_name", "single")), **tracking.environment_tags()}
    if cfg.get("optuna_trial"):  # set by the asynchronous Optuna slots: the run ↔ trial link in the MLflow UI
        tags.update({"optuna_study": str(cfg.optuna_trial.study), "optuna_trial": str(cfg.optuna_trial.number)})
    if cfg.get("batch_halved"):  # set by the sweep (on_oom=halve_batch): why this run trains at a smaller batch

        tags.update(halved_tags(cfg))
    recorder = tracking.RunRecorder(plan.tracking_uri, experiment_id, run_id=run_id, run_name=plan.run_name, tags=tags)
    # From here on a server outage costs nothing: what the run logs waits in order until the server answers.
    outbox = Outbox(recorder, tolerance_s=_seconds(cfg, "mlflow.outage_tolerance_s", DEFAULT_TOLERANCE_S))
    objective = pruning_objective(cfg)
    # MLflow's system metrics (CPU, memory; GPU utilisation, memory, power where GPUs exist), through the outbox.
    usage_file = plan.ckpt_dir / USAGE_FILE
    usage = SystemMetrics(_seconds(cfg, "mlflow.system_metrics_interval_s", 10.0), prior=_prior_usage(usage_file, run_id))

    def log_usage(final: bool = False) -> None:
        if final:
            usage.stop()
        for t, step, values in usage.drain():
            outbox.log_metrics(values, step=step, timestamp_ms=int(t * 1000))
        if final:
            outbox.log_metrics(usage.summary())

    def judge(value: tp.Any, iteration: int) -> None:
        # An Optuna slot's pruner (sweep.orchestration.trials): stop now, with the run's last values on the server.
        if value is None or not trial_report.active():
            return
        try:
            trial_report.report(float(value), iteration, objective)
        except trial_report.TrialPruned as pruned:
            if iteration >= plan.settings.max_iters:  # trained to the end already: stopping now saves nothing
                log.info("%s: not pruned at its last checkpoint (%s)", plan.run_name, pruned)
                return
            log.warning("%s: %s", plan.run_name, pruned)
            log_usage(final=True)
            outbox.set_tags(pruned.run_tags)
            if not outbox.wait(_seconds(cfg, "mlflow.end_wait_s", DEFAULT_END_WAIT_S)):
                # The server is away: the pruned run ends as a run that ends in an outage does, in its offline
                # store (KILLED, its pruning tags and every metric the server did not get); sweep.sync brings it in.
                _end_offline(cfg, plan, outbox, {**tags, **pruned.run_tags}, [], [], status="KILLED")
            raise

    with recorder, _usage_saved_on_requeue(usage_file, usage):
        run_id = recorder.start()
        plan.ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_id_file, run_id)
        recorder.log_params({**_params(cfg, plan), **dataset_preprocessing(dataset.samples)})
        recorder.log_dataset_inputs(dataset_inputs(dataset, plan, train_samples, val_samples))
        static = {"flops": plan.flops, "params": plan.params, "receptive_field": receptive_field(plan.depth),
                  "paper_receptive_field": paper_receptive_field(plan.depth),
                  "paper_flops": count_flops(plan.paper_width, plan.depth, plan.paper_input_size),
                  "paper_params": count_params(plan.paper_width, plan.depth)}
        outbox.log_metrics(static)

        def on_start(state, model, devices) -> None:
            from model.devices import replicas_of
            from model.training import compute_dtype

            # What trains, read from the built model, whatever the config says: its dtype and its replicas.
            outbox.set_tags({"compute_dtype": compute_dtype(model), **devices.tags,
                             "replicas": str(replicas_of(model))})
            if state.resumed_from:
                outbox.set_tags({"resumed_from_iteration": ",".join(map(str, state.resumed_from))})
                log.info("%s: resuming from iteration %d", plan.run_name, state.iteration)
                # A job killed during an outage held some validation points in memory only: state.json has them.
                # Compared with the server run at the first flush it answers (it may be away now), once.
                outbox.backfill_when_up(state.history, _chunk_metrics)
                if state.history and trial_report.active():  # judged again on its last value (reported once)
                    log.info("%s: the resumed trial is judged again at iteration %d", plan.run_name,
                             state.history[-1]["iteration"])
                    judge(state.history[-1].get(objective), state.history[-1]["iteration"])

        def on_chunk(state, metrics: dict) -> None:
            made = state.history[-1].get("time") if state.history else None
            outbox.log_metrics(_chunk_metrics(metrics), step=state.iteration,
                               timestamp_ms=int(made * 1000) if made else None)
            log_usage()
            atomic_write_json(usage_file, usage.totals())  # a requeued attempt adds to it (its cost, every attempt)
            judge(metrics.get(objective), state.iteration)

        def on_first_step() -> None:
            outbox.log_metrics({"startup_s": time.time() - process_start_time()})

        from model.training import train_fold  # TensorFlow only where training happens

        t0 = time.perf_counter()
        setup_s = t0 - t_setup
        with usage:
            result = train_fold(width=plan.width, depth=plan.depth, input_size=plan.input_size,
                                train_samples=train_samples, val_samples=val_samples, settings=plan.settings,
                                augment=plan.augment, ckpt_dir=plan.ckpt_dir, on_chunk=on_chunk, on_start=on_start,
                                on_first_step=on_first_step)
        log_usage(final=True)
        st = result.state
        final = {**{("final_val_loss" if k == "val_loss" else k): v for k, v in result.final_metrics.items()},
                 "iterations": st.iteration, "wall_time_s": st.wall_seconds,
                 "train_time_s": st.train_seconds, "best_iteration": st.best_iteration,
                 "stopped_early": float(st.stopped_early),
                 "images_per_s": st.images_seen / st.train_seconds if st.train_seconds else 0.0}
        t_log = time.perf_counter()
        artifacts: list[tuple[Path, tp.Optional[str]]] = [(Path(result.model_path), "model")]
        if st.history:
            artifacts.append((training_curves_png(st.history, plan.ckpt_dir / "training_curves.png"), None))
        texts = [(tracking.sanitize(OmegaConf.to_yaml(cfg, resolve=True), limit=None), "config.yaml")]
        offline = not outbox.wait(_seconds(cfg, "mlflow.end_wait_s", DEFAULT_END_WAIT_S))
        if not offline:
            try:
                for path, artifact_path in artifacts:
                    recorder.log_artifact(path, artifact_path)
                for text, artifact_file in texts:
                    recorder.log_text(text, artifact_file)
                # The same file once more as a LoggedModel: what MLflow 3's UI lists in the Models column.
                recorder.log_model(result.model_path, step=st.iteration,
                                   tags={tracking.TAG_CONFIG_KEY: plan.config_key, tracking.TAG_FOLD: str(plan.fold)})
            except tracking.TrackingUnavailable as exc:
                log.warning("%s: the server went away while the artifacts were uploaded: %s", plan.run_name, exc)
                offline = True
        # Where this process's time went (tracing and start-up are in first_step), for tuning sweeps.
        phases = {"setup": setup_s, **result.phases, "artifacts": time.perf_counter() - t_log}
        final.update({f"phase_{k}_s": v for k, v in phases.items()})
        outbox.log_metrics(final, step=st.iteration)
        if outbox.outages:
            outbox.set_tags(outbox.outage_tag())
        if not offline and outbox.flush(force=True):
            try:
                recorder.finish("FINISHED")
            except tracking.TrackingUnavailable as exc:
                log.warning("%s: the server went away at the run's end: %s", plan.run_name, exc)
                offline = True
        else:
            offline = True
        if offline:
            _end_offline(cfg, plan, outbox, tags, artifacts, texts)
    log.info("%s: mean IoU %.4f after %d iterations (%.0f s in this process)", plan.run_name, final["mean_iou"],
             st.iteration, time.perf_counter() - t0)
    return {**static, **final}


def _prior_usage(path: Path, run_id: tp.Optional[str]) -> tp.Optional[dict]:
    """What the earlier attempts of a resumed run used (written at each checkpoint); nothing for a new run."""
    if not run_id or not path.is_file():
        return None
    try:
        prior = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return prior if isinstance(prior, dict) else None


def pruning_objective(cfg: DictConfig) -> str:
    """The validation metric a pruner judges: the study's (single) objective, else mean IoU."""
    names = cfg.get("objectives")
    return str(names[0]) if names else "mean_iou"


def _check_tracking_at_start(cfg: DictConfig, uri: str) -> None:
    """The store is checked before anything trains. A SLURM job that starts during a server restart waits for the
    server up to ``mlflow.start_wait_s`` (its sweep was checked at submission); a command run by hand fails at once."""
    wait_s = _seconds(cfg, "mlflow.start_wait_s", 600.0) if os.environ.get("SLURM_JOB_ID") else 0.0
    deadline = time.monotonic() + wait_s
    while True:
        try:
            tracking.check_tracking_uri(uri)
            return
        except tracking.TrackingError as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("%s; waiting for it (mlflow.start_wait_s=%.0f)", exc, wait_s)
            time.sleep(min(START_POLL_S, max(0.0, deadline - time.monotonic())))


def _chunk_metrics(metrics: tp.Mapping[str, tp.Any]) -> dict[str, float]:
    """A chunk's metrics under their MLflow names (validation metrics prefixed val_), history bookkeeping left out."""
    return {(k if k in ("train_loss", "val_loss", "learning_rate", "images_per_s") else f"val_{k}"): v
            for k, v in metrics.items() if k not in ("iteration", "time")}


def _seconds(cfg: DictConfig, field: str, default: float) -> float:
    value = OmegaConf.select(cfg, field, default=default)
    return default if value is None else float(value)


def _end_offline(cfg: DictConfig, plan: RunPlan, outbox: Outbox, tags: dict, artifacts, texts,
                 status: str = "FINISHED") -> None:
    """The server is still away at the run's end: the run goes to its offline store, the job ends well."""

    store = offline_uri(plan.ckpt_dir)
    ending = OfflineEnding(params=_params(cfg, plan), tags=tags, artifacts=artifacts, texts=texts)
    local_id = end_offline(outbox, store, plan.experiment, plan.run_name, ending, status=status)
    log.warning("%s: MLflow at %s did not answer at the end of training; the run is recorded in its offline store "
                "(%s, run %s, completing server run %s): `python -m sweep.sync` or `python -m sweep.status` copies it",
                plan.run_name, tracking.redact_uri(plan.tracking_uri), f"{plan.config_key}/fold{plan.fold}/mlflow/mlflow.db",
                local_id, outbox.recorder.run_id)
