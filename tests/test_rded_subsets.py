"""RDED users' commands: --subset resolves data folders, sizes, evaluation images, teacher, batch, lr and output
folder as RDED's argument.py does; image folders take their input size from the files."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from nrrdd.cli import main
from nrrdd.config import RunConfig
from nrrdd.data import FolderImageSet, input_size_from_files, load_splits
from nrrdd.models import build_model
from nrrdd.rded import apply_subset, exp_name


def _folder(root, classes, per_class, size, seed=0):
    g = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"{c:05d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            hw = size if isinstance(size, tuple) else (size, size)
            px = (g.random((*hw, 3)) * 60 + c * (190 / max(1, classes - 1))).clip(0, 255).astype(np.uint8)
            Image.fromarray(px).save(d / f"{i:05d}.png")
    return root


@pytest.mark.parametrize("subset,arch,size,val_ipc", [
    ("cifar10", "conv3", 32, 1000), ("cifar100", "conv3", 32, 100), ("tinyimagenet", "conv4", 64, 50),
    ("imagenet-1k", "resnet18", 224, 50), ("imagenet-nette", "conv5", 128, 50), ("imagenet-woof", "resnet18", 224, 50),
    ("imagenet-100", "conv6", 128, 50), ("imagenet-10", "conv5", 224, 50)])
def test_subset_settings_are_rdeds(subset, arch, size, val_ipc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = apply_subset(RunConfig(dataset=subset, arch=arch, student=arch, ipc=10, mipc=300, num_crop=5, factor=1),
                       {"dataset", "arch", "student", "ipc", "mipc", "num_crop", "factor"})
    assert (cfg.input_size, cfg.test_per_class) == (size, val_ipc)
    assert cfg.out == f"exp/{subset}_{arch}_f1_mipc300_ipc10_cr5"
    assert cfg.teacher is None                                  # no such file here: left to --teacher
    assert cfg.batch_size == (100 if subset == "tinyimagenet" else 25 if subset == "cifar100" else 0)
    assert cfg.lr == (2e-3 if subset == "cifar100" else 1e-3)


def test_given_flags_win_and_the_teacher_file_is_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "pretrain_models").mkdir(parents=True)
    (tmp_path / "data" / "pretrain_models" / "cifar10_conv3.pth").write_bytes(b"")
    cfg = apply_subset(RunConfig(dataset="cifar10", input_size=48, out="mine", lr=0.01), {"input_size", "out", "lr"})
    assert (cfg.input_size, cfg.out, cfg.lr) == (48, "mine", 0.01)
    assert cfg.teacher == "data/pretrain_models/cifar10_conv3.pth"
    assert exp_name(RunConfig(dataset="cifar10", factor=2, mipc=600, ipc=50, num_crop=1)) == \
        "cifar10_conv3_f2_mipc600_ipc50_cr1"
    assert apply_subset(RunConfig(dataset="mnist"), set()) == RunConfig(dataset="mnist")


def test_rded_layout_is_read_from_data_subset_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _folder(tmp_path / "data" / "cifar10" / "train", 10, 3, 32)
    _folder(tmp_path / "data" / "cifar10" / "val", 10, 4, 32, seed=1)
    sp = load_splits("cifar10", val_per_class=0, test_per_class=2)
    assert sp.name == "imagefolder" and sp.size == 32 and "all 30 read are 32 px squares" in sp.size_rule
    assert len(sp.train) == 30 and len(sp.test) == 20                    # the first 2 of each class
    assert sp.test.labels.tolist() == [c for c in range(10) for _ in range(2)]
    torch.testing.assert_close(sp.normalizer.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    with pytest.raises(FileNotFoundError, match="data/tinyimagenet/train/<class>/<image>"):
        load_splits("tinyimagenet")


def test_input_size_from_files_square_and_mixed(tmp_path):
    square = FolderImageSet(_folder(tmp_path / "sq", 2, 3, 64), 1)
    assert input_size_from_files(square)[0] == 64
    mixed = tmp_path / "mixed"
    for name, hw in (("a", (40, 60)), ("b", (48, 48)), ("c", (80, 56))):
        (mixed / name).mkdir(parents=True)
        Image.fromarray(np.zeros((*hw, 3), dtype=np.uint8)).save(mixed / name / "0.png")
    size, rule = input_size_from_files(FolderImageSet(mixed, 1))
    assert size == 48 and "median short side, 48 px" in rule and "40..56" in rule


@pytest.mark.slow
def test_rdeds_command_runs_in_a_tinyimagenet_shaped_folder(tmp_path, monkeypatch, capsys):
    """RDED's flags, unchanged but for small counts, in a Tiny-ImageNet-shaped folder of 64 px images."""
    monkeypatch.chdir(tmp_path)
    _folder(tmp_path / "data" / "tinyimagenet" / "train", 200, 2, 64)
    _folder(tmp_path / "data" / "tinyimagenet" / "val", 200, 1, 64, seed=1)
    (tmp_path / "data" / "pretrain_models").mkdir()
    torch.manual_seed(0)
    torch.save({"model": build_model("conv3", 200, 3, 64).state_dict()},
               tmp_path / "data" / "pretrain_models" / "tinyimagenet_conv3.pth")
    rc = main(["run", "--method", "rded", "--subset", "tinyimagenet", "--arch-name", "conv3", "--factor", "1", "--num-crop", "2",
               "--mipc", "2", "--ipc", "1", "--stud-name", "conv3", "--re-epochs", "1", "--threads", "2"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert 0 <= res["evaluate"]["test_top1"] <= 100
    exp = tmp_path / "exp" / "tinyimagenet_conv3_f1_mipc2_ipc1_cr2"
    assert (exp / "syn_data" / "00000").is_dir() and len(list((exp / "syn_data").iterdir())) == 200
    manifest = json.loads((exp / "manifest_distill.json").read_text())
    assert manifest["config"]["input_size"] == 64 and manifest["config"]["batch_size"] == 100
    assert manifest["config"]["teacher"] == "data/pretrain_models/tinyimagenet_conv3.pth"
