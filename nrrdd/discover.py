"""Stage 1: pick real patches and stitch them into initial synthetic images.

- ``random``: ``ipc * factor**2`` random real images per class, each whole image one patch.
- ``rded``  (RDED): per image the crop of lowest teacher cross-entropy among ``num_crop`` random-resized
  crops; per class the ``ipc * factor**2`` most confident.
- ``nrrdd`` (CIDD): per image the crop with the highest CAM ratio (CAM mass inside the box / whole image);
  per class the ``ipc * factor**2`` *least* confident of those ("high CAM ratio, low confidence").
- ``sre2l`` (SRe2L): no real image and no teacher: ``ipc`` whole images per class of standard Gaussian noise
  in normalised space, drawn from ``rng(seed, STREAM_NOISE, class)`` and clamped to the valid pixel range;
  stage 2 then synthesises them (unmasked, with jitter and flip).

Candidates stream through in batches and only (score, image, box) is kept per candidate, so memory stays
flat as ``mipc`` grows; the chosen patches are cut again at the end.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from .augment import (STREAM_DISCOVER, STREAM_NOISE, STREAM_SELECT, crop_resize, pad_to, random_resized_boxes, rng,
                      stitch)
from .cam import class_activation_map
from .data import ImageSet, Normalizer
from .runtime import autocast, progress


@dataclass
class Discovery:
    images: torch.Tensor            # [n_classes * ipc, C, S, S] float32 pixel values in [0, 1]
    labels: torch.Tensor            # [n_classes * ipc] int64
    sources: list[dict] = field(default_factory=list)  # per patch: class, image index, box, score


def candidate_boxes(seed: int, image_index: int, num_crop: int, size: int, scale) -> np.ndarray:
    """The ``num_crop`` square crop boxes of one candidate image: a function of (seed, image index) only."""
    return random_resized_boxes(rng(seed, STREAM_DISCOVER, image_index), num_crop, size, size, scale=scale)


def cam_ratio(cam: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """CAM mass inside each box / CAM mass of the whole image.

    cam [B, H, W] (>= 0); boxes [B, K, 4] (top, left, h, w) -> [B, K]. Uses an integral image.
    """
    B, H, W = cam.shape
    ii = torch.zeros(B, H + 1, W + 1, dtype=torch.float64, device=cam.device)
    ii[:, 1:, 1:] = cam.double().cumsum(1).cumsum(2)
    t, l, h, w = (boxes[..., i].long().to(cam.device) for i in range(4))
    b = torch.arange(B, device=cam.device)[:, None]
    mass = ii[b, t + h, l + w] - ii[b, t, l + w] - ii[b, t + h, l] + ii[b, t, l]
    total = ii[:, H, W][:, None]
    return (mass / total.clamp_min(1e-12)).float()


def _class_candidates(train: ImageSet, c: int, mipc: int, seed: int) -> torch.Tensor:
    members = train.class_indices(c)
    order = rng(seed, STREAM_SELECT, c).permutation(len(members))
    return members[torch.from_numpy(order[:mipc])]


@torch.no_grad()
def score_candidates(method: str, teacher: nn.Module, x: torch.Tensor, c: int, boxes: torch.Tensor, factor: int,
                     cam: str = "auto", precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Score one batch of candidate images of class ``c``.

    x [b, C, S, S] normalised; boxes [b, K, 4]. Returns (kept crop per image [b], score [b]); lower score
    is preferred by RDED (cross-entropy), CIDD keeps the lowest confidence (softmax probability).
    """
    b, K = boxes.shape[:2]
    S = x.shape[-1]
    s = S // factor
    y = torch.full((b,), c, dtype=torch.long, device=x.device)
    if method == "rded":
        patches = crop_resize(x.repeat_interleave(K, 0), boxes.reshape(b * K, 4), s)
        with autocast(x.device, precision):
            logits = teacher(pad_to(patches, S)).float()
        ce = -logits.log_softmax(1)[:, c].view(b, K)
        score, best = ce.min(1)
        return best, score
    if method == "nrrdd":
        with autocast(x.device, precision):
            cmap = class_activation_map(teacher, x, y, method=cam)
        best = cam_ratio(cmap, boxes).argmax(1)
        kept = boxes[torch.arange(b), best.cpu()]
        patches = crop_resize(x, kept, s)
        with autocast(x.device, precision):
            logits = teacher(pad_to(patches, S)).float()
        return best, logits.softmax(1)[:, c]
    raise ValueError(f"unknown discovery method {method!r}")


def noise_init(n_classes: int, ipc: int, channels: int, size: int, seed: int, normalizer: Normalizer) -> Discovery:
    """SRe2L's starting point: N(0, 1) noise in normalised space, ``ipc`` images per class, class c drawn from
    ``rng(seed, STREAM_NOISE, c)`` (so a class's images do not depend on the number of classes), clamped
    to the images of pixel values 0 and 1 and returned in pixel units like every :class:`Discovery`."""
    lo, hi = normalizer.lo.view(1, -1, 1, 1), normalizer.hi.view(1, -1, 1, 1)
    images, sources = [], []
    for c in range(n_classes):
        z = torch.from_numpy(rng(seed, STREAM_NOISE, c).standard_normal((ipc, channels, size, size))).float()
        images.append(normalizer.inverse(torch.maximum(torch.minimum(z, hi), lo)).clamp_(0, 1))
        sources += [{"class": c, "init": "gaussian noise", "slot": [i, 0]} for i in range(ipc)]
    labels = torch.arange(n_classes).repeat_interleave(ipc)
    return Discovery(torch.cat(images), labels, sources)


def discover(method: str, teacher: nn.Module | None, train: ImageSet, normalizer: Normalizer, *, ipc: int,
             mipc: int, num_crop: int, factor: int, seed: int, crop_scale=(0.08, 1.0), cam: str = "auto",
             keep: str = "low", batch_size: int = 256, device: torch.device | str = "cpu",
             precision: str = "fp32", show_progress: bool = True) -> Discovery:
    """Run stage 1 for every class; returns stitched images in pixel units (see :class:`Discovery`)."""
    if method == "sre2l":
        return noise_init(len(train.classes), ipc, train.channels, train.size, seed, normalizer)
    S = train.size
    s = S // factor
    n_patch = ipc * factor * factor
    if method != "random" and teacher is None:
        raise ValueError(f"method {method!r} needs a teacher")
    images, labels, sources = [], [], []
    n_classes = len(train.classes)
    for c in progress(range(n_classes), desc=f"discover[{method}]", enable=show_progress):
        cand = _class_candidates(train, c, mipc, seed)
        if len(cand) < n_patch:
            raise ValueError(f"class {c} ({train.classes[c]!r}) has {len(cand)} candidate images (mipc={mipc}) "
                             f"but {n_patch} patches are needed (ipc={ipc}, factor={factor})")
        if method == "random":
            chosen = cand[:n_patch]
            boxes = torch.tensor([[0, 0, S, S]] * n_patch)
            scores = torch.full((n_patch,), float("nan"))
        else:
            all_boxes, all_scores = [], []
            for start in range(0, len(cand), batch_size):
                idx = cand[start:start + batch_size]
                b = torch.from_numpy(np.stack([candidate_boxes(seed, int(i), num_crop, S, crop_scale)
                                               for i in idx.tolist()]))
                x = normalizer(train.load(idx).to(device))
                best, score = score_candidates(method, teacher, x, c, b, factor, cam, precision)
                all_boxes.append(b[torch.arange(len(idx)), best.cpu()])
                all_scores.append(score.float().cpu())
            sc = torch.cat(all_scores)
            bx = torch.cat(all_boxes)
            descending = method == "nrrdd" and keep == "high"
            order = torch.sort(sc, descending=descending, stable=True).indices[:n_patch]
            chosen, boxes, scores = cand[order], bx[order], sc[order]
        patches = crop_resize(train.load(chosen), boxes, s)             # pixel units, [n_patch, C, s, s]
        images.append(stitch(patches, factor, S).clamp_(0, 1))
        labels.append(torch.full((ipc,), c, dtype=torch.long))
        for k in range(n_patch):
            sources.append({"class": c, "image": int(chosen[k]), "box": boxes[k].tolist(),
                            "score": float(scores[k]), "slot": [k % ipc, k // ipc]})
    return Discovery(torch.cat(images), torch.cat(labels), sources)
