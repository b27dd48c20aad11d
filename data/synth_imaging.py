"""Imaging model of the synthetic explants: beamline styles and alloys, the attenuation phantom, and the scan
(blur, phase-contrast fringes, ring artefacts, noise, quantisation to 12 or 16 bits)."""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from data.synth_geometry import smooth_field


@dataclasses.dataclass(frozen=True)
class BeamlineStyle:
    """Imaging model of one beamline; attenuation values are in arbitrary units (soft tissue ≈ 0.2)."""

    name: str
    bits: int            # stored bit depth (paper: 12- or 16-bit)
    offset: float        # grey value of zero attenuation, in counts
    gain: float          # counts per attenuation unit
    blur_sigma: float    # detector / reconstruction blur, voxels
    fringe_k: float      # phase-contrast edge enhancement strength
    fringe_sigma: float  # width of the edge fringes, voxels
    ring_amp: float      # ring artefact amplitude, attenuation units
    noise: float         # noise std, attenuation units
    bone: float          # attenuation of bone
    rm_contrast: float   # scales (RM - bone); lower = less contrast at higher photon energy


BEAMLINES: dict[str, BeamlineStyle] = {
    # P05 (PETRA III): sharper, less noisy, 16-bit.
    "P05": BeamlineStyle("P05", 16, 6000.0, 60000.0, 0.7, 0.45, 0.8, 0.035, 0.030, 0.46, 1.0),
    # I13-2 (Diamond): blurrier, stronger fringes and rings, noisier, lower contrast, 12-bit.
    "I13": BeamlineStyle("I13", 12, 700.0, 3400.0, 0.95, 0.9, 1.0, 0.06, 0.055, 0.44, 0.8),
}

# Residual material attenuation per alloy (Gd absorbs strongly, so Mg-10Gd is brighter).
ALLOYS: dict[str, float] = {"Mg-5Gd": 0.74, "Mg-10Gd": 0.88}


def attenuation(rng: np.random.Generator, style: BeamlineStyle, alloy: str, shape: tuple[int, int, int], L: float,
                s: float, box: tuple[slice, ...], bone: np.ndarray, bubbles: np.ndarray, crack: np.ndarray,
                dl: np.ndarray, dl_tone: np.ndarray, rm: np.ndarray) -> np.ndarray:
    """The attenuation phantom (float32): soft tissue, bone mineral, gas, cracks, the DL's grey range, RM with
    Gd-rich specks; ``bubbles`` … ``rm`` are masks of the box ``box``."""
    mu_bg = 0.20
    mu_rm = style.bone + (ALLOYS[alloy] - style.bone) * style.rm_contrast
    mu = (mu_bg * (1 + 0.07 * smooth_field(rng, shape, 0.15 * L))).astype(np.float32)
    mu += mu_bg * 0.03 * smooth_field(rng, shape, 0.025 * L + 1)  # fine soft-tissue texture
    mineral = style.bone * (1 + 0.05 * smooth_field(rng, shape, 0.1 * L))
    mu[bone] = mineral[bone]
    del mineral
    mb = mu[box]
    mb[bubbles] = 0.03
    mb[crack] = mu_bg * 0.95
    mb[dl] = (style.bone + (mu_rm - style.bone) * dl_tone)[dl]
    speck = ndimage.gaussian_filter(rng.standard_normal(rm.shape, dtype=np.float32), 0.7 * s + 0.3)
    speck_frac = 0.015 if alloy == "Mg-10Gd" else 0.007  # Gd-rich precipitates in the Mg matrix
    specks = rm & (speck > np.quantile(speck[::2, ::2, ::2], 1 - speck_frac))
    mb[rm] = mu_rm
    mb[specks] = mu_rm + 0.15
    return mu


def optics(style: BeamlineStyle, mu: np.ndarray) -> np.ndarray:
    """Detector / reconstruction blur and phase-contrast edge fringes of the phantom ``mu``."""
    img = ndimage.gaussian_filter(mu, style.blur_sigma)
    img -= style.fringe_k * ndimage.gaussian_laplace(mu, style.fringe_sigma)
    return img


def detector(rng: np.random.Generator, style: BeamlineStyle, img: np.ndarray, L: float) -> np.ndarray:
    """Rings about the rotation axis and noise added to ``img`` (in place), then quantised to the style's bits (uint16)."""
    img += rings(rng, img.shape[1:], L, style.ring_amp)[None]
    noise = ndimage.gaussian_filter(rng.standard_normal(img.shape, dtype=np.float32), 0.6)
    noise *= np.float32(style.noise / max(float(noise.std()), 1e-6))
    img += noise
    del noise
    maxval = float(2 ** style.bits - 1)
    return np.clip(np.rint(style.offset + style.gain * img), 0, maxval).astype(np.uint16)


def rings(rng: np.random.Generator, yx: tuple[int, int], L: float, amp: float) -> np.ndarray:
    """Concentric rings about the rotation axis (volume centre), identical in every axial slice."""
    y, x = np.ogrid[:yx[0], :yx[1]]
    r = np.hypot(y - (yx[0] - 1) / 2, x - (yx[1] - 1) / 2).astype(np.float32)
    n_r = int(r.max()) + 3
    profile = 0.25 * rng.standard_normal(n_r)  # faint ring on every radius (pixel gain noise)
    for _ in range(int(rng.integers(6, 14))):  # a few strong rings (defective detector pixels)
        profile[int(rng.integers(1, n_r - 1))] += rng.normal(0, 2.5)
    profile = ndimage.gaussian_filter1d(profile, 0.6)
    return (amp * np.interp(r, np.arange(n_r), profile)).astype(np.float32)
