"""Stage 1: pick real patches and stitch them into initial synthetic images.

- ``random``: ``ipc * factor**2`` random real images per class, each whole image one patch.
- ``rded``  (RDED): per image the crop of lowest teacher cross-entropy among ``num_crop`` random-resized
  crops; per class the ``ipc * factor**2`` most confident.
- ``nrrdd`` (CIDD): per image the crop with the highest CAM ratio (CAM mass inside the box / whole image);
  per class the ``ipc * factor**2`` *least* confident of those ("high CAM ratio, low confidence").
- ``sre2l`` (SRe2L): no real image and no teacher: ``ipc`` whole images per class of standard Gaussian noise
  in normalised space, drawn from ``rng(seed, STREAM_NOISE, class)`` and clamped to the valid pixel range;
  stage 2 then synthesises them (unmasked, with jitter and flip).

Candidates stream through in batches (decoded by DALI or torch, see :mod:`nrrdd.loaders`) and each class
keeps only its ``ipc * factor**2`` best crops so far, so memory stays flat as ``mipc`` grows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from .augment import STREAM_DISCOVER, STREAM_NOISE, STREAM_SELECT, pad_to, random_resized_boxes, rng, stitch
from .cam import class_activation_map
from .data import ImageSet, Normalizer
from .dist import SINGLE, Dist
from .loaders import PatchSource
from .runtime import autocast, progress


@dataclass
class Discovery:
    images: torch.Tensor            # [n_classes * ipc, C, S, S] float32 pixel values in [0, 1]
    labels: torch.Tensor            # [n_classes * ipc] int64
    sources: list[dict] = field(default_factory=list)  # per patch: class, image index, box, score
    skipped: list[dict] = field(default_factory=list)  # candidate files that could not be used, with the reason
    loader: str = "torch"                               # the backend that decoded the candidates


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
def score_candidates(method: str, teacher: nn.Module, image: torch.Tensor, crops: torch.Tensor, boxes: torch.Tensor,
                     y: torch.Tensor, cam: str = "auto", precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Score one batch of candidate images, each for its own class ``y`` [b].

    image [b, C, S, S] and crops [b, K, C, s, s] normalised; boxes [b, K, 4]. Returns (kept crop per image
    [b], score [b]). RDED keeps per image the crop of lowest cross-entropy and per class the lowest
    scores; CIDD keeps per image the crop of highest CAM ratio, scored by its softmax probability.
    The whole batch goes through the teacher at once, whatever classes it mixes.
    """
    b, K = crops.shape[:2]
    S = image.shape[-1]
    y = y.to(image.device)
    rows = torch.arange(b, device=image.device)
    if method == "rded":
        with autocast(image.device, precision):
            logits = teacher(pad_to(crops.flatten(0, 1), S)).float()
        ce = -logits.log_softmax(1)[torch.arange(b * K, device=y.device), y.repeat_interleave(K)].view(b, K)
        score, best = ce.min(1)
        return best, score
    if method == "nrrdd":
        with autocast(image.device, precision):
            cmap = class_activation_map(teacher, image, y, method=cam)
        best = cam_ratio(cmap, boxes).argmax(1)
        kept = crops[rows.to(crops.device), best.to(crops.device)]
        with autocast(image.device, precision):
            logits = teacher(pad_to(kept, S)).float()
        return best, logits.softmax(1)[rows, y]
    raise ValueError(f"unknown discovery method {method!r}")


class _Kept:
    """The ``n`` best candidates of one class seen so far (stable: ties keep candidate order).

    Memory is ``n`` crops whatever ``mipc`` is."""

    def __init__(self, n: int, descending: bool):
        self.n, self.descending = n, descending
        self.key = self.score = self.index = self.box = self.crop = None

    def add(self, key, score, index, box, crop) -> None:
        if self.key is not None:
            key, score, index, box, crop = (torch.cat([a, b]) for a, b in zip(
                (self.key, self.score, self.index, self.box, self.crop), (key, score, index, box, crop)))
        order = torch.sort(key, descending=self.descending, stable=True).indices[:self.n]
        self.key, self.score, self.index, self.box = key[order], score[order], index[order], box[order]
        self.crop = crop[order.to(crop.device)]

    def __len__(self) -> int:
        return 0 if self.key is None else len(self.key)

    def state(self):
        return None if self.key is None else (self.key, self.score, self.index, self.box, self.crop.cpu())

    @classmethod
    def merged(cls, n: int, descending: bool, states: list, position: torch.Tensor) -> "_Kept":
        """The ``n`` best of several ranks' kept candidates, ties broken by candidate order as in one stream."""
        k = cls(n, descending)
        states = [s for s in states if s is not None]
        if states:
            key, score, index, box, crop = (torch.cat(parts) for parts in zip(*states))
            first = torch.argsort(position[index])          # candidate order, then a stable sort by key
            k.add(key[first], score[first], index[first], box[first], crop[first])
        return k


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
             precision: str = "fp32", show_progress: bool = True, loader: str = "auto", workers: int = 2,
             dist: Dist = SINGLE) -> Discovery:
    """Run stage 1 for every class; returns stitched images in pixel units (see :class:`Discovery`).

    All candidates of all classes stream through one :class:`~nrrdd.loaders.PatchSource` (class after
    class), so image decoding runs ahead of the teacher; ``loader`` picks its backend (DALI or torch).
    Several processes (``dist``): batch ``k`` of that stream is scored by rank ``k % world`` as the same
    batch as in one process; the ranks' kept candidates are then merged, and every rank returns the result.
    """
    if method == "sre2l":
        return noise_init(len(train.classes), ipc, train.channels, train.size, seed, normalizer)
    if method not in ("random", "rded", "nrrdd"):
        raise ValueError(f"unknown discovery method {method!r}")
    if method != "random" and teacher is None:
        raise ValueError(f"method {method!r} needs a teacher")
    S = train.size
    s = S // factor
    n_patch = ipc * factor * factor
    n_classes = len(train.classes)
    cands = []
    for c in range(n_classes):
        cand = _class_candidates(train, c, mipc, seed)
        if len(cand) < n_patch:
            raise ValueError(f"class {c} ({train.classes[c]!r}) has {len(cand)} candidate images (mipc={mipc}) "
                             f"but {n_patch} patches are needed (ipc={ipc}, factor={factor})")
        cands.append(cand)
    if method == "random":      # each whole image is one patch: the first n_patch usable candidates, out of
        full = np.array([[0, 0, S, S]], dtype=np.int64)         # 2 x n_patch read (spares for bad files)
        boxes_fn = lambda i: full  # noqa: E731
        cands = [cand[:2 * n_patch] for cand in cands]
    else:
        boxes_fn = lambda i: candidate_boxes(seed, i, num_crop, S, crop_scale)  # noqa: E731
    order = torch.cat(cands)
    position = torch.empty(int(order.max()) + 1, dtype=torch.long)
    position[order] = torch.arange(len(order))
    descending = method == "nrrdd" and keep == "high"
    # dist: batch k of the (screened) stream goes to rank k % world, holding exactly what it holds in one process
    src = PatchSource(train, order, normalizer, crop_size=s, boxes=boxes_fn, loader=loader, batch_size=batch_size,
                      workers=workers, device=device, dist=dist)
    kept = [_Kept(n_patch, descending) for _ in range(n_classes)]
    for batch in progress(src, desc=f"discover[{method}]", enable=show_progress and dist.is_main,
                          total=-(-len(order) // batch_size // dist.world)):
        if method == "random":
            best = torch.zeros(len(batch.index), dtype=torch.long)
            score = torch.full((len(batch.index),), float("nan"))
            key = position[batch.index].float()
        else:
            best, score = score_candidates(method, teacher, batch.image, batch.crops, batch.boxes, batch.label,
                                           cam, precision)
            best, score = best.cpu(), score.float().cpu()
            key = score
        rows = torch.arange(len(batch.index))
        box = batch.boxes[rows, best]
        crop = batch.crops[rows.to(batch.crops.device), best.to(batch.crops.device)]
        for c in batch.label.unique().tolist():
            m = batch.label == c
            kept[c].add(key[m], score[m], batch.index[m], box[m], crop[m.to(crop.device)])
    skipped = src.skipped
    if dist.active:         # screening results are on every rank already; decoding failures are per rank
        shards = dist.all_gather(([k.state() for k in kept], src.skipped[len(src.screened_out):]))
        kept = [_Kept.merged(n_patch, descending, [sh[0][c] for sh in shards], position) for c in range(n_classes)]
        skipped = src.screened_out + [s for sh in shards for s in sh[1]]
    base, _ = train.locate([])
    files = getattr(base, "samples", None)
    images, labels, sources = [], [], []
    for c, k in enumerate(kept):
        if len(k) < n_patch:
            bad = [f"{p}: {r}" for p, r in skipped][:5]
            raise ValueError(f"class {c} ({train.classes[c]!r}) has only {len(k)} usable candidate images but "
                             f"{n_patch} patches are needed; files skipped: {bad}")
        patches = normalizer.inverse(k.crop).cpu()                          # pixel units, [n_patch, C, s, s]
        images.append(stitch(patches, factor, S).clamp_(0, 1))
        labels.append(torch.full((ipc,), c, dtype=torch.long))
        base_idx = train.locate(k.index)[1].tolist()
        for j in range(n_patch):
            src_j = {"class": c, "image": int(k.index[j]), "box": k.box[j].tolist(), "score": float(k.score[j]),
                     "slot": [j % ipc, j // ipc]}
            if files is not None:
                src_j["file"] = files[base_idx[j]][0]
            sources.append(src_j)
    return Discovery(torch.cat(images), torch.cat(labels), sources,
                     skipped=[{"file": p, "reason": r} for p, r in skipped], loader=src.backend)
