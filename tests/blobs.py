"""Synthetic but learnable data for tests: one bright blob per class, at a class-dependent place on a circle,
written as MNIST-style IDX files (``--dataset mnist --data-root ROOT``), so a small teacher learns them in
seconds."""
import gzip
import math
import struct
from pathlib import Path

import torch


def _write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.numpy().tobytes())


def _blobs(n, g):
    """n 28 px images, class c = a Gaussian blob (sigma 2.5 px) at angle 36c deg on a circle, +-1 px, on noise."""
    y = torch.arange(n) % 10
    angle = 2 * math.pi * y.float() / 10
    cy = 13.5 + 9 * torch.sin(angle) + torch.randint(-1, 2, (n,), generator=g)
    cx = 13.5 + 9 * torch.cos(angle) + torch.randint(-1, 2, (n,), generator=g)
    r = torch.arange(28).float()
    d2 = (r.view(1, 28, 1) - cy.view(n, 1, 1)) ** 2 + (r.view(1, 1, 28) - cx.view(n, 1, 1)) ** 2
    img = 200 * torch.exp(-d2 / (2 * 2.5 ** 2)) + 60 * torch.rand(n, 28, 28, generator=g)
    return img.clamp(0, 255).to(torch.uint8), y.to(torch.uint8)


def write_blobs(root: Path, n_train: int = 1500, n_test: int = 300, seed: int = 0) -> Path:
    """``root/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``, 10 classes."""
    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        x, y = _blobs(n, g)
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", x)
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", y)
    return root
