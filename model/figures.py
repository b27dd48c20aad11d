"""Pictures like the paper's Fig. 4 (class probability per plane and fused) and Fig. 5 (labels overlaid)."""

from __future__ import annotations

import typing as tp
from pathlib import Path

import h5py
import numpy as np

from data.atomic import atomic_path
from data.volume import VolumeRef, open_volume
from model.fusion import mean_probabilities, soft_vote, uncertainty_maps

CLASS_LABELS = ("background", "bone", "degradation layer", "residual material")
CLASS_COLOURS = np.array([[0, 0, 0], [230, 230, 80], [60, 160, 255], [255, 70, 70]], np.float32) / 255.0


def _plane_slice(path: Path, z: int, plane: str = "rc") -> np.ndarray:
    """Slice ``z`` of S_rc (or of S_cp / S_pr) of a plane file's probabilities: (·, ·, K) uint8."""
    key = {"rc": (z,), "cp": (slice(None), z), "pr": (slice(None), slice(None), z)}[plane]
    with h5py.File(path, "r") as f:
        return f["probabilities"][key]


def _save(fig, out: Path) -> Path:
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return Path(out)


def middle_slice(image: VolumeRef, plane: str = "rc") -> tuple[int, np.ndarray]:
    """Index and grey values of the middle slice of S_rc (or S_cp / S_pr)."""
    axis = {"rc": 0, "cp": 1, "pr": 2}[plane]
    with open_volume(image) as vol:
        n = int(vol.shape[axis]) // 2
        key = tuple(n if a == axis else slice(None) for a in range(3))
        return n, np.asarray(vol[key], np.float32)


# Paper Fig. 4: P(bone) on an S_rc slice and P(RM) on an S_pr slice; P(DL) on the S_rc slice as an extra row.
FIG4_ROWS: tuple[tuple[str, int], ...] = (("rc", 1), ("pr", 3), ("rc", 2))


def fig4_plane_probabilities(image: VolumeRef, plane_files: tp.Mapping[str, Path], out: Path, *,
                             rows: tp.Sequence[tuple[str, int]] = FIG4_ROWS) -> Path:
    """Fig. 4: one row per (slice plane, class) of ``rows``: the image slice, the class probability of the
    naive planes S_rc, S_cp, S_pr, of the 3-plane and of the 9-plane average (Eq. 4), middle slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    naive = [p for p in ("rc", "cp", "pr") if p in plane_files]
    columns = ["image"] + [f"S_{p}" for p in naive] + (["Avr 3-planes"] if len(naive) == 3 else []) + \
        (["Avr 9-planes"] if len(plane_files) == 9 else [])
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.6 * len(columns) + 1.0, 2.7 * len(rows) + 0.5),
                             squeeze=False, layout="constrained")
    shown = None
    for r, (plane, cls) in enumerate(rows):
        n, img = middle_slice(image, plane)
        stacks = {p: _plane_slice(path, n, plane) for p, path in plane_files.items()}
        panels = [img] + [stacks[p][..., cls] / 255.0 for p in naive]
        if "Avr 3-planes" in columns:
            panels.append(mean_probabilities(np.stack([stacks[p] for p in naive]))[..., cls])
        if "Avr 9-planes" in columns:
            panels.append(mean_probabilities(np.stack(list(stacks.values())))[..., cls])
        for c, (title, data) in enumerate(zip(columns, panels)):
            ax = axes[r, c]
            im = ax.imshow(data, cmap="gray" if c == 0 else "magma", vmin=0, vmax=1, interpolation="nearest")
            shown = im if c else shown
            ax.set_title(title if r == 0 else "", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
        axes[r, 0].set_ylabel(f"P({CLASS_LABELS[cls]})\nslice {n} of S_{plane}", fontsize=10)
    if shown is not None:
        fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.6, label="probability")
    fig.suptitle("Class probabilities of single planes and fused (paper Fig. 4)", fontsize=12)
    path = _save(fig, out)
    plt.close(fig)
    return path


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB of a grey slice with the foreground classes tinted."""
    grey = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=-1)
    tint = CLASS_COLOURS[np.asarray(labels, np.intp)]
    fg = (np.asarray(labels) > 0)[..., None]
    return np.where(fg, (1 - alpha) * grey + alpha * tint, grey)


def fig5_overlay(image: VolumeRef, reference: VolumeRef, prediction: tp.Optional[Path],
                 plane_files: tp.Mapping[str, Path], out: Path, *, z: tp.Optional[int] = None) -> Path:
    """Fig. 5: slice z with the reference labels and the predicted labels overlaid.

    ``prediction``: an HDF5 file with ``labels``; without it, the 9-plane soft vote of ``plane_files``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    z0, img = middle_slice(image)
    z = z0 if z is None else z
    with open_volume(image) as vol:
        img = np.asarray(vol[z], np.float32)
    with open_volume(reference) as vol:
        ref = np.asarray(vol[z])
    disagree = None
    if prediction is not None:
        with h5py.File(prediction, "r") as f:
            pred = f["labels"][z]
            name = str(f.attrs.get("method", "prediction"))
            if "disagreement" in f:
                disagree = f["disagreement"][z].astype(np.float32) / 255.0
    else:
        stack = np.stack([_plane_slice(p, z) for p in plane_files.values()])
        pred = soft_vote(stack)
        name = f"soft vote, {len(plane_files)} planes"
    if disagree is None and plane_files:
        stack = np.stack([_plane_slice(p, z) for p in plane_files.values()])
        disagree = uncertainty_maps(stack, pred)["disagreement"].astype(np.float32) / 255.0
    fig, axes = plt.subplots(1, 3 + (disagree is not None), figsize=(16 if disagree is not None else 12, 4.4))
    axes[0].imshow(img, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("image")
    axes[1].imshow(overlay(img, ref))
    axes[1].set_title("reference")
    axes[2].imshow(overlay(img, pred))
    axes[2].set_title(f"prediction ({name})")
    if disagree is not None:
        im = axes[3].imshow(disagree, cmap="magma", vmin=0, vmax=1)
        axes[3].set_title("plane disagreement")
        fig.colorbar(im, ax=axes[3], fraction=0.046, pad=0.02, label="fraction of planes ≠ fused label")
    for ax in axes:
        ax.axis("off")
    fig.legend(handles=[Patch(color=CLASS_COLOURS[c], label=CLASS_LABELS[c]) for c in (1, 2, 3)], loc="lower center",
               ncol=3, fontsize=9)
    fig.suptitle(f"slice {z} of S_rc (paper Fig. 5)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = _save(fig, out)
    plt.close(fig)
    return path


def segmentation_overview(image: VolumeRef, segmentation: Path, out: Path, *, title: str = "") -> Path:
    """The middle slice of each slicing plane (S_rc, S_cp, S_pr): grey values, labels, plane (and fold) disagreement.

    ``segmentation``: an HDF5 file of ``python -m model.predict`` with ``labels`` and, if written, the uncertainty
    maps ``disagreement`` and ``fold_disagreement`` (a column each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    with h5py.File(segmentation, "r") as f:
        maps = [m for m in ("disagreement", "fold_disagreement") if m in f]
        rows = []
        for plane, axis in (("rc", 0), ("cp", 1), ("pr", 2)):
            n, img = middle_slice(image, plane)
            key = tuple(n if a == axis else slice(None) for a in range(3))
            rows.append((plane, n, img, f["labels"][key], [f[m][key].astype(np.float32) / 255.0 for m in maps]))
    cols = 2 + len(maps)
    fig, axes = plt.subplots(3, cols, figsize=(3.6 * cols, 10.5), squeeze=False)
    for r, (plane, n, img, lab, extra) in enumerate(rows):
        axes[r, 0].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_title(f"S_{plane} slice {n}")
        axes[r, 1].imshow(overlay(img, lab))
        axes[r, 1].set_title("labels")
        for c, (name, arr) in enumerate(zip(maps, extra), start=2):
            im = axes[r, c].imshow(arr, cmap="magma", vmin=0, vmax=1)
            axes[r, c].set_title(name.replace("_", " "))
            fig.colorbar(im, ax=axes[r, c], fraction=0.046, pad=0.02)
    for ax in axes.ravel():
        ax.axis("off")
    fig.legend(handles=[Patch(color=CLASS_COLOURS[c], label=CLASS_LABELS[c]) for c in (1, 2, 3)], loc="lower center",
               ncol=3, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97 if title else 1))
    path = _save(fig, out)
    plt.close(fig)
    return path
