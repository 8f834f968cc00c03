"""Micro-benchmarks of small hot functions on the CPU, with pytest-benchmark (``pip install 'nrrdd[dev]'``).

Outside ``tests/`` so that the test suite (``pytest -q``) does not collect them. Run from the repository root:

    pytest benchmarks/test_micro.py --benchmark-only
    pytest benchmarks/test_micro.py --benchmark-only --benchmark-autosave     # saved under .benchmarks/
    pytest benchmarks/test_micro.py --benchmark-only --benchmark-compare      # vs the last saved run
    pytest benchmarks/test_micro.py --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=median:10%

Sizes are those of a step of the pipeline on small data; each call takes well under a second.
"""
from __future__ import annotations

import pytest
import torch

from nrrdd.augment import crop_resize, stitch
from nrrdd.discover import candidate_boxes, cam_ratio
from nrrdd.kernels.dbr import dbr_loss_reference
from nrrdd.kernels.masked_adam import masked_adam_reference_

pytest.importorskip("pytest_benchmark")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_masked_adam_reference(benchmark):
    """One masked Adam step, in place, on a [8, 3, 64, 64] batch with a pixel mask and per-channel bounds."""
    g = _gen()
    x, grad = torch.randn(8, 3, 64, 64, generator=g), torch.randn(8, 3, 64, 64, generator=g)
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    mask = (torch.rand(8, 1, 64, 64, generator=g) > 0.3).float()
    lo, hi = torch.tensor([-2.1, -2.0, -1.8]), torch.tensor([2.2, 2.4, 2.6])
    benchmark(masked_adam_reference_, x, grad, mask, m, v, step=10, lr=0.25, lo=lo, hi=hi)
    assert ((x >= lo[:, None, None]) & (x <= hi[:, None, None])).all()


def test_dbr_loss_forward_backward(benchmark):
    """DBR loss forward + backward at B = 64, C = 1000 (the reference, autograd)."""
    g = _gen(1)
    B, C = 64, 1000
    z = (torch.randn(B, C, generator=g) * 3).requires_grad_(True)
    yo, ya = torch.randint(0, C, (B,), generator=g), torch.randint(0, C, (B,), generator=g)
    lam, to, ta = torch.rand(B, generator=g), torch.rand(B, generator=g) * 4, torch.rand(B, generator=g) * 4

    def step():
        z.grad = None
        loss = dbr_loss_reference(z, yo, ya, lam, to, ta)
        loss.backward()
        return loss

    loss = benchmark(step)
    assert torch.isfinite(loss) and z.grad.shape == (B, C)


def test_crop_resize(benchmark):
    """Stage 1's crops: 16 boxes of 224 x 224 images resized to 112 x 112 (``roi_align``)."""
    images = torch.rand(16, 3, 224, 224, generator=_gen(2))
    boxes = torch.from_numpy(candidate_boxes(0, 0, 16, 224, (0.08, 1.0)))
    out = benchmark(crop_resize, images, boxes, 112)
    assert out.shape == (16, 3, 112, 112)


def test_cam_ratio(benchmark):
    """CIDD's crop choice: CAM mass of 5 boxes per image, 64 CAMs of 224 x 224 (integral image)."""
    cam = torch.rand(64, 224, 224, generator=_gen(3))
    boxes = torch.stack([torch.from_numpy(candidate_boxes(0, i, 5, 224, (0.08, 1.0))) for i in range(64)])
    ratio = benchmark(cam_ratio, cam, boxes)
    assert ratio.shape == (64, 5) and ((ratio >= 0) & (ratio <= 1 + 1e-6)).all()


def test_stitch(benchmark):
    """RDED's stitching: 64 patches of 112 x 112 into 16 images of 224 x 224 (factor 2)."""
    patches = torch.rand(64, 3, 112, 112, generator=_gen(4))
    out = benchmark(stitch, patches, 2, 224)
    assert out.shape == (16, 3, 224, 224) and torch.equal(out[:, :, :112, :112], patches[:16])
