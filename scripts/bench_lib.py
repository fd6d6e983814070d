"""What the benchmark scripts share: resumable steps, nnU-Net commands, seeded training runs, prediction of a
test set with the final checkpoint (or a snapshot), evaluation, nnU-Net self-training, mean +- std tables.

Every run gets its own ``nnUNet_results`` per seed (nnU-Net's output folder has no seed in its name), its seed in
``nnUNet_sss_seed``, its budget in ``nnUNet_sss_num_epochs`` / ``nnUNet_sss_iterations_per_epoch`` and learning-curve
snapshots from ``nnUNet_sss_snapshot_every``. A finished step leaves a marker and is skipped on a rerun; an
interrupted training run resumes with ``--c``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bin_cmd(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def run(cmd: list[str], env: dict, log: Path) -> None:
    print(f"$ {' '.join(cmd)}  (log: {log})", flush=True)
    with open(log, "a") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def todo(marker: Path, what: str) -> bool:
    """True when the step still has to run (its marker is missing); prints progress either way."""
    if marker.exists():
        print(f"[skip] {what} (done earlier)", flush=True)
        return False
    print(f"[....] {what}", flush=True)
    return True


def machine_line(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}, device {device}"


def base_env(work: Path, num_processes: int) -> dict[str, str]:
    """nnU-Net folders under ``work`` and CPU-friendly defaults; also exported to this process."""
    from nnunetv2_sss.cli import cpu_friendly_env, ensure_ext_trainer_env

    env = cpu_friendly_env(dict(os.environ))
    env.update(nnUNet_raw=str(work / "nnUNet_raw"), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
               nnUNet_results=str(work / "results" / "default"), nnUNet_def_n_proc=str(num_processes))
    env.setdefault("nnUNet_n_proc_DA", "2")
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[k]).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    env["nnUNet_extTrainer"] = with_bench_trainers(ensure_ext_trainer_env())
    return env


def with_bench_trainers(ext_trainer: str) -> str:
    """``nnUNet_extTrainer`` plus the benchmark-only ablation trainers of ``scripts/bench_trainers``."""
    folder = str(Path(__file__).resolve().parent / "bench_trainers")
    value = os.pathsep.join([*ext_trainer.split(os.pathsep), folder])
    os.environ["nnUNet_extTrainer"] = value
    return value


@dataclass(frozen=True)
class Run:
    """One training run: ``label`` names the arm (e.g. 'sup3'), ``seed`` the repeat."""

    label: str
    dataset: int
    trainer: str
    seed: int
    iterations: int
    configuration: str
    iters_per_epoch: int = 50
    after: str = ""  # the run it starts from or learns from (e.g. 'sup4000'): part of its folder's name

    @property
    def name(self) -> str:
        return f"{self.label}_s{self.seed}"

    @property
    def key(self) -> str:
        """Unique per run: label, seed, iterations and what it starts from."""
        return f"{self.label}_s{self.seed}_it{self.iterations}" + (f"_after_{self.after}" if self.after else "")

    def results_root(self, work: Path) -> Path:
        return work / "results" / self.key

    def fold_dir(self, work: Path) -> Path:
        root = self.results_root(work)
        ds = next(root.glob(f"Dataset{self.dataset:03d}_*"), root / f"Dataset{self.dataset:03d}_missing")
        return ds / f"{self.trainer}__nnUNetPlans__{self.configuration}" / "fold_all"

    def env(self, base: dict[str, str], work: Path, snapshot_every: int = 0) -> dict[str, str]:
        env = dict(base)
        env.update(nnUNet_results=str(self.results_root(work)), nnUNet_sss_seed=str(self.seed),
                   nnUNet_sss_num_epochs=str(self.iterations // self.iters_per_epoch),
                   nnUNet_sss_iterations_per_epoch=str(self.iters_per_epoch),
                   nnUNet_sss_val_iterations_per_epoch="2", nnUNet_sss_snapshot_every=str(snapshot_every),
                   nnUNet_sss_skip_final_validation="1")
        Path(env["nnUNet_results"]).mkdir(parents=True, exist_ok=True)
        return env


def git_commit() -> str:
    """The commit the benchmark code runs at (with '+dirty' when the tree has uncommitted changes)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def run_commit(fold: Path) -> str | None:
    f = fold / "run.json"
    return json.loads(f.read_text()).get("commit") if f.is_file() else None


def train(r: Run, base: dict[str, str], work: Path, device: str, snapshot_every: int = 0,
          extra_env: dict[str, str] | None = None, commit: str | None = None) -> None:
    """``nnUNetv2_train`` of one run (resumed with ``--c`` when interrupted); ``run.json`` in the fold folder
    records the commit and the settings it was trained with. A finished run of the same trainer, dataset,
    configuration, seed, iterations and settings under another label (e.g. ``sup_2B`` of a protocol with half this
    B is ``sup`` of this one) is reused, not trained again; its ``run.json`` says so."""
    fold = r.fold_dir(work)
    if (fold / "checkpoint_final.pth").exists():
        print(f"[skip] train {r.name} it{r.iterations} (done earlier)", flush=True)
        return
    env = {**r.env(base, work, snapshot_every), **(extra_env or {})}
    settings = {k: v for k, v in env.items() if k.startswith("nnUNet_sss_")}
    same = identical_run(r, work, settings)
    if same is not None:
        print(f"[skip] train {r.name} it{r.iterations}: the identical run {same} is reused", flush=True)
        reuse_run(same, r.results_root(work) / same.relative_to(same.parents[2]))
        return
    print(f"[....] train {r.name}: {r.trainer} on Dataset{r.dataset:03d}, {r.iterations} iterations, seed {r.seed}",
          flush=True)
    cmd = [bin_cmd("nnUNetv2_train"), str(r.dataset), r.configuration, "all", "-tr", r.trainer, "-device", device]
    if (fold / "checkpoint_latest.pth").exists():
        cmd.append("--c")
    run(cmd, env, work / "logs" / f"train_{r.name}_it{r.iterations}.log")
    write_atomic(r.fold_dir(work) / "run.json", json.dumps(
        {"commit": commit or git_commit(), "trainer": r.trainer, "iterations": r.iterations, "seed": r.seed,
         "settings": settings}, indent=1))


def identical_run(r: Run, work: Path, settings: dict[str, str]) -> Path | None:
    """The fold folder of a finished run with exactly this run's training set-up, if any."""
    pattern = f"*/Dataset{r.dataset:03d}_*/{r.trainer}__nnUNetPlans__{r.configuration}/fold_all"
    for fold in sorted((work / "results").glob(pattern)):
        info = fold / "run.json"
        if not (fold / "checkpoint_final.pth").exists() or not info.is_file():
            continue
        d = json.loads(info.read_text())
        if (d.get("trainer"), d.get("iterations"), d.get("seed"), d.get("settings")) == (
                r.trainer, r.iterations, r.seed, settings) and "reused_from" not in d:
            return fold
    return None


def reuse_run(fold: Path, dest_fold: Path) -> None:
    """The trained model folder (plans, dataset.json, fold) hard-linked under ``dest_fold``'s results root."""
    from nnunetv2_sss.files import replace_folder, temporary_name

    src_model, dest_model = fold.parent, dest_fold.parent
    tmp = temporary_name(dest_model)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src_model, tmp, copy_function=os.link)
    info = json.loads((tmp / fold.name / "run.json").read_text())
    (tmp / fold.name / "run.json").unlink()  # a hard link: never write through it into the original
    info["reused_from"] = str(fold)
    (tmp / fold.name / "run.json").write_text(json.dumps(info, indent=1))
    dest_model.parent.mkdir(parents=True, exist_ok=True)
    replace_folder(tmp, dest_model)


def raw_folder(base: dict[str, str], ds_id: int) -> Path:
    found = sorted(Path(base["nnUNet_raw"]).glob(f"Dataset{ds_id:03d}_*"))
    if not found:
        sys.exit(f"no raw dataset {ds_id} under {base['nnUNet_raw']}")
    return found[0]


def bench_env(work: Path, jobs: int, nnunet_folders_in_work: bool = False) -> dict[str, str]:
    """Environment of the benchmark's nnU-Net commands: results (and, for the prepared datasets, raw and
    preprocessed) under ``work``; one torch thread per job when jobs run side by side."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    if nnunet_folders_in_work:
        base = base_env(work, 2)
    else:
        from nnunetv2_sss.cli import cpu_friendly_env, ensure_ext_trainer_env

        base = cpu_friendly_env(dict(os.environ))
        for k in ("nnUNet_raw", "nnUNet_preprocessed"):
            if not base.get(k):
                sys.exit(f"set {k} (the dataset's nnU-Net folders)")
        base.update(nnUNet_results=str(work / "results" / "default"))
        base.setdefault("nnUNet_n_proc_DA", "2")
        os.environ.update(base)
        base["nnUNet_extTrainer"] = with_bench_trainers(ensure_ext_trainer_env())
    if jobs > 1:
        base.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        torch.set_num_threads(1)
    return base


def prediction_stamp(checkpoint: Path, thresholds: tuple[float, ...]) -> str:
    """What a cached prediction depends on: the checkpoint file, the thresholds, the code that predicts and
    measures (``predict_in_process``, ``PseudoLabelDiagnostics``, the package's predictor set-up) and nnU-Net's
    version, so a change of any of them predicts again."""
    import hashlib
    import inspect
    from importlib.metadata import version

    from nnunetv2_sss.evaluation import prediction

    code = "".join(inspect.getsource(o) for o in (predict_in_process, PseudoLabelDiagnostics, prediction))
    return json.dumps({"checkpoint_mtime_ns": checkpoint.stat().st_mtime_ns, "thresholds": list(thresholds),
                       "code": hashlib.sha256(code.encode()).hexdigest()[:16], "nnunetv2": version("nnunetv2")})


class PseudoLabelDiagnostics:
    """Per class c and threshold t, summed over cases: pixels predicted c, of those confident (max softmax >= t),
    of those correct, pixels of c in the labels, and of those confidently predicted background."""

    def __init__(self, classes: dict[int, str], thresholds: tuple[float, ...]):
        self.classes, self.thresholds = classes, thresholds
        self.counts = {c: {t: np.zeros(5) for t in thresholds} for c in classes}

    def add(self, seg: np.ndarray, probs: np.ndarray, gt: np.ndarray) -> None:
        conf = np.asarray(probs).max(0)
        if conf.shape != gt.shape:
            raise RuntimeError(f"probabilities {conf.shape} vs label {gt.shape}")
        for c in self.classes:
            p_c, g_c = seg == c, gt == c
            for t in self.thresholds:
                m = conf >= t
                self.counts[c][t] += [p_c.sum(), (p_c & m).sum(), (p_c & m & g_c).sum(), g_c.sum(),
                                      (g_c & (seg == 0) & m).sum()]

    def to_dict(self) -> dict:
        def ratio(a: float, b: float) -> float | None:
            return float(a / b) if b else None

        return {self.classes[c]: {str(t): {"confident_share": ratio(v[1], v[0]),
                                           "confident_precision": ratio(v[2], v[1]),
                                           "confident_background": ratio(v[4], v[3])} for t, v in per_t.items()}
                for c, per_t in self.counts.items()}


def predict_in_process(fold: Path, checkpoint: str, images: Path, labels: Path, out: Path, dataset_json: Path,
                       device: str, thresholds: tuple[float, ...] = ()) -> Path:
    """Every labeled case of ``labels`` predicted by nnU-Net's ``nnUNetPredictor`` from ``images`` (what
    ``nnUNetv2_predict --disable_tta`` runs), in this process; cached by ``prediction_stamp``.

    With ``thresholds``, also the pseudo-label diagnostics of this checkpoint (labels never reach training), per
    class c and threshold t over all cases: ``confident_share`` = |pred = c, conf >= t| / |pred = c|,
    ``confident_precision`` = |pred = c, conf >= t, gt = c| / |pred = c, conf >= t|, ``confident_background`` =
    |gt = c, pred = 0, conf >= t| / |gt = c|; from un-augmented images, a proxy for the weak view. Written to
    ``out/diagnostics.json``."""
    stamp = prediction_stamp(fold / checkpoint, thresholds)
    if (out / ".done").exists() and (out / ".done").read_text() == stamp:
        return out
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunetv2_sss.evaluation.prediction import predictor_from_checkpoint
    from nnunetv2_sss.files import replace_folder, temporary_name

    ds = json.loads(dataset_json.read_text())
    ending, n_ch = ds["file_ending"], len(ds["channel_names"])
    print(f"[....] predict {fold.parent.parent.parent.name} {checkpoint} -> {out.name}", flush=True)
    tmp = temporary_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    predictor = predictor_from_checkpoint(fold / checkpoint, device)
    io = SimpleITKIO()
    diagnostics = PseudoLabelDiagnostics({int(v): k for k, v in ds["labels"].items() if int(v) > 0}, thresholds)
    for lab in sorted(labels.glob(f"*{ending}")):
        case = lab.name[: -len(ending)]
        img, props = io.read_images([str(images / f"{case}_{i:04d}{ending}") for i in range(n_ch)])
        seg, probs = predictor.predict_single_npy_array(img, props, None, None, True)
        io.write_seg(np.asarray(seg).astype(np.uint8), str(tmp / lab.name), props)
        if thresholds:
            diagnostics.add(seg, probs, io.read_seg(str(lab))[0][0])
    if thresholds:
        (tmp / "diagnostics.json").write_text(json.dumps(diagnostics.to_dict(), indent=1))
    (tmp / ".done").write_text(stamp)
    replace_folder(tmp, out)
    return out


def fg_dice(s: dict, cls: str | None = None) -> float:
    return s["foreground_mean"]["dice"] if cls is None else s["per_class"][cls]["dice"]["mean"]


def fg_hd95(s: dict, cls: str | None = None) -> float:
    return s["foreground_mean"]["hd95"] if cls is None else s["per_class"][cls]["hd95"]["mean"]


def save_figure(fig, out: Path) -> None:
    from nnunetv2_sss.files import save_figure as save

    save(fig, out, dpi=110)


def predict(r: Run, base: dict[str, str], work: Path, images: Path, out: Path, device: str,
            checkpoint: str = "checkpoint_final.pth") -> Path:
    """nnUNetv2_predict of ``images`` with one checkpoint of the run (no TTA), resumable."""
    if todo(out / ".done", f"predict {r.name} {checkpoint} -> {out.name}"):
        shutil.rmtree(out, ignore_errors=True)
        run([bin_cmd("nnUNetv2_predict"), "-i", str(images), "-o", str(out), "-d", str(r.dataset), "-c",
             r.configuration, "-f", "all", "-tr", r.trainer, "-chk", checkpoint, "--disable_tta", "-npp", "1",
             "-nps", "1", "-device", device], r.env(base, work), work / "logs" / f"predict_{r.name}.log")
        (out / ".done").touch()
    return out


def snapshots(r: Run, work: Path) -> list[tuple[int, str]]:
    """(iterations trained, checkpoint file name) of the run's snapshots and its final checkpoint."""
    fold = r.fold_dir(work)
    out = [(int(p.stem.removeprefix("checkpoint_epoch")) * r.iters_per_epoch, p.name)
           for p in sorted(fold.glob("checkpoint_epoch*.pth"))]
    return out + [(r.iterations, "checkpoint_final.pth")]


def training_seconds(checkpoint: Path) -> float:
    """Seconds of training up to a checkpoint, from nnU-Net's own epoch timestamps stored in it."""
    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    log = ck["logging"]
    starts, ends = log["epoch_start_timestamps"], log["epoch_end_timestamps"]
    n = min(len(starts), len(ends))
    t = float(sum(e - s for s, e in zip(starts[:n], ends[:n])))
    if len(starts) > n:  # a snapshot is written before nnU-Net logs its epoch's end: the file's time is that end
        t += max(0.0, checkpoint.stat().st_mtime - starts[n])
    return t


def evaluate(gt: Path, pred: Path, dataset_json: Path, out: Path) -> dict:
    from nnunetv2_sss.evaluation.metrics import evaluate_folders

    summary_file = out / "summary.json"
    if summary_file.exists() and summary_file.stat().st_mtime >= (pred / ".done").stat().st_mtime:
        return json.loads(summary_file.read_text())
    return evaluate_folders(gt, pred, out_dir=out, dataset_json=dataset_json)


def link_case(src: Path, dst: Path) -> None:
    if not dst.exists():
        os.symlink(src.resolve(), dst)


def write_atomic(path: Path, text: str) -> None:
    from nnunetv2_sss.files import atomic_write_text

    atomic_write_text(path, text)


def build_self_training_dataset(teacher: Run, base: dict[str, str], work: Path, source_raw: Path, new_id: int,
                                name: str, device: str) -> None:
    """nnU-Net self-training (nnU-Net#2338), stock commands only: the supervised teacher predicts the unlabeled
    images; a new raw dataset holds the labeled cases plus the pseudo-labeled ones as ordinary training cases."""
    from nnunetv2_sss.datasets.label_budget import staged_raw_dataset, write_json

    marker = work / f".selftrain_{new_id}_{teacher.name}_it{teacher.iterations}"  # a new teacher rebuilds it
    if not todo(marker, f"self-training dataset {new_id} from {teacher.name}"):
        return
    for other in work.glob(f".*_{new_id}_*"):  # what was built for dataset new_id from another teacher is gone now
        other.unlink()
    pseudo = predict(teacher, base, work, source_raw / "imagesUnlabeled", work / "predictions" /
                     f"unlabeled_{teacher.name}_it{teacher.iterations}", device)
    ds = json.loads((source_raw / "dataset.json").read_text())
    ending = ds["file_ending"]
    with staged_raw_dataset(new_id, name, overwrite=True) as tmp:
        for sub in ("imagesTr", "labelsTr"):
            (tmp / sub).mkdir()
        for img in sorted((source_raw / "imagesTr").glob(f"*{ending}")):
            link_case(img, tmp / "imagesTr" / img.name)
        for lab in sorted((source_raw / "labelsTr").glob(f"*{ending}")):
            link_case(lab, tmp / "labelsTr" / lab.name)
        n_pseudo = 0
        for img in sorted((source_raw / "imagesUnlabeled").glob(f"*{ending}")):
            case = img.name[: -len(ending)].rsplit("_", 1)[0]
            link_case(img, tmp / "imagesTr" / img.name)
            shutil.copy(pseudo / f"{case}{ending}", tmp / "labelsTr" / f"{case}{ending}")
            n_pseudo += 1
        ds["numTraining"] = len(list((tmp / "labelsTr").glob(f"*{ending}")))
        ds["description"] = f"self-training: labeled cases + {n_pseudo} cases pseudo-labeled by {teacher.name}"
        write_json(ds, tmp / "dataset.json")
    marker.touch()


def prepare_copied_plans(source_id: int, target_id: int, configuration: str, base: dict[str, str], work: Path,
                         np_workers: int, marker_name: str) -> None:
    """Give dataset ``target_id`` the plans of ``source_id`` (same network, batch, patch) and preprocess it."""
    marker = work / marker_name
    if not todo(marker, f"plans of Dataset{source_id:03d} -> Dataset{target_id:03d}, preprocess {configuration}"):
        return
    log = work / "logs" / "plan.log"
    run([bin_cmd("nnUNetv2_extract_fingerprint"), "-d", str(target_id), "-np", str(np_workers)], base, log)
    run([bin_cmd("nnUNetv2_move_plans_between_datasets"), "-s", str(source_id), "-t", str(target_id),
         "-sp", "nnUNetPlans", "-tp", "nnUNetPlans"], base, log)
    raw = next(Path(base["nnUNet_raw"]).glob(f"Dataset{target_id:03d}_*"))
    shutil.copy(raw / "dataset.json", Path(base["nnUNet_preprocessed"]) / raw.name / "dataset.json")
    run([bin_cmd("nnUNetv2_preprocess"), "-d", str(target_id), "-c", configuration, "-np", str(np_workers)], base,
        log)
    marker.touch()


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def fmt(values: list[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"
