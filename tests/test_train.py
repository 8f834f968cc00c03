"""Student and teacher training: torch.compile matches eager and compiles once per batch shape, not per batch
(a cold compile on the CPU is ~20-40 s: one student and one teacher in the suite, both slow tests); a NaN loss
names its epoch and step."""
import pytest
import torch

from nrrdd.models import build_model
from nrrdd.train import StudentSettings, train_student


def _train(compile: bool):
    torch.manual_seed(0)
    student = build_model("conv3", 4, 1, 16)
    teacher = build_model("conv3", 4, 1, 16).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 1, 16, 16, generator=g), torch.arange(20) % 4
    train_student(student, x, y, StudentSettings(mode="online", epochs=3, batch_size=8, seed=0, factor=1,
                                                 compile=compile), teacher=teacher)
    return student


@pytest.mark.slow
def test_compiled_student_training_matches_eager_and_compiles_once_per_shape():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = _train(False)
    compiled = _train(True)
    # 3 epochs x 3 batches (8, 8, 4): two batch shapes, each compiled once for the student and the teacher
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 2 <= frames <= 4, dict(torch._dynamo.utils.counters["stats"])
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-4, rtol=2e-3, msg=name)


def test_non_finite_student_loss_names_epoch_and_step():
    import pytest

    torch.manual_seed(0)
    x, y = torch.randn(12, 1, 16, 16), torch.arange(12) % 4
    x[5] = float("nan")                      # sample 5 lands in some batch of epoch 0
    with pytest.raises(FloatingPointError, match=r"epoch 0, step \d"):
        train_student(build_model("conv3", 4, 1, 16), x, y,
                      StudentSettings(mode="hard", epochs=2, batch_size=4, seed=0, factor=1))


def test_teacher_training_compiles_where_it_pays():
    from nrrdd.config import RunConfig
    from nrrdd.train import TeacherSettings

    cfg = RunConfig(teacher_epochs=2)
    assert not TeacherSettings.of(cfg, device_type="cpu", n_images=9_999).compile        # 19,998 samples
    assert TeacherSettings.of(cfg, device_type="cpu", n_images=10_000).compile           # 20,000
    assert TeacherSettings.of(cfg, device_type="cuda", n_images=10).compile
    assert not TeacherSettings.of(cfg.replace(compile=False), device_type="cuda", n_images=10 ** 6).compile
    assert TeacherSettings.of(cfg.replace(compile=True), device_type="cpu", n_images=10).compile


@pytest.mark.slow
def test_compiled_teacher_training_matches_eager():
    import torch._dynamo

    from nrrdd.data import Normalizer, TensorImageSet
    from nrrdd.train import TeacherSettings, train_teacher

    g = torch.Generator().manual_seed(2)
    data = TensorImageSet(torch.randint(0, 256, (40, 1, 16, 16), generator=g, dtype=torch.uint8), torch.arange(40) % 4,
                          list("abcd"))
    models = []
    for compile in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch.manual_seed(0)
        m = build_model("conv3", 4, 1, 16)
        train_teacher(m, data, Normalizer((0.5,), (0.25,)),
                      TeacherSettings(epochs=2, lr=0.01, batch_size=16, seed=0, compile=compile))
        models.append(m)
    # 2 epochs x 3 batches (16, 16, 8): two batch shapes, each compiled once
    assert 1 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2, dict(torch._dynamo.utils.counters["stats"])
    for (name, a), (_, b) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-4, rtol=2e-3, msg=name)
