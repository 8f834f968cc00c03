"""Real image folders for the loader tests, built from data that installs offline.

- ImageNet: the 20 ImageNet validation JPEGs (512 px) shipped in the ``foolbox`` wheel, one folder per
  label (the label is the last number of the file name).
- Fashion-MNIST as a PNG folder (RDED layout ``00000/ 00001/ ...``), from the Debian package's IDX files.
- A folder of bad and odd inputs made from those JPEGs.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").exists(),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
# A small real Fashion-MNIST setup for CLI tests (a teacher trains in seconds on it; conftest.fmnist_teacher).
SMALL_FMNIST = ["--train-limit", "3000", "--test-limit", "1000", "--val-per-class", "20", "--threads", "2"]


def foolbox_data() -> Path | None:
    spec = importlib.util.find_spec("foolbox")          # found without importing (foolbox needs eagerpy)
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    return d if d.is_dir() else None


def imagenet_jpegs() -> list[Path]:
    d = foolbox_data()
    return sorted(d.glob("imagenet_*.jpg")) if d else []


def imagenet_folder(root: Path) -> Path:
    for f in imagenet_jpegs():
        label = f.stem.split("_")[-1]
        (root / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, root / label / f.name)
    return root


def fmnist_png_folder(root: Path, per_class: int, split: str = "train") -> Path:
    from nrrdd.data import _read_idx

    prefix = "train" if split == "train" else "t10k"
    x = _read_idx(FMNIST / f"{prefix}-images-idx3-ubyte.gz")
    y = _read_idx(FMNIST / f"{prefix}-labels-idx1-ubyte.gz")
    for c in range(10):
        (root / f"{c:05d}").mkdir(parents=True, exist_ok=True)
        for k, i in enumerate(np.flatnonzero(y == c)[:per_class]):
            Image.fromarray(x[i]).save(root / f"{c:05d}" / f"{k:05d}.png")
    return root


def bad_input_folder(root: Path) -> dict[str, Path]:
    """Two classes of good JPEGs plus one of each bad or odd input; returns the odd files by case."""
    jpgs = imagenet_jpegs()
    a, b = root / "a", root / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    for k, f in enumerate(jpgs[:8]):
        shutil.copy(f, (a if k % 2 == 0 else b) / f"good_{k}.jpg")
    data = jpgs[0].read_bytes()
    im = Image.open(jpgs[1])
    cases = {
        "truncated": a / "truncated.jpg", "empty": a / "empty.jpg", "not_image": b / "notes_renamed.jpg",
        "cmyk": a / "cmyk.jpg", "gray": b / "gray.jpg", "rgba": a / "rgba.png", "corrupt_png": b / "corrupt.png",
        "text_file": b / "README.txt",
    }
    cases["truncated"].write_bytes(data[:len(data) // 2])
    cases["empty"].write_bytes(b"")
    cases["not_image"].write_text("this is not an image\n")
    cases["text_file"].write_text("labels came from somewhere\n")
    im.convert("CMYK").save(cases["cmyk"], quality=95)
    im.convert("L").save(cases["gray"], quality=95)
    im.convert("RGBA").save(cases["rgba"])
    # a PNG whose header and IEND are intact but whose compressed pixel data is garbage: passes the cheap
    # screening, fails in the decoder itself
    im.save(root / "tmp.png")
    png = bytearray((root / "tmp.png").read_bytes())
    i = png.index(b"IDAT")
    for j in range(i + 8, i + 4000):
        png[j] ^= 0x5A
    cases["corrupt_png"].write_bytes(bytes(png))
    (root / "tmp.png").unlink()
    return cases
