"""Stage 2: the mask keeps critical pixels exactly, bounds hold, L_bn is SRe2L's."""
import pytest
import torch
import torch.nn as nn

from nrrdd.models import ConvNet
from nrrdd.refine import BNStatLoss, NonFiniteError, RefineSettings, refine


def _teacher():
    torch.manual_seed(0)
    t = ConvNet(num_classes=3, depth=2, width=8, channels=1, im_size=8)
    t.train()
    with torch.no_grad():                       # give BN non-trivial running statistics
        for _ in range(3):
            t(torch.randn(16, 1, 8, 8))
    return t.eval()


def test_critical_pixels_are_bit_identical_and_bounds_hold():
    teacher = _teacher()
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1                 # inside [lo, hi] = [-1, 1]
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    lo, hi = torch.tensor([-1.0]), torch.tensor([1.0])
    r = refine(teacher, x0, y, (lo, hi), RefineSettings(iterations=30, eps=0.5, lr=0.25, batch_size=4))
    crit = (r.masks == 0).expand_as(x0)
    assert crit.any() and (~crit).any()
    assert torch.equal(r.images[crit], x0[crit])        # exactly unchanged
    assert not torch.equal(r.images[~crit], x0[~crit])  # the rest moved
    assert r.images.min() >= -1 and r.images.max() <= 1
    assert r.masks.max() <= 0.5 and r.masks.min() == 0


def test_unmasked_refinement_lowers_the_loss():
    teacher = _teacher()
    x0 = torch.rand(3, 1, 8, 8)
    y = torch.tensor([0, 1, 2])
    lo, hi = torch.tensor([-3.0]), torch.tensor([3.0])
    ce0 = nn.functional.cross_entropy(teacher(x0), y)
    r = refine(teacher, x0, y, (lo, hi), RefineSettings(iterations=40, masked=False, a_bn=0.0))
    assert nn.functional.cross_entropy(teacher(r.images), y) < ce0


def test_bn_loss_matches_hand_computation():
    bn1, bn2 = nn.BatchNorm2d(2), nn.BatchNorm2d(2)
    net = nn.Sequential(bn1, bn2).eval()
    with torch.no_grad():
        bn1.running_mean.copy_(torch.tensor([1.0, 0.0]))
        bn1.running_var.copy_(torch.tensor([2.0, 1.0]))
    x = torch.randn(4, 2, 3, 3)
    loss = BNStatLoss(net, first_multiplier=10.0)
    net(x)
    got = loss.pop()
    x2 = bn1(x)
    expect = 10 * (torch.norm(bn1.running_mean - x.mean((0, 2, 3))) + torch.norm(bn1.running_var - x.var((0, 2, 3), unbiased=False))) \
        + torch.norm(bn2.running_mean - x2.mean((0, 2, 3))) + torch.norm(bn2.running_var - x2.var((0, 2, 3), unbiased=False))
    torch.testing.assert_close(got, expect)
    loss.remove()


def test_teacher_without_batchnorm_warns_and_still_refines():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    x0 = torch.rand(2, 1, 6, 6)
    with pytest.warns(UserWarning, match="no BatchNorm"):
        r = refine(net.eval(), x0, torch.tensor([0, 1]), (torch.tensor([-5.0]), torch.tensor([5.0])),
                   RefineSettings(iterations=2))
    assert r.images.shape == x0.shape


def test_nan_input_stops_with_a_named_error():
    teacher = _teacher()
    x0 = torch.rand(2, 1, 8, 8)
    x0[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="step 0"):
        refine(teacher, x0, torch.tensor([0, 1]), (torch.tensor([-1.0]), torch.tensor([1.0])),
               RefineSettings(iterations=3, masked=False))


def test_refining_into_the_input_gives_the_same_images():
    """``out=images`` (what ``nrrdd distill`` does, so that the set is held once): every batch reads its rows
    before writing them, so the result is the one a separate output gets, bit for bit, in the input's storage."""
    teacher = _teacher()
    torch.manual_seed(1)
    x = torch.randn(23, 1, 8, 8)
    y = torch.arange(23) % 3
    lo, hi = torch.tensor([-2.0]), torch.tensor([2.0])
    settings = RefineSettings(iterations=3, batch_size=5)
    apart = refine(teacher, x.clone(), y, (lo, hi), settings)
    inplace_in = x.clone()
    inplace = refine(teacher, inplace_in, y, (lo, hi), settings, out=inplace_in)
    assert inplace.images is inplace_in
    assert torch.equal(inplace.images, apart.images) and torch.equal(inplace.masks, apart.masks)
    assert not torch.equal(apart.images, x)                 # refinement moved something
    with pytest.raises(ValueError, match="out has shape"):
        refine(teacher, x, y, (lo, hi), settings, out=x[:3])
