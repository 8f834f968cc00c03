"""The synthetic set fed to relabelling and student training: the student's mixed batches, on the device.

A synthetic set of ImageNet-1K at IPC 50 is 30 GB of fp32 images, at IPC 200 120 GB: copied whole to a GPU
it leaves no room for the model (IPC 100 and up fit on no card), and every process of a node holds its own
copy. So the set stays in host memory (a memory map of ``synthetic.safetensors``, one copy per node
whatever the number of processes) and each step's rows, the samples and their CutMix partners, go to the
device: a background thread gathers the rows of the batches ahead into pinned memory and copies them on
their own CUDA stream while the device works on the current batch. A set that takes at most
``RESIDENT_FRACTION`` of the device's free memory is copied whole instead (no per-step copy at all).

Either way the batches are the same numbers: the augmentation runs on the gathered rows, on the device, as
it would on the whole set (``mixed_batch(..., rows=)``).
"""
from __future__ import annotations

import concurrent.futures
from collections import deque
from typing import Iterable, Iterator

import torch

from .augment import EpochAugment, mixed_batch

# auto placement: the whole set on the device when it takes at most this fraction of the device's free memory
RESIDENT_FRACTION = 0.5


def set_on_device(images: torch.Tensor, device: torch.device, choice: bool | None = None) -> bool:
    """Whether the whole set goes to ``device``. ``choice`` (``--set-on-device``) decides; None (auto): on
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
    return images.numel() * images.element_size() <= RESIDENT_FRACTION * free


class SetFeed:
    """Mixed batches of the synthetic set on ``device``: images [N, C, S, S] (normalised), labels [N].

    ``resident``: the whole set is copied to the device once, and batches are cut from it there. Otherwise
    the set stays where it is and ``ahead`` batches are gathered (and copied, on CUDA) in a background thread
    before they are needed.
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
        self.resident = set_on_device(images, self.device, resident)
        self.images = images.to(self.device) if self.resident else images
        self.labels, self.factor, self.ahead = labels, factor, max(1, ahead)
        self._cuda = self.device.type == "cuda" and not self.resident
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None

    def batches(self, aug: EpochAugment, index_batches: Iterable[torch.Tensor]
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """For each batch of sample indices: ``mixed_batch``'s (x_mix, y_org, y_aug, lam), x_mix on the device.
        Close it (``contextlib.closing``) when not consuming all of it: its thread and the batches it holds go
        then, not when the generator is collected."""
        if self.resident:
            for idx in index_batches:
                yield mixed_batch(self.images, self.labels, aug, idx, self.factor)
            return
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nrrdd-feed")
        queue: deque = deque()
        todo = iter(index_batches)
        try:
            for idx in todo:            # the first ``ahead`` batches start before the first is used
                queue.append((idx, pool.submit(self._gather, aug, idx)))
                if len(queue) >= self.ahead:
                    break
            while queue:
                idx, job = queue.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    queue.append((nxt, pool.submit(self._gather, aug, nxt)))
                rows = self._arrived(*job.result())
                yield mixed_batch(self.images, self.labels, aug, idx, self.factor, rows=rows)
        finally:
            for _, job in queue:
                job.cancel()
            pool.shutdown(wait=True)

    def _gather(self, aug: EpochAugment, idx: torch.Tensor):
        """Rows ``idx`` and their CutMix partners, [2b, C, S, S], on the device (an event to wait for on CUDA)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        rows = torch.cat([idx, aug.partner[idx]])
        if not self._cuda:
            return self.images.index_select(0, rows), None
        host = torch.empty((len(rows),) + tuple(self.images.shape[1:]), dtype=self.images.dtype, pin_memory=True)
        torch.index_select(self.images, 0, rows, out=host)
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            dev = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        return dev, done

    def _arrived(self, dev: torch.Tensor, done) -> tuple[torch.Tensor, torch.Tensor]:
        if done is not None:        # the compute stream waits for the copy, and owns the memory from here on
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            dev.record_stream(stream)
        half = dev.shape[0] // 2
        return dev[:half], dev[half:]
