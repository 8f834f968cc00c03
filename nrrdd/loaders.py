"""Image sources for stage 1 (candidate patches) and for evaluation, with two backends of one meaning.

A source walks a list of dataset indices in order and yields :class:`PatchBatch` es: labels, the whole
image at the model's input size (what the CAM sees) and ``num_crop`` square crops of each, all normalised.
Everything random or geometric is decided in Python, identically for both backends: the resize size and
centre-crop window come from the file header (:func:`nrrdd.data.center_geometry`), the crop boxes from a
function of the image index (discovery uses ``(seed, image index)``). A backend only decodes and resamples:

- ``torch``: PIL decoding, torch's antialiased bilinear resize of the image and of each crop box
  (:func:`nrrdd.augment.resize_boxes`), in DataLoader workers.
- ``dali``: NVIDIA DALI. Decoding on the CPU (``device_id=None``), or nvJPEG on the GPU (``"mixed"``)
  when the run's device is CUDA; antialiased linear resize of the image and of each cut-out crop box.

On the 20 ImageNet JPEGs of the ``foolbox`` wheel the two agree to a mean absolute difference of 0.01
(whole images) and 0.03 (crops) grey levels out of 255, 99% of values within 1 level; single pixels
differ by up to ~20 levels where the two libraries' filter windows differ at high-contrast edges.

In-memory datasets (Fashion-MNIST, MNIST, CIFAR) always take the torch path without workers and cut
crops with :func:`nrrdd.augment.crop_resize` (``roi_align``), as the results in docs/results.md were made.

Bad files: every file is screened first (:func:`nrrdd.data.check_image_file`; cheap, no decoding), and a
file whose decoding still fails is skipped too. Skipped files are listed in ``source.skipped`` as
``(path, reason)`` and end up in the run manifest; they never stop the run or shift other images' crops.

Sharding: ``shard_id`` / ``num_shards`` give each process every ``num_shards``-th image of the list, so each
image is seen exactly once over all shards and its crops do not depend on the number of shards.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .augment import crop_resize, resize_boxes
from .data import (FolderImageSet, ImageSet, Normalizer, center_geometry, check_image_file, decode_rgb,
                   image_header_size, resize_center_crop)
from .dist import SINGLE, Dist

LOADERS = ("auto", "dali", "torch")
BoxFn = Callable[[int], np.ndarray]      # dataset index -> int64 [K, 4] boxes (top, left, h, w)


@dataclass
class PatchBatch:
    index: torch.Tensor                  # [b] dataset indices (of the set the source was built on)
    label: torch.Tensor                  # [b] int64
    image: torch.Tensor                  # [b, C, S, S] float32, normalised
    crops: torch.Tensor | None           # [b, K, C, s, s] float32, normalised; None when num_crop is 0
    boxes: torch.Tensor | None           # [b, K, 4] int64 (top, left, h, w) in the coordinates of ``image``


def dali_available() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ImportError:                 # no `nvidia` namespace at all (CPU-only installs)
        return False


def resolve_loader(loader: str, data: ImageSet) -> str:
    """The backend a run uses: ``auto`` is DALI for image folders when DALI is installed, else torch.

    In-memory datasets always use the torch path (their pixels are already decoded)."""
    if loader not in LOADERS:
        raise ValueError(f"--loader must be one of {', '.join(LOADERS)}, not {loader!r}")
    folder = isinstance(data.locate([])[0], FolderImageSet)
    if loader == "dali" and not dali_available():
        raise ImportError("--loader dali needs NVIDIA DALI: `pip install 'nrrdd[dali]'` (nvidia-dali-cuda130)")
    if not folder:
        return "torch"
    if loader == "auto":
        return "dali" if dali_available() else "torch"
    return loader


class PatchSource:
    """Iterate ``indices`` of ``data`` in order (this shard's part of them) as :class:`PatchBatch` es."""

    def __init__(self, data: ImageSet, indices, normalizer: Normalizer, *, crop_size: int = 0,
                 boxes: BoxFn | None = None, loader: str = "auto", batch_size: int = 256, workers: int = 2,
                 device: torch.device | str = "cpu", shard_id: int = 0, num_shards: int = 1,
                 dist: Dist = SINGLE):
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} is not in [0, {num_shards})")
        if (boxes is None) != (crop_size == 0):
            raise ValueError("give both crop_size and boxes (crops), or neither (whole images only)")
        self.data, self.normalizer = data, normalizer
        self.indices = torch.as_tensor(indices, dtype=torch.long)[shard_id::num_shards]
        self.crop_size, self.boxes = crop_size, boxes
        self.backend = resolve_loader(loader, data)
        self.batch_size, self.workers = batch_size, workers
        self.device = torch.device(device)
        self.dist = dist
        self.skipped: list[tuple[str, str]] = []
        self.screened_out: list[tuple[str, str]] = []
        base, base_idx = data.locate(self.indices)
        self._folder = base if isinstance(base, FolderImageSet) else None
        self._base_idx = base_idx

    def __iter__(self) -> Iterator[PatchBatch]:
        self.skipped = []
        if self._folder is None:
            yield from self._iter_memory()
            return
        jobs = self._mine(self._screen())
        if self.backend == "dali":
            yield from _DaliRunner(self, jobs).batches()
        else:
            yield from self._iter_torch_folder(jobs)

    # ---- shared -------------------------------------------------------------------------------------
    def _job_boxes(self, i: int) -> np.ndarray:
        if self.boxes is None:
            return np.zeros((0, 4), dtype=np.int64)
        return np.asarray(self.boxes(i), dtype=np.int64).reshape(-1, 4)

    def _mine(self, items: list) -> list:
        """With ``dist``: the batches (``batch_size`` items, cut from the whole list) this rank owns, batch ``k``
        to rank ``k % world``, so every batch holds the same items as in one process."""
        if not self.dist.active:
            return items
        bs = self.batch_size
        return [x for k in self.dist.mine(-(-len(items) // bs)) for x in items[k * bs:(k + 1) * bs]]

    def _screen(self) -> list["_Job"]:
        """Cheap per-file checks and the geometry each backend applies; bad files go to ``skipped``. With
        ``dist`` each rank checks every ``world``-th file and all ranks get every result."""
        f = self._folder
        indices, base_idx = self.indices.tolist(), self._base_idx.tolist()
        checked = {}
        for p in range(self.dist.rank, len(indices), self.dist.world):
            path, label = f.samples[base_idx[p]]
            reason = check_image_file(path)
            if reason is None:
                try:
                    h, w = image_header_size(path)
                except Exception as e:  # noqa: BLE001
                    reason = f"unreadable image header: {e}"
            checked[p] = (path, reason) if reason is not None else _Job(
                indices[p], path, label, center_geometry(h, w, f.resize, f.size), self._job_boxes(indices[p]))
        if self.dist.active:
            checked = {p: r for part in self.dist.all_gather(checked) for p, r in part.items()}
        jobs = []
        for p in range(len(indices)):
            if isinstance(checked[p], _Job):
                jobs.append(checked[p])
            else:
                self.screened_out.append(checked[p])
        self.skipped += self.screened_out
        return jobs

    def _finish(self, index, label, image, crops, boxes) -> PatchBatch:
        """Normalise on the run's device; crops are resampled from the normalised image (linear)."""
        image = self.normalizer(image.to(self.device, non_blocking=True))
        if self.crop_size:
            b, K = boxes.shape[:2]
            if crops is None:
                crops = crop_resize(image.repeat_interleave(K, 0), boxes.reshape(b * K, 4), self.crop_size)
                crops = crops.view(b, K, *crops.shape[1:])
            else:
                crops = self.normalizer(crops.to(self.device).flatten(0, 1)).view_as(crops)
        return PatchBatch(index, label, image, crops, boxes if self.crop_size else None)

    # ---- torch: in-memory arrays --------------------------------------------------------------------
    def _iter_memory(self) -> Iterator[PatchBatch]:
        indices = torch.as_tensor(self._mine(self.indices.tolist()), dtype=torch.long)
        for start in range(0, len(indices), self.batch_size):
            idx = indices[start:start + self.batch_size]
            x = self.data.load(idx)
            boxes = torch.from_numpy(np.stack([self._job_boxes(i) for i in idx.tolist()])) if self.crop_size else None
            yield self._finish(idx, self.data.labels[idx], x, None, boxes)

    # ---- torch: image folders, decoded in DataLoader workers ----------------------------------------
    def _iter_torch_folder(self, jobs: list["_Job"]) -> Iterator[PatchBatch]:
        ds = _DecodeDataset(jobs, self._folder.size, self.crop_size)
        chunks = [list(range(s, min(len(jobs), s + self.batch_size))) for s in range(0, len(jobs), self.batch_size)]
        dl = torch.utils.data.DataLoader(ds, batch_size=None, sampler=chunks, num_workers=self.workers,
                                         persistent_workers=False, prefetch_factor=2 if self.workers else None)
        for ok, images, crops, failed in dl:
            self.skipped += failed
            if not ok:
                continue
            sel = [jobs[j] for j in ok]
            yield self._finish(torch.tensor([j.index for j in sel]), torch.tensor([j.label for j in sel]),
                               images, crops, self._stack_boxes(sel))

    def _stack_boxes(self, sel: list["_Job"]) -> torch.Tensor | None:
        return torch.from_numpy(np.stack([j.boxes for j in sel])) if self.crop_size else None


@dataclass
class _Job:
    index: int                     # dataset index
    path: str
    label: int
    geom: tuple[int, int, int, int]   # resized (h, w), crop (top, left)
    boxes: np.ndarray              # [K, 4]


class _DecodeDataset(torch.utils.data.Dataset):
    """One DataLoader item = one chunk of jobs: decoded, resized, centre-cropped and cut into crops, in
    pixel units."""

    def __init__(self, jobs: list[_Job], size: int, crop_size: int):
        self.jobs, self.size, self.crop_size = jobs, size, crop_size

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, chunk: list[int]):
        ok, images, crops, failed = [], [], [], []
        for j in chunk:
            job = self.jobs[j]
            try:
                x = decode_rgb(job.path)
            except ValueError as e:
                failed.append((job.path, f"cannot decode: {e.__cause__ or e}"))
                continue
            x = resize_center_crop(x.float().div_(255), job.geom, self.size)
            if self.crop_size:
                crops.append(resize_boxes(x, torch.from_numpy(job.boxes), self.crop_size))
            images.append(x)
            ok.append(j)
        return (ok, torch.stack(images) if images else None, torch.stack(crops) if crops else None, failed)


# ---- DALI ------------------------------------------------------------------------------------------
class _DaliRunner:
    """Runs the jobs through DALI pipelines, batch by batch.

    A DALI pipeline whose decoder meets a bad file is dead for good; the files were screened, but if one
    still fails, the batch's files are tried one by one in fresh pipelines, the failing ones are skipped,
    and a new pipeline resumes from that batch.
    """

    def __init__(self, src: PatchSource, jobs: list[_Job]):
        self.src, self.jobs = src, jobs
        self.size = src._folder.size
        self.K = len(jobs[0].boxes) if jobs and src.crop_size else 0
        self.gpu = src.device.type == "cuda"

    def batches(self) -> Iterator[PatchBatch]:
        chunks = [self.jobs[s:s + self.src.batch_size] for s in range(0, len(self.jobs), self.src.batch_size)]
        done = 0
        while done < len(chunks):
            pipe = self._pipeline(chunks[done:], self.src.batch_size)
            failed = None
            while done < len(chunks):
                try:
                    outs = pipe.run()
                except StopIteration:
                    break
                except RuntimeError as e:
                    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
                        raise
                    failed = e
                    break
                yield self._to_batch(chunks[done], outs)
                done += 1
            del pipe
            if failed is None:
                break
            # the failing batch is the next one or (prefetching) the one after: find its bad files with the
            # CPU decoder alone, skip them, and resume from that batch in a new pipeline
            bad = [j for c in chunks[done:done + 2] for j in c if not self._decodes(j)]
            if not bad:
                raise failed
            for j in bad:
                self.src.skipped.append((j.path, "cannot decode: DALI's image decoder failed on it"))
            bad_ids = {id(j) for j in bad}
            for k in range(done, min(done + 2, len(chunks))):
                chunks[k] = [j for j in chunks[k] if id(j) not in bad_ids]
            chunks = chunks[:done] + [c for c in chunks[done:] if c]

    def _decodes(self, job: _Job) -> bool:
        """Does DALI's CPU decoder alone accept this file? (Decoding only and on the CPU, so neither a fault
        elsewhere in the pipeline nor a full GPU is blamed on the file.)"""
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def pipe():
            enc = fn.external_source(source=lambda: [np.fromfile(job.path, dtype=np.uint8)], batch=True)
            return fn.decoders.image(enc, device="cpu", output_type=types.RGB, adjust_orientation=False)

        p = pipe()
        p.build()
        try:
            p.run()
            return True
        except (RuntimeError, OSError):
            return False

    def _pipeline(self, chunks: list[list[_Job]], batch_size: int):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali import math as dmath

        S, s, K = self.size, self.src.crop_size, self.K

        def feed():
            for chunk in chunks:
                enc, kept = [], []
                for j in chunk:
                    try:
                        enc.append(np.fromfile(j.path, dtype=np.uint8))
                        kept.append(j)
                    except OSError as e:            # changed or removed since it was screened
                        self.src.skipped.append((j.path, f"cannot read: {e}"))
                if not kept:
                    raise RuntimeError(f"every file of a batch became unreadable during the run "
                                       f"({chunk[0].path}, ...)")
                chunk[:] = kept                     # in place: batches() pairs outputs with this list

                hw = [np.array(j.geom[:2], dtype=np.float32) for j in chunk]
                anchor = [np.array(j.geom[2:], dtype=np.int32) for j in chunk]
                rois = []
                for k in range(K):
                    rois.append([j.boxes[k, :2].astype(np.int32) for j in chunk])
                    rois.append([j.boxes[k, 2:].astype(np.int32) for j in chunk])
                yield (enc, hw, anchor, *rois)

        @pipeline_def(batch_size=batch_size, num_threads=max(1, self.src.workers),
                      device_id=self.src.device.index or 0 if self.gpu else None, prefetch_queue_depth=2)
        def pipe():
            enc, hw, anchor, *rois = fn.external_source(source=feed, num_outputs=3 + 2 * K, batch=True,
                                                        cycle=False)
            img = fn.decoders.image(enc, device="mixed" if self.gpu else "cpu", output_type=types.RGB,
                                    adjust_orientation=False)
            img = fn.resize(img, size=hw, interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT)
            full = fn.slice(img, start=anchor, shape=[S, S], axis_names="HW")
            full = dmath.clamp(full, 0.0, 255.0) / 255.0
            outs = [fn.transpose(full, perm=[2, 0, 1])]
            # cut the box, then resize it (not a resize with an ROI, which would let the filter read pixels
            # outside the box): the same as the torch backend's resize_boxes
            crops = [fn.resize(fn.slice(full, start=rois[2 * k], shape=rois[2 * k + 1], axis_names="HW"),
                               size=(s, s), interp_type=types.INTERP_LINEAR, antialias=True)
                     for k in range(K)]
            if K:
                outs.append(fn.transpose(fn.stack(*crops), perm=[0, 3, 1, 2]))
            return tuple(outs)

        p = pipe()
        p.build()
        return p

    def _to_batch(self, chunk: list[_Job], outs) -> PatchBatch:
        image = _dali_to_torch(outs[0])
        crops = _dali_to_torch(outs[1]) if self.K else None
        return self.src._finish(torch.tensor([j.index for j in chunk]), torch.tensor([j.label for j in chunk]),
                                image, crops, self.src._stack_boxes(chunk))


def _dali_to_torch(tl) -> torch.Tensor:
    """A DALI TensorList of equal-shaped samples -> one torch tensor (on the GPU for GPU outputs)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    t = tl.as_tensor()
    if type(t).__name__ != "TensorGPU":
        out = torch.empty(t.shape(), dtype=torch.float32)
        feed_ndarray(t, out)
        return out
    dev = torch.device("cuda", t.device_id())            # the GPU the pipeline ran on
    with torch.cuda.device(dev):
        out = torch.empty(t.shape(), dtype=torch.float32, device=dev)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(dev))
    return out


def image_batches(data: ImageSet, normalizer: Normalizer, *, loader: str = "auto", batch_size: int = 500,
                  workers: int = 2, device: torch.device | str = "cpu", shard_id: int = 0,
                  num_shards: int = 1) -> PatchSource:
    """The validation source: every image of ``data`` (resized as the set says: for an image-folder test
    split, short side to ``input_size * 8 / 7`` and a centre crop), normalised, in order."""
    return PatchSource(data, torch.arange(len(data)), normalizer, loader=loader, batch_size=batch_size,
                       workers=workers, device=device, shard_id=shard_id, num_shards=num_shards)
