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
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .data import Normalizer
from .discover import Discovery
from .io import ChunkStore, atomic_save_image, atomic_save_safetensors, atomic_write_json, load_safetensors, versions


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
