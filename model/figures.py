"""Pictures like the paper's Fig. 4 (class probability per plane and fused) and Fig. 5 (labels overlaid)."""

from __future__ import annotations

import typing as tp
from pathlib import Path

import h5py
import numpy as np

from data.volume import VolumeRef, atomic_path, open_volume
from model.fusion import mean_probabilities, soft_vote

CLASS_LABELS = ("background", "bone", "degradation layer", "residual material")
CLASS_COLOURS = np.array([[0, 0, 0], [230, 230, 80], [60, 160, 255], [255, 70, 70]], np.float32) / 255.0


def _plane_slice(path: Path, z: int) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["probabilities"][z]  # (y, x, K) uint8


def _save(fig, out: Path) -> Path:
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return Path(out)


def middle_slice(image: VolumeRef) -> tuple[int, np.ndarray]:
    with open_volume(image) as vol:
        z = int(vol.shape[0]) // 2
        return z, np.asarray(vol[z], np.float32)


def fig4_plane_probabilities(image: VolumeRef, plane_files: tp.Mapping[str, Path], out: Path, *,
                             cls: int = 2, z: tp.Optional[int] = None) -> Path:
    """Fig. 4: probability of one class (default: degradation layer) in slice z of S_rc for single
    planes, the 3-plane and the 9-plane average (Eq. 4), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z0, img = middle_slice(image)
    z = z0 if z is None else z
    if z != z0:
        with open_volume(image) as vol:
            img = np.asarray(vol[z], np.float32)
    stacks = {p: _plane_slice(path, z) for p, path in plane_files.items()}
    panels: list[tuple[str, np.ndarray]] = [("image", img)]
    for p in ("rc", "cp", "pr", "cp_r0", "rc_r1", "rc_r2"):
        if p in stacks:
            panels.append((f"plane {p}", stacks[p][..., cls] / 255.0))
    three = [stacks[p] for p in ("rc", "cp", "pr") if p in stacks]
    if len(three) == 3:
        panels.append(("Avr 3-planes", mean_probabilities(np.stack(three))[..., cls]))
    if len(stacks) == 9:
        panels.append(("Avr 9-planes", mean_probabilities(np.stack(list(stacks.values())))[..., cls]))
    cols = min(len(panels), max(4, (len(panels) + 1) // 2))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols + 0.8, 3.3 * rows + 0.6), squeeze=False,
                             layout="constrained")
    shown = None
    for ax, (title, data) in zip(axes.ravel(), panels):
        im = ax.imshow(data, cmap="gray" if title == "image" else "magma", vmin=0, vmax=1, interpolation="nearest")
        shown = im if title != "image" else shown
        ax.set_title(title, fontsize=10)
    for ax in axes.ravel():
        ax.axis("off")
    if shown is not None:
        fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.6, label=f"P({CLASS_LABELS[cls]})")
    fig.suptitle(f"P({CLASS_LABELS[cls]}), slice {z} of S_rc: single planes and fused (paper Fig. 4)", fontsize=12)
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
    if prediction is not None:
        with h5py.File(prediction, "r") as f:
            pred = f["labels"][z]
            name = str(f.attrs.get("method", "prediction"))
    else:
        pred = soft_vote(np.stack([_plane_slice(p, z) for p in plane_files.values()]))
        name = f"soft vote, {len(plane_files)} planes"
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    axes[0].imshow(img, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("image")
    axes[1].imshow(overlay(img, ref))
    axes[1].set_title("reference")
    axes[2].imshow(overlay(img, pred))
    axes[2].set_title(f"prediction ({name})")
    for ax in axes:
        ax.axis("off")
    fig.legend(handles=[Patch(color=CLASS_COLOURS[c], label=CLASS_LABELS[c]) for c in (1, 2, 3)], loc="lower center",
               ncol=3, fontsize=9)
    fig.suptitle(f"slice {z} of S_rc (paper Fig. 5)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = _save(fig, out)
    plt.close(fig)
    return path
