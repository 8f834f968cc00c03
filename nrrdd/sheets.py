"""PNG sheets of synthetic sets (matplotlib Agg, written atomically).

- ``mask_sheet`` (``nrrdd demo``): one row per class, NRR-DD images each beside its NRR mask.
- ``method_sheet`` (``nrrdd compare``): one row per method, the first image of the same classes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .data import Normalizer
from .io import atomic_save_figure, load_safetensors
from .rundir import RunDir


def load_pixels(syn_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """A synthetic set as pixels: images float [N, H, W, C] in [0, 1], labels int64 [N], masks [N, 1, H, W],
    class names in label order."""
    t, meta = load_safetensors(RunDir(syn_dir).synthetic)
    norm = Normalizer(json.loads(meta["mean"]), json.loads(meta["std"]))
    pixels = norm.inverse(t["images"]).clamp(0, 1).permute(0, 2, 3, 1)
    labels = t["labels"]
    classes = json.loads(meta["classes"]) if "classes" in meta else [str(c) for c in range(int(labels.max()) + 1)]
    return pixels, labels, t["masks"], classes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _show(ax, pixels: torch.Tensor | None) -> None:
    """One [H, W, C] image in [0, 1] (or an empty cell), without ticks."""
    ax.set_xticks([])
    ax.set_yticks([])
    if pixels is not None:
        img = pixels.numpy()
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    atomic_save_figure(path, fig, dpi=110)
    plt.close(fig)
    return path


def mask_sheet(syn_dir: str | Path, path: str | Path, per_class: int = 4) -> Path:
    """One row per class: ``per_class`` synthetic images, each followed by its NRR mask (white = free to
    change, black = critical, kept exactly)."""
    plt = _pyplot()
    pixels, labels, masks, classes = load_pixels(syn_dir)
    n_cls = len(classes)
    fig, axes = plt.subplots(n_cls, 2 * per_class, figsize=(2 * per_class * 1.1, n_cls * 1.1), squeeze=False)
    for c in range(n_cls):
        idx = (labels == c).nonzero().flatten()[:per_class].tolist()
        for j in range(per_class):
            ax_i, ax_m = axes[c, 2 * j], axes[c, 2 * j + 1]
            _show(ax_i, pixels[idx[j]] if j < len(idx) else None)
            _show(ax_m, None)
            if j < len(idx):
                ax_m.imshow(masks[idx[j], 0].numpy(), cmap="gray", vmin=0, vmax=max(1e-6, float(masks.max())))
        axes[c, 0].set_ylabel(classes[c], rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("NRR-DD synthetic images | NRR mask M = max(0, eps - CAM)", fontsize=8)
    return _save(fig, Path(path), plt)


def method_sheet(sets: dict[str, str | Path], path: str | Path, max_classes: int = 10, title: str = "") -> Path:
    """One row per synthetic set (``{row name: folder}``): the first image of each of up to ``max_classes``
    classes, evenly spread over the class list, the same classes in every row."""
    plt = _pyplot()
    loaded = {name: load_pixels(d) for name, d in sets.items()}
    classes = next(iter(loaded.values()))[3]
    shown = sorted(set(torch.linspace(0, len(classes) - 1, min(max_classes, len(classes))).round().long().tolist()))
    fig, axes = plt.subplots(len(loaded), len(shown), figsize=(len(shown) * 1.1, len(loaded) * 1.2 + 0.3),
                             squeeze=False)
    for i, (name, (pixels, labels, _, _)) in enumerate(loaded.items()):
        for j, c in enumerate(shown):
            idx = (labels == c).nonzero().flatten()
            _show(axes[i, j], pixels[idx[0]] if len(idx) else None)
            if i == 0:
                axes[i, j].set_title(classes[c], fontsize=7)
        axes[i, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=8)
    return _save(fig, Path(path), plt)
