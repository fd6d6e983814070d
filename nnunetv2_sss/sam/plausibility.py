"""Physical constraints of PCSW: per-class per-slice size limits learned from the labeled cases, and the check
of a predicted component against them (area, and bounding-box extent; mm when spacings are known, else pixels)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from nnunetv2_sss.sam.prompt_geometry import as_volume, bbox2d, spacing3

# Reasons a component fails the limits (stable strings: the trainer logs and counts them).
OK = "ok"
AREA_BELOW = "area_below_limit"
AREA_ABOVE = "area_above_limit"
EXTENT_BELOW = "extent_below_limit"
EXTENT_ABOVE = "extent_above_limit"


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
        vol = as_volume(seg)
        _, sy, sx = spacing3(sp, vol.shape)
        for c in labels:
            mask = vol == c
            for z in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
                m = mask[z]
                r0, r1, c0, c1 = bbox2d(m)
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
