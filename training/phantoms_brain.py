"""Synthetic T1-weighted brain "patients" from the MNI ICBM152 2009a template that ships inside
the ``nilearn`` wheel (``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted``).

Each patient is the template under a small random 3D affine (rotation, anisotropic scale,
shift) plus a smooth elastic displacement, with its own intensity gain / gamma, a multiplicative
bias field and Rician noise. Labels are the argmax of (background, grey matter, white matter)
probabilities resampled with the same warp: 1 = grey matter, 2 = white matter.

Only the slices that are needed are resampled (never the whole warped volume), so a patient
costs well under a second. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

__all__ = ["MNITemplate", "load_mni_template", "mni_data_dir", "brain_patient", "BrainPatient",
           "template_labels", "CROP_X", "CROP_Y"]

# In-plane crop of the 197 x 233 template (x = left-right columns, y = posterior-anterior rows):
# the brain spans x 27..169 and y 28..207 voxels; 168 x 192 leaves a margin for the warps.
CROP_X = (14, 182)
CROP_Y = (22, 214)
_FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
          "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
          "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}


def mni_data_dir() -> Path:
    """``nilearn/datasets/data`` of the installed wheel (found without importing nilearn).

    Raises:
        FileNotFoundError: nilearn is not installed or its wheel lacks the ICBM152 files.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the demo brain needs the 'nilearn' package "
                                "(pip install 'segmote[train]'); it ships the MNI template")
    base = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [f for f in _FILES.values() if not (base / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{base}: the nilearn wheel lacks {missing}")
    return base


@dataclass(frozen=True)
class MNITemplate:
    """The template arrays in voxel order ``(x, y, z)`` as float32 in [0, 1] (1 mm isotropic)."""

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    affine: np.ndarray


def load_mni_template(data_dir: str | Path | None = None) -> MNITemplate:
    """Read T1, GM and WM maps (uint8 on disk) with nibabel; values scaled to [0, 1]."""
    import nibabel as nib

    base = Path(data_dir) if data_dir is not None else mni_data_dir()
    arrays = {}
    affine = None
    for key, name in _FILES.items():
        img = nib.load(str(base / name))
        arrays[key] = np.asarray(img.dataobj, dtype=np.float32) / 255.0
        affine = img.affine
    return MNITemplate(arrays["t1"], arrays["gm"], arrays["wm"], np.asarray(affine, float))


def template_labels(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Argmax of (background = 1 - gm - wm, gm, wm): 0 background, 1 grey, 2 white matter.
    Any shape; probabilities in [0, 1]."""
    bg = np.clip(1.0 - gm - wm, 0.0, 1.0)
    return np.argmax(np.stack([bg, gm, wm]), axis=0).astype(np.uint8)


@dataclass(frozen=True)
class BrainPatient:
    """One synthetic patient.

    Attributes:
        image: (Z, Y, X) float32 T1-weighted intensities (arbitrary scanner units, >= 0);
            rows run anterior (top) to posterior, columns along the template's x axis.
        labels: (Z, Y, X) uint8: 0 background, 1 grey matter, 2 white matter.
        spacing: (z, y, x) mm.
        template_z: (Z,) template voxel z of each slice (before the warp).
        params: the random parameters (JSON-able), kept in the case attrs.
    """

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    template_z: np.ndarray
    params: dict


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def brain_patient(template: MNITemplate, rng: np.random.Generator, *, z_step: int = 4,
                  max_slices: int | None = None, strength: float = 1.0,
                  min_brain_pixels: int = 1500) -> BrainPatient:
    """Warp the template into one patient and resample its axial slices.

    Args:
        template: from :func:`load_mni_template`.
        rng: the patient's random generator (all randomness comes from it).
        z_step: slice distance in template voxels (mm).
        max_slices: keep at most this many slices (evenly spread over the brain), or all.
        strength: 0 = the template itself (no warp, gain 1000, no bias, no noise), 1 = default.
        min_brain_pixels: slices with fewer grey + white matter pixels are dropped.
    Returns:
        A :class:`BrainPatient` whose slices all contain brain.
    """
    nx, ny, nz = template.t1.shape
    center = np.array([nx / 2, ny / 2, 75.0])
    angles = rng.uniform(-1, 1, 3) * np.deg2rad([4.0, 4.0, 9.0]) * strength
    scale = 1.0 + strength * rng.uniform(-0.09, 0.03, 3)
    shift = strength * rng.uniform(-3, 3, 3)
    matrix = _rotation(*angles) @ np.diag(1.0 / scale)
    gain = 1000.0 if strength == 0 else float(rng.uniform(600, 1400))
    gamma = 1.0 + strength * float(rng.uniform(-0.15, 0.2))
    noise_sd = strength * float(rng.uniform(0.008, 0.025))
    control = rng.normal(0, 2.0 * strength, (3, 5, 5, 5))        # elastic field, mm, 5^3 knots
    bias_coef = strength * rng.uniform(-0.12, 0.12, 6)
    zs = np.arange(8, 160, z_step, dtype=float)
    if max_slices is not None and max_slices <= 8:           # few slices: from the mid-brain only
        zs = np.linspace(50, 120, max_slices).round()
    ys = np.arange(CROP_Y[1] - 1, CROP_Y[0] - 1, -1, dtype=float)   # anterior at the top
    xs = np.arange(CROP_X[0], CROP_X[1], dtype=float)
    qz, qy, qx = np.meshgrid(zs, ys, xs, indexing="ij")
    q = np.stack([qx, qy, qz])                                      # (3, Z, Y, X) target voxels
    src = np.einsum("ij,j...->i...", matrix, q - center[:, None, None, None])
    src += (center + shift)[:, None, None, None]
    knots = np.stack([q[i] / np.array([nx, ny, nz])[i] * 4 for i in range(3)])
    for i in range(3):
        src[i] += ndimage.map_coordinates(control[i], knots, order=3, mode="nearest")
    t1 = ndimage.map_coordinates(template.t1, src, order=1, mode="constant", cval=0.0)
    gm = ndimage.map_coordinates(template.gm, src, order=1, mode="constant", cval=0.0)
    wm = ndimage.map_coordinates(template.wm, src, order=1, mode="constant", cval=0.0)
    labels = template_labels(gm, wm)
    brain = (labels > 0).reshape(len(zs), -1).sum(1)
    keep = np.flatnonzero(brain >= min_brain_pixels)
    if keep.size == 0:
        raise ValueError("no slice of the warped template holds brain (check the template files)")
    keep = np.arange(keep[0], keep[-1] + 1)
    if max_slices is not None and keep.size > max_slices:
        keep = keep[np.linspace(0, keep.size - 1, max_slices).round().astype(int)]
    t1, labels, qn = t1[keep], labels[keep], q[:, keep] / np.array([nx, ny, nz])[:, None, None, None]
    u, v, w = qn[0] - 0.5, qn[1] - 0.5, qn[2] - 0.5
    bias = np.exp(bias_coef[0] * u + bias_coef[1] * v + bias_coef[2] * w
                  + bias_coef[3] * u * v + bias_coef[4] * (u ** 2 - 0.08) + bias_coef[5] * v ** 2)
    signal = gain * np.clip(t1, 0, None) ** gamma * bias
    sd = noise_sd * gain
    image = np.sqrt((signal + rng.normal(0, sd, signal.shape)) ** 2
                    + rng.normal(0, sd, signal.shape) ** 2)            # Rician magnitude noise
    params = {"angles_deg": np.rad2deg(angles).round(3).tolist(), "scale": scale.round(4).tolist(),
              "shift_mm": shift.round(3).tolist(), "gain": round(gain, 2),
              "gamma": round(gamma, 4), "noise_sd": round(sd, 3),
              "elastic_sd_mm": 2.0 * strength}
    dz = float(np.diff(zs[keep]).mean()) if keep.size > 1 else float(z_step)   # mm between slices
    return BrainPatient(image.astype(np.float32), labels.astype(np.uint8),
                        (dz, 1.0, 1.0), zs[keep].astype(int), params)
