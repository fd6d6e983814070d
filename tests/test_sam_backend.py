"""SAM-2 backend and embedding cache, on the CPU with the real sam2 model and RANDOM weights.

Random weights say nothing about segmentation quality: these tests check loading, error messages, geometry and
plumbing (features, prompts, cache files), never mask quality. The checkpoint is written to a temporary folder
(149 MiB) and loaded through the same code path as a real one.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAM2_TINY, save_random_sam2_checkpoint

from nnunetv2_sss.sam.backend import (
    ENV_CHECKPOINT,
    ENV_CONFIG,
    NO_SAM_TRAINER,
    SAM2Backend,
    SAM2CheckpointError,
    config_from_checkpoint_name,
    config_from_state_dict,
    normalize_config_name,
    to_sam_image,
    window_bounds,
)
from nnunetv2_sss.sam.cache import (
    BUILDING_SUFFIX,
    CACHE_KEY_FILE,
    build_sam2_cache,
    build_sam2_cache_for_dataset,
    cache_is_valid,
    cached_case_info,
    case_cache_file,
    checkpoint_sha256,
    load_case_features,
    make_cache_key,
    read_cache_key,
)
from nnunetv2_sss.unlabeled.layout import sam2_cache_folder

S = 128  # SAM image size in these tests: tiny keeps the encoder at ~0.1 s per slice on this CPU
TINY = SAM2_TINY


@pytest.fixture(scope="session")
def sam_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight SAM-2.1 tiny saved like the official file: {"model": state_dict}, official file name."""
    return save_random_sam2_checkpoint(tmp_path_factory.mktemp("sam_ckpt"), S)


@pytest.fixture(scope="session")
def backend(sam_checkpoint: Path) -> SAM2Backend:
    """Built through the environment variable, as a trainer would."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_CHECKPOINT, str(sam_checkpoint))
        mp.delenv(ENV_CONFIG, raising=False)
        return SAM2Backend(image_size=S)


def _blob_image(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth synthetic (H, W) slice: a few Gaussian blobs plus noise, nnU-Net-like zero-mean intensities."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = np.zeros((h, w), np.float32)
    for _ in range(3):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, 12)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    img += 0.05 * rng.standard_normal((h, w)).astype(np.float32)
    return (img - img.mean()) / img.std()


def _write_case(folder: Path, identifier: str, data: np.ndarray) -> None:
    """Save a preprocessed unlabeled case the way nnU-Net does (blosc2), with the class_locations nnU-Net needs."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    folder.mkdir(parents=True, exist_ok=True)
    seg = np.zeros((1, *data.shape[1:]), dtype=np.int8)
    props = {"class_locations": {1: np.zeros((0, 4), dtype=np.int64)}, "spacing": [1.0] * (data.ndim - 1)}
    chunks = (1, 1, *data.shape[2:])
    for ending in (".b2nd", "_seg.b2nd", ".pkl"):  # blosc2 does not overwrite: a re-preprocessed case
        (folder / f"{identifier}{ending}").unlink(missing_ok=True)
    nnUNetDatasetBlosc2.save_case(data.astype(np.float32), seg, props, str(folder / identifier),
                                  chunks=chunks, blocks=chunks)


def _make_unlabeled_folder(root: Path, cases: dict[str, tuple[int, int, int]]) -> Path:
    folder = root / "nnUNetPlans_2d_unlabeled"
    for i, (identifier, (z, h, w)) in enumerate(cases.items()):
        data = np.stack([_blob_image(h, w, seed=100 * i + k) for k in range(z)])[None]
        _write_case(folder, identifier, data)
    return folder


class _EncodeCounter:
    """Counts slices going through ``backend.encode`` while calling the real encoder."""

    def __init__(self, backend: SAM2Backend, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = backend.encode

        def counting(image: np.ndarray) -> dict:
            self.calls += 1
            return real(image)

        monkeypatch.setattr(backend, "encode", counting)


# --- loading and errors ----------------------------------------------------------------------------------------------
def test_backend_loads_checkpoint_from_env_var(backend: SAM2Backend, sam_checkpoint: Path) -> None:
    assert backend.config_name == TINY
    assert backend.image_size == S
    assert backend.checkpoint_path == sam_checkpoint.resolve()
    saved = torch.load(sam_checkpoint, map_location="cpu", weights_only=True)["model"]
    for name in ("image_encoder.trunk.patch_embed.proj.weight", "sam_mask_decoder.iou_prediction_head.layers.0.weight"):
        assert torch.equal(backend.model.state_dict()[name].cpu(), saved[name])
    assert backend.predictor._bb_feat_sizes == [(S // 4, S // 4), (S // 8, S // 8), (S // 16, S // 16)]


def test_config_names_and_inference(sam_checkpoint: Path) -> None:
    assert config_from_checkpoint_name("/x/sam2.1_hiera_tiny.pt") == "configs/sam2.1/sam2.1_hiera_t.yaml"
    assert config_from_checkpoint_name("sam2.1_hiera_base_plus.pt") == "configs/sam2.1/sam2.1_hiera_b+.yaml"
    assert config_from_checkpoint_name("sam2_hiera_large.pt") == "configs/sam2/sam2_hiera_l.yaml"
    assert config_from_checkpoint_name("sam2_hiera_small.pt") == "configs/sam2/sam2_hiera_s.yaml"
    assert config_from_checkpoint_name("model_final.pt") is None
    assert normalize_config_name("sam2.1_hiera_l.yaml") == "configs/sam2.1/sam2.1_hiera_l.yaml"
    assert normalize_config_name("sam2_hiera_tiny") == "configs/sam2/sam2_hiera_t.yaml"
    assert normalize_config_name("configs/sam2/sam2_hiera_b+.yaml") == "configs/sam2/sam2_hiera_b+.yaml"
    sd = torch.load(sam_checkpoint, map_location="cpu", weights_only=True, mmap=True)["model"]
    assert config_from_state_dict(sd) == TINY
    sam2_v1 = {k: v for k, v in sd.items() if k not in ("no_obj_embed_spatial",)}
    assert config_from_state_dict(sam2_v1) == "configs/sam2/sam2_hiera_t.yaml"
    assert config_from_state_dict({"foo": torch.zeros(1)}) is None


def test_unnamed_checkpoint_uses_config_from_weights(sam_checkpoint: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    renamed = tmp_path / "finetuned_weights.pt"
    renamed.symlink_to(sam_checkpoint)
    assert SAM2Backend(renamed, image_size=64).config_name == TINY


def _assert_actionable(err: pytest.ExceptionInfo, *extra: str) -> None:
    msg = str(err.value)
    for needle in (ENV_CHECKPOINT, NO_SAM_TRAINER, *extra):
        assert needle in msg, f"{needle!r} missing from: {msg}"


def test_error_no_checkpoint_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_CHECKPOINT, raising=False)
    with pytest.raises(SAM2CheckpointError, match="not set") as err:
        SAM2Backend(image_size=S)
    _assert_actionable(err)


def test_error_checkpoint_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "sam2.1_hiera_tiny.pt"
    monkeypatch.setenv(ENV_CHECKPOINT, str(missing))
    with pytest.raises(SAM2CheckpointError, match="does not exist") as err:
        SAM2Backend(image_size=S)
    _assert_actionable(err, str(missing))


@pytest.mark.parametrize("content", ["garbage", "truncated", "pickled_object", "no_weights"])
def test_error_checkpoint_corrupt(content: str, sam_checkpoint: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "sam2.1_hiera_tiny.pt"
    if content == "garbage":
        bad.write_bytes(b"this is not a checkpoint" * 100)
    elif content == "truncated":
        with open(sam_checkpoint, "rb") as f:
            bad.write_bytes(f.read(1 << 20))
    elif content == "pickled_object":  # weights_only refuses arbitrary objects: no code runs from the file
        bad.write_bytes(pickle.dumps({"model": _EncodeCounter}))
    else:
        torch.save({"epoch": 3}, bad)
    monkeypatch.setenv(ENV_CHECKPOINT, str(bad))
    with pytest.raises(SAM2CheckpointError, match="cannot be read|holds no SAM-2 weights") as err:
        SAM2Backend(image_size=S)
    _assert_actionable(err, str(bad))


def test_error_config_does_not_match_checkpoint(sam_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_CHECKPOINT, str(sam_checkpoint))
    monkeypatch.setenv(ENV_CONFIG, "sam2.1_hiera_l.yaml")
    with pytest.raises(SAM2CheckpointError, match="does not match") as err:
        SAM2Backend(image_size=64)
    # names the config, the file and the config the weights look like
    _assert_actionable(err, "configs/sam2.1/sam2.1_hiera_l.yaml", str(sam_checkpoint.resolve()), TINY, ENV_CONFIG)


def test_error_unknown_config_and_undeterminable_config(tmp_path: Path, sam_checkpoint: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_CHECKPOINT, str(sam_checkpoint))
    with pytest.raises(SAM2CheckpointError, match="unknown to sam2") as err:
        SAM2Backend(config="configs/sam2.1/no_such_model.yaml", image_size=64)
    _assert_actionable(err, ENV_CONFIG)
    odd = tmp_path / "weights.pt"
    torch.save({"model": {"image_encoder.something": torch.zeros(2)}}, odd)
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    with pytest.raises(SAM2CheckpointError, match="Cannot tell the SAM-2 config") as err:
        SAM2Backend(odd, image_size=64)
    _assert_actionable(err, ENV_CONFIG)


# --- image conversion ------------------------------------------------------------------------------------------------
def test_to_sam_image_windowing_and_channels() -> None:
    ramp = np.arange(1000, dtype=np.float32).reshape(20, 50)
    lo, hi = np.percentile(ramp, [0.5, 99.5])
    out = to_sam_image(ramp)
    assert out.shape == (20, 50, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    assert out.min() == 0 and out.max() == 255
    # the 0.5 % tails are clipped: values below lo are 0, above hi 255, the middle maps linearly
    assert (out[..., 0][ramp <= lo] == 0).all() and (out[..., 0][ramp >= hi] == 255).all()
    mid = ramp.ravel()[500]
    assert abs(int(out[..., 0].ravel()[500]) - round((mid - lo) / (hi - lo) * 255)) <= 1

    two = np.stack([ramp, ramp[::-1, ::-1]])
    out2 = to_sam_image(two)
    assert np.abs(out2[..., 2].astype(int) - (out2[..., 0].astype(int) + out2[..., 1].astype(int)) / 2).max() <= 1
    four = np.stack([ramp, 2 * ramp, -ramp, np.zeros_like(ramp)])
    out4 = to_sam_image(four)
    assert np.array_equal(out4[..., 0], out[..., 0]) and np.array_equal(out4[..., 1], out[..., 0])
    assert np.abs(out4[..., 2].astype(int) - (255 - out[..., 0].astype(int))).max() <= 1  # 4th channel dropped
    assert not to_sam_image(np.full((8, 8), 3.0)).any()  # constant slice: no division by zero, all 0

    # given bounds (the cache's per-case window) take precedence over the slice's own percentiles
    fixed = to_sam_image(ramp[None], bounds=np.array([[0.0, 1998.0]]))
    assert fixed[0, 0, 0] == 0 and fixed[-1, -1, 0] == round(999 / 1998 * 255)
    with pytest.raises(ValueError):
        to_sam_image(np.zeros((2, 3, 4, 5)))


def test_encode_rejects_float_images_in_0_255(backend: SAM2Backend) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        backend.encode(np.full((32, 32, 3), 200.0, dtype=np.float32))


# --- decoding from features ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slice_and_features(backend: SAM2Backend) -> tuple[np.ndarray, dict]:
    img = to_sam_image(_blob_image(72, 120, seed=1))  # non-square on purpose
    return img, backend.encode(img)


def test_predict_from_features_equals_set_image_predict(backend: SAM2Backend, slice_and_features) -> None:
    img, feats = slice_and_features
    boxes = np.array([[10, 5, 60, 40], [30, 20, 110, 70], [0, 0, 119, 71]], dtype=np.float32)
    points = np.array([[[20, 10], [50, 30]], [[80, 40], [90, 60]], [[5, 5], [100, 65]]], dtype=np.float32)
    labels = np.array([[1, 0], [1, 1], [1, 0]])
    p = backend.predictor
    for kwargs in ({"boxes": boxes}, {"point_coords": points, "point_labels": labels},
                   {"boxes": boxes, "point_coords": points, "point_labels": labels}):
        for multimask in (False, True):
            masks, scores = backend.predict_from_features(feats, img.shape[:2], multimask_output=multimask, **kwargs)
            p.set_image(img)
            ref_m, ref_s, _ = p.predict(point_coords=kwargs.get("point_coords"),
                                        point_labels=kwargs.get("point_labels"), box=kwargs.get("boxes"),
                                        multimask_output=multimask)
            p.reset_predictor()
            ref_m, ref_s = ref_m.reshape(3, -1, 72, 120), ref_s.reshape(3, -1)
            best = ref_s.argmax(1)
            assert masks.dtype == bool and masks.shape == (3, 72, 120) and scores.shape == (3,)
            assert np.array_equal(masks, ref_m[np.arange(3), best] > 0)
            np.testing.assert_allclose(scores, ref_s[np.arange(3), best], rtol=1e-5, atol=1e-6)
    assert not p._is_image_set and p._features is None  # the predictor is left clean


def test_batched_prompts_give_one_mask_each(backend: SAM2Backend, slice_and_features) -> None:
    img, feats = slice_and_features
    hw = img.shape[:2]
    for n in (1, 2, 5):
        boxes = np.array([[i, i, 40 + 10 * i, 30 + 5 * i] for i in range(n)], dtype=np.float32)
        masks, scores = backend.predict_from_features(feats, hw, boxes=boxes)
        assert masks.shape == (n, *hw) and scores.shape == (n,)
        # each mask is the one its own prompt gives alone
        for i in range(n):
            single, _ = backend.predict_from_features(feats, hw, boxes=boxes[i])
            assert single.shape == (1, *hw)
            assert (single[0] == masks[i]).mean() > 0.999
    m, s = backend.predict_from_features(feats, hw, point_coords=np.array([[10, 10], [30, 40]]), point_labels=[1, 1])
    assert m.shape == (1, *hw) and s.shape == (1,)
    m, s = backend.predict_from_features(feats, hw, boxes=np.zeros((0, 4)))
    assert m.shape == (0, *hw) and s.shape == (0,)
    with pytest.raises(ValueError, match="2 boxes but 3"):
        backend.predict_from_features(feats, hw, boxes=np.zeros((2, 4)), point_coords=np.zeros((3, 1, 2)),
                                      point_labels=np.ones((3, 1)))
    with pytest.raises(ValueError, match="does not fit SAM image size"):
        backend.predict_from_features({"image_embed": torch.zeros(1, 256, 4, 4), "high_res_feats": []}, hw,
                                      boxes=np.zeros(4))


def test_prompts_reach_the_prompt_encoder_scaled_from_original_coordinates(backend: SAM2Backend,
                                                                           slice_and_features) -> None:
    """sam2 normalises prompts itself (normalize_coords=True): x * S / W, y * S / H for a non-square H x W slice."""
    img, feats = slice_and_features
    h, w = img.shape[:2]
    captured = []
    handle = backend.model.sam_prompt_encoder.register_forward_pre_hook(
        lambda mod, args, kwargs: captured.append(kwargs["points"]), with_kwargs=True)
    try:
        boxes = np.array([[10, 5, 60, 40], [30, 20, 110, 70]], dtype=np.float32)
        backend.predict_from_features(feats, (h, w), boxes=boxes)
        pts = np.array([[[20, 10]], [[100, 60]]], dtype=np.float32)
        backend.predict_from_features(feats, (h, w), point_coords=pts, point_labels=np.ones((2, 1)))
    finally:
        handle.remove()
    scale = np.array([S / w, S / h], dtype=np.float32)
    coords, labels = captured[0]
    np.testing.assert_allclose(coords.cpu().numpy(), boxes.reshape(2, 2, 2) * scale, rtol=1e-6)
    assert labels.tolist() == [[2, 3], [2, 3]]  # SAM's box-corner labels
    coords, labels = captured[1]
    np.testing.assert_allclose(coords.cpu().numpy(), pts * scale, rtol=1e-6)
    assert labels.tolist() == [[1], [1]]


class BoxPainterTestDouble(torch.nn.Module):
    """Stands in for SAM's mask decoder only: paints each box prompt into the low-res logits.

    A random-weight decoder cannot show where a box lands; this double can. It reads the box corners the prompt
    encoder received (SAM input frame, S x S), paints +10 inside / -10 outside on the decoder's (S/4)^2 grid and
    returns that, so the real predictor code resizes it back to the original slice. The round trip must put the
    mask where the box was drawn in the original coordinates.
    """

    def __init__(self, prompt_encoder: torch.nn.Module, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.last_points: torch.Tensor | None = None
        self._hook = prompt_encoder.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs) -> None:
        self.last_points = kwargs["points"][0]

    def remove(self) -> None:
        self._hook.remove()

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output, repeat_image, high_res_features=None):
        low = self.image_size // 4
        centres = (torch.arange(low, dtype=torch.float32) + 0.5) * 4  # low-res pixel centres in the S frame
        out = []
        for corners in self.last_points:  # (2, 2): (x0, y0), (x1, y1)
            (x0, y0), (x1, y1) = corners.tolist()
            inside_y = (centres >= y0) & (centres <= y1)
            inside_x = (centres >= x0) & (centres <= x1)
            out.append(torch.where(inside_y[:, None] & inside_x[None, :], 10.0, -10.0))
        logits = torch.stack(out)[:, None]
        return logits, torch.ones(len(out), 1), None, None


def test_box_geometry_round_trip_with_box_painter(backend: SAM2Backend, slice_and_features) -> None:
    img, feats = slice_and_features
    h, w = img.shape[:2]  # 72 x 120
    painter = BoxPainterTestDouble(backend.model.sam_prompt_encoder, S)
    real_decoder = backend.model.sam_mask_decoder  # restored by hand: monkeypatch cannot undo nn.Module children
    backend.model.sam_mask_decoder = painter
    try:
        boxes = np.array([[8, 40, 100, 66], [70, 4, 110, 30]], dtype=np.float32)  # x0, y0, x1, y1
        masks, _ = backend.predict_from_features(feats, (h, w), boxes=boxes)
    finally:
        backend.model.sam_mask_decoder = real_decoder
        painter.remove()
    yy, xx = np.mgrid[:h, :w]
    cx, cy = 4 * w / S, 4 * h / S  # one low-res decoder pixel in original pixels: the painting's resolution

    def rect(x0: float, y0: float, x1: float, y1: float, margin_x: float, margin_y: float) -> np.ndarray:
        return (xx >= x0 - margin_x) & (xx <= x1 + margin_x) & (yy >= y0 - margin_y) & (yy <= y1 + margin_y)

    for m, (x0, y0, x1, y1) in zip(masks, boxes, strict=True):
        assert m[rect(x0, y0, x1, y1, -cx, -cy)].all()  # the box's inside, one decoder pixel in, is covered
        assert not m[~rect(x0, y0, x1, y1, cx, cy)].any()  # nothing beyond one decoder pixel out
        swapped = rect(y0, x0, y1, x1, 0, 0)  # what an x/y mix-up would give
        assert (m & swapped).sum() / (m | swapped).sum() < 0.5


def test_encode_batch_matches_encode(backend: SAM2Backend) -> None:
    imgs = [to_sam_image(_blob_image(64, 80, seed=s)) for s in (3, 4)]
    batch = backend.encode_batch(imgs)
    assert batch["image_embed"].shape == (2, 256, S // 16, S // 16)
    for i, im in enumerate(imgs):
        single = backend.encode(im)
        torch.testing.assert_close(batch["image_embed"][i:i + 1], single["image_embed"], rtol=1e-4, atol=1e-4)
        for b, s in zip(batch["high_res_feats"], single["high_res_feats"], strict=True):
            torch.testing.assert_close(b[i:i + 1], s, rtol=1e-4, atol=1e-4)


# --- checkpoint hash ---------------------------------------------------------------------------------------------
def test_checkpoint_hash_is_memoised_by_path_size_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr("nnunetv2_sss.sam.cache._HASH_MEMO", {})
    f = tmp_path / "ck.pt"
    f.write_bytes(b"abc" * 1000)
    assert checkpoint_sha256(f) == hashlib.sha256(b"abc" * 1000).hexdigest()
    memo_file = tmp_path / "xdg" / "nnunetv2_sss" / "checkpoint_sha256.json"
    memo = json.loads(memo_file.read_text())
    memo[str(f.resolve())]["sha256"] = "from-memo"
    memo[str(tmp_path / "deleted.pt")] = {"size": 1, "mtime_ns": 1, "sha256": "x"}
    memo_file.write_text(json.dumps(memo))
    monkeypatch.setattr("nnunetv2_sss.sam.cache._HASH_MEMO", {})  # a fresh process: only the file memo is left
    assert checkpoint_sha256(f) == "from-memo"  # same path/size/mtime: not re-hashed
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert checkpoint_sha256(f) == hashlib.sha256(b"abc" * 1000).hexdigest()  # touched: re-hashed
    assert set(json.loads(memo_file.read_text())) == {str(f.resolve())}  # entries of deleted files are dropped


# --- cache -----------------------------------------------------------------------------------------------------------
CASES = {"case_a": (2, 40, 56), "case_b": (3, 48, 40), "case_c": (1, 32, 32)}


def test_cache_build_and_load_equal_direct_encoding(backend: SAM2Backend, tmp_path: Path) -> None:
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    folder = _make_unlabeled_folder(tmp_path, CASES)
    cache = build_sam2_cache(folder, backend, "nnUNetPlans", "2d", progress=False)
    # beside the unlabeled folder, which re-preprocessing replaces wholesale, named after its data identifier
    assert cache == sam2_cache_folder(folder) == folder.parent / "nnUNetPlans_2d_sam2_cache"
    key = read_cache_key(cache)
    assert key == make_cache_key(backend)
    assert key["image_size"] == S and key["config"] == TINY and key["sam2_version"].count(".") == 1
    assert key["checkpoint_sha256"] == checkpoint_sha256(backend.checkpoint_path)
    assert len(key["checkpoint_sha256"]) == 64
    assert cache_is_valid(cache, key, list(CASES)) and not cache_is_valid(cache, {**key, "image_size": 1024})
    assert not cache_is_valid(cache, key, [*CASES, "case_z"])
    assert sorted(p.name for p in cache.iterdir()) == sorted([CACHE_KEY_FILE, *(f"{c}.pt" for c in CASES)])
    assert not cache.with_name(cache.name + BUILDING_SUFFIX).exists()
    assert not any(p.name.startswith("sam2") for p in folder.iterdir())  # nothing of the cache inside

    ds = nnUNetDatasetBlosc2(str(folder))
    for identifier, (z_count, h, w) in CASES.items():
        data = np.asarray(ds.load_case(identifier)[0][:])
        assert cached_case_info(cache, identifier) == {"num_slices": z_count, "orig_hw": (h, w)}
        stored = torch.load(case_cache_file(cache, identifier), weights_only=True)
        assert stored["image_embed"].dtype == torch.float16
        bounds = window_bounds(data)  # one window for the whole case
        for z in range(z_count):
            direct = backend.encode(to_sam_image(data[:, z], bounds))
            cached = load_case_features(cache, identifier, z, device="cpu")
            assert cached["image_embed"].dtype == torch.float32
            for a, b in zip([cached["image_embed"], *cached["high_res_feats"]],
                            [direct["image_embed"], *direct["high_res_feats"]], strict=True):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)  # fp16 storage
            box = np.array([[2, 3, w - 5, h - 4]], dtype=np.float32)
            m_cache, _ = backend.predict_from_features(cached, (h, w), boxes=box)
            m_direct, _ = backend.predict_from_features(direct, (h, w), boxes=box)
            assert (m_cache == m_direct).mean() > 0.99
    with pytest.raises(IndexError):
        load_case_features(cache, "case_c", 1)
    with pytest.raises(FileNotFoundError, match="nnUNetv2_sss_cache_sam2"):
        load_case_features(cache, "case_missing", 0)


def test_cache_up_to_date_is_left_alone_and_changed_cases_are_redone(backend: SAM2Backend, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _make_unlabeled_folder(tmp_path, {"case_a": (2, 40, 56), "case_b": (1, 32, 48)})
    cache = build_sam2_cache(folder, backend, "nnUNetPlans", "2d", progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.pt")}
    counter = _EncodeCounter(backend, monkeypatch)
    build_sam2_cache(folder, backend, "nnUNetPlans", "2d", progress=False)
    assert counter.calls == 0
    # a re-preprocessed case with new content, a new case and a removed case
    _write_case(folder, "case_b", np.stack([_blob_image(32, 48, seed=9)])[None])
    _write_case(folder, "case_new", np.stack([_blob_image(24, 24, seed=7)] * 2)[None])
    for f in folder.glob("case_a*"):
        f.unlink()
    build_sam2_cache(folder, backend, "nnUNetPlans", "2d", progress=False)
    assert counter.calls == 1 + 2
    assert sorted(p.stem for p in cache.glob("*.pt")) == ["case_b", "case_new"]
    assert case_cache_file(cache, "case_b").stat().st_mtime_ns != mtimes["case_b.pt"]


def test_cache_survives_replaced_unlabeled_folder_and_touched_files(backend: SAM2Backend, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-preprocessing replaces <id>_unlabeled wholesale with new files (new mtimes) holding the same arrays: the
    cache outside it stays valid and nothing is re-encoded; only a case whose array changed is."""
    import shutil

    cases = {"case_a": (2, 40, 56), "case_b": (1, 32, 48)}
    folder = _make_unlabeled_folder(tmp_path, cases)
    cache = build_sam2_cache(folder, backend, progress=False)
    shutil.rmtree(folder)  # what preprocess_unlabeled's final rename does to the old folder
    _make_unlabeled_folder(tmp_path, cases)
    for f in folder.iterdir():
        if f.is_file():
            os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**10))
    counter = _EncodeCounter(backend, monkeypatch)
    assert build_sam2_cache(folder, backend, progress=False) == cache
    assert counter.calls == 0
    data_b = np.stack([_blob_image(32, 48, seed=0)])[None]
    data_b[0, 0, 5, 5] += 1.0  # one voxel differs: the content hash sees it
    _write_case(folder, "case_b", data_b)
    build_sam2_cache(folder, backend, progress=False)
    assert counter.calls == 1


_LOCK_WORKER = """
import os, sys, time
from pathlib import Path
from nnunetv2_sss.sam.backend import SAM2Backend
from nnunetv2_sss.sam.cache import build_sam2_cache
ckpt, folder, log, size, barrier = sys.argv[1:6]
backend = SAM2Backend(ckpt, image_size=int(size))
Path(barrier, str(os.getpid())).touch()
while len(list(Path(barrier).iterdir())) < 2:  # both processes enter the build at the same moment
    time.sleep(0.01)

def done(identifier):
    with open(log, "a") as f:
        f.write(identifier + "\\n")
    time.sleep(1.0)  # a slow build: the other process must arrive while it runs

print(build_sam2_cache(Path(folder), backend, on_case_done=done, progress=True))
"""


@pytest.mark.slow
def test_two_processes_build_the_cache_once(sam_checkpoint: Path, tmp_path: Path) -> None:
    """Two processes (as two folds starting together) build the same cache: one encodes every case exactly once,
    the other waits on the lock and then finds it complete; no process fails, nothing half-written is left."""
    import subprocess

    folder = _make_unlabeled_folder(tmp_path, CASES)
    log, barrier = tmp_path / "encoded.txt", tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _LOCK_WORKER, str(sam_checkpoint), str(folder), str(log),
                               str(S), str(barrier)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    cache = sam2_cache_folder(folder)
    assert all(out.strip().splitlines()[-1] == str(cache) for out, _ in outs)
    assert sorted(log.read_text().split()) == sorted(CASES)  # each case encoded once, by one of the two
    assert sum("being built by another process" in err for _, err in outs) == 1  # the other one really waited
    assert not any(p.name.endswith((BUILDING_SUFFIX, ".old")) for p in cache.parent.iterdir())
    assert not list(cache.glob("*.tmp")) and cache_is_valid(cache, read_cache_key(cache), list(CASES))


def test_stale_key_rebuilds_whole_cache(backend: SAM2Backend, sam_checkpoint: Path, tmp_path: Path) -> None:
    folder = _make_unlabeled_folder(tmp_path, {"case_a": (2, 40, 56), "case_b": (1, 32, 48)})
    cache = build_sam2_cache(folder, backend, "nnUNetPlans", "2d", progress=False)
    (cache / "stray_file_from_old_cache.txt").write_text("old")
    other = SAM2Backend(sam_checkpoint, image_size=64)  # different SAM image size -> different key
    cache2 = build_sam2_cache(folder, other, progress=False)
    assert cache2 == cache
    assert read_cache_key(cache)["image_size"] == 64
    assert not (cache / "stray_file_from_old_cache.txt").exists()  # the old folder is gone, not patched
    assert not any(p.name.endswith((BUILDING_SUFFIX, ".old")) for p in cache.parent.iterdir())
    assert load_case_features(cache, "case_a", 1)["image_embed"].shape == (1, 256, 4, 4)
    assert cache_is_valid(cache, make_cache_key(other)) and not cache_is_valid(cache, make_cache_key(backend))


def test_interrupted_build_resumes(backend: SAM2Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _make_unlabeled_folder(tmp_path, CASES)

    class Interrupt(Exception):
        pass

    def stop_after_first(identifier: str) -> None:
        raise Interrupt(identifier)

    with pytest.raises(Interrupt) as first:
        build_sam2_cache(folder, backend, "nnUNetPlans", "2d", on_case_done=stop_after_first, progress=False)
    done = first.value.args[0]
    building = sam2_cache_folder(folder).with_name(sam2_cache_folder(folder).name + BUILDING_SUFFIX)
    assert not sam2_cache_folder(folder).exists()  # nothing half-built is visible under the real name
    assert sorted(p.stem for p in building.glob("*.pt")) == [done]
    done_mtime = case_cache_file(building, done).stat().st_mtime_ns
    (building / "case_b.pt.12345.tmp").write_bytes(b"partial")  # a write cut short

    counter = _EncodeCounter(backend, monkeypatch)
    seen = []
    cache = build_sam2_cache(folder, backend, "nnUNetPlans", "2d", on_case_done=seen.append, progress=False)
    assert sorted(seen) == sorted(set(CASES) - {done})
    assert counter.calls == sum(CASES[c][0] for c in CASES if c != done)
    assert case_cache_file(cache, done).stat().st_mtime_ns == done_mtime
    assert not list(cache.glob("*.tmp")) and not building.exists()
    assert cache_is_valid(cache, make_cache_key(backend), list(CASES))


def test_build_cache_for_dataset_finds_the_unlabeled_folder(backend: SAM2Backend, nnunet_dirs: dict[str, Path]) -> None:
    dataset = nnunet_dirs["nnUNet_preprocessed"] / "Dataset901_SamCache"
    dataset.mkdir()
    plans = {"plans_name": "nnUNetPlans",
             "configurations": {"2d": {"data_identifier": "nnUNetPlans_2d", "architecture": {}}}}
    (dataset / "nnUNetPlans.json").write_text(json.dumps(plans))
    with pytest.raises(FileNotFoundError, match="nnUNetv2_sss_preprocess_unlabeled"):
        build_sam2_cache_for_dataset("Dataset901_SamCache", "2d", backend, progress=False)
    _make_unlabeled_folder(dataset, {"case_a": (1, 24, 32)})
    cache = build_sam2_cache_for_dataset("Dataset901_SamCache", "2d", backend, progress=False)
    assert cache == dataset / "nnUNetPlans_2d_sam2_cache"
    assert read_cache_key(cache) == make_cache_key(backend)
    assert case_cache_file(cache, "case_a").is_file()


def test_cache_cli(sam_checkpoint: Path, nnunet_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture) -> None:
    from nnunetv2_sss.cli import cache_sam2_entry

    dataset = nnunet_dirs["nnUNet_preprocessed"] / "Dataset902_SamCli"
    dataset.mkdir()
    plans = {"configurations": {"2d": {"data_identifier": "nnUNetPlans_2d", "architecture": {}}}}
    (dataset / "nnUNetPlans.json").write_text(json.dumps(plans))
    _make_unlabeled_folder(dataset, {"case_a": (1, 24, 32)})
    monkeypatch.delenv(ENV_CHECKPOINT, raising=False)
    monkeypatch.setattr("sys.argv", ["nnUNetv2_sss_cache_sam2", "-d", "Dataset902_SamCli", "-c", "2d",
                                     "--image-size", "64", "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_info:
        cache_sam2_entry()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert ENV_CHECKPOINT in err and NO_SAM_TRAINER in err and "Traceback" not in err

    monkeypatch.setattr("sys.argv", [*sys.argv, "--checkpoint", str(sam_checkpoint)])
    cache_sam2_entry()
    cache = dataset / "nnUNetPlans_2d_sam2_cache"
    assert str(cache) in capsys.readouterr().out
    assert read_cache_key(cache)["image_size"] == 64 and case_cache_file(cache, "case_a").is_file()
