"""Stage 3a: stored labels for E epochs of the replayable augmentation: ``dbr`` (two teacher distances per
sample per epoch) or ``soft`` (the teacher's logits). Their file format and resume chunks: :mod:`nrrdd.rundir`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from nrrdd.kernels import dbr_distances

from .augment import epoch_augment
from .config import RunConfig
from .feed import SetFeed
from .runtime import QUIET, Runtime, autocast, progress

if TYPE_CHECKING:
    from .rundir import LabelParts

STORED = ("dbr", "soft")                # the label modes relabel writes (and evaluate reads from its files)


@dataclass(frozen=True)
class RelabelSettings:
    """Stage 3a's settings: which labels, for which epochs of which replayable augmentation."""
    mode: str                       # dbr | soft
    epochs: int
    seed: int
    factor: int
    cutmix_alpha: float = 1.0
    temperature: float = 1.0        # of the DBR distances
    batch_size: int = 256
    mix_batch: int = 0              # the student recipe's CutMix batch (0: per sample)
    set_on_device: bool | None = None

    @classmethod
    def of(cls, cfg: RunConfig, *, mode: str, factor: int, num_classes: int) -> "RelabelSettings":
        """The labels a student of ``cfg`` replays: its epochs, seed, CutMix and batches."""
        return cls(mode=mode, epochs=cfg.epochs, seed=cfg.seed, factor=factor, cutmix_alpha=cfg.cutmix_alpha,
                   temperature=cfg.dbr_temperature if mode == "dbr" else 1.0,
                   batch_size=max(1, cfg.resolved_batch_size(num_classes)),
                   mix_batch=cfg.resolved_mix_batch(num_classes), set_on_device=cfg.set_on_device)


@torch.no_grad()
def relabel(teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: RelabelSettings,
            rt: Runtime = QUIET, *, parts: "LabelParts | None" = None) -> torch.Tensor | None:
    """Returns float16 [E, N, 2] (dbr) or [E, N, C] (soft), in sample order.

    ``mix_batch``: the student recipe's CutMix batch (:func:`nrrdd.augment.epoch_augment`; 0: per sample).

    ``parts``: write the labels in chunks of ``parts.every`` epochs as they are made, and start after the
    chunks already there (a killed run resumes; epoch e's labels depend only on (seed, e)). The labels then
    stay on disk, in the chunks (a chunk at a time in memory: soft labels of ImageNet-1K at IPC 50 x 300
    epochs are 30 GB): returns None, and :meth:`LabelParts.write` makes the label file from them.
    ``dist``: sample batch ``k`` of epoch ``e`` (the same batches as in one process) is computed by rank
    ``(e * batches_per_epoch + k) % world``; rank 0 collects them at every chunk (and, without ``parts``,
    returns the labels), the other ranks return None.
    ``set_on_device``: copy the whole set to the device (None: when it fits, :func:`nrrdd.feed.set_on_device`)
    or leave it in host memory and stream each batch's rows there."""
    st, dist, precision = settings, rt.dist, rt.precision
    mode, epochs, seed, factor, batch_size = st.mode, st.epochs, st.seed, st.factor, st.batch_size
    if mode not in STORED:
        raise ValueError(f"relabel mode must be 'dbr' or 'soft', not {mode!r}")
    teacher.eval()
    device = torch.device(rt.device)
    N, S = images.shape[0], images.shape[-1]
    feed = SetFeed(images, labels, factor=factor, device=device, resident=st.set_on_device)
    n_batches = -(-N // batch_size)
    out, first = None, (parts.first_epoch() if parts is not None else 0)
    # every rank has found where to start before rank 0 can finish (all chunks there) and remove the chunks
    dist.barrier()
    chunk_start = first
    pending: dict[tuple[int, int], torch.Tensor] = {}       # (epoch, batch) -> labels not yet collected
    for e in progress(range(first, epochs), desc=f"relabel[{mode}]", enable=rt.show_progress and dist.is_main,
                      total=epochs, initial=first):
        aug = epoch_augment(seed, e, N, S, factor, st.cutmix_alpha, st.mix_batch)
        mine = [k for k in range(n_batches) if dist.owns(e * n_batches + k)]
        index_batches = [torch.arange(k * batch_size, min(N, (k + 1) * batch_size)) for k in mine]
        # the first non-finite batch, kept on the device and read once per epoch: no host sync per batch
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        made: list[torch.Tensor] = []                       # this epoch's labels, on the device until its end
        with contextlib.closing(feed.batches(aug, index_batches)) as batches:    # its thread goes on any exit
            for k, (x, y_org, y_aug, _, _) in zip(mine, batches):
                with autocast(device, precision):
                    logits = teacher(x)
                if mode == "dbr":
                    d_org, d_aug = dbr_distances(logits.float(), y_org, y_aug, st.temperature)
                    vals = torch.stack([d_org, d_aug], 1)
                else:
                    vals = logits.float()
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(vals).all(), k, first_bad)
                made.append(vals.half())
        bad = dist.first(int(first_bad))                    # every rank stops, at the earliest bad batch
        if bad >= 0:
            raise FloatingPointError(f"teacher produced NaN/inf labels at epoch {e}, samples {bad * batch_size}..")
        if made:                                            # one copy to the host per epoch
            for k, v in zip(mine, torch.cat(made).cpu().split([len(i) for i in index_batches])):
                pending[e, k] = v.clone()       # its own storage: a view would pickle the whole epoch's
        chunk_end = e + 1 == epochs or (parts is not None and (e + 1) % parts.every == 0)
        if chunk_end:
            collected = dist.gather(pending)
            pending = {}
            if dist.is_main:
                chunk = None                                # epochs chunk_start .. e, all samples
                for piece in collected:
                    for (pe, k), v in piece.items():
                        if chunk is None:
                            chunk = torch.empty(e + 1 - chunk_start, N, v.shape[-1], dtype=torch.float16)
                        chunk[pe - chunk_start, k * batch_size:k * batch_size + len(v)] = v
                if parts is not None:
                    parts.save(chunk, chunk_start, e + 1)
                else:                                       # no parts: one chunk, every epoch
                    out = chunk
            chunk_start = e + 1
    return out if dist.is_main and parts is None else None
