"""Geometry of SAM-2 prompts made from a label map: the prompt records, the box and points of one 2D component
(``PromptBuilder``, shared by PCSW's modes and the naive baseline) and the volume/spacing helpers they rest on.

Prompts, per accepted (slice, class):

* one positive point at the component's deepest pixel (argmax of the in-plane Euclidean distance transform with the
  in-plane spacing as sampling) -- never the centroid, which falls in the hole of a ring such as the myocardium;
* a box: the component's bounding box enlarged by a margin on each side, clipped to the image;
* optionally one negative point per *other* foreground class present inside the box, at that class's deepest pixel
  within the box (e.g. the LV cavity inside the myocardium's box), so SAM-2 does not swallow the neighbour.

Coordinate conventions (SAM / SAM-2 convention, in the slice's own pixel grid of shape (H, W) = (Y, X)):

* points are ``(x, y) = (col, row)`` integer pixel indices stored as float32, shape (N, 2); labels 1 = positive,
  0 = negative, shape (N,). The positive point is always first.
* the box is ``(x0, y0, x1, y1)`` float32 with ``x0, y0`` INCLUSIVE (first covered column/row) and ``x1, y1``
  EXCLUSIVE (last covered column/row + 1), i.e. ``mask[y0:y1, x0:x1]`` is the boxed region and
  ``0 <= x0 < x1 <= W``, ``0 <= y0 < y1 <= H``. (SAM's own mask-to-box is inclusive; the half pixel is far below the
  margin.)
* ``SAM2ImagePredictor.predict(..., normalize_coords=True)`` expects exactly these original-image coordinates and
  rescales them itself. Use :func:`to_sam_coords` only when *you* resize the image before handing it to SAM.

Pure numpy/scipy: no sam2 or torch import here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage


@dataclass
class SlicePrompt:
    """SAM-2 prompt for one class on one slice (coordinates: see the module docstring)."""

    z: int
    label: int
    point_coords: np.ndarray  # (N, 2) float32, (x, y) = (col, row); positive point first
    point_labels: np.ndarray  # (N,) int32, 1 positive / 0 negative
    box: np.ndarray  # (4,) float32, (x0, y0, x1, y1), x1/y1 exclusive
    component_area: float  # mm² with spacing, else px²
    component_pixels: int
    consistency: float  # largest-component fraction of the deciding window
    score: float  # mean class probability over the component if probabilities were given, else = consistency
    window: tuple[int, int]  # [start, stop) slices of the deciding window


@dataclass
class ComponentPrompt:
    """Component mode: one kept 3D component of one class, prompted once on its key (largest-area) slice."""

    prompt: SlicePrompt  # the key-slice prompt; prompt.z is the key slice
    z_range: tuple[int, int]  # [start, stop) slices the component spans: SAM-2 carries the prompt through them
    voxels: int  # voxels of the 3D component
    continuity: float  # mean share of the class's voxels this component holds in the windows over its slices

    @property
    def label(self) -> int:
        return self.prompt.label

    @property
    def key_z(self) -> int:
        return self.prompt.z


def as_volume(seg: np.ndarray) -> np.ndarray:
    """(Y, X) or (Z, Y, X) integer label map -> (Z, Y, X). Floats are refused: they are probabilities, not labels."""
    seg = np.asarray(seg)
    if not (np.issubdtype(seg.dtype, np.integer) or seg.dtype == bool):
        raise TypeError(f"seg must be an integer label map, got dtype {seg.dtype}")
    if seg.ndim == 2:
        return seg[None]
    if seg.ndim == 3:
        return seg
    raise ValueError(f"seg must be (Y, X) or (Z, Y, X), got shape {seg.shape}")


def spacing3(spacing: Sequence[float] | None, shape: tuple[int, ...]) -> tuple[float, float, float]:
    """(z, y, x) spacing; a 2-tuple (y, x) is accepted for single-slice input. None -> unit pixels."""
    if spacing is None:
        return 1.0, 1.0, 1.0
    sp = tuple(float(s) for s in spacing)
    if len(sp) == 2 and shape[0] == 1:
        sp = (1.0, *sp)
    if len(sp) != 3 or min(sp) <= 0:
        raise ValueError(f"spacing must be positive (z, y, x) (or (y, x) for a single slice), got {spacing}")
    return sp  # type: ignore[return-value]


def bbox2d(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) inclusive bounds of a non-empty 2D mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def deepest_point(mask: np.ndarray, sampling: tuple[float, float]) -> tuple[int, int]:
    """(row, col) of the EDT maximum of a non-empty 2D mask; the image border counts as outside the object."""
    r0, r1, c0, c1 = bbox2d(mask)
    crop = np.pad(mask[r0:r1 + 1, c0:c1 + 1], 1)
    dist = ndimage.distance_transform_edt(crop, sampling=sampling)
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(r) - 1 + r0, int(c) - 1 + c0


def _margin(side: int, frac: float, min_px: int) -> int:
    return max(int(min_px), int(math.ceil(frac * side - 1e-9)))


class PromptBuilder:
    """Box + deepest positive point (+ negative points) of one 2D component; shared by every prompting mode so
    that PCSW, its per-component variant and the naive baseline differ only in which components they prompt."""

    def __init__(self, vol: np.ndarray, labels: Sequence[int], sampling: tuple[float, float], *, box_margin: float,
                 min_margin_px: int, negative_points: bool) -> None:
        self.vol, self.labels, self.sampling = vol, list(labels), sampling
        self.box_margin, self.min_margin_px, self.negative_points = box_margin, min_margin_px, negative_points
        self._edt: dict[tuple[int, int], np.ndarray] = {}  # (z, label) -> in-plane EDT, shared across classes

    def _edt_of(self, z: int, lab: int) -> np.ndarray:
        key = (z, lab)
        if key not in self._edt:
            self._edt[key] = ndimage.distance_transform_edt(np.pad(self.vol[z] == lab, 1),
                                                            sampling=self.sampling)[1:-1, 1:-1]
        return self._edt[key]

    def build(self, z: int, c: int, comp2d: np.ndarray, area: float, consistency: float, score: float,
              window: tuple[int, int]) -> SlicePrompt:
        height, width = comp2d.shape
        r0, r1, c0, c1 = bbox2d(comp2d)
        pr, pc = deepest_point(comp2d, self.sampling)
        my = _margin(r1 - r0 + 1, self.box_margin, self.min_margin_px)
        mx = _margin(c1 - c0 + 1, self.box_margin, self.min_margin_px)
        y0, y1 = max(0, r0 - my), min(height, r1 + 1 + my)
        x0, x1 = max(0, c0 - mx), min(width, c1 + 1 + mx)
        coords = [(pc, pr)]
        point_labels = [1]
        if self.negative_points:
            box_labels = np.unique(self.vol[z, y0:y1, x0:x1])
            for o in self.labels:
                if o == c or o not in box_labels:
                    continue
                sub = self._edt_of(z, o)[y0:y1, x0:x1]
                nr, nc = np.unravel_index(int(np.argmax(sub)), sub.shape)
                coords.append((x0 + int(nc), y0 + int(nr)))
                point_labels.append(0)
        return SlicePrompt(
            z=z,
            label=c,
            point_coords=np.asarray(coords, dtype=np.float32).reshape(-1, 2),
            point_labels=np.asarray(point_labels, dtype=np.int32),
            box=np.asarray([x0, y0, x1, y1], dtype=np.float32),
            component_area=float(area),
            component_pixels=int(comp2d.sum()),
            consistency=float(consistency),
            score=float(score),
            window=window,
        )


def to_sam_coords(prompt: SlicePrompt, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> SlicePrompt:
    """Copy of ``prompt`` rescaled from an (H, W) = src_hw image to one resized to dst_hw.

    x scales by dst_w / src_w and y by dst_h / src_h, the same plain scaling SAM applies to prompts when it
    resizes (coordinates are treated as continuous; boxes keep their exclusive right/bottom edge). Only for images
    you resize yourself: SAM2ImagePredictor(normalize_coords=True) already does this from the original size.
    """
    (src_h, src_w), (dst_h, dst_w) = src_hw, dst_hw
    if min(src_h, src_w, dst_h, dst_w) <= 0:
        raise ValueError(f"sizes must be positive, got {src_hw} -> {dst_hw}")
    fx, fy = dst_w / src_w, dst_h / src_h
    coords = prompt.point_coords.astype(np.float32) * np.asarray([fx, fy], dtype=np.float32)
    box = prompt.box.astype(np.float32) * np.asarray([fx, fy, fx, fy], dtype=np.float32)
    return replace(prompt, point_coords=coords, point_labels=prompt.point_labels.copy(), box=box)
