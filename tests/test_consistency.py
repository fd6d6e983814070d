"""Known-answer tests of pseudo-labels, CutMix, the masked loss, DFE, the EMA rule and the DDP batch split."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnunetv2_sss.augment.views import NUM_VIEWS, apply_cutmix, cutmix_masks, get_unlabeled_transforms
from nnunetv2_sss.consistency.dfe import DFE, DFEScale, dfe_fuse, pooled_cosine
from nnunetv2_sss.consistency.ema import EMATeacher, ema_momentum
from nnunetv2_sss.consistency.losses import (
    MaskedCEDiceLoss,
    deep_supervision_targets,
    mirror_averaged_logits,
    pseudo_label,
)
from nnunetv2_sss.training.unlabeled_stream import split_batch_across_ranks


def test_confidence_mask_marks_only_confident_pixels():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1, 0, 0] = 10.0  # confident class 1
    logits[0, 2, 1, 1] = 1.0  # weakly class 2
    labels, conf, mask = pseudo_label(logits, threshold=0.95)
    assert labels[0, 0, 0] == 1 and labels[0, 1, 1] == 2
    assert mask[0, 0, 0] == 1 and mask[0, 1, 1] == 0 and mask[0, 0, 1] == 0
    assert conf[0, 0, 0] > 0.99 and conf[0, 0, 1] == pytest.approx(1 / 3, abs=1e-6)


ALL_3D = [[], [2], [3], [4], [2, 3], [2, 4], [3, 4], [2, 3, 4]]


@pytest.mark.parametrize("spatial,axes,flips", [((6, 5), (0, 1), [[], [2], [3], [2, 3]]),
                                                ((4, 6, 5), (0, 1, 2), ALL_3D),
                                                ((4, 6, 5), (1, 2), [[], [3], [4], [3, 4]])])
def test_mirror_averaged_logits_is_the_mean_softmax_over_every_mirror_combination(spatial, axes, flips):
    torch.manual_seed(0)
    conv = (nn.Conv2d if len(spatial) == 2 else nn.Conv3d)(1, 3, 3, padding=1)  # not mirror-symmetric
    x = torch.randn(2, 1, *spatial)
    with torch.no_grad():
        logits = conv(x)
        got = torch.softmax(mirror_averaged_logits(conv, x, logits, axes), dim=1)
        want = sum(torch.softmax(torch.flip(conv(torch.flip(x, d)), d), dim=1) for d in flips) / len(flips)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, torch.softmax(logits, dim=1), atol=1e-3)
    assert mirror_averaged_logits(conv, x, logits, None) is logits
    assert mirror_averaged_logits(conv, x, logits, ()) is logits


@pytest.mark.parametrize("spatial", [(32, 40), (8, 16, 20)])
def test_cutmix_mixes_images_and_pseudo_labels_identically(spatial):
    g = torch.Generator().manual_seed(0)
    b = 4
    boxes = cutmix_masks(b, spatial, p=1.0, generator=g)
    assert boxes.shape == (b, *spatial) and boxes.any(dim=tuple(range(1, boxes.dim()))).all()
    img = torch.arange(b, dtype=torch.float32).view(b, 1, *[1] * len(spatial)).expand(b, 2, *spatial).clone()
    lab = torch.arange(b).view(b, *[1] * len(spatial)).expand(b, *spatial).clone()
    perm = torch.roll(torch.arange(b), 1)
    img_m = apply_cutmix(img, img[perm], boxes)
    lab_m = apply_cutmix(lab, lab[perm], boxes)
    # every pixel of the mixed image carries the sample index its pseudo-label says
    assert torch.equal(img_m[:, 0].long(), lab_m) and torch.equal(img_m[:, 1].long(), lab_m)
    assert torch.equal(lab_m[boxes], lab[perm][boxes]) and torch.equal(lab_m[~boxes], lab[~boxes])
    # each box is one axis-aligned block inside the patch, within the size limits
    for k in range(b):
        idx = boxes[k].nonzero()
        extent = idx.max(0).values - idx.min(0).values + 1
        assert int(extent.prod()) == int(boxes[k].sum())
        assert 0.01 <= boxes[k].float().mean() <= 0.5


def test_cutmix_probability_zero_gives_no_box():
    assert not cutmix_masks(3, (16, 16), p=0.0).any()


def test_unsupervised_loss_zero_when_views_agree_with_full_confidence():
    labels = torch.randint(0, 4, (2, 16, 16))
    logits = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float() * 100.0
    pl, _, mask = pseudo_label(logits, 0.95)
    assert mask.all()
    loss = MaskedCEDiceLoss()(logits, pl, mask)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    wrong = MaskedCEDiceLoss()(logits.roll(1, dims=1), pl, mask)
    assert wrong.item() > 1.0


def test_unsupervised_loss_ignores_unconfident_and_invalid_pixels():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    logits = torch.randn(1, 3, 8, 8)
    zero_mask = torch.zeros(1, 8, 8)
    assert MaskedCEDiceLoss()(logits, labels, zero_mask).item() == pytest.approx(0.0, abs=1e-6)  # nothing counts
    half = torch.zeros(1, 8, 8)
    half[:, :4] = 1
    masked = MaskedCEDiceLoss()(logits, labels, half)
    logits_changed = logits.clone()
    logits_changed[..., 4:, :] = torch.randn(1, 3, 4, 8) * 5  # only unmasked pixels change
    assert MaskedCEDiceLoss()(logits_changed, labels, half).item() == pytest.approx(masked.item(), abs=1e-6)
    ce_only = MaskedCEDiceLoss(do_bg=True)
    full = ce_only(logits, labels, torch.ones(1, 8, 8), valid=torch.zeros(1, 8, 8))
    assert full.item() == pytest.approx(0.0, abs=1e-4)


def test_deep_supervision_targets_follow_output_sizes():
    outs = [torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 4, 4)]
    lab = torch.randint(0, 3, (2, 16, 16))
    (labs,) = deep_supervision_targets(outs, lab)
    assert [tuple(t.shape) for t in labs] == [(2, 16, 16), (2, 8, 8), (2, 4, 4)]
    assert torch.equal(labs[0], lab) and labs[1].dtype == lab.dtype


@pytest.mark.parametrize("conv", [nn.Conv2d, nn.Conv3d])
def test_dfe_is_the_identity_at_init_and_learns_away_from_it(conv):
    chans = [4, 8, 16, 32]
    spatial = [(32, 32), (16, 16), (8, 8), (4, 4)] if conv is nn.Conv2d else \
        [(8, 16, 16), (4, 8, 8), (2, 4, 4), (1, 2, 2)]
    weak = [torch.randn(2, c, *s, requires_grad=True) for c, s in zip(chans, spatial)]
    strong = [torch.randn(2, c, *s, requires_grad=True) for c, s in zip(chans, spatial)]
    dfe = DFE(chans, conv, num_scales=3)
    out, sim = dfe(weak, strong)
    assert dfe.scale_indices == [1, 2, 3]
    assert [o.shape for o in out] == [s.shape for s in strong]
    assert out[0] is strong[0]  # scales outside DFE pass through
    assert all(torch.equal(o, s) for o, s in zip(out, strong))  # exactly the identity at step 0
    assert sim.shape == (2,)
    target = [torch.randn_like(o) for o in out]
    loss = sum(((o - t) ** 2).mean() for o, t in zip(out[1:], target[1:]))
    loss.backward()
    for m in dfe.scales:  # at step 0 only the zero-initialised output projection receives gradient
        assert m.proj_out.weight.grad.abs().sum() > 0
    opt = torch.optim.SGD(dfe.parameters(), lr=0.1)
    opt.step()
    opt.zero_grad()
    out2, _ = dfe(weak, strong)
    assert not torch.equal(out2[2], strong[2])
    sum(((o - t) ** 2).mean() for o, t in zip(out2[1:], target[1:])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dfe.parameters())
    assert weak[2].grad is not None and strong[2].grad is not None


def test_dfe_uses_every_encoder_scale_by_default():
    assert DFE([4, 8, 16], nn.Conv2d).scale_indices == [0, 1, 2]
    with pytest.raises(ValueError, match="scales"):
        DFE([4, 8], nn.Conv2d, num_scales=3)


def test_dfe_fusion_known_answer():
    mlp = nn.Sequential(nn.Conv2d(6, 6, 1), nn.GELU())
    a = torch.randn(3, 6, 5, 5)
    s_one = torch.ones(3)
    assert torch.allclose(dfe_fuse(a, a.clone(), s_one, mlp), mlp(a), atol=1e-6)  # no (A_s - A_w) term
    b = torch.randn(3, 6, 5, 5)
    s_b = pooled_cosine(a, b)
    w = torch.sigmoid(s_b).view(-1, 1, 1, 1)
    expected = w * mlp(a) + (1 - w) * mlp(b) + (1 - s_b).view(-1, 1, 1, 1) * (b - a)
    assert torch.allclose(dfe_fuse(a, b, s_b, mlp), expected, atol=1e-6)


def test_dfe_similarity_measures_the_views_not_the_projections():
    """s is the pooled cosine of the two views' own features: 1 for identical views, whatever the weights."""
    m = DFEScale(4, nn.Conv2d)
    x = torch.rand(2, 4, 6, 6)
    _, s = m(x, x.clone())
    assert torch.allclose(s, torch.ones(2), atol=1e-6)
    _, s_neg = m(x, -x)
    assert torch.allclose(s_neg, -torch.ones(2), atol=1e-6)


def test_ema_update_rule():
    assert ema_momentum(0) == 0.0 and ema_momentum(1) == 0.5 and ema_momentum(10_000) == 0.996
    student = nn.Linear(2, 2)
    teacher = EMATeacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    t_before = [p.clone() for p in teacher.model.parameters()]
    teacher.update(student, step=3)  # m = 1 - 1/4 = 0.75
    for tb, t, s in zip(t_before, teacher.model.parameters(), student.parameters()):
        assert torch.allclose(t, 0.75 * tb + 0.25 * s)
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_unlabeled_batch_split_matches_nnunet():
    for total, world in ((8, 3), (5, 2), (4, 4), (7, 1)):
        parts = [split_batch_across_ranks(total, world, r) for r in range(world)]
        assert sum(parts) == total and max(parts) - min(parts) <= 1
    assert [split_batch_across_ranks(5, 2, r) for r in range(2)] == [3, 2]  # nnU-Net gives rank 0 the extra


@pytest.mark.parametrize("patch,dummy2d", [((32, 32), False), ((8, 32, 32), False), ((8, 32, 32), True)])
def test_unlabeled_transforms_stack_weak_and_two_strong_views(patch, dummy2d):
    t = get_unlabeled_transforms(patch, rotation_for_DA=(0.0, 0.0), mirror_axes=(0, 1), do_dummy_2d_data_aug=dummy2d)
    img = torch.randn(1, *patch)
    seg = torch.randint(0, 3, (2, *patch)).short()
    out = t(image=img, segmentation=seg)
    assert out["image"].shape == (NUM_VIEWS, *patch) and out["segmentation"].shape == (2, *patch)
    weak, s1, s2 = out["image"][0], out["image"][1], out["image"][2]
    assert not torch.equal(s1, s2) or not torch.equal(s1, weak)  # strong views are perturbed independently


def test_class_adaptive_threshold_keeps_confident_part_of_every_class():
    from nnunetv2_sss.consistency.losses import ClassAdaptiveThreshold, pseudo_label

    labels = torch.tensor([[0, 0, 0, 1, 1, 2, 2]])
    conf = torch.tensor([[0.99, 0.99, 0.99, 0.75, 0.6, 0.8, 0.5]])
    valid = torch.ones(1, 7)
    valid[0, 6] = 0  # an invalid pixel does not count towards its class's confidence
    t = ClassAdaptiveThreshold(3, 0.95, momentum=0.0)
    # a global 0.95 keeps background only: the failure this fixes
    assert pseudo_label(torch.log(torch.tensor([[[0.99], [0.005], [0.005]]])), 0.95)[2].item() == 1.0
    assert torch.equal((conf >= 0.95).float(), torch.tensor([[1.0, 1, 1, 0, 0, 0, 0]]))
    t.update(labels, conf, valid)
    assert torch.allclose(t.mean_conf, torch.tensor([0.99, 0.675, 0.8]))
    assert torch.allclose(t.thresholds(), 0.95 * torch.tensor([0.99, 0.675, 0.8]) / 0.99)
    assert torch.equal(t.mask(labels, conf), torch.tensor([[1.0, 1, 1, 1, 0, 1, 0]]))
    # the EMA moves towards each batch's class means; an unseen class keeps its value
    slow = ClassAdaptiveThreshold(3, 0.95, momentum=0.5)
    slow.update(labels[:, :3], conf[:, :3], valid[:, :3])
    assert torch.allclose(slow.mean_conf, torch.tensor([0.5 / 3 + 0.5 * 0.99, 1 / 3, 1 / 3]))


def test_background_threshold_holds_background_pixels_to_their_own_threshold():
    from nnunetv2_sss.consistency.losses import ClassAdaptiveThreshold

    # columns: background at 0.97, background at 0.999, class 1 at 0.96, class 2 at 0.9
    probs = torch.tensor([[0.97, 0.999, 0.02, 0.05], [0.02, 0.0005, 0.96, 0.05], [0.01, 0.0005, 0.02, 0.9]])
    logits = torch.log(probs).view(1, 3, 1, 4)
    assert torch.equal(pseudo_label(logits, 0.95)[2], torch.tensor([[[1.0, 1, 1, 0]]]))
    labels, conf, mask = pseudo_label(logits, 0.95, background_threshold=0.99)
    assert torch.equal(labels, torch.tensor([[[0, 0, 1, 2]]]))
    assert torch.equal(mask, torch.tensor([[[0.0, 1, 1, 0]]]))  # only the 0.97 background pixel is dropped
    # a looser background threshold lowers only background's bar
    assert torch.equal(pseudo_label(logits, 0.99, background_threshold=0.95)[2], torch.tensor([[[1.0, 1, 0, 0]]]))
    # with class-adaptive thresholds it replaces background's adaptive one and leaves the others
    t = ClassAdaptiveThreshold(3, 0.95, momentum=0.0)
    t.update(labels, conf, torch.ones_like(conf))
    base = t.thresholds().clone()
    assert torch.equal(t.mask(labels, conf, 0.99), torch.tensor([[[0.0, 1, 1, 1]]]))
    assert torch.equal(t.thresholds(), base)  # the stored thresholds are untouched
