"""Synthetic SRμCT explants: a degrading threaded Mg-xGd screw in bone, with exact ground truth.

The 17 real scans of Baltruschat et al. 2021 (Sci. Rep. 11:24237, "Data") are available on request
only, so this module builds look-alikes that are hard to segment in the same ways the paper lists:
the degradation layer (DL) is fragmented and cracked and its grey values range from the residual
material's (RM) down towards bone's; phase-contrast edge fringes, ring artefacts, noise and low
contrast (two beamline styles, P05 and I13-2, 16- and 12-bit).

The bone and the implant are set so that the HQ labels measure like the paper's Table 3 (``analysis.measures``;
``benchmarks/synth_measures.py``): bone grows onto most of the implant surface (osseointegration; soft tissue in
places) and is denser within ~0.35 of the field of view around the screw (peri-implant bone), which puts BIC and
BV/TV (100 µm ROI) in the paper's ranges (45–80 %, 40–55 %) already at 64³; the degradation depth grows with the
implantation time, sublinearly (the rate falls with time), faster for Mg-5Gd than Mg-10Gd. It is a fraction of
the screw's radius, so DR (mm/year, Eq. 1) grows with the grid size at a fixed voxel size: at 64³ × 5 µm the whole
screw degraded measures only 0.07–0.23 mm/year (84 to 28 days), below the paper's 0.21–0.46.

Each sample has an exact high-quality label (``label_hq``) and a label imitating the paper's
semi-automatic workflow (``label_wf``: most cracks missed, small gaps closed, bright DL taken for RM).
As in the paper, the 14 training samples carry WF labels and the 3 test samples HQ labels.

Axis 0 is the screw (and tomographic rotation) axis. All geometry is defined relative to the grid
size, so 64³, 128³ and 512³ volumes show the same scene at different resolutions.

This module writes datasets (:func:`write_dataset`, the command line); :mod:`data.synth_explant` builds one
explant from :mod:`data.synth_geometry`, :mod:`data.synth_bone` and :mod:`data.synth_imaging`.

    python -m data.synth --out DIR [--n-train 14] [--n-test 3] [--size 128 | --shape Z Y X]
                         [--seed 0] [--voxel-size-um 5.0] [--degradation-scale 1.0] [--overwrite]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import typing as tp
from pathlib import Path

from data.errors import DataError
from data.manifest import MANIFEST_NAMES, Sample, write_manifest
from data.synth_explant import GENERATOR_VERSION, SyntheticExplant, check_shape, generate_explant
from data.volume import VolumeRef, write_h5_atomic

# ---------------------------------------------------------------------------------------- dataset
# (alloy, beamline) cycle: every group of 4 consecutive training samples holds all four combinations,
# so a 4-fold cross-validation can be balanced by alloy and beamline.
_COMBOS = (("Mg-5Gd", "P05"), ("Mg-10Gd", "I13"), ("Mg-10Gd", "P05"), ("Mg-5Gd", "I13"))
_DAYS = (28.0, 56.0, 84.0)


def sample_plan(n_train: int = 14, n_test: int = 3) -> list[dict]:
    """Sample metadata: training samples first, then test samples (each a different combination)."""
    plan = []
    for i in range(n_train + n_test):
        test = i >= n_train
        j = i - n_train if test else i
        alloy, beamline = _COMBOS[(j + 1) % 4 if test else j % 4]
        days = _DAYS[(j + j // 4) % 3] if not test else _DAYS[(j + 1) % 3]
        plan.append(dict(index=i, split="test" if test else "train", alloy=alloy, beamline=beamline, days=days,
                         label_quality="HQ" if test else "WF"))
    return plan


def _timed_explant(args: tuple) -> tuple[SyntheticExplant, float]:
    shape, seed, p, options = args
    t0 = time.perf_counter()
    ex = generate_explant(shape, seed, beamline=p["beamline"], alloy=p["alloy"], days=p["days"], **options)
    return ex, time.perf_counter() - t0


def _explants(plan: list[dict], shape: tuple[int, int, int], seed: int, options: dict,
              workers: tp.Optional[int]) -> tp.Iterator[tuple[SyntheticExplant, float]]:
    """(explant, seconds) of every planned sample, in plan order; in worker processes when it pays (numpy and
    scipy.ndimage hold the GIL for much of a sample: threads do not help)."""
    jobs = [(shape, (seed, p["index"]), p, options) for p in plan]
    if workers is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        # Not for tiny samples (process start-up costs more) nor huge ones (finished samples wait in memory).
        workers = cores if len(jobs) >= 4 and 48 ** 3 <= math.prod(shape) <= 256 ** 3 else 1
    workers = max(1, min(int(workers), len(jobs)))
    if workers == 1:
        yield from map(_timed_explant, jobs)
        return
    import concurrent.futures as cf
    import multiprocessing

    # spawn: the caller may hold TensorFlow/MLflow threads, after which fork is unsafe
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_timed_explant, jobs)


def write_dataset(out: tp.Union[str, Path], *, n_train: int = 14, n_test: int = 3,
                  shape: tp.Union[int, tp.Sequence[int]] = 128, seed: int = 0, voxel_size_um: float = 5.0,
                  degradation_scale: float = 1.0, overwrite: bool = False, log: tp.Optional[tp.Callable[[str], None]] = None,
                  workers: tp.Optional[int] = None) -> list[Sample]:
    """Generate a dataset folder: one HDF5 file per sample and ``manifest.yaml`` (written last).

    ``workers`` processes generate the samples (default: the cores, for 4+ samples of 48³ or more); each
    sample has its own seed, so the files are the same for any number of workers.
    """
    out = Path(out)
    shape = check_shape(shape)
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise DataError(out, None, "need at least one sample (n_train, n_test >= 0)")
    if out.exists() and not out.is_dir():
        raise DataError(out, None, "output path exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError(out, None, "output folder is not empty; pass --overwrite to replace its samples")
        for name in MANIFEST_NAMES:  # no stale manifest may point at a half-replaced dataset
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()
    width = max(2, len(str(n_train + n_test)))
    samples: list[Sample] = []
    written: list[Path] = []
    plan = sample_plan(n_train, n_test)
    options = {"voxel_size_um": voxel_size_um, "degradation_scale": degradation_scale}
    try:
        for p, (ex, seconds) in zip(plan, _explants(plan, shape, seed, options, workers)):
            sid = f"synth{p['index'] + 1:0{width}d}"
            label = ex.label_hq if p["label_quality"] == "HQ" else ex.label_wf
            path = root / f"{sid}.h5"
            arrays = {"image": ex.image, "label": label, "label_hq": ex.label_hq, "label_wf": ex.label_wf}
            attrs = {**ex.attrs(), "seed": seed, "sample_index": p["index"], "id": sid, "split": p["split"],
                     "label_quality": p["label_quality"]}
            write_h5_atomic(path, arrays, attrs=attrs)
            samples.append(Sample(
                id=sid, image=VolumeRef(path, "/image"), label=VolumeRef(path, "/label"),
                wf_label=VolumeRef(path, "/label_wf") if p["split"] == "test" else None,
                voxel_size_um=float(voxel_size_um), alloy=p["alloy"], beamline=p["beamline"],
                implantation_days=p["days"], label_quality=p["label_quality"], split=p["split"],
                initial_volume_mm3=float(f"{ex.initial_volume_mm3:.10g}"),
                initial_surface_mm2=float(f"{ex.initial_surface_mm2:.10g}")))
            if log:
                log(f"{sid}: {p['split']} {p['alloy']} {p['beamline']} {p['days']:g} d  {seconds:.2f} s")
            written.append(path)
        write_manifest(root, samples, header=f"# synthetic explants: data.synth v{GENERATOR_VERSION}, "
                                             f"seed {seed}, shape {'x'.join(map(str, shape))}, "
                                             f"degradation scale {degradation_scale:g}")
    except BaseException:
        for path in written:  # no manifest was written: leave no orphaned samples either
            path.unlink(missing_ok=True)
        raise
    return samples


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="dataset folder to create (must be empty)")
    ap.add_argument("--n-train", type=int, default=14, help="training samples, WF labels (default 14)")
    ap.add_argument("--n-test", type=int, default=3, help="test samples, HQ labels (default 3)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--size", type=int, default=128, help="cubic volume edge in voxels (default 128)")
    size.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), help="volume shape, axis 0 = screw axis")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--voxel-size-um", type=float, default=5.0, help="voxel size written to the manifest (default 5)")
    ap.add_argument("--degradation-scale", type=float, default=1.0,
                    help="multiplies the degradation depth, i.e. the degradation layer's thickness (default 1)")
    ap.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty folder")
    args = ap.parse_args(argv)
    shape = tuple(args.shape) if args.shape else (args.size,) * 3
    if min(shape) < 32:
        ap.error("volume sizes must be at least 32")
    if args.voxel_size_um <= 0:
        ap.error("--voxel-size-um must be positive")
    if not 0 < args.degradation_scale <= 3:
        ap.error("--degradation-scale must be in (0, 3]")
    t0 = time.perf_counter()
    try:
        samples = write_dataset(args.out, n_train=args.n_train, n_test=args.n_test, shape=shape, seed=args.seed,
                                voxel_size_um=args.voxel_size_um, degradation_scale=args.degradation_scale,
                                overwrite=args.overwrite, log=print)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(samples)} samples of {'x'.join(map(str, shape))} voxels to {args.out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
