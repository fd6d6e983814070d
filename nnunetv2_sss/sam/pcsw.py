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

Prompt geometry (box, deepest point, negative points, SAM-2 coordinate conventions): ``prompt_geometry.py``;
the plausibility limits: ``plausibility.py``. Pure numpy/scipy: no sam2 or torch import here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from nnunetv2_sss.sam.plausibility import (
    OK,
    ClassLimits,
    PlausibilityLimits,
    learn_plausibility_limits,
)
from nnunetv2_sss.sam.prompt_geometry import (
    ComponentPrompt,
    PromptBuilder,
    SlicePrompt,
    as_volume,
    bbox2d,
    spacing3,
    to_sam_coords,
)

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

# Rejection reasons (stable strings: the trainer logs and counts them); the size limits' own are in plausibility.py.
INCONSISTENT = "inconsistent"  # largest 3D component of the window holds < tau of the class's voxels
NOT_IN_LARGEST = "not_in_largest_component"  # the class is on the slice only as a speck outside the main object
TOO_FEW_PIXELS = "too_few_pixels"  # fewer than config.min_pixels: too small for a meaningful SAM prompt
LOW_SCORE = "low_score"  # mean class probability over the component < config.min_score

_CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}


@dataclass(frozen=True)
class PCSWConfig:
    """Knobs of the generator; each field's meaning stands under it."""

    window: int = 3
    """Consecutive slices in the sliding window (1 = purely 2D, no cross-slice check)."""
    tau: float = 0.8
    """Physical consistency threshold on (largest 3D component voxels) / (class voxels in the window)."""
    window_mode: str = "centred"
    """Which windows decide. "centred": only the window centred on the slice (shifted at the volume ends), so the
    decision looks symmetrically up and down; "any": the slice is prompted if any window containing it is
    consistent (the most consistent one supplies the component), more permissive at object ends."""
    connectivity: int = 26
    """3D connectivity of the components: 6, 18 or 26."""
    box_margin: float = 0.05
    """Margin added on each side of the box, as a fraction of the box side along that axis (rounded up)."""
    min_margin_px: int = 1
    """Lower bound of that margin in pixels, so tiny objects still get some context."""
    negative_points: bool = True
    """One negative point per other foreground class inside the box."""
    min_pixels: int = 5
    """Components with fewer pixels on the slice get no prompt (too small to steer SAM), whatever the learned
    limits."""
    min_score: float = 0.0
    """With class probabilities given, the mean probability of the class over the component must reach this; 0
    disables the check."""
    mode: str = "component"
    """What is prompted. "component" (SSS): one prompt per kept 3D component, on its largest-area slice, carried
    through the component's other slices by SAM-2's video predictor (``generate_component_prompts``); "slice": one
    prompt per accepted (slice, class), each decoded on its own slice (``generate_prompts``)."""

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


def _window_starts(z: int, n_slices: int, window: int, mode: str) -> list[int]:
    """Start indices of the candidate windows of slice z, the centred one first."""
    last = n_slices - window
    centred = min(max(z - window // 2, 0), last)
    if mode == "centred":
        return [centred]
    others = [s for s in range(max(0, z - window + 1), min(z, last) + 1) if s != centred]
    return [centred, *sorted(others, key=lambda s: abs(s - centred))]


@dataclass(frozen=True)
class _PCSWInput:
    """One volume checked and ready for either PCSW mode (slice or component)."""

    vol: np.ndarray  # (Z, Y, X) int label map
    labels: list[int]
    probs: np.ndarray | None  # (C, Z, Y, X) or None
    limits: PlausibilityLimits | None
    config: PCSWConfig
    sy: float
    sx: float
    window: int
    structure: np.ndarray  # 3D connectivity of config.connectivity
    builder: PromptBuilder

    @property
    def n_z(self) -> int:
        return self.vol.shape[0]

    def physical_check(self, c: int, comp2d: np.ndarray, n_pix: int, area: float) -> str:
        """OK, or why a prediction of class ``c`` with this in-plane footprint is implausible."""
        if n_pix < self.config.min_pixels:
            return TOO_FEW_PIXELS
        if self.limits is None:
            return OK
        r0, r1, c0, c1 = bbox2d(comp2d)
        h, w = (r1 - r0 + 1) * self.sy, (c1 - c0 + 1) * self.sx
        return self.limits.check(c, area, min(h, w), max(h, w))

    def class_probabilities(self, c: int) -> np.ndarray:
        """(Z, Y, X) softmax of class ``c``; raises when the probabilities have no channel for it."""
        assert self.probs is not None
        if c >= self.probs.shape[0]:
            raise ValueError(f"probabilities have {self.probs.shape[0]} channels, no channel for label {c}")
        return self.probs[c]


def _prepare(seg: np.ndarray, foreground_labels: Sequence[int], config: PCSWConfig,
             limits: PlausibilityLimits | None, spacing: Sequence[float] | None,
             probabilities: np.ndarray | None) -> _PCSWInput:
    vol = as_volume(seg)
    _, sy, sx = spacing3(spacing, vol.shape)
    _check_units(limits, spacing)
    labels = [int(c) for c in foreground_labels]
    return _PCSWInput(
        vol=vol, labels=labels, probs=_checked_probabilities(probabilities, vol), limits=limits, config=config,
        sy=sy, sx=sx, window=min(config.window, vol.shape[0]),
        structure=ndimage.generate_binary_structure(3, _CONNECTIVITY_RANK[config.connectivity]),
        builder=_builder(vol, labels, config, (sy, sx)))


def generate_prompts(seg: np.ndarray, foreground_labels: Sequence[int],
                     config: PCSWConfig = PCSWConfig(),  # noqa: B008 -- frozen dataclass, safe as a default
                     limits: PlausibilityLimits | None = None, spacing: Sequence[float] | None = None, *,
                     probabilities: np.ndarray | None = None) -> tuple[list[SlicePrompt], PCSWReport]:
    """PCSW prompts for every (slice, class) whose prediction is consistent and plausible.

    seg: (Z, Y, X) or (Y, X) integer label map (the network's argmax on an unlabeled volume).
    spacing: (z, y, x) in mm; needed when ``limits`` were learned in mm (mixing units raises).
    probabilities: optional (C, Z, Y, X) or (C, Y, X) softmax with channel index = label value (nnU-Net layout,
        background = channel 0); gives each prompt a confidence score and enables ``config.min_score``.
    Returns prompts sorted by (z, label) and a report of accepted/rejected counts with reasons.
    """
    inp = _prepare(seg, foreground_labels, config, limits, spacing, probabilities)
    prompts: list[SlicePrompt] = []
    report = PCSWReport()
    for c in inp.labels:
        prompts += _slice_prompts_of_class(inp, c, report)
    prompts.sort(key=lambda p: (p.z, p.label))
    return prompts, report


def _slice_prompts_of_class(inp: _PCSWInput, c: int, report: PCSWReport) -> list[SlicePrompt]:
    """Slice mode for one class: each slice's part of the class is judged in the sliding windows that hold it."""
    config, n_z, window = inp.config, inp.n_z, inp.window
    mask = inp.vol == c
    windows: dict[int, tuple[np.ndarray, int, float]] = {}  # start -> (component labels, largest id, ratio)

    def analyse(start: int) -> tuple[np.ndarray, int, float]:
        if start not in windows:
            comp, n = ndimage.label(mask[start:start + window], structure=inp.structure)
            counts = np.bincount(comp.ravel(), minlength=n + 1)
            counts[0] = 0
            largest = int(np.argmax(counts))
            windows[start] = (comp, largest, float(counts[largest]) / float(counts.sum()))
        return windows[start]

    prompts = []
    for z in (int(v) for v in np.flatnonzero(mask.reshape(n_z, -1).any(axis=1))):
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
        area = n_pix * inp.sy * inp.sx
        reason = inp.physical_check(c, comp2d, n_pix, area)
        score = ratio
        if reason == OK and inp.probs is not None:
            score = float(inp.class_probabilities(c)[z][comp2d].mean())
            if score < config.min_score:
                reason = LOW_SCORE
        report.record(PromptDecision(z, c, reason == OK, reason, ratio, area))
        if reason == OK:
            prompts.append(inp.builder.build(z, c, comp2d, area, float(ratio), float(score), (start, start + window)))
    return prompts


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


def generate_component_prompts(seg: np.ndarray, foreground_labels: Sequence[int],
                               config: PCSWConfig = PCSWConfig(),  # noqa: B008 -- frozen dataclass, safe as a default
                               limits: PlausibilityLimits | None = None, spacing: Sequence[float] | None = None, *,
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
    inp = _prepare(seg, foreground_labels, config, limits, spacing, probabilities)
    kept = np.zeros(inp.vol.shape, dtype=np.int16)
    out: list[ComponentPrompt] = []
    report = PCSWReport()
    for c in inp.labels:
        out += _component_prompts_of_class(inp, c, report, kept)
    out.sort(key=lambda p: (p.label, p.key_z))
    return out, report, kept


def _component_prompts_of_class(inp: _PCSWInput, c: int, report: PCSWReport,
                                kept: np.ndarray) -> list[ComponentPrompt]:
    """Component mode for one class; writes the kept components' voxels into ``kept``."""
    config, n_z, window = inp.config, inp.n_z, inp.window
    comp, n = ndimage.label(inp.vol == c, structure=inp.structure)
    if n == 0:
        return []
    # voxels of every component on every slice, (Z, n + 1); column 0 is "not this class"
    per_slice = np.stack([np.bincount(comp[z].ravel(), minlength=n + 1) for z in range(n_z)]).astype(np.float64)
    per_slice[:, 0] = 0
    csum = np.concatenate([np.zeros((1, n + 1)), np.cumsum(per_slice, axis=0)])
    in_window = csum[window:] - csum[:-window]  # (window starts, n + 1)
    totals = in_window.sum(axis=1, keepdims=True)
    share = np.divide(in_window, totals, out=np.zeros_like(in_window), where=totals > 0)
    out = []
    for k, box3d in enumerate(ndimage.find_objects(comp), start=1):
        z0, z1 = int(box3d[0].start), int(box3d[0].stop)
        continuity = float(np.mean([max(share[s, k] for s in _window_starts(z, n_z, window, config.window_mode))
                                    for z in range(z0, z1)]))
        areas = per_slice[z0:z1, k]
        key = z0 + int(np.argmax(areas))
        comp2d = comp[key] == k
        n_pix = int(areas.max())
        area = n_pix * inp.sy * inp.sx
        reason = OK if continuity >= config.tau else INCONSISTENT
        if reason == OK:
            reason = inp.physical_check(c, comp2d, n_pix, area)
        member = comp[box3d] == k
        score = continuity
        if reason == OK and inp.probs is not None:
            score = float(inp.class_probabilities(c)[box3d][member].mean())
            if score < config.min_score:
                reason = LOW_SCORE
        report.record(PromptDecision(key, c, reason == OK, reason, continuity, area, (z0, z1)))
        if reason != OK:
            continue
        kept[box3d][member] = c
        prompt = inp.builder.build(key, c, comp2d, area, continuity, score, (z0, z1))
        out.append(ComponentPrompt(prompt, (z0, z1), int(member.sum()), continuity))
    return out


def naive_prompts(
    seg: np.ndarray,
    foreground_labels: Sequence[int],
    config: PCSWConfig = PCSWConfig(),  # noqa: B008 -- frozen dataclass, safe as a default
    spacing: Sequence[float] | None = None,
) -> list[SlicePrompt]:
    """The baseline PCSW is measured against: a prompt for EVERY in-plane connected component of every class on
    every slice, nothing filtered (same box, point and negative-point rules; in-plane 8-connectivity, 4 when
    ``config.connectivity`` is 6). ``consistency`` and ``score`` are NaN: nothing was checked."""
    vol = as_volume(seg)
    _, sy, sx = spacing3(spacing, vol.shape)
    labels = [int(c) for c in foreground_labels]
    structure = ndimage.generate_binary_structure(2, 1 if config.connectivity == 6 else 2)
    builder = _builder(vol, labels, config, (sy, sx))
    prompts = []
    for z in range(vol.shape[0]):
        for c in labels:
            comp, n = ndimage.label(vol[z] == c, structure=structure)
            for k in range(1, n + 1):
                comp2d = comp == k
                prompts.append(builder.build(z, c, comp2d, float(comp2d.sum()) * sy * sx, math.nan, math.nan,
                                             (z, z + 1)))
    return prompts


def _builder(vol: np.ndarray, labels: Sequence[int], config: PCSWConfig,
             sampling: tuple[float, float]) -> PromptBuilder:
    return PromptBuilder(vol, labels, sampling, box_margin=config.box_margin, min_margin_px=config.min_margin_px,
                         negative_points=config.negative_points)
