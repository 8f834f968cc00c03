"""Training: the teacher on real data, and the student on a synthetic set (stage 3b), plus evaluation.

The student follows RDED's recipe (METHOD.md, stage 3): replayable ShufflePatches + RandomResizedCrop +
flip + CutMix, AdamW (no decay on biases and norm layers), cosine schedule. Label modes:
``online`` (teacher soft labels per batch, KL at temperature tau), ``soft`` (stored teacher logits),
``dbr`` (CutMix CE + |d(S) - d(T)| on stored distances, ``nrrdd.kernels.DBRLoss``), ``hard`` (CutMix CE).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.distributed as tdist
import torch.nn.functional as F

from nrrdd.kernels import DBRLoss

from .augment import epoch_augment, epoch_order
from .config import RunConfig
from .data import ImageSet, Normalizer
from .feed import SetFeed
from .runtime import QUIET, Runtime, autocast, cosine, progress

if TYPE_CHECKING:
    from .rundir import TrainCheckpoint


def _param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


RECIPES = ("rded", "nrrdd")


def _rded_schedule(epochs: int, steps_per_epoch: int):
    """RDED's factor 0.5 (1 + cos(pi e / 2E)) for epoch e, here stepped per step (constant within an epoch)."""
    return lambda t: 0.5 * (1 + math.cos(math.pi * min(t // steps_per_epoch, epochs) / max(1, epochs) / 2))


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, normalizer: Normalizer, rt: Runtime = QUIET, *,
             batch_size: int = 500, skipped: list | None = None) -> float:
    """Top-1 accuracy (%) of ``model`` on ``data``, read through :func:`nrrdd.loaders.image_batches`.

    Images that cannot be decoded are left out of the accuracy and appended to ``skipped`` as
    (path, reason); callers record them next to the accuracy. ``rt.dist``: each rank evaluates every
    ``world``-th image and the counts are summed (every rank returns the same accuracy)."""
    from .loaders import image_batches

    dist, device = rt.dist, rt.device
    model.eval()
    correct = seen = 0
    src = image_batches(data, normalizer, loader=rt.loader, batch_size=batch_size, workers=rt.workers,
                        device=device, shard_id=dist.rank, num_shards=dist.world)
    for b in src:
        with autocast(device, rt.precision):
            pred = model(b.image).argmax(1).cpu()
        correct += int((pred == b.label).sum())
        seen += len(b.label)
    bad = src.skipped
    if dist.active:
        correct, seen = (int(v) for v in dist.sum([correct, seen]))
        bad = [s for part in dist.all_gather(src.skipped) for s in part]
    if skipped is not None:
        skipped += bad
    if seen == 0:
        raise ValueError(f"no image of the {len(data)} to evaluate could be decoded: {bad[:3]}")
    return 100.0 * correct / seen


@dataclass(frozen=True)
class TeacherSettings:
    """How ``train-teacher`` trains (the RunConfig fields it reads)."""
    epochs: int
    lr: float
    batch_size: int
    seed: int
    weight_decay: float = 5e-4
    flip: bool = True
    compile: bool = False

    @classmethod
    def of(cls, cfg: RunConfig, *, device_type: str = "cpu", n_images: int = 0) -> "TeacherSettings":
        """``n_images``: the training images (with ``device_type``, whether torch.compile pays)."""
        return cls(epochs=cfg.teacher_epochs, lr=cfg.teacher_lr, batch_size=cfg.teacher_batch_size, seed=cfg.seed,
                   weight_decay=cfg.teacher_weight_decay,
                   flip=cfg.dataset != "mnist" if cfg.teacher_flip is None else cfg.teacher_flip,
                   compile=cfg.resolved_compile(device_type, n_images, cfg.teacher_epochs))


def train_teacher(model: nn.Module, train: ImageSet, normalizer: Normalizer, settings: TeacherSettings,
                  rt: Runtime = QUIET, *, skipped: list | None = None,
                  checkpoint: "TrainCheckpoint | None" = None) -> nn.Module:
    """SGD (momentum 0.9, nesterov, ``weight_decay`` on weights only), cosine lr, random 2-px shifts and
    horizontal flips; forward and backward through torch.compile when ``settings.compile``.

    ``checkpoint``: save model, optimiser, scheduler and the augmentation generator every ``checkpoint.every``
    epochs and start from a saved state if there is one (a resumed teacher is the uninterrupted one, bit for bit).
    Images are read through :class:`~nrrdd.loaders.PatchSource` (``loader``: DALI or torch with ``workers``
    decoding processes, for image folders): files that cannot be decoded are left out and appended to
    ``skipped`` as (path, reason), once each."""
    from .loaders import PatchSource

    st, device = settings, rt.device
    epochs, batch_size = st.epochs, st.batch_size
    model.to(device).train()
    opt = torch.optim.SGD(_param_groups(model, st.weight_decay), lr=st.lr, momentum=0.9, nesterov=True)
    steps = epochs * math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: cosine(t, steps))
    g = torch.Generator().manual_seed(st.seed)
    first_epoch = checkpoint.restore(model, opt, sched, rng=g) if checkpoint is not None else 0
    # compiled: one graph per batch shape (full batches and an epoch's last), the weights those of ``model``
    forward = torch.compile(model, dynamic=False) if st.compile else model
    bad: dict[str, str] = {}
    for e in range(first_epoch, epochs):
        perm = torch.randperm(len(train), generator=g)
        src = PatchSource(train, perm, normalizer, loader=rt.loader, batch_size=batch_size, workers=rt.workers)
        bar = progress(src, desc=f"teacher epoch {e + 1}/{epochs}", enable=rt.show_progress,
                       total=math.ceil(len(train) / batch_size))
        for b in bar:
            x, y = b.image, b.label
            x = _shift(x, 2, g)
            if st.flip:
                f = torch.rand(len(x), generator=g) < 0.5
                x = torch.where(f.view(-1, 1, 1, 1), x.flip(-1), x)
            x, y = x.to(device), y.to(device)
            with autocast(device, rt.precision):
                loss = F.cross_entropy(forward(x).float(), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"teacher loss is {loss.item()} at epoch {e}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bad.update((path, reason) for path, reason in src.skipped if path not in bad)
        if len(bad) == len(train):
            raise ValueError(f"none of the {len(train)} training images could be decoded: {list(bad.items())[:3]}")
        if checkpoint is not None and (e + 1) % checkpoint.every == 0 and e + 1 < epochs:
            checkpoint.save(e + 1, model, opt, sched, rng=g)
    if skipped is not None:
        skipped += list(bad.items())
    return model.eval()


def _shift(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (zero padding in normalised space, as RandomCrop(pad))."""
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=g)
    rows = (dy.view(B, 1) + torch.arange(H)).view(B, 1, H, 1).expand(B, C, H, W + 2 * pad)
    xp = xp.gather(2, rows)
    cols = (dx.view(B, 1) + torch.arange(W)).view(B, 1, 1, W).expand(B, C, H, W)
    return xp.gather(3, cols)


DBR_DISTANCES = ("l1", "l2", "smooth-l1")


def dbr_criterion(alpha: float, temperature: float, distance: str, sce_temperature: float | None,
                  reduction: str):
    """The DBR loss ``(logits, y_org, y_aug, lam, d_org_t, d_aug_t) -> loss`` for these settings.

    ``sce_temperature`` None: METHOD.md's loss, one temperature for the CutMix cross-entropy and the distances,
    on the fused kernel (:class:`nrrdd.kernels.DBRLoss`, distances l1 or l2). Otherwise the CutMix
    cross-entropy is taken at ``sce_temperature`` and only the distances at ``temperature`` (those the
    teacher's stored distances were computed at); this variant, and ``smooth-l1`` (Huber, beta 1), run as plain
    PyTorch (:func:`dbr_loss_decoupled`)."""
    if distance not in DBR_DISTANCES:
        raise ValueError(f"unknown DBR distance {distance!r}: {', '.join(DBR_DISTANCES)}")
    if sce_temperature is None and distance != "smooth-l1":
        return DBRLoss(alpha=alpha, temperature=temperature, distance=distance, reduction=reduction)
    t_sce = temperature if sce_temperature is None else sce_temperature
    return lambda *a: dbr_loss_decoupled(*a, alpha=alpha, temperature=temperature, sce_temperature=t_sce,
                                         distance=distance, reduction=reduction)


def dbr_loss_decoupled(logits, y_org, y_aug, lam, d_org_t, d_aug_t, *, alpha: float, temperature: float,
                       sce_temperature: float, distance: str, reduction: str = "mean") -> torch.Tensor:
    """Per row ``lam CE(z/T_sce, y_org) + (1 - lam) CE(z/T_sce, y_aug)
    + alpha (dist(d_org(z/T) - d_org_t) + dist(d_aug(z/T) - d_aug_t))``, with ``d_y(z/T) = -log softmax(z/T)[y]``;
    logits [B, C], labels, lam and the teacher's distances [B]. Mean over rows, or the rows (``"none"``)."""
    z = logits.float()
    yo, ya = y_org.long().view(-1, 1), y_aug.long().view(-1, 1)
    logp_sce = F.log_softmax(z / sce_temperature, 1)
    sce = -lam * logp_sce.gather(1, yo)[:, 0] - (1 - lam) * logp_sce.gather(1, ya)[:, 0]
    logp = logp_sce if temperature == sce_temperature else F.log_softmax(z / temperature, 1)
    eo, ea = -logp.gather(1, yo)[:, 0] - d_org_t.float(), -logp.gather(1, ya)[:, 0] - d_aug_t.float()
    if distance == "l1":
        dist = eo.abs() + ea.abs()
    elif distance == "l2":
        dist = eo * eo + ea * ea
    else:
        dist = F.smooth_l1_loss(eo, torch.zeros_like(eo), reduction="none") + \
            F.smooth_l1_loss(ea, torch.zeros_like(ea), reduction="none")
    rows = sce + alpha * dist
    return rows if reduction == "none" else rows.mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            reduction: str = "mean") -> torch.Tensor:
    """RDED's soft-label loss: KL(softmax(t/T) || softmax(s/T)) per sample; its batch mean, or per sample
    with ``reduction="none"``."""
    s, t = F.log_softmax(student_logits / temperature, 1), F.softmax(teacher_logits / temperature, 1)
    if reduction == "none":
        return F.kl_div(s, t, reduction="none").sum(1)
    return F.kl_div(s, t, reduction="batchmean")


@dataclass(frozen=True)
class StudentSettings:
    """Stage 3's student training settings (the RunConfig fields it reads, resolved for this run)."""
    mode: str                       # label mode: online | soft | dbr | hard
    epochs: int
    batch_size: int
    seed: int
    factor: int
    lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 20.0
    cutmix_alpha: float = 1.0
    alpha_dbr: float = 1.0
    dbr_distance: str = "l1"
    dbr_temperature: float = 1.0
    dbr_sce_temperature: float | None = None
    recipe: str = "rded"
    compile: bool = False
    sync_bn: bool = False
    set_on_device: bool | None = None

    @classmethod
    def of(cls, cfg: RunConfig, *, mode: str, factor: int, num_classes: int, compile: bool = False,
           sync_bn: bool = False) -> "StudentSettings":
        return cls(mode=mode, epochs=cfg.epochs, batch_size=cfg.resolved_batch_size(num_classes), seed=cfg.seed,
                   factor=factor, lr=cfg.lr, weight_decay=cfg.weight_decay, temperature=cfg.temperature,
                   cutmix_alpha=cfg.cutmix_alpha, alpha_dbr=cfg.alpha_dbr, dbr_distance=cfg.dbr_distance,
                   dbr_temperature=cfg.dbr_temperature, dbr_sce_temperature=cfg.dbr_sce_temperature,
                   recipe=cfg.recipe, compile=compile, sync_bn=sync_bn, set_on_device=cfg.set_on_device)


def train_student(student: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: StudentSettings,
                  rt: Runtime = QUIET, *, teacher: nn.Module | None = None, stored: torch.Tensor | None = None,
                  checkpoint: "TrainCheckpoint | None" = None) -> nn.Module:
    """Train ``student`` on normalised synthetic ``images`` [N, C, S, S] with ``labels`` [N].

    ``recipe`` (:data:`RECIPES`): ``nrrdd`` draws CutMix per sample (a derangement as partners) and decays the
    learning rate to 0 by a cosine stepped per step; ``rded`` is RDED's own: one CutMix ratio and box per
    batch, a random permutation of the batch as partners, and the learning rate times
    0.5 (1 + cos(pi e / 2E)) stepped per epoch (it ends at half the initial rate).

    ``compile``: run the student's (and an online teacher's) forward and backward through
    ``torch.compile``. Shapes are static: every batch has ``batch_size`` samples except possibly the last
    of an epoch, so it compiles at most two graphs, once, whatever the number of epochs.

    ``checkpoint``: save model, optimiser and scheduler every ``checkpoint.every`` epochs and start from a
    saved state when there is one (every random choice is keyed by (seed, epoch), so a resumed run
    continues exactly as an uninterrupted one).

    ``dist``: data parallel (DistributedDataParallel). Each step's batch is the one-process batch, split into
    ``world`` parts; every rank's loss is its part's sum / the batch size x world, so the averaged gradient
    is the one-process gradient (up to rounding and BatchNorm statistics per part; ``sync_bn`` converts
    BatchNorm to SyncBatchNorm, CUDA only). Rank 0 writes the checkpoints.

    ``set_on_device``: copy the whole set to the device (None: when it fits, :func:`nrrdd.feed.set_on_device`)
    or leave it in host memory and stream each step's rows there; the batches are the same either way."""
    st, dist, precision = settings, rt.dist, rt.precision
    mode, epochs, batch_size, seed, factor = st.mode, st.epochs, st.batch_size, st.seed, st.factor
    device = torch.device(rt.device)
    if mode == "online" and teacher is None:
        raise ValueError("label mode 'online' needs a teacher")
    if mode in ("soft", "dbr"):
        if stored is None:
            raise ValueError(f"label mode {mode!r} needs stored labels (run `nrrdd relabel --labels {mode}`)")
        if stored.shape[0] < epochs or stored.shape[1] != len(images):
            raise ValueError(f"stored labels cover {stored.shape[0]} epochs x {stored.shape[1]} samples; "
                             f"training needs {epochs} x {len(images)}")
    if mode not in ("online", "soft", "dbr", "hard"):
        raise ValueError(f"unknown label mode {mode!r}: online, soft, dbr or hard")
    if st.recipe not in RECIPES:
        raise ValueError(f"unknown student recipe {st.recipe!r}: {' or '.join(RECIPES)}")
    N, S = images.shape[0], images.shape[-1]
    if dist.active and min(batch_size, N % batch_size or batch_size) < dist.world:
        raise ValueError(f"{dist.world} processes need at least {dist.world} samples in every batch, but the "
                         f"batches hold {batch_size} and {N % batch_size} (synthetic set of {N}): change --batch-size")
    if st.sync_bn:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    student.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    opt = torch.optim.AdamW(_param_groups(student, st.weight_decay), lr=st.lr)
    steps_per_epoch = math.ceil(N / batch_size)
    schedule = ((lambda t: cosine(t, epochs * steps_per_epoch)) if st.recipe == "nrrdd"
                else _rded_schedule(epochs, steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    mix_batch = batch_size if st.recipe == "rded" else 0
    reduction = "none" if dist.active else "mean"          # several processes: per sample, summed below
    dbr = dbr_criterion(st.alpha_dbr, st.dbr_temperature, st.dbr_distance, st.dbr_sce_temperature, reduction)
    first_epoch = checkpoint.restore(student, opt, sched) if checkpoint is not None else 0
    feed = SetFeed(images, labels, factor=factor, device=device, resident=st.set_on_device)
    model = student
    if dist.active:
        model = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda"
                                                    else None)
    fwd_student = torch.compile(model, dynamic=False) if st.compile else model
    fwd_teacher = torch.compile(teacher, dynamic=False) if st.compile and teacher is not None else teacher
    for e in progress(range(first_epoch, epochs), desc=f"student[{mode}]", enable=rt.show_progress and dist.is_main,
                      total=epochs, initial=first_epoch):
        aug = epoch_augment(seed, e, N, S, factor, st.cutmix_alpha, mix_batch)
        order = torch.from_numpy(epoch_order(seed, e, N))
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        starts = range(0, N, batch_size)
        # this rank's part of each step's batch (the whole batch in one process)
        parts = [order[s:s + batch_size].tensor_split(dist.world)[dist.rank] for s in starts]
        # the stored labels of each step travel with its batch (read from the memory-mapped file, copied ahead)
        stored_rows = (lambda idx, e=e: stored[e, idx]) if mode in ("soft", "dbr") else None
        # closed on the way out, also by an exception: the feed's thread and the batches it holds go at once
        with contextlib.closing(feed.batches(aug, parts, extra=stored_rows)) as batches:
            for start, (x, y_org, y_aug, lam, kept) in zip(starts, batches):
                n_step = min(batch_size, N - start)
                with autocast(device, precision):
                    out = fwd_student(x)
                out = out.float()
                if mode == "online":
                    with torch.no_grad(), autocast(device, precision):
                        t = fwd_teacher(x).float()
                    loss = kd_loss(out, t, st.temperature, reduction)
                elif mode == "soft":
                    loss = kd_loss(out, kept.float(), st.temperature, reduction)
                elif mode == "dbr":
                    d = kept.float()
                    loss = dbr(out, y_org, y_aug, lam, d[:, 0], d[:, 1])
                else:
                    loss = (lam * F.cross_entropy(out, y_org, reduction="none")
                            + (1 - lam) * F.cross_entropy(out, y_aug, reduction="none"))
                    loss = loss if dist.active else loss.mean()
                if dist.active:         # this part's share of the batch mean (DDP averages the ranks' gradients)
                    loss = loss.sum() * (dist.world / n_step)
                # remember the first non-finite step without a host sync per step (a GPU stall); checked per epoch
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), start // batch_size,
                                        first_bad)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        bad = dist.first(int(first_bad))          # every rank stops together, at the earliest bad step
        if bad >= 0:
            raise FloatingPointError(f"student loss became NaN/inf at epoch {e}, step {bad} "
                                     f"(label mode {mode}): check the synthetic images and stored labels")
        if checkpoint is not None and dist.is_main and ((e + 1) % checkpoint.every == 0 and e + 1 < epochs):
            checkpoint.save(e + 1, student, opt, sched)
    if dist.active:         # BatchNorm running statistics saw each rank's part only: keep rank 0's everywhere,
        for b in student.buffers():                    # so every rank evaluates the model rank 0 saves
            tdist.broadcast(b, 0)
    return student.eval()
