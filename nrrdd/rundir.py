"""What a run folder holds: every file name, the synthetic set's format, and the pieces a killed run resumes from.

A teacher's folder (``nrrdd train-teacher --out DIR``)::

    teacher.pt                     {"model": state_dict}
    teacher.json                   classes, channels, input size, test and validation top-1, hashes
    config_teacher.json            the run's config
    manifest_train_teacher.json    what ran, on what, from which inputs (written last)
    checkpoint_teacher.pt          training state while it runs (resume; removed at the end)

A synthetic set's folder (``nrrdd distill --out DIR``, then ``relabel`` and ``evaluate`` on it)::

    synthetic.safetensors          images (normalised fp32), labels, masks; metadata: space, mean, std, classes
    syn/<class:05d>/class<c:05d>_id<i:05d>.png   the same images as pixels, RDED's layout
    config.json                    the run's config
    manifest_<stage>.json          distill, relabel_<mode>, evaluate_<tag> (each written last by its stage)
    labels_<mode>.safetensors      stored labels (relabel: dbr or soft)
    eval_<tag>.json                a student's result (evaluate)
    resume pieces, removed once their stage's output is written:
    discover.parts/  refine.parts/  labels_<mode>.parts/  checkpoint_<tag>.pt
    .syn.partial/  .syn.old/       the PNG folder while it is written, and while a resumed run swaps it

Stored labels (``labels_<mode>.safetensors``, one tensor ``labels``, float16, sample order; metadata: mode, seed,
factor, cutmix_alpha, temperature, synthetic_sha256, layout, mix_batch when CutMix is per batch):
- ``dbr``: the teacher's two distances per sample per epoch, d_org = -log softmax(T(x_mix)/tau)[y_org] and
  d_aug likewise for y_aug: [E, N, 2].
- ``soft`` (SRe2L/FKD-style): the teacher's logits per sample per epoch: [E, N, C].

The resume stores: :class:`DiscoveryStore` (stage 1's selection), :class:`LabelParts` (relabelling's chunks of
epochs), :class:`TrainCheckpoint` (a teacher's or student's training state); refinement keeps its batches in a
:class:`~nrrdd.io.ChunkStore`.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from PIL import Image

from .data import Normalizer
from .discover import Discovery
from .io import (ChunkStore, atomic_concat_safetensors, atomic_save_image, atomic_save_safetensors, atomic_torch_save,
                 atomic_write_json, load_safetensors, versions)


class RunDir:
    """The paths of one run folder (nothing is created or read here)."""

    def __init__(self, path: str | Path):
        p = self.path = Path(path)
        # a teacher's folder
        self.teacher, self.teacher_config, self.teacher_state = (
            p / "teacher.pt", p / "config_teacher.json", p / "checkpoint_teacher.pt")
        # a synthetic set's folder
        self.synthetic, self.png, self.config = p / "synthetic.safetensors", p / "syn", p / "config.json"
        self.discover_parts, self.refine_parts = p / "discover.parts", p / "refine.parts"

    def manifest(self, stage: str) -> Path: return self.path / f"manifest_{stage}.json"            # noqa: E704
    def labels(self, mode: str) -> Path: return self.path / f"labels_{mode}.safetensors"           # noqa: E704
    def label_parts(self, mode: str) -> Path: return self.path / f"labels_{mode}.parts"            # noqa: E704
    def evaluation(self, tag: str) -> Path: return self.path / f"eval_{tag}.json"                  # noqa: E704
    def student_state(self, tag: str) -> Path: return self.path / f"checkpoint_{tag}.pt"           # noqa: E704


def teacher_meta_path(ckpt: str | Path) -> Path:
    """``teacher.json`` beside a teacher checkpoint (any file name: ``t.pt`` -> ``t.json``)."""
    return Path(ckpt).with_suffix(".json")


def write_manifest(out_dir: str | Path, *, stage: str, config: dict[str, Any], **facts: Any) -> Path:
    """The run manifest: what ran, on what, from which inputs. Written next to the stage's outputs, last."""
    manifest = {"stage": stage, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions(),
                "seed": config.get("seed"), "config": config, **facts}
    return atomic_write_json(RunDir(out_dir).manifest(stage), manifest)


def write_synthetic(out: Path, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                    normalizer: Normalizer, classes: list[str]) -> None:
    """PNG per image in RDED's folder layout (pixel values, lossless) + one safetensors file (exact floats).

    All or nothing: the PNGs go to a hidden staging folder, then the safetensors file is written, then the
    folder is renamed to ``syn``; a failure on the way (a full disk) removes the staging folder, so a reader
    never finds part of a synthetic set (the refinement pieces stay, for --resume). A resumed run making its
    set again replaces both: the file atomically, the folder by a swap."""
    run = RunDir(out)
    staging = run.path / ".syn.partial"
    shutil.rmtree(staging, ignore_errors=True)          # left by a run killed while writing
    try:
        counts: dict[int, int] = {}
        for img, c in zip(images, labels.tolist()):
            i = counts.get(c, 0)
            counts[c] = i + 1
            # one image at a time: a whole-set pixel copy would hold the set (tens of GB at ImageNet scale) twice
            pixels = (normalizer.inverse(img[None]).clamp(0, 1) * 255).round().to(torch.uint8)[0]
            arr = pixels.permute(1, 2, 0).numpy()
            pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
            atomic_save_image(staging / f"{c:05d}" / f"class{c:05d}_id{i:05d}.png", pil)
        atomic_save_safetensors(run.synthetic,
                                {"images": images.float(), "labels": labels.long(), "masks": masks.float()},
                                metadata={"space": "normalised", "mean": json.dumps(normalizer.mean.tolist()),
                                          "std": json.dumps(normalizer.std.tolist()), "classes": json.dumps(classes)})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    final, old = run.png, run.path / ".syn.old"
    if final.exists():          # a resumed run making its set again: swap the folders, then drop the old one
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def unfinished_set(out: Path) -> bool:
    """A distillation killed after it began writing its set, before its manifest: the set's file there, its PNG
    folder staged or published, no manifest."""
    run = RunDir(out)
    return (run.synthetic.exists() and not run.manifest("distill").exists()
            and ((run.path / ".syn.partial").is_dir() or run.png.is_dir()))


def read_synthetic(syn_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """The synthetic set of a distillation's folder: images, labels, masks and metadata; NaN/inf images refused."""
    path = RunDir(syn_dir).synthetic
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `nrrdd distill --out {syn_dir}` first")
    t, meta = load_safetensors(path)
    # in chunks: a whole-set mask would be a quarter of the set's size (7.5 GB at ImageNet IPC 50)
    bad = torch.cat([~torch.isfinite(c).flatten(1).all(1) for c in t["images"].split(256)]).nonzero().flatten()
    if len(bad):
        raise ValueError(f"{path}: {len(bad)} synthetic image(s) hold NaN/inf (images {bad[:10].tolist()}, classes "
                         f"{sorted(set(t['labels'][bad].tolist()))[:10]}): rerun `nrrdd distill` for this set")
    return t["images"], t["labels"], t.get("masks"), meta


class DiscoveryStore:
    """Stage 1's selection kept for a resumed distillation: ``discovered.safetensors`` (labels; carrying the
    run's identity) and ``discovered.json`` (per-patch sources, skipped files), the JSON written first, so the
    safetensors file's presence means both are complete. No pixels: :func:`~nrrdd.discover.assemble` cuts them
    again."""

    def __init__(self, folder: Path, identity: dict):
        self.store = ChunkStore(folder, identity)

    def exists(self) -> bool:
        return self.store.exists()

    def save(self, d: Discovery) -> None:
        atomic_write_json(self.store.folder / "discovered.json",
                          {"sources": d.sources, "skipped": d.skipped, "loader": d.loader})
        self.store.save("discovered", {"labels": d.labels})

    def load(self) -> Discovery | None:
        got = self.store.load("discovered")
        if got is None:
            return None
        facts = json.loads((self.store.folder / "discovered.json").read_text())
        return Discovery(None, got[0]["labels"], facts["sources"], facts["skipped"], facts["loader"])

    def remove(self) -> None:
        self.store.remove()


_MISSING = object()


class TrainCheckpoint:
    """Training state (a student's or a teacher's) at an epoch boundary, in one file written atomically.

    ``identity`` (e.g. the run's config without runtime fields) is stored with it; a saved state that differs
    from it in one of its keys is refused, so a resume never mixes two configurations. Keys of the saved
    identity that ``identity`` lacks are not compared: what the current code says a stage does not depend on
    (a teacher's checkpoint saved with a run's student settings resumes under other ones)."""

    def __init__(self, path, identity: dict, every: int = 1):
        if every < 1:
            raise ValueError(f"checkpoint interval must be >= 1 epoch, got {every}")
        self.path, self.identity, self.every = Path(path), identity, every

    def save(self, epoch: int, model: nn.Module, opt, sched, rng: torch.Generator | None = None) -> None:
        state = {"epoch": epoch, "identity": self.identity, "model": model.state_dict(),
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
        if rng is not None:
            state["rng"] = rng.get_state()
        atomic_torch_save(self.path, state)

    def restore(self, model: nn.Module, opt, sched, rng: torch.Generator | None = None) -> int:
        """The epoch to start from: 0, or the saved one after loading its state (and ``rng``'s, if saved)."""
        if not self.path.exists():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        diff = sorted(k for k in self.identity if state["identity"].get(k, _MISSING) != self.identity[k])
        if diff:
            raise ValueError(f"{self.path} was saved by a run with other settings ({', '.join(diff)}): "
                             "it cannot be resumed with these; remove it or use another --out")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if rng is not None:
            rng.set_state(state["rng"])
        return int(state["epoch"])

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class LabelParts:
    """Label chunks of a relabelling in progress, ``epochs_<a>-<b>`` pieces of a :class:`ChunkStore`."""

    def __init__(self, folder: str | Path, identity: dict, every: int):
        self.store, self.every = ChunkStore(folder, identity), max(1, every)
        self.folder = self.store.folder
        self._saved = 0

    def exists(self) -> bool:
        return self.store.exists()

    def _chain(self) -> list[tuple[Path, int]]:
        """The chunks from epoch 0 on, each starting where the one before ends (identities checked)."""
        chain, done = [], 0
        while True:
            path = next(iter(sorted(self.folder.glob(f"epochs_{done:05d}-*.safetensors"))), None)
            if path is None:
                return chain
            self.store.load(path.stem, tensors=False)
            upto = int(path.stem.rsplit("-", 1)[1])
            if upto <= done:
                raise ValueError(f"{path}: a chunk must hold at least one epoch after epoch {done}")
            done = upto
            chain.append((path, done))

    def first_epoch(self) -> int:
        """The first epoch no chunk holds yet: where a resumed relabelling starts (headers read, not labels)."""
        chain = self._chain()
        self._saved = chain[-1][1] if chain else 0
        return self._saved

    def save(self, chunk: torch.Tensor, start: int, upto: int) -> None:
        """The labels of epochs ``start`` .. ``upto - 1``, [upto - start, N, W]."""
        if start != self._saved or chunk.shape[0] != upto - start:
            raise ValueError(f"label chunk of epochs {start}..{upto} after epoch {self._saved}: chunks go in order")
        self.store.save(f"epochs_{start:05d}-{upto:05d}", {"labels": chunk})
        self._saved = upto

    def pieces(self, epochs: int) -> list[Path]:
        """The chunk files of epochs 0 .. ``epochs - 1``, in order; raises if any epoch is missing."""
        chain = self._chain()
        if not chain or chain[-1][1] != epochs:
            raise RuntimeError(f"{self.folder} holds labels of epochs 0..{chain[-1][1] if chain else 0}, "
                               f"not of all {epochs}: every rank must see the same output folder")
        return [path for path, _ in chain]

    def write(self, path: str | Path, epochs: int, *, mode: str, seed: int, factor: int, cutmix_alpha: float,
              temperature: float, synthetic_sha256: str, mix_batch: int = 0) -> Path:
        """The label file of ``epochs`` epochs (what :func:`save_labels` writes, to the byte) from the chunks,
        streamed."""
        return atomic_concat_safetensors(path, "labels", self.pieces(epochs), metadata=_label_meta(
            mode, seed, factor, cutmix_alpha, temperature, synthetic_sha256, mix_batch))

    def remove(self) -> None:
        self.store.remove()


def _label_meta(mode: str, seed: int, factor: int, cutmix_alpha: float, temperature: float,
                synthetic_sha256: str, mix_batch: int = 0) -> dict[str, str]:
    meta = {"mode": mode, "seed": str(seed), "factor": str(factor), "cutmix_alpha": repr(cutmix_alpha),
            "temperature": repr(temperature), "synthetic_sha256": synthetic_sha256,
            "layout": "[epoch, sample, 2=(d_org,d_aug)]" if mode == "dbr" else "[epoch, sample, class logits]"}
    if mix_batch:                   # RDED's per-batch CutMix: the labels hold only for this batch size
        meta["mix_batch"] = str(mix_batch)
    return meta


def save_labels(path: str | Path, labels: torch.Tensor, *, mode: str, seed: int, factor: int, cutmix_alpha: float,
                temperature: float, synthetic_sha256: str, mix_batch: int = 0) -> Path:
    meta = _label_meta(mode, seed, factor, cutmix_alpha, temperature, synthetic_sha256, mix_batch)
    return atomic_save_safetensors(path, {"labels": labels}, metadata=meta)


def load_labels(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    tensors, meta = load_safetensors(path)
    if "labels" not in tensors:
        raise ValueError(f"{path} holds no 'labels' tensor; is it a file written by `nrrdd relabel`?")
    return tensors["labels"], meta
