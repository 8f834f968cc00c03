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


def test_every_field_says_what_it_means_in_help(capsys):
    from dataclasses import fields

    for f in fields(RunConfig):
        assert f.metadata["help"].strip() and f.metadata["stage"], f.name
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    out = " ".join(capsys.readouterr().out.split())         # argparse wraps lines
    assert "NRR mask M = max(0, eps - CAM)" in out and "(default: 0.5)" in out        # --nrr-eps
    assert "stage 2, refinement of the images" in out                                # its group
    assert "{online,soft,dbr,hard}" in out and "{auto,dali,torch}" in out             # valid values


def test_invalid_choices_are_refused_from_flags_and_config_files(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["show-config", "--dbr-distance", "l3"])
    assert "invalid choice: 'l3'" in capsys.readouterr().err
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"loader": "pil"}))
    with pytest.raises(ValueError, match="loader 'pil' is not one of auto, dali, torch"):
        RunConfig.load(bad)
    with pytest.raises(ValueError, match="cidd_keep 'middle'"):
        RunConfig().replace(cidd_keep="middle")


def test_stage_sets_follow_the_fields_stages():
    from nrrdd.config import NOT_DISTILL, RUNTIME_FIELDS

    assert {"out", "resume", "threads", "checkpoint_every", "compile"} <= RUNTIME_FIELDS
    assert "precision" not in RUNTIME_FIELDS and "loader" not in RUNTIME_FIELDS    # they change the numbers
    assert RUNTIME_FIELDS <= NOT_DISTILL and {"labels", "epochs", "teacher", "teacher_epochs", "test_limit"} <= NOT_DISTILL
    assert not {"ipc", "mipc", "nrr_eps", "crop_scale", "seed", "arch", "loader"} & NOT_DISTILL
