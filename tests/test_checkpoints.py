"""Checkpoints that cannot be used end in one line naming the file and what is wrong (exit status 2, no
traceback): text, random bytes, a truncated file, a pickle that would run code, another architecture's
state_dict, a classifier made for another input size (the message names the size that fits)."""
import os
import pickle

import pytest
import torch
from imagefolders import SMALL_FMNIST, needs_fmnist

from nrrdd.cli import main
from nrrdd.models import build_model, load_model


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _checkpoints(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": build_model("conv3", 10, 1, 28).state_dict()}, good)
    data = good.read_bytes()
    kinds = {
        "text": (b"this is a README, not a checkpoint\n", "not a PyTorch checkpoint"),
        "random bytes": (os.urandom(4096), "not a PyTorch checkpoint"),
        "truncated": (data[: len(data) // 2], "truncated or damaged"),
        "runs code": (pickle.dumps({"model": RunsCode()}), "run as code"),
        "empty": (b"", "cannot be read"),
    }
    paths = {}
    for name, (blob, _) in kinds.items():
        p = tmp_path / f"{name.replace(' ', '_')}.pt"
        p.write_bytes(blob)
        paths[name] = (p, kinds[name][1])
    conv4 = tmp_path / "conv4.pt"
    torch.save({"model": build_model("conv4", 10, 1, 28).state_dict()}, conv4)
    paths["another architecture"] = (conv4, "does not fit model 'conv3'")
    no_tensors = tmp_path / "no_tensors.pt"
    torch.save({"epoch": 3, "lr": 0.1}, no_tensors)
    paths["no state_dict"] = (no_tensors, "holds no state_dict")
    return paths


@pytest.mark.parametrize("kind", ["text", "random bytes", "truncated", "runs code", "empty", "another architecture",
                                  "no state_dict"])
def test_unreadable_checkpoint_is_one_clear_line(kind, tmp_path):
    path, expect = _checkpoints(tmp_path)[kind]
    with pytest.raises(ValueError) as e:
        load_model("conv3", path, 10, 1, 28)
    msg = str(e.value)
    assert str(path) in msg and expect in msg and "\n" not in msg, msg


def test_classifier_of_another_input_size_names_the_size_that_fits(tmp_path):
    ckpt = tmp_path / "c32.pt"
    torch.save({"model": build_model("conv3", 10, 3, 32).state_dict()}, ckpt)
    with pytest.raises(ValueError, match=r"another shape .* its classifier fits --input-size 32$"):
        load_model("conv3", ckpt, 10, 3, 64)


@needs_fmnist
@pytest.mark.parametrize("kind", ["text", "runs code", "truncated"])
def test_cli_exits_2_with_one_line_and_no_traceback(kind, tmp_path, capsys):
    path, expect = _checkpoints(tmp_path)[kind]
    rc = main(["distill", "--teacher", str(path), "--out", str(tmp_path / "o"), "--mipc", "10", *SMALL_FMNIST])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_training_state_is_refused_only_for_a_setting_the_stage_depends_on(tmp_path):
    from nrrdd.config import NOT_TEACHER
    from nrrdd.rundir import TrainCheckpoint

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    path = tmp_path / "checkpoint.pt"
    TrainCheckpoint(path, {"teacher_lr": 0.05, "recipe": "nrrdd"}).save(3, model, opt, sched)
    # the saved state also holds a student setting; a teacher's identity no longer names it
    assert TrainCheckpoint(path, {"teacher_lr": 0.05}).restore(model, opt, sched) == 3
    with pytest.raises(ValueError, match=r"other settings \(teacher_lr\)"):
        TrainCheckpoint(path, {"teacher_lr": 0.1}).restore(model, opt, sched)
    with pytest.raises(ValueError, match=r"other settings \(teacher_epochs\)"):       # a key it was saved without
        TrainCheckpoint(path, {"teacher_lr": 0.05, "teacher_epochs": 30}).restore(model, opt, sched)
    assert {"recipe", "epochs", "ipc", "nrr_eps", "labels", "test_limit", "threads"} <= NOT_TEACHER
    assert not {"teacher_lr", "teacher_epochs", "teacher_batch_size", "dataset", "seed", "arch", "precision",
                "train_limit", "val_per_class"} & NOT_TEACHER
