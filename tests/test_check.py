"""`nrrdd check` finds each wrong input before any work, and passes a sound setup."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from imagefolders import SMALL_FMNIST, bad_input_folder, imagenet_jpegs, needs_fmnist

from nrrdd.cli import main

pytestmark = [needs_fmnist, pytest.mark.slow]


def check(capsys, *args) -> tuple[int, str]:
    rc = main(["check", *args])
    return rc, capsys.readouterr().out


def test_sound_setup_passes(fmnist_teacher, capsys, tmp_path):
    rc, out = check(capsys, "--teacher", str(fmnist_teacher), "--out", str(tmp_path / "o"), *SMALL_FMNIST)
    assert rc == 0, out
    assert "0 error(s)" in out and "teacher accuracy" in out
    assert "distillation holds the set (100 images" in out and "the run writes up to" in out     # resources


def test_untrained_teacher_is_near_chance(capsys, tmp_path):
    from nrrdd.models import build_model

    torch.manual_seed(0)
    ckpt = tmp_path / "untrained.pt"
    torch.save({"model": build_model("conv3", 10, 1, 28).state_dict()}, ckpt)
    rc, out = check(capsys, "--teacher", str(ckpt), *SMALL_FMNIST)
    assert rc == 1 and "near chance" in out


def test_wrong_class_count_and_class_order(fmnist_teacher, capsys, tmp_path):
    from nrrdd.models import build_model

    seven = tmp_path / "seven.pt"
    torch.save({"model": build_model("conv3", 7, 1, 28).state_dict()}, seven)
    rc, out = check(capsys, "--teacher", str(seven), *SMALL_FMNIST)
    assert rc == 1 and "ERROR   teacher" in out and "7" in out

    other = tmp_path / "other"
    shutil.copytree(fmnist_teacher.parent, other)
    meta = json.loads((other / "teacher.json").read_text())
    meta["classes"] = meta["classes"][::-1]
    (other / "teacher.json").write_text(json.dumps(meta))
    rc, out = check(capsys, "--teacher", str(other / "teacher.pt"), *SMALL_FMNIST)
    assert rc == 1 and "do not match" in out


def test_too_few_images_per_class_and_existing_output(fmnist_teacher, capsys, tmp_path):
    rc, out = check(capsys, "--teacher", str(fmnist_teacher), "--ipc", "400", *SMALL_FMNIST)  # ~280 per class
    assert rc == 1 and "fewer usable images than the 400 patches" in out
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "synthetic.safetensors").write_bytes(b"x")
    rc, out = check(capsys, "--teacher", str(fmnist_teacher), "--out", str(tmp_path / "o"), *SMALL_FMNIST)
    assert "would refuse to overwrite" in out


@pytest.mark.skipif(not imagenet_jpegs(), reason="foolbox wheel (its 20 ImageNet JPEGs) not installed")
def test_image_folder_layout_and_bad_files(capsys, tmp_path):
    bad_input_folder(tmp_path / "train")
    shutil.copytree(tmp_path / "train", tmp_path / "test")
    folder = ["--dataset", "imagefolder", "--data-root", str(tmp_path / "train"), "--test-root",
              str(tmp_path / "test"), "--input-size", "32", "--val-per-class", "0", "--method", "random",
              "--ipc", "1", "--mipc", "2"]
    rc, out = check(capsys, *folder)
    assert "4 files would be skipped" in out     # truncated, empty, not an image (screening) + README.txt
    assert "truncated JPEG" in out or "empty file" in out
    (tmp_path / "test" / "b").rename(tmp_path / "test" / "zebra")
    rc, out = check(capsys, *folder)
    assert rc == 1 and "ERROR   dataset" in out and "missing ['b']" in out
    shutil.rmtree(tmp_path / "test")
    shutil.copytree(tmp_path / "train", tmp_path / "test")
    for f in (tmp_path / "train" / "b").iterdir():
        f.unlink()
    rc, out = check(capsys, *folder)
    assert rc == 1 and "holds no images" in out


def test_resources_for_imagenet_sizes(monkeypatch, tmp_path):
    """The figures of an ImageNet-1K run at IPC 50 with soft labels, against a 64 GB machine with 60 or 40 GB free
    (and a 48 GB one) and
    a disk with 100 GB free: memory fits (a warning when it is not available now; an error on the smaller
    machine), the disk does not."""
    import nrrdd.check as check_mod
    from nrrdd.config import RunConfig

    monkeypatch.setattr(check_mod, "disk_free", lambda path: 100e9)
    cfg = RunConfig(ipc=50, labels="soft", epochs=300, out=str(tmp_path / "o"))
    kw = dict(n_images=50 * 1000, channels=3, size=224, num_classes=1000, device=torch.device("cpu"))
    for mem, level in (((60e9, 64e9), "ok"), ((40e9, 64e9), "warning"), ((40e9, 48e9), "error")):
        monkeypatch.setattr(check_mod, "host_memory", lambda mem=mem: mem)
        (lm, memory), (ld, disk) = check_mod.resource_findings(cfg, **kw)
        # images 30.1 GB, masks 10.0 GB: 1.5 x 30.1 + 10.0
        assert lm == level and "50000 images, 30.1 GB in fp32" in memory and "~55.2 GB" in memory, memory
        # refinement pieces and set (2 x 40.1) + PNGs (7.5) + soft labels and their chunks (2 x 30.0)
        assert ld == "error" and "~147.8 GB" in disk and "100.0 GB is free" in disk, disk
    monkeypatch.setattr(check_mod, "disk_free", lambda path: 200e9)
    cfg = RunConfig(ipc=50, labels="dbr", epochs=300, method="rded", out=str(tmp_path / "o"))    # no refinement
    (_, _), (ld, disk) = check_mod.resource_findings(cfg, **kw)
    assert ld == "ok" and "~47.8 GB" in disk and "refinement pieces" not in disk, disk


def test_a_machine_too_small_is_an_error(fmnist_teacher, capsys, monkeypatch, tmp_path):
    import nrrdd.check as check_mod

    monkeypatch.setattr(check_mod, "host_memory", lambda: (10_000, 20_000))
    monkeypatch.setattr(check_mod, "disk_free", lambda path: 1000)
    rc, out = check(capsys, "--teacher", str(fmnist_teacher), "--out", str(tmp_path / "o"), *SMALL_FMNIST)
    assert rc == 1 and "2 error(s)" in out, out
    assert "more than this machine has (0.0 MB)" in out and "but 0.0 MB is free there" in out, out


def test_teacher_far_below_its_recorded_accuracy_names_normalisation(fmnist_teacher, capsys, tmp_path):
    # the same teacher, its teacher.json claiming 99.9% on the test split: what a teacher trained on other
    # normalisation statistics (or image sizes) looks like from here, short of chance
    teacher = tmp_path / "t" / "teacher.pt"
    teacher.parent.mkdir()
    shutil.copy(fmnist_teacher, teacher)
    meta = json.loads(fmnist_teacher.with_suffix(".json").read_text())
    teacher.with_suffix(".json").write_text(json.dumps({**meta, "test_top1": 99.9}))
    rc, out = check(capsys, "--teacher", str(teacher), "--out", str(tmp_path / "o"), *SMALL_FMNIST)
    assert rc == 0 and "WARNING teacher accuracy" in out and "99.9% recorded" in out and "--mean/--std" in out, out
    rc, out = check(capsys, "--teacher", str(fmnist_teacher), "--out", str(tmp_path / "o"), *SMALL_FMNIST)
    assert "recorded in its teacher.json" not in out


def test_mean_and_std_flags_presets_and_manifest():
    from nrrdd.data import normalisation

    assert normalisation(None, None, ((0.1,), (0.2,)))[:2] == ((0.1,), (0.2,))
    assert normalisation("imagenet", None, ((0.1,), (0.2,)))[:2] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert normalisation("0.5,0.5", "0.25,0.5", ((0.1,), (0.2,)))[:2] == ((0.5, 0.5), (0.25, 0.5))
    with pytest.raises(ValueError, match="comma-separated numbers"):
        normalisation("bright", None, ((0.1,), (0.2,)))
    with pytest.raises(ValueError, match="one of each per channel"):
        normalisation("0.5,0.5", "0.2", ((0.1,), (0.2,)))


def test_normalisation_is_recorded_in_the_manifest(fmnist_teacher, tmp_path):
    out = tmp_path / "o"
    assert main(["distill", "--method", "random", "--out", str(out), *SMALL_FMNIST, "--mean", "0.5",
                 "--std", "0.25"]) == 0
    m = json.loads((out / "manifest_distill.json").read_text())
    assert m["normalisation"] == {"mean": [0.5], "std": [0.25]}
