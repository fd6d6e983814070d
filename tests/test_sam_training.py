"""SAM-2 pseudo-label refresh and the SAM trainers (SSS, SemiSAM), on the CPU with a RANDOM-weight SAM-2.1 tiny.

Random weights say nothing about mask quality: these tests check rules, geometry, files, schedules and the stock
nnU-Net commands, never segmentation quality. Where geometry must be visible, ``BoxPainterSAM2TestDouble`` (the
real backend with only its mask decoder replaced by a box painter) stands in for a trained decoder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAM2_TINY, run_cli, save_random_sam2_checkpoint

from nnunetv2_sss.sam.backend import ENV_CHECKPOINT, ENV_CONFIG, NO_SAM_TRAINER, SAM2Backend
from nnunetv2_sss.sam.pcsw import PCSWConfig, SlicePrompt
from nnunetv2_sss.sam.refresh import (
    IGNORE,
    SUMMARY_FILE,
    apply_ignore_rules,
    batch_prompts,
    init_empty_pseudolabels,
    learn_limits_from_training_cases,
    merge_masks,
    read_pseudolabel,
    refresh_case,
    refresh_pseudolabels,
    write_pseudolabel,
)
from nnunetv2_sss.training.student_inference import predict_volume
from nnunetv2_sss.unlabeled.layout import sam2_cache_folder, sam_pseudolabel_folder

S = 256  # the smoke trainers' SAM image size: the tests' cache is the trainers' cache
TINY = SAM2_TINY
DATASET_ID = 983
TWIN = "twin000"  # an unlabeled copy of labeled case syn_tr000: its ground truth is known after preprocessing


@pytest.fixture(scope="session")
def sam_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-weight SAM-2.1 tiny saved like the official file ({"model": state_dict}, official name)."""
    return save_random_sam2_checkpoint(tmp_path_factory.mktemp("sam_ckpt"), S)


@pytest.fixture(scope="session")
def backend(sam_checkpoint: Path) -> SAM2Backend:
    return SAM2Backend(sam_checkpoint, image_size=S)


# ---------------------------------------------------------------------------------------------------------------
# merge rules on hand-made masks
def _prompt(z: int, label: int, n_points: int) -> SlicePrompt:
    coords = np.arange(2 * n_points, dtype=np.float32).reshape(n_points, 2) + 10 * label
    return SlicePrompt(z=z, label=label, point_coords=coords, point_labels=np.r_[1, np.zeros(n_points - 1)]
                       .astype(np.int32), box=np.array([label, 2 * label, 10 + label, 20 + label], np.float32),
                       component_area=1.0, component_pixels=1, consistency=1.0, score=1.0, window=(0, 1))


def test_batch_prompts_pads_points_with_minus_one() -> None:
    prompts = [_prompt(0, 1, 1), _prompt(0, 2, 3), _prompt(0, 3, 2)]
    boxes, coords, labels = batch_prompts(prompts)
    assert boxes.shape == (3, 4) and coords.shape == (3, 3, 2) and labels.shape == (3, 3)
    np.testing.assert_array_equal(boxes[1], prompts[1].box)
    assert labels.tolist() == [[1, -1, -1], [1, 0, 0], [1, 0, -1]]
    np.testing.assert_array_equal(coords[2, :2], prompts[2].point_coords)
    with pytest.raises(ValueError):
        batch_prompts([])


def test_merge_masks_resolves_overlap_by_score_and_uncovered_is_background() -> None:
    a = np.zeros((6, 8), bool)
    a[1:4, 1:5] = True
    b = np.zeros((6, 8), bool)
    b[2:5, 3:7] = True
    merged = merge_masks(np.stack([a, b]), np.array([0.6, 0.9]), [1, 2], (6, 8))
    assert merged.dtype == np.int16
    assert (merged[b] == 2).all()  # b has the higher score: it wins the overlap
    assert (merged[a & ~b] == 1).all()
    assert (merged[~(a | b)] == 0).all()
    swapped = merge_masks(np.stack([a, b]), np.array([0.9, 0.6]), [1, 2], (6, 8))
    assert (swapped[a] == 1).all() and (swapped[b & ~a] == 2).all()


def test_ignore_rules_confident_disagreement_and_rejected_class() -> None:
    sam = np.array([[0, 1, 1, 2],
                    [0, 0, 2, 2]], dtype=np.int16)
    student = np.array([[0, 1, 0, 2],
                        [3, 3, 2, 0]])
    conf = np.array([[0.95, 0.95, 0.95, 0.5],
                     [0.95, 0.5, 0.95, 0.6]])
    probs = np.zeros((4, 2, 4), np.float32)
    for c in range(4):
        probs[c] = np.where(student == c, conf, (1 - conf) / 3)
    out = apply_ignore_rules(sam, probs, rejected_labels=[], disagree_confidence=0.9)
    # (0, 2): SAM 1 vs confident student 0 -> ignored; (1, 0): SAM 0 vs confident 3 -> ignored;
    # (1, 1) and (1, 3): disagreement with an unconfident student -> SAM's label stays
    assert out.tolist() == [[0, 1, -1, 2], [-1, 0, 2, 2]]
    out = apply_ignore_rules(sam, probs, rejected_labels=[3], disagree_confidence=0.9)
    assert out.tolist() == [[0, 1, -1, 2], [-1, -1, 2, 2]]  # every pixel the student calls 3 is ignored
    assert (apply_ignore_rules(sam, probs, [], disagree_confidence=1.01) == sam).all()


def _write_unlabeled_case(folder: Path, identifier: str, data: np.ndarray) -> None:
    """A preprocessed unlabeled case as nnU-Net stores one (blosc2, with the class_locations its loader needs)."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    folder.mkdir(parents=True, exist_ok=True)
    props = {"class_locations": {c: np.zeros((0, 4), dtype=np.int64) for c in (1, 2)}}
    chunks = (1, 1, *data.shape[2:])
    nnUNetDatasetBlosc2.save_case(data.astype(np.float32), np.zeros((1, *data.shape[1:]), np.int8), props,
                                  str(folder / identifier), chunks=chunks, blocks=chunks)


def test_refresh_case_with_real_sam2_applies_rules_and_writes_maps(backend: SAM2Backend, tmp_path: Path) -> None:
    """Real (random) SAM-2 from the real cache: unprompted slice -> all -1, rejected class -> -1, confident
    disagreement -> -1, one decoder call per prompted slice; the map round-trips through nnU-Net's blosc2 format."""
    from nnunetv2_sss.sam.cache import build_sam2_cache

    rng = np.random.default_rng(0)
    z_n, h, w = 3, 40, 48
    data = rng.standard_normal((1, z_n, h, w)).astype(np.float32)
    data[0, :, 10:26, 12:30] += 3
    folder = tmp_path / "nnUNetPlans_2d_unlabeled"
    _write_unlabeled_case(folder, "case", data)
    build_sam2_cache(folder, backend, "nnUNetPlans", "2d", progress=False)

    student = np.zeros((z_n, h, w), np.int64)
    student[0, 10:26, 12:30] = 1  # slice 0: class 1 -> prompted; slice 1: nothing -> no prompt
    student[2, 10:26, 12:30] = 1  # slice 2: class 1 -> prompted,
    student[2, 30, 40:42] = 2  # and a 2-pixel speck of class 2 -> rejected (too few pixels)
    probs = np.full((3, z_n, h, w), 0.025, np.float32)
    np.put_along_axis(probs, student[None], 0.95, axis=0)

    calls = []
    real = backend.predict_from_features

    def counting(*args, **kwargs):
        calls.append(kwargs["boxes"].shape[0])
        return real(*args, **kwargs)

    backend.predict_from_features = counting  # instance attribute: counts the real calls
    try:
        case = refresh_case(backend, sam2_cache_folder(folder), "case", probs, [1, 2], None, PCSWConfig(window=1))
    finally:
        del backend.predict_from_features
    assert case.prompted_slices() == [0, 2] and calls == [1, 1]
    assert case.report.rejected[2] == {"too_few_pixels": 1}
    lm = case.label_map
    assert lm.shape == (z_n, h, w) and (lm[1] == IGNORE).all() and (case.sam_map[1] == IGNORE).all()
    assert (lm[2][student[2] == 2] == IGNORE).all()
    on = np.isin(np.arange(z_n), [0, 2])[:, None, None] & (student != 2)
    # a confident student everywhere: what is kept agrees with it, what SAM contradicts is ignored
    assert ((lm == student) | (lm == IGNORE))[on].all()
    assert ((lm == IGNORE) == (case.sam_map != student))[on].all()
    assert set(case.total) == {1}

    write_pseudolabel(folder, "case", lm, num_classes=3)
    back = read_pseudolabel(folder, "case")
    assert back.dtype == np.int8 and np.array_equal(back, lm)
    assert not list(sam_pseudolabel_folder(folder).glob("*.tmp*"))


def test_init_empty_pseudolabels_writes_missing_and_misshaped_maps(tmp_path: Path) -> None:
    folder = tmp_path / "nnUNetPlans_2d_unlabeled"
    for name, shape in (("a", (2, 16, 20)), ("b", (3, 16, 16))):
        _write_unlabeled_case(folder, name, np.zeros((1, *shape), np.float32))
    assert init_empty_pseudolabels(folder) == ["a", "b"]
    a = read_pseudolabel(folder, "a")
    assert a.shape == (2, 16, 20) and (a == IGNORE).all()
    write_pseudolabel(folder, "a", np.zeros((2, 16, 20), np.int16))
    write_pseudolabel(folder, "b", np.zeros((1, 16, 16), np.int16))  # stale shape
    (sam_pseudolabel_folder(folder) / "c.123.tmp.b2nd").write_bytes(b"half")
    assert init_empty_pseudolabels(folder) == ["b"]  # a is kept, b rewritten
    assert (read_pseudolabel(folder, "a") == 0).all() and read_pseudolabel(folder, "b").shape == (3, 16, 16)
    assert not list(sam_pseudolabel_folder(folder).glob("*.tmp*"))
    assert init_empty_pseudolabels(folder, overwrite=True) == ["a", "b"]
    assert (read_pseudolabel(folder, "a") == IGNORE).all()


# ---------------------------------------------------------------------------------------------------------------
# the synthetic dataset through the real nnU-Net commands
def _env(dirs: dict[str, Path], checkpoint: Path | None) -> dict[str, str]:
    from nnunetv2_sss.cli import ensure_ext_trainer_env

    env = dict(os.environ)
    env.update({k: str(v) for k, v in dirs.items()})
    env.update(nnUNet_n_proc_DA="0", nnUNet_compile="f", nnUNet_def_n_proc="1", OMP_NUM_THREADS="1")
    # nnUNetv2_train -device cpu sets torch's threads to cpu_count() whatever OMP_NUM_THREADS says; on a busy
    # 2-core machine spinning OpenMP threads then make a train step ~20x slower. Passive waiting avoids that.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["nnUNet_extTrainer"] = ensure_ext_trainer_env()
    env.pop(ENV_CONFIG, None)
    if checkpoint is None:
        env.pop(ENV_CHECKPOINT, None)
    else:
        env[ENV_CHECKPOINT] = str(checkpoint)
    return env


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory):
    """Synthetic dataset (5 labeled, 3 unlabeled + an unlabeled twin of syn_tr000, 1 test; 4 x 48 x 48), planned
    for 2d. Small, because this CPU is shared: every size here is about time, not about what is tested."""
    root = tmp_path_factory.mktemp("sam_training")
    dirs = {k: root / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for v in dirs.values():
        v.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in dirs.items():
            mp.setenv(k, str(v))
        from nnunetv2_sss.datasets.synthetic import make_synthetic_dataset

        raw = make_synthetic_dataset(dataset_id=DATASET_ID, n_labeled=5, n_unlabeled=3, n_test=1, shape=(4, 48, 48),
                                     overwrite=True)
        shutil.copy(raw / "imagesTr" / "syn_tr000_0000.nii.gz", raw / "imagesUnlabeled" / f"{TWIN}_0000.nii.gz")
        env = _env(dirs, None)
        env.pop("nnUNet_n_proc_DA")  # the planner calls torch.set_num_threads(nnUNet_n_proc_DA): 0 is refused
        run_cli(env, "nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "-np", "1", "-npfp", "1")
        yield dirs, raw


def _unlabeled_folder(dirs: dict[str, Path], raw: Path) -> Path:
    return dirs["nnUNet_preprocessed"] / raw.name / "nnUNetPlans_2d_unlabeled"


def _labeled_dataset(dirs: dict[str, Path], raw: Path):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    return nnUNetDatasetBlosc2(str(dirs["nnUNet_preprocessed"] / raw.name / "nnUNetPlans_2d"))


class _BoxPainterDecoder(torch.nn.Module):
    """Stands in for SAM's mask decoder: paints each prompt's box (read from what the prompt encoder received,
    corners labelled 2 and 3, in the S x S frame) on the (S/4)^2 low-res grid; score = 1 / (1 + box area), so a
    box inside another wins the overlap. Records the point labels of every call."""

    def __init__(self, real_decoder: torch.nn.Module, prompt_encoder: torch.nn.Module, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        # SAM-2's image encoding path borrows these two convolutions from the decoder: keep the real ones
        self.conv_s0, self.conv_s1 = real_decoder.conv_s0, real_decoder.conv_s1
        self.points: tuple[torch.Tensor, torch.Tensor] | None = None
        self.calls: list[np.ndarray] = []
        prompt_encoder.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs) -> None:
        self.points = kwargs["points"]

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output, repeat_image, high_res_features=None):
        coords, labels = self.points
        self.calls.append(labels.cpu().numpy())
        low = self.image_size // 4
        centres = (torch.arange(low, dtype=torch.float32) + 0.5) * 4
        logits, scores = [], []
        for c, lab in zip(coords, labels, strict=True):
            (x0, y0), (x1, y1) = c[lab == 2][0].tolist(), c[lab == 3][0].tolist()
            inside = ((centres >= y0) & (centres <= y1))[:, None] & ((centres >= x0) & (centres <= x1))[None, :]
            logits.append(torch.where(inside, 10.0, -10.0))
            scores.append(1.0 / (1.0 + (x1 - x0) * (y1 - y0)))
        return torch.stack(logits)[:, None], torch.tensor(scores)[:, None], None, None


class BoxPainterSAM2TestDouble(SAM2Backend):
    """The real SAM2Backend (random checkpoint, real predictor, prompt encoder, coordinate scaling and mask
    resizing) with only the mask decoder replaced by ``_BoxPainterDecoder``: its masks are the prompts' boxes,
    so where they land in the preprocessed slice is visible, which random weights cannot show."""

    def __init__(self, checkpoint: Path, image_size: int) -> None:
        super().__init__(checkpoint, image_size=image_size)
        self.painter = _BoxPainterDecoder(self.model.sam_mask_decoder, self.model.sam_prompt_encoder, image_size)
        self.model.sam_mask_decoder = self.painter


@pytest.mark.slow
def test_refresh_geometry_through_nnunet_preprocessing_and_sam_resize(planned, sam_checkpoint: Path,
                                                                      tmp_path: Path) -> None:
    """Student = the preprocessed ground truth of an unlabeled case: SAM-2's (painted) boxes must enclose each
    prompted structure at its preprocessed coordinates, and the written map must agree with that ground truth."""
    dirs, raw = planned
    from nnunetv2_sss.sam.cache import build_sam2_cache
    from nnunetv2_sss.unlabeled.preprocess import preprocess_unlabeled

    folder = preprocess_unlabeled(DATASET_ID, "2d", num_processes=1)
    labeled = _labeled_dataset(dirs, raw)
    data_l, seg_l, _, _ = labeled.load_case("syn_tr000")
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    data_u = np.asarray(nnUNetDatasetBlosc2(str(folder)).load_case(TWIN)[0][:])
    # the unlabeled path (no seg) and the labeled path give the same preprocessed image: same geometry
    assert data_u.shape == data_l.shape and np.allclose(data_u, data_l[:], atol=1e-5)
    gt = np.asarray(seg_l[:])[0].astype(np.int64)
    assert set(np.unique(gt)) >= {1, 2, 3}
    probs = np.stack([(np.maximum(gt, 0) == c) for c in range(4)]).astype(np.float32)

    double = BoxPainterSAM2TestDouble(sam_checkpoint, S)
    build_sam2_cache(folder, double, "nnUNetPlans", "2d", progress=False)
    limits = learn_limits_from_training_cases(labeled, labeled.identifiers, [1, 2, 3])
    assert limits.units == "px" and set(limits.per_class) == {1, 2, 3}
    case = refresh_case(double, sam2_cache_folder(folder), TWIN, probs, [1, 2, 3], limits)
    prompted = case.prompted_slices()
    assert len(prompted) >= 2 and len(double.painter.calls) == len(prompted)  # one decoder call per slice
    assert any((lab == -1).any() for lab in double.painter.calls)  # padded prompts reached SAM as "not a point"

    h, w = gt.shape[1:]
    tol_x, tol_y = 4 * w / S + 1, 4 * h / S + 1  # one decoder pixel in slice pixels, plus rounding
    yy, xx = np.mgrid[:h, :w]
    for z in prompted:
        masks, _ = case.masks[z]
        for m, p in zip(masks, [p for p in case.prompts if p.z == z], strict=True):
            structure = gt[z] == p.label
            assert m[structure].all(), f"slice {z} class {p.label}: the box misses part of the structure"
            x0, y0, x1, y1 = p.box
            assert not m[(xx < x0 - tol_x) | (xx > x1 - 1 + tol_x) | (yy < y0 - tol_y) | (yy > y1 - 1 + tol_y)].any()
            rows, cols = np.nonzero(structure)
            # the box hugs the structure (PCSW margin 5 % + 1 px), in the preprocessed frame
            assert x0 <= cols.min() and x1 > cols.max() and y0 <= rows.min() and y1 > rows.max()
            assert x0 >= cols.min() - 0.1 * (np.ptp(cols) + 1) - 2 and y1 <= rows.max() + 0.1 * (np.ptp(rows) + 1) + 3
    lm = case.label_map
    on = np.isin(np.arange(lm.shape[0]), prompted)
    assert ((lm == gt) | (lm == IGNORE))[on].all()  # a confident student: SAM's disagreements are ignored
    assert (lm[~on] == IGNORE).all()
    fg = on[:, None, None] & (gt > 0)
    assert (lm[fg] == gt[fg]).mean() > 0.6  # the nested smaller boxes win: most structure pixels keep their label

    summary = refresh_pseudolabels(double, folder, [TWIN], lambda _i, _d: probs, [1, 2, 3], 4, limits,
                                   PCSWConfig(mode="slice"), overlay_folder=tmp_path / "overlays",
                                   title_prefix="test: ")
    assert np.array_equal(read_pseudolabel(folder, TWIN), lm)
    assert summary.prompts == len(case.prompts) and 0 < summary.agreement < 1
    written = json.loads((tmp_path / "overlays" / SUMMARY_FILE).read_text())
    assert written["checkpoint"] == sam_checkpoint.name and written["cases"] == [TWIN]
    assert len(summary.overlays) == 2 and all((tmp_path / "overlays" / f).stat().st_size > 1000
                                              for f in summary.overlays)


def _trainer(name: str, fold: int = 0):
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunetv2_sss.cli import ensure_ext_trainer_env

    ensure_ext_trainer_env()
    return get_trainer_from_args(str(DATASET_ID), "2d", fold, name, device=torch.device("cpu"))


@pytest.mark.slow
def test_predict_volume_restores_deep_supervision_and_mode(planned, monkeypatch: pytest.MonkeyPatch) -> None:
    dirs, raw = planned
    for k, v in dirs.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.setenv("nnUNet_compile", "f")
    t = _trainer("nnUNetTrainerSSS_smoke")
    t.initialize()
    t.set_deep_supervision_enabled(True)
    t.network.train()
    data = np.asarray(_labeled_dataset(dirs, raw).load_case("syn_tr001")[0][:])
    probs = predict_volume(t, data)
    assert probs.shape == (4, *data.shape[1:]) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    assert t.network.decoder.deep_supervision is True and t.network.training
    t.network.eval()
    t.set_deep_supervision_enabled(False)
    again = predict_volume(t, data, use_mirroring=True)
    assert again.shape == probs.shape and not t.network.training and t.network.decoder.deep_supervision is False


@pytest.mark.slow
def test_schedule_rotation_and_checkpoint_state(planned, monkeypatch: pytest.MonkeyPatch) -> None:
    dirs, raw = planned
    for k, v in dirs.items():
        monkeypatch.setenv(k, str(v))
    from nnunetv2_sss.unlabeled.preprocess import preprocess_unlabeled

    preprocess_unlabeled(DATASET_ID, "2d", num_processes=1)
    t = _trainer("nnUNetTrainerSSS_5epochs")
    t.num_epochs, t.lambda_sam, t.unsup_warmup_fraction = 10, 0.5, 0.0  # SAM-2's own schedule only
    t.sam_warmup_fraction, t.sam_refresh_every_fraction, t.sam_rampup_fraction = 0.3, 0.2, 0.4  # 3, 2, 4 epochs
    assert [e for e in range(10) if t.sam_refresh_due(e)] == [2, 4, 6, 8]
    t.current_epoch = 5
    assert t.sam_loss_weight() == 0.0  # no refresh in this run yet: stale maps never count
    t.sam_last_refresh_epoch = 2
    weights = []
    for e in (2, 3, 4, 6, 9):
        t.current_epoch = e
        weights.append(t.sam_loss_weight())
    assert weights == [0.0, 0.125, 0.25, 0.5, 0.5]

    t.sam_refresh_max_cases = 3
    ids = sorted(["syn_un000", "syn_un001", "syn_un002", TWIN])
    assert t.sam_refresh_cases() == ids[:3]
    t.sam_refresh_count = 1
    assert t.sam_refresh_cases() == [ids[3], ids[0], ids[1]]
    t.sam_refresh_max_cases = None
    assert t.sam_refresh_cases() == ids

    labeled = _labeled_dataset(dirs, raw)
    t.pcsw_limits = learn_limits_from_training_cases(labeled, labeled.identifiers, [1, 2, 3])
    t.sam_agreement = 0.25
    state = t.extra_checkpoint_state()
    buf = Path(dirs["nnUNet_results"]) / "state.pt"
    torch.save(state, buf)
    loaded = torch.load(buf, weights_only=True)  # plain types only: no class of this package is pickled
    u = _trainer("nnUNetTrainerSemiSAM_5epochs")
    u.load_extra_checkpoint_state(loaded)
    assert u.pcsw_limits.to_dict() == t.pcsw_limits.to_dict()
    assert (u.sam_last_refresh_epoch, u.sam_refresh_count, u.sam_agreement) == (2, 1, 0.25)


@pytest.mark.slow
def test_training_without_checkpoint_fails_fast_with_advice(planned, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same path as nnUNetv2_train (trainer lookup, run_training), in-process to see what was done before the error."""
    from nnunetv2_sss.sam.backend import SAM2CheckpointError

    dirs, raw = planned
    monkeypatch.delenv(ENV_CHECKPOINT, raising=False)
    t = _trainer("nnUNetTrainerSSS_smoke", fold=1)
    with pytest.raises(SAM2CheckpointError) as err:
        t.run_training()
    msg = str(err.value)
    assert ENV_CHECKPOINT in msg and NO_SAM_TRAINER in msg
    # nothing heavy happened first: no network, no data loaders, no SAM-2 maps for this run
    assert not t.was_initialized and t.dataloader_train is None and t.dataloader_unlabeled is None
    assert t.sam_backend is None
    # the refused run leaves no log behind (nnU-Net's __init__ opened one; a retry would add another)
    assert not list(Path(t.output_folder).glob("training_log_*.txt"))


@pytest.mark.slow
def test_written_maps_reach_train_step_as_sam_targets(planned, sam_checkpoint: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Maps written by refresh.py are what nnU-Net's unlabeled loader hands to train_step: all-ignore maps give a
    zero SAM loss, labelled maps a positive one; start-up reset the maps to all-ignore for a fresh run."""
    dirs, raw = planned
    for k, v in _env(dirs, sam_checkpoint).items():
        if k.startswith("nnUNet") or k in (ENV_CHECKPOINT, "OMP_WAIT_POLICY"):
            monkeypatch.setenv(k, v)
    t = _trainer("nnUNetTrainerSSS_smoke", fold=2)
    t.on_train_start()
    try:
        folder, maps = _unlabeled_folder(dirs, raw), t.sam_maps_folder
        assert maps == Path(t.output_folder) / "sam2_pseudolabels"  # this run's own maps, in its fold folder
        assert t.dataloader_unlabeled.data_loader._data.folder_with_segs_from_previous_stage == str(maps)
        ids = sorted(t.dataloader_unlabeled.data_loader._data.identifiers)
        assert all((read_pseudolabel(folder, i, maps) == IGNORE).all() for i in ids)
        t.on_train_epoch_start()
        assert t.sam_loss_weight() == 0.0  # no refresh yet in this run
        t.sam_last_refresh_epoch, t.current_epoch = 0, 1
        assert t.sam_loss_weight() == t.lambda_sam
        ignored = t.train_step(next(t.dataloader_train))["sss_loss_sam"]
        for i in ids:
            write_pseudolabel(folder, i, np.ones_like(read_pseudolabel(folder, i, maps)), num_classes=4,
                              maps_folder=maps)
        labelled = t.train_step(next(t.dataloader_train))["sss_loss_sam"]
        assert ignored == 0.0 and np.isfinite(labelled) and labelled > 0
    finally:
        t.on_train_end()


def _printed_refresh_epochs(fold: Path) -> list[int]:
    """The refresh epochs a run printed at start (its training log)."""
    import re

    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    found = re.findall(r"SAM-2 schedule for \d+ epochs: \d+ refresh\(es\), at the end of epoch\(s\) \[([\d, ]*)\]", log)
    assert len(found) == 1, log[-3000:]
    return [int(e) for e in found[0].split(",") if e.strip()]


def _in_process_env(dirs: dict[str, Path], checkpoint: Path | None, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env(dirs, checkpoint)
    for k in [k for k in env if k.startswith("nnUNet") or k in (ENV_CHECKPOINT, "OMP_WAIT_POLICY")]:
        monkeypatch.setenv(k, env[k])
    if checkpoint is None:
        monkeypatch.delenv(ENV_CHECKPOINT, raising=False)


@pytest.mark.slow
def test_refreshes_happen_at_the_printed_epochs(planned, sam_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    """A real (in-process) nnU-Net training run of 5 epochs with warm-up and interval of 2 epochs (fractions 0.4):
    it prints refreshes at the end of epochs [1, 3] and refreshes exactly then (not after the last epoch). The smoke
    runs below check the same for 2 epochs ([0]); tests/test_sam_schedule.py for every num_epochs up to 1000."""
    dirs, raw = planned
    _in_process_env(dirs, sam_checkpoint, monkeypatch)
    t = _trainer("nnUNetTrainerSSS_smoke", fold=3)
    t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch = 5, 1, 1
    t.sam_warmup_fraction, t.sam_refresh_every_fraction, t.sam_refresh_max_cases = 0.4, 0.4, 1
    seen: list[int] = []
    real = t.refresh_sam_pseudolabels

    def recording() -> None:
        seen.append(t.current_epoch)
        real()

    t.refresh_sam_pseudolabels = recording
    t.run_training()
    fold = Path(t.output_folder)
    assert _printed_refresh_epochs(fold) == seen == [1, 3]
    assert sorted(p.name for p in (fold / "sam2_refresh").iterdir()) == ["epoch_0001", "epoch_0003"]
    sam = torch.load(fold / "checkpoint_final.pth", weights_only=False)["sss_state"]["sam"]
    assert (sam["refresh_count"], sam["last_refresh_epoch"]) == (2, 3)


@pytest.mark.slow
def test_run_without_possible_refresh_is_refused_before_anything_heavy(planned, monkeypatch: pytest.MonkeyPatch
                                                                       ) -> None:
    """num_epochs = 1: no refresh can happen before the last epoch; the run is refused with advice, before the
    checkpoint is even looked at (none is set here) and before any network, loader or cache exists."""
    dirs, raw = planned
    _in_process_env(dirs, None, monkeypatch)
    t = _trainer("nnUNetTrainerSSS_smoke", fold=4)
    t.num_epochs = 1
    with pytest.raises(ValueError, match="no SAM-2 refresh can happen") as err:
        t.run_training()
    assert NO_SAM_TRAINER in str(err.value) and "nnUNet_sss_num_epochs" in str(err.value)
    assert not t.was_initialized and t.dataloader_unlabeled is None and t.sam_backend is None


@pytest.mark.slow
def test_resumed_run_after_its_last_refresh_loads_neither_sam2_nor_cache(planned, monkeypatch: pytest.MonkeyPatch
                                                                         ) -> None:
    """Resumed at epoch 2 of 3 with its refreshes [0, 1] done: no SAM-2 checkpoint is needed (none is set), the
    run trains on its maps (which exist), and no refresh is due."""
    dirs, raw = planned
    _in_process_env(dirs, None, monkeypatch)
    t = _trainer("nnUNetTrainerSSS_smoke", fold=4)
    t.num_epochs, t.current_epoch, t.sam_last_refresh_epoch = 3, 2, 1  # as load_checkpoint would set them
    assert list(t.sam_schedule().refresh_epochs) == [0, 1]
    t.on_train_start()
    try:
        assert t.sam_backend is None and not t.sam_active
        assert not any(t.sam_refresh_due(e) for e in range(3))
        ids = t.dataloader_unlabeled.data_loader._data.identifiers
        assert all((t.sam_maps_folder / f"{i}.b2nd").is_file() for i in ids)
        assert t.sam_loss_weight() == t.lambda_sam  # the maps of the last refresh still train
    finally:
        t.on_train_end()


@pytest.mark.slow
def test_cache_stays_valid_through_re_preprocessing(planned, backend: SAM2Backend,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """nnU-Net's preprocessing run again on the unchanged raw images (the unlabeled folder replaced wholesale, new
    files, new mtimes) gives the same arrays: the cache beside it is kept and nothing is re-encoded."""
    dirs, raw = planned
    from nnunetv2_sss.sam.cache import build_sam2_cache, read_cache_key
    from nnunetv2_sss.unlabeled.preprocess import preprocess_unlabeled

    folder = preprocess_unlabeled(DATASET_ID, "2d", num_processes=1)
    cache = build_sam2_cache(folder, backend, progress=False)
    key, files = read_cache_key(cache), {p.name: p.stat().st_mtime_ns for p in cache.glob("*.pt")}
    raw_file = next((raw / "imagesUnlabeled").iterdir())
    os.utime(raw_file)  # a touched raw file
    before = {p.name: p.stat().st_ino for p in folder.iterdir()}
    preprocess_unlabeled(DATASET_ID, "2d", num_processes=1, force=True)
    assert {p.name: p.stat().st_ino for p in folder.iterdir()} != before  # really rewritten
    encoded = []
    monkeypatch.setattr(backend, "encode", lambda image: encoded.append(1))
    assert build_sam2_cache(folder, backend, progress=False) == cache
    assert not encoded and read_cache_key(cache) == key
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.pt")} == files


def test_soft_consistency_matches_soft_targets_not_their_argmax() -> None:
    """The mean-teacher loss is zero exactly when the student's softmax equals the SOFT target (at every deep-
    supervision scale, the target area-averaged there), not when it equals the target's arg-max; weight-0 pixels
    do not count."""
    from nnunetv2_sss.training.semisam import soft_consistency_mse

    g = torch.Generator().manual_seed(0)
    teacher = torch.softmax(torch.randn(2, 4, 8, 8, generator=g), 1)
    half = torch.nn.functional.avg_pool2d(teacher, 2)
    weight, ds = torch.ones(2, 8, 8), (0.6, 0.4)
    assert soft_consistency_mse([teacher.log(), half.log()], teacher, weight, ds).item() == pytest.approx(0, abs=1e-6)
    hard = torch.nn.functional.one_hot(teacher.argmax(1), 4).movedim(-1, 1).float()
    hard_half = torch.nn.functional.avg_pool2d(hard, 2)
    assert soft_consistency_mse([20 * hard, 20 * hard_half], teacher, weight, ds).item() > 0.01
    student = torch.randn(2, 4, 8, 8, generator=g)
    only_ignored_differ = torch.where(torch.arange(8)[None, None, :, None] < 4, teacher.log(), student)
    weight[:, 4:] = 0
    assert soft_consistency_mse([only_ignored_differ], teacher, weight, (1.0,)).item() == pytest.approx(0, abs=1e-6)


@pytest.mark.slow
def test_semisam_step_is_a_mean_teacher_with_sam_term(planned, sam_checkpoint: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The real SemiSAM step: the EMA teacher sees the weak view, the student (one pass with the labeled batch) the
    perturbed view of the same patches; the mean-teacher term is logged as loss_s1 (no second strong view, no
    feature perturbation, no DFE); the SAM-2 maps add a term that is 0 on all-ignore maps and positive on labelled
    ones."""
    dirs, raw = planned
    _in_process_env(dirs, sam_checkpoint, monkeypatch)
    t = _trainer("nnUNetTrainerSemiSAM_smoke", fold=3)
    t.on_train_start()
    try:
        from nnunetv2_sss.training.warm_start import unwrap_network

        seen: dict[str, torch.Tensor] = {}
        steps = []
        real_sample = t.sample_unlabeled

        def sample():
            steps.append(real_sample())
            return steps[-1]

        t.sample_unlabeled = sample
        t.ema_teacher.model.register_forward_pre_hook(lambda m, a: seen.__setitem__("teacher", a[0].clone()))
        unwrap_network(t.network).encoder.register_forward_pre_hook(
            lambda m, a: seen.__setitem__("student", a[0].clone()))
        t.on_train_epoch_start()
        batch = next(t.dataloader_train)
        out = t.train_step(batch)
        u, n_l = steps[-1], batch["data"].shape[0]
        assert torch.equal(seen["teacher"], u.x_w)
        assert torch.equal(seen["student"][:n_l], batch["data"]) and torch.equal(seen["student"][n_l:], u.x_s1)
        assert not torch.equal(u.x_s1, u.x_w) and u.x_s1.shape == u.x_w.shape  # perturbed, same geometry
        assert np.isfinite(out["sss_loss_s1"]) and out["sss_loss_s1"] > 0
        assert all(np.isnan(out[k]) for k in ("sss_loss_s2", "sss_loss_fp", "sss_loss_dfe", "sss_loss_sam"))
        assert out["sss_confident_fraction"] == pytest.approx(1.0)  # soft targets: every valid pixel counts

        t.sam_last_refresh_epoch, t.current_epoch = 0, 1
        ignored = t.train_step(next(t.dataloader_train))["sss_loss_sam"]
        folder, maps = _unlabeled_folder(dirs, raw), t.sam_maps_folder
        for i in t.dataloader_unlabeled.data_loader._data.identifiers:
            write_pseudolabel(folder, i, np.ones_like(read_pseudolabel(folder, i, maps)), num_classes=4,
                              maps_folder=maps)
        labelled = t.train_step(next(t.dataloader_train))["sss_loss_sam"]
        assert ignored == 0.0 and np.isfinite(labelled) and labelled > 0
    finally:
        t.on_train_end()


def _check_stock_checkpoint(fold: Path) -> dict:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    pm = PlansManager(str(fold.parent / "plans.json"))
    net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("2d"), 1, 4, False)
    assert ckpt["network_weights"].keys() == net.state_dict().keys()
    net.load_state_dict(ckpt["network_weights"])  # strict: only the stock network's weights
    return ckpt


def _check_maps_and_refresh(dirs: dict[str, Path], raw: Path, fold: Path, checkpoint: Path) -> dict:
    folder = _unlabeled_folder(dirs, raw)
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    ds = nnUNetDatasetBlosc2(str(folder))
    ids = sorted(ds.identifiers)
    assert len(ids) == 4
    maps = fold / "sam2_pseudolabels"  # the run's own maps
    for i in ids:
        m = read_pseudolabel(folder, i, maps)
        assert m.dtype == np.int8 and m.shape == ds.load_case(i)[0].shape[1:]
        assert set(np.unique(m)) <= {-1, 0, 1, 2, 3}
    for i in ids[2:]:  # not refreshed (2 cases per refresh): the fresh run started them all-ignore
        assert (read_pseudolabel(folder, i, maps) == IGNORE).all()
    refresh = fold / "sam2_refresh"
    assert sorted(p.name for p in refresh.iterdir()) == ["epoch_0000"]  # none after the last epoch
    assert _printed_refresh_epochs(fold) == [0]  # what the run announced is what it did
    summary = json.loads((refresh / "epoch_0000" / SUMMARY_FILE).read_text())
    assert summary["cases"] == ids[:2] and summary["checkpoint"] == checkpoint.name
    assert summary["overlays"] and all((refresh / "epoch_0000" / f).is_file() for f in summary["overlays"])
    assert (fold / "progress.png").is_file()
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert f"SAM-2 refresh ({checkpoint.name})" in log
    return summary


@pytest.mark.slow
def test_sss_smoke_train_then_stock_predict_without_sam2(planned, sam_checkpoint: Path, tmp_path: Path) -> None:
    dirs, raw = planned
    trainer = "nnUNetTrainerSSS_smoke"
    env = _env(dirs, sam_checkpoint)
    run_cli(env, "nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", trainer, "-device", "cpu")
    fold = dirs["nnUNet_results"] / raw.name / f"{trainer}__nnUNetPlans__2d" / "fold_0"
    summary = _check_maps_and_refresh(dirs, raw, fold, sam_checkpoint)
    ckpt = _check_stock_checkpoint(fold)
    sam = ckpt["sss_state"]["sam"]
    assert {"dfe", "sss_step"} <= set(ckpt["sss_state"])
    assert sam["last_refresh_epoch"] == 0 and sam["refresh_count"] == 1 and sam["image_size"] == S
    assert sam["checkpoint_file"] == sam_checkpoint.name
    assert set(sam["pcsw_limits"]["per_class"]) == {"1", "2", "3"}
    logged = ckpt["logging"]
    assert math.isnan(logged["sss_loss_sam"][0]) and math.isfinite(logged["sss_loss_sam"][1])
    agreement = logged["sss_sam_agreement"]
    assert len(agreement) == 2 and math.isnan(agreement[0])
    expected = summary["agreement"]
    assert (math.isnan(agreement[1]) and expected is None) or agreement[1] == pytest.approx(expected)

    # stock prediction must not need sam2: make it unimportable
    blocker = tmp_path / "no_sam2" / "sam2"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('sam2 must not be imported by nnUNetv2_predict')\n")
    env_pred = dict(env, PYTHONPATH=os.pathsep.join([str(blocker.parent), env.get("PYTHONPATH", "")]))
    env_pred.pop(ENV_CHECKPOINT)
    pred = tmp_path / "pred"
    run_cli(env_pred, "nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", str(DATASET_ID),
            "-c", "2d", "-f", "0", "-tr", trainer, "-chk", "checkpoint_final.pth", "-npp", "1", "-nps", "1",
            "-device", "cpu", "--disable_tta")
    import SimpleITK as sitk

    outs = sorted(pred.glob("*.nii.gz"))
    assert len(outs) == 1
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(outs[0]))))) <= {0, 1, 2, 3}


@pytest.mark.slow
def test_semisam_smoke_train(planned, sam_checkpoint: Path) -> None:
    dirs, raw = planned
    trainer = "nnUNetTrainerSemiSAM_smoke"
    run_cli(_env(dirs, sam_checkpoint), "nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", trainer, "-device", "cpu")
    fold = dirs["nnUNet_results"] / raw.name / f"{trainer}__nnUNetPlans__2d" / "fold_0"
    _check_maps_and_refresh(dirs, raw, fold, sam_checkpoint)
    ckpt = _check_stock_checkpoint(fold)
    state = ckpt["sss_state"]
    assert {"ema_teacher", "sam", "sss_step"} <= set(state) and "dfe" not in state
    assert state["sam"]["last_refresh_epoch"] == 0
    assert math.isfinite(ckpt["logging"]["sss_loss_sam"][1])
    assert all(v == pytest.approx(1.0) for v in ckpt["logging"]["sss_confident_fraction"])  # all pixels count


@pytest.mark.slow
def test_two_concurrent_folds_on_a_fresh_dataset_both_finish(sam_checkpoint: Path, tmp_path: Path) -> None:
    """Two folds of nnUNetTrainerSSS started together on a dataset whose unlabeled images were never preprocessed:
    they meet at the unlabeled preprocessing and the SAM-2 cache build (shared, locked: one builds, the other
    waits) and must both finish, each with its own SAM-2 maps, over one cache."""
    import subprocess

    dirs = {k: tmp_path / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for v in dirs.values():
        v.mkdir()
    dataset_id = 982
    with pytest.MonkeyPatch.context() as mp:
        for k, v in dirs.items():
            mp.setenv(k, str(v))
        from nnunetv2_sss.datasets.synthetic import make_synthetic_dataset

        raw = make_synthetic_dataset(dataset_id=dataset_id, n_labeled=5, n_unlabeled=3, n_test=0,
                                     shape=(4, 48, 48), overwrite=True)
    env = _env(dirs, sam_checkpoint)
    plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
    run_cli(plan_env, "nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "2d", "-np", "1", "-npfp", "1")
    trainer = "nnUNetTrainerSSS_smoke"
    procs = [subprocess.Popen(["nnUNetv2_train", str(dataset_id), "2d", str(f), "-tr", trainer, "-device", "cpu"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for f in (0, 1)]
    outputs = [p.communicate(timeout=1500)[0] for p in procs]
    for f, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"fold {f} failed:\n{out[-3000:]}"
    results = dirs["nnUNet_results"] / raw.name / f"{trainer}__nnUNetPlans__2d"
    folder = dirs["nnUNet_preprocessed"] / raw.name / "nnUNetPlans_2d_unlabeled"
    cases = sorted(p.name.removesuffix(".b2nd") for p in folder.glob("*.b2nd") if not p.name.endswith("_seg.b2nd"))
    assert len(cases) == 3
    for f in (0, 1):
        fold = results / f"fold_{f}"
        assert (fold / "checkpoint_final.pth").is_file()
        maps = sorted(p.name for p in (fold / "sam2_pseudolabels").glob("*.b2nd"))
        assert len(maps) == len(cases), f"fold {f}: {maps}"
    assert sam2_cache_folder(folder).is_dir()
