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
keeps only the keys and boxes of its ``ipc * factor**2`` best crops so far, so memory stays flat as ``mipc``
grows; :func:`assemble` then cuts the chosen crops again from their images and stitches them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from .augment import STREAM_DISCOVER, STREAM_NOISE, STREAM_SELECT, pad_to, random_resized_boxes, rng, stitch
from .cam import class_activation_map
from .config import RunConfig
from .data import ImageSet, Normalizer
from .loaders import PatchSource
from .runtime import QUIET, Runtime, autocast, progress


@dataclass
class Discovery:
    images: torch.Tensor | None     # [n_classes * ipc, C, S, S] pixel values in [0, 1] (None from select())
    labels: torch.Tensor            # [n_classes * ipc] int64
    sources: list[dict] = field(default_factory=list)  # per patch: class, image index, box, score
    skipped: list[dict] = field(default_factory=list)  # candidate files that could not be used, with the reason
    loader: str = "torch"                               # the backend that decoded the candidates
    rows: torch.Tensor | None = None                    # the images written (assemble(rows=...)); None: all


def candidate_boxes(seed: int, image_index: int, num_crop: int, size: int, scale,
                    whole_image: bool = False) -> np.ndarray:
    """The ``num_crop`` square crop boxes of one candidate image: a function of (seed, image index) only.
    ``whole_image``: the whole image is one more candidate, after the random crops (which stay the same)."""
    boxes = random_resized_boxes(rng(seed, STREAM_DISCOVER, image_index), num_crop, size, size, scale=scale)
    if whole_image:
        boxes = np.concatenate([boxes, np.array([[0, 0, size, size]], dtype=boxes.dtype)])
    return boxes


def crop_scale_for(size: int, scale=(0.08, 1.0), min_side: int = 0) -> tuple[float, float]:
    """Discovery's random-resized-crop scale range on ``size`` px images: ``scale``, its lower bound raised so
    that no crop is smaller than ``min_side`` px a side (``(min_side / size)**2`` of the image's area, at most 1).
    RandomResizedCrop's 0.08 was chosen for 224 px ImageNet crops; on 28 px images it cuts 8 px fragments."""
    lo, hi = float(scale[0]), float(scale[1])
    if min_side > 0:
        lo = min(max(lo, (min_side / size) ** 2), 1.0)
        hi = max(hi, lo)
    return lo, hi


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
    Also returns whether the teacher classifies the kept crop as ``y`` ([b] bool), as a third value.
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
        correct = logits.view(b, K, -1)[rows, best].argmax(1) == y
        return best, score, correct
    if method == "nrrdd":
        with autocast(image.device, precision):
            cmap = class_activation_map(teacher, image, y, method=cam)
        best = cam_ratio(cmap, boxes).argmax(1)
        kept = crops[rows.to(crops.device), best.to(crops.device)]
        with autocast(image.device, precision):
            logits = teacher(pad_to(kept, S)).float()
        return best, logits.softmax(1)[rows, y], logits.argmax(1) == y
    raise ValueError(f"unknown discovery method {method!r}")


class _Kept:
    """The ``n`` best candidates of one class seen so far (stable: ties keep candidate order): their keys,
    scores, image indices and boxes only, whatever ``mipc`` is (the pixels are cut again by :func:`assemble`)."""

    def __init__(self, n: int, descending: bool):
        self.n, self.descending = n, descending
        self.key = self.score = self.index = self.box = None

    def add(self, key, score, index, box) -> None:
        if self.key is not None:
            key, score, index, box = (torch.cat([a, b]) for a, b in zip(
                (self.key, self.score, self.index, self.box), (key, score, index, box)))
        order = torch.sort(key, descending=self.descending, stable=True).indices[:self.n]
        self.key, self.score, self.index, self.box = key[order], score[order], index[order], box[order]

    def __len__(self) -> int:
        return 0 if self.key is None else len(self.key)

    def window(self, n: int, quantile: float, correct_only: bool) -> "_Kept":
        """``n`` consecutive candidates of the ranking, starting ``quantile`` of the way down it (over the
        correctly classified ones with ``correct_only``: those whose key is their score)."""
        m = int((self.key == self.score).sum()) if correct_only else len(self)
        start = int(math.floor(quantile * (max(m, n) - n) + 0.5))
        w = _Kept(n, self.descending)
        w.key, w.score, w.index, w.box = (t[start:start + n] for t in (self.key, self.score, self.index, self.box))
        return w

    def state(self):
        return None if self.key is None else (self.key, self.score, self.index, self.box)

    @classmethod
    def merged(cls, n: int, descending: bool, states: list, position: torch.Tensor) -> "_Kept":
        """The ``n`` best of several ranks' kept candidates, ties broken by candidate order as in one stream."""
        k = cls(n, descending)
        states = [s for s in states if s is not None]
        if states:
            key, score, index, box = (torch.cat(parts) for parts in zip(*states))
            first = torch.argsort(position[index])          # candidate order, then a stable sort by key
            k.add(key[first], score[first], index[first], box[first])
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


@dataclass(frozen=True)
class DiscoverSettings:
    """Stage 1's settings (the RunConfig fields it reads, by the names the selection uses)."""
    method: str                     # nrrdd | rded | random | sre2l
    ipc: int
    mipc: int
    num_crop: int
    factor: int
    seed: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    cam: str = "auto"
    keep: str = "low"
    quantile: float = 0.0
    correct_only: bool = False
    whole_image: bool = False
    batch_size: int = 256

    @classmethod
    def of(cls, cfg: RunConfig, *, factor: int, size: int) -> "DiscoverSettings":
        """``cfg``'s discovery on ``size`` px images (``--crop-min-side`` raises the crop scale's lower bound)."""
        return cls(method=cfg.method, ipc=cfg.ipc, mipc=cfg.mipc, num_crop=cfg.num_crop, factor=factor, seed=cfg.seed,
                   crop_scale=crop_scale_for(size, cfg.crop_scale, cfg.crop_min_side), cam=cfg.cam,
                   keep=cfg.resolved_cidd_keep(), quantile=cfg.cidd_quantile, correct_only=cfg.cidd_correct,
                   whole_image=cfg.whole_image, batch_size=cfg.discover_batch_size)


def discover(teacher: nn.Module | None, train: ImageSet, normalizer: Normalizer, settings: DiscoverSettings,
             rt: Runtime = QUIET, *, rows: torch.Tensor | None = None) -> Discovery:
    """Run stage 1 for every class: :func:`select`, then :func:`assemble` (``rows``: only those images)."""
    return assemble(select(teacher, train, normalizer, settings, rt), train, normalizer, settings, rt, rows=rows)


def select(teacher: nn.Module | None, train: ImageSet, normalizer: Normalizer, settings: DiscoverSettings,
           rt: Runtime = QUIET) -> Discovery:
    """Stage 1's choice for every class: which crop of which image goes into which slot (``sources``), without
    the pixels (``images`` is None; :func:`assemble` cuts them). For ``sre2l``: the noise images themselves.

    All candidates of all classes stream through one :class:`~nrrdd.loaders.PatchSource` (class after
    class), so image decoding runs ahead of the teacher; ``loader`` picks its backend (DALI or torch). Each
    class keeps only the keys, image indices and boxes of its best crops, so memory does not grow with
    ``mipc`` or with the crops' size. Several processes (``dist``): batch ``k`` of that stream is scored by rank
    ``k % world`` as the same batch as in one process; the ranks' kept candidates (numbers, no pixels) are
    merged, and every rank returns the same selection.

    CIDD's rule (``nrrdd``): per class the candidates are ranked by confidence, ascending (``keep="low"``, the
    paper) or descending (``"high"``, RDED's rule), and ``ipc * factor**2`` consecutive ones are kept, starting
    at ``quantile`` of the way down the ranking (0: the first; 1: the last). ``correct_only``: candidates whose
    kept crop the teacher assigns to another class are ranked after all others (used only when too few are
    left) and the window runs over the correctly classified ones. ``whole_image``: the whole image is one
    more candidate crop of every image (for ``rded`` and ``nrrdd``).
    """
    st, dist = settings, rt.dist
    method, ipc, mipc, factor, seed, batch_size = st.method, st.ipc, st.mipc, st.factor, st.seed, st.batch_size
    keep, quantile, correct_only = st.keep, st.quantile, st.correct_only
    if keep not in ("low", "high"):
        raise ValueError(f"keep must be 'low' or 'high', not {keep!r}")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"the CIDD quantile must lie in [0, 1], got {quantile}")
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
        boxes_fn = lambda i: candidate_boxes(seed, i, st.num_crop, S, st.crop_scale, st.whole_image)  # noqa: E731
    order = torch.cat(cands)
    position = torch.empty(int(order.max()) + 1, dtype=torch.long)
    position[order] = torch.arange(len(order))
    descending = method == "nrrdd" and keep == "high"
    # a window inside the ranking needs the whole ranking: keep every candidate's numbers (no pixels)
    window = method == "nrrdd" and (quantile > 0 or correct_only)
    n_keep = max(len(c) for c in cands) if window else n_patch
    # dist: batch k of the (screened) stream goes to rank k % world, holding exactly what it holds in one process
    src = PatchSource(train, order, normalizer, crop_size=s, boxes=boxes_fn, loader=rt.loader, batch_size=batch_size,
                      workers=rt.workers, device=rt.device, dist=dist)
    kept = [_Kept(n_keep, descending) for _ in range(n_classes)]
    for batch in progress(src, desc=f"discover[{method}]", enable=rt.show_progress and dist.is_main,
                          total=-(-len(order) // batch_size // dist.world)):
        if method == "random":
            best = torch.zeros(len(batch.index), dtype=torch.long)
            score = torch.full((len(batch.index),), float("nan"))
            key = position[batch.index].float()
        else:
            best, score, correct = score_candidates(method, teacher, batch.image, batch.crops, batch.boxes,
                                                    batch.label, st.cam, rt.precision)
            best, score = best.cpu(), score.float().cpu()
            key = score
            if window and correct_only:     # confidences lie in [0, 1]: misclassified crops rank after the rest
                wrong = (~correct.cpu()).float() * 2.0
                key = score - wrong if descending else score + wrong
        box = batch.boxes[torch.arange(len(batch.index)), best]
        for c in batch.label.unique().tolist():
            m = batch.label == c
            kept[c].add(key[m], score[m], batch.index[m], box[m])
    skipped = src.skipped
    if dist.active:         # screening results are on every rank already; decoding failures are per rank
        shards = dist.all_gather(([k.state() for k in kept], src.skipped[len(src.screened_out):]))
        kept = [_Kept.merged(n_keep, descending, [sh[0][c] for sh in shards], position) for c in range(n_classes)]
        skipped = src.screened_out + [s for sh in shards for s in sh[1]]
    base, _ = train.locate([])
    files = getattr(base, "samples", None)
    sources = []
    for c, k in enumerate(kept):
        if len(k) < n_patch:
            bad = [f"{p}: {r}" for p, r in skipped][:5]
            raise ValueError(f"class {c} ({train.classes[c]!r}) has only {len(k)} usable candidate images but "
                             f"{n_patch} patches are needed; files skipped: {bad}")
        if window:
            k = k.window(n_patch, quantile, correct_only)
        base_idx = train.locate(k.index)[1].tolist()
        for j in range(n_patch):
            src_j = {"class": c, "image": int(k.index[j]), "box": k.box[j].tolist(), "score": float(k.score[j]),
                     "slot": [j % ipc, j // ipc]}
            if files is not None:
                src_j["file"] = files[base_idx[j]][0]
            sources.append(src_j)
    return Discovery(None, torch.arange(n_classes).repeat_interleave(ipc), sources,
                     skipped=[{"file": p, "reason": r} for p, r in skipped], loader=src.backend)


def assemble(d: Discovery, train: ImageSet, normalizer: Normalizer, settings: DiscoverSettings, rt: Runtime = QUIET,
             *, rows: torch.Tensor | None = None) -> Discovery:
    """The pixels of a selection: each kept crop cut again from its image (the same decoding, box and resize
    as while scoring, so the same bits) and stitched, RDED's layout, in pixel units.

    ``rows``: only these images (a process refines only its batches); the others stay unwritten (``torch.empty``:
    no memory is touched for them) and ``d.rows`` says which are valid. None: all."""
    if d.images is not None:                        # sre2l: the noise is the selection
        return d
    factor = settings.factor
    S = train.size
    s = S // factor
    n_images = len(d.labels)
    ipc = n_images // len(train.classes)
    n_patch = ipc * factor * factor
    want = torch.arange(n_images) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    # the patches of image c * ipc + i are class c's patches j with j % ipc == i
    needed = {(r // ipc) * n_patch + j for r in want.tolist() for j in range(r % ipc, n_patch, ipc)}
    entries = sorted(needed)
    box_of = {d.sources[e]["image"]: np.asarray([d.sources[e]["box"]], dtype=np.int64) for e in entries}
    patch: dict[int, torch.Tensor] = {}
    if entries:
        src = PatchSource(train, torch.tensor([d.sources[e]["image"] for e in entries]), normalizer, crop_size=s,
                          boxes=box_of.__getitem__, loader=rt.loader, batch_size=settings.batch_size,
                          workers=rt.workers, device=rt.device)
        for b in src:
            for i, crop in zip(b.index.tolist(), b.crops[:, 0]):
                patch[i] = crop
        if src.skipped:
            raise ValueError(f"images chosen in discovery cannot be read any more (changed on disk?): "
                             f"{src.skipped[:3]}")
    images = torch.empty(n_images, train.channels, S, S)
    by_class: dict[int, list[int]] = {}
    for r in want.tolist():
        by_class.setdefault(r // ipc, []).append(r)
    for c, class_rows in sorted(by_class.items()):
        crops = torch.zeros(n_patch, train.channels, s, s)
        for j in range(n_patch):
            if c * n_patch + j in needed:
                crops[j] = normalizer.inverse(patch[d.sources[c * n_patch + j]["image"]][None]).cpu()[0]
        stitched = stitch(crops, factor, S).clamp_(0, 1)
        for r in class_rows:
            images[r] = stitched[r % ipc]
    return Discovery(images, d.labels, d.sources, d.skipped, d.loader, rows=None if rows is None else want)
