"""Render the three orthogonal centre slices of a sample, plain and with its labels overlaid.

The slice sets follow Baltruschat et al. 2021 ("Slicing"): S_rc = V(n, :, :), S_cp = V(:, n, :),
S_pr = V(:, :, n), here each at the centre index n of its axis (axis 0 = screw/rotation axis).

    python -m data.show DATASET_DIR --sample ID --out PNG [--label-field label|label_hq|label_wf]
"""

from __future__ import annotations

import argparse
import sys
import typing as tp
from pathlib import Path

import numpy as np

from data.atomic import atomic_path
from data.errors import DataError
from data.manifest import Sample, load_dataset
from data.volume import CLASS_NAMES, VolumeRef, open_volume, read_checked

LABEL_FIELDS = ("label", "label_hq", "label_wf")
# RGBA per class; background stays transparent.
CLASS_COLOURS = {1: (0.15, 0.55, 1.0, 0.45), 2: (0.1, 0.9, 0.2, 0.5), 3: (1.0, 0.15, 0.1, 0.5)}
SLICE_SETS = (("S_rc", "V(n, :, :)", ("y", "x")), ("S_cp", "V(:, n, :)", ("z", "x")), ("S_pr", "V(:, :, n)", ("z", "y")))


def centre_slices(ref: VolumeRef, field: str) -> list[np.ndarray]:
    """The centre slice along each axis, reading only those slices."""
    with open_volume(ref) as vol:
        shape = vol.shape
        keys = [(shape[0] // 2, slice(None), slice(None)),
                (slice(None), shape[1] // 2, slice(None)),
                (slice(None), slice(None), shape[2] // 2)]
        return [read_checked(vol, k, ref=ref, field=field) for k in keys]


def label_ref(sample: Sample, field: str, manifest: Path) -> VolumeRef:
    """Where ``field`` lives: ``label`` and a WF label from the manifest, else a sibling HDF5 dataset."""
    if field not in LABEL_FIELDS:
        raise DataError(manifest, "label-field", f"must be one of {LABEL_FIELDS}, got {field!r}")
    if field == "label" or (field == "label_wf" and sample.label_quality == "WF") or \
            (field == "label_hq" and sample.label_quality == "HQ"):
        if sample.label is not None:
            return sample.label
    if field == "label_wf" and sample.wf_label is not None:
        return sample.wf_label
    holder = sample.label or sample.image
    if holder.is_hdf5:  # synthetic samples keep label_hq and label_wf beside image and label
        import h5py

        try:
            with h5py.File(holder.path, "r") as f:
                if f"/{field}" in f:
                    return VolumeRef(holder.path, f"/{field}")
        except OSError as exc:
            raise DataError(holder.path, None, f"corrupt or truncated HDF5 file ({exc})") from exc
    raise DataError(manifest, f"{sample.id}.{field}", "sample has no such label volume")


def _display_range(slices: tp.Sequence[np.ndarray]) -> tuple[float, float]:
    """Clip at the 0.5 % and 99.9 % percentiles, as the paper's preprocessing does."""
    values = np.concatenate([s.ravel() for s in slices]).astype(np.float64)
    lo, hi = np.percentile(values, [0.5, 99.9])
    return float(lo), float(hi if hi > lo else lo + 1)


def _overlay(label: np.ndarray) -> np.ndarray:
    rgba = np.zeros(label.shape + (4,), np.float32)
    for k, colour in CLASS_COLOURS.items():
        rgba[label == k] = colour
    return rgba


def render(dataset_dir: tp.Union[str, Path], sample_id: str, out: tp.Union[str, Path], *,
           label_field: str = "label", dpi: int = 110) -> Path:
    """Write a PNG: top row the image slices S_rc, S_cp, S_pr; bottom row the same with labels overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ds = load_dataset(dataset_dir)
    try:
        sample = ds.by_id(sample_id)
    except KeyError:
        raise DataError(ds.manifest, "id", f"no sample {sample_id!r} (has: {', '.join(s.id for s in ds.samples)})") from None
    images = centre_slices(sample.image, "image")
    lref = label_ref(sample, label_field, ds.manifest)
    labels = centre_slices(lref, label_field)
    for im, lb in zip(images, labels):
        if im.shape != lb.shape:
            raise DataError(lref.path, lref.dataset or label_field, f"label slice {lb.shape} differs from image {im.shape}")
    vmin, vmax = _display_range(images)

    fig, axes = plt.subplots(2, 3, figsize=(13, 9), squeeze=False)
    for col, ((name, expr, (ylab, xlab)), im, lb) in enumerate(zip(SLICE_SETS, images, labels)):
        for row in range(2):
            ax = axes[row][col]
            ax.imshow(im, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            if row == 1:
                ax.imshow(_overlay(lb), interpolation="nearest")
            ax.set_title(f"{name} = {expr}" + (" + labels" if row else ""), fontsize=10)
            ax.set_xlabel(xlab)
            ax.set_ylabel(ylab)
            ax.tick_params(labelsize=7)
    handles = [Patch(color=CLASS_COLOURS[k][:3], label=CLASS_NAMES[k].replace("_", " ")) for k in (1, 2, 3)]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    title = (f"{sample.id}: {sample.beamline}, {sample.alloy}, {sample.implantation_days:g} days, "
             f"{sample.split}; overlay: {label_field} ({lref.dataset or lref.path.name})")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    out = Path(out)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as fh:
            fig.savefig(fh, format="png", dpi=dpi)
    plt.close(fig)
    return out


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.show", description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", type=Path, help="dataset folder (or its manifest)")
    ap.add_argument("--sample", required=True, help="sample id")
    ap.add_argument("--out", required=True, type=Path, help="PNG file to write")
    ap.add_argument("--label-field", default="label", choices=LABEL_FIELDS)
    args = ap.parse_args(argv)
    try:
        path = render(args.dataset, args.sample, args.out, label_field=args.label_field)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
