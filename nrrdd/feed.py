"""The synthetic set fed to relabelling and student training: the student's mixed batches, on the device.

A synthetic set of ImageNet-1K at IPC 50 is 30 GB of fp32 images, at IPC 200 120 GB: copied whole to a GPU
it leaves no room for the model (IPC 100 and up fit on no card), and every process of a node holds its own
copy. So the set stays in host memory (a memory map of ``synthetic.safetensors``, one copy per node
whatever the number of processes) and each step's rows, the samples and their CutMix partners, go to the
device. A set that takes at most ``RESIDENT_FRACTION`` of the device's free memory is copied whole instead
and each step's rows are gathered there.

On a GPU either way, a background thread prepares the steps ahead: it gathers their augmentation choices,
labels (and stored labels) and, for a set in host memory, their image rows into pinned memory, and copies
them to the device on a CUDA stream of its own. The training step then only waits for that copy on the
device: it never waits on the host for the GPU (a ``.to(device)`` of pageable memory would, every step, so
that the host could not queue the next step while the GPU computes). The batches are the same numbers
either way: the augmentation runs on the gathered rows (:func:`nrrdd.augment.mix`) as it would on the whole
set. On the CPU, with the set where it is mapped, the steps are made in the caller's thread as before.
"""
from __future__ import annotations

import concurrent.futures
from collections import deque
from typing import Callable, Iterable, Iterator, NamedTuple

import torch

from .augment import BatchAugment, EpochAugment, batch_augment, mix

# auto placement: the whole set on the device when it takes at most this fraction of the device's free memory
RESIDENT_FRACTION = 0.5


def set_on_device(nbytes: int, device: torch.device, choice: bool | None = None) -> bool:
    """Whether the whole set, ``nbytes`` of images, goes to ``device``. ``choice`` (``--set-on-device``) decides; None (auto): on
    the CPU there is nothing to copy; on CUDA yes when it takes at most ``RESIDENT_FRACTION`` of the free
    memory (the rest is the model's, its activations' and its optimiser's). On the CPU ``False`` gathers each
    batch in the background thread (a copy per step, no copy of the set either way)."""
    device = torch.device(device)
    if choice is not None:
        return choice
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    # memory PyTorch holds in its cache but does not use is free for the set too (e.g. an earlier stage's)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return nbytes <= RESIDENT_FRACTION * free


class Batch(NamedTuple):
    """One step's batch of ``b`` samples, on the device: what :func:`nrrdd.augment.mixed_batch` returns, and the
    rows ``extra`` gave for them (stored labels), if any."""
    x: torch.Tensor         # [b, C, S, S] x_mix
    y_org: torch.Tensor     # [b]
    y_aug: torch.Tensor     # [b] the CutMix partners' labels
    lam: torch.Tensor       # [b] float32
    extra: torch.Tensor | None


class _Step(NamedTuple):
    """A step made ready by :meth:`SetFeed._prepare`: on the device (or, on the CPU, where the set is)."""
    ba: BatchAugment
    labels: torch.Tensor            # [2b]: y_org, then y_aug
    extra: torch.Tensor | None
    rows: torch.Tensor | None       # [2b, C, S, S] images[ba.rows] (None: gather from the set on the device)
    done: "torch.cuda.Event | None"  # the copy's event on the feed's stream


class SetFeed:
    """Mixed batches of the synthetic set on ``device``: images [N, C, S, S] (normalised), labels [N].

    ``resident``: the whole set is copied to the device once, and batches are cut from it there (None:
    :func:`set_on_device` decides). Otherwise the set stays where it is and each step's rows are gathered from
    it. ``ahead``: steps prepared by the background thread before they are needed (CUDA, or a streamed set).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, factor: int, device="cpu",
                 resident: bool | None = None, ahead: int = 2):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:      # the worker thread needs the index
            self.device = torch.device("cuda", torch.cuda.current_device())
        if images.device == self.device != torch.device("cpu"):
            resident = True                     # already on the GPU: nothing to copy, nothing to stream
        elif images.device.type != "cpu":
            raise ValueError(f"the synthetic set is on {images.device}: it must be in host memory or on {self.device}")
        self.resident = set_on_device(images.nbytes, self.device, resident)
        self.images = images.to(self.device) if self.resident else images
        self.labels, self.factor, self.ahead = labels.cpu(), factor, max(1, ahead)
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        # in the caller's thread when there is nothing to overlap: on the CPU with the set where it is
        self._inline = not self._cuda and self.resident

    def batches(self, aug: EpochAugment, index_batches: Iterable[torch.Tensor],
                extra: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[Batch]:
        """A :class:`Batch` for each batch of sample indices; ``extra(idx)``: rows of the caller's own (e.g.
        stored labels, on the CPU) that travel with the batch. Close it (``contextlib.closing``) when not
        consuming all of it: its thread and the batches it holds go then, not when the generator is collected."""
        if self._inline:
            for idx in index_batches:
                yield self._batch(self._prepare(aug, idx, extra))
            return
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nrrdd-feed")
        queue: deque = deque()
        todo = iter(index_batches)
        try:
            for idx in todo:            # the first ``ahead`` steps start before the first is used
                queue.append(pool.submit(self._prepare, aug, idx, extra))
                if len(queue) >= self.ahead:
                    break
            while queue:
                job = queue.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    queue.append(pool.submit(self._prepare, aug, nxt, extra))
                yield self._batch(job.result())
        finally:
            for job in queue:
                job.cancel()
            pool.shutdown(wait=True)

    def _prepare(self, aug: EpochAugment, idx, extra) -> _Step:
        """Gather step ``idx`` on the host; on CUDA copy it to the device on the feed's stream (pinned memory,
        no wait on the host)."""
        ba = batch_augment(aug, idx)
        labels = self.labels[ba.rows]
        ex = extra(ba.rows[:ba.cut.shape[0]]).cpu() if extra is not None else None
        rows = None
        if not self.resident:
            shape = (len(ba.rows),) + tuple(self.images.shape[1:])
            rows = torch.empty(shape, dtype=self.images.dtype, pin_memory=self._cuda)
            torch.index_select(self.images, 0, ba.rows, out=rows)
        if not self._cuda:
            return _Step(ba, labels, ex, rows, None)

        def to_device(t):       # from pinned, dense memory: a copy the host does not wait for
            if t is None:
                return None
            t = t.contiguous()
            return (t if t.is_pinned() else t.pin_memory()).to(self.device, non_blocking=True)

        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            step = _Step(ba.apply(to_device), to_device(labels), to_device(ex), to_device(rows), torch.cuda.Event())
            step.done.record(self._stream)
        return step

    def _batch(self, step: _Step) -> Batch:
        if step.done is not None:   # the compute stream waits for the copy, and owns its memory from here on
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(step.done)
            for t in step.ba.tensors() + [step.labels, step.extra, step.rows]:
                if t is not None:
                    t.record_stream(stream)
        rows = step.rows if step.rows is not None else self.images.index_select(0, step.ba.rows)
        b = step.ba.cut.shape[0]
        return Batch(mix(rows, step.ba, self.factor), step.labels[:b], step.labels[b:], step.ba.lam, step.extra)
