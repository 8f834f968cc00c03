"""Shared pytest configuration.

Triton decides at kernel-decoration time whether to compile or interpret, so the
interpreter switch must be in the environment before anything imports triton
(nrrdd.kernels included): set it here, at import of the conftest.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from imagefolders import FMNIST, SMALL_FMNIST  # noqa: E402


@pytest.fixture(scope="session")
def fmnist_teacher(tmp_path_factory):
    """A conv3 teacher trained 2 epochs on SMALL_FMNIST through the CLI (shared by the modules that need one)."""
    import json

    from nrrdd.cli import main

    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("fmnist_teacher")
    assert main(["train-teacher", "--out", str(out), "--teacher-epochs", "2", *SMALL_FMNIST]) == 0
    meta = json.loads((out / "teacher.json").read_text())
    assert meta["test_top1"] > 50, meta
    return out / "teacher.pt"
