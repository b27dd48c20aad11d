"""Preprocessing of SRμCT volumes as in the paper (Data section), slab by slab for volumes larger than RAM.

``python -m data.prepare SRC --out DST [--voxel-size-um 5] [--clip-percentiles 0.5 99.9]``

Per sample: resample to a fixed voxel size (linear for images, nearest for labels), clip the grey
values to the 0.5 % / 99.9 % percentiles of the resampled volume, scale linearly to [0, 1], and
write chunked HDF5 (``DST/<id>.h5`` with ``image`` float32 and the label datasets) plus a manifest.
Peak memory is a few slabs, set by ``--slab-mb``, whatever the volume size.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
import typing as tp
from pathlib import Path

import os
import shutil

import h5py
import numpy as np

from data.atomic import atomic_path
from data.errors import DataError
from data.manifest import Dataset, Sample, load_dataset, write_manifest
from data.volume import ImageStats, VolumeRef, check_image, check_labels, default_chunks, open_volume, read_checked

log = logging.getLogger(__name__)

PAPER_VOXEL_SIZE_UM = 5.0
PAPER_CLIP_PERCENTILES = (0.5, 99.9)
HIST_BINS = 1 << 16
PREPARED_MARKER = "prepared_by"  # HDF5 attribute of every image data.prepare writes
LABEL_FIELDS = ("label", "wf_label")


@dataclasses.dataclass(frozen=True)
class AxisMap:
    """Source voxels every output index along one axis reads, and their weights (voxel centres aligned)."""

    taps: np.ndarray  # int64 (n_out, K), source indices
    weights: np.ndarray  # float32 (n_out, K), summing to 1 per output index
    nearest: np.ndarray  # int64 (n_out,), nearest source index (labels)

    def rows(self, a: int, b: int) -> AxisMap:
        return AxisMap(self.taps[a:b], self.weights[a:b], self.nearest[a:b])


def output_shape(shape: tp.Sequence[int], voxel_in_um: float, voxel_out_um: float) -> tuple[int, ...]:
    """Shape after resampling: the physical extent is kept, rounded to whole voxels (at least 1)."""
    return tuple(max(1, int(round(n * voxel_in_um / voxel_out_um))) for n in shape)


def axis_map(n_in: int, n_out: int, voxel_in_um: float, voxel_out_um: float) -> AxisMap:
    """Paper: images resampled by linear interpolation; x = (o + 0.5)·s_out/s_in − 0.5, clamped to the volume.

    Shrinking by more than 2 (s_out > 2·s_in) averages every source voxel the output voxel covers (area weights),
    as linear interpolation there reads 2 of the ⌈s_out/s_in⌉ voxels and aliases fine structure and noise into the
    result; at exactly 2 both rules give the same weights."""
    f = voxel_out_um / voxel_in_um
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * f - 0.5
    nearest = np.clip(np.rint(x), 0, n_in - 1).astype(np.int64)
    if f > 2.0:
        taps, weights = area_weights(n_in, n_out, f)
        return AxisMap(taps, weights, nearest)
    x = np.clip(x, 0.0, n_in - 1)
    lo = np.floor(x).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (x - lo).astype(np.float32)
    return AxisMap(np.stack([lo, hi], axis=1), np.stack([1.0 - w, w], axis=1).astype(np.float32), nearest)


def area_weights(n_in: int, n_out: int, f: float) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased downsampling by ``f`` > 2: output voxel o covers source edges [o·f, (o+1)·f); each source voxel
    [i, i+1) weighs by its overlap (clipped to the volume, renormalised)."""
    k = int(math.ceil(f)) + 1
    start = np.floor(np.arange(n_out, dtype=np.float64) * f).astype(np.int64)
    taps = start[:, None] + np.arange(k, dtype=np.int64)[None, :]
    a = np.arange(n_out, dtype=np.float64)[:, None] * f
    b = np.minimum(a + f, float(n_in))
    overlap = np.clip(np.minimum(taps + 1.0, b) - np.maximum(taps.astype(np.float64), a), 0.0, None)
    overlap[taps >= n_in] = 0.0
    total = overlap.sum(axis=1, keepdims=True)
    weights = np.where(total > 0, overlap / np.where(total > 0, total, 1.0), 0.0)
    # an output voxel entirely past the volume's end (rounding of the shape) repeats the last source voxel
    weights[total[:, 0] == 0, 0] = 1.0
    taps = np.clip(taps, 0, n_in - 1)
    taps[total[:, 0] == 0, 0] = n_in - 1
    return taps, weights.astype(np.float32)


def _weighted_along(a: np.ndarray, m: AxisMap, axis: int, offset: int = 0) -> np.ndarray:
    shape = [1] * a.ndim
    shape[axis] = -1
    if m.taps.shape[1] == 2:  # linear: lo + (hi − lo)·w, as it has always been computed (same float32 rounding)
        lo = np.take(a, m.taps[:, 0] - offset, axis=axis).astype(np.float32, copy=False)
        hi = np.take(a, m.taps[:, 1] - offset, axis=axis).astype(np.float32, copy=False)
        return lo + (hi - lo) * m.weights[:, 1].reshape(shape)
    out = None
    for j in range(m.taps.shape[1]):
        term = np.take(a, m.taps[:, j] - offset, axis=axis).astype(np.float32, copy=False) * m.weights[:, j].reshape(shape)
        out = term if out is None else out + term
    return tp.cast(np.ndarray, out)


def resample_linear(slab: np.ndarray, maps: tp.Sequence[AxisMap], z_offset: int) -> np.ndarray:
    """Paper: resample images by linear interpolation (separable trilinear; area-weighted where shrinking by > 2)."""
    out = _weighted_along(slab, maps[2], 2)
    out = _weighted_along(out, maps[1], 1)
    return _weighted_along(out, maps[0], 0, offset=z_offset)


def resample_nearest(slab: np.ndarray, maps: tp.Sequence[AxisMap], z_offset: int) -> np.ndarray:
    """Labels are resampled by nearest neighbour so no class is invented between two others."""
    return slab[np.ix_(maps[0].nearest - z_offset, maps[1].nearest, maps[2].nearest)]


def resampled_slabs(vol, ref: VolumeRef, maps: tp.Sequence[AxisMap], out_depth: int, *, nearest: bool,
                    field: str) -> tp.Iterator[tuple[slice, np.ndarray]]:
    """Yield (output z-range, resampled block), reading only the source slices each block needs."""
    n_out = len(maps[0].nearest)
    for o0 in range(0, n_out, out_depth):
        o1 = min(o0 + out_depth, n_out)
        sub = maps[0].rows(o0, o1)
        idx = sub.nearest if nearest else sub.taps
        z0, z1 = int(idx.min()), int(idx.max()) + 1
        src = read_checked(vol, slice(z0, z1), ref=ref, field=field)
        block = (resample_nearest if nearest else resample_linear)(src, (sub, maps[1], maps[2]), z0)
        yield slice(o0, o1), block


def histogram_counts(block: np.ndarray, lo: float, hi: float, bins: int = HIST_BINS) -> np.ndarray:
    """Counts in ``bins`` equal bins over [lo, hi], in float64: np.histogram on float32 refuses narrow ranges."""
    scale = bins / (hi - lo)
    idx = ((block.astype(np.float64, copy=False).ravel() - lo) * scale).astype(np.int64)
    return np.bincount(np.clip(idx, 0, bins - 1), minlength=bins)


def percentiles_from_histogram(counts: np.ndarray, edges: np.ndarray, q: tp.Sequence[float]) -> list[float]:
    """Percentiles of a histogrammed volume, linear within a bin (error below one bin width)."""
    cum = np.cumsum(counts, dtype=np.float64)
    total = cum[-1]
    out = []
    for p in q:
        target = p / 100.0 * total
        # side="right" at 0 skips leading empty bins, so the 0th percentile is the data minimum.
        i = int(np.searchsorted(cum, target, side="right" if target <= 0 else "left"))
        i = min(i, len(counts) - 1)
        prev = cum[i - 1] if i > 0 else 0.0
        frac = 0.0 if counts[i] == 0 else (target - prev) / counts[i]
        out.append(float(edges[i] + frac * (edges[i + 1] - edges[i])))
    return out


def clip_and_scale(block: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Paper: clip grey values to the 0.5 %/99.9 % percentiles, then scale linearly to [0, 1]."""
    if hi <= lo:
        return np.zeros_like(block, dtype=np.float32)
    out = (np.clip(block, lo, hi) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


PREPROCESSING_PARAMS = ("preprocessing.voxel_size_um", "preprocessing.clip_low_percentile",
                        "preprocessing.clip_high_percentile", "preprocessing.scaling")


def dataset_preprocessing(samples: tp.Sequence[Sample]) -> dict[str, tp.Any]:
    """What data.prepare did to these samples, read from their images' attributes (not from a config that may
    describe another dataset): voxel size, clip percentiles, scaling; {} for a dataset data.prepare did not write.
    The training run records it (MLflow params ``preprocessing.*``) and analysis.segment applies it to a new scan."""
    found: set[tuple] = set()
    for s in samples:
        try:
            with h5py.File(s.image.path, "r") as f:
                a = f.attrs
                if PREPARED_MARKER not in a or "clip_percentiles" not in a:
                    return {}
                lo, hi = (float(x) for x in a["clip_percentiles"])
                found.add((float(a["voxel_size_um"]), lo, hi))
        except (OSError, KeyError, ValueError, TypeError):
            return {}
    if len(found) != 1:
        return {}
    vs, lo, hi = found.pop()
    return dict(zip(PREPROCESSING_PARAMS, (vs, lo, hi, "clip to the percentiles, then linear to [0, 1]")))


def slab_depth_for(shape_in: tp.Sequence[int], shape_out: tp.Sequence[int], slab_bytes: int) -> int:
    """Output slices per slab so that the source slices it reads and the float32 copies fit ``slab_bytes``."""
    src_per_out = max(1.0, shape_in[0] / shape_out[0]) + 1.0
    per_out = 16 * shape_in[1] * shape_in[2] * src_per_out + 12 * shape_out[1] * shape_out[2]
    return max(1, min(int(shape_out[0]), int(slab_bytes // per_out)))


@dataclasses.dataclass(frozen=True)
class PreparedSample:
    sample: Sample
    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]
    clip_low: float
    clip_high: float
    seconds: float


def prepare_sample(sample: Sample, stats: ImageStats, out_root: Path, *, voxel_size_um: float,
                   clip_percentiles: tp.Sequence[float], slab_bytes: int) -> PreparedSample:
    """Resample, clip and scale one sample; write ``out_root/<id>.h5`` atomically."""
    t0 = time.perf_counter()
    shape_out = output_shape(stats.shape, sample.voxel_size_um, voxel_size_um)
    maps = [axis_map(n, m, sample.voxel_size_um, voxel_size_um) for n, m in zip(stats.shape, shape_out)]
    depth = slab_depth_for(stats.shape, shape_out, slab_bytes)
    lo_edge, hi_edge = float(stats.min), float(stats.max)
    edges = np.linspace(lo_edge, hi_edge, HIST_BINS + 1)
    counts = np.zeros(HIST_BINS, np.int64)
    with open_volume(sample.image) as vol:
        for _, block in resampled_slabs(vol, sample.image, maps, depth, nearest=False, field="image"):
            counts += histogram_counts(block, lo_edge, hi_edge)
    clip_low, clip_high = percentiles_from_histogram(counts, edges, clip_percentiles)

    target = out_root / f"{sample.id}.h5"
    inputs = [r.path for r in (sample.image, sample.label, sample.wf_label) if r is not None]
    refs: dict[str, VolumeRef] = {}
    with atomic_path(target, inputs=inputs) as tmp:
        with h5py.File(tmp, "w") as f:
            chunks = default_chunks(shape_out)
            img = f.create_dataset("image", shape=shape_out, dtype="float32", chunks=chunks)
            with open_volume(sample.image) as vol:
                for zs, block in resampled_slabs(vol, sample.image, maps, depth, nearest=False, field="image"):
                    img[zs] = clip_and_scale(block, clip_low, clip_high)
            refs["image"] = VolumeRef(target, "/image")
            for name in LABEL_FIELDS:
                ref = getattr(sample, name)
                if ref is None:
                    continue
                ds = f.create_dataset(name, shape=shape_out, dtype="uint8", chunks=chunks, compression="lzf")
                with open_volume(ref) as vol:
                    for zs, block in resampled_slabs(vol, ref, maps, depth, nearest=True, field=name):
                        ds[zs] = block.astype(np.uint8)
                refs[name] = VolumeRef(target, f"/{name}")
            f.attrs.update({PREPARED_MARKER: "data.prepare", "sample_id": sample.id, "voxel_size_um": voxel_size_um,
                            "source_voxel_size_um": sample.voxel_size_um, "source_shape": stats.shape,
                            "clip_low": clip_low, "clip_high": clip_high,
                            "clip_percentiles": list(clip_percentiles)})
    prepared = dataclasses.replace(sample, voxel_size_um=voxel_size_um, image=refs["image"],
                                   label=refs.get("label"), wf_label=refs.get("wf_label"))
    return PreparedSample(prepared, stats.shape, shape_out, clip_low, clip_high, time.perf_counter() - t0)


def prepare_dataset(src: tp.Union[str, Path], out: tp.Union[str, Path], *, voxel_size_um: float = PAPER_VOXEL_SIZE_UM,
                    clip_percentiles: tp.Sequence[float] = PAPER_CLIP_PERCENTILES, slab_mb: float = 256,
                    overwrite: bool = False) -> list[PreparedSample]:
    """Check every input first (so bad input writes nothing), then prepare sample by sample."""
    if not (voxel_size_um > 0 and math.isfinite(voxel_size_um)):
        raise DataError(None, "voxel_size_um", f"must be a positive number, got {voxel_size_um}")
    if not (isinstance(slab_mb, (int, float)) and math.isfinite(slab_mb) and slab_mb > 0):
        raise DataError(None, "slab_mb", f"must be a positive number of MB, got {slab_mb}")
    lo, hi = clip_percentiles
    if not 0 <= lo < hi <= 100:
        raise DataError(None, "clip_percentiles", f"need 0 <= low < high <= 100, got {lo}, {hi}")
    dataset: Dataset = load_dataset(src)
    out = Path(out).resolve()
    if out == dataset.root:
        raise DataError(out, None, "output folder is the input dataset folder; choose another")
    if out.exists() and not out.is_dir():
        raise DataError(out, None, "output path is an existing file, not a folder")
    if any(p.exists() and not p.is_dir() for p in out.parents):
        raise DataError(out, None, "a parent of the output path is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(out, None, "output folder is not empty (use --overwrite to replace prepared files)")
    stats: dict[str, ImageStats] = {}
    for s in dataset.samples:
        stats[s.id] = check_image(s.image)
        if not stats[s.id].max > stats[s.id].min:
            raise DataError(s.image.path, "image", f"sample {s.id}: every voxel is {stats[s.id].min:g}: "
                            "a constant image has no contrast to segment")
        for name in LABEL_FIELDS:
            ref = getattr(s, name)
            if ref is not None:
                check_labels(ref, field=name, expected_shape=stats[s.id].shape)
    # Everything is written into a staging folder and moved into ``out`` only when every sample is done,
    # so a failure leaves ``out`` as it was (and no half-written folder that blocks the next run).
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(out, None, f"cannot create the output folder: {exc.strerror}") from None
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        done = []
        for s in dataset.samples:
            p = prepare_sample(s, stats[s.id], staging, voxel_size_um=voxel_size_um, clip_percentiles=clip_percentiles,
                               slab_bytes=int(slab_mb * (1 << 20)))
            log.info("%s: %s -> %s, clip [%.4g, %.4g], %.1f s", s.id, p.shape_in, p.shape_out, p.clip_low, p.clip_high, p.seconds)
            done.append(p)
        write_manifest(staging, [p.sample for p in done],
                       header=f"# prepared by data.prepare: {voxel_size_um} um voxels, clipped to percentiles {lo}/{hi}, scaled to [0, 1]")
        out.mkdir(exist_ok=True)
        names = sorted(os.listdir(staging), key=lambda n: n.startswith("manifest"))  # the manifest last
        for name in names:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [dataclasses.replace(p, sample=_moved(p.sample, staging, out)) for p in done]


def _moved(sample: Sample, old: Path, new: Path) -> Sample:
    refs = {n: dataclasses.replace(r, path=new / Path(r.path).relative_to(old))
            for n in ("image", "label", "wf_label") if (r := getattr(sample, n)) is not None}
    return dataclasses.replace(sample, **refs)


def check_prepared(root: tp.Union[str, Path]) -> Dataset:
    """Refuse a dataset data.prepare did not write (or whose images are not in [0, 1]): training on raw grey values
    runs without a word and records a FINISHED run that every later sweep skips."""
    dataset = load_dataset(root)
    for s in dataset.samples:
        hint = f"sample {s.id} is not prepared data; prepare the raw dataset with `python -m data.prepare SRC --out DST`"
        with open_volume(s.image) as vol:
            attrs = getattr(vol, "attrs", None)
            file_attrs = getattr(getattr(vol, "file", None), "attrs", None)
            marked = any(a is not None and (PREPARED_MARKER in a or "clip_high" in a) for a in (attrs, file_attrs))
            if marked:
                continue
            if not np.issubdtype(vol.dtype, np.floating):
                raise DataError(s.image.path, "image", f"{hint} (dtype {vol.dtype}, prepared images are float in [0, 1])")
            n = int(vol.shape[0])
            for z in sorted({0, n // 2, n - 1}):  # unmarked float data: sample three slices for the range
                a = read_checked(vol, slice(z, z + 1), ref=s.image, field="image")
                if a.size and (float(a.min()) < 0 or float(a.max()) > 1):
                    raise DataError(s.image.path, "image", f"{hint} (values {float(a.min()):.4g}..{float(a.max()):.4g} "
                                    f"in slice {z}, prepared images are in [0, 1])")
    return dataset


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="dataset folder (or manifest file) with raw volumes")
    ap.add_argument("--out", required=True, help="output dataset folder")
    ap.add_argument("--voxel-size-um", type=float, default=PAPER_VOXEL_SIZE_UM, help="target voxel size (paper: 5)")
    ap.add_argument("--clip-percentiles", type=float, nargs=2, default=PAPER_CLIP_PERCENTILES, metavar=("LOW", "HIGH"))
    ap.add_argument("--slab-mb", type=float, default=256, help="memory per slab; peak RSS is a few slabs")
    ap.add_argument("--overwrite", action="store_true", help="allow a non-empty output folder")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        done = prepare_dataset(args.src, args.out, voxel_size_um=args.voxel_size_um,
                               clip_percentiles=tuple(args.clip_percentiles), slab_mb=args.slab_mb, overwrite=args.overwrite)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"prepared {len(done)} samples into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
