"""Does semi-supervised training pay on *this* dataset? Supervised first, then semi-supervised, against the controls.

For any planned nnU-Net dataset with unlabeled images (``imagesUnlabeled``, preprocessed) and a labeled test set
that training never sees, one resumable command trains, per seed, on fold ``all`` with one configuration:

* ``sup``        stock supervised nnU-Net (``nnUNetTrainer_budget``) on the labeled cases, ``--sup-iterations`` B;
* ``sup_2B``     the same for 2B iterations: has supervised plateaued at B? (their difference vs the seed spread);
* ``sss_ws``     ``nnUNetTrainerSSS_noSAM`` warm-started from that seed's ``sup`` (``nnUNet_sss_init_checkpoint``),
                 ``--semi-iterations`` S;
* ``unimatch_ws`` ``nnUNetTrainerUniMatch`` warm-started likewise (DFE against UniMatch);
* ``sup_long``   supervised training continued from ``sup`` with the warm-start schedule for about the semi stage's
                 time (``--long-factor`` x S iterations): is the gain more than more training?
* ``selftrain``  nnU-Net self-training with stock commands (nnU-Net#2338): ``sup`` predicts the unlabeled images,
                 a new dataset holds labeled + pseudo-labeled cases (same plans), trained for B iterations;
* ``full``       the all-labeled reference (``--full-dataset``, same plans), 2B iterations;
* ``onerun``     ``nnUNetTrainerSSS_noSAM`` from scratch in one run: B supervised warm-up iterations inside the run,
                 then S semi-supervised ones (``nnUNet_sss_unsup_warmup_fraction`` = B / (B + S));
* ``tune_*``     (first seed, validation cases only) the semi stage at another learning rate
                 (``tune_sss_ws_lr*``), with a background threshold of its own (``tune_sss_ws_bg*``), with its
                 unsupervised weights scaled (``tune_sss_ws_uw*``), with pseudo-labels from an EMA teacher
                 (``tune_sss_ws_ema``), or as another trainer warm-started likewise (``--tune-trainers NAME``:
                 ``tune_tr_<NAME without nnUNetTrainer>``, e.g. an ablation of ``scripts/bench_trainers``);
* ``ws_*``       another semi-supervised trainer warm-started from ``sup`` on every seed, with the test cases
                 (``--compare-trainers NAME``: ``ws_<NAME without nnUNetTrainer>``): a tuning arm that earned seeds.

Every arm's time counts the supervised stage it starts from (total training time). Test cases are predicted by
nnU-Net's ``nnUNetPredictor`` with the **final** checkpoint, no TTA; Dice and HD95 per class; mean +- std over
seeds. With ``--val-images/--val-labels`` (cases that are neither test nor training), the semi stages' snapshots
and ``sup`` (the positive control) are also scored there, with the pseudo-label diagnostics: per class and
threshold, the share of pixels predicted as that class that are confident, the precision of those confident
pixels, and the share of the structure's pixels confidently called background. Each run folder gets ``run.json``
with the commit it was trained at; results are written to ``--work`` (``results_B<B>_S<S>.{md,json,png}``).
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import bench_lib as bl
import numpy as np

THRESHOLDS = (0.8, 0.9, 0.95)


@dataclass(frozen=True)
class Arm:
    label: str
    trainer: str
    iterations: int
    dataset: int
    warm_from: str | None = None  # label of the run whose final checkpoint starts this one (same seed)
    env: tuple[tuple[str, str], ...] = ()
    test: bool = True  # False: scored on the validation cases only (tuning rows)


@dataclass
class Protocol:
    dataset: int
    configuration: str
    test_images: Path
    test_labels: Path
    sup_iterations: int
    semi_iterations: int
    long_factor: float
    full_dataset: int | None = None
    val_images: Path | None = None
    val_labels: Path | None = None
    selftrain_id: int | None = None  # dataset id of the self-training dataset of seed 0 (+seed)
    tune_lrs: tuple[float, ...] = (0.001,)
    tune_background_thresholds: tuple[float, ...] = ()
    tune_unsup_weights: tuple[float, ...] = ()
    tune_trainers: tuple[str, ...] = ()
    compare_trainers: tuple[str, ...] = ()
    arms_wanted: tuple[str, ...] | None = None
    locks: defaultdict = field(default_factory=lambda: defaultdict(threading.Lock))

    def arms(self, seed: int, first_seed: bool, wanted_only: bool = True) -> list[Arm]:
        """In priority order: what the verdict needs first, the references and the plateau check after; only the
        ``arms_wanted`` unless ``wanted_only`` is False (the arm a wanted one starts from need not be wanted)."""
        b, s = self.sup_iterations, self.semi_iterations
        long_it = max(50, int(round(self.long_factor * s / 50)) * 50)
        out = [Arm("sup", "nnUNetTrainer_budget", b, self.dataset),
               Arm("sss_ws", "nnUNetTrainerSSS_noSAM", s, self.dataset, "sup"),
               Arm("sup_long", "nnUNetTrainer_budget", long_it, self.dataset, "sup")]
        if self.selftrain_id is not None:
            out.append(Arm("selftrain", "nnUNetTrainer_budget", b, self.selftrain_id + seed))
        if first_seed and self.val_labels is not None:
            for tag, env, values in (("lr", "nnUNet_sss_warm_start_lr", self.tune_lrs),
                                     ("bg", "nnUNet_sss_background_threshold", self.tune_background_thresholds),
                                     ("uw", "nnUNet_sss_unsup_weight", self.tune_unsup_weights)):
                out += [Arm(f"tune_sss_ws_{tag}{v:g}", "nnUNetTrainerSSS_noSAM", s, self.dataset, "sup",
                            ((env, str(v)),), test=False) for v in values]
            out.append(Arm("tune_sss_ws_ema", "nnUNetTrainerSSS_noSAM_EMA", s, self.dataset, "sup", test=False))
            out += [Arm(f"tune_tr_{t.removeprefix('nnUNetTrainer')}", t, s, self.dataset, "sup", test=False)
                    for t in self.tune_trainers]
        if self.full_dataset is not None:
            out.append(Arm("full", "nnUNetTrainer_budget", 2 * b, self.full_dataset))
        out += [Arm(f"ws_{t.removeprefix('nnUNetTrainer')}", t, s, self.dataset, "sup") for t in self.compare_trainers]
        out += [Arm("sup_2B", "nnUNetTrainer_budget", 2 * b, self.dataset),
                Arm("unimatch_ws", "nnUNetTrainerUniMatch", s, self.dataset, "sup")]
        out.append(Arm("onerun", "nnUNetTrainerSSS_noSAM", b + s, self.dataset, None,
                       (("nnUNet_sss_unsup_warmup_fraction", f"{b / (b + s):.6f}"),)))
        return [a for a in out if not wanted_only or self.arms_wanted is None
                or arm_family(a.label) in self.arms_wanted or a.label in self.arms_wanted]


def arm_family(label: str) -> str:
    """The arm without its tuned value: ``tune_sss_ws_lr0.001`` and ``tune_sss_ws_bg0.99`` -> ``tune_sss_ws``,
    ``tune_tr_SSS_noSAM_mirrorPL`` -> ``tune_tr``, ``ws_SSS_noSAM_mirrorPL`` -> ``ws``."""
    for family in ("tune_tr", "ws"):
        if label.startswith(family + "_"):
            return family
    return re.sub(r"_(lr|bg|uw)[0-9.e+-]+$", "", label)


class Runner:
    def __init__(self, p: Protocol, work: Path, base: dict[str, str], seeds: list[int], device: str):
        self.p, self.work, self.base, self.seeds, self.device = p, work, base, seeds, device
        self.commit = bl.git_commit()

    def run_of(self, arm: Arm, seed: int) -> bl.Run:
        source = arm.warm_from or ("sup" if arm.label == "selftrain" else None)
        after = f"{source}{self.arm(source, seed).iterations}" if source else ""
        return bl.Run(arm.label, arm.dataset, arm.trainer, seed, arm.iterations, self.p.configuration, after=after)

    def arm(self, label: str, seed: int) -> Arm:
        return next(a for a in self.p.arms(seed, seed == self.seeds[0], wanted_only=False) if a.label == label)

    def train(self, arm: Arm, seed: int) -> None:
        r = self.run_of(arm, seed)
        extra = dict(arm.env)
        if arm.warm_from is not None:
            teacher = self.arm(arm.warm_from, seed)
            self.train(teacher, seed)
            extra["nnUNet_sss_init_checkpoint"] = str(self.run_of(teacher, seed).fold_dir(self.work) /
                                                      "checkpoint_final.pth")
        if arm.label == "selftrain":
            self.prepare_selftrain(seed)
        with self.p.locks[r.name]:
            bl.train(r, self.base, self.work, self.device, snapshot_every=max(1, r.iterations // 50 // 5),
                     extra_env=extra, commit=self.commit)

    def prepare_selftrain(self, seed: int) -> None:
        teacher = self.run_of(self.arm("sup", seed), seed)
        new_id = self.p.selftrain_id + seed
        raw = bl.raw_folder(self.base, self.p.dataset)
        with self.p.locks[f"selftrain_{seed}"]:
            bl.build_self_training_dataset(teacher, self.base, self.work, raw, new_id,
                                           f"SelfTrain{self.p.dataset}s{seed}", self.device)
            bl.prepare_copied_plans(self.p.dataset, new_id, self.p.configuration, self.base, self.work, 2,
                                    f".planned_{new_id}_{teacher.name}_it{teacher.iterations}")

    def tag(self, arm: Arm, seed: int, split: str, checkpoint: str = "checkpoint_final.pth") -> str:
        return f"{split}_{self.run_of(arm, seed).key}_{Path(checkpoint).stem}"

    def score(self, arm: Arm, seed: int, split: str, checkpoint: str = "checkpoint_final.pth") -> dict:
        """Predict ``split`` with the checkpoint and evaluate it (both cached)."""
        r = self.run_of(arm, seed)
        images, labels = ((self.p.test_images, self.p.test_labels) if split == "test"
                          else (self.p.val_images, self.p.val_labels))
        tag = self.tag(arm, seed, split, checkpoint)
        ds_json = bl.raw_folder(self.base, self.p.dataset) / "dataset.json"
        pred = bl.predict_in_process(r.fold_dir(self.work), checkpoint, images, labels, self.work / "predictions" / tag,
                                     ds_json, self.device, THRESHOLDS if split == "val" else ())
        return bl.evaluate(labels, pred, ds_json, self.work / "evaluation" / tag)

    def scored(self, arm: Arm, seed: int, split: str, checkpoint: str = "checkpoint_final.pth") -> dict | None:
        """The evaluation ``score`` wrote, or None: reporting reads results, it never computes them."""
        f = self.work / "evaluation" / self.tag(arm, seed, split, checkpoint) / "summary.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def on_validation(self, arm: Arm, seed: int) -> bool:
        """Learning curves on the validation cases: first seed only, and never the all-labeled reference, whose
        training set may hold them (Hippocampus' does: every non-test case is labeled there)."""
        return self.p.val_labels is not None and seed == self.seeds[0] and arm.label != "full"

    def train_and_score(self, arm: Arm, seed: int) -> None:
        self.train(arm, seed)
        if arm.test:
            self.score(arm, seed, "test")
        if self.on_validation(arm, seed):
            r = self.run_of(arm, seed)
            cks = [ck for _, ck in bl.snapshots(r, self.work)] if arm.label != "sup_long" else ["checkpoint_final.pth"]
            for ck in cks:
                self.score(arm, seed, "val", ck)

    def total_seconds(self, arm: Arm, seed: int, checkpoint: str = "checkpoint_final.pth") -> float:
        """Training time up to ``checkpoint`` plus that of the supervised model it starts from (or learns from)."""
        t = bl.training_seconds(self.run_of(arm, seed).fold_dir(self.work) / checkpoint)
        if arm.warm_from is not None or arm.label == "selftrain":
            sup = self.arm("sup", seed)
            t += bl.training_seconds(self.run_of(sup, seed).fold_dir(self.work) / "checkpoint_final.pth")
        return t

    def run_all(self, jobs: int) -> None:
        """Every seed's supervised model first (the others start from it), then the arms in the protocol's priority
        order across seeds, so an interrupted benchmark holds the comparisons that matter most."""
        arms = {s: self.p.arms(s, s == self.seeds[0]) for s in self.seeds}
        labels = list(dict.fromkeys(a.label for s in self.seeds for a in arms[s]))
        order = [(a, s) for lab in labels for s in self.seeds for a in arms[s] if a.label == lab]
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for f in [pool.submit(self.train_and_score, a, s) for a, s in order]:
                f.result()


def report(rn: Runner, title: str, earlier: list[Path] = ()) -> dict:
    p, work = rn.p, rn.work
    ds_json = json.loads((bl.raw_folder(rn.base, p.dataset) / "dataset.json").read_text())
    classes = {str(v): k for k, v in ds_json["labels"].items() if int(v) > 0}
    res = {"title": title, "configuration": p.configuration, "sup_iterations": p.sup_iterations,
           "semi_iterations": p.semi_iterations, "seeds": rn.seeds, "machine": bl.machine_line(rn.device),
           "commit_of_report": rn.commit, "arms": {}, "curves": {}, "diagnostics": {}}
    labels_seen = []
    for s in rn.seeds:
        for a in p.arms(s, s == rn.seeds[0]):
            if a.label not in labels_seen:
                labels_seen.append(a.label)
    for label in labels_seen:
        done = [(rn.arm(label, s), s) for s in rn.seeds if any(a.label == label for a in p.arms(s, s == rn.seeds[0]))]
        done = [(a, s) for a, s in done if (rn.run_of(a, s).fold_dir(work) / "checkpoint_final.pth").exists()]
        if not done:
            continue
        a0 = done[0][0]
        entry = {"trainer": a0.trainer, "iterations": a0.iterations, "warm_from": a0.warm_from, "seeds": [],
                 "train_min_total": [], "commits": []}
        for a, s in done:
            summ = rn.scored(a, s, "test") if a.test else None
            if a.test and summ is None:
                entry.setdefault("not_scored_yet", []).append(s)
                continue
            entry["seeds"].append(s)
            entry["train_min_total"].append(rn.total_seconds(a, s) / 60)
            entry["commits"].append(bl.run_commit(rn.run_of(a, s).fold_dir(work)))
            if summ is not None:
                for c, n in classes.items():
                    entry.setdefault("dice", {}).setdefault(n, []).append(bl.fg_dice(summ, c))
                    entry.setdefault("hd95", {}).setdefault(n, []).append(bl.fg_hd95(summ, c))
                entry.setdefault("dice", {}).setdefault("mean", []).append(bl.fg_dice(summ))
                entry.setdefault("hd95", {}).setdefault("mean", []).append(bl.fg_hd95(summ))
        if rn.on_validation(*done[0]):
            a, s = done[0]
            r = rn.run_of(a, s)
            cks = bl.snapshots(r, work) if label != "sup_long" else [(r.iterations, "checkpoint_final.pth")]
            curve = []
            for it, ck in cks:
                summ = rn.scored(a, s, "val", ck)
                if summ is None:
                    continue
                tag = rn.tag(a, s, "val", ck)
                diag = json.loads((work / "predictions" / tag / "diagnostics.json").read_text())
                curve.append({"iterations": it, "total_min": rn.total_seconds(a, s, ck) / 60,
                              "dice": bl.fg_dice(summ), "diagnostics": diag})
            res["curves"][label] = curve
        res["arms"][label] = entry
    for f in earlier:
        merge_earlier(res, json.loads(f.read_text()), f.name, wanted=set(labels_seen))
    arms = res["arms"]

    def m(label: str) -> float | None:
        return float(np.mean(arms[label]["dice"]["mean"])) if label in arms and "dice" in arms[label] else None

    sup, full = m("sup"), m("full")
    for label, e in arms.items():
        e["gap_closure"] = ((m(label) - sup) / (full - sup)) if (sup is not None and full is not None and
                                                                 "dice" in e and full != sup) else None
    res["plateau"], res["verdict"] = plateau_and_verdict(arms)
    res["paired"] = paired_differences(arms)
    write_report(res, classes, work)
    return res


def merge_earlier(res: dict, old: dict, source: str, wanted: set[str]) -> None:
    """Add the seeds of an earlier report that this work folder has no run of (e.g. a machine that was lost).
    A seed is taken whole or not at all: the same seed trained on another CPU gives another supervised model
    (measured: Hippocampus sup 0.781 / 0.775 on one machine, 0.788 / 0.770 on another), so an arm is never paired
    with a supervised model it did not start from. Only for the same supervised stage B and the same arm length
    (which fixes S for the semi arms), for the seeds asked for. Every merged seed is named in ``from_earlier`` with
    its file, and the report lists the earlier machines."""
    if old["sup_iterations"] != res["sup_iterations"]:
        raise SystemExit(f"{source}: B = {old['sup_iterations']}, not B = {res['sup_iterations']}: results of "
                         "another protocol")
    own = {s for e in res["arms"].values() for s in e["seeds"] + e.get("not_scored_yet", [])}
    merged = 0
    for label, e_old in old["arms"].items():
        if label not in wanted or "dice" not in e_old:
            continue
        if label in res["arms"] and res["arms"][label]["iterations"] != e_old["iterations"]:
            continue
        take = [i for i, s in enumerate(e_old["seeds"]) if s in res["seeds"] and s not in own]
        if not take:
            continue
        e = res["arms"].setdefault(label, {k: e_old[k] for k in ("trainer", "iterations", "warm_from")}
                                   | {"seeds": [], "train_min_total": [], "commits": []})
        for i in take:
            s = e_old["seeds"][i]
            e["seeds"].append(s)
            e["train_min_total"].append(e_old["train_min_total"][i])
            e["commits"].append(e_old["commits"][i])
            for metric in ("dice", "hd95"):
                for n, values in e_old[metric].items():
                    e.setdefault(metric, {}).setdefault(n, []).append(values[i])
            e.setdefault("from_earlier", {})[str(s)] = source
            merged += 1
        _order_by_seed(e)
    for label, curve in old.get("curves", {}).items():
        first = res["seeds"][0]  # the curves are of the first seed: taken only with that seed, whole
        if label in wanted and label not in res["curves"] and old["seeds"][0] == first and first not in own:
            res["curves"][label] = curve
    if merged:
        res.setdefault("earlier", []).append({"file": source, "machine": old["machine"],
                                             "commit_of_report": old["commit_of_report"], "results": merged})


def _order_by_seed(e: dict) -> None:
    """Sort an arm's per-seed lists (seeds, times, commits, every metric) by seed."""
    order = sorted(range(len(e["seeds"])), key=lambda i: e["seeds"][i])
    for k in ("seeds", "train_min_total", "commits"):
        e[k] = [e[k][i] for i in order]
    for metric in ("dice", "hd95"):
        for n in e.get(metric, {}):
            e[metric][n] = [e[metric][n][i] for i in order]


def plateau_and_verdict(arms: dict) -> tuple[dict | None, dict | None]:
    """Has supervised plateaued at B (|mean(2B) - mean(B)| below the larger seed std of the two)? Does the
    recommended arm (``sss_ws``) meet the issue's bar against sup, full, selftrain and sup_long?"""
    def stats(label: str) -> tuple[float, float] | None:
        e = arms.get(label, {})
        return bl.mean_std(e["dice"]["mean"]) if "dice" in e and len(e["dice"]["mean"]) > 1 else None

    sup, sup2, semi, full = stats("sup"), stats("sup_2B"), stats("sss_ws"), stats("full")
    plateau = None
    if sup and sup2:
        diff = sup2[0] - sup[0]
        plateau = {"diff_2B_minus_B": diff, "seed_std": max(sup[1], sup2[1]),
                   "plateaued": abs(diff) < max(sup[1], sup2[1])}
    verdict = None
    if sup and semi:
        verdict = {"semi_minus_std_above_sup_plus_std": semi[0] - semi[1] > sup[0] + sup[1]}
        if full:
            verdict["gap_closure_at_least_half"] = (semi[0] - sup[0]) / (full[0] - sup[0]) >= 0.5
        for other in ("selftrain", "sup_long", "unimatch_ws", "sup_2B", "onerun"):
            if stats(other):
                verdict[f"above_{other}"] = semi[0] > stats(other)[0]
    return plateau, verdict


def paired_differences(arms: dict, semi: str = "sss_ws") -> dict:
    """Per seed, mean Dice of ``semi`` minus that of every other tested arm on the same seed: the comparison that
    cancels what two arms of one seed share (the supervised model, the split), sharper than two means ± std."""
    if "dice" not in arms.get(semi, {}):
        return {}
    mine = dict(zip(arms[semi]["seeds"], arms[semi]["dice"]["mean"]))
    out = {}
    for label, e in arms.items():
        if label == semi or "dice" not in e:
            continue
        diffs = {s: mine[s] - d for s, d in zip(e["seeds"], e["dice"]["mean"]) if s in mine}
        if diffs:
            out[label] = {"seeds": list(diffs), "diff": list(diffs.values()),
                          "positive": sum(v > 0 for v in diffs.values())}
    return out


def _signed(values: list[float]) -> str:
    m, sd = bl.mean_std(values)
    return f"{m:+.4f} ± {sd:.4f}" if len(values) > 1 else f"{m:+.4f}"


def write_report(res: dict, classes: dict[str, str], work: Path) -> None:
    names = list(classes.values())
    lines = [f"{res['title']}; configuration `{res['configuration']}`, B = {res['sup_iterations']} supervised "
             f"iterations, S = {res['semi_iterations']} semi-supervised iterations; final checkpoints, no TTA; "
             f"mean ± std over seeds; training minutes include the supervised stage an arm starts from; machine: "
             f"{res['machine']}.", "",
             "| arm | trainer | iterations | from | seeds | " + " | ".join(f"{n} Dice" for n in names)
             + " | mean Dice | mean HD95 | gap closure | total training min |",
             "|---|---|---|---|---|" + "---|" * len(names) + "---|---|---|---|"]
    for label, e in res["arms"].items():
        if "dice" not in e:
            continue
        gc = e["gap_closure"]
        seeds = f"{len(e['seeds'])}" + (f" ({len(e['from_earlier'])} earlier)" if e.get("from_earlier") else "")
        lines.append(f"| {label} | {e['trainer']} | {e['iterations']} | {e['warm_from'] or '—'} | {seeds} | "
                     + " | ".join(bl.fmt(e["dice"][n]) for n in names) + f" | {bl.fmt(e['dice']['mean'])} | "
                     + f"{bl.fmt(e['hd95']['mean'], 2)} | {'—' if gc is None else f'{gc:.2f}'} | "
                     + f"{bl.fmt(e['train_min_total'], 1)} |")
    if res["curves"]:
        lines += ["", f"Validation cases, seed {res['seeds'][0]} (learning curves; pseudo-label diagnostics at τ = "
                  "0.95 per class: share of the pixels predicted as the class that are confident / precision of "
                  "those confident pixels / share of the structure's pixels confidently called background):", "",
                  "| run | iterations | total min | val mean Dice | " + " | ".join(names) + " |",
                  "|---|---|---|---|" + "---|" * len(names)]
        for label, curve in res["curves"].items():
            for pt in curve:
                cells = []
                for n in names:
                    d = pt["diagnostics"][n]["0.95"]
                    cells.append(" / ".join("–" if d[k] is None else f"{d[k]:.2f}" for k in
                                            ("confident_share", "confident_precision", "confident_background")))
                lines.append(f"| {label} | {pt['iterations']} | {pt['total_min']:.1f} | {pt['dice']:.3f} | "
                             + " | ".join(cells) + " |")
    for er in res.get("earlier", []):
        lines += ["", f"{er['results']} (arm, seed) results from the earlier report `{er['file']}` (report commit "
                  f"{er['commit_of_report'][:7]}, machine: {er['machine']}); their training minutes are that "
                  "machine's, so compare times within one machine only."]
    if res.get("plateau"):
        pl = res["plateau"]
        lines += ["", f"Plateau check: mean Dice at 2B − at B = {pl['diff_2B_minus_B']:+.4f}, larger seed std "
                  f"{pl['seed_std']:.4f}: supervised has {'' if pl['plateaued'] else 'NOT '}plateaued at B."]
    if res.get("paired"):
        lines += ["", "Paired by seed, sss_ws − arm in mean Dice (mean ± std over seeds; seeds where sss_ws is above): "
                  + "; ".join(f"{label} {_signed(d['diff'])} ({d['positive']}/{len(d['diff'])})"
                              for label, d in res["paired"].items()) + "."]
    if res.get("verdict"):
        lines += ["", "sss_ws against the bar: " + ", ".join(f"{k} {'yes' if v else 'no'}"
                                                                for k, v in res["verdict"].items()) + "."]
    text = "\n".join(lines) + "\n"
    stem = f"results_B{res['sup_iterations']}_S{res['semi_iterations']}"
    bl.write_atomic(work / f"{stem}.md", text)
    bl.write_atomic(work / f"{stem}.json", json.dumps(res, indent=1))
    plot(res, work / f"{stem}.png")
    print("\n" + text, flush=True)


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = res["curves"]  # empty without a validation split (e.g. ACDC): then the test panel alone
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(13 if curves else 6.5, 4.8), squeeze=False)
    ax = axes[0][0]
    for label, e in res["arms"].items():
        if "dice" in e:
            ax.scatter(e["train_min_total"], e["dice"]["mean"], label=label)
    ax.set_xlabel("total training time (min; supervised stage included)")
    ax.set_ylabel("test mean Dice (final checkpoint)")
    ax.set_title("test Dice against total training time (each point one seed)")
    ax.legend(fontsize=7)
    if curves:
        ax = axes[0][1]
        for label, curve in curves.items():
            ax.plot([p["total_min"] for p in curve], [p["dice"] for p in curve], marker=".", label=label)
        ax.set_xlabel("total training time (min)")
        ax.set_ylabel("validation mean Dice (snapshots)")
        ax.set_title(f"learning curves, seed {res['seeds'][0]}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    bl.save_figure(fig, out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--sup-iterations", type=int, required=True, help="B: the supervised stage")
    p.add_argument("--semi-iterations", type=int, required=True, help="S: the semi-supervised stage")
    p.add_argument("--long-factor", type=float, default=5.0,
                   help="sup_long trains this x S iterations (a semi iteration costs about 4-5 supervised ones)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="*", default=None, help="only these arms (e.g. sup sss_ws selftrain)")
    p.add_argument("--jobs", type=int, default=2, help="training runs at once (one torch thread each when > 1)")
    p.add_argument("--tune-lrs", type=float, nargs="*", default=[0.001],
                   help="semi-stage learning rates tried on the validation cases, first seed (default: 0.001; the "
                        "trainers' default is 0.01)")
    p.add_argument("--tune-background-thresholds", type=float, nargs="*", default=[],
                   help="background thresholds (nnUNet_sss_background_threshold) tried on the validation cases, "
                        "first seed (default: none; the trainers' default is the confidence threshold, 0.95)")
    p.add_argument("--tune-unsup-weights", type=float, nargs="*", default=[],
                   help="factors of every unsupervised weight (nnUNet_sss_unsup_weight) tried on the validation cases, "
                        "first seed (default: none; the trainers' default is 1.0, 2.0 is UniMatch's ratio)")
    p.add_argument("--tune-trainers", nargs="*", default=[],
                   help="other semi-supervised trainers warm-started from sup on the validation cases, first seed "
                        "(arm tune_tr_<name without nnUNetTrainer>; select them with --arms tune_tr)")
    p.add_argument("--compare-trainers", nargs="*", default=[],
                   help="other semi-supervised trainers warm-started from sup on every seed, test cases included "
                        "(arm ws_<name without nnUNetTrainer>; select them with --arms ws)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--earlier-results", type=Path, nargs="*", default=[],
                   help="results JSON of earlier runs of this protocol (e.g. from a lost machine, committed under "
                        "docs/benchmarks): the seeds --work has no run of are taken from them, whole, marked as such")
    p.add_argument("--device", default="cpu")


def protocol_options(a: argparse.Namespace) -> dict:
    """The ``Protocol`` keywords that ``add_arguments``' options set."""
    return dict(arms_wanted=tuple(a.arms) if a.arms else None, tune_lrs=tuple(a.tune_lrs),
                tune_background_thresholds=tuple(a.tune_background_thresholds),
                tune_unsup_weights=tuple(a.tune_unsup_weights), tune_trainers=tuple(a.tune_trainers),
                compare_trainers=tuple(a.compare_trainers))


def run_protocol(p: Protocol, a: argparse.Namespace, base: dict[str, str], title: str) -> dict:
    rn = Runner(p, a.work.resolve(), base, a.seeds, a.device)
    t0 = time.time()
    if not a.report_only:
        rn.run_all(a.jobs)
    res = report(rn, title, a.earlier_results)
    print(f"wall time of this invocation: {(time.time() - t0) / 60:.1f} min", flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", type=int, required=True, help="dataset id (planned, preprocessed, with imagesUnlabeled)")
    p.add_argument("-c", required=True, help="configuration")
    p.add_argument("--test-images", type=Path, required=True)
    p.add_argument("--test-labels", type=Path, required=True)
    p.add_argument("--val-images", type=Path)
    p.add_argument("--val-labels", type=Path)
    p.add_argument("--full-dataset", type=int, help="all-labeled reference dataset id (same plans)")
    p.add_argument("--selftrain-id", type=int, help="first free dataset id for the self-training datasets (+seed)")
    add_arguments(p)
    a = p.parse_args()
    base = bl.bench_env(a.work.resolve(), a.jobs)
    prot = Protocol(a.d, a.c, a.test_images, a.test_labels, a.sup_iterations, a.semi_iterations, a.long_factor,
                    a.full_dataset, a.val_images, a.val_labels, a.selftrain_id, **protocol_options(a))
    run_protocol(prot, a, base, f"Dataset{a.d:03d}")


if __name__ == "__main__":
    main()
