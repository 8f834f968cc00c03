"""RDED's conventions, so that its users' commands run unchanged (LINs-lab/RDED, ``argument.py``).

``--subset NAME`` (RDED's flag for ``--dataset``) with one of :data:`SUBSETS` resolves as RDED's argument parser
does, for every setting the command line does not give itself:

- data: ``./data/<subset>/train`` and ``./data/<subset>/val``, class folders (``00000/ 00001/ ...``); CIFAR as
  torchvision's python archive under ``./data`` when there is no such folder;
- input size: 32 (CIFAR), 64 (Tiny-ImageNet), 224 (ImageNet subsets; 128 for conv5/conv6 on nette, woof and
  imagenet-100);
- evaluation on the first ``val_ipc`` images per class of the val folder (1000 for CIFAR-10, 100 for CIFAR-100,
  50 otherwise), resized to ``size // 7 * 8`` and centre-cropped;
- normalisation: ImageNet's mean and std for every subset, as RDED's validation code;
- the teacher ``./data/pretrain_models/<subset>_<arch>.pth`` when ``--teacher`` is not given;
- the student's batch size (RDED's rule, 100 for Tiny-ImageNet, 25 for CIFAR-100 conv3 -> conv3) and
  AdamW learning rate (RDED's per-student table);
- the output folder ``./exp/<subset>_<arch>_f<factor>_mipc<mipc>_ipc<ipc>_cr<num_crop>`` (RDED's experiment
  name), its PNGs also reachable as ``syn_data/``, where RDED's evaluation reads them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig


@dataclass(frozen=True)
class Subset:
    classes: int
    input_size: int
    val_ipc: int                 # evaluation images per class
    small_for_conv56: bool = False   # 128 px when the teacher or student is conv5 / conv6


SUBSETS = {
    "cifar10": Subset(10, 32, 1000),
    "cifar100": Subset(100, 32, 100),
    "tinyimagenet": Subset(200, 64, 50),
    "imagenet-10": Subset(10, 224, 50),
    "imagenet-nette": Subset(10, 224, 50, True),
    "imagenet-woof": Subset(10, 224, 50, True),
    "imagenet-100": Subset(100, 224, 50, True),
    "imagenet-1k": Subset(1000, 224, 50),
}

# RDED's AdamW learning rate per student (argument.py); others keep --lr
STUDENT_LR = {"vgg11": 5e-4, "conv3": 1e-3, "conv4": 1e-3, "conv5": 1e-3, "conv6": 1e-3, "resnet18": 1e-3,
              "resnet18_modified": 1e-3, "efficientnet_b0": 2e-3, "mobilenet_v2": 2.5e-3, "alexnet": 1e-4,
              "resnet50": 1e-3, "resnet101": 1e-3, "resnet101_modified": 1e-3, "vit_b_16": 1e-4, "swin_v2_t": 1e-4}

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def folder(subset: str, split: str, root: str | Path = "data") -> Path:
    return Path(root) / subset / split


def input_size(subset: str, arch: str, student: str) -> int:
    s = SUBSETS[subset]
    if s.small_for_conv56 and ({arch, student} & {"conv5", "conv6"}):
        return 128
    return s.input_size


def exp_name(cfg: RunConfig) -> str:
    return f"{cfg.dataset}_{cfg.arch}_f{cfg.factor}_mipc{cfg.mipc}_ipc{cfg.ipc}_cr{cfg.num_crop}"


def apply_subset(cfg: RunConfig, explicit: set[str], set_out: bool = True) -> RunConfig:
    """``cfg`` with RDED's settings for its ``--subset`` filled in where ``explicit`` (the fields the command line
    or config file gave) leaves them open; ``set_out``: the output folder too. Unchanged for other datasets."""
    s = SUBSETS.get(cfg.dataset)
    if s is None:
        return cfg
    changes: dict = {}

    def default(field: str, value) -> None:
        if field not in explicit:
            changes[field] = value

    default("input_size", input_size(cfg.dataset, cfg.arch, cfg.student))
    default("test_per_class", s.val_ipc)
    if cfg.dataset == "tinyimagenet":
        default("batch_size", 100)
    if (cfg.dataset, cfg.arch, cfg.student) == ("cifar100", "conv3", "conv3"):
        default("batch_size", 25)
        default("lr", 2e-3)
    elif cfg.student in STUDENT_LR:
        default("lr", STUDENT_LR[cfg.student])
    teacher = Path("data") / "pretrain_models" / f"{cfg.dataset}_{cfg.arch}.pth"
    if "teacher" not in explicit and teacher.exists():
        changes["teacher"] = str(teacher)
    out = cfg.replace(**changes)
    if set_out and "out" not in explicit:
        out = out.replace(out=str(Path("exp") / exp_name(out.replace(factor=out.resolved_factor(out.input_size)))))
    return out


def link_syn_data(out: str | Path) -> None:
    """``<out>/syn_data`` -> ``syn`` (the PNG folder), where RDED's evaluation reads synthetic images."""
    from .rundir import RunDir

    link = Path(out) / "syn_data"
    if RunDir(out).png.is_dir() and not link.exists() and not link.is_symlink():
        link.symlink_to("syn", target_is_directory=True)
