"""SAM-2 pseudo-label refresh: student prediction -> PCSW prompts -> SAM-2 masks -> one label map per unlabeled case.

Every K epochs the trainer hands this module a ``predict`` callable (the student through nnU-Net's own
sliding-window predictor, made in ``training/student_inference.py``) and the unlabeled cases. Per case, PCSW
(``pcsw.py``) decides what SAM-2 is asked about, by ``PCSWConfig.mode``:

* "component" (SSS): each physically consistent 3D component is prompted once on its largest-area slice and SAM-2's
  video predictor carries it through the component's slices from the cached features (``propagation.py``);
* "slice": every accepted (slice, class) is prompted on its own slice, all prompts of a slice decoded in ONE batched
  SAM-2 call from the cached image features (``cache.py``).

The masks are merged into a label map that nnU-Net's loader then reads as ``seg_prev`` (warped with the weak view):

* overlaps between classes go to the mask with the higher SAM score; pixels of a prompted slice that no mask
  covers are background;
* where the student predicts a class that PCSW rejected on that slice (component mode: voxels of a rejected
  component), SAM said nothing about it: ignore (-1);
* where SAM and a *confident* student (max prob >= ``disagree_confidence``) disagree: ignore -- neither is
  trusted there, so the SAM term does not fight a confident prediction;
* slices without any SAM-2 mask (no prompt; component mode: no kept component spans them): ignore.

Maps are written as nnU-Net writes segmentations (``nnUNetDatasetBlosc2.save_seg``) under a temporary name and
``os.replace``d, so a loader never reads half a file. Nothing here imports sam2: the backend passed in does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nnunetv2_sss.files import atomic_write, atomic_write_json, save_figure
from nnunetv2_sss.sam.backend import to_sam_image, window_bounds
from nnunetv2_sss.sam.cache import cached_case_info, load_case_features
from nnunetv2_sss.sam.pcsw import (
    PCSWConfig,
    PCSWReport,
    PlausibilityLimits,
    SlicePrompt,
    generate_prompts,
    learn_plausibility_limits,
)
from nnunetv2_sss.unlabeled.layout import sam2_cache_folder, sam_pseudolabel_folder

if TYPE_CHECKING:
    from nnunetv2_sss.sam.backend import SAM2Backend

IGNORE = -1
PAD_LABEL = -1  # SAM's "not a point": pads point prompts of different lengths in one batch
TMP_SUFFIX = ".tmp"
SUMMARY_FILE = "refresh.json"

# predict(identifier, data (C_in, Z, Y, X)) -> softmax (C, Z, Y, X): made by the training layer
# (nnunetv2_sss.training.student_inference.student_predict_fn); sam/ depends on nothing above it.
PredictFn = Callable[[str, np.ndarray], np.ndarray]


# --- labeled data -> PCSW limits -----------------------------------------------------------------------------------
def learn_limits_from_training_cases(dataset: Any, identifiers: Iterable[str], foreground_labels: Sequence[int],
                                     slack: float = 0.5) -> PlausibilityLimits:
    """PCSW plausibility limits from the labeled preprocessed segmentations, in pixels.

    ``dataset`` is an nnU-Net dataset (``load_case(identifier) -> data, seg, seg_prev, properties``). Pixel units are
    exact here: every preprocessed case of a configuration has the configuration's in-plane spacing, and the
    unlabeled cases the limits are applied to were preprocessed the same way.
    """
    maps = []
    for identifier in identifiers:
        seg = np.asarray(dataset.load_case(identifier)[1][:])
        maps.append(seg[0].astype(np.int16))  # (1, Z, Y, X) -> (Z, Y, X); -1 (outside the nonzero mask) is no class
    if not maps:
        raise ValueError("no labeled training cases to learn PCSW plausibility limits from")
    return learn_plausibility_limits(maps, None, foreground_labels, slack=slack)


# --- prompts -> SAM -> label map -----------------------------------------------------------------------------------
def batch_prompts(prompts: Sequence[SlicePrompt]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (N, 4), points (N, K, 2) and labels (N, K) of one slice's prompts for a single decoder call.

    Prompts carry different numbers of points (negative points depend on neighbours); the shorter ones are padded
    with label -1, which SAM's prompt encoder replaces by its "not a point" embedding.
    """
    if not prompts:
        raise ValueError("batch_prompts needs at least one prompt")
    k = max(len(p.point_labels) for p in prompts)
    coords = np.zeros((len(prompts), k, 2), dtype=np.float32)
    labels = np.full((len(prompts), k), PAD_LABEL, dtype=np.int32)
    for i, p in enumerate(prompts):
        n = len(p.point_labels)
        coords[i, :n] = p.point_coords
        labels[i, :n] = p.point_labels
    boxes = np.stack([p.box for p in prompts]).astype(np.float32)
    return boxes, coords, labels


def merge_masks(masks: np.ndarray, scores: np.ndarray, labels: Sequence[int], shape: tuple[int, int]) -> np.ndarray:
    """Per-class masks (N, Y, X) -> one label map (Y, X): overlaps go to the higher score, uncovered pixels to 0."""
    out = np.zeros(shape, dtype=np.int16)
    best = np.full(shape, -np.inf, dtype=np.float32)
    for m, s, lab in zip(masks, scores, labels, strict=True):
        win = m & (s > best)
        out[win] = lab
        best[win] = s
    return out


def apply_ignore_rules(sam_map: np.ndarray, student_probs: np.ndarray, rejected_labels: Iterable[int],
                       disagree_confidence: float = 0.9) -> np.ndarray:
    """The trainable map of a prompted slice: SAM's labels, -1 where a confident student disagrees or where the
    student predicts a class PCSW rejected on this slice (SAM was not asked about it)."""
    student = student_probs.argmax(0)
    out = sam_map.astype(np.int16, copy=True)
    out[(out != student) & (student_probs.max(0) >= disagree_confidence)] = IGNORE
    for lab in rejected_labels:
        out[student == int(lab)] = IGNORE
    return out


@dataclass
class CaseRefresh:
    """One case's refresh: the map to train on, SAM's merged masks, the student's argmax and what PCSW decided."""

    identifier: str
    label_map: np.ndarray  # (Z, Y, X) int16 in {-1, 0..C-1}
    sam_map: np.ndarray  # (Z, Y, X) merged SAM masks before the ignore rules; -1 on unprompted slices
    student: np.ndarray  # (Z, Y, X) argmax of the student's softmax
    prompts: list[SlicePrompt]
    report: PCSWReport
    masks: dict[int, tuple[np.ndarray, np.ndarray]]  # z -> (SAM masks (N, Y, X), scores (N,)), in prompt order
    intersection: dict[int, int] = field(default_factory=dict)  # per class, on the slices it was prompted on
    total: dict[int, int] = field(default_factory=dict)  # |SAM| + |student| per class, same slices
    sam_slices: set[int] = field(default_factory=set)  # component mode: slices SAM-2 propagated to

    def prompted_slices(self) -> list[int]:
        """Slices SAM-2 gave masks for: the prompted ones, and in component mode those it propagated to."""
        return sorted({p.z for p in self.prompts} | self.sam_slices)


def _check_cache_fits(cache_folder: str | Path, identifier: str, shape: tuple[int, int, int]) -> None:
    n_z, h, w = shape
    info = cached_case_info(cache_folder, identifier)
    if info["num_slices"] != n_z or tuple(info["orig_hw"]) != (h, w):
        raise ValueError(f"SAM-2 cache of {identifier} holds {info['num_slices']} slices of {info['orig_hw']} but the "
                         f"case is {n_z} x {(h, w)}: the cache is stale; delete {cache_folder} to rebuild it")


def refresh_case(backend: SAM2Backend, cache_folder: str | Path, identifier: str, probs: np.ndarray,
                 foreground_labels: Sequence[int], limits: PlausibilityLimits | None,
                 pcsw_config: PCSWConfig = PCSWConfig(),
                 disagree_confidence: float = 0.9, multimask_output: bool = False) -> CaseRefresh:
    """SAM-2 pseudo-label of one case from the student's softmax ``probs`` (C, Z, Y, X), slice mode: every
    accepted (slice, class) prompted and decoded on its own slice (whatever ``pcsw_config.mode`` says;
    ``refresh_pseudolabels`` picks this or ``refresh_case_propagated`` by the mode)."""
    probs = np.asarray(probs, dtype=np.float32)
    student = probs.argmax(0).astype(np.int16)
    n_z, h, w = student.shape
    _check_cache_fits(cache_folder, identifier, student.shape)
    prompts, report = generate_prompts(student, foreground_labels, pcsw_config, limits, probabilities=probs)
    rejected: dict[int, set[int]] = {}
    for d in report.decisions:
        if not d.accepted:
            rejected.setdefault(d.z, set()).add(d.label)
    by_slice: dict[int, list[SlicePrompt]] = {}
    for p in prompts:
        by_slice.setdefault(p.z, []).append(p)

    label_map = np.full((n_z, h, w), IGNORE, dtype=np.int16)
    sam_map = np.full((n_z, h, w), IGNORE, dtype=np.int16)
    result = CaseRefresh(identifier, label_map, sam_map, student, prompts, report, {})
    for z, ps in sorted(by_slice.items()):
        feats = load_case_features(cache_folder, identifier, z, device=backend.device)
        boxes, coords, point_labels = batch_prompts(ps)
        masks, scores = backend.predict_from_features(feats, (h, w), boxes=boxes, point_coords=coords,
                                                      point_labels=point_labels, multimask_output=multimask_output)
        result.masks[z] = (masks, scores)
        sam_map[z] = merge_masks(masks, scores, [p.label for p in ps], (h, w))
        label_map[z] = apply_ignore_rules(sam_map[z], probs[:, z], rejected.get(z, ()), disagree_confidence)
        for lab in {p.label for p in ps}:
            s, t = sam_map[z] == lab, student[z] == lab
            result.intersection[lab] = result.intersection.get(lab, 0) + int((s & t).sum())
            result.total[lab] = result.total.get(lab, 0) + int(s.sum() + t.sum())
    return result


def refresh_case_propagated(backend: SAM2Backend, cache_folder: str | Path, identifier: str, probs: np.ndarray,
                            foreground_labels: Sequence[int], limits: PlausibilityLimits | None,
                            pcsw_config: PCSWConfig = PCSWConfig(),
                            disagree_confidence: float = 0.9) -> CaseRefresh:
    """SAM-2 pseudo-label of one case, component mode (SSS): each kept 3D component prompted once on its key
    slice and propagated through its slices by SAM-2's video predictor from the cached features.

    Map rules: slices no kept component spans are ignored (-1); on the others SAM-2's merged masks (higher logit
    wins an overlap, uncovered pixels background), minus the pixels where a confident student disagrees and the
    student's voxels of rejected components (SAM-2 was not asked about them)."""
    from nnunetv2_sss.sam.pcsw import generate_component_prompts
    from nnunetv2_sss.sam.propagation import merge_component_logits, propagate_components

    probs = np.asarray(probs, dtype=np.float32)
    student = probs.argmax(0).astype(np.int16)
    n_z, h, w = student.shape
    _check_cache_fits(cache_folder, identifier, student.shape)
    comps, report, kept = generate_component_prompts(student, foreground_labels, pcsw_config, limits,
                                                     probabilities=probs)
    label_map = np.full((n_z, h, w), IGNORE, dtype=np.int16)
    sam_map = np.full((n_z, h, w), IGNORE, dtype=np.int16)
    result = CaseRefresh(identifier, label_map, sam_map, student, [c.prompt for c in comps], report, {})
    if not comps:
        return result
    logits = propagate_components(backend.video_predictor(), comps, n_z, (h, w),
                                  lambda z: load_case_features(cache_folder, identifier, z, device=backend.device))
    merged, covered = merge_component_logits(comps, logits, (n_z, h, w))
    sam_map[:] = merged
    unprompted = (student > 0) & (kept != student)
    for z in np.flatnonzero(covered):
        z = int(z)
        label_map[z] = apply_ignore_rules(sam_map[z], probs[:, z], (), disagree_confidence)
        label_map[z][unprompted[z]] = IGNORE
        here = [lg[z - c.z_range[0]] for c, lg in zip(comps, logits, strict=True) if c.z_range[0] <= z < c.z_range[1]]
        result.masks[z] = (np.stack([lg > 0 for lg in here]), np.asarray([lg.max() for lg in here], dtype=np.float32))
    result.sam_slices = {int(z) for z in np.flatnonzero(covered)}
    for lab in sorted({c.label for c in comps}):
        zs = np.zeros(n_z, dtype=bool)
        for c in comps:
            if c.label == lab:
                zs[c.z_range[0]:c.z_range[1]] = True
        s, t = sam_map[zs] == lab, student[zs] == lab
        result.intersection[lab] = int((s & t).sum())
        result.total[lab] = int(s.sum() + t.sum())
    return result


# --- files ---------------------------------------------------------------------------------------------------------
def _map_dtype(num_classes: int) -> type:
    return np.int8 if num_classes <= 127 else np.int16


def _maps_folder(unlabeled_folder: str | Path, maps_folder: str | Path | None) -> Path:
    """Where the maps go: the run's own folder when given (trainers), else beside the unlabeled data."""
    return Path(maps_folder) if maps_folder is not None else sam_pseudolabel_folder(unlabeled_folder)


def write_pseudolabel(unlabeled_folder: str | Path, identifier: str, label_map: np.ndarray,
                      num_classes: int | None = None, maps_folder: str | Path | None = None) -> Path:
    """Write ``<maps folder>/<identifier>.b2nd`` atomically (nnU-Net's save_seg to a temp name, replace).

    One chunk per slice: 2D training reads one slice at a time.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    if label_map.ndim != 3:
        raise ValueError(f"pseudo-label maps are (Z, Y, X), got shape {label_map.shape}")
    n = int(label_map.max()) + 1 if num_classes is None else int(num_classes)
    arr = np.ascontiguousarray(label_map.astype(_map_dtype(n)))
    folder = _maps_folder(unlabeled_folder, maps_folder)
    folder.mkdir(parents=True, exist_ok=True)
    chunks = (1, *arr.shape[1:])
    # blosc2 appends '.b2nd' to the name it is given: hand it the temporary name without it
    return atomic_write(folder / f"{identifier}.b2nd", lambda tmp: nnUNetDatasetBlosc2.save_seg(
        arr, str(tmp)[:-len(".b2nd")], chunks_seg=chunks, blocks_seg=chunks), suffix=".b2nd")


def read_pseudolabel(unlabeled_folder: str | Path, identifier: str,
                     maps_folder: str | Path | None = None) -> np.ndarray:
    """The stored map of a case as a numpy array (Z, Y, X)."""
    import blosc2

    path = _maps_folder(unlabeled_folder, maps_folder) / f"{identifier}.b2nd"
    return np.asarray(blosc2.open(str(path), mode="r")[:])


def _case_shapes(unlabeled_folder: str | Path) -> dict[str, tuple[int, ...]]:
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    ds = infer_dataset_class(str(unlabeled_folder))(str(unlabeled_folder))
    return {i: tuple(int(s) for s in ds.load_case(i)[0].shape[1:]) for i in ds.identifiers}


def init_empty_pseudolabels(unlabeled_folder: str | Path, overwrite: bool = False,
                            maps_folder: str | Path | None = None) -> list[str]:
    """All-ignore maps for every unlabeled case that has none (or one of the wrong shape); all cases if
    ``overwrite``. nnU-Net's loader opens a map for every case it samples, from the first iteration on.
    Leftover temp files of an interrupted write are removed. Returns the identifiers written."""
    import blosc2

    folder = _maps_folder(unlabeled_folder, maps_folder)
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.glob(f"*{TMP_SUFFIX}.b2nd"):
        f.unlink(missing_ok=True)
    written = []
    for identifier, shape in sorted(_case_shapes(unlabeled_folder).items()):
        f = folder / f"{identifier}.b2nd"
        if not overwrite and f.is_file():
            try:
                if tuple(blosc2.open(str(f), mode="r").shape) == shape:
                    continue
            except Exception:  # noqa: BLE001 - an unreadable map is simply rewritten
                pass
        write_pseudolabel(unlabeled_folder, identifier, np.full(shape, IGNORE, dtype=np.int8), num_classes=1,
                          maps_folder=folder)
        written.append(identifier)
    return written


# --- overlays ------------------------------------------------------------------------------------------------------
def overlay_slices(case: CaseRefresh, n: int) -> list[int]:
    """Up to ``n`` slices to draw, spread over the prompted ones; the middle slice when none was prompted."""
    zs = case.prompted_slices()
    if not zs:
        return [case.student.shape[0] // 2] if n > 0 else []
    if len(zs) <= n:
        return zs
    return [zs[int(round(i))] for i in np.linspace(0, len(zs) - 1, n)]


def save_overlay(path: str | Path, image: np.ndarray, case: CaseRefresh, z: int, num_classes: int,
                 title: str) -> Path:
    """PNG of slice ``z``: the image as SAM saw it, boxes and points, SAM mask contours (solid) and the student's
    (dashed). Written to a temp name and replaced."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(6, 6.4), dpi=100)
    ax.imshow(image, interpolation="nearest")
    for lab in range(1, num_classes):
        col = colors((lab - 1) % 10)
        for m, style in ((case.sam_map[z] == lab, "solid"), (case.student[z] == lab, "dashed")):
            if m.any() and not m.all():
                ax.contour(m.astype(np.float32), levels=[0.5], colors=[col], linestyles=style, linewidths=1.5)
    for p in (p for p in case.prompts if p.z == z):
        col = colors((p.label - 1) % 10)
        x0, y0, x1, y1 = (float(v) for v in p.box)
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=col, linewidth=1))
        for (px, py), pl in zip(p.point_coords, p.point_labels, strict=True):
            ax.plot(px, py, marker="+" if pl == 1 else "x", color="lime" if pl == 1 else "red", markersize=9, mew=2)
    if z not in case.masks:
        ax.text(0.02, 0.02, "no SAM-2 prompt on this slice (all ignored)", color="yellow", fontsize=9,
                transform=ax.transAxes)
    handles = [Line2D([], [], color="w", linestyle="solid", label="SAM-2 mask"),
               Line2D([], [], color="w", linestyle="dashed", label="student"),
               *[Line2D([], [], color=colors((lab - 1) % 10), label=f"class {lab}") for lab in range(1, num_classes)]]
    leg = ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.4, facecolor="gray")
    leg.get_frame().set_linewidth(0)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


# --- orchestrator --------------------------------------------------------------------------------------------------
@dataclass
class RefreshSummary:
    """What one refresh did, for the log, the checkpoint and ``refresh.json``."""

    cases: list[str]
    checkpoint: str
    slices: int = 0
    prompted_slices: int = 0
    prompts: int = 0
    labeled_fraction: float = 0.0  # pixels of the refreshed cases that are not ignored
    dice_per_class: dict[int, float] = field(default_factory=dict)
    pcsw: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    overlays: list[str] = field(default_factory=list)

    @property
    def agreement(self) -> float:
        """Mean over classes of the SAM-vs-student Dice on the slices each class was prompted on (NaN if none)."""
        vals = [v for v in self.dice_per_class.values() if math.isfinite(v)]
        return float(np.mean(vals)) if vals else math.nan

    def to_dict(self) -> dict:
        """JSON-ready (NaN -> None, since strict JSON has no NaN)."""
        def num(v: float) -> float | None:
            return v if math.isfinite(v) else None

        return {"cases": self.cases, "checkpoint": self.checkpoint, "slices": self.slices,
                "prompted_slices": self.prompted_slices, "prompts": self.prompts,
                "labeled_fraction": self.labeled_fraction, "agreement": num(self.agreement),
                "dice_per_class": {str(k): num(v) for k, v in sorted(self.dice_per_class.items())},
                "pcsw": self.pcsw, "seconds": self.seconds, "overlays": self.overlays}

    def log_line(self) -> str:
        t = self.seconds
        return (f"SAM-2 refresh ({self.checkpoint}): {len(self.cases)} cases, {self.prompts} prompts on "
                f"{self.prompted_slices}/{self.slices} slices, {100 * self.labeled_fraction:.1f}% pixels labeled, "
                f"SAM-student Dice {self.agreement:.4f}, {t.get('total', 0):.1f} s (student {t.get('predict', 0):.1f}"
                f" s, SAM-2 {t.get('sam', 0):.1f} s, write {t.get('write', 0):.1f} s)")


def _merge_pcsw_counts(total: dict[str, dict], report: PCSWReport) -> None:
    d = report.to_dict()
    for lab, n in d["accepted"].items():
        total.setdefault("accepted", {})[lab] = total.get("accepted", {}).get(lab, 0) + n
    for lab, reasons in d["rejected"].items():
        per = total.setdefault("rejected", {}).setdefault(lab, {})
        for reason, n in reasons.items():
            per[reason] = per.get(reason, 0) + n


def refresh_pseudolabels(backend: SAM2Backend, unlabeled_folder: str | Path, identifiers: Sequence[str],
                         predict: PredictFn, foreground_labels: Sequence[int], num_classes: int,
                         limits: PlausibilityLimits | None,
                         pcsw_config: PCSWConfig = PCSWConfig(),
                         disagree_confidence: float = 0.9, overlay_folder: str | Path | None = None,
                         overlay_cases: int = 2, overlay_slices_per_case: int = 2, title_prefix: str = "",
                         progress: bool = False, maps_folder: str | Path | None = None) -> RefreshSummary:
    """Refresh the SAM-2 maps of ``identifiers``: ``predict(identifier, data) -> probs (C, Z, Y, X)``, PCSW, one
    batched SAM-2 decode per prompted slice from the cache, merge, atomic write; overlays and ``refresh.json`` in
    ``overlay_folder`` when given. The cache must be complete for these cases (``build_sam2_cache``)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from tqdm import tqdm

    folder = Path(unlabeled_folder)
    cache = sam2_cache_folder(folder)
    ds = infer_dataset_class(str(folder))(str(folder), identifiers=list(identifiers))
    summary = RefreshSummary(cases=list(identifiers), checkpoint=Path(backend.checkpoint_path).name)
    t = {"predict": 0.0, "sam": 0.0, "write": 0.0, "overlays": 0.0}
    t_start = time.perf_counter()
    inter: dict[int, int] = {}
    total: dict[int, int] = {}
    labeled = pixels = 0
    for k, identifier in enumerate(tqdm(identifiers, desc="SAM-2 refresh", unit="case", disable=not progress)):
        t0 = time.perf_counter()
        data = np.asarray(ds.load_case(identifier)[0][:], dtype=np.float32)
        probs = np.asarray(predict(identifier, data), dtype=np.float32)
        if probs.shape[1:] != data.shape[1:] or probs.shape[0] != num_classes:
            raise ValueError(f"{identifier}: student probabilities {probs.shape} do not fit the case "
                             f"({num_classes}, *{data.shape[1:]})")
        t1 = time.perf_counter()
        refresh_one = refresh_case_propagated if pcsw_config.mode == "component" else refresh_case
        case = refresh_one(backend, cache, identifier, probs, foreground_labels, limits, pcsw_config,
                           disagree_confidence)
        t2 = time.perf_counter()
        write_pseudolabel(folder, identifier, case.label_map, num_classes, maps_folder=maps_folder)
        t3 = time.perf_counter()
        t["predict"] += t1 - t0
        t["sam"] += t2 - t1
        t["write"] += t3 - t2
        summary.slices += case.label_map.shape[0]
        summary.prompted_slices += len(case.prompted_slices())
        summary.prompts += len(case.prompts)
        labeled += int((case.label_map >= 0).sum())
        pixels += case.label_map.size
        for lab in case.total:
            inter[lab] = inter.get(lab, 0) + case.intersection[lab]
            total[lab] = total.get(lab, 0) + case.total[lab]
        _merge_pcsw_counts(summary.pcsw, case.report)
        if overlay_folder is not None and k < overlay_cases:
            bounds = window_bounds(data)
            for z in overlay_slices(case, overlay_slices_per_case):
                title = f"{title_prefix}{identifier} slice {z} -- SAM-2 checkpoint: {summary.checkpoint}"
                out = save_overlay(Path(overlay_folder) / f"{identifier}_z{z:03d}.png",
                                   to_sam_image(data[:, z], bounds), case, z, num_classes, title)
                summary.overlays.append(out.name)
            t["overlays"] += time.perf_counter() - t3
    summary.labeled_fraction = labeled / pixels if pixels else 0.0
    summary.dice_per_class = {lab: 2 * inter[lab] / total[lab] if total[lab] else math.nan for lab in sorted(total)}
    t["total"] = time.perf_counter() - t_start
    summary.seconds = {k: round(v, 3) for k, v in t.items()}
    if overlay_folder is not None:
        out = Path(overlay_folder)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / SUMMARY_FILE, summary.to_dict(), indent=1)
    return summary


def pcsw_counts_line(counts: dict) -> str:
    """'class 1: 4 prompted, 2 rejected (inconsistent=2); ...' from RefreshSummary.pcsw."""
    acc, rej = counts.get("accepted", {}), counts.get("rejected", {})
    parts = []
    for lab in sorted(set(acc) | set(rej), key=int):
        why = ", ".join(f"{k}={v}" for k, v in sorted(rej.get(lab, {}).items()))
        parts.append(f"class {lab}: {acc.get(lab, 0)} prompted, {sum(rej.get(lab, {}).values())} rejected"
                     + (f" ({why})" if why else ""))
    return "; ".join(parts) if parts else "no foreground predicted"
