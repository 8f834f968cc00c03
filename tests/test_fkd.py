"""SRe2L/FKD soft-label folders (epoch_<e>/batch_<b>.tar): read with weights_only=True, no patch to torch.load;
a file holding anything but tensors and numbers is refused without running it; conversion to safetensors."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from nrrdd.cli import main
from nrrdd.fkd import convert, read_batch, scan
from nrrdd.io import load_safetensors

N, BS, C, EPOCHS, SEED = 10, 4, 7, 3, 42


def write_fkd_folder(root: Path, mix: str = "cutmix") -> dict:
    """An FKD folder as SRe2L's relabelling writes one: a DataLoader over a RandomSampler seeded SEED, per batch a
    torch.save'd list whose CutMix box holds numpy integers. Returns what was written, per epoch."""
    ds = torch.utils.data.TensorDataset(torch.arange(N))
    g = torch.Generator().manual_seed(SEED)
    loader = torch.utils.data.DataLoader(ds, batch_size=BS, sampler=torch.utils.data.RandomSampler(ds, generator=g))
    rs = np.random.RandomState(0)
    written = {"order": [], "batches": []}
    for e in range(EPOCHS):
        (root / f"epoch_{e}").mkdir(parents=True)
        order = []
        for b, (idx,) in enumerate(loader):
            order += idx.tolist()
            n = len(idx)
            coords, flip = torch.rand(n, 4), torch.rand(n) < 0.5
            soft = torch.randn(n, C).half()
            if mix == "cutmix":
                index, lam = torch.randperm(n), rs.beta(1.0, 1.0)
                cut = int(28 * np.sqrt(1.0 - lam))
                cx, cy = rs.randint(28), rs.randint(28)
                box = [np.clip(cx - cut // 2, 0, 28), np.clip(cy - cut // 2, 0, 28), np.clip(cx + cut // 2, 0, 28),
                       np.clip(cy + cut // 2, 0, 28)]
                assert isinstance(box[0], np.integer)              # what makes weights_only=True fail in SRe2L
            else:
                index, lam, box = None, None, None
            item = [coords, flip, index, lam, box, soft]
            torch.save(item, root / f"epoch_{e}" / f"batch_{b}.tar")
            written["batches"].append((e, b, item))
        written["order"].append(order)
    return written


def test_plain_torch_load_refuses_the_files_and_read_batch_reads_them(tmp_path):
    w = write_fkd_folder(tmp_path / "fkd")
    e, b, (coords, flip, index, lam, box, soft) = w["batches"][1]
    path = tmp_path / "fkd" / f"epoch_{e}" / f"batch_{b}.tar"
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    got = read_batch(path)
    assert torch.equal(got.coords, coords) and torch.equal(got.flip, flip) and torch.equal(got.mix_index, index)
    assert got.mix_lam == lam and got.mix_bbox == [int(v) for v in box] and torch.equal(got.soft_label, soft)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_file_holding_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    _Payload.marker = marker
    bad = tmp_path / "batch_0.tar"
    torch.save([torch.zeros(2, 4), torch.zeros(2, dtype=torch.bool), None, None, _Payload(), torch.zeros(2, 3)], bad)
    with pytest.raises(ValueError, match="refused"):
        read_batch(bad)
    assert not marker.exists()


def test_convert_keeps_every_value_and_reconstructs_the_sample_order(tmp_path):
    w = write_fkd_folder(tmp_path / "fkd")
    out = tmp_path / "fkd.safetensors"
    assert main(["convert-fkd", str(tmp_path / "fkd"), str(out), "--fkd-seed", str(SEED)]) == 0
    t, meta = load_safetensors(out)
    assert t["soft_label"].shape == (EPOCHS, N, C) and t["soft_label"].dtype == torch.float16
    assert t["batch_start"].tolist() == [0, 4, 8]
    assert t["image_index"].tolist() == w["order"]                  # the images the loader really read
    for e, b, (coords, flip, index, lam, box, soft) in w["batches"]:
        rows = slice(4 * b, 4 * b + len(soft))
        assert torch.equal(t["soft_label"][e, rows], soft) and torch.equal(t["coords"][e, rows], coords)
        assert torch.equal(t["flip"][e, rows].bool(), flip)
        assert torch.equal(t["mix_index"][e, rows], index + 4 * b)   # partner rows, not in-batch positions
        assert t["mix_lam"][e, b].item() == lam and t["mix_bbox"][e, b].tolist() == [int(v) for v in box]
    assert meta["images"] == str(N) and meta["fkd_seed"] == str(SEED)


def test_convert_without_mixing(tmp_path):
    write_fkd_folder(tmp_path / "fkd", mix="none")
    convert(tmp_path / "fkd", tmp_path / "o.safetensors")
    t, _ = load_safetensors(tmp_path / "o.safetensors")
    assert "mix_index" not in t and "mix_bbox" not in t and t["coords"].shape == (EPOCHS, N, 4)


def test_broken_folders_are_named(tmp_path):
    write_fkd_folder(tmp_path / "fkd")
    (tmp_path / "fkd" / "epoch_1" / "batch_1.tar").unlink()
    with pytest.raises(ValueError, match=r"missing \[1\]"):
        scan(tmp_path / "fkd")
    with pytest.raises(ValueError, match="no epoch_"):
        scan(tmp_path / "fkd" / "epoch_0")
    (tmp_path / "junk.tar").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable"):
        read_batch(tmp_path / "junk.tar")
    torch.save({"state": torch.zeros(1)}, tmp_path / "dict.tar")
    with pytest.raises(ValueError, match="list of 6 items"):
        read_batch(tmp_path / "dict.tar")
    assert main(["convert-fkd", str(tmp_path / "missing"), str(tmp_path / "o.safetensors")]) == 2
