"""The options the quality study searches (issue: distilled sets that earn their keep), each on a case small
enough to check by hand: discovery's crop geometry and CIDD's rule, where the NRR mask enters the update,
RDED's student recipe, DBR's decoupled temperature and smooth-l1 distance, DD-Ranking's numbers."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nrrdd.augment import epoch_augment, epoch_order
from nrrdd.cam import class_activation_map, nrr_mask
from nrrdd.compare import dd_ranking, full_hard_top1
from nrrdd.config import RunConfig
from nrrdd.data import Normalizer, TensorImageSet
from nrrdd.discover import DiscoverSettings, candidate_boxes, crop_scale_for, discover
from nrrdd.kernels import dbr_loss_reference
from nrrdd.models import ConvNet
from nrrdd.refine import RefineSettings, _MaskedSGD, refine
from nrrdd.runtime import Runtime
from nrrdd.train import StudentSettings, TeacherSettings, _rded_schedule, dbr_criterion, dbr_loss_decoupled, train_student, train_teacher

from test_discover import BrightnessTeacher, _constant_images


# --- discovery: crop geometry ------------------------------------------------------------------------------
def test_crop_min_side_raises_the_scale_floor_by_image_size():
    assert crop_scale_for(28, (0.08, 1.0), 0) == (0.08, 1.0)
    lo, hi = crop_scale_for(28, (0.08, 1.0), 20)
    assert lo == pytest.approx((20 / 28) ** 2) and hi == 1.0          # 0.5102: no 8 px fragments of 28 px images
    assert crop_scale_for(224, (0.08, 1.0), 20) == (0.08, 1.0)        # 224 px: (20/224)^2 < 0.08, unchanged
    assert crop_scale_for(16, (0.08, 1.0), 20) == (1.0, 1.0)          # larger than the image: the whole image
    boxes = candidate_boxes(0, 7, 50, 28, crop_scale_for(28, (0.08, 1.0), 20))
    assert (boxes[:, 2] >= 20).all() and (boxes[:, 2] <= 28).all()


def test_whole_image_is_one_more_candidate_after_the_same_crops():
    a = candidate_boxes(3, 11, 5, 32, (0.08, 1.0))
    b = candidate_boxes(3, 11, 5, 32, (0.08, 1.0), whole_image=True)
    assert b.shape == (6, 4) and np.array_equal(b[:5], a) and b[5].tolist() == [0, 0, 32, 32]


def test_whole_image_candidate_wins_cidd_on_cam_ratio():
    # the whole image holds all of the CAM (ratio 1), so CIDD keeps it for every image of class 0 (class 1's
    # CAM is zero for this teacher: every ratio ties at 0 and the first random crop is kept)
    data, _ = _constant_images()
    d = discover(BrightnessTeacher().eval(), data, Normalizer((0.0,), (1.0,)),
                 DiscoverSettings(method="nrrdd", ipc=2, mipc=10, num_crop=2, factor=1, seed=0, whole_image=True))
    assert [s["box"] for s in d.sources if s["class"] == 0] == [[0, 0, 8, 8]] * 2
    assert any(s["box"] != [0, 0, 8, 8] for s in d.sources if s["class"] == 1)


# --- discovery: CIDD's confidence rule ---------------------------------------------------------------------
def _picked(d, n):
    return [round(float(d.images[i].mean()) * 255) for i in range(n)]


@pytest.mark.parametrize("quantile,expect", [(0.0, [10, 20, 30]), (0.5, [90, 120, 160]), (1.0, [200, 220, 250])])
def test_cidd_quantile_slides_a_window_along_the_confidence_ranking(quantile, expect):
    # class 0's ten candidates ranked by confidence (= brightness): 10 20 30 60 90 120 160 200 220 250;
    # a window of 3 starting round(q * (10 - 3)) down the ranking: 0, round(3.5) = 4, 7
    data, _ = _constant_images()
    d = discover(BrightnessTeacher().eval(), data, Normalizer((0.0,), (1.0,)),
                 DiscoverSettings(method="nrrdd", ipc=3, mipc=10, num_crop=2, factor=1, seed=0, quantile=quantile))
    assert _picked(d, 3) == expect


class BiasedBrightnessTeacher(BrightnessTeacher):
    """logit_0 = 8 * brightness - 4: class 0 only above brightness 0.5 (pixel value 128)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[8.0], [0.0]]))
            self.fc.bias.copy_(torch.tensor([-4.0, 0.0]))


def test_cidd_correct_keeps_the_least_confident_of_the_correctly_classified():
    data, _ = _constant_images()
    teacher = BiasedBrightnessTeacher().eval()
    args = dict(ipc=3, mipc=10, num_crop=2, factor=1, seed=0)
    plain = discover(teacher, data, Normalizer((0.0,), (1.0,)), DiscoverSettings(method="nrrdd", **args))
    assert _picked(plain, 3) == [10, 20, 30]                          # all assigned to class 1 by the teacher
    correct = discover(teacher, data, Normalizer((0.0,), (1.0,)),
                       DiscoverSettings(method="nrrdd", correct_only=True, **args))
    assert _picked(correct, 3) == [160, 200, 220]                     # the correct ones: 160 200 220 250
    # class 1 (the same images): bright ones are misclassified; correct are 10..120, least confident last
    assert [round(float(correct.images[3 + i].mean()) * 255) for i in range(3)] == [120, 90, 60]


def test_cidd_correct_falls_back_to_misclassified_when_too_few_are_correct():
    data, _ = _constant_images()
    d = discover(BiasedBrightnessTeacher().eval(), data, Normalizer((0.0,), (1.0,)),
                 DiscoverSettings(method="nrrdd", ipc=6, mipc=10, num_crop=1, factor=1, seed=0, correct_only=True))
    assert _picked(d, 6) == [160, 200, 220, 250, 10, 20]              # 4 correct, then the least confident others


def test_cidd_rule_arguments_are_checked():
    data, _ = _constant_images()
    with pytest.raises(ValueError, match="quantile"):
        discover(BrightnessTeacher().eval(), data, Normalizer((0.0,), (1.0,)),
                 DiscoverSettings(method="nrrdd", ipc=1, mipc=10, num_crop=1, factor=1, seed=0, quantile=1.5))
    with pytest.raises(ValueError, match="keep"):
        discover(BrightnessTeacher().eval(), data, Normalizer((0.0,), (1.0,)),
                 DiscoverSettings(method="nrrdd", ipc=1, mipc=10, num_crop=1, factor=1, seed=0, keep="middle"))


# --- refinement: where the mask enters ---------------------------------------------------------------------
def test_masked_sgd_step_by_hand():
    x = torch.tensor([[[[0.5, 0.5], [0.5, 0.9]]]], requires_grad=True)
    x.grad = torch.tensor([[[[1.0, -2.0], [4.0, -8.0]]]])
    mask = torch.tensor([[[[0.0, 0.5], [0.25, 0.5]]]])
    sgd = _MaskedSGD(x, mask, lr=0.1, lo=torch.tensor([0.0]), hi=torch.tensor([1.0]))
    sgd.step(0.5)                                                      # lr x schedule factor = 0.05
    # 0.5 - 0; 0.5 + 0.05*0.5*2; 0.5 - 0.05*0.25*4; 0.9 + 0.05*0.5*8 = 1.1 -> clamped to 1
    torch.testing.assert_close(x.detach(), torch.tensor([[[[0.5, 0.55], [0.45, 1.0]]]]))


def _small_teacher():
    torch.manual_seed(0)
    t = ConvNet(num_classes=3, depth=2, width=8, channels=1, im_size=8)
    t.train()
    with torch.no_grad():
        for _ in range(3):
            t(torch.randn(16, 1, 8, 8))
    return t.eval()


@pytest.mark.parametrize("mode", ["step", "grad", "sgd"])
def test_every_mask_mode_keeps_critical_pixels_and_moves_the_rest(mode):
    teacher = _small_teacher()
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    r = refine(teacher, x0, y, (torch.tensor([-1.0]), torch.tensor([1.0])),
               RefineSettings(iterations=5, eps=0.5, lr=0.25 if mode != "sgd" else 50.0, mask_mode=mode))
    crit = (r.masks == 0).expand_as(x0)
    assert crit.any() and torch.equal(r.images[crit], x0[crit])
    assert not torch.equal(r.images[~crit], x0[~crit])


def test_mask_on_the_gradient_before_adam_is_a_binary_mask_on_the_first_step():
    # Adam's first step is lr * g / (|g| + eps) per element: scaling g by M > 0 does not change it
    teacher = _small_teacher()
    x0 = torch.rand(4, 1, 8, 8) * 0.2 - 0.1
    y = torch.tensor([0, 1, 2, 0])
    lo, hi = torch.tensor([-5.0]), torch.tensor([5.0])
    kw = dict(iterations=1, lr=0.01, adam_eps=1e-20)
    grad = refine(teacher, x0, y, (lo, hi), RefineSettings(mask_mode="grad", **kw))
    step = refine(teacher, x0, y, (lo, hi), RefineSettings(mask_mode="step", **kw))
    dg, ds = (grad.images - x0).abs(), (step.images - x0).abs()
    moved = (grad.masks > 0).expand_as(dg) & (dg > 0)           # (a zero gradient moves nothing either way)
    assert moved.float().mean() > 0.3
    torch.testing.assert_close(dg[moved], torch.full_like(dg[moved], 0.01), rtol=1e-4, atol=1e-7)
    m = grad.masks.expand_as(ds)[moved]
    torch.testing.assert_close(ds[moved], 0.01 * m, rtol=1e-4, atol=1e-7)          # "step": lr * M
    assert torch.equal(dg[(grad.masks == 0).expand_as(dg)], torch.zeros_like(dg[(grad.masks == 0).expand_as(dg)]))


def test_mask_refresh_every_k_steps_by_hand():
    # masked gradient descent (a_bn 0: L = CE), two steps; mask_every 1 recomputes M from the CAM of the current
    # images before the second step, mask_every 0 keeps the first step's M
    teacher = _small_teacher()
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    y = torch.tensor([0, 1, 2])
    lo, hi, lr, eps = -1.0, 1.0, 40.0, 0.5

    def mask(x):
        with torch.no_grad():
            return nrr_mask(class_activation_map(teacher, x, y).float(), eps)

    def grad(x):
        x = x.clone().requires_grad_(True)
        F.cross_entropy(teacher(x), y).backward()
        return x.grad

    def by_hand(refresh):
        x, m = x0.clone(), mask(x0)
        for it in range(2):
            if refresh and it:
                m = mask(x)
            x = (x - lr * 0.5 * (1 + math.cos(math.pi * it / 2)) * m * grad(x)).clamp(lo, hi)
        return x, m

    for every in (0, 1):
        got = refine(teacher, x0, y, (torch.tensor([lo]), torch.tensor([hi])),
                     RefineSettings(iterations=2, eps=eps, lr=lr, a_bn=0.0, mask_mode="sgd", mask_every=every))
        want, m = by_hand(refresh=every == 1)
        torch.testing.assert_close(got.images, want)
        torch.testing.assert_close(got.masks, m)
    assert not torch.equal(by_hand(True)[1], by_hand(False)[1])          # the refresh changed the mask


def test_unknown_mask_mode_is_refused():
    with pytest.raises(ValueError, match="mask_mode"):
        refine(_small_teacher(), torch.zeros(1, 1, 8, 8), torch.tensor([0]), (torch.tensor([-1.0]),
               torch.tensor([1.0])), RefineSettings(iterations=1, mask_mode="gradient"))


# --- student recipe ----------------------------------------------------------------------------------------
def test_rded_recipe_mixes_per_batch_with_a_permutation_and_keeps_the_views():
    n, b = 23, 5
    per_sample = epoch_augment(4, 2, n, 16, 1, 1.0)
    per_batch = epoch_augment(4, 2, n, 16, 1, 1.0, mix_batch=b)
    for f in ("boxes", "flip", "perms"):                               # crops, flips, patch orders unchanged
        assert torch.equal(getattr(per_sample, f), getattr(per_batch, f))
    order = epoch_order(4, 2, n)
    lams = []
    for s in range(0, n, b):
        batch = torch.from_numpy(order[s:s + b])
        assert len(set(per_batch.lam[batch].tolist())) == 1            # one ratio per batch
        assert len({tuple(c) for c in per_batch.cut[batch].tolist()}) == 1   # one box per batch
        assert sorted(per_batch.partner[batch].tolist()) == sorted(batch.tolist())   # a permutation of it
        lams.append(float(per_batch.lam[batch[0]]))
    assert len(set(lams)) > 1


def test_rded_schedule_by_hand():
    f = _rded_schedule(epochs=4, steps_per_epoch=3)
    got = [f(t) for t in range(12)] + [f(12)]
    expect = [1.0] * 3 + [0.5 * (1 + math.cos(math.pi / 8))] * 3 + [0.5 * (1 + math.cos(math.pi / 4))] * 3 \
        + [0.5 * (1 + math.cos(3 * math.pi / 8))] * 3 + [0.5]
    assert got == pytest.approx(expect)


def test_rded_recipe_trains_and_differs_from_the_default():
    torch.manual_seed(0)
    images, labels = torch.randn(12, 1, 8, 8), torch.arange(3).repeat_interleave(4)

    def run(recipe):
        torch.manual_seed(0)
        s = ConvNet(num_classes=3, depth=2, width=8, channels=1, im_size=8)
        return train_student(s, images, labels, StudentSettings(mode="hard", epochs=2, batch_size=4, seed=0,
                                                                factor=1, recipe=recipe))

    a, b = run("nrrdd"), run("rded")
    assert not torch.equal(a.classifier.weight, b.classifier.weight)
    with pytest.raises(ValueError, match="recipe"):
        run("sre2l")


# --- DBR -----------------------------------------------------------------------------------------------------
def _dbr_case():
    torch.manual_seed(1)
    z = torch.randn(6, 5, requires_grad=True)
    yo, ya = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1, 2, 3, 4, 0, 0])
    lam = torch.rand(6)
    to, ta = torch.rand(6) * 2, torch.rand(6) * 2
    return z, yo, ya, lam, to, ta


@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_decoupled_dbr_at_one_temperature_is_methods_loss(distance):
    z, yo, ya, lam, to, ta = _dbr_case()
    a = dbr_loss_decoupled(z, yo, ya, lam, to, ta, alpha=0.7, temperature=2.0, sce_temperature=2.0,
                           distance=distance)
    b = dbr_loss_reference(z, yo, ya, lam, to, ta, alpha=0.7, temperature=2.0, distance=distance)
    torch.testing.assert_close(a, b)


def test_decoupled_dbr_by_hand():
    # two classes, logits (0, 0) -> p = 1/2 at any temperature; (2, 0) at T 2 -> softmax(1, 0)
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    yo, ya, lam = torch.tensor([0, 0]), torch.tensor([1, 0]), torch.tensor([0.25, 1.0])
    to, ta = torch.tensor([0.0, 0.0]), torch.tensor([0.0, 3.0])
    got = dbr_loss_decoupled(z, yo, ya, lam, to, ta, alpha=1.0, temperature=2.0, sce_temperature=1.0,
                             distance="smooth-l1", reduction="none")
    ln2 = math.log(2)
    d1 = math.log(1 + math.exp(-1.0))                  # -log softmax((1, 0))[0] at T 2
    sce1 = math.log(1 + math.exp(-2.0))                # -log softmax((2, 0))[0] at T 1
    huber = lambda e: 0.5 * e * e if abs(e) < 1 else abs(e) - 0.5   # noqa: E731
    expect = [ln2 + 2 * huber(ln2), sce1 + huber(d1) + huber(d1 - 3.0)]
    torch.testing.assert_close(got, torch.tensor(expect))


def test_dbr_criterion_uses_the_kernel_only_for_methods_loss():
    from nrrdd.kernels import DBRLoss

    assert isinstance(dbr_criterion(1.0, 1.0, "l1", None, "mean"), DBRLoss)
    z, yo, ya, lam, to, ta = _dbr_case()
    f = dbr_criterion(1.0, 1.0, "smooth-l1", None, "mean")
    torch.testing.assert_close(f(z, yo, ya, lam, to, ta),
                               dbr_loss_decoupled(z, yo, ya, lam, to, ta, alpha=1.0, temperature=1.0,
                                                  sce_temperature=1.0, distance="smooth-l1"))
    with pytest.raises(ValueError, match="distance"):
        dbr_criterion(1.0, 1.0, "cosine", None, "mean")


# --- teacher recipe ------------------------------------------------------------------------------------------
def test_teacher_weight_decay_is_applied():
    data = TensorImageSet((torch.rand(40, 1, 8, 8) * 255).to(torch.uint8), torch.arange(4).repeat(10),
                          ["a", "b", "c", "d"])

    def norm(wd):
        torch.manual_seed(0)
        m = ConvNet(num_classes=4, depth=2, width=8, channels=1, im_size=8)
        train_teacher(m, data, Normalizer((0.5,), (0.5,)),
                      TeacherSettings(epochs=2, lr=0.1, batch_size=10, seed=0, weight_decay=wd),
                      Runtime(loader="torch", show_progress=False))
        return float(m.classifier.weight.detach().norm())

    assert norm(0.5) < norm(0.0)


def test_teacher_lr_and_batch_size_reach_the_optimiser():
    cfg = RunConfig(teacher_lr=0.2, teacher_batch_size=16, teacher_epochs=2)
    st = TeacherSettings.of(cfg)
    assert (st.lr, st.batch_size, st.epochs) == (0.2, 16, 2)
    data = TensorImageSet((torch.rand(40, 1, 8, 8) * 255).to(torch.uint8), torch.arange(4).repeat(10),
                          ["a", "b", "c", "d"])

    def train(lr):
        torch.manual_seed(0)
        m = ConvNet(num_classes=4, depth=2, width=8, channels=1, im_size=8)
        before = [p.detach().clone() for p in m.parameters()]
        sizes = []
        m.register_forward_pre_hook(lambda mod, args: sizes.append(len(args[0])))
        train_teacher(m, data, Normalizer((0.5,), (0.5,)), TeacherSettings(epochs=2, lr=lr, batch_size=16, seed=0),
                      Runtime(loader="torch", show_progress=False))
        return sizes, all(torch.equal(a, b) for a, b in zip(before, m.parameters()))

    sizes, unchanged = train(0.0)
    assert sizes == [16, 16, 8] * 2                                 # 40 images in batches of 16, two epochs
    assert unchanged                                                # lr 0: SGD moves no weight
    assert not train(0.1)[1]


# --- DD-Ranking ----------------------------------------------------------------------------------------------
def test_dd_ranking_by_hand():
    runs = [dict(ipc=10, seed=s, method=m, labels=lab, epochs=300, test_top1=v)
            for s, m, lab, v in [(0, "random", "online", 80.0), (1, "random", "online", 82.0),
                                 (0, "nrrdd", "online", 84.0), (1, "nrrdd", "online", 85.0),
                                 (0, "nrrdd", "hard", 60.0), (1, "nrrdd", "hard", 62.0),
                                 (0, "random", "hard", 70.0)]]
    md = dd_ranking(runs, 93.0, rows=["random:online", "nrrdd:online", "nrrdd:hard"], epochs=300)
    lines = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in md.splitlines()
             if line.startswith("| nrrdd") or line.startswith("| random")}
    # IOR: 84.5 - 81.0; HLR: 93 - 61
    # HLR is per method: on its hard-label row only
    assert lines[("nrrdd", "online")].endswith("| +3.5 |  |")
    assert lines[("nrrdd", "hard")].endswith("| -9.0 | 32.0 |")        # 61 - 70
    assert lines[("random", "online")].endswith("| +0.0 |  |")
    assert "HLR from 93.00: the teacher" in md
    md = dd_ranking(runs, None, rows=["nrrdd:hard"], epochs=300)
    assert "| nrrdd | hard | -9.0 | - |" in md and "HLR unknown" in md
    # no hard-label rows: no HLR columns
    soft = [r for r in runs if r["labels"] != "hard"]
    md = dd_ranking(soft, 93.0, rows=["random:online", "nrrdd:online"], epochs=300)
    assert "HLR" not in md and "| method | labels | IPC 10 IOR |" in md and "| nrrdd | online | +3.5 |" in md


def test_full_hard_top1_is_the_teachers_accuracy_for_the_same_architecture(tmp_path):
    (tmp_path / "teacher.pt").write_bytes(b"")
    (tmp_path / "teacher.json").write_text(json.dumps({"arch": "conv3", "arch_kwargs": {}, "test_top1": 92.7}))
    cfg = RunConfig(teacher=str(tmp_path / "teacher.pt"))
    assert full_hard_top1(cfg) == 92.7
    assert full_hard_top1(cfg.replace(student="conv4")) is None


def test_flags_with_a_few_valid_words_are_checked_when_parsed(capsys):
    from nrrdd.cli import main

    with pytest.raises(SystemExit) as e:
        main(["show-config", "--recipe", "rdd"])
    assert e.value.code == 2 and "invalid choice: 'rdd'" in capsys.readouterr().err
    assert main(["show-config", "--recipe", "rded", "--dbr-sce-temperature", "none", "--nrr-mask-mode", "grad"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["recipe"], cfg["dbr_sce_temperature"], cfg["nrr_mask_mode"]) == ("rded", None, "grad")


def test_teacher_flip_is_on_but_for_mnist_unless_asked():
    from nrrdd.config import RunConfig

    assert TeacherSettings.of(RunConfig(dataset="fashion-mnist")).flip is True
    assert TeacherSettings.of(RunConfig(dataset="mnist")).flip is False
    assert TeacherSettings.of(RunConfig(dataset="mnist", teacher_flip=True)).flip is True
    assert TeacherSettings.of(RunConfig(dataset="cifar10", teacher_flip=False)).flip is False
