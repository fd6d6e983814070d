"""SAM-2 video propagation of PCSW key-slice prompts, with the REAL sam2 video predictor and RANDOM weights.

Random weights say nothing about mask quality: these tests check plumbing and geometry only -- that cached image
features rebuild exactly the backbone output SAM-2's video predictor computes itself, that the state built here
matches ``init_state``'s, that each component is prompted once on its key slice at the right scaled coordinates
and carried through exactly its own slices by memory attention, and that the per-component logits merge into a map.
Image size 128 keeps every test at a few seconds on a shared 2-core CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_random_sam2_checkpoint

from nnunetv2_sss.sam.backend import SAM2Backend, to_sam_image, window_bounds
from nnunetv2_sss.sam.pcsw import PCSWConfig, generate_component_prompts
from nnunetv2_sss.sam.propagation import (
    backbone_out_from_features,
    merge_component_logits,
    new_inference_state,
    propagate_components,
)

S = 128


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> SAM2Backend:
    torch.set_num_threads(1)
    ckpt = save_random_sam2_checkpoint(tmp_path_factory.mktemp("sam_ckpt_prop"), S)
    return SAM2Backend(ckpt, image_size=S)


@pytest.fixture(scope="module")
def volume() -> tuple[np.ndarray, np.ndarray]:
    """A 5-slice (40 x 56) volume: a bright disk (class 1, slices 0-4, widest on slice 2) and a bar (class 2,
    slices 1-2); the 'student' prediction is its ground truth."""
    z_n, h, w = 5, 40, 56
    yy, xx = np.mgrid[:h, :w]
    seg = np.zeros((z_n, h, w), np.int16)
    for z, r in enumerate([5, 7, 9, 7, 5]):
        seg[z][(yy - 18) ** 2 + (xx - 20) ** 2 <= r * r] = 1
    seg[1:3, 8:14, 38:52] = 2
    rng = np.random.default_rng(0)
    img = rng.normal(0, 0.2, (1, z_n, h, w)).astype(np.float32) + seg[None].astype(np.float32)
    return img, seg


def _features(backend: SAM2Backend, img: np.ndarray) -> list[dict]:
    bounds = window_bounds(img)
    return [backend.encode(to_sam_image(img[:, z], bounds)) for z in range(img.shape[1])]


def test_cached_features_rebuild_the_video_predictors_own_backbone_output(backend: SAM2Backend, volume) -> None:
    img, _ = volume
    video = backend.video_predictor()
    image = to_sam_image(img[:, 2], window_bounds(img))
    feats = backend.encode(image)
    rebuilt = backbone_out_from_features(video, feats)
    own = video.forward_image(backend.predictor._transforms(image)[None])
    assert len(rebuilt["backbone_fpn"]) == len(own["backbone_fpn"]) == 3
    for a, b in zip(rebuilt["backbone_fpn"], own["backbone_fpn"], strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(rebuilt["vision_pos_enc"], own["vision_pos_enc"], strict=True):
        torch.testing.assert_close(a, b)
    # the video predictor shares the image model's weights (same checkpoint, read once)
    torch.testing.assert_close(video.no_mem_embed, backend.model.no_mem_embed)
    assert video.fill_hole_area == 0 and backend.video_predictor() is video


def test_state_has_init_states_keys(backend: SAM2Backend, tmp_path: Path) -> None:
    from PIL import Image

    for i in range(2):
        Image.fromarray(np.full((24, 32, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.jpg")
    video = backend.video_predictor()
    real = video.init_state(str(tmp_path))
    ours = new_inference_state(2, (24, 32), video.device)
    assert set(ours) == set(real)
    for k in ("num_frames", "video_height", "video_width", "device", "storage_device"):
        assert ours[k] == real[k], k


def test_key_slice_prompt_and_propagation_through_the_components_slices(backend: SAM2Backend, volume) -> None:
    img, seg = volume
    z_n, h, w = seg.shape
    comps, _, kept = generate_component_prompts(seg, [1, 2], PCSWConfig(window=3))
    assert [(c.label, c.key_z, c.z_range) for c in comps] == [(1, 2, (0, 5)), (2, 1, (1, 3))]
    feats = _features(backend, img)
    video = backend.video_predictor()
    asked: list[int] = []
    seen: dict = {}
    real_add = video.add_new_points_or_box

    def recording_add(state, frame_idx, obj_id, **kw):
        out = real_add(state, frame_idx=frame_idx, obj_id=obj_id, **kw)
        seen.setdefault("points", []).append({k: v.clone() for k, v in state["point_inputs_per_obj"][0][frame_idx]
                                              .items()})
        return out

    def features_of(z: int) -> dict:
        asked.append(z)
        return feats[z]

    video.add_new_points_or_box = recording_add  # instance attribute: records what the real call stored
    try:
        logits = propagate_components(video, comps, z_n, (h, w), features_of)
    finally:
        del video.add_new_points_or_box
    assert sorted(asked) == [0, 1, 2, 3, 4]  # every spanned slice injected once, nothing re-encoded
    assert [lg.shape for lg in logits] == [(5, h, w), (2, h, w)]
    assert all(np.isfinite(lg).all() for lg in logits)
    # one prompt per component, on its key slice: box corners (labels 2, 3) then the points, scaled by S / W, S / H
    for comp, stored in zip(comps, seen["points"], strict=True):
        p = comp.prompt
        scale = torch.tensor([S / w, S / h])
        want = torch.cat([torch.as_tensor(p.box).reshape(2, 2), torch.as_tensor(p.point_coords)]) * scale
        torch.testing.assert_close(stored["point_coords"][0], want)
        assert stored["point_labels"][0].tolist() == [2, 3, *p.point_labels.tolist()]

    # the key slice's logits are SAM's answer to the prompt alone; the others come through memory attention:
    # re-running with a different key slice changes the other slices' output
    moved = [type(comps[0])(prompt=comps[0].prompt.__class__(**{**comps[0].prompt.__dict__, "z": 0}),
                            z_range=(0, 5), voxels=comps[0].voxels, continuity=1.0)]
    again = propagate_components(video, moved, z_n, (h, w), lambda z: feats[z])
    assert not np.allclose(again[0][4], logits[0][4])

    merged, covered = merge_component_logits(comps, logits, seg.shape)
    assert covered.all() and merged.dtype == np.int16 and set(np.unique(merged)) <= {0, 1, 2}
    assert np.array_equal(merged[0] == 2, np.zeros((h, w), bool))  # class 2 spans slices 1-2 only
    assert kept.shape == seg.shape


def test_injected_features_equal_on_the_fly_encoding(backend: SAM2Backend, volume) -> None:
    """Propagation from (fp32) cached features gives the logits SAM-2 gets when it encodes the slices itself."""
    img, seg = volume
    z_n, h, w = seg.shape
    comps, _, _ = generate_component_prompts(seg, [1], PCSWConfig(window=3))
    bounds = window_bounds(img)
    video = backend.video_predictor()
    cached = propagate_components(video, comps, z_n, (h, w), lambda z: backend.encode(to_sam_image(img[:, z],
                                                                                                    bounds)))
    state = new_inference_state(z_n, (h, w), video.device)
    state["images"] = torch.stack([backend.predictor._transforms(to_sam_image(img[:, z], bounds))
                                   for z in range(z_n)])
    on_the_fly = propagate_components(video, comps, z_n, (h, w), state=state)
    np.testing.assert_allclose(cached[0], on_the_fly[0], atol=2e-3, rtol=1e-3)


def test_merge_prefers_the_higher_logit_and_marks_uncovered_slices() -> None:
    from nnunetv2_sss.sam.pcsw import ComponentPrompt, SlicePrompt

    def comp(label: int, z_range: tuple[int, int]) -> ComponentPrompt:
        p = SlicePrompt(z=z_range[0], label=label, point_coords=np.zeros((1, 2), np.float32),
                        point_labels=np.ones(1, np.int32), box=np.array([0, 0, 2, 2], np.float32), component_area=1.0,
                        component_pixels=1, consistency=1.0, score=1.0, window=z_range)
        return ComponentPrompt(p, z_range, 1, 1.0)

    a = np.array([[[3.0, 1.0, -1.0]], [[2.0, 2.0, -5.0]]], np.float32)  # class 1 on slices 0-1
    b = np.array([[[1.0, 4.0, -2.0]]], np.float32)  # class 2 on slice 1 only
    merged, covered = merge_component_logits([comp(1, (0, 2)), comp(2, (1, 2))], [a, b], (3, 1, 3))
    assert merged.tolist() == [[[1, 1, 0]], [[1, 2, 0]], [[-1, -1, -1]]]
    assert covered.tolist() == [True, True, False]


def test_refresh_in_component_mode_from_the_real_cache(backend: SAM2Backend, volume, tmp_path: Path) -> None:
    """refresh_pseudolabels in component mode: features come from the real embedding cache, a rejected
    component's voxels and the slices no kept component spans are ignored, and the map is written atomically."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from nnunetv2_sss.sam.cache import build_sam2_cache
    from nnunetv2_sss.sam.refresh import IGNORE, read_pseudolabel, refresh_pseudolabels

    img, seg = volume
    seg = seg.copy()
    seg[4] = 0  # class 1 now spans slices 0-3: slice 4 has no kept component
    seg[0, 30:32, 50:52] = 2  # a 4-pixel speck of class 2 on slice 0: a tiny share of its window, rejected
    folder = tmp_path / "nnUNetPlans_2d_unlabeled"
    folder.mkdir()
    props = {"class_locations": {c: np.zeros((0, 4), dtype=np.int64) for c in (1, 2)}}
    chunks = (1, 1, *img.shape[2:])
    nnUNetDatasetBlosc2.save_case(img, np.zeros((1, *img.shape[1:]), np.int8), props, str(folder / "case"),
                                  chunks=chunks, blocks=chunks)
    build_sam2_cache(folder, backend, "nnUNetPlans", "2d", progress=False)
    probs = np.stack([seg == c for c in range(3)]).astype(np.float32) * 0.9 + 0.1 / 3

    summary = refresh_pseudolabels(backend, folder, ["case"], lambda _i, _d: probs, [1, 2], 3, None,
                                   PCSWConfig(window=3), disagree_confidence=0.95)
    lm = read_pseudolabel(folder, "case")
    assert summary.prompts == 2 and summary.prompted_slices == 4 and summary.slices == 5
    assert summary.pcsw["accepted"] == {"1": 1, "2": 1} and summary.pcsw["rejected"]["2"] == {"inconsistent": 1}
    assert (lm[4] == IGNORE).all()  # no kept component spans slice 4
    assert (lm[0, 30:32, 50:52] == IGNORE).all()  # the rejected speck's voxels: SAM-2 was not asked
    assert (lm[:4] >= 0).mean() > 0.9 and set(np.unique(lm[:4])) <= {IGNORE, 0, 1, 2}

    slice_mode = refresh_pseudolabels(backend, folder, ["case"], lambda _i, _d: probs, [1, 2], 3, None,
                                      PCSWConfig(window=3, mode="slice"), disagree_confidence=0.95)
    assert slice_mode.prompts == 4 + 2  # class 1 on slices 0-3 and class 2 on slices 1-2, each prompted
