"""The two image loaders (torch, DALI) on real files: same boxes, same images within resampling
tolerance, sharding, bad inputs, and whole distillations that select the same patches.

Tolerances, in grey levels out of 255. Both backends decode with libjpeg-turbo / libpng, resize with an
antialiased linear (triangle) filter and cut each crop out before resizing it, so inside an image they
differ only in float rounding. They differ at the border when shrinking: torch renormalises the filter
weights that fall outside the image, DALI repeats the edge pixel, so the outermost output row and column
can differ by up to ~12 levels. Measured on the 20 ImageNet JPEGs (224 px, crops 112): mean |diff| 0.01
(images and crops), 99th percentile 0.13 / 0.25, maximum 12 / 8.5. On 28 px Fashion-MNIST with 14 px
crops the border is a large share of each crop: interior pixels agree as above, whole crops to a mean of
~0.6 levels. The bounds below leave 4-10x headroom on mean and p99 and do not bound the maximum.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from imagefolders import FMNIST, bad_input_folder, fmnist_png_folder, imagenet_folder, imagenet_jpegs, needs_fmnist

from nrrdd.cli import main
from nrrdd.data import DatasetLayoutError, FolderImageSet, Normalizer, eval_resize
from nrrdd.discover import candidate_boxes
from nrrdd.loaders import PatchSource, dali_available, image_batches

needs_jpegs = pytest.mark.skipif(not imagenet_jpegs(), reason="foolbox wheel (its 20 ImageNet JPEGs) not installed")
needs_dali = pytest.mark.skipif(not dali_available(), reason="DALI not installed (pip install 'nrrdd[dali]')")
BACKENDS = ["torch", pytest.param("dali", marks=needs_dali)]
IMAGENET_NORM = Normalizer((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
STD255 = IMAGENET_NORM.std.view(-1, 1, 1) * 255


def test_ci_installs_dali():
    """CI must test the DALI backend, not skip it."""
    if os.environ.get("CI"):
        assert dali_available(), "CI runs without DALI: .ci/run must install nrrdd[dali]"


def grey_levels(a: torch.Tensor, b: torch.Tensor, std255=STD255) -> tuple[float, float]:
    """Mean and 99th percentile of |a - b| (normalised tensors [..., C, H, W]) in grey levels."""
    d = ((a - b).abs() * std255).flatten()
    return d.mean().item(), d.kthvalue(max(1, int(0.99 * d.numel()))).values.item()


def read_all(src: PatchSource) -> dict[str, torch.Tensor]:
    batches = list(src)
    out = {k: torch.cat([getattr(b, k) for b in batches]) for k in ("index", "label", "image")}
    if src.crop_size:
        out["crops"] = torch.cat([b.crops for b in batches])
        out["boxes"] = torch.cat([b.boxes for b in batches])
    return out


def boxes_of(seed, num_crop, size):
    return lambda i: candidate_boxes(seed, i, num_crop, size, (0.08, 1.0))


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    if not imagenet_jpegs():
        pytest.skip("foolbox wheel (its 20 ImageNet JPEGs) not installed")
    return imagenet_folder(tmp_path_factory.mktemp("imagenet"))


@needs_dali
@needs_jpegs
def test_backends_agree_on_imagenet_jpegs(imagenet):
    data = FolderImageSet(imagenet, 224)
    got = {be: read_all(PatchSource(data, torch.arange(len(data)), IMAGENET_NORM, crop_size=112,
                                    boxes=boxes_of(0, 5, 224), loader=be, batch_size=6, workers=1))
           for be in ("torch", "dali")}
    t, d = got["torch"], got["dali"]
    assert len(t["index"]) == 20
    for k in ("index", "label", "boxes"):
        assert torch.equal(t[k], d[k]), k
    assert t["image"].shape == (20, 3, 224, 224) and t["crops"].shape == (20, 5, 3, 112, 112)
    mean, p99 = grey_levels(t["image"], d["image"])
    assert mean < 0.1 and p99 < 1.0, (mean, p99)
    mean, p99 = grey_levels(t["crops"], d["crops"])
    assert mean < 0.1 and p99 < 1.5, (mean, p99)


@needs_dali
@needs_fmnist
def test_backends_agree_on_fashion_mnist_pngs(tmp_path):
    root = fmnist_png_folder(tmp_path / "fm", per_class=6)
    data = FolderImageSet(root, 28)
    norm = Normalizer((0.286,) * 3, (0.353,) * 3)
    t, d = (read_all(PatchSource(data, torch.arange(len(data)), norm, crop_size=14, boxes=boxes_of(1, 3, 28),
                                 loader=be, batch_size=16, workers=0 if be == "torch" else 1))
            for be in ("torch", "dali"))
    assert torch.equal(t["boxes"], d["boxes"]) and torch.equal(t["label"], d["label"])
    # PNG decoding is exact and 28 -> 28 is no resize: whole images are identical
    torch.testing.assert_close(t["image"], d["image"], atol=1e-5, rtol=0)
    std255 = norm.std.view(-1, 1, 1) * 255
    mean, p99 = grey_levels(t["crops"][..., 1:-1, 1:-1], d["crops"][..., 1:-1, 1:-1], std255)
    assert mean < 0.1 and p99 < 1.0, (mean, p99)                      # inside the crops: rounding only
    mean, _ = grey_levels(t["crops"], d["crops"], std255)
    assert mean < 2.0, mean                                            # borders: see the module docstring


@needs_jpegs
@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_see_every_image_once_with_the_same_crops(imagenet, backend):
    data = FolderImageSet(imagenet, 64)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    kw = dict(crop_size=32, boxes=boxes_of(3, 2, 64), loader=backend, batch_size=4, workers=1)
    whole = read_all(PatchSource(data, order, IMAGENET_NORM, **kw))
    parts = [read_all(PatchSource(data, order, IMAGENET_NORM, shard_id=r, num_shards=3, **kw)) for r in range(3)]
    seen = torch.cat([p["index"] for p in parts])
    assert sorted(seen.tolist()) == sorted(order.tolist())           # each image exactly once
    pos = {i: k for k, i in enumerate(whole["index"].tolist())}
    for p in parts:
        rows = torch.tensor([pos[i] for i in p["index"].tolist()])
        assert torch.equal(p["boxes"], whole["boxes"][rows])
        torch.testing.assert_close(p["crops"], whole["crops"][rows], atol=1e-5, rtol=0)


@needs_jpegs
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_are_skipped_with_a_reason_and_odd_formats_converted(tmp_path, backend):
    cases = bad_input_folder(tmp_path / "bad")
    data = FolderImageSet(tmp_path / "bad", 64)
    assert data.ignored == [(str(cases["text_file"]), "not an image file (suffix '.txt')")]
    src = PatchSource(data, torch.arange(len(data)), IMAGENET_NORM, crop_size=32, boxes=boxes_of(0, 2, 64),
                      loader=backend, batch_size=4, workers=1)
    out = read_all(src)
    reasons = dict(src.skipped)
    assert set(reasons) == {str(cases[k]) for k in ("truncated", "empty", "not_image", "corrupt_png")}
    assert "truncated JPEG" in reasons[str(cases["truncated"])]
    assert "empty file" in reasons[str(cases["empty"])]
    assert "not an image" in reasons[str(cases["not_image"])]
    assert "cannot decode" in reasons[str(cases["corrupt_png"])]
    files = [data.samples[i][0] for i in out["index"].tolist()]
    assert len(files) == len(data) - 4 == 11
    img = {f: out["image"][k] for k, f in enumerate(files)}
    ref = img[str(tmp_path / "bad" / "b" / "good_1.jpg")]          # the image the odd files were made from
    gray = img[str(cases["gray"])] * IMAGENET_NORM.std.view(-1, 1, 1) + IMAGENET_NORM.mean.view(-1, 1, 1)
    assert (gray[0] - gray[1]).abs().max() < 1e-5 and (gray[1] - gray[2]).abs().max() < 1e-5  # R = G = B
    assert grey_levels(img[str(cases["rgba"])], ref)[0] < 0.5          # alpha dropped, colours kept
    assert grey_levels(img[str(cases["cmyk"])], ref)[0] < 4.0          # re-encoded as CMYK JPEG: lossy


def test_empty_class_folder_stops_before_any_work(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "x.png")
    (tmp_path / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetLayoutError, match=r"dog holds no images"):
        FolderImageSet(tmp_path, 8)


@needs_jpegs
@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_source_resizes_by_8_7_and_centre_crops(imagenet, backend):
    import torch.nn.functional as F

    from nrrdd.data import decode_rgb

    data = FolderImageSet(imagenet, 56, resize=eval_resize(56))
    got = read_all(image_batches(data, IMAGENET_NORM, loader=backend, batch_size=7, workers=1))
    assert got["image"].shape == (20, 3, 56, 56) and torch.equal(got["index"], torch.arange(20))
    x = decode_rgb(data.samples[3][0]).float()[None] / 255           # 512 x 512 -> 64 x 64 -> centre 56
    ref = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)[0, :, 4:60, 4:60]
    assert grey_levels(got["image"][3], IMAGENET_NORM(ref[None])[0])[0] < 0.25


# --- whole runs through the CLI -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fm_folder_teacher(tmp_path_factory):
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed")
    root = tmp_path_factory.mktemp("fmfolder")
    train = fmnist_png_folder(root / "train", per_class=40)
    test = fmnist_png_folder(root / "test", per_class=10, split="test")
    data = ["--dataset", "imagefolder", "--data-root", str(train), "--test-root", str(test), "--input-size", "28",
            "--val-per-class", "4", "--threads", "2", "--loader-workers", "1"]
    out = root / "teacher"
    assert main(["train-teacher", "--out", str(out), "--teacher-epochs", "2", "--loader", "torch", *data]) == 0
    return data, out / "teacher.pt", root


@pytest.mark.slow
@needs_dali
@needs_fmnist
def test_distill_selects_the_same_patches_with_dali_and_torch(fm_folder_teacher, tmp_path):
    data, teacher, _ = fm_folder_teacher
    runs = {}
    for be in ("dali", "torch"):
        out = tmp_path / be
        common = ["--teacher", str(teacher), "--out", str(out), "--ipc", "2", "--mipc", "20", "--num-crop", "3",
                  "--nrr-iterations", "3", "--re-epochs", "2", "--loader", be, *data]
        assert main(["distill", *common]) == 0
        assert main(["evaluate", "--labels", "hard", *common]) == 0
        runs[be] = (json.loads((out / "manifest_distill.json").read_text()),
                    json.loads((out / "eval_hard_conv3_s0.json").read_text()))
    (md, ed), (mt, et) = runs["dali"], runs["torch"]
    assert md["loader"] == "dali" and mt["loader"] == "torch"
    sel = [[(s["file"], s["box"]) for s in m["sources"]] for m in (md, mt)]
    assert sel[0] == sel[1] and len(sel[0]) == 20
    for a, b in zip(md["sources"], mt["sources"]):
        assert abs(a["score"] - b["score"]) < 0.02
    assert abs(ed["test_top1"] - et["test_top1"]) <= 1.0              # 100 test images: at most one differs


@pytest.mark.slow
@needs_fmnist
def test_folder_classes_not_matching_the_teacher_stop_the_run(fm_folder_teacher, tmp_path, capsys):
    import shutil

    data, teacher, root = fm_folder_teacher
    args = list(data)
    for split in ("train", "test"):
        shutil.copytree(root / split, tmp_path / split)
        (tmp_path / split / "00009").rename(tmp_path / split / "boots")
        args[args.index(str(root / split))] = str(tmp_path / split)
    rc = main(["distill", "--teacher", str(teacher), "--out", str(tmp_path / "o"), "--ipc", "1", "--mipc", "5",
               "--loader", "torch", *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert "do not match those teacher" in err and "missing ['00009']" in err and "unexpected ['boots']" in err
    assert not (tmp_path / "o").exists()


@needs_jpegs
def test_screening_accepts_trailing_data_and_rejects_truncation(tmp_path):
    from nrrdd.data import check_image_file

    data = imagenet_jpegs()[0].read_bytes()
    trailer = tmp_path / "trailer.jpg"
    trailer.write_bytes(data + b"CAMERA-TRAILER" * 8)            # appended metadata after the end marker
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[:-5000])
    assert check_image_file(trailer) is None
    assert "truncated JPEG" in check_image_file(cut)


@needs_jpegs
@pytest.mark.parametrize("backend", BACKENDS)
def test_undecodable_files_anywhere_in_the_stream_are_skipped_once(tmp_path, backend):
    """Files that pass screening but fail decoding, in the first, a middle and the last batch (and two
    batches in a row): each is skipped, every good image arrives exactly once, in order."""
    cases = bad_input_folder(tmp_path / "src")
    corrupt = cases["corrupt_png"].read_bytes()
    root = tmp_path / "d"
    (root / "c").mkdir(parents=True)
    for k, f in enumerate(imagenet_jpegs()[:7]):
        (root / "c" / f"{2 * k + 1:02d}.jpg").write_bytes(f.read_bytes())
    bad_names = ["00.png", "04.png", "06.png", "14.png"]    # batches of 2: the first, 2nd and 3rd, the last
    for name in bad_names:
        (root / "c" / name).write_bytes(corrupt)
    data = FolderImageSet(root, 32)
    src = PatchSource(data, torch.arange(len(data)), IMAGENET_NORM, loader=backend, batch_size=2, workers=1)
    out = read_all(src)
    assert sorted(Path(p).name for p, _ in src.skipped) == bad_names
    names = [Path(data.samples[i][0]).name for i in out["index"].tolist()]
    assert names == [f"{2 * k + 1:02d}.jpg" for k in range(7)]


@pytest.mark.slow
@needs_fmnist
@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_teacher_training_skips_undecodable_files_and_lists_them(tmp_path, backend):
    train = fmnist_png_folder(tmp_path / "train", per_class=20)
    test = fmnist_png_folder(tmp_path / "test", per_class=5, split="test")
    (train / "00002" / "00004.png").write_bytes(b"")                                       # empty
    (train / "00007" / "00011.png").write_bytes((train / "00007" / "00012.png").read_bytes()[:150])  # truncated
    out = tmp_path / "t"
    assert main(["train-teacher", "--out", str(out), "--teacher-epochs", "2", "--dataset", "imagefolder",
                 "--data-root", str(train), "--test-root", str(test), "--input-size", "28", "--val-per-class", "0",
                 "--threads", "2", "--loader", backend, "--loader-workers", "1"]) == 0
    skipped = json.loads((out / "manifest_train_teacher.json").read_text())["skipped_files"]
    assert sorted(Path(s["file"]).relative_to(train).as_posix() for s in skipped) == ["00002/00004.png",
                                                                                    "00007/00011.png"]
    assert json.loads((out / "teacher.json").read_text())["test_top1"] > 10
