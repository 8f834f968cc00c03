"""Stage 2: non-critical region refinement (NRR), and SRe2L's BN-matching loss it shares.

For a batch of images x with labels y:
  C = CAM of the teacher for y on x, min-max normalised; M = max(0, eps - C), fixed [default] or recomputed
  every ``mask_every`` steps; L = CE(T(x), y) + a_bn * L_bn; masked Adam step (``nrrdd.kernels.MaskedAdam``)
  with the mask on the *step*, then a clamp to the images of pixel values 0 and 1.

The settings are :class:`RefineSettings` (``RefineSettings.of(cfg)`` from a run's config); how the stage runs
(device, precision, processes, progress) is a :class:`~nrrdd.runtime.Runtime`.

SRe2L synthesis is the same loop with ``masked=False`` (every pixel moves) and SRe2L's input augmentation:
each step the teacher sees the batch rolled by (dy, dx), each uniform in [0, ``jitter``] px (circular
``torch.roll``, as SRe2L's recover code), and with ``flip`` mirrored horizontally with probability 0.5, one
draw per step for the whole batch from ``rng(seed, STREAM_JITTER, batch)``. The optimised images themselves
are never shifted; the gradient flows back through the roll and flip.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nrrdd.kernels import MaskedAdam

from .augment import STREAM_JITTER, rng
from .cam import class_activation_map, nrr_mask
from .config import RunConfig
from .dist import Dist
from .io import ChunkStore
from .runtime import QUIET, Runtime, autocast, cosine, progress


class NonFiniteError(FloatingPointError):
    pass


class BNStatLoss:
    """SRe2L's L_bn: for every BatchNorm2d, ||mean_batch - running_mean||_2 + ||var_batch - running_var||_2 of
    the layer's input, the first layer weighted ``first_multiplier``. Hooks stay on until :meth:`remove`."""

    def __init__(self, model: nn.Module, first_multiplier: float = 10.0):
        self.bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        self.first_multiplier = first_multiplier
        self.terms: list[torch.Tensor] = []
        self.handles = [bn.register_forward_hook(self._hook) for bn in self.bns]

    def _hook(self, module: nn.BatchNorm2d, inputs, output) -> None:
        x = inputs[0].float()
        mean = x.mean(dim=(0, 2, 3))
        var = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1).var(1, unbiased=False)
        self.terms.append(torch.norm(module.running_mean - mean, 2) + torch.norm(module.running_var - var, 2))

    def pop(self) -> torch.Tensor:
        """The loss of the last forward pass (0 for a model without BatchNorm)."""
        terms, self.terms = self.terms, []
        if not terms:
            return torch.zeros(())
        return self.first_multiplier * terms[0] + sum(terms[1:], torch.zeros_like(terms[0]))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class RefineResult:
    images: torch.Tensor    # [N, C, H, W] normalised
    masks: torch.Tensor     # [N, 1, H, W] the (last) masks used
    final_loss: float


@dataclass(frozen=True)
class RefineSettings:
    """Stage 2's settings (the RunConfig fields it reads, by the names the loop uses)."""
    iterations: int = 500
    eps: float = 0.5
    lr: float = 0.25
    betas: tuple[float, float] = (0.5, 0.9)
    adam_eps: float = 1e-8
    a_bn: float = 0.01
    first_bn_multiplier: float = 10.0
    mask_every: int = 0
    batch_size: int = 100
    masked: bool = True
    mask_mode: str = "step"
    cam: str = "auto"
    jitter: int = 0
    flip: bool = False
    seed: int = 0

    @classmethod
    def of(cls, cfg: RunConfig) -> "RefineSettings":
        """NRR for ``--method nrrdd`` (and rded with ``--refine``); SRe2L's synthesis for ``sre2l``: no mask, its
        iterations, jitter and flip."""
        sre2l = cfg.method == "sre2l"
        return cls(iterations=cfg.sre2l_iterations if sre2l else cfg.nrr_iterations, eps=cfg.nrr_eps, lr=cfg.nrr_lr,
                   betas=tuple(cfg.nrr_betas), adam_eps=cfg.nrr_adam_eps, a_bn=cfg.a_bn,
                   first_bn_multiplier=cfg.first_bn_multiplier, mask_every=cfg.mask_every,
                   batch_size=cfg.refine_batch_size, masked=not sre2l, mask_mode=cfg.nrr_mask_mode, cam=cfg.cam,
                   jitter=cfg.sre2l_jitter if sre2l else 0, flip=sre2l and cfg.resolved_sre2l_flip(), seed=cfg.seed)


def refine(teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor],
           settings: RefineSettings = RefineSettings(), rt: Runtime = QUIET, *, parts: ChunkStore | None = None,
           out: torch.Tensor | None = None) -> RefineResult | None:
    """Refine normalised ``images`` [N, C, H, W] in batches; returns the refined images and their masks.

    ``bounds``: per-channel (lo, hi), the normalised images of pixel values 0 and 1 (every step clamps to them).
    ``out``: where each refined batch is written as soon as it is done, ``images`` itself allowed (a batch reads
    its own rows before writing them, and batches do not overlap); by default a new tensor, ``images`` untouched.
    Only rank 0 writes it (the other ranks' batches reach it through ``parts``).
    Written in place, the set is held once (at ImageNet IPC 50, 30 GB) instead of three times (the input, the
    refined batches, the assembled result).

    ``settings.mask_mode``: where the mask M enters the update (:data:`MASK_MODES`): ``step`` scales Adam's step
    (the fused masked-Adam kernel; METHOD.md's default), ``grad`` scales the gradient before a plain Adam (Adam's
    per-element normalisation then leaves mostly a binary mask: M > 0 moves at full speed), ``sgd`` is plain
    gradient descent ``x <- clamp(x - lr * M * grad)`` (the update as a summary of the paper writes it; its
    ``lr`` is on another scale than Adam's).
    ``masked=False`` optimises every pixel (SRe2L-style synthesis, or an unmasked ablation). ``jitter`` (px)
    and ``flip`` augment the teacher's input each step (SRe2L); off by default. ``seed`` keys their draws.
    ``parts``: keep each refined batch there as it is done and skip the batches already there (batches are
    refined independently, so a killed run resumes at the batch it was in).
    ``rt.dist``: batch ``k`` is refined by rank ``k % world``, which keeps it in ``parts`` (needed, on a folder
    every rank sees); rank 0 then assembles the result from them, the other ranks return None.
    """
    s, dist = settings, rt.dist
    lo, hi = bounds
    if s.jitter < 0:
        raise ValueError(f"jitter must be >= 0 px, got {s.jitter}")
    if s.mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {', '.join(MASK_MODES)}, not {s.mask_mode!r}")
    if dist.active and parts is None:
        raise ValueError("refinement in several processes passes its batches through `parts` (a ChunkStore)")
    device = torch.device(rt.device)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    bn_loss = BNStatLoss(teacher, s.first_bn_multiplier)
    if not bn_loss.bns and s.a_bn > 0:
        warnings.warn("teacher has no BatchNorm2d layer: L_bn is 0, only the cross-entropy drives refinement")
    if out is not None and out.shape != images.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, the images {tuple(images.shape)}")
    result = masks = None                           # only rank 0 assembles the set
    if dist.is_main:
        result = torch.empty_like(images) if out is None else out
        masks = torch.zeros(images.shape[0], 1, *images.shape[-2:])
    last = float("nan")
    order = batch_order(labels)
    batch_size = s.batch_size
    desc = "refine" if s.masked else "synthesise"
    try:
        bar = progress(range(0, len(order), batch_size), desc=desc, enable=rt.show_progress and dist.is_main)
        for start in bar:
            idx = order[start:start + batch_size]
            name = f"batch_{start // batch_size:06d}"
            if not dist.owns(start // batch_size):
                continue
            done = parts.load(name) if parts is not None else None
            if done is not None:
                if dist.is_main:
                    result[idx], masks[idx] = done[0]["images"], done[0]["masks"]
                last = float(done[1]["loss"])
                continue
            views = _input_views(s.iterations, s.jitter, s.flip, s.seed, start // batch_size)
            x, m, last = _refine_batch(teacher, bn_loss, images[idx].to(device), labels[idx].to(device), lo, hi,
                                       s, rt.precision, views)
            x, m = x.cpu(), m.cpu()
            if parts is not None:
                parts.save(name, {"images": x, "masks": m}, loss=repr(last))
            if dist.is_main:                        # the other ranks' batches reach rank 0 through parts
                result[idx], masks[idx] = x, m
    finally:
        bn_loss.remove()
    if dist.active:
        dist.barrier()                              # every batch is in parts now
        if not dist.is_main:
            return None
        for start in range(0, len(order), batch_size):
            if not dist.owns(start // batch_size):
                done = parts.load(f"batch_{start // batch_size:06d}")
                if done is None:
                    raise RuntimeError(f"refined batch {start // batch_size} is missing from {parts.folder}: "
                                       "every rank must see the same output folder")
                tensors, meta = done
                idx = order[start:start + batch_size]
                result[idx], masks[idx] = tensors["images"], tensors["masks"]
                if start + batch_size >= len(order):
                    last = float(meta["loss"])
    return RefineResult(result, masks, last)


def batch_order(labels: torch.Tensor) -> torch.Tensor:
    """The order in which images are refined, cut into batches of ``batch_size``: classes interleaved inside
    each batch, so BN statistics are matched over a class mix as in SRe2L."""
    return torch.argsort(_rank_within_class(labels) * (int(labels.max()) + 1) + labels, stable=True)


def rows_of_rank(labels: torch.Tensor, batch_size: int, dist: Dist) -> torch.Tensor:
    """The images the refinement batches of ``dist.rank`` hold (batch ``k`` to rank ``k % world``)."""
    order = batch_order(labels)
    n = -(-len(order) // batch_size)
    return torch.cat([order[k * batch_size:(k + 1) * batch_size] for k in dist.mine(n)] or [order[:0]])


def _rank_within_class(labels: torch.Tensor) -> torch.Tensor:
    rank = torch.zeros_like(labels)
    for c in labels.unique():
        where = torch.nonzero(labels == c).flatten()
        rank[where] = torch.arange(len(where))
    return rank


def _input_views(iterations: int, jitter: int, flip: bool, seed: int, batch: int):
    """Per step (dy, dx, flip) of the teacher's input, or None when neither jitter nor flip is on."""
    if not jitter and not flip:
        return None
    g = rng(seed, STREAM_JITTER, batch)
    shifts = g.integers(0, jitter + 1, size=(iterations, 2))
    flips = g.random(iterations) < 0.5 if flip else [False] * iterations
    return [(int(dy), int(dx), bool(f)) for (dy, dx), f in zip(shifts, flips)]


MASK_MODES = ("step", "grad", "sgd")


class _MaskedSGD:
    """``x <- clamp(x - lr * M * grad, lo, hi)`` per channel: the ``sgd`` mask mode (no fused kernel)."""

    def __init__(self, x: torch.Tensor, mask: torch.Tensor, lr: float, lo: torch.Tensor, hi: torch.Tensor):
        self.x, self.mask, self.lr = x, mask, lr
        self.lo, self.hi = lo.view(1, -1, 1, 1), hi.view(1, -1, 1, 1)

    @torch.no_grad()
    def step(self, factor: float) -> None:
        self.x.sub_(self.lr * factor * self.mask * self.x.grad)
        self.x.copy_(torch.maximum(torch.minimum(self.x, self.hi), self.lo))


def _refine_batch(teacher, bn_loss, x0, y, lo, hi, s: RefineSettings, precision: str, views=None):
    iterations, lr, mask_mode = s.iterations, s.lr, s.mask_mode

    def mask_of(x):
        if not s.masked:
            return torch.ones(x.shape[0], 1, *x.shape[-2:], device=x.device)
        with torch.no_grad(), autocast(x.device, precision):
            c = class_activation_map(teacher, x.detach(), y, method=s.cam)
        bn_loss.pop()                                   # the CAM forward is not part of the loss
        return nrr_mask(c.float(), s.eps)

    x = x0.clone().float().requires_grad_(True)
    mask = mask_of(x)
    lo, hi = lo.to(x.device), hi.to(x.device)
    sgd = opt = sched = None
    if mask_mode == "sgd":
        sgd = _MaskedSGD(x, mask, lr, lo, hi)
    else:               # "grad": the mask multiplies the gradient below and Adam itself is unmasked
        opt = MaskedAdam([x], mask=mask if mask_mode == "step" else None, lr=lr, betas=tuple(s.betas),
                         eps=s.adam_eps, bounds=(lo, hi))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: cosine(t, iterations))
    loss = torch.full((), float("nan"))
    # the first non-finite step, kept on the device and read every CHECK_EVERY steps: no host sync per step
    first_bad = torch.full((), -1, dtype=torch.long, device=x.device)
    for it in range(iterations):
        if s.mask_every and it and it % s.mask_every == 0:
            mask = mask_of(x)
            if mask_mode == "step":
                opt.set_mask(mask)
            elif sgd is not None:
                sgd.mask = mask
        x.grad = None
        xin = x
        if views is not None:
            dy, dx, f = views[it]
            if dy or dx:
                xin = torch.roll(xin, shifts=(dy, dx), dims=(2, 3))
            if f:
                xin = xin.flip(-1)
        with autocast(x.device, precision):
            logits = teacher(xin)
        loss = F.cross_entropy(logits.float(), y) + s.a_bn * bn_loss.pop()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), it, first_bad)
        if (it + 1) % CHECK_EVERY == 0 or it + 1 == iterations:
            _check(first_bad, y)
        loss.backward()
        if sgd is not None:
            sgd.step(cosine(it, iterations))
            continue
        if mask_mode == "grad":
            x.grad.mul_(mask)
        opt.step()
        sched.step()
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"refined images hold NaN/inf (classes {sorted(set(y.tolist()))})")
    return x.detach(), mask, float(loss.detach())


CHECK_EVERY = 50


def _check(first_bad: torch.Tensor, y: torch.Tensor) -> None:
    if int(first_bad) >= 0:
        raise NonFiniteError(f"refinement loss became NaN/inf at step {int(first_bad)} "
                             f"(classes {sorted(set(y.tolist()))})")
