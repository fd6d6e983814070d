"""PCSW prompt generator (Physical Constraints + Sliding Window, SSS: Zhu et al. 2025, arXiv 2506.08949).

Turns the network's own prediction on an unlabeled volume into box/point prompts for SAM-2. Two modes
(``PCSWConfig.mode``):

* ``"component"`` (default, SSS as described): ``generate_component_prompts`` keeps each 3D component of a class
  whose continuity over the sliding window reaches tau and prompts it ONCE, on its largest-area slice; SAM-2's video
  predictor carries it through the component's other slices (``propagation.py``). SAM-2 then outlines those slices
  from its memory of the key slice, so it can correct -- and add to -- what the student predicted there.
* ``"slice"``: ``generate_prompts`` below prompts every accepted (slice, class) from that slice's own prediction;
  each SAM box is the student's box plus a margin, so SAM can only relabel pixels near the student's own mask.

``naive_prompts`` (every in-plane component on every slice, no filter) is the baseline prompt quality is measured
against (``scripts/benchmark_prompts.py``). Slice mode in detail -- a (slice, class) pair is prompted only when the
prediction around it looks physically sound:

1. Sliding-window consistency. For slice ``z`` and class ``c`` take a window of ``config.window`` consecutive
   slices (by default the one centred on ``z``, shifted -- not shrunk -- at the volume ends). Label the class's 3D
   connected components inside the window (``scipy.ndimage.label``; 26-connectivity by default, so a structure that
   shifts diagonally between thick slices stays one object). The window is consistent when the largest component
   holds at least ``tau`` of the class's voxels in the window: a real organ is one coherent object across
   neighbouring slices, while a prediction split into comparable pieces is a guess SAM-2 would amplify.
2. The class's component on slice ``z`` is the largest 3D component intersected with the slice (stray specks are
   thereby dropped). It must pass the plausibility limits learned from the labeled cases (per-slice area and bounding
   box extent, in mm when spacings are known, else in pixels).

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

__all__ = [
    "ClassLimits",
    "PCSWConfig",
    "PCSWReport",
    "PlausibilityLimits",
    "PromptDecision",
    "SlicePrompt",
    "ComponentPrompt",
    "generate_component_prompts",
    "generate_prompts",
    "learn_plausibility_limits",
    "naive_prompts",
    "to_sam_coords",
]

# Rejection reasons (stable strings: the trainer logs and counts them).
OK = "ok"
INCONSISTENT = "inconsistent"  # largest 3D component of the window holds < tau of the class's voxels
NOT_IN_LARGEST = "not_in_largest_component"  # the class is on the slice only as a speck outside the main object
TOO_FEW_PIXELS = "too_few_pixels"  # fewer than config.min_pixels: too small for a meaningful SAM prompt
AREA_BELOW = "area_below_limit"
AREA_ABOVE = "area_above_limit"
EXTENT_BELOW = "extent_below_limit"
EXTENT_ABOVE = "extent_above_limit"
LOW_SCORE = "low_score"  # mean class probability over the component < config.min_score

_CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}


@dataclass(frozen=True)
class PCSWConfig:
    """Knobs of the generator.

    window: consecutive slices in the sliding window (1 = purely 2D, no cross-slice check).
    tau: physical consistency threshold on (largest 3D component voxels) / (class voxels in the window).
    window_mode: "centred" -- only the window centred on the slice (shifted at the volume ends) decides, so the
        decision looks symmetrically up and down; "any" -- the slice is prompted if any window containing it is
        consistent (the most consistent one supplies the component), which is more permissive at object ends.
    connectivity: 3D connectivity of the components, 6, 18 or 26.
    box_margin: margin added on each side of the box, as a fraction of the box side along that axis (rounded up).
    min_margin_px: lower bound of that margin in pixels, so tiny objects still get some context.
    negative_points: add one negative point per other foreground class inside the box.
    min_pixels: components with fewer pixels on the slice get no prompt (too small to steer SAM), regardless of
        the learned limits.
    min_score: with class probabilities given, the mean probability of the class over the component must reach
        this; 0 disables the check.
    mode: "component" (SSS) -- one prompt per kept 3D component, on its largest-area slice, carried through the
        component's other slices by SAM-2's video predictor (``generate_component_prompts``); "slice" -- one
        prompt per accepted (slice, class), each decoded on its own slice (``generate_prompts``).
    """

    window: int = 3
    tau: float = 0.8
    window_mode: str = "centred"
    connectivity: int = 26
    box_margin: float = 0.05
    min_margin_px: int = 1
    negative_points: bool = True
    min_pixels: int = 5
    min_score: float = 0.0
    mode: str = "component"

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        if self.window_mode not in ("centred", "any"):
            raise ValueError(f"window_mode must be 'centred' or 'any', got {self.window_mode!r}")
        if self.connectivity not in _CONNECTIVITY_RANK:
            raise ValueError(f"connectivity must be 6, 18 or 26, got {self.connectivity}")
        if self.box_margin < 0 or self.min_margin_px < 0:
            raise ValueError("box_margin and min_margin_px must be >= 0")
        if self.min_pixels < 1:
            raise ValueError(f"min_pixels must be >= 1, got {self.min_pixels}")
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {self.min_score}")
        if self.mode not in ("component", "slice"):
            raise ValueError(f"mode must be 'component' (key slice + SAM-2 propagation) or 'slice' (every slice "
                             f"prompted on its own), got {self.mode!r}")


@dataclass(frozen=True)
class ClassLimits:
    """Plausible per-slice size of one class: area (mm² or px²) and bounding-box extent (mm or px).

    min_extent bounds the shorter bbox side, max_extent the longer one.
    """

    min_area: float
    max_area: float
    min_extent: float
    max_extent: float
    n_slices: int = 0  # labeled slices the limits were learned from (for the log)


@dataclass
class PlausibilityLimits:
    """Per-class limits learned from the labeled cases; classes without an entry are not checked."""

    per_class: dict[int, ClassLimits]
    units: str = "px"  # "mm" when learned with spacings, else "px"; generate_prompts refuses to mix them
    slack: float = 0.5

    def check(self, label: int, area: float, short_side: float, long_side: float) -> str:
        """Return OK or the first violated limit's reason."""
        lim = self.per_class.get(int(label))
        if lim is None:
            return OK
        if area < lim.min_area:
            return AREA_BELOW
        if area > lim.max_area:
            return AREA_ABOVE
        if short_side < lim.min_extent:
            return EXTENT_BELOW
        if long_side > lim.max_extent:
            return EXTENT_ABOVE
        return OK

    def to_dict(self) -> dict:
        """JSON-ready dict (class keys become strings, as JSON requires)."""
        return {
            "units": self.units,
            "slack": self.slack,
            "per_class": {
                str(k): {
                    "min_area": v.min_area,
                    "max_area": v.max_area,
                    "min_extent": v.min_extent,
                    "max_extent": v.max_extent,
                    "n_slices": v.n_slices,
                }
                for k, v in sorted(self.per_class.items())
            },
        }

    @classmethod
    def from_dict(cls, d: dict) -> PlausibilityLimits:
        per_class = {
            int(k): ClassLimits(
                min_area=float(v["min_area"]),
                max_area=float(v["max_area"]),
                min_extent=float(v["min_extent"]),
                max_extent=float(v["max_extent"]),
                n_slices=int(v.get("n_slices", 0)),
            )
            for k, v in d["per_class"].items()
        }
        return cls(per_class=per_class, units=str(d.get("units", "px")), slack=float(d.get("slack", 0.5)))


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


@dataclass(frozen=True)
class PromptDecision:
    """Why a (slice, class) with the class present on the slice was or was not prompted."""

    z: int
    label: int
    accepted: bool
    reason: str
    consistency: float
    area: float  # nan when the decision came before the component was measured
    z_range: tuple[int, int] | None = None  # component mode: [start, stop) slices of the component; z = key slice


@dataclass
class PCSWReport:
    """Accepted/rejected counts per class and reasons, for logging. Slice mode counts (slice, class) pairs with the
    class present (slices without it are not counted); component mode counts 3D components."""

    accepted: dict[int, int] = field(default_factory=dict)
    rejected: dict[int, dict[str, int]] = field(default_factory=dict)
    decisions: list[PromptDecision] = field(default_factory=list)

    def record(self, decision: PromptDecision) -> None:
        self.decisions.append(decision)
        lab = decision.label
        self.accepted.setdefault(lab, 0)
        self.rejected.setdefault(lab, {})
        if decision.accepted:
            self.accepted[lab] += 1
        else:
            self.rejected[lab][decision.reason] = self.rejected[lab].get(decision.reason, 0) + 1

    def to_dict(self) -> dict:
        """Counts only (the decision list is for debugging and can be large)."""
        return {
            "accepted": {str(k): v for k, v in sorted(self.accepted.items())},
            "rejected": {str(k): dict(sorted(v.items())) for k, v in sorted(self.rejected.items())},
        }

    def summary(self) -> str:
        parts = []
        for lab in sorted(set(self.accepted) | set(self.rejected)):
            rej = self.rejected.get(lab, {})
            why = ", ".join(f"{k}={v}" for k, v in sorted(rej.items()))
            parts.append(f"class {lab}: {self.accepted.get(lab, 0)} prompted, {sum(rej.values())} rejected"
                         + (f" ({why})" if why else ""))
        return "; ".join(parts) if parts else "no foreground"


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _as_volume(seg: np.ndarray) -> np.ndarray:
    """(Y, X) or (Z, Y, X) integer label map -> (Z, Y, X). Floats are refused: they are probabilities, not labels."""
    seg = np.asarray(seg)
    if not (np.issubdtype(seg.dtype, np.integer) or seg.dtype == bool):
        raise TypeError(f"seg must be an integer label map, got dtype {seg.dtype}")
    if seg.ndim == 2:
        return seg[None]
    if seg.ndim == 3:
        return seg
    raise ValueError(f"seg must be (Y, X) or (Z, Y, X), got shape {seg.shape}")


def _spacing3(spacing: Sequence[float] | None, shape: tuple[int, ...]) -> tuple[float, float, float]:
    """(z, y, x) spacing; a 2-tuple (y, x) is accepted for single-slice input. None -> unit pixels."""
    if spacing is None:
        return 1.0, 1.0, 1.0
    sp = tuple(float(s) for s in spacing)
    if len(sp) == 2 and shape[0] == 1:
        sp = (1.0, *sp)
    if len(sp) != 3 or min(sp) <= 0:
        raise ValueError(f"spacing must be positive (z, y, x) (or (y, x) for a single slice), got {spacing}")
    return sp  # type: ignore[return-value]


def _bbox2d(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) inclusive bounds of a non-empty 2D mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def _deepest_point(mask: np.ndarray, sampling: tuple[float, float]) -> tuple[int, int]:
    """(row, col) of the EDT maximum of a non-empty 2D mask; the image border counts as outside the object."""
    r0, r1, c0, c1 = _bbox2d(mask)
    crop = np.pad(mask[r0:r1 + 1, c0:c1 + 1], 1)
    dist = ndimage.distance_transform_edt(crop, sampling=sampling)
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(r) - 1 + r0, int(c) - 1 + c0


def _margin(side: int, frac: float, min_px: int) -> int:
    return max(int(min_px), int(math.ceil(frac * side - 1e-9)))


def _window_starts(z: int, n_slices: int, window: int, mode: str) -> list[int]:
    """Start indices of the candidate windows of slice z, the centred one first."""
    last = n_slices - window
    centred = min(max(z - window // 2, 0), last)
    if mode == "centred":
        return [centred]
    others = [s for s in range(max(0, z - window + 1), min(z, last) + 1) if s != centred]
    return [centred, *sorted(others, key=lambda s: abs(s - centred))]


class _PromptBuilder:
    """Box + deepest positive point (+ negative points) of one 2D component; shared by every prompting mode so
    that PCSW, its per-component variant and the naive baseline differ only in which components they prompt."""

    def __init__(self, vol: np.ndarray, labels: Sequence[int], config: PCSWConfig,
                 sampling: tuple[float, float]) -> None:
        self.vol, self.labels, self.config, self.sampling = vol, list(labels), config, sampling
        self._edt: dict[tuple[int, int], np.ndarray] = {}  # (z, label) -> in-plane EDT, shared across classes

    def _edt_of(self, z: int, lab: int) -> np.ndarray:
        key = (z, lab)
        if key not in self._edt:
            self._edt[key] = ndimage.distance_transform_edt(np.pad(self.vol[z] == lab, 1),
                                                            sampling=self.sampling)[1:-1, 1:-1]
        return self._edt[key]

    def build(self, z: int, c: int, comp2d: np.ndarray, area: float, consistency: float, score: float,
              window: tuple[int, int]) -> SlicePrompt:
        config = self.config
        height, width = comp2d.shape
        r0, r1, c0, c1 = _bbox2d(comp2d)
        pr, pc = _deepest_point(comp2d, self.sampling)
        my = _margin(r1 - r0 + 1, config.box_margin, config.min_margin_px)
        mx = _margin(c1 - c0 + 1, config.box_margin, config.min_margin_px)
        y0, y1 = max(0, r0 - my), min(height, r1 + 1 + my)
        x0, x1 = max(0, c0 - mx), min(width, c1 + 1 + mx)
        coords = [(pc, pr)]
        point_labels = [1]
        if config.negative_points:
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


# ----------------------------------------------------------------------------------------------------------------
# public API


def learn_plausibility_limits(
    label_maps: Iterable[np.ndarray],
    spacings: Iterable[Sequence[float]] | None,
    foreground_labels: Sequence[int],
    slack: float = 0.5,
    low_percentile: float = 1.0,
) -> PlausibilityLimits:
    """Learn per-class per-slice size limits from labeled cases.

    For every labeled slice containing class c, measure the class's area and bbox sides (whole class mask on the
    slice). min_area = (1 - slack) * low_percentile-th percentile, max_area = (1 + slack) * max; likewise min_extent
    from the shorter bbox side and max_extent from the longer one. A low percentile rather than the minimum keeps one
    tiny apex slice from disabling the lower limit. ``spacings`` (z, y, x per case) gives mm units; None gives pixels.
    """
    if slack < 0:
        raise ValueError(f"slack must be >= 0, got {slack}")
    maps = list(label_maps)
    sps: list[Sequence[float] | None] = [None] * len(maps) if spacings is None else list(spacings)
    if len(sps) != len(maps):
        raise ValueError(f"{len(maps)} label maps but {len(sps)} spacings")
    labels = [int(c) for c in foreground_labels]
    stats: dict[int, tuple[list[float], list[float], list[float]]] = {c: ([], [], []) for c in labels}
    for seg, sp in zip(maps, sps, strict=True):
        vol = _as_volume(seg)
        _, sy, sx = _spacing3(sp, vol.shape)
        for c in labels:
            mask = vol == c
            for z in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
                m = mask[z]
                r0, r1, c0, c1 = _bbox2d(m)
                h, w = (r1 - r0 + 1) * sy, (c1 - c0 + 1) * sx
                areas, shorts, longs = stats[c]
                areas.append(float(m.sum()) * sy * sx)
                shorts.append(min(h, w))
                longs.append(max(h, w))
    per_class = {}
    for c, (areas, shorts, longs) in stats.items():
        if not areas:
            continue  # never seen in the labeled data: no basis for limits, leave unchecked
        per_class[c] = ClassLimits(
            min_area=max(0.0, (1 - slack) * float(np.percentile(areas, low_percentile))),
            max_area=(1 + slack) * float(np.max(areas)),
            min_extent=max(0.0, (1 - slack) * float(np.percentile(shorts, low_percentile))),
            max_extent=(1 + slack) * float(np.max(longs)),
            n_slices=len(areas),
        )
    return PlausibilityLimits(per_class=per_class, units="px" if spacings is None else "mm", slack=float(slack))


def generate_prompts(
    seg: np.ndarray,
    foreground_labels: Sequence[int],
    config: PCSWConfig = PCSWConfig(),  # noqa: B008 -- frozen dataclass, safe as a default
    limits: PlausibilityLimits | None = None,
    spacing: Sequence[float] | None = None,
    *,
    probabilities: np.ndarray | None = None,
) -> tuple[list[SlicePrompt], PCSWReport]:
    """PCSW prompts for every (slice, class) whose prediction is consistent and plausible.

    seg: (Z, Y, X) or (Y, X) integer label map (the network's argmax on an unlabeled volume).
    spacing: (z, y, x) in mm; needed when ``limits`` were learned in mm (mixing units raises).
    probabilities: optional (C, Z, Y, X) or (C, Y, X) softmax with channel index = label value (nnU-Net layout,
        background = channel 0); gives each prompt a confidence score and enables ``config.min_score``.
    Returns prompts sorted by (z, label) and a report of accepted/rejected counts with reasons.
    """
    vol = _as_volume(seg)
    n_z = vol.shape[0]
    _, sy, sx = _spacing3(spacing, vol.shape)
    _check_units(limits, spacing)
    probs = _checked_probabilities(probabilities, vol)
    labels = [int(c) for c in foreground_labels]
    window = min(config.window, n_z)
    structure = ndimage.generate_binary_structure(3, _CONNECTIVITY_RANK[config.connectivity])
    builder = _PromptBuilder(vol, labels, config, (sy, sx))

    prompts: list[SlicePrompt] = []
    report = PCSWReport()
    for c in labels:
        mask = vol == c
        present = np.flatnonzero(mask.reshape(n_z, -1).any(axis=1))
        windows: dict[int, tuple[np.ndarray, int, float]] = {}  # start -> (component labels, largest id, ratio)

        def analyse(start: int, mask: np.ndarray = mask, windows: dict = windows) -> tuple[np.ndarray, int, float]:
            if start not in windows:
                comp, n = ndimage.label(mask[start:start + window], structure=structure)
                counts = np.bincount(comp.ravel(), minlength=n + 1)
                counts[0] = 0
                largest = int(np.argmax(counts))
                windows[start] = (comp, largest, float(counts[largest]) / float(counts.sum()))
            return windows[start]

        for z in (int(v) for v in present):
            best: tuple[float, int, np.ndarray] | None = None  # (ratio, start, component on slice z)
            best_ratio = 0.0
            any_consistent = False
            for start in _window_starts(z, n_z, window, config.window_mode):
                comp, largest, ratio = analyse(start)
                best_ratio = max(best_ratio, ratio)
                if ratio < config.tau:
                    continue
                any_consistent = True
                on_slice = comp[z - start] == largest
                if on_slice.any() and (best is None or ratio > best[0]):
                    best = (ratio, start, on_slice)
            if best is None:
                reason = INCONSISTENT if not any_consistent else NOT_IN_LARGEST
                report.record(PromptDecision(z, c, False, reason, best_ratio, math.nan))
                continue
            ratio, start, comp2d = best
            n_pix = int(comp2d.sum())
            area = n_pix * sy * sx
            r0, r1, c0, c1 = _bbox2d(comp2d)
            h, w = (r1 - r0 + 1) * sy, (c1 - c0 + 1) * sx
            reason = TOO_FEW_PIXELS if n_pix < config.min_pixels else OK
            if reason == OK and limits is not None:
                reason = limits.check(c, area, min(h, w), max(h, w))
            score = ratio
            if reason == OK and probs is not None:
                if c >= probs.shape[0]:
                    raise ValueError(f"probabilities have {probs.shape[0]} channels, no channel for label {c}")
                score = float(probs[c, z][comp2d].mean())
                if score < config.min_score:
                    reason = LOW_SCORE
            report.record(PromptDecision(z, c, reason == OK, reason, ratio, area))
            if reason != OK:
                continue

            prompts.append(builder.build(z, c, comp2d, area, float(ratio), float(score), (start, start + window)))
    prompts.sort(key=lambda p: (p.z, p.label))
    return prompts, report


def _checked_probabilities(probabilities: np.ndarray | None, vol: np.ndarray) -> np.ndarray | None:
    if probabilities is None:
        return None
    probs = np.asarray(probabilities)
    if probs.ndim == 3:
        probs = probs[:, None]
    if probs.ndim != 4 or probs.shape[1:] != vol.shape:
        raise ValueError(f"probabilities must be (C, *seg.shape), got {np.shape(probabilities)} for {vol.shape}")
    return probs


def _check_units(limits: PlausibilityLimits | None, spacing: Sequence[float] | None) -> None:
    if limits is not None:
        want = "px" if spacing is None else "mm"
        if limits.units != want:
            raise ValueError(f"limits are in {limits.units} but spacing {'is' if spacing is not None else 'is not'} "
                             f"given: pass spacing exactly when the limits were learned with spacings")


def generate_component_prompts(
    seg: np.ndarray,
    foreground_labels: Sequence[int],
    config: PCSWConfig = PCSWConfig(),  # noqa: B008 -- frozen dataclass, safe as a default
    limits: PlausibilityLimits | None = None,
    spacing: Sequence[float] | None = None,
    *,
    probabilities: np.ndarray | None = None,
) -> tuple[list[ComponentPrompt], PCSWReport, np.ndarray]:
    """PCSW as SSS describes it: one prompt per physically consistent 3D component, on its largest-area slice.

    Each class's prediction is split into 3D connected components (``config.connectivity``) over the whole volume.
    A component's continuity is the mean, over the slices it spans, of the share of the class's voxels it holds in
    the sliding window of ``config.window`` slices around that slice (``config.window_mode``: the centred window, or
    the best window containing the slice). It is kept when the continuity reaches ``config.tau``: an organ is one
    dominant object across neighbouring slices, two comparable pieces are a guess. A kept component must also pass
    ``min_pixels`` and the plausibility ``limits`` on its key (largest-area) slice and, with probabilities,
    ``min_score`` (mean class probability over the 3D component). It is prompted ONCE on the key slice (box, deepest
    positive point, negative points, as in slice mode); SAM-2's video predictor then carries the mask through the
    component's other slices (``nnunetv2_sss.sam.propagation``), so SAM-2 -- not the student -- outlines them.

    Returns the kept components sorted by (label, key slice), a report with one decision per component (z = key
    slice, ``z_range`` = its slices) and ``kept``: a (Z, Y, X) int16 map holding the class of every voxel of a kept
    component and 0 elsewhere (student voxels outside it were rejected: SAM-2 is not asked about them).
    """
    vol = _as_volume(seg)
    n_z = vol.shape[0]
    _, sy, sx = _spacing3(spacing, vol.shape)
    _check_units(limits, spacing)
    probs = _checked_probabilities(probabilities, vol)
    labels = [int(c) for c in foreground_labels]
    window = min(config.window, n_z)
    structure = ndimage.generate_binary_structure(3, _CONNECTIVITY_RANK[config.connectivity])
    builder = _PromptBuilder(vol, labels, config, (sy, sx))
    kept = np.zeros(vol.shape, dtype=np.int16)
    out: list[ComponentPrompt] = []
    report = PCSWReport()
    for c in labels:
        comp, n = ndimage.label(vol == c, structure=structure)
        if n == 0:
            continue
        # voxels of every component on every slice, (Z, n + 1); column 0 is "not this class"
        per_slice = np.stack([np.bincount(comp[z].ravel(), minlength=n + 1) for z in range(n_z)]).astype(np.float64)
        per_slice[:, 0] = 0
        csum = np.concatenate([np.zeros((1, n + 1)), np.cumsum(per_slice, axis=0)])
        in_window = csum[window:] - csum[:-window]  # (window starts, n + 1)
        totals = in_window.sum(axis=1, keepdims=True)
        share = np.divide(in_window, totals, out=np.zeros_like(in_window), where=totals > 0)
        for k, box3d in enumerate(ndimage.find_objects(comp), start=1):
            z0, z1 = int(box3d[0].start), int(box3d[0].stop)
            continuity = float(np.mean([max(share[s, k] for s in _window_starts(z, n_z, window, config.window_mode))
                                        for z in range(z0, z1)]))
            areas = per_slice[z0:z1, k]
            key = z0 + int(np.argmax(areas))
            comp2d = comp[key] == k
            n_pix = int(areas.max())
            area = n_pix * sy * sx
            reason = OK if continuity >= config.tau else INCONSISTENT
            if reason == OK and n_pix < config.min_pixels:
                reason = TOO_FEW_PIXELS
            if reason == OK and limits is not None:
                r0, r1, c0, c1 = _bbox2d(comp2d)
                h, w = (r1 - r0 + 1) * sy, (c1 - c0 + 1) * sx
                reason = limits.check(c, area, min(h, w), max(h, w))
            member = comp[box3d] == k
            score = continuity
            if reason == OK and probs is not None:
                if c >= probs.shape[0]:
                    raise ValueError(f"probabilities have {probs.shape[0]} channels, no channel for label {c}")
                score = float(probs[c][box3d][member].mean())
                if score < config.min_score:
                    reason = LOW_SCORE
            report.record(PromptDecision(key, c, reason == OK, reason, continuity, area, (z0, z1)))
            if reason != OK:
                continue
            kept[box3d][member] = c
            prompt = builder.build(key, c, comp2d, area, continuity, score, (z0, z1))
            out.append(ComponentPrompt(prompt, (z0, z1), int(member.sum()), continuity))
    out.sort(key=lambda p: (p.label, p.key_z))
    return out, report, kept


def naive_prompts(
    seg: np.ndarray,
    foreground_labels: Sequence[int],
    config: PCSWConfig = PCSWConfig(),  # noqa: B008 -- frozen dataclass, safe as a default
    spacing: Sequence[float] | None = None,
) -> list[SlicePrompt]:
    """The baseline PCSW is measured against: a prompt for EVERY in-plane connected component of every class on
    every slice, nothing filtered (same box, point and negative-point rules; in-plane 8-connectivity, 4 when
    ``config.connectivity`` is 6). ``consistency`` and ``score`` are NaN: nothing was checked."""
    vol = _as_volume(seg)
    _, sy, sx = _spacing3(spacing, vol.shape)
    labels = [int(c) for c in foreground_labels]
    structure = ndimage.generate_binary_structure(2, 1 if config.connectivity == 6 else 2)
    builder = _PromptBuilder(vol, labels, config, (sy, sx))
    prompts = []
    for z in range(vol.shape[0]):
        for c in labels:
            comp, n = ndimage.label(vol[z] == c, structure=structure)
            for k in range(1, n + 1):
                comp2d = comp == k
                prompts.append(builder.build(z, c, comp2d, float(comp2d.sum()) * sy * sx, math.nan, math.nan,
                                             (z, z + 1)))
    return prompts


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
