"""Prompt quality without SAM-2: does PCSW keep good prompts and drop bad ones?

For each student checkpoint (a ``checkpoint_*.pth`` inside an nnU-Net fold folder), every case of ``--images`` is
predicted with nnU-Net's own ``nnUNetPredictor`` (labels in ``--labels`` are never seen by training: pass cases
whose labels were hidden), and three prompt sets are made from the prediction:

* ``pcsw_component``: PCSW component mode (SSS), one key-slice prompt per kept 3D component;
* ``pcsw_slice``: PCSW slice mode, one prompt per accepted (slice, class);
* ``naive``: every in-plane component of every class on every slice, nothing filtered.

Per checkpoint, method and class: prompts kept, rejections by reason, mean box IoU with the ground-truth box of the
class on the prompt's slice (0 when the class is absent there), fraction of positive points inside the ground
truth, fraction of negative points outside it; for component mode also the fraction of ground-truth slices that
a kept component spans (what SAM-2 would be asked about). Writes ``prompt_quality.json``, ``prompt_quality.md``
and ``prompt_quality.png`` to ``--out``.

    python scripts/benchmark_prompts.py --checkpoints RESULTS/.../fold_all/checkpoint_epoch*.pth \\
        --images EVAL/images --labels EVAL/labels [--limits-labels LABELED/labelsTr] --out benchmark_output/prompts
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from nnunetv2_sss.files import atomic_write_json, save_figure
from nnunetv2_sss.sam.pcsw import (
    PCSWConfig,
    SlicePrompt,
    generate_component_prompts,
    generate_prompts,
    learn_plausibility_limits,
    naive_prompts,
)

METHODS = ("pcsw_component", "pcsw_slice", "naive")


def _box_iou(a: np.ndarray, b: tuple[int, int, int, int] | None) -> float:
    if b is None:
        return 0.0
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _gt_box(gt2d: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), x1/y1 exclusive, of a 2D mask; None when empty."""
    if not gt2d.any():
        return None
    rows, cols = np.flatnonzero(gt2d.any(1)), np.flatnonzero(gt2d.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def score_prompts(prompts: list[SlicePrompt], gt: np.ndarray, acc: dict) -> None:
    """Add each prompt's box IoU, positive-point and negative-point hits to ``acc[label]``."""
    for p in prompts:
        m = gt[p.z] == p.label
        a = acc[p.label]
        a["prompts"] += 1
        a["iou"].append(_box_iou(p.box, _gt_box(m)))
        for (x, y), lab in zip(p.point_coords.astype(int), p.point_labels, strict=True):
            if lab == 1:
                a["pos_in"].append(bool(m[y, x]))
            else:
                a["neg_out"].append(not bool(m[y, x]))


def _new_acc() -> dict:
    return defaultdict(lambda: {"prompts": 0, "iou": [], "pos_in": [], "neg_out": [], "rejected": defaultdict(int),
                                "gt_slices": 0, "gt_slices_spanned": 0})


def _finish(acc: dict) -> dict:
    def mean(v: list) -> float | None:
        return float(np.mean(v)) if v else None

    return {str(c): {"prompts": a["prompts"], "rejected": dict(a["rejected"]), "box_iou": mean(a["iou"]),
                     "pos_in_gt": mean(a["pos_in"]), "neg_outside_gt": mean(a["neg_out"]),
                     "gt_slices_spanned": (a["gt_slices_spanned"] / a["gt_slices"]) if a["gt_slices"] else None}
            for c, a in sorted(acc.items())}


def evaluate_checkpoint(checkpoint: Path, cases: list[tuple[Path, Path]], config: PCSWConfig, limits, device: str
                        ) -> dict:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunetv2_sss.cli import ensure_ext_trainer_env
    from nnunetv2_sss.evaluation.prediction import predictor_from_checkpoint

    ensure_ext_trainer_env()  # this package's trainers are found by name, as nnUNetv2_predict finds them
    predictor = predictor_from_checkpoint(checkpoint, device)
    labels = [int(c) for c in predictor.label_manager.foreground_labels]
    accs = {m: _new_acc() for m in METHODS}
    for m in METHODS:
        for c in labels:
            _ = accs[m][c]  # every class gets a row, also when a method made no prompt for it
    io = SimpleITKIO()
    for image, label in cases:
        img, props = io.read_images([str(image)])
        gt = io.read_seg(str(label))[0][0].astype(np.int16)
        seg = np.asarray(predictor.predict_single_npy_array(img, props, None, None, False)).astype(np.int16)
        spacing = tuple(float(s) for s in props["spacing"]) if limits is not None else None
        sp = (lambda s: s) if spacing else (lambda _s: None)
        comps, rep_c, _ = generate_component_prompts(seg, labels, config, limits, sp(spacing))
        slice_prompts, rep_s = generate_prompts(seg, labels, PCSWConfig(**{**config.__dict__, "mode": "slice"}),
                                                limits, sp(spacing))
        score_prompts([c.prompt for c in comps], gt, accs["pcsw_component"])
        score_prompts(slice_prompts, gt, accs["pcsw_slice"])
        score_prompts(naive_prompts(seg, labels, config), gt, accs["naive"])
        for method, rep in (("pcsw_component", rep_c), ("pcsw_slice", rep_s)):
            for c, reasons in rep.rejected.items():
                for r, n in reasons.items():
                    accs[method][c]["rejected"][r] += n
        for c in labels:
            gt_z = set(np.flatnonzero((gt == c).any(axis=(1, 2))).tolist())
            spanned = {z for k in comps if k.label == c for z in range(*k.z_range)}
            a = accs["pcsw_component"][c]
            a["gt_slices"] += len(gt_z)
            a["gt_slices_spanned"] += len(gt_z & spanned)
    return {m: _finish(a) for m, a in accs.items()}


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def write_outputs(results: dict, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "prompt_quality.json", {"meta": meta, "results": results}, indent=1)
    lines = ["| checkpoint | method | class | prompts | rejected (reason=n) | box IoU | pos. in GT | neg. outside GT "
             "| GT slices spanned |", "|---|---|---|---|---|---|---|---|---|"]
    for ck, per_method in results.items():
        for method, per_class in per_method.items():
            for c, r in per_class.items():
                rej = ", ".join(f"{k}={v}" for k, v in sorted(r["rejected"].items())) or "–"
                lines.append(f"| {ck} | {method} | {c} | {r['prompts']} | {rej} | {_fmt(r['box_iou'])} | "
                             f"{_fmt(r['pos_in_gt'])} | {_fmt(r['neg_outside_gt'])} | {_fmt(r['gt_slices_spanned'])} |")
    (out / "prompt_quality.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cks = list(results)
    short = [Path(k).stem.removeprefix("checkpoint_") for k in cks]  # e.g. epoch0010, final
    classes = sorted({c for pm in results.values() for pc in pm.values() for c in pc})
    metrics = (("box_iou", "mean box IoU with GT"), ("pos_in_gt", "positive point inside GT"))
    fig, axes = plt.subplots(len(metrics), max(1, len(classes)), figsize=(4.5 * max(1, len(classes)), 6.4),
                             squeeze=False)
    for row, (key, title) in zip(axes, metrics):
        for ax, c in zip(row, classes, strict=False):
            for method in METHODS:
                ys = [results[k][method].get(c, {}).get(key) for k in cks]
                ax.plot(range(len(cks)), [np.nan if y is None else y for y in ys], marker="o", label=method)
            ax.set_xticks(range(len(cks)), short, fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_title(f"class {c}: {title}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "prompt_quality.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", nargs="+", required=True, type=Path,
                        help="checkpoint files inside nnU-Net fold folders (e.g. .../fold_all/checkpoint_epoch*.pth)")
    parser.add_argument("--images", required=True, type=Path, help="raw images (CASE_0000.nii.gz) of held-out cases")
    parser.add_argument("--labels", required=True, type=Path, help="their ground truth (CASE.nii.gz)")
    parser.add_argument("--limits-labels", type=Path, default=None,
                        help="labels of the labeled training cases: PCSW plausibility limits in mm (default: none)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--tau", type=float, default=0.8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    for ck in args.checkpoints:
        if not ck.is_file() or not ck.parent.name.startswith("fold_"):
            raise SystemExit(f"{ck}: not a checkpoint file inside an nnU-Net fold folder (.../fold_X/NAME.pth)")
    cases = []
    for label in sorted(args.labels.glob("*.nii.gz")):
        image = args.images / f"{label.name[:-7]}_0000.nii.gz"
        if not image.is_file():
            raise SystemExit(f"{label}: no image {image} (expected CASE_0000.nii.gz beside CASE.nii.gz)")
        cases.append((image, label))
    if not cases:
        raise SystemExit(f"no CASE.nii.gz labels in {args.labels}")
    config = PCSWConfig(window=args.window, tau=args.tau)
    limits = None
    if args.limits_labels is not None:
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

        io = SimpleITKIO()
        maps, spacings = [], []
        for f in sorted(args.limits_labels.glob("*.nii.gz")):
            seg, props = io.read_seg(str(f))
            maps.append(seg[0].astype(np.int16))
            spacings.append(props["spacing"])
        labels = sorted({int(v) for m in maps for v in np.unique(m) if v > 0})
        limits = learn_plausibility_limits(maps, spacings, labels)
    results = {}
    for ck in args.checkpoints:
        name = f"{ck.parent.parent.name}/{ck.name}"
        print(f"{name}: {len(cases)} cases", flush=True)
        results[name] = evaluate_checkpoint(ck, cases, config, limits, args.device)
    write_outputs(results, args.out, {"cases": [c[1].name for c in cases], "window": args.window, "tau": args.tau,
                                      "limits": limits.to_dict() if limits is not None else None})
    print((args.out / "prompt_quality.md").read_text())


if __name__ == "__main__":
    main()
