"""A small real run on Fashion-MNIST through the CLI: teacher, distill, relabel, evaluate.

Needs the Debian package dataset-fashion-mnist (.ci/run installs it)."""
import json

import pytest
import torch

from imagefolders import SMALL_FMNIST, needs_fmnist

from nrrdd.cli import main

pytestmark = [needs_fmnist, pytest.mark.slow]



def test_nrrdd_distill_relabel_evaluate_beats_chance(fmnist_teacher, tmp_path):
    out = tmp_path / "nrrdd"
    common = ["--teacher", str(fmnist_teacher), "--out", str(out), "--ipc", "5", "--mipc", "30",
              "--nrr-iterations", "10", "--re-epochs", "30", *SMALL_FMNIST]
    assert main(["distill", *common]) == 0
    pngs = sorted((out / "syn").glob("*/*.png"))
    assert len(pngs) == 50 and pngs[0].name == "class00000_id00000.png"
    manifest = json.loads((out / "manifest_distill.json").read_text())
    assert manifest["teacher_sha256"] and manifest["dataset_fingerprint"] and manifest["refined"] is True
    assert json.loads((out / "config.json").read_text())["nrr_iterations"] == 10

    assert main(["relabel", "--labels", "dbr", *common]) == 0
    from safetensors.torch import load_file

    labels = load_file(str(out / "labels_dbr.safetensors"))["labels"]
    assert labels.shape == (30, 50, 2) and labels.dtype == torch.float16

    for mode in ("dbr", "online"):
        assert main(["evaluate", "--labels", mode, *common]) == 0
        tag = "_a1" if mode == "dbr" else ""
        res = json.loads((out / f"eval_{mode}_conv3_s0{tag}.json").read_text())
        assert res["test_top1"] > 30, res          # chance is 10%
    # outputs are never overwritten
    assert main(["distill", *common]) == 2


def test_wrong_teacher_class_count_is_refused(fmnist_teacher, tmp_path):
    from nrrdd.models import build_model

    bad = tmp_path / "bad.pt"
    torch.save({"model": build_model("conv3", 7, 1, 28).state_dict()}, bad)
    assert main(["distill", "--teacher", str(bad), "--out", str(tmp_path / "o"), "--method", "rded",
                 "--ipc", "1", "--mipc", "5", *SMALL_FMNIST]) == 2
