"""Datasets: IDX parsing, splits, errors that say what to do."""
import gzip
import struct

import pytest
import torch

from nrrdd.data import (DatasetLayoutError, DatasetNotFound, FolderImageSet, TensorImageSet, load_splits,
                        split_validation, _read_idx)


def _write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.numpy().tobytes())


def _fake_mnist(root, n_train=60, n_test=20):
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8))
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", (torch.arange(n) % 10).to(torch.uint8))


def test_idx_files_load_and_validation_is_held_out(tmp_path):
    _fake_mnist(tmp_path, n_train=200)
    sp = load_splits("fashion-mnist", str(tmp_path), val_per_class=2)
    assert len(sp.val) == 20 and len(sp.train) == 180 and len(sp.test) == 20
    assert sp.classes[0] == "T-shirt/top" and sp.channels == 1 and sp.size == 28
    x = sp.train.load([0, 1])
    assert x.shape == (2, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    val_idx, train_idx = split_validation(torch.arange(200) % 10, 2)
    assert set(val_idx.tolist()).isdisjoint(train_idx.tolist())
    assert torch.equal(split_validation(torch.arange(200) % 10, 2)[0], val_idx)    # fixed split


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFound, match="apt-get install dataset-fashion-mnist"):
        load_splits("fashion-mnist", str(tmp_path))
    with pytest.raises(DatasetNotFound, match="never downloads"):
        load_splits("cifar10", str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset"):
        load_splits("imagenet-22k")


def test_truncated_idx_file_is_rejected(tmp_path):
    p = tmp_path / "x.gz"
    with gzip.open(p, "wb") as f:
        f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, 10, 28, 28) + b"\0" * 100)
    with pytest.raises(ValueError, match="truncated"):
        _read_idx(p)


def test_image_folder_layout_and_class_checks(tmp_path):
    from PIL import Image

    for c in ("00000", "00001"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.new("L" if i else "RGBA", (40, 30), color=100).save(tmp_path / c / f"{i}.png")
    ds = FolderImageSet(tmp_path, size=16)
    assert ds.classes == ["00000", "00001"] and ds.labels.tolist() == [0, 0, 1, 1]
    x = ds.load([0, 3])
    assert x.shape == (2, 3, 16, 16)
    with pytest.raises(DatasetLayoutError, match="do not match"):
        FolderImageSet(tmp_path, size=16, classes=["00000", "00002"])
    (tmp_path / "00002").mkdir()
    with pytest.raises(DatasetLayoutError, match="holds no images"):
        FolderImageSet(tmp_path, size=16)
    (tmp_path / "00002" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot decode image .*bad.jpg"):
        FolderImageSet(tmp_path, size=16).load([4])


def test_tensor_image_set_checks_inputs():
    with pytest.raises(ValueError, match="uint8"):
        TensorImageSet(torch.zeros(2, 1, 4, 4), torch.zeros(2), ["a"])
    with pytest.raises(ValueError, match="labels"):
        TensorImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3), ["a"])


def test_a_synthetic_set_with_nan_is_refused_naming_the_images(tmp_path):
    """read_synthetic checks the set a chunk of images at a time (a whole-set mask is a quarter of the set):
    images in any chunk are found, and named."""
    from nrrdd.io import atomic_save_safetensors
    from nrrdd.rundir import read_synthetic

    images, labels = torch.zeros(600, 1, 2, 2), torch.arange(600) % 7
    atomic_save_safetensors(tmp_path / "synthetic.safetensors", {"images": images, "labels": labels})
    assert torch.equal(read_synthetic(tmp_path)[0], images)
    images[3, 0, 1, 1], images[260, 0, 0, 0], images[599, 0, 0, 1] = float("inf"), float("nan"), float("-inf")
    atomic_save_safetensors(tmp_path / "synthetic.safetensors", {"images": images, "labels": labels})
    with pytest.raises(ValueError, match=r"3 synthetic image\(s\) hold NaN/inf \(images \[3, 260, 599\], classes \[1, 3, 4\]"):
        read_synthetic(tmp_path)


def test_evaluation_resize_is_rdeds_formula():
    # RDED's validation: transforms.Resize(input_size // 7 * 8) then CenterCrop(input_size)
    from nrrdd.data import center_geometry, eval_resize

    assert [eval_resize(s) for s in (28, 32, 64, 128, 224)] == [32, 32, 72, 144, 256]
    assert center_geometry(32, 32, eval_resize(32), 32) == (32, 32, 0, 0)        # 32 px files: no zoom
    assert center_geometry(64, 64, eval_resize(64), 64) == (72, 72, 4, 4)
    assert center_geometry(500, 375, eval_resize(224), 224) == (341, 256, 58, 16)
