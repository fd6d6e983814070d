"""Known-answer tests of the PCSW prompt generator (pure numpy, runs in well under a second per test)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nnunetv2_sss.sam.pcsw import (
    PCSWConfig,
    PlausibilityLimits,
    SlicePrompt,
    generate_component_prompts,
    generate_prompts,
    learn_plausibility_limits,
    naive_prompts,
    to_sam_coords,
)


def disk(shape: tuple[int, int], center: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def ring(shape: tuple[int, int], center: tuple[float, float], r_in: float, r_out: float) -> np.ndarray:
    return disk(shape, center, r_out) & ~disk(shape, center, r_in)


def stack(mask2d: np.ndarray, n: int, label: int = 1) -> np.ndarray:
    return np.repeat((mask2d.astype(np.uint8) * label)[None], n, axis=0)


def by_key(prompts: list[SlicePrompt]) -> dict[tuple[int, int], SlicePrompt]:
    return {(p.z, p.label): p for p in prompts}


def point_rc(p: SlicePrompt, i: int = 0) -> tuple[int, int]:
    x, y = p.point_coords[i]
    return int(y), int(x)


def test_ring_point_lies_in_the_ring_not_the_hole() -> None:
    m = ring((64, 64), (32, 32), 12, 20)
    prompts, _ = generate_prompts(stack(m, 3), [1])
    assert len(prompts) == 3
    for p in prompts:
        r, c = point_rc(p)
        assert p.point_labels[0] == 1
        assert m[r, c], "positive point must be on the ring"
        d = np.hypot(r - 32, c - 32)
        assert 13 <= d <= 19  # well inside the wall, not on its edge and not in the cavity


def test_disk_point_near_centre() -> None:
    seg = stack(disk((50, 70), (22, 40), 10), 1)
    prompts, _ = generate_prompts(seg, [1])
    (p,) = prompts
    r, c = point_rc(p)
    assert abs(r - 22) <= 1 and abs(c - 40) <= 1
    assert p.component_pixels == int(disk((50, 70), (22, 40), 10).sum())


def test_split_5050_rejected_dominant_with_speck_accepted() -> None:
    shape = (40, 80)
    split = stack(disk(shape, (20, 18), 8) | disk(shape, (20, 60), 8), 3)
    prompts, report = generate_prompts(split, [1], PCSWConfig(tau=0.8))
    assert prompts == []
    assert report.rejected[1] == {"inconsistent": 3}
    assert all(abs(d.consistency - 0.5) < 1e-6 for d in report.decisions)

    big = disk(shape, (20, 18), 9)
    speck = disk(shape, (20, 60), 3)
    vol = stack(big | speck, 3)
    ratio = big.sum() / (big.sum() + speck.sum())
    assert 0.85 < ratio < 0.95
    prompts, report = generate_prompts(vol, [1], PCSWConfig(tau=0.8))
    assert len(prompts) == 3 and report.accepted[1] == 3
    for p in prompts:
        assert p.consistency == pytest.approx(ratio)
        x0, y0, x1, y1 = p.box
        assert x1 < 45, "the speck is not part of the largest component, so the box must not reach it"
        assert p.component_pixels == big.sum()


def test_speck_only_slice_is_not_prompted() -> None:
    shape = (40, 40)
    vol = np.zeros((3, *shape), np.uint8)
    vol[0][disk(shape, (20, 20), 9)] = 1
    vol[1][disk(shape, (20, 20), 9)] = 1
    vol[2][disk(shape, (5, 35), 1)] = 1  # consistent window (0, 3), but slice 2 has only a detached speck
    prompts, report = generate_prompts(vol, [1], PCSWConfig(min_pixels=1))
    assert {p.z for p in prompts} == {0, 1}
    assert report.rejected[1] == {"not_in_largest_component": 1}


def test_centred_vs_any_window_mode() -> None:
    shape = (40, 80)
    vol = np.zeros((5, *shape), np.uint8)
    for z in range(3):
        vol[z][disk(shape, (20, 15), 8)] = 1
    vol[3][disk(shape, (20, 60), 12)] = 1  # a separate, big object on slice 3
    # slice 2: centred window (1..3) holds the split object; window (0..2) is clean.
    centred, rep_c = generate_prompts(vol, [1], PCSWConfig(window_mode="centred"))
    anyw, rep_a = generate_prompts(vol, [1], PCSWConfig(window_mode="any"))
    assert 2 not in {p.z for p in centred}
    assert any(d.z == 2 and d.reason == "inconsistent" for d in rep_c.decisions)
    p2 = by_key(anyw)[(2, 1)]
    assert p2.window == (0, 3) and p2.consistency == pytest.approx(1.0)


def test_plausibility_rejects_far_larger_component() -> None:
    shape = (96, 96)
    train = [stack(disk(shape, (48, 48), r), 4) for r in (8, 10, 12)]
    limits = learn_plausibility_limits(train, [(5.0, 1.0, 1.0)] * 3, [1], slack=0.5)
    lim = limits.per_class[1]
    assert lim.max_area == pytest.approx(1.5 * disk(shape, (48, 48), 12).sum())
    assert lim.n_slices == 12

    ok, _ = generate_prompts(stack(disk(shape, (48, 48), 11), 3), [1], limits=limits, spacing=(5.0, 1.0, 1.0))
    assert len(ok) == 3
    huge, report = generate_prompts(stack(disk(shape, (48, 48), 40), 3), [1], limits=limits, spacing=(5, 1, 1))
    assert huge == []
    assert report.rejected[1] == {"area_above_limit": 3}
    tiny, report = generate_prompts(stack(disk(shape, (48, 48), 2), 3), [1], limits=limits, spacing=(5, 1, 1))
    assert tiny == [] and report.rejected[1] == {"area_below_limit": 3}


def test_limits_use_physical_units_and_refuse_mixing() -> None:
    shape = (64, 64)
    train = [stack(disk(shape, (32, 32), 10), 2)]
    mm = learn_plausibility_limits(train, [(8.0, 0.5, 0.5)], [1])
    px = learn_plausibility_limits(train, None, [1])
    assert mm.units == "mm" and px.units == "px"
    assert mm.per_class[1].max_area == pytest.approx(px.per_class[1].max_area * 0.25)
    with pytest.raises(ValueError, match="limits are in mm"):
        generate_prompts(train[0], [1], limits=mm)
    with pytest.raises(ValueError, match="limits are in px"):
        generate_prompts(train[0], [1], limits=px, spacing=(8.0, 0.5, 0.5))
    prompts, _ = generate_prompts(train[0], [1], limits=mm, spacing=(8.0, 0.5, 0.5))
    assert prompts[0].component_area == pytest.approx(disk(shape, (32, 32), 10).sum() * 0.25)


def test_limits_json_round_trip() -> None:
    shape = (48, 48)
    train = [stack(disk(shape, (24, 24), 9) * 1 + ring(shape, (24, 24), 10, 14) * 2, 3)]
    limits = learn_plausibility_limits(train, [(10.0, 1.25, 1.25)], [1, 2, 3], slack=0.3)
    assert set(limits.per_class) == {1, 2}  # class 3 never seen: unchecked
    back = PlausibilityLimits.from_dict(json.loads(json.dumps(limits.to_dict())))
    assert back == limits
    assert back.check(3, 1e9, 0.0, 1e9) == "ok"


def test_box_contains_component_and_is_clipped_to_image() -> None:
    shape = (30, 40)
    m = disk(shape, (3, 20), 6) | disk(shape, (3, 28), 6)  # touches the top edge
    prompts, _ = generate_prompts(stack(m, 1), [1], PCSWConfig(box_margin=0.2))
    (p,) = prompts
    x0, y0, x1, y1 = p.box.astype(int)
    assert 0 <= x0 < x1 <= shape[1] and 0 <= y0 < y1 <= shape[0]
    assert y0 == 0
    inside = np.zeros(shape, bool)
    inside[y0:y1, x0:x1] = True
    assert m[~inside].sum() == 0 and m.sum() == m[inside].sum()
    # the deepest point of a border-touching object is not pushed onto the border
    r, c = point_rc(p)
    assert m[r, c] and r >= 2


def test_box_margin() -> None:
    shape = (60, 60)
    m = np.zeros(shape, bool)
    m[10:30, 20:25] = True  # 20 rows x 5 cols; bbox exclusive = (20, 10, 25, 30)
    seg = stack(m, 1)
    (tight,), _ = generate_prompts(seg, [1], PCSWConfig(box_margin=0.0, min_margin_px=0))
    np.testing.assert_array_equal(tight.box, [20, 10, 25, 30])
    (p,), _ = generate_prompts(seg, [1], PCSWConfig(box_margin=0.1, min_margin_px=1))
    # rows: ceil(0.1 * 20) = 2; cols: ceil(0.1 * 5) = 1
    np.testing.assert_array_equal(p.box, [19, 8, 26, 32])
    (q,), _ = generate_prompts(seg, [1], PCSWConfig(box_margin=0.0, min_margin_px=3))
    np.testing.assert_array_equal(q.box, [17, 7, 28, 33])


def test_2d_input_matches_single_slice_volume() -> None:
    m = ring((40, 50), (20, 25), 6, 12).astype(np.int16) * 2
    p2d, r2d = generate_prompts(m, [2], spacing=(0.7, 0.7))
    p3d, _ = generate_prompts(m[None], [2], spacing=(3.0, 0.7, 0.7))
    assert len(p2d) == 1 and p2d[0].z == 0 and p2d[0].window == (0, 1)
    np.testing.assert_array_equal(p2d[0].point_coords, p3d[0].point_coords)
    np.testing.assert_array_equal(p2d[0].box, p3d[0].box)
    assert p2d[0].component_area == pytest.approx(m.astype(bool).sum() * 0.49)
    assert r2d.accepted == {2: 1}


def test_volume_ends_and_short_volume() -> None:
    shape = (32, 32)
    vol = stack(disk(shape, (16, 16), 8), 5)
    prompts, _ = generate_prompts(vol, [1], PCSWConfig(window=3))
    windows = {p.z: p.window for p in prompts}
    assert windows == {0: (0, 3), 1: (0, 3), 2: (1, 4), 3: (2, 5), 4: (2, 5)}
    short, _ = generate_prompts(vol[:2], [1], PCSWConfig(window=5))
    assert [(p.z, p.window) for p in short] == [(0, (0, 2)), (1, (0, 2))]


def test_multiclass_negative_points_lie_in_the_neighbour() -> None:
    shape = (64, 64)
    lv = disk(shape, (32, 32), 10)
    myo = ring(shape, (32, 32), 10, 16)
    seg = np.zeros(shape, np.uint8)
    seg[myo] = 2
    seg[lv] = 3
    vol = np.repeat(seg[None], 3, axis=0)
    prompts, report = generate_prompts(vol, [1, 2, 3])
    assert 1 not in report.accepted  # absent classes are not counted
    keyed = by_key(prompts)
    p_myo, p_lv = keyed[(1, 2)], keyed[(1, 3)]
    assert list(p_myo.point_labels) == [1, 0]
    r, c = point_rc(p_myo, 0)
    assert seg[r, c] == 2
    r, c = point_rc(p_myo, 1)
    assert seg[r, c] == 3 and np.hypot(r - 32, c - 32) <= 1.5  # deepest point of the LV
    # the LV box (with margin) reaches into the myocardium -> a negative point on the myocardium
    assert list(p_lv.point_labels) == [1, 0]
    assert seg[point_rc(p_lv, 0)] == 3 and seg[point_rc(p_lv, 1)] == 2
    x0, y0, x1, y1 = p_lv.box
    x, y = p_lv.point_coords[1]
    assert x0 <= x < x1 and y0 <= y < y1

    no_neg, _ = generate_prompts(vol, [2, 3], PCSWConfig(negative_points=False))
    assert all(list(p.point_labels) == [1] for p in no_neg)


def test_to_sam_coords_non_square() -> None:
    p = SlicePrompt(
        z=0, label=1,
        point_coords=np.array([[50, 20], [0, 99]], np.float32),
        point_labels=np.array([1, 0], np.int32),
        box=np.array([10, 20, 110, 60], np.float32),
        component_area=1.0, component_pixels=1, consistency=1.0, score=1.0, window=(0, 1),
    )
    q = to_sam_coords(p, src_hw=(100, 200), dst_hw=(1024, 1024))  # x * 5.12, y * 10.24
    np.testing.assert_allclose(q.point_coords, [[256.0, 204.8], [0.0, 1013.76]], rtol=1e-6)
    np.testing.assert_allclose(q.box, [51.2, 204.8, 563.2, 614.4], rtol=1e-6)
    np.testing.assert_array_equal(q.point_labels, [1, 0])
    np.testing.assert_array_equal(p.box, [10, 20, 110, 60])  # original untouched
    back = to_sam_coords(q, (1024, 1024), (100, 200))
    np.testing.assert_allclose(back.box, p.box, rtol=1e-5)


def test_probabilities_score_and_min_score() -> None:
    shape = (32, 32)
    m = disk(shape, (16, 16), 7)
    vol = stack(m, 2)
    probs = np.zeros((2, 2, *shape), np.float32)
    probs[1, 0][m] = 0.9
    probs[1, 1][m] = 0.4
    probs[0] = 1 - probs[1]
    prompts, _ = generate_prompts(vol, [1], probabilities=probs)
    assert [round(p.score, 3) for p in prompts] == [0.9, 0.4]
    prompts, report = generate_prompts(vol, [1], PCSWConfig(min_score=0.5), probabilities=probs)
    assert [p.z for p in prompts] == [0]
    assert report.rejected[1] == {"low_score": 1}
    assert "1 prompted, 1 rejected (low_score=1)" in report.summary()


def test_min_pixels_and_input_validation() -> None:
    vol = np.zeros((1, 20, 20), np.uint8)
    vol[0, 5:7, 5:7] = 1  # 4 pixels
    prompts, report = generate_prompts(vol, [1], PCSWConfig(min_pixels=5))
    assert prompts == [] and report.rejected[1] == {"too_few_pixels": 1}
    assert len(generate_prompts(vol, [1], PCSWConfig(min_pixels=4))[0]) == 1
    with pytest.raises(TypeError):
        generate_prompts(vol.astype(np.float32), [1])
    with pytest.raises(ValueError):
        PCSWConfig(tau=0.0)
    with pytest.raises(ValueError):
        PCSWConfig(window_mode="middle")
    with pytest.raises(ValueError):
        PCSWConfig(connectivity=8)


def test_connectivity_decides_whether_a_diagonal_step_is_one_object() -> None:
    vol = np.zeros((2, 20, 20), np.uint8)
    vol[0, 5:15, 2:10] = 1
    vol[1, 5:15, 10:18] = 1  # touches slice 0 only along an edge diagonal in (z, x)
    p26, _ = generate_prompts(vol, [1], PCSWConfig(connectivity=26))
    p6, r6 = generate_prompts(vol, [1], PCSWConfig(connectivity=6))
    assert len(p26) == 2 and p26[0].consistency == pytest.approx(1.0)
    assert p6 == [] and r6.rejected[1] == {"inconsistent": 2}


def test_deepest_point_uses_in_plane_spacing() -> None:
    vol = np.zeros((2, 30, 40), np.uint8)
    vol[0, 5:25, 5:11] = 1  # A: 20 rows x 6 cols
    vol[0, 5:13, 30:38] = 1  # B: 8 x 8
    vol[1, 5:13, 5:38] = 1  # joins A and B into one 3D component
    (px,) = [p for p in generate_prompts(vol, [1])[0] if p.z == 0]
    (mm,) = [p for p in generate_prompts(vol, [1], spacing=(5.0, 1.0, 2.0))[0] if p.z == 0]
    assert px.point_coords[0][0] >= 30  # in pixels B is deeper (4 vs 3)
    assert mm.point_coords[0][0] < 11  # with 2 mm columns A is deeper (6 mm vs 4 mm)


# ---------------------------------------------------------------------------------------------------------------
# component mode (SSS): one prompt per kept 3D component, on its largest-area slice
def test_component_mode_prompts_each_component_once_on_its_largest_slice() -> None:
    shape = (48, 64)
    vol = np.zeros((7, *shape), np.uint8)
    radii = [4, 6, 9, 11, 8, 5, 3]  # widest on slice 3
    for z, r in enumerate(radii):
        vol[z][disk(shape, (24, 20), r)] = 1
    vol[2:5][:, disk(shape, (24, 52), 5)] = 2  # a second class on slices 2-4, largest area tie -> first slice
    comps, report, kept = generate_component_prompts(vol, [1, 2], PCSWConfig(window=3, tau=0.8))
    assert [(c.label, c.key_z, c.z_range) for c in comps] == [(1, 3, (0, 7)), (2, 2, (2, 5))]
    c1 = comps[0]
    assert c1.voxels == int((vol == 1).sum()) and c1.continuity == pytest.approx(1.0)
    p = c1.prompt
    r, c = point_rc(p)
    assert (r, c) == (24, 20) and p.point_labels.tolist() == [1]
    assert p.component_pixels == disk(shape, (24, 20), 11).sum()
    x0, y0, x1, y1 = p.box
    assert x0 <= 20 - 11 and x1 > 20 + 11 and y0 <= 24 - 11 and y1 > 24 + 11
    assert report.accepted == {1: 1, 2: 1} and all(d.z_range is not None for d in report.decisions)
    assert np.array_equal(kept, vol.astype(np.int16))
    # slice mode on the same volume prompts every slice of every class: 7 + 3 prompts instead of 2
    per_slice, _ = generate_prompts(vol, [1, 2], PCSWConfig(window=3, tau=0.8, mode="slice"))
    assert len(per_slice) == 10


def test_component_mode_rejects_comparable_pieces_and_keeps_dominant_with_speck() -> None:
    shape = (40, 80)
    split = stack(disk(shape, (20, 18), 8) | disk(shape, (20, 60), 8), 4)
    comps, report, kept = generate_component_prompts(split, [1], PCSWConfig(tau=0.8))
    assert comps == [] and report.rejected[1] == {"inconsistent": 2} and not kept.any()
    assert all(d.consistency == pytest.approx(0.5) for d in report.decisions)

    big, speck = disk(shape, (20, 18), 9), disk(shape, (20, 60), 2)
    vol = stack(big, 4)
    vol[1][speck] = 1  # a speck on one slice: its own component, a tiny share of its windows
    comps, report, kept = generate_component_prompts(vol, [1], PCSWConfig(tau=0.8, min_pixels=1))
    assert len(comps) == 1 and comps[0].voxels == 4 * big.sum()
    assert report.rejected[1] == {"inconsistent": 1}
    (speck_decision,) = [d for d in report.decisions if not d.accepted]
    assert speck_decision.z == 1 and speck_decision.z_range == (1, 2) and speck_decision.consistency < 0.05
    assert kept[1][speck].sum() == 0 and (kept[1][big] == 1).all()  # the speck's voxels stay unprompted


def test_component_mode_limits_score_and_continuity_at_volume_ends() -> None:
    shape = (64, 64)
    vol = stack(disk(shape, (32, 32), 10), 5)
    limits = learn_plausibility_limits([stack(disk(shape, (32, 32), 4), 3)], None, [1], slack=0.2)
    comps, report, _ = generate_component_prompts(vol, [1], limits=limits)
    assert comps == [] and report.rejected[1] == {"area_above_limit": 1}
    probs = np.stack([1 - vol, vol]).astype(np.float32) * 0.6
    comps, report, _ = generate_component_prompts(vol, [1], PCSWConfig(min_score=0.7), probabilities=probs)
    assert comps == [] and report.rejected[1] == {"low_score": 1}
    comps, _, _ = generate_component_prompts(vol, [1], PCSWConfig(min_score=0.5), probabilities=probs)
    assert comps[0].prompt.score == pytest.approx(0.6)
    # a second object on the last slice only: in the centred (shifted) windows of slices 2-4 the main object
    # holds 1/2 of slice 4's share; its mean continuity stays high, the lone object's is low
    two = vol.copy()
    two[4][disk(shape, (10, 10), 10) & ~disk(shape, (32, 32), 13)] = 1
    comps, report, _ = generate_component_prompts(two, [1], PCSWConfig(tau=0.8, window=3))
    assert len(comps) == 1 and comps[0].z_range == (0, 5) and 0.8 < comps[0].continuity < 1.0


def test_mode_is_validated() -> None:
    with pytest.raises(ValueError, match="mode must be 'component'"):
        PCSWConfig(mode="volume")
    assert PCSWConfig().mode == "component"


def test_naive_prompts_every_component_on_every_slice() -> None:
    shape = (40, 80)
    vol = stack(disk(shape, (20, 18), 8) | disk(shape, (20, 60), 8), 3)
    vol[1][disk(shape, (5, 40), 1)] = 2  # a 5-pixel speck of class 2 on slice 1
    naive = naive_prompts(vol, [1, 2])
    assert sorted((p.z, p.label) for p in naive) == [(0, 1), (0, 1), (1, 1), (1, 1), (1, 2), (2, 1), (2, 1)]
    assert all(np.isnan(p.consistency) for p in naive)
    pcsw, _ = generate_prompts(vol, [1, 2], PCSWConfig(mode="slice", min_pixels=6))
    assert pcsw == []  # every slice split 50/50 and the speck too small: PCSW prompts none of them
