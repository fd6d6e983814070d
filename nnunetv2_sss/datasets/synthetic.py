"""A small cardiac-like dataset generated on the spot, so demos and tests need no download and no licence.

Each case is a short-axis stack: a bright blood pool (label 3, LV-like cavity) inside a dark ring (label 2,
myocardium-like), a crescent-ish bright blob beside it (label 1, RV-like), inside a body ellipse with a few
distractor structures, a smooth bias field, blur and noise. Centre, radii, intensities and the bias field are
random per case; the shapes shrink smoothly from base to apex and the last slices of some cases are empty, so a
network learns it within minutes on a CPU yet has to use context (the myocardium is as dark as some background,
bright distractors look like blood). The RV blood is brighter than the LV's: with RV and LV blood alike, stock
supervised nnU-Net on the 4 training cases of the demo still predicted no RV pixel after 300 iterations
(seed 0), so the demo could not show every class learned in a few minutes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from scipy.ndimage import gaussian_filter

from nnunetv2_sss.datasets.label_budget import DatasetToolError, raw_root, staged_raw_dataset
from nnunetv2_sss.unlabeled.layout import unlabeled_raw_folder

SPACING_ZYX = (5.0, 1.5, 1.5)
LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
FILE_ENDING = ".nii.gz"
_SPLITS = {"imagesTr": ("syn_tr", 1), "imagesUnlabeled": ("syn_un", 2), "imagesTs": ("syn_ts", 3)}


def write_nifti(arr: np.ndarray, path: Path, spacing_zyx: tuple[float, float, float]) -> None:
    """Write a (Z, Y, X) array; SimpleITK wants the spacing as (x, y, z), hence the reversal."""
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    sitk.WriteImage(img, str(path), useCompression=True)


def synthetic_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One (image float32, label uint8) pair of shape (Z, Y, X); all randomness comes from ``rng``."""
    nz, ny, nx = shape
    yy, xx = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64), indexing="ij")
    size = min(ny, nx)
    # per-case anatomy (in pixels of the in-plane grid)
    cy = ny / 2 + rng.uniform(-0.1, 0.1) * ny
    cx = nx / 2 + rng.uniform(-0.1, 0.1) * nx
    r_cav = rng.uniform(0.10, 0.15) * size
    wall = rng.uniform(0.045, 0.075) * size
    rv_angle = rng.uniform(0.75, 1.25) * np.pi  # RV sits on the left-ish side, as in short-axis views
    # the RV is large enough (about half the MYO area) for a few minutes of CPU training to learn it
    rv_rx, rv_ry = rng.uniform(0.19, 0.24) * size, rng.uniform(0.11, 0.14) * size
    body_ry, body_rx = rng.uniform(0.40, 0.47) * ny, rng.uniform(0.42, 0.49) * nx
    n_empty = int(rng.integers(0, 2)) if nz >= 4 else 0  # apical slices beyond the heart
    n_heart = nz - n_empty
    drift = rng.normal(0, 0.015 * size, size=2)  # centre moves slightly from base to apex
    # intensities: blood bright, muscle dark, body medium; RV blood the brightest (see the module docstring)
    i_body, i_blood, i_muscle = rng.uniform(0.4, 0.55), rng.uniform(0.8, 1.0), rng.uniform(0.08, 0.2)
    i_rv = i_blood * rng.uniform(1.25, 1.4)
    distractors = [(rng.uniform(0.2, 0.8) * ny, rng.uniform(0.2, 0.8) * nx, rng.uniform(0.04, 0.08) * size,
                    rng.uniform(0.1, 0.95)) for _ in range(3)]

    image = np.zeros(shape, dtype=np.float64)
    label = np.zeros(shape, dtype=np.uint8)
    for z in range(nz):
        body = ((yy - ny / 2) / body_ry) ** 2 + ((xx - nx / 2) / body_rx) ** 2 <= 1
        sl = np.where(body, i_body, 0.02)
        for dy, dx, r, val in distractors:
            sl = np.where(body & ((yy - dy) ** 2 + (xx - dx) ** 2 <= r ** 2), val, sl)
        if z < n_heart:
            t = z / max(n_heart - 1, 1)  # 0 at the base, 1 at the apex
            scale = 1.0 - 0.55 * t ** 1.5
            ccy, ccx = cy + drift[0] * z, cx + drift[1] * z
            d = np.hypot(yy - ccy, xx - ccx)
            rc = r_cav * scale * (1.0 - 0.35 * t)  # the cavity closes faster than the wall
            cavity = d <= rc
            outer = rc + wall * (0.8 + 0.4 * t)
            ring = (d > rc) & (d <= outer)
            rv = np.zeros_like(ring)
            rv_scale = 1.0 - 0.9 * t  # the RV ends before the apex
            if rv_scale > 0.15:
                off = outer + rv_ry * rv_scale * 0.5
                ry, rx = ccy + off * np.sin(rv_angle), ccx + off * np.cos(rv_angle)
                rv = (((yy - ry) / (rv_ry * rv_scale)) ** 2 + ((xx - rx) / (rv_rx * rv_scale)) ** 2 <= 1)
                rv &= ~(cavity | ring)
            sl = np.where(ring, i_muscle, sl)
            sl = np.where(cavity, i_blood, sl)
            sl = np.where(rv, i_rv, sl)
            label[z][rv] = 1
            label[z][ring] = 2
            label[z][cavity] = 3
        image[z] = sl
    # partial volume, smooth multiplicative bias field (coil sensitivity) and Rician-like noise
    image = gaussian_filter(image, sigma=(0, 0.8, 0.8))
    coef = rng.normal(0, 0.25, size=5)
    u, v = (yy / ny - 0.5) * 2, (xx / nx - 0.5) * 2
    bias = np.exp(coef[0] * u + coef[1] * v + coef[2] * u * v + coef[3] * u ** 2 + coef[4] * v ** 2)
    image = image * bias[None] * rng.uniform(0.8, 1.2, size=(nz, 1, 1))
    noise = rng.uniform(0.03, 0.08)
    image = np.hypot(image + rng.normal(0, noise, shape), rng.normal(0, noise, shape))
    return (image * 1000.0).astype(np.float32), label


def make_synthetic_dataset(dataset_id: int = 990, name: str = "SSSSynthetic", n_labeled: int = 6,
                           n_unlabeled: int = 16, n_test: int = 6, seed: int = 0,
                           shape: tuple[int, int, int] = (6, 64, 64), overwrite: bool = False) -> Path:
    """Write the synthetic dataset to ``nnUNet_raw/DatasetXXX_Name`` and return that folder.

    Labeled cases go to imagesTr/labelsTr, unlabeled ones to imagesUnlabeled (their labels are never written),
    test cases to imagesTs/labelsTs. Volumes are (Z, Y, X) = ``shape`` with spacing (z, y, x) = (5.0, 1.5, 1.5) mm,
    one channel ("MRI"). Case i of a split depends only on (seed, split, i), so changing one count leaves the other
    cases unchanged, and the same arguments always give the same data.
    """
    for arg, value, low in (("n_labeled", n_labeled, 1), ("n_unlabeled", n_unlabeled, 0), ("n_test", n_test, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DatasetToolError(f"{arg} must be an integer >= {low}, got {value!r}.")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or shape[0] < 1 or min(shape[1:]) < 16:
        raise DatasetToolError(f"shape must be (Z, Y, X) with Z >= 1 and Y, X >= 16, got {shape!r}.")
    counts = {"imagesTr": n_labeled, "imagesUnlabeled": n_unlabeled, "imagesTs": n_test}
    with staged_raw_dataset(dataset_id, name, overwrite) as out:
        for split, count in counts.items():
            if count == 0:
                continue
            prefix, split_code = _SPLITS[split]
            img_dir = unlabeled_raw_folder(out) if split == "imagesUnlabeled" else out / split
            img_dir.mkdir()
            lab_dir = None if split == "imagesUnlabeled" else out / split.replace("images", "labels")
            if lab_dir is not None:
                lab_dir.mkdir()
            for i in range(count):
                image, label = synthetic_case(np.random.default_rng([seed, split_code, i]), shape)
                case = f"{prefix}{i:03d}"
                write_nifti(image, img_dir / f"{case}_0000{FILE_ENDING}", SPACING_ZYX)
                if lab_dir is not None:
                    write_nifti(label, lab_dir / f"{case}{FILE_ENDING}", SPACING_ZYX)
        generate_dataset_json(str(out), {0: "MRI"}, dict(LABELS), n_labeled, FILE_ENDING, dataset_name=name,
                              description="Synthetic cardiac-like short-axis stacks made by nnunetv2_sss "
                                          f"(seed {seed}, shape {list(shape)}); RV/MYO/LV are look-alikes only.",
                              license="CC0 (generated)", converted_by="nnunetv2_sss.datasets.synthetic",
                              sss_synthetic={"seed": seed, "shape": list(shape), "n_labeled": n_labeled,
                                             "n_unlabeled": n_unlabeled, "n_test": n_test})
    return raw_root() / f"Dataset{dataset_id:03d}_{name}"
