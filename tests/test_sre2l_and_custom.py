"""SRe2L synthesis, and your own teacher/student given as ``--arch package.module:ClassName``.

The data are synthetic but learnable (one bright blob per class, at a class-dependent place on a circle),
written as MNIST-style IDX files, so a LeNet teacher learns them in a second. ``tests/lenet.py`` is the
user's model module: no BatchNorm, no global pooling, one input channel.
"""
import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from blobs import write_blobs

from nrrdd.cli import main

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_blobs(tmp_path_factory.mktemp("blobs"))
    # mnist: digits-like data, so neither the teacher nor SRe2L's synthesis flips images
    return ["--dataset", "mnist", "--data-root", str(root), "--val-per-class", "5", "--threads", "1"]


@pytest.fixture(scope="module")
def lenet_importable():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(TESTS))           # the user's module lives outside nrrdd: import it as lenet
        yield


def _teacher(tmp_path_factory, data, kwargs):
    out = tmp_path_factory.mktemp("teacher")
    assert main(["train-teacher", "--arch", "lenet:LeNet", "--arch-kwargs", kwargs, "--out", str(out),
                 "--teacher-epochs", "2", "--teacher-batch-size", "64", *data]) == 0
    meta = json.loads((out / "teacher.json").read_text())
    assert meta["arch"] == "lenet:LeNet" and meta["arch_kwargs"] == json.loads(kwargs)
    assert meta["test_top1"] > 90, meta
    return ["--teacher", str(out / "teacher.pt"), "--arch", "lenet:LeNet", "--arch-kwargs", kwargs]


@pytest.fixture(scope="module")
def lenet(tmp_path_factory, data, lenet_importable):
    """A LeNet teacher: no BatchNorm, no global pooling, one channel."""
    return _teacher(tmp_path_factory, data, "{}")


@pytest.fixture(scope="module")
def lenet_bn(tmp_path_factory, data, lenet_importable):
    """The same LeNet with BatchNorm (via --arch-kwargs), so SRe2L's L_bn has statistics to match."""
    return _teacher(tmp_path_factory, data, '{"batch_norm": true}')


def _evaluate(out, teacher, data):
    assert main(["evaluate", "--student", "lenet:LeNet", "--re-epochs", "150", "--out", str(out),
                 *teacher, *data]) == 0
    return json.loads((out / "eval_online_lenet.LeNet_s0.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nrrdd", "rded"])
def test_custom_lenet_teacher_and_student_by_import_path(method, lenet, data, tmp_path):
    from nrrdd.cam import cam_kind

    import lenet as user_models

    assert cam_kind(user_models.LeNet()) == "gradcam"       # no GAP head: Grad-CAM on the last conv
    out = tmp_path / method
    with pytest.warns(UserWarning, match="no BatchNorm") if method == "nrrdd" else nullcontext():
        assert main(["distill", "--method", method, "--ipc", "2", "--mipc", "20", "--nrr-iterations", "20",
                     "--out", str(out), *lenet, *data]) == 0
    assert len(list((out / "syn").glob("*/*.png"))) == 20
    manifest = json.loads((out / "manifest_distill.json").read_text())
    assert manifest["refined"] is (method == "nrrdd") and manifest["config"]["arch"] == "lenet:LeNet"
    res = _evaluate(out, lenet, data)
    assert res["student"] == "lenet:LeNet" and res["test_top1"] > 30, res          # chance is 10%


@pytest.mark.slow
def test_sre2l_from_noise_beats_chance_and_is_reproducible(lenet_bn, data, tmp_path):
    from nrrdd.rundir import read_synthetic

    common = ["--method", "sre2l", "--ipc", "2", "--sre2l-iterations", "200", *lenet_bn, *data]
    assert main(["distill", "--out", str(tmp_path / "a"), *common]) == 0
    images, labels, masks, _ = read_synthetic(tmp_path / "a")
    assert images.shape == (20, 1, 28, 28) and labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert bool((masks == 1).all())                                     # unmasked: every pixel optimised
    manifest = json.loads((tmp_path / "a" / "manifest_distill.json").read_text())
    assert manifest["refined"] is True and manifest["sources"][0]["init"] == "gaussian noise"
    assert manifest["config"]["sre2l_jitter"] == 4 and manifest["config"]["sre2l_iterations"] == 200

    assert main(["distill", "--out", str(tmp_path / "b"), *common]) == 0
    assert torch.equal(read_synthetic(tmp_path / "b")[0], images)      # seeded noise, seeded jitter

    res = _evaluate(tmp_path / "a", lenet_bn, data)
    assert res["test_top1"] > 30, res                                   # chance is 10%


def test_sre2l_noise_init_is_keyed_by_seed_and_class():
    from nrrdd.data import Normalizer
    from nrrdd.discover import noise_init

    norm = Normalizer((0.5,), (0.25,))
    a = noise_init(10, 2, 1, 8, seed=3, normalizer=norm)
    b = noise_init(3, 2, 1, 8, seed=3, normalizer=norm)
    assert torch.equal(a.images[:6], b.images) and a.labels[:6].tolist() == [0, 0, 1, 1, 2, 2]
    assert not torch.equal(noise_init(3, 2, 1, 8, seed=4, normalizer=norm).images, b.images)
    assert a.images.min() >= 0 and a.images.max() <= 1                 # clamped to valid pixels


def test_refine_jitter_and_flip_change_the_teacher_view_only():
    from nrrdd.models import ConvNet
    from nrrdd.refine import RefineSettings, refine

    torch.manual_seed(0)
    teacher = ConvNet(num_classes=3, depth=2, width=8, channels=1, im_size=8).eval()
    x0 = torch.rand(3, 1, 8, 8)
    y = torch.tensor([0, 1, 2])
    lo, hi = torch.tensor([-3.0]), torch.tensor([3.0])
    def run(**kw):
        return refine(teacher, x0, y, (lo, hi), RefineSettings(iterations=5, masked=False, **kw)).images

    plain = run()
    assert torch.equal(run(jitter=0, flip=False, seed=9), plain)
    jit = run(jitter=2, flip=True, seed=1)
    assert not torch.equal(jit, plain)
    assert torch.equal(run(jitter=2, flip=True, seed=1), jit)
    with pytest.raises(ValueError, match="jitter"):
        run(jitter=-1)


@pytest.mark.slow
def test_unusable_models_are_clear_errors(lenet, data, tmp_path, capsys):
    from lenet import MLP

    def err(*argv):
        assert main([*argv, "--out", str(tmp_path / "o"), *data]) == 2
        return capsys.readouterr().err

    e = err("train-teacher", "--arch", "lenet:LeNet", "--arch-kwargs", '{"num_classes": 7}')
    assert "outputs 7 values per image" in e and "10 classes" in e
    e = err("train-teacher", "--arch", "lenet:NoSuchNet")
    assert "has no 'NoSuchNet'" in e and "LeNet" in e and "MLP" in e
    e = err("train-teacher", "--arch", "no_such_pkg_xyz.models:Net")
    assert "'no_such_pkg_xyz.models' is not importable" in e and "PYTHONPATH" in e
    e = err("train-teacher", "--arch", "lenet:LeNet", "--arch-kwargs", "{width: 3}")
    assert "not valid JSON" in e
    e = err("train-teacher", "--arch", "lenet:LeNet", "--arch-kwargs", '{"channels": 3}')
    assert "fails on one zero image of shape [1, 1, 28, 28]" in e
    e = err("distill", "--method", "sre2l", "--no-refine", *lenet)
    assert "pure noise" in e
    e = err("distill", "--method", "sre2l", *lenet[:-1], '{"batch_norm": true}')
    assert "was built with --arch-kwargs {}" in e

    mlp = tmp_path / "mlp.pt"
    torch.save(MLP(num_classes=10).state_dict(), mlp)                   # a plain state_dict
    e = err("distill", "--method", "nrrdd", "--teacher", str(mlp), "--arch", "lenet:MLP", "--ipc", "1", "--mipc", "5")
    assert "no Conv2d layer" in e and "--method rded" in e
    # the same teacher is fine where no CAM is needed
    assert main(["distill", "--method", "rded", "--teacher", str(mlp), "--arch", "lenet:MLP", "--ipc", "1",
                 "--mipc", "5", "--out", str(tmp_path / "rded"), *data]) == 0
