"""Models for tests of ``--arch package.module:ClassName``: written as a user would, outside nrrdd.

- ``LeNet``: conv-pool-conv-pool-fc-fc for one-channel 28 px images; no BatchNorm (unless
  ``batch_norm=True``) and no global pooling, so nrrdd falls back to Grad-CAM on its last conv.
- ``MLP``: no convolution at all, usable only by methods that need no CAM.
"""
import torch
import torch.nn as nn


class LeNet(nn.Module):
    def __init__(self, num_classes: int = 10, channels: int = 1, batch_norm: bool = False):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=2), norm(6), nn.ReLU(), nn.MaxPool2d(2),    # 28 -> 14
            nn.Conv2d(6, 16, 5), norm(16), nn.ReLU(), nn.MaxPool2d(2),                     # 14 -> 10 -> 5
        )
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.features(x).flatten(1))))


class MLP(nn.Module):
    def __init__(self, num_classes: int = 10, size: int = 28, channels: int = 1):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, 64), nn.ReLU(),
                                 nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
