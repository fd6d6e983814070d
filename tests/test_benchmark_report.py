"""The benchmark report's merge of an earlier report: what a lost machine left in ``docs/benchmarks`` fills the seeds
a new work folder has no run of, whole seeds only, and never mixes two protocols."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchmark_semisup as bs  # noqa: E402


def _arm(seeds: list[int], dice: list[float], iterations: int = 1500) -> dict:
    return {"trainer": "nnUNetTrainerSSS_noSAM", "iterations": iterations, "warm_from": "sup", "seeds": seeds,
            "train_min_total": [10.0 * (s + 1) for s in seeds], "commits": [f"c{s}" for s in seeds],
            "dice": {"a": list(dice), "mean": list(dice)},
            "hd95": {"a": [1.0] * len(seeds), "mean": [1.0] * len(seeds)}}


def _res(arms: dict, seeds: list[int], b: int = 4000, s: int = 1500) -> dict:
    return {"sup_iterations": b, "semi_iterations": s, "seeds": seeds, "arms": arms, "curves": {},
            "machine": "m", "commit_of_report": "abcdef0"}


def test_merge_takes_whole_seeds_in_seed_order_never_part_of_one_this_folder_holds() -> None:
    res = _res({"sss_ws": _arm([2], [0.9])}, seeds=[0, 1, 2])
    old = _res({"sss_ws": _arm([0, 1, 2], [0.1, 0.2, 0.3]), "sup": _arm([0, 1, 2], [0.5, 0.6, 0.7], 4000),
                "tune_x": _arm([0], [0.7])}, seeds=[0, 1, 2])
    bs.merge_earlier(res, old, "old.json", wanted={"sss_ws", "sup"})
    e = res["arms"]["sss_ws"]
    assert e["seeds"] == [0, 1, 2]
    assert e["dice"]["mean"] == [0.1, 0.2, 0.9]  # seed 2 is this folder's own
    assert e["commits"] == ["c0", "c1", "c2"] and e["train_min_total"] == [10.0, 20.0, 30.0]
    assert e["from_earlier"] == {"0": "old.json", "1": "old.json"}
    # this folder has a run of seed 2: the earlier seed-2 sup (another model) is not mixed in
    assert res["arms"]["sup"]["seeds"] == [0, 1] and "tune_x" not in res["arms"]
    assert res["earlier"] == [{"file": "old.json", "machine": "m", "commit_of_report": "abcdef0", "results": 4}]


def test_merge_skips_seeds_not_asked_and_arms_of_another_length() -> None:
    res = _res({"sss_ws": _arm([2], [0.9])}, seeds=[0, 1, 2])
    old = _res({"sss_ws": _arm([0, 3], [0.1, 0.2]), "sup_long": _arm([1], [0.4], 2500)}, seeds=[0, 1])
    res["arms"]["sup_long"] = _arm([2], [0.8], 7500)
    bs.merge_earlier(res, old, "old.json", wanted={"sss_ws", "sup_long"})
    assert res["arms"]["sss_ws"]["seeds"] == [0, 2]
    assert res["arms"]["sup_long"]["seeds"] == [2]  # 2500 iterations is another arm than 7500


def test_merge_refuses_another_protocol() -> None:
    res = _res({}, seeds=[0], b=4000)
    with pytest.raises(SystemExit, match="another protocol"):
        bs.merge_earlier(res, _res({}, seeds=[0], b=2000), "round1.json", wanted={"sss_ws"})


def test_merge_takes_learning_curves_only_with_their_seed() -> None:
    old = _res({"sss_ws": _arm([0], [0.1])}, seeds=[0])
    old["curves"] = {"sss_ws": [{"iterations": 300, "dice": 0.5}]}
    own_seed0 = _res({"sup": _arm([0], [0.6], 4000)}, seeds=[0])  # this folder trained seed 0: another model
    bs.merge_earlier(own_seed0, old, "old.json", wanted={"sss_ws"})
    assert own_seed0["curves"] == {} and "sss_ws" not in own_seed0["arms"]
    empty = _res({}, seeds=[0])
    bs.merge_earlier(empty, old, "old.json", wanted={"sss_ws"})
    assert empty["curves"] == old["curves"] and empty["arms"]["sss_ws"]["seeds"] == [0]


def test_tuning_arms_are_selected_by_family_or_by_exact_label() -> None:
    def labels(wanted, lrs=(0.001,), bgs=(0.99, 0.999), uws=()) -> list[str]:
        p = bs.Protocol(40, "2d", Path("ts"), Path("ls"), 4000, 1500, 5.0, val_images=Path("vi"),
                        val_labels=Path("vl"), tune_lrs=lrs, tune_background_thresholds=bgs,
                        tune_unsup_weights=uws, arms_wanted=wanted)
        return [a.label for a in p.arms(0, first_seed=True)]

    assert labels(("tune_sss_ws",)) == ["tune_sss_ws_lr0.001", "tune_sss_ws_bg0.99", "tune_sss_ws_bg0.999"]
    assert labels(("tune_sss_ws",), lrs=()) == ["tune_sss_ws_bg0.99", "tune_sss_ws_bg0.999"]
    assert labels(("sup", "tune_sss_ws_bg0.999")) == ["sup", "tune_sss_ws_bg0.999"]
    assert labels(("tune_sss_ws",), lrs=(), bgs=(), uws=(2.0,)) == ["tune_sss_ws_uw2"]
    p = bs.Protocol(40, "2d", Path("ts"), Path("ls"), 4000, 1500, 5.0, val_images=Path("vi"), val_labels=Path("vl"),
                    tune_background_thresholds=(0.999,), arms_wanted=("tune_sss_ws_bg0.999",))
    (arm,) = p.arms(0, first_seed=True)
    assert arm.env == (("nnUNet_sss_background_threshold", "0.999"),) and arm.warm_from == "sup" and not arm.test
    p.tune_unsup_weights, p.arms_wanted = (2.0,), ("tune_sss_ws_uw2",)
    (arm,) = p.arms(0, first_seed=True)
    assert arm.env == (("nnUNet_sss_unsup_weight", "2.0"),) and arm.warm_from == "sup" and not arm.test
    assert p.arms(1, first_seed=False) == []  # tuning runs on the first seed only
    p.tune_unsup_weights, p.tune_trainers = (), ("nnUNetTrainerSSS_noSAM_mirrorPL",)
    p.arms_wanted = ("tune_tr",)
    (arm,) = p.arms(0, first_seed=True)
    assert (arm.label, arm.trainer) == ("tune_tr_SSS_noSAM_mirrorPL", "nnUNetTrainerSSS_noSAM_mirrorPL")
    assert arm.env == () and arm.warm_from == "sup" and not arm.test
    p.tune_trainers, p.compare_trainers = (), ("nnUNetTrainerSSS_noSAM_mirrorPL",)
    p.arms_wanted = ("ws",)
    for seed in (0, 1):  # a compared trainer runs on every seed, with the test cases
        (arm,) = p.arms(seed, first_seed=seed == 0)
        assert (arm.label, arm.warm_from, arm.test) == ("ws_SSS_noSAM_mirrorPL", "sup", True)


def test_a_wanted_arm_finds_the_run_it_starts_from_even_when_that_is_not_wanted() -> None:
    p = bs.Protocol(40, "2d", Path("ts"), Path("ls"), 4000, 1500, 5.0, val_images=Path("vi"), val_labels=Path("vl"),
                    tune_lrs=(), tune_background_thresholds=(0.999,), arms_wanted=("tune_sss_ws",))
    rn = bs.Runner(p, Path("work"), {}, [0], "cpu")
    (arm,) = p.arms(0, first_seed=True)
    run = rn.run_of(arm, 0)  # raised StopIteration when "sup" was not among the wanted arms
    assert run.after == "sup4000" and run.iterations == 1500


def test_the_all_labeled_reference_gets_no_validation_curve() -> None:
    p = bs.Protocol(40, "2d", Path("ts"), Path("ls"), 4000, 1500, 5.0, full_dataset=41, val_images=Path("vi"),
                    val_labels=Path("vl"))
    rn = bs.Runner(p, Path("work"), {}, [0, 1], "cpu")
    by_label = {a.label: a for a in p.arms(0, first_seed=True)}
    assert rn.on_validation(by_label["sss_ws"], 0) and not rn.on_validation(by_label["sss_ws"], 1)
    assert not rn.on_validation(by_label["full"], 0)  # its training set may hold the validation cases


def test_acdc_work_folder_holds_one_configuration(tmp_path: Path) -> None:
    import benchmark_acdc as ba

    ba.claim_work_folder(tmp_path, "2d_cpu")
    ba.claim_work_folder(tmp_path, "2d_cpu")  # the same one again: resumes
    with pytest.raises(SystemExit, match="holds runs of configuration '2d_cpu', not '2d_small'"):
        ba.claim_work_folder(tmp_path, "2d_small")
    old = tmp_path / "old"  # a folder of the first ACDC runs: planned with 2d_small before the stamp existed
    old.mkdir()
    (old / ".planned").touch()
    (old / ".planned_28").touch()
    with pytest.raises(SystemExit, match="--configuration 2d_small"):
        ba.claim_work_folder(old, "2d_cpu")
    assert (old / ".configured_2d_small").exists() and (old / ".planned_28_2d_small").exists()
