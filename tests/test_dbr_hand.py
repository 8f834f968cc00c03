"""The DBR loss the student trains with, against a computation by hand (METHOD.md, stage 3)."""
import math

import torch

from nrrdd.kernels import DBRLoss, dbr_distances


def _nll(row, k, T=1.0):
    z = [v / T for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return lse - z[k]


def test_dbr_loss_by_hand():
    s = [[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]          # student logits
    t = [[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]]           # teacher logits
    y_org, y_aug, lam = [0, 2], [1, 1], [0.7, 0.25]
    alpha = 1.0
    expect = []
    for i in range(2):
        ds_o, ds_a = _nll(s[i], y_org[i]), _nll(s[i], y_aug[i])
        dt_o, dt_a = _nll(t[i], y_org[i]), _nll(t[i], y_aug[i])
        sce = lam[i] * ds_o + (1 - lam[i]) * ds_a
        expect.append(sce + alpha * (abs(ds_o - dt_o) + abs(ds_a - dt_a)))
    yo, ya = torch.tensor(y_org), torch.tensor(y_aug)
    d_org_t, d_aug_t = dbr_distances(torch.tensor(t), yo, ya)
    torch.testing.assert_close(d_org_t, torch.tensor([_nll(t[0], 0), _nll(t[1], 2)]))
    loss = DBRLoss()(torch.tensor(s), yo, ya, torch.tensor(lam), d_org_t, d_aug_t)
    torch.testing.assert_close(loss, torch.tensor(sum(expect) / 2))
    # the l2 variant squares the distance gaps
    l2 = DBRLoss(distance="l2", reduction="none")(torch.tensor(s), yo, ya, torch.tensor(lam), d_org_t, d_aug_t)
    ds_o, ds_a = _nll(s[0], 0), _nll(s[0], 1)
    manual = 0.7 * ds_o + 0.3 * ds_a + (ds_o - _nll(t[0], 0)) ** 2 + (ds_a - _nll(t[0], 1)) ** 2
    torch.testing.assert_close(l2[0], torch.tensor(manual))


def test_dbr_with_alpha_zero_is_cutmix_cross_entropy():
    torch.manual_seed(0)
    z = torch.randn(5, 4)
    yo, ya = torch.randint(0, 4, (5,)), torch.randint(0, 4, (5,))
    lam = torch.rand(5)
    ce = torch.nn.functional.cross_entropy
    expect = (lam * ce(z, yo, reduction="none") + (1 - lam) * ce(z, ya, reduction="none")).mean()
    got = DBRLoss(alpha=0.0)(z, yo, ya, lam, torch.zeros(5), torch.zeros(5))
    torch.testing.assert_close(got, expect)
