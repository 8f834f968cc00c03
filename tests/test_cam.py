"""CAM against hand computations (METHOD.md, "CAM")."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from nrrdd.cam import cam_kind, class_activation_map, minmax_normalize, nrr_mask
from nrrdd.models import ConvNet


class GapNet(nn.Module):
    """conv -> ReLU -> global average pool -> linear, named like torchvision's ResNet head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=1, bias=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(self.avgpool(F.relu(self.conv(x))).flatten(1))


def test_gap_linear_cam_matches_hand_computation():
    net = GapNet().eval()
    with torch.no_grad():
        net.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        net.fc.weight.copy_(torch.tensor([[2.0, 0.5], [-1.0, 3.0], [0.0, 0.0]]))
        net.fc.bias.zero_()
    x = torch.tensor([[1.0, -2.0], [3.0, 0.0]]).view(1, 1, 2, 2)
    # feature maps: F0 = relu(x), F1 = relu(-x)
    f0 = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    f1 = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    for y, (w0, w1) in enumerate([(2.0, 0.5), (-1.0, 3.0)]):
        expect = torch.relu(w0 * f0 + w1 * f1)
        got = class_activation_map(net, x, torch.tensor([y]))
        assert cam_kind(net) == "gap_linear"
        torch.testing.assert_close(got[0], expect)


def test_flatten_linear_cam_is_exact_for_the_convnet_head():
    torch.manual_seed(0)
    net = ConvNet(num_classes=4, depth=1, width=3, channels=1, im_size=4).eval()
    x = torch.randn(2, 1, 4, 4)
    y = torch.tensor([1, 3])
    with torch.no_grad():
        f = net.features(x)                      # [2, 3, 2, 2]
        w = net.classifier.weight[y].view(f.shape)
        hand = (w * f).sum(1)                    # [2, 2, 2], before ReLU
        logits = net(x)
    # summing the pre-ReLU map over positions gives the logit minus the bias: the map is exact
    torch.testing.assert_close(hand.sum((1, 2)), logits.gather(1, y[:, None])[:, 0] - net.classifier.bias[y])
    got = class_activation_map(net, x, y)
    expect = F.interpolate(torch.relu(hand)[:, None], size=(4, 4), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(got, expect)


def test_gradcam_fallback_on_a_model_without_a_cam_head():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1, bias=False)
            self.head = nn.Linear(2 * 2 * 2, 2)

        def forward(self, x):
            return self.head(self.conv(x).flatten(1))

    torch.manual_seed(1)
    net = Plain().eval()
    x = torch.randn(1, 1, 2, 2)
    assert cam_kind(net) == "gradcam"
    got = class_activation_map(net, x, torch.tensor([0]))
    # Grad-CAM by hand: d logit_0 / d F_k[h, w] = W[0, k, h, w]; weights = spatial mean; relu(sum_k a_k F_k)
    with torch.no_grad():
        f = net.conv(x)[0]
        a = net.head.weight[0].view(2, 2, 2).mean((1, 2))
        expect = torch.relu((a.view(2, 1, 1) * f).sum(0))
    torch.testing.assert_close(got[0], expect)
    assert all(p.grad is None for p in net.parameters())


def test_mask_is_zero_on_critical_pixels_and_soft_elsewhere():
    cam = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    c = minmax_normalize(cam)
    torch.testing.assert_close(c, torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]))
    m = nrr_mask(cam, eps=0.5)
    assert m.shape == (1, 1, 2, 2)
    torch.testing.assert_close(m[0, 0], torch.tensor([[0.5, 0.25], [0.0, 0.0]]))
