"""Stage 1 selection rules on a toy teacher whose confidence is known in closed form."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nrrdd.config import RunConfig
from nrrdd.data import Normalizer, TensorImageSet
from nrrdd.discover import DiscoverSettings, cam_ratio, discover


class BrightnessTeacher(nn.Module):
    """logit_0 = 8 * mean(relu(x)), logit_1 = 0: p(class 0) = sigmoid(8 * brightness). GAP + linear head,
    so it has an exact CAM."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.fc.weight.copy_(torch.tensor([[8.0], [0.0]]))

    def forward(self, x):
        return self.fc(self.avgpool(F.relu(self.conv(x))).flatten(1))


def _constant_images():
    values = torch.tensor([120, 10, 200, 60, 250, 30, 90, 160, 20, 220], dtype=torch.uint8)
    imgs = values.view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    images = torch.cat([imgs, imgs])
    labels = torch.cat([torch.zeros(10), torch.ones(10)]).long()
    return TensorImageSet(images, labels, ["zero", "one"]), values


@pytest.mark.parametrize("method,expect", [("nrrdd", [10, 20, 30]), ("rded", [250, 220, 200])])
def test_cidd_keeps_least_confident_rded_most_confident(method, expect):
    data, values = _constant_images()
    d = discover(BrightnessTeacher().eval(), data, Normalizer((0.0,), (1.0,)),
                 DiscoverSettings(method=method, ipc=3, mipc=10, num_crop=3, factor=1, seed=0))
    picked = [round(float(d.images[i].mean()) * 255) for i in range(3)]
    assert d.labels[:3].tolist() == [0, 0, 0]
    assert sorted(picked) == sorted(expect)
    # ranked: RDED's best (most confident) first, CIDD's least confident first
    assert picked == expect


def test_cidd_keep_high_is_rdeds_rule():
    data, _ = _constant_images()
    d = discover(BrightnessTeacher().eval(), data, Normalizer((0.0,), (1.0,)),
                 DiscoverSettings(method="nrrdd", ipc=2, mipc=10, num_crop=2, factor=1, seed=0, keep="high"))
    assert [round(float(d.images[i].mean()) * 255) for i in range(2)] == [250, 220]


def test_random_uses_whole_images_and_is_seeded():
    data, _ = _constant_images()
    a = discover(None, data, Normalizer((0.0,), (1.0,)),
                 DiscoverSettings(method="random", ipc=2, mipc=10, num_crop=1, factor=1, seed=3))
    b = discover(None, data, Normalizer((0.0,), (1.0,)),
                 DiscoverSettings(method="random", ipc=2, mipc=10, num_crop=1, factor=1, seed=3))
    assert torch.equal(a.images, b.images) and a.images.shape == (4, 1, 8, 8)
    assert all(s["box"] == [0, 0, 8, 8] for s in a.sources)


def test_cam_ratio_counts_mass_inside_the_box():
    cam = torch.zeros(1, 4, 4)
    cam[0, 0, 0] = 3.0
    cam[0, 3, 3] = 1.0
    boxes = torch.tensor([[[0, 0, 2, 2], [2, 2, 2, 2], [0, 0, 4, 4]]])
    torch.testing.assert_close(cam_ratio(cam, boxes), torch.tensor([[0.75, 0.25, 1.0]]))


def test_too_few_candidates_is_a_clear_error():
    data, _ = _constant_images()
    with pytest.raises(ValueError, match="candidate images"):
        discover(BrightnessTeacher().eval(), data, Normalizer((0.0,), (1.0,)),
                 DiscoverSettings(method="rded", ipc=4, mipc=3, num_crop=1, factor=1, seed=0))


def test_assembling_some_rows_gives_exactly_those_rows_of_the_whole_set():
    """A process under torchrun assembles only the images of its refinement batches: each must be the same
    bits as in the whole set (crops are cut again from their images; factor 2, so 4 patches per image)."""
    from nrrdd.discover import assemble, select

    g = torch.Generator().manual_seed(0)
    images = (torch.rand(40, 1, 16, 16, generator=g) * 255).to(torch.uint8)
    data = TensorImageSet(images, torch.arange(40) % 2, ["zero", "one"])
    kw = dict(ipc=3, mipc=20, num_crop=3, factor=2, seed=0)
    norm = Normalizer((0.5,), (0.25,))
    sel = select(BrightnessTeacher().eval(), data, norm, DiscoverSettings(method="rded", **kw))
    assert sel.images is None and len(sel.sources) == 2 * 3 * 4
    settings = DiscoverSettings(method="rded", **kw)
    whole = assemble(sel, data, norm, settings)
    part = assemble(sel, data, norm, settings, rows=torch.tensor([4, 1]))
    assert whole.rows is None and part.rows.tolist() == [4, 1]
    assert torch.equal(part.images[[4, 1]], whole.images[[4, 1]])
    assert torch.equal(whole.images, discover(BrightnessTeacher().eval(), data, norm,
                                              DiscoverSettings(method="rded", **kw)).images)


def test_cidd_keep_auto_is_high_at_ipc_1_and_low_above():
    for ipc, rule in ((1, "high"), (2, "low"), (10, "low"), (50, "low")):
        cfg = RunConfig(ipc=ipc)
        assert cfg.cidd_keep == "auto" and cfg.resolved_cidd_keep() == rule
        assert DiscoverSettings.of(cfg, factor=1, size=28).keep == rule
    for rule in ("low", "high"):                    # given, it is used at every IPC
        assert RunConfig(ipc=1, cidd_keep=rule).resolved_cidd_keep() == rule
        assert DiscoverSettings.of(RunConfig(ipc=10, cidd_keep=rule), factor=1, size=28).keep == rule
