"""SRe2L / FKD soft-label folders: read them without unpickling code, and convert them to one safetensors file.

SRe2L's relabelling (FKD with mixing) writes ``<fkd_path>/epoch_<e>/batch_<b>.tar`` with ``torch.save`` of a list

    [coords [B, 4] float   RandomResizedCrop box as fractions (top/H, left/W, height/H, width/W),
     flip [B] bool         horizontal flip per sample,
     mix_index [B] int64   CutMix/Mixup partner, a position inside the batch (None without mixing),
     mix_lam float         the batch's Beta draw (None without mixing); for CutMix the pasted area follows
                           from the box (clipped), not from this value,
     mix_bbox [4]          CutMix box [r1, c1, r2, c2] in pixels, numpy integers: SRe2L pastes
                           images[:, :, r1:r2, c1:c2] (its rand_bbox names them x/y but cuts rows
                           first); None for Mixup / no mixing,
     soft_label [B, C]     the teacher's logits (float16 with --use-fp16)]

for every batch of every epoch, the batches in the order of a ``RandomSampler`` seeded with ``--fkd-seed``.

Those files hold numpy integers, so ``torch.load(weights_only=True)`` (PyTorch's default since 2.6) refuses
them and users patch ``torch.load`` or pass ``weights_only=False``, which runs whatever code a file holds.
:func:`read_batch` loads them with ``weights_only=True`` and allows exactly numpy's scalar and dtype
reconstruction besides tensors (``torch.serialization.safe_globals``); any other object in a file is refused.
:func:`convert` writes the whole folder as one safetensors file (see its docstring for the layout).
"""
from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .io import atomic_save_safetensors


@dataclass
class FKDBatch:
    coords: torch.Tensor                # [B, 4] float32
    flip: torch.Tensor                  # [B] bool
    mix_index: torch.Tensor | None      # [B] int64, positions inside the batch
    mix_lam: float | None
    mix_bbox: list[int] | None          # r1, c1, r2, c2: rows r1:r2, columns c1:c2
    soft_label: torch.Tensor            # [B, C]


def _numpy_globals() -> list:
    """What a numpy integer or float in a pickle needs: the scalar constructor and the dtypes, under the module
    names numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) write."""
    core = np._core if hasattr(np, "_core") else np.core      # noqa: NPY201 - numpy 1 and 2
    scalar = core.multiarray.scalar
    allowed: list = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def _to_int_list(v) -> list[int] | None:
    if v is None:
        return None
    return [int(x) for x in (v.tolist() if isinstance(v, torch.Tensor) else v)]


def read_batch(path: str | Path) -> FKDBatch:
    """One ``batch_<b>.tar`` of an FKD folder, loaded with ``weights_only=True``."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a readable torch.save file (not the zip format torch.save has written since "
                         "PyTorch 1.6)")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "global" in ln.lower()] or [str(e).splitlines()[0]]
        raise ValueError(f"{path}: refused, it holds more than tensors and numbers (nrrdd loads FKD files with "
                         f"weights_only=True and never runs code from them): {lines[0][:300]}") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable torch.save file ({type(e).__name__}: {e})") from e
    if not isinstance(obj, (list, tuple)) or len(obj) != 6:
        raise ValueError(f"{path}: an FKD batch file holds a list of 6 items [coords, flip, mix_index, mix_lam, "
                         f"mix_bbox, soft_label]; this one holds {type(obj).__name__}"
                         f"{f' of {len(obj)}' if isinstance(obj, (list, tuple)) else ''}")
    coords, flip, mix_index, mix_lam, mix_bbox, soft = obj
    if not isinstance(soft, torch.Tensor) or soft.ndim != 2:
        raise ValueError(f"{path}: soft_label must be a [batch, classes] tensor, got {type(soft).__name__}")
    b = soft.shape[0]
    coords = torch.as_tensor(coords, dtype=torch.float32)
    flip = torch.as_tensor(flip).bool()
    if coords.shape != (b, 4) or flip.shape != (b,):
        raise ValueError(f"{path}: coords {tuple(coords.shape)} and flip {tuple(flip.shape)} do not fit a batch of {b}")
    if mix_index is not None:
        mix_index = torch.as_tensor(mix_index, dtype=torch.long)
        if mix_index.shape != (b,) or (b and (mix_index.min() < 0 or mix_index.max() >= b)):
            raise ValueError(f"{path}: mix_index must hold {b} positions inside the batch")
    return FKDBatch(coords, flip, mix_index, None if mix_lam is None else float(mix_lam), _to_int_list(mix_bbox), soft)


def _numbered(folder: Path, prefix: str, suffix: str = "") -> list[Path]:
    pat = re.compile(rf"{prefix}_(\d+){re.escape(suffix)}$")
    found = sorted(((int(m.group(1)), p) for p in folder.iterdir() if (m := pat.match(p.name))), key=lambda t: t[0])
    numbers = [n for n, _ in found]
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(max(numbers, default=-1) + 1)) - set(numbers))
        raise ValueError(f"{folder}: {prefix}_<n>{suffix} must be numbered 0, 1, 2, ...; missing {missing[:10]}")
    return [p for _, p in found]


def scan(root: str | Path) -> list[list[Path]]:
    """The batch files of an FKD folder, ``[epoch][batch]``, in numeric order (batch_10 after batch_9)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"FKD soft-label folder {root} not found")
    epochs = [_numbered(e, "batch", ".tar") for e in _numbered(root, "epoch")]
    if not epochs:
        raise ValueError(f"{root} holds no epoch_<n>/ folder: is it the --fkd-path of SRe2L's relabelling?")
    counts = {len(b) for b in epochs}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"{root}: every epoch must have the same, non-zero number of batch files; found "
                         f"{[len(b) for b in epochs]}")
    return epochs


def sampler_order(n: int, epochs: int, seed: int) -> torch.Tensor:
    """[epochs, n] the image indices in the order SRe2L's loader read them: ``RandomSampler`` with a generator
    seeded ``seed`` (``--fkd-seed``, 42 by default), drawn epoch after epoch from the same generator. Reproduced
    with this PyTorch's RandomSampler; a PyTorch that draws differently would give another order."""
    g = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(range(n), generator=g)
    return torch.stack([torch.tensor(list(iter(sampler))) for _ in range(epochs)])


def convert(root: str | Path, out: str | Path, fkd_seed: int | None = 42) -> dict:
    """Write FKD folder ``root`` as one safetensors file ``out``. Tensors, rows in the loader's order per epoch
    (row r of epoch e is the r-th image the loader read):

    - ``soft_label`` [E, N, C] (dtype as stored), ``coords`` [E, N, 4] float32, ``flip`` [E, N] uint8;
    - with mixing: ``mix_index`` [E, N] int64, the partner's *row* (batch start + position in the batch),
      ``mix_lam`` [E, n_batches] float64; CutMix: ``mix_bbox`` [E, n_batches, 4] int64;
    - ``batch_start`` [n_batches] int64, the first row of each batch;
    - unless ``fkd_seed`` is None: ``image_index`` [E, N] int64, the image each row is (:func:`sampler_order`).

    Metadata: source folder, epochs, images, classes, fkd_seed. Returns a summary."""
    epochs = scan(root)
    E, nb = len(epochs), len(epochs[0])
    first = [read_batch(f) for f in epochs[0]]      # epoch 0 sizes the output; later epochs stream batch by batch
    sizes = [len(x.soft_label) for x in first]
    N, C = sum(sizes), first[0].soft_label.shape[1]
    mixed, boxed = first[0].mix_index is not None, first[0].mix_bbox is not None
    starts = [int(v) for v in np.cumsum([0] + sizes[:-1])]
    tensors = {"soft_label": torch.empty(E, N, C, dtype=first[0].soft_label.dtype),
               "coords": torch.empty(E, N, 4), "flip": torch.empty(E, N, dtype=torch.uint8)}
    if mixed:
        tensors["mix_index"] = torch.empty(E, N, dtype=torch.long)
        tensors["mix_lam"] = torch.empty(E, nb, dtype=torch.float64)
    if boxed:
        tensors["mix_bbox"] = torch.empty(E, nb, 4, dtype=torch.long)
    for e, files in enumerate(epochs):
        for b, (f, x) in enumerate(zip(files, first if e == 0 else map(read_batch, files))):
            if len(x.soft_label) != sizes[b] or x.soft_label.shape[1] != C:
                raise ValueError(f"{f}: {tuple(x.soft_label.shape)} soft labels, but batch {b} of epoch 0 holds "
                                 f"{sizes[b]} x {C}")
            if (x.mix_index is not None) != mixed or (x.mix_bbox is not None) != boxed:
                raise ValueError(f"{f}: mixed differently from epoch 0's first batch (some batches mixed, some not)")
            rows = slice(starts[b], starts[b] + sizes[b])
            tensors["soft_label"][e, rows] = x.soft_label
            tensors["coords"][e, rows] = x.coords
            tensors["flip"][e, rows] = x.flip.to(torch.uint8)
            if mixed:
                tensors["mix_index"][e, rows] = x.mix_index + starts[b]
                tensors["mix_lam"][e, b] = x.mix_lam
            if boxed:
                tensors["mix_bbox"][e, b] = torch.tensor(x.mix_bbox)
        first = None                                # epoch 0's batches are written: free them
    tensors["batch_start"] = torch.tensor(starts, dtype=torch.long)
    if fkd_seed is not None:
        tensors["image_index"] = sampler_order(N, E, fkd_seed)
    meta = {"source": str(Path(root).resolve()), "format": "SRe2L/FKD soft labels, rows in loader order",
            "epochs": E, "images": N, "classes": C, "fkd_seed": fkd_seed,
            "torch_for_image_index": torch.__version__}
    atomic_save_safetensors(out, tensors, metadata={k: str(v) for k, v in meta.items()})
    return {"out": str(out), "epochs": E, "images": N, "classes": C, "batches": len(sizes),
            "tensors": sorted(tensors)}
