"""Boxes, crops, stitching and the replayable student augmentation.

Replayable means: every random choice the student sees (crop, flip, patch shuffle, CutMix partner,
lam and box) is a pure function of (seed, epoch, sample index). Stored labels (DBR distances, soft
logits) computed by ``relabel`` therefore match what ``train`` feeds the student, whatever the batch
size or the number of processes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

# Streams of randomness, so that e.g. discovery boxes never share draws with training augmentation.
STREAM_DISCOVER, STREAM_AUGMENT, STREAM_ORDER, STREAM_SELECT = 1, 2, 3, 4
STREAM_NOISE, STREAM_JITTER = 5, 6      # SRe2L's noise init (per class) and its per-step jitter/flip


def rng(*key: int) -> np.random.Generator:
    """A generator that depends only on ``key`` (e.g. (seed, stream, epoch))."""
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def random_resized_boxes(g: np.random.Generator, n: int, height: int, width: int,
                         scale=(0.08, 1.0), ratio=(1.0, 1.0), tries: int = 10) -> np.ndarray:
    """torchvision ``RandomResizedCrop.get_params`` for ``n`` crops, vectorised.

    Returns int64 [n, 4] boxes (top, left, h, w). As torchvision: up to ``tries`` draws of (area, aspect
    ratio); the first that fits is used; if none fits, a centre crop with the ratio clamped.
    """
    area = height * width
    s = g.uniform(scale[0], scale[1], size=(n, tries)) * area
    log_r = g.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, tries))
    r = np.exp(log_r)
    w = np.rint(np.sqrt(s * r)).astype(np.int64)
    h = np.rint(np.sqrt(s / r)).astype(np.int64)
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    u_top = g.random(size=(n, tries))
    u_left = g.random(size=(n, tries))
    first = np.where(ok.any(1), ok.argmax(1), -1)
    rows = np.arange(n)
    k = np.maximum(first, 0)
    hh, ww = h[rows, k], w[rows, k]
    top = np.floor(u_top[rows, k] * (height - hh + 1)).astype(np.int64)
    left = np.floor(u_left[rows, k] * (width - ww + 1)).astype(np.int64)
    # fallback: centre crop, ratio clamped to the allowed range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fh, fw = height, int(round(height * ratio[1]))
    else:
        fw, fh = width, height
    miss = first < 0
    hh = np.where(miss, fh, hh)
    ww = np.where(miss, fw, ww)
    top = np.where(miss, (height - fh) // 2, top)
    left = np.where(miss, (width - fw) // 2, left)
    return np.stack([top, left, hh, ww], 1)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop box i (top, left, h, w) of image i and resize it to ``size`` x ``size``.

    images [B, C, H, W] float; boxes [B, 4] integer; returns [B, C, size, size]. Bilinear with adaptive
    sampling (averaging several samples per output pixel when shrinking, i.e. antialiased).
    """
    b = boxes.to(images.device, torch.float32)
    rois = torch.stack([torch.arange(len(b), device=images.device, dtype=torch.float32),
                        b[:, 1], b[:, 0], b[:, 1] + b[:, 3], b[:, 0] + b[:, 2]], 1)
    out = roi_align(images.float(), rois, output_size=(size, size), spatial_scale=1.0,
                    sampling_ratio=-1, aligned=True)
    return out.to(images.dtype)


def resize_boxes(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each integer box (top, left, h, w) of one image [C, H, W], resized to ``size`` x ``size`` with
    antialiased bilinear interpolation: [K, C, size, size]. The same filter as DALI's antialiased linear
    resize of a region of interest, so the torch and DALI image loaders cut the same crops
    (:func:`crop_resize`'s ``roi_align`` averages differently when shrinking)."""
    return torch.cat([F.interpolate(image[None, :, t:t + h, l:l + w], size=(size, size), mode="bilinear",
                                    antialias=True, align_corners=False) for t, l, h, w in boxes.tolist()])


def pad_to(patches: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad [B, C, s, s] patches, centred, to size x size (RDED scores patches this way)."""
    dh, dw = size - patches.shape[-2], size - patches.shape[-1]
    return F.pad(patches, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))


def stitch(patches: torch.Tensor, factor: int, out_size: int) -> torch.Tensor:
    """RDED's stitching: ``n * factor**2`` patches (best first) into ``n`` images.

    Patch ``k * n + i`` goes to image ``i`` at grid cell ``k`` in row-major order; with
    ``out_size % factor = r`` the first ``r`` rows/columns of cells are one pixel larger, and patches are
    resized to their cell with nearest-neighbour interpolation, as RDED's ``mix_images``.
    """
    total = patches.shape[0]
    if total % (factor * factor):
        raise ValueError(f"{total} patches cannot fill images of {factor}x{factor} cells")
    n = total // (factor * factor)
    s, rem = divmod(out_size, factor)
    out = patches.new_zeros((n, patches.shape[1], out_size, out_size))
    k, top = 0, 0
    for i in range(factor):
        h = s + 1 if i < rem else s
        left = 0
        for j in range(factor):
            w = s + 1 if j < rem else s
            part = patches[k * n:(k + 1) * n]
            if part.shape[-2:] != (h, w):
                part = F.interpolate(part, size=(h, w))
            out[:, :, top:top + h, left:left + w] = part
            left += w
            k += 1
        top += h
    return out


def shuffle_patches(x: torch.Tensor, perms: torch.Tensor, factor: int) -> torch.Tensor:
    """Rearrange each image's ``factor x factor`` grid of cells by ``perms`` [B, factor**2]."""
    if factor == 1:
        return x
    B, C, H, W = x.shape
    h, w = H // factor, W // factor
    core = x[:, :, :h * factor, :w * factor]
    cells = core.reshape(B, C, factor, h, factor, w).permute(0, 2, 4, 1, 3, 5).reshape(B, factor * factor, C, h, w)
    cells = cells[torch.arange(B, device=x.device)[:, None], perms.to(torch.long)]
    core = cells.reshape(B, factor, factor, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h * factor, w * factor)
    out = x.clone()
    out[:, :, :h * factor, :w * factor] = core
    return out


@dataclass
class EpochAugment:
    """All random choices of one epoch, indexed by sample: arrays of length N."""

    boxes: torch.Tensor     # [N, 4] random-resized-crop box (top, left, h, w)
    flip: torch.Tensor      # [N] bool
    perms: torch.Tensor     # [N, factor**2] patch order
    partner: torch.Tensor   # [N] CutMix partner pi(i) (a derangement; per batch, RDED's: a permutation)
    lam: torch.Tensor       # [N] fraction of sample i left after the cut (area-corrected)
    cut: torch.Tensor       # [N, 4] cut box (top, left, h, w)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which the student sees the ``n`` samples in ``epoch``; its batches are consecutive slices."""
    return rng(seed, STREAM_ORDER, epoch).permutation(n)


def epoch_augment(seed: int, epoch: int, n: int, size: int, factor: int, cutmix_alpha: float = 1.0,
                  mix_batch: int = 0) -> EpochAugment:
    """The augmentation of ``epoch`` for ``n`` samples of ``size`` px: RDED's ShufflePatches(factor),
    RandomResizedCrop(scale=(1/factor, 1)), horizontal flip, then CutMix(alpha) with partner pi(i).

    ``mix_batch`` = 0: CutMix per sample (its own lam and box; pi a derangement of the whole set).
    ``mix_batch`` = b > 0: RDED's CutMix, per training batch of ``b`` (consecutive slices of
    :func:`epoch_order`): one lam and one box for the whole batch, pi a random permutation of the batch (a
    sample may be its own partner, as ``torch.randperm`` in RDED's code). Crops, flips and patch orders are
    the same either way."""
    g = rng(seed, STREAM_AUGMENT, epoch)
    boxes = random_resized_boxes(g, n, size, size, scale=(1.0 / factor, 1.0), ratio=(3 / 4, 4 / 3))
    flip = g.random(n) < 0.5
    perms = np.argsort(g.random((n, factor * factor)), axis=1)
    if mix_batch > 0:
        return _batch_cutmix(g, boxes, flip, perms, epoch_order(seed, epoch, n), mix_batch, size, cutmix_alpha)
    order = g.permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, -1)           # cyclic shift in a random order: pi(i) != i for n > 1
    if cutmix_alpha > 0:
        lam0 = g.beta(cutmix_alpha, cutmix_alpha, size=n)
    else:
        lam0 = np.ones(n)
    cx = g.integers(0, size, size=n)
    cy = g.integers(0, size, size=n)
    return _with_cut(boxes, flip, perms, partner, lam0, cx, cy, size)


def _batch_cutmix(g: np.random.Generator, boxes, flip, perms, order: np.ndarray, b: int, size: int,
                  cutmix_alpha: float) -> EpochAugment:
    n = len(order)
    partner = np.empty(n, dtype=np.int64)
    lam0, cx, cy = np.ones(n), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    for start in range(0, n, b):
        batch = order[start:start + b]
        partner[batch] = batch[g.permutation(len(batch))]
        lam0[batch] = g.beta(cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
        cx[batch], cy[batch] = g.integers(0, size), g.integers(0, size)
    return _with_cut(boxes, flip, perms, partner, lam0, cx, cy, size)


def _with_cut(boxes, flip, perms, partner, lam0, cx, cy, size: int) -> EpochAugment:
    """CutMix's box from its drawn ratio ``lam0`` and centre (``cx``, ``cy``), and the area-corrected lam."""
    cut_rat = np.sqrt(1.0 - lam0)
    cut_w = (size * cut_rat).astype(np.int64)
    cut_h = (size * cut_rat).astype(np.int64)
    x1, x2 = np.clip(cx - cut_w // 2, 0, size), np.clip(cx + cut_w // 2, 0, size)
    y1, y2 = np.clip(cy - cut_h // 2, 0, size), np.clip(cy + cut_h // 2, 0, size)
    lam = 1.0 - (x2 - x1) * (y2 - y1) / float(size * size)
    t = torch.from_numpy
    return EpochAugment(t(boxes), t(flip), t(perms), t(partner), t(lam).float(),
                        t(np.stack([y1, x1, y2 - y1, x2 - x1], 1)))


@dataclass
class BatchAugment:
    """The choices of one batch of ``b`` samples, gathered from an :class:`EpochAugment`: rows ``0..b-1`` are
    the samples' own views, rows ``b..2b-1`` their CutMix partners' (``rows``: their sample indices)."""

    rows: torch.Tensor      # [2b] sample indices: the batch, then pi(batch)
    perms: torch.Tensor     # [2b, factor**2]
    boxes: torch.Tensor     # [2b, 4]
    flip: torch.Tensor      # [2b] bool
    cut: torch.Tensor       # [b, 4]
    lam: torch.Tensor       # [b]

    def tensors(self) -> list[torch.Tensor]:
        return [self.rows, self.perms, self.boxes, self.flip, self.cut, self.lam]

    def apply(self, fn) -> "BatchAugment":
        """The same choices with ``fn`` applied to each tensor (e.g. a copy to the device)."""
        return BatchAugment(*(fn(t) for t in self.tensors()))


def batch_augment(aug: EpochAugment, idx) -> BatchAugment:
    idx = torch.as_tensor(idx, dtype=torch.long)
    rows = torch.cat([idx, aug.partner[idx]])
    return BatchAugment(rows, aug.perms[rows], aug.boxes[rows], aug.flip[rows], aug.cut[idx], aug.lam[idx])


def mix(rows: torch.Tensor, ba: BatchAugment, factor: int) -> torch.Tensor:
    """x_mix [b, C, S, S] from ``rows`` = images[ba.rows] [2b, C, S, S]: each sample's view with the cut box
    taken from its partner's view. Everything happens where ``rows`` and ``ba`` are (one device, no copies
    to or from it: a GPU step needs no host synchronisation)."""
    size, b = rows.shape[-1], ba.cut.shape[0]

    def view(part: slice) -> torch.Tensor:     # the samples' (part :b) or the partners' (b:) views
        x = shuffle_patches(rows[part], ba.perms[part], factor)
        x = crop_resize(x, ba.boxes[part], size)
        return torch.where(ba.flip[part].view(-1, 1, 1, 1), x.flip(-1), x)

    xa, xb = view(slice(0, b)), view(slice(b, None))
    cut = ba.cut
    pos = torch.arange(size, device=xa.device)
    rows_in = (pos.view(1, size, 1) >= cut[:, 0, None, None]) & (pos.view(1, size, 1) < (cut[:, 0] + cut[:, 2])[:, None, None])
    cols_in = (pos.view(1, 1, size) >= cut[:, 1, None, None]) & (pos.view(1, 1, size) < (cut[:, 1] + cut[:, 3])[:, None, None])
    return torch.where((rows_in & cols_in)[:, None], xb, xa)


def mixed_batch(images: torch.Tensor, labels: torch.Tensor, aug: EpochAugment, idx: torch.Tensor,
                factor: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's view of samples ``idx`` this epoch.

    images [N, C, S, S] (the whole synthetic set, normalised), labels [N]; returns x_mix [b, C, S, S],
    y_org [b], y_aug [b] and lam [b] (float32): x_mix is sample i's view with the cut box taken from the
    view of pi(i). (:class:`nrrdd.feed.SetFeed` makes the same batches on a device, from a set in host memory.)
    """
    ba = batch_augment(aug, idx)
    b = ba.cut.shape[0]
    x = mix(images[ba.rows], ba.apply(lambda t: t.to(images.device)), factor)
    return x, labels[ba.rows[:b]], labels[ba.rows[b:]], ba.lam.to(x.device)
