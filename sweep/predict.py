"""``python -m sweep.predict``: whole-volume prediction of one or many volumes, locally or on SLURM.

Config: conf/predict.yaml. With the local launcher (default) the volumes are predicted one after
the other on this machine (model.predict.run_prediction). With ``hydra/launcher=slurm_v100`` the
plane tasks of all volumes go to SLURM as ONE job array (one task per (volume, plane), each on a
GPU node with the launcher's resources, requeued with its finished planes kept on preemption),
and each volume gets a CPU fuse job that starts only when all its plane tasks succeeded
(``--dependency=afterok:…``; ``--kill-on-invalid-dep=yes`` removes it if one failed).

    python -m sweep.predict model_uri=runs:/<run id>/model 'volumes=[scan1.h5,scan2.h5]' planes=9
    python -m sweep.predict model_uri=best.keras 'volumes=[scan1.h5]' hydra/launcher=slurm_v100 \\
        hydra.launcher.partition=gpu
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import time
import typing as tp
from pathlib import Path


import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from data.errors import DataError
from data.volume import volume_ref
from sweep.jobs.registry import Settings, choose_fold_ensemble
from sweep.tracking import client as tracking

log = logging.getLogger("sweep.predict")


@dataclasses.dataclass(frozen=True)
class VolumeJob:
    """One volume to segment: where it is, where its labels and plane files go."""

    volume: str
    dataset: str
    out: Path
    work_dir: Path


def plan_volumes(cfg: DictConfig) -> list[VolumeJob]:
    """Check the settings and name each volume's outputs; raises ValueError naming the field."""
    from model.fusion import VOTES
    from model.inference import plane_set

    vols = OmegaConf.select(cfg, "volumes")
    if vols in (None, "???") or (not isinstance(vols, str) and len(vols) == 0):
        raise ValueError("volumes: give one or more volumes, e.g. 'volumes=[scan1.h5,scan2.h5]'")
    if isinstance(vols, str):
        vols = [vols]
    if OmegaConf.select(cfg, "model_uri") in (None, "???") or (OmegaConf.is_list(cfg.model_uri)
                                                               and not len(cfg.model_uri)):
        raise ValueError("model_uri: give a .keras file, runs:/<run id>/model, models:/<name>/<version>, best or a "
                         "config key, or a list of models (an ensemble)")
    try:
        plane_set(str(cfg.planes))
    except ValueError as exc:
        raise ValueError(f"planes: {exc}") from None
    if cfg.vote not in VOTES:
        raise ValueError(f"vote: must be one of {VOTES}, got {cfg.vote!r}")
    if cfg.get("fold_vote", "soft") not in VOTES:
        raise ValueError(f"fold_vote: must be one of {VOTES}, got {cfg.fold_vote!r}")
    from model.predict import PredictError, parse_batch_size
    from model.resident import FUSE_ON
    from model.validation import PRECISIONS

    try:
        parse_batch_size(cfg.get("batch_size", "auto"))
    except PredictError as exc:
        raise ValueError(str(exc).replace("--batch-size", "batch_size")) from None
    if str(cfg.get("fuse_on", "auto")) not in FUSE_ON:
        raise ValueError(f"fuse_on: must be one of {FUSE_ON}, got {cfg.fuse_on!r}")
    if str(cfg.get("precision", "auto")) not in PRECISIONS:
        raise ValueError(f"precision: must be one of {PRECISIONS}, got {cfg.precision!r}")
    out_dir = Path(str(cfg.out_dir)).resolve()  # jobs may start in another folder
    stems = [Path(str(v)).stem or Path(str(v)).name for v in vols]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ValueError(f"volumes: several volumes would write {out_dir}/{dup[0]}.h5; give them distinct names")
    from model.predict import default_work_dir

    return [VolumeJob(str(Path(str(v)).resolve()), str(cfg.dataset), out_dir / f"{s}.h5", default_work_dir(out_dir / f"{s}.h5"))
            for v, s in zip(vols, stems)]


def model_specs(cfg: DictConfig) -> list[str]:
    """``model_uri``: one model, or a list of them (e.g. the 4 fold models: predicted as one ensemble)."""
    uri = cfg.model_uri
    return [str(u) for u in uri] if OmegaConf.is_list(uri) else [str(uri)]


CONFIG_KEY_RE = re.compile(r"^[0-9a-f]{12}$")


def resolve_models(cfg: DictConfig) -> list[str]:
    """``model_uri=best`` (the config with the highest mean IoU over all folds FINISHED in ``mlflow.experiment``,
    as ``fusing.model=best``) or a 12-hex config key → the ``runs:/<id>/model`` of each of its fold runs: the fold
    ensemble, chosen as ``python -m sweep.register`` chooses it (every one of ``data.num_folds`` folds FINISHED; a
    missing store or experiment is refused, not created). Anything else is returned as given. ValueError naming
    ``model_uri`` or the field when nothing is found."""
    specs = model_specs(cfg)
    if len(specs) != 1 or not (specs[0] == "best" or CONFIG_KEY_RE.match(specs[0])):
        return specs
    folds = OmegaConf.select(cfg, "data.num_folds", default=4)
    settings = Settings(str(cfg.mlflow.tracking_uri), str(cfg.mlflow.experiment), specs[0],
                        folds if isinstance(folds, int) and folds > 0 else 4, name="", alias=None)
    ensemble = choose_fold_ensemble(settings)
    return [f"runs:/{f.run_id}/model" for f in ensemble.folds]


def _check_all(cfg: DictConfig, jobs: tp.Sequence[VolumeJob]) -> tuple:
    """The model and every volume and output checked before any job is queued (model.predict's checks).

    Returns the loaded (model, identity), so the local path does not load it again.
    """
    from model.inference import plane_set
    from model.predict import PredictError, check_inputs, load_models, parse_size

    errors, model = [], None
    try:
        model = load_models(model_specs(cfg), tracking_uri=cfg.get("tracking_uri"))  # class count, loadable
    except PredictError as exc:
        errors.append(f"  {exc}")
    for j in jobs:
        try:
            check_inputs(volume_ref(j.volume, j.dataset), j.out, planes=plane_set(str(cfg.planes)),
                         overwrite=bool(cfg.overwrite), probabilities=bool(cfg.probabilities),
                         tiff=j.out.with_suffix(".tif") if cfg.tiff else None, work_dir=j.work_dir,
                         uncertainty=bool(cfg.get("uncertainty", False)),
                         max_disk=None if cfg.get("max_disk") is None else parse_size(str(cfg.max_disk)))
        except (ValueError, DataError) as exc:
            errors.append(f"  {j.volume}: {exc}")
    if errors:
        raise ValueError("nothing was queued:\n" + "\n".join(errors))
    return model


def _predict_kwargs(cfg: DictConfig, job: VolumeJob) -> dict:
    from model.predict import parse_size

    return dict(planes=str(cfg.planes), vote=str(cfg.vote), probabilities=bool(cfg.probabilities),
                tiff=job.out.with_suffix(".tif") if cfg.tiff else None, overwrite=bool(cfg.overwrite),
                work_dir=job.work_dir, batch_size=cfg.get("batch_size", "auto"), tracking_uri=cfg.get("tracking_uri"),
                values_checked=True,  # _check_all scanned every volume before anything ran
                progress=bool(cfg.progress), uncertainty=bool(cfg.get("uncertainty", False)),
                workers=cfg.get("workers"), rotate_on=str(cfg.get("rotate_on", "auto")),
                max_disk=None if cfg.get("max_disk") is None else parse_size(str(cfg.max_disk)),
                fold_vote=str(cfg.get("fold_vote", "soft")), precision=str(cfg.get("precision", "auto")))


class PlaneTask:
    """One array task: one plane of one volume. On USR2 submitit requeues it; finished planes are reused."""

    def __call__(self, model: tp.Union[str, list], volume: str, dataset: str, out: str, plane: str,
                 kwargs: dict) -> str:
        from model.predict import run_prediction

        return str(run_prediction(model, volume_ref(volume, dataset), Path(out), only_plane=plane, **kwargs))

    def checkpoint(self, *args: tp.Any, **kwargs: tp.Any):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def fuse_task(volume: str, dataset: str, out: str, kwargs: dict) -> str:
    """The fuse job of one volume: plane files → labels (no GPU)."""
    from model.predict import run_prediction

    return str(run_prediction("", volume_ref(volume, dataset), Path(out), fuse_only=True, **kwargs))


def _on_slurm() -> tp.Optional[DictConfig]:
    launcher = HydraConfig.get().launcher
    return launcher if str(launcher.get("_target_", "")).endswith("SlurmArrayLauncher") else None


def submit_slurm(cfg: DictConfig, launcher_cfg: DictConfig, jobs: tp.Sequence[VolumeJob]) -> tuple[list, list]:
    """ONE array of plane tasks + one dependent fuse job per volume; returns (plane jobs, fuse jobs)."""
    from hydra.utils import instantiate

    from model.inference import plane_set

    params = OmegaConf.to_container(launcher_cfg, resolve=True)
    params.pop("_target_")
    launcher = instantiate({"_target_": launcher_cfg._target_, **params})
    folder = str(Path(str(cfg.out_dir)).resolve() / ".submitit" / "%j")
    executor = launcher.executor(folder=folder)
    executor.update_parameters(name=f"{params.get('name', 'scaling-unet')}-planes")
    planes = plane_set(str(cfg.planes))
    task = PlaneTask()
    args = [(model_specs(cfg), j.volume, j.dataset, str(j.out), p, _predict_kwargs(cfg, j)) for j in jobs for p in planes]
    plane_jobs = executor.map_array(task, *zip(*args))
    log.info("submitted %d plane tasks (%d volumes × %d planes) as ONE SLURM job array %s", len(plane_jobs), len(jobs),
             len(planes), plane_jobs[0].job_id.split("_")[0])
    fuse = launcher.executor(folder=folder)
    fuse_jobs = []
    for i, j in enumerate(jobs):
        mine = plane_jobs[i * len(planes):(i + 1) * len(planes)]
        extra = dict(params.get("additional_parameters") or {})
        extra.update({"dependency": "afterok:" + ":".join(pj.job_id for pj in mine), "kill_on_invalid_dep": "yes"})
        fuse._executor.parameters.pop("gpus_per_node", None)  # fusing needs no GPU; None would keep the 4
        fuse.update_parameters(name=f"{params.get('name', 'scaling-unet')}-fuse",
                               cpus_per_task=int(cfg.fuse.cpus), mem_gb=int(cfg.fuse.mem_gb),
                               timeout_min=int(cfg.fuse.timeout_min), slurm_additional_parameters=extra)
        fj = fuse.submit(fuse_task, j.volume, j.dataset, str(j.out), _predict_kwargs(cfg, j))
        log.info("fuse job %s for %s waits for its %d plane tasks", fj.job_id, j.volume, len(mine))
        fuse_jobs.append(fj)
    return list(plane_jobs), fuse_jobs


def wait_for(fuse_jobs: tp.Sequence, jobs: tp.Sequence[VolumeJob], poll_s: float) -> int:
    """Wait for the fuse jobs; report each volume; number of volumes that failed."""
    pending = dict(zip(fuse_jobs, jobs))
    failed = 0
    while pending:
        fuse_jobs[0].watcher.update()
        for fj in list(pending):
            if not fj.done():
                continue
            j = pending.pop(fj)
            try:
                log.info("%s: wrote %s", j.volume, fj.result())
            except Exception as exc:  # a failed plane task cancels its fuse job (kill-on-invalid-dep)
                failed += 1
                log.error("%s: FAILED (fuse job %s, state %s): %s", j.volume, fj.job_id, fj.state,
                          " ".join(str(exc).split())[-400:])
        if pending:
            time.sleep(poll_s)
    return failed


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    try:
        jobs = plan_volumes(cfg)
        resolved = resolve_models(cfg)
        if resolved != model_specs(cfg):
            log.info("model_uri=%s: %s", cfg.model_uri, " ".join(resolved))
            with open_dict(cfg):
                cfg.model_uri = resolved
        model = _check_all(cfg, jobs)
    except (ValueError, DataError, tracking.TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    launcher = _on_slurm()
    if launcher is None:
        from model.predict import PredictError, run_prediction

        for j in jobs:
            try:
                log.info("%s → %s", j.volume, run_prediction(model_specs(cfg), volume_ref(j.volume, j.dataset), j.out,
                                                             model=model, fuse_on=str(cfg.get("fuse_on", "auto")),
                                                             **_predict_kwargs(cfg, j)))
            except (PredictError, DataError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                sys.exit(2)
        return
    if str(cfg.get("fuse_on", "auto")) in ("host", "device"):
        print(f"error: fuse_on={cfg.fuse_on}: the SLURM launcher predicts each plane in its own array task and fuses "
              "plane files (fuse_on=files or auto)", file=sys.stderr)
        sys.exit(2)
    _, fuse_jobs = submit_slurm(cfg, launcher, jobs)
    if cfg.wait:
        failed = wait_for(fuse_jobs, jobs, float(launcher.get("poll_interval_s", 10)))
        if failed:
            log.error("%d of %d volumes FAILED", failed, len(jobs))
            sys.exit(1)
        log.info("all %d volumes segmented", len(jobs))


if __name__ == "__main__":
    main()
