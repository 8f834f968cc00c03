"""Stitching order, crops, and the replayable augmentation."""
import numpy as np
import torch

from nrrdd.augment import (crop_resize, epoch_augment, mixed_batch, pad_to, random_resized_boxes, rng,
                           shuffle_patches, stitch)


def test_stitch_follows_rdeds_order_and_remainder_rule():
    # 3 images from 12 patches, factor 2, out_size 5 (cells 3+2 px). Patch k*n + i -> image i, cell k
    # (row-major), as RDED's mix_images; each patch is a constant so placement is readable.
    n, factor, out = 3, 2, 5
    patches = torch.arange(n * factor * factor, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    img = stitch(patches.contiguous(), factor, out)
    assert img.shape == (3, 1, 5, 5)
    for i in range(n):
        cells = {(0, 0): img[i, 0, :3, :3], (0, 1): img[i, 0, :3, 3:], (1, 0): img[i, 0, 3:, :3],
                 (1, 1): img[i, 0, 3:, 3:]}
        for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            assert torch.all(cells[(r, c)] == k * n + i), (i, k)


def test_stitch_factor_one_is_identity():
    p = torch.rand(4, 3, 8, 8)
    assert torch.equal(stitch(p, 1, 8), p)


def test_random_resized_boxes_fit_and_are_square():
    g = rng(0, 1, 2)
    b = random_resized_boxes(g, 1000, 32, 32, scale=(0.08, 1.0))
    t, l, h, w = b.T
    assert (h == w).all() and (h >= 1).all()
    assert (t >= 0).all() and (l >= 0).all() and (t + h <= 32).all() and (l + w <= 32).all()
    areas = h * w / 1024
    assert 0.06 < areas.min() < 0.15 and areas.max() > 0.9


def test_crop_resize_of_full_box_is_identity_and_pad_centres():
    x = torch.rand(2, 3, 8, 8)
    full = torch.tensor([[0, 0, 8, 8]] * 2)
    torch.testing.assert_close(crop_resize(x, full, 8), x)
    p = pad_to(torch.ones(1, 1, 2, 2), 5)
    assert p.sum() == 4 and torch.equal(p[0, 0, 1:3, 1:3], torch.ones(2, 2))


def test_shuffle_patches_is_a_permutation_of_cells():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = shuffle_patches(x, torch.tensor([[3, 2, 1, 0]]), 2)
    assert torch.equal(y[0, 0, :2, :2], x[0, 0, 2:, 2:])
    assert sorted(y.flatten().tolist()) == sorted(x.flatten().tolist())


def test_augmentation_is_a_function_of_seed_epoch_and_index_not_of_batching():
    torch.manual_seed(0)
    images = torch.randn(10, 1, 16, 16)
    labels = torch.arange(10) % 3
    aug = epoch_augment(seed=7, epoch=3, n=10, size=16, factor=2)
    whole = mixed_batch(images, labels, aug, torch.arange(10), factor=2)
    parts = [mixed_batch(images, labels, aug, idx, factor=2) for idx in (torch.arange(0, 4), torch.arange(4, 10))]
    for k in range(4):
        torch.testing.assert_close(whole[k], torch.cat([p[k] for p in parts]))
    again = epoch_augment(seed=7, epoch=3, n=10, size=16, factor=2)
    assert torch.equal(aug.lam, again.lam) and torch.equal(aug.partner, again.partner)
    other = epoch_augment(seed=7, epoch=4, n=10, size=16, factor=2)
    assert not torch.equal(aug.lam, other.lam)
    # the partner map is a derangement, and lam is the area share left to sample i
    assert (aug.partner != torch.arange(10)).all()
    assert ((aug.lam >= 0) & (aug.lam <= 1)).all()
    cut_area = (aug.cut[:, 2] * aug.cut[:, 3]).float() / 256
    torch.testing.assert_close(aug.lam, 1 - cut_area)
    # y_aug is the partner's label
    assert torch.equal(whole[2], labels[aug.partner])


def test_rng_keys_are_independent_streams():
    a = rng(0, 1, 5).random(3)
    b = rng(0, 2, 5).random(3)
    assert not np.allclose(a, b)
    assert np.array_equal(a, rng(0, 1, 5).random(3))


def test_mixed_batch_per_sample_reference():
    """Each sample on its own, written out step by step: its view (patch shuffle, crop resized, flip) with the
    cut box pasted from its partner's view. The batched code (and the device feed built on it) must agree."""
    g = torch.Generator().manual_seed(3)
    images, labels = torch.randn(12, 3, 20, 20, generator=g), torch.arange(12) % 5
    aug = epoch_augment(seed=2, epoch=1, n=12, size=20, factor=2)
    idx = torch.tensor([7, 0, 11, 3, 5, 8])
    x, y_org, y_aug, lam = mixed_batch(images, labels, aug, idx, factor=2)

    def view(j: int) -> torch.Tensor:
        v = shuffle_patches(images[j:j + 1], aug.perms[j:j + 1], 2)
        v = crop_resize(v, aug.boxes[j:j + 1], 20)[0]
        return v.flip(-1) if aug.flip[j] else v

    seen_flip, seen_cut = set(), 0
    for b, i in enumerate(idx.tolist()):
        p = int(aug.partner[i])
        want = view(i).clone()
        t, l, h, w = aug.cut[i].tolist()
        want[:, t:t + h, l:l + w] = view(p)[:, t:t + h, l:l + w]
        assert torch.equal(x[b], want), f"sample {i}"
        assert p != i and y_org[b] == labels[i] and y_aug[b] == labels[p] and lam[b] == aug.lam[i]
        seen_flip.add(bool(aug.flip[i])), seen_flip.add(bool(aug.flip[p]))
        seen_cut += h * w > 0
    assert seen_flip == {True, False} and seen_cut >= 3      # the draws exercise flips, no flips, and cuts
