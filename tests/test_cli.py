"""CLI flags, RDED aliases and the config object."""
import json

import pytest

from nrrdd.cli import build_config, main
from nrrdd.config import RunConfig


def _parse(argv):
    import argparse

    from nrrdd.cli import _add_config_flags

    p = argparse.ArgumentParser()
    _add_config_flags(p)
    return build_config(p.parse_args(argv))


def test_rded_aliases_and_precedence(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"ipc": 50, "nrr_eps": 0.3, "mipc": 100}))
    cfg = _parse(["--config", str(cfg_file), "--subset", "cifar10", "--arch-name", "resnet18_modified",
                  "--stud-name", "conv3", "--factor", "2", "--num-crop", "7", "--mipc", "200", "--re-epochs", "9",
                  "--re-batch-size", "64", "--temperature", "4", "--nrr-betas", "0.4", "0.8", "--no-refine"])
    assert (cfg.dataset, cfg.arch, cfg.student, cfg.factor, cfg.num_crop) == ("cifar10", "resnet18_modified", "conv3", 2, 7)
    assert (cfg.mipc, cfg.ipc, cfg.nrr_eps, cfg.epochs, cfg.batch_size) == (200, 50, 0.3, 9, 64)
    assert cfg.temperature == 4.0 and cfg.nrr_betas == (0.4, 0.8) and cfg.refine is False
    assert RunConfig().refine is None and _parse([]).to_dict() == RunConfig().to_dict()


def test_config_roundtrip_and_unknown_keys(tmp_path):
    cfg = RunConfig(ipc=3, nrr_betas=(0.1, 0.2))
    cfg.save(tmp_path / "c.json")
    assert RunConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown config keys"):
        RunConfig.from_dict({"ipcc": 3})


def test_rded_batch_size_rule():
    assert RunConfig(ipc=1).resolved_batch_size(10) == 10
    assert RunConfig(ipc=10).resolved_batch_size(10) == 50
    assert RunConfig(ipc=50).resolved_batch_size(10) == 100
    assert RunConfig(ipc=50).resolved_batch_size(100) == 200
    assert RunConfig(ipc=10, batch_size=1000).resolved_batch_size(10) == 100


def test_missing_teacher_is_a_clear_cli_error(tmp_path, capsys):
    rc = main(["distill", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


@pytest.mark.parametrize("labels", ["hard", "online"])
def test_relabel_refuses_label_modes_it_does_not_store(labels, tmp_path, capsys):
    rc = main(["relabel", "--labels", labels, "--syn", str(tmp_path), "--teacher", str(tmp_path / "t.pt")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"relabel stores dbr or soft labels; --labels {labels} needs none" in err
    assert not any(tmp_path.iterdir())                                  # nothing written
