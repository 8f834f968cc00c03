"""scripts/rded_side_by_side.py: RDED's printed results read back, and the RDED-layout folder it writes."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

spec = importlib.util.spec_from_file_location("side_by_side",
                                              Path(__file__).parents[1] / "scripts" / "rded_side_by_side.py")
sbs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sbs)

# what RDED's validation/main.py prints (its format strings), two evaluated epochs, then the runner's line
RDED_OUT = """TRAIN Iter 248: loss = 0.101000,\tTop-1 err = 60.000000,\tTop-5 err = 10.000000,\ttrain_time = 1.000000
TEST:
Iter 249: loss = 0.500000,\tTop-1 err = 16.250000,\tTop-5 err = 0.500000,\tval_time = 2.000000
TEST:
Iter 299: loss = 0.450000,\tTop-1 err = 16.040000,\tTop-5 err = 0.400000,\tval_time = 2.000000
Train Finish! Best accuracy is 84.01@289
STAGE_SECONDS {"select": 28.04, "train_eval": 358.46}
"""


def test_rdeds_final_epoch_best_and_stage_seconds_are_read():
    r = sbs.parse_rded_log(RDED_OUT)
    assert r == {"final_top1": 83.96, "final_epoch": 299, "best_top1": 84.01,
                 "seconds": {"select": 28.0, "train_eval": 358.5}}
    with pytest.raises(ValueError, match="no final evaluation"):
        sbs.parse_rded_log(RDED_OUT.split("TEST:")[0])


def test_fashion_mnist_lands_as_rdeds_32px_rgb_folders(tmp_path):
    images = torch.arange(5 * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(5, 1, 28, 28)
    labels = torch.tensor([1, 0, 1, 1, 0])
    assert sbs._write(images, labels, tmp_path, per_class=2) == 4       # the third image of class 1 is left out
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")) == [
        "00000/00000.png", "00000/00001.png", "00001/00000.png", "00001/00001.png"]
    px = np.asarray(Image.open(tmp_path / "00001" / "00001.png"))
    assert px.shape == (32, 32, 3) and (px[..., 0] == px[..., 2]).all()  # grey written as RGB
    want = np.asarray(Image.fromarray(images[2, 0].numpy()).resize((32, 32), Image.BILINEAR))
    assert (px[..., 1] == want).all()                                    # the second image of class 1
