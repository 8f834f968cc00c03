"""Class activation maps (METHOD.md, "CAM").

- GAP + linear head (torchvision ResNets): CAM_y = ReLU(sum_k W[y, k] F_k), Zhou et al. 2016.
- Linear head on the flattened map (RDED's ConvNet): CAM_y[h, w] = ReLU(sum_k W[y, k, h, w] F[k, h, w]),
  exact for that head: summing it over (h, w) (before the ReLU) gives the logit minus the bias.
- Anything else: Grad-CAM on the output of the last Conv2d.
Maps are upsampled bilinearly to the input size.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models import ConvNet


def _gap_linear_head(model: nn.Module):
    """(feature module whose *input* is the last map, linear head) for GAP + linear classifiers."""
    pool, fc = getattr(model, "avgpool", None), getattr(model, "fc", None)
    if isinstance(pool, nn.AdaptiveAvgPool2d) and isinstance(fc, nn.Linear) and pool.output_size in (1, (1, 1)):
        return pool, fc
    return None


def cam_kind(model: nn.Module, method: str = "auto") -> str:
    if method == "gradcam":
        return "gradcam"
    if isinstance(model, ConvNet):
        return "flatten_linear"
    if _gap_linear_head(model) is not None:
        return "gap_linear"
    if method == "cam":
        raise ValueError(f"original CAM needs a GAP+linear or flatten+linear head; {type(model).__name__} has "
                         "neither (use cam='gradcam' or 'auto')")
    return "gradcam"


def _last_conv(model: nn.Module) -> nn.Module:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer: Grad-CAM needs one")
    return convs[-1]


def require_cam(model: nn.Module, method: str = "auto") -> str:
    """The kind of CAM ``model`` gets (flatten_linear | gap_linear | gradcam); raises ValueError naming what
    is missing when it can have none (Grad-CAM without any Conv2d layer)."""
    kind = cam_kind(model, method)
    if kind == "gradcam":
        _last_conv(model)
    return kind


def class_activation_map(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str = "auto",
                         size: tuple[int, int] | None = None) -> torch.Tensor:
    """CAM of ``model`` for classes ``y`` on images ``x`` [B, C, H, W]; returns [B, H, W] (>= 0, raw scale).

    The model should be in eval mode; no parameter gradients are produced.
    """
    size = size or tuple(x.shape[-2:])
    kind = cam_kind(model, method)
    y = y.to(x.device).long()
    if kind == "flatten_linear":
        with torch.no_grad():
            f = model.features(x).float()                                  # [B, K, h, w]
            w = model.classifier.weight.float()[y].view(f.shape)           # [B, K, h, w]
            cam = (w * f).sum(1)
    elif kind == "gap_linear":
        pool, fc = _gap_linear_head(model)
        feats = []
        handle = pool.register_forward_hook(lambda m, inp, out: feats.append(inp[0]))
        try:
            with torch.no_grad():
                model(x)
        finally:
            handle.remove()
        f = feats[-1].float()
        cam = torch.einsum("bk,bkhw->bhw", fc.weight.float()[y], f)
    else:
        cam = _grad_cam(model, x, y)
    cam = F.relu(cam)
    return F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].clamp_min_(0)


def _grad_cam(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    layer = _last_conv(model)
    store = {}

    def hook(m, inp, out):
        out.retain_grad()
        store["f"] = out

    handle = layer.register_forward_hook(hook)
    req = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.enable_grad():
            xi = x.detach().requires_grad_(True)     # gives the graph a leaf when parameters are frozen
            logits = model(xi)
            if logits.shape[-1] <= int(y.max()):
                raise ValueError(f"model has {logits.shape[-1]} outputs, class {int(y.max())} requested")
            score = logits.gather(1, y[:, None]).sum()
            g, = torch.autograd.grad(score, store["f"])
    finally:
        handle.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    f = store["f"].detach().float()
    weights = g.float().mean(dim=(2, 3), keepdim=True)
    return (weights * f).sum(1)


def minmax_normalize(cam: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per image, map [min, max] to [0, 1]; a constant map becomes all zeros. [B, H, W] -> [B, H, W]."""
    flat = cam.flatten(1)
    lo = flat.min(1).values.view(-1, 1, 1)
    hi = flat.max(1).values.view(-1, 1, 1)
    return (cam - lo) / (hi - lo).clamp_min(eps)


def nrr_mask(cam: torch.Tensor, eps: float) -> torch.Tensor:
    """Soft mask M = max(0, eps - C) on the min-max normalised CAM; [B, H, W] -> [B, 1, H, W].

    Pixels with C >= eps (critical) get exactly 0 and never change under the masked update.
    """
    return (eps - minmax_normalize(cam)).clamp_min(0)[:, None].contiguous()
