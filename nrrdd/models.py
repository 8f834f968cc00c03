"""Model registry. The CLI and configs name models; weights come only from local files.

Parameter names follow RDED / SRe2L, so their checkpoints (``{"model": state_dict}``) load unchanged:
RDED's ConvNet keeps ``layers.conv.N``, ``layers.norm.N`` and ``classifier``; ResNets are torchvision's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torchvision

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(fn):
        MODELS[name] = fn
        return fn

    return deco


class ConvNet(nn.Module):
    """RDED's ConvNet: ``depth`` x (conv3x3 width 128, BatchNorm, ReLU, 2x2 avg-pool), then a linear layer
    on the flattened map. A 28 px one-channel input is padded by 3 in the first conv (28 -> 32 px), as in
    RDED/DC, so its feature map is the same as for 32 px inputs."""

    def __init__(self, num_classes: int, depth: int = 3, width: int = 128, channels: int = 3,
                 im_size: int = 32, norm: str = "batch"):
        super().__init__()
        self.depth = depth
        conv, nrm, act, pool = [], [], [], []
        cin = channels
        for d in range(depth):
            conv.append(nn.Conv2d(cin, width, kernel_size=3, padding=3 if channels == 1 and d == 0 else 1))
            if norm == "batch":
                nrm.append(nn.BatchNorm2d(width))
            elif norm == "instance":
                nrm.append(nn.GroupNorm(width, width))
            act.append(nn.ReLU())
            pool.append(nn.AvgPool2d(2, 2))
            cin = width
        self.layers = nn.ModuleDict({"conv": nn.ModuleList(conv), "norm": nn.ModuleList(nrm),
                                     "act": nn.ModuleList(act), "pool": nn.ModuleList(pool)})
        # the padding-3 first conv grows one-channel inputs by 4 px (28 -> 32), so measure the map
        size = im_size + (4 if channels == 1 else 0)
        for _ in range(depth):
            size //= 2
        self.feature_shape = (width, size, size)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, [B, width, h, w]."""
        for d in range(self.depth):
            x = self.layers["conv"][d](x)
            if len(self.layers["norm"]):
                x = self.layers["norm"][d](x)
            x = self.layers["act"][d](x)
            x = self.layers["pool"][d](x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


for _d in (3, 4, 5, 6):
    register(f"conv{_d}")(
        lambda num_classes, channels=3, input_size=32, _d=_d: ConvNet(num_classes, _d, 128, channels, input_size))


def _first_conv_channels(model: nn.Module, channels: int) -> nn.Module:
    if channels != 3 and hasattr(model, "conv1"):
        c = model.conv1
        model.conv1 = nn.Conv2d(channels, c.out_channels, c.kernel_size, c.stride, c.padding, bias=c.bias is not None)
    return model


@register("resnet18_modified")
def resnet18_modified(num_classes: int, channels: int = 3, input_size: int = 32) -> nn.Module:
    """ResNet-18 for small images (RDED/SRe2L): 3x3 stride-1 stem, no max-pool."""
    m = torchvision.models.resnet18(num_classes=num_classes)
    m.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


def build_model(name: str, num_classes: int, channels: int = 3, input_size: int = 224) -> nn.Module:
    """Build a registered model, or any torchvision classifier by its name (random init, no download)."""
    if name in MODELS:
        return MODELS[name](num_classes, channels=channels, input_size=input_size)
    builders = torchvision.models.list_models(module=torchvision.models)
    if name in builders:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        return _first_conv_channels(model, channels)
    raise ValueError(f"unknown model {name!r}; registered: {sorted(MODELS)}; or any torchvision classifier "
                     f"(e.g. resnet18, resnet50, mobilenet_v2)")


def extract_state_dict(obj) -> dict[str, torch.Tensor]:
    """Accept a plain state_dict, RDED/SRe2L's ``{"model": ...}`` or ``{"state_dict": ...}``, with or without
    a ``module.`` prefix (DataParallel / DDP)."""
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("checkpoint holds no state_dict (expected a state_dict or {'model': state_dict})")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def num_outputs(model: nn.Module, channels: int, input_size: int) -> int:
    was = model.training
    model.eval()
    with torch.no_grad():
        p = next(model.parameters())
        out = model(torch.zeros(1, channels, input_size, input_size, device=p.device, dtype=p.dtype))
    model.train(was)
    return out.shape[-1]


def load_model(name: str, path: str | Path, num_classes: int, channels: int, input_size: int) -> nn.Module:
    """Build ``name`` and load weights from a local checkpoint, checking its class count."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"teacher checkpoint {path} does not exist (train one with `nrrdd train-teacher`)")
    sd = extract_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model = build_model(name, num_classes, channels, input_size)
    head = [k for k, v in sd.items() if v.ndim == 2]
    if head:
        out = sd[head[-1]].shape[0]
        if out != num_classes:
            raise ValueError(f"teacher {path} has {out} output classes but the dataset has {num_classes}")
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not fit model {name!r} "
                         f"({channels} channels, {input_size} px, {num_classes} classes): {e}") from e
    return model
