"""One config object per run: defaults, then a JSON file, then command-line flags.

Every default that METHOD.md marks **[default]** (the paper leaves it open) is a field here, so it can be
changed without touching code, and the whole object is written next to a run's outputs.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


CPU_COMPILE_MIN_SAMPLES = 20_000   # see RunConfig.resolved_compile


# What each group of fields is for. A synthetic set depends on the fields of the first four stages only; the
# ``runtime`` fields say how a run runs, not what it computes (a killed run may resume with others).
STAGES = {
    "data": "the training images: which, how they are read and normalised, the held-out validation split",
    "models": "the teacher's architecture",
    "discover": "stage 1, discovery of the real patches (CIDD for nrrdd; RDED; random)",
    "refine": "stage 2, refinement of the images (NRR; SRe2L's synthesis)",
    "student": "stage 3, relabelling and student training",
    "test": "the test images a student and a teacher are scored on",
    "teacher": "the teacher: its checkpoint, or how train-teacher trains it",
    "device": "where and in which precision the numbers are computed",
    "runtime": "how a run runs (threads, output folder, resuming): not what it computes",
}
DISTILL_STAGES = ("data", "models", "discover", "refine")


def _f(default: Any, help: str, stage: str, choices: tuple[str, ...] | None = None) -> Any:
    """A RunConfig field: its default, what it means (the flag's --help), its stage and its valid values."""
    assert stage in STAGES, stage
    return dataclasses.field(default=default, metadata={"help": help, "stage": stage, "choices": choices})


@dataclass
class RunConfig:
    # --- data -----------------------------------------------------------------------------------
    dataset: str = _f("fashion-mnist", "fashion-mnist | mnist | cifar10 | cifar100 | imagefolder, or RDED's --subset "
                      "names (cifar10, cifar100, tinyimagenet, imagenet-10, imagenet-nette, imagenet-woof, "
                      "imagenet-100, imagenet-1k: ./data/<subset>/train and /val, RDED's sizes, teacher "
                      "./data/pretrain_models/<subset>_<arch>.pth, output ./exp/<RDED's experiment name>; see "
                      "nrrdd/rded.py)", "data")
    data_root: str | None = _f(None, "where the dataset lives (None: the named dataset's usual place; imagefolder: "
                               "the training folder)", "data")
    test_root: str | None = _f(None, "imagefolder only: the folder of the test/val split", "test")
    val_per_class: int = _f(500, "images per class held out of the training split for tuning (never the test set)",
                            "data")
    train_limit: int = _f(0, ">0: use only this many training images (seeded), for quick runs", "data")
    test_limit: int = _f(0, ">0: evaluate on the first this-many test images only (quick runs)", "test")
    test_per_class: int = _f(0, ">0: evaluate on the first this-many test images of each class (RDED's val_ipc)",
                             "test")
    input_size: int | None = _f(None, "None: the dataset's own (image folders: read from the files' headers, the "
                                "rule in the manifest)", "data")
    mean: str | None = _f(None, "normalisation means, per channel: 0.485,0.456,0.406, or a preset (imagenet, cifar10, "
                          "cifar100, mnist, fashion-mnist); None: the dataset's (ImageNet's for image folders). Use "
                          "the teacher's training values", "data")
    std: str | None = _f(None, "normalisation stds, per channel, or a preset; None: the preset named by --mean, else "
                         "the dataset's", "data")
    seed: int = _f(0, "every random choice of a run (candidates, crops, augmentation, initial weights)", "data")
    loader: str = _f("auto", "image decoding for image folders: auto (DALI if installed) | dali | torch", "data",
                     ("auto", "dali", "torch"))

    # --- models -----------------------------------------------------------------------------------
    arch: str = _f("conv3", "teacher: registered name (conv3, resnet18_modified), torchvision classifier (resnet18), "
                   "or your own nn.Module as package.module:ClassName (importable: installed or on PYTHONPATH)",
                   "models")
    arch_kwargs: str = _f("{}", "JSON object of constructor kwargs for --arch, e.g. '{\"width\": 64}'; num_classes "
                          "is added when the constructor has that parameter", "models")
    student: str = _f("conv3", "student architecture, same forms as --arch", "student")
    student_kwargs: str = _f("{}", "JSON object of constructor kwargs for --student", "student")
    teacher: str | None = _f(None, "teacher checkpoint: a state_dict or {\"model\": state_dict}", "teacher")

    # --- stage 1: discovery ---------------------------------------------------------------------------
    method: str = _f("nrrdd", "nrrdd (CIDD + NRR) | rded | random | sre2l (Gaussian noise + unmasked synthesis with "
                     "jitter/flip)", "discover", ("nrrdd", "rded", "random", "sre2l"))
    ipc: int = _f(10, "synthetic images per class", "discover")
    mipc: int = _f(300, "real candidate images per class", "discover")
    num_crop: int = _f(5, "random crops scored per candidate image", "discover")
    factor: int | None = _f(None, "patches per side of a synthetic image; None: 1 up to 64 px, 2 above (METHOD.md)",
                            "discover")
    crop_scale: tuple[float, float] = _f((0.08, 1.0), "discovery: random-resized-crop area range, as a fraction of "
                                         "the image (torchvision's scale)", "discover")
    crop_min_side: int = _f(0, "discovery: no crop smaller than this many px a side (raises --crop-scale's lower "
                            "bound to (side / input size)^2); 0: off", "discover")
    whole_image: bool = _f(False, "discovery (rded, nrrdd): the whole image is one more candidate crop of every image "
                           "(nrrdd's CAM ratio is 1 for it, the highest: CIDD then keeps whole images only)",
                           "discover")
    cam: str = _f("auto", "auto (CAM where exact, else Grad-CAM) | cam | gradcam", "discover",
                  ("auto", "cam", "gradcam"))
    cidd_keep: str = _f("auto", "nrrdd discovery: rank candidates by confidence ascending (low, the paper) or "
                        "descending (high, RDED's rule); auto: high at IPC 1, low from IPC 2 (docs/study.md)",
                        "discover", ("auto", "low", "high"))
    cidd_quantile: float = _f(0.0, "nrrdd discovery: keep ipc x factor^2 consecutive candidates of the ranking "
                              "starting this far down it (0: the first, the paper; 0.5: the middle; 1: the last)",
                              "discover")
    cidd_correct: bool = _f(False, "nrrdd discovery: rank crops the teacher assigns to another class after all "
                            "others", "discover")
    discover_batch_size: int = _f(256, "candidate images per teacher batch in discovery", "discover")

    # --- stage 2: refinement (NRR) ------------------------------------------------------------------
    refine: bool | None = _f(None, "stage 2 on/off; None: on for nrrdd and sre2l, off for rded and random "
                             "(rded with refinement: an ablation)", "refine")
    nrr_eps: float = _f(0.5, "NRR mask M = max(0, eps - CAM): pixels with CAM >= eps never change", "refine")
    nrr_iterations: int = _f(500, "NRR optimisation steps per batch", "refine")
    nrr_lr: float = _f(0.25, "Adam learning rate on the pixels (SRe2L's), cosine schedule", "refine")
    nrr_betas: tuple[float, float] = _f((0.5, 0.9), "Adam's betas on the pixels", "refine")
    nrr_mask_mode: str = _f("step", "where the NRR mask enters the update: step (scales Adam's step, fused kernel), "
                            "grad (scales the gradient before a plain Adam), sgd (x -= lr * M * grad; lr on another "
                            "scale)", "refine", ("step", "grad", "sgd"))
    nrr_adam_eps: float = _f(1e-8, "Adam's epsilon on the pixels", "refine")
    a_bn: float = _f(0.01, "weight of SRe2L's BatchNorm-statistics loss", "refine")
    first_bn_multiplier: float = _f(10.0, "the first BatchNorm layer's weight in that loss", "refine")
    mask_every: int = _f(0, "0: the NRR mask is computed once, at the start; k: recomputed every k steps", "refine")
    refine_batch_size: int = _f(100, "images refined together (one batch's BatchNorm statistics)", "refine")

    # --- SRe2L synthesis (method sre2l): noise init, then the refinement loop unmasked ----------------
    # Adam lr/betas/eps, a_bn, first_bn_multiplier and refine_batch_size are the nrr_* / shared fields above.
    sre2l_iterations: int = _f(1000, "method sre2l: optimisation steps per batch (uses --nrr-lr, --nrr-betas, "
                               "--a-bn)", "refine")
    sre2l_jitter: int = _f(4, "method sre2l: each step roll the teacher's input by up to this many px (per axis)",
                           "refine")
    sre2l_flip: bool | None = _f(None, "method sre2l: each step flip the teacher's input with p 0.5; None: on, "
                                 "except for mnist", "refine")

    # --- stage 3: relabel + student training --------------------------------------------------------
    labels: str = _f("online", "the student's labels: online (teacher soft labels each step) | soft (stored) | dbr "
                     "(stored distances) | hard", "student", ("online", "soft", "dbr", "hard"))
    epochs: int = _f(300, "student epochs (RDED's --re-epochs)", "student")
    batch_size: int = _f(0, "student batch; 0: RDED's rule (ipc 1 -> 10, 10 -> 50, 50 -> 100, x2 for >= 100 "
                         "classes)", "student")
    lr: float = _f(1e-3, "student AdamW learning rate (RDED's)", "student")
    weight_decay: float = _f(0.01, "student AdamW weight decay (not on biases and BatchNorm)", "student")
    temperature: float = _f(20.0, "KL temperature of soft labels with CutMix (RDED's)", "student")
    cutmix_alpha: float = _f(1.0, "CutMix's Beta(alpha, alpha)", "student")
    recipe: str = _f("rded", "student recipe: rded (RDED's code: one CutMix ratio and box per batch, partners a "
                     "permutation of the batch, lr x 0.5(1+cos(pi e/2E)) per epoch) or nrrdd (CutMix per sample, lr "
                     "cosine to 0 per step). rded scored +3.5 (IPC 1) and +0.55 (IPC 10) validation points over nrrdd "
                     "(docs/study.md)", "student", ("rded", "nrrdd"))
    alpha_dbr: float = _f(1.0, "weight of DBR's distance term against its CutMix cross-entropy", "student")
    dbr_distance: str = _f("l1", "DBR's distance between student and teacher distances: l1, l2 (fused kernel) or "
                           "smooth-l1", "student", ("l1", "l2", "smooth-l1"))
    dbr_temperature: float = _f(1.0, "temperature of DBR's distances (the stored teacher distances and the "
                                "student's)", "student")
    dbr_sce_temperature: float | None = _f(None, "temperature of DBR's CutMix cross-entropy term; None: "
                                           "--dbr-temperature (one temperature, fused kernel)", "student")
    eval_batch_size: int = _f(500, "images per batch when scoring a model on the test and validation images",
                              "runtime")
    compile: bool | None = _f(None, "torch.compile student and teacher training; None: where it pays (on CUDA; on "
                              "the CPU from 20k training samples, epochs x images)", "runtime")
    sync_bn: bool | None = _f(None, "several processes: SyncBatchNorm in the student; None: on CUDA (the CPU has "
                              "none)", "student")
    set_on_device: bool | None = _f(None, "relabel and student training: copy the whole synthetic set to the device, "
                                    "or keep it in host memory and stream each step's rows there; None: on the device "
                                    "when it takes at most half its free memory (the batches are the same either "
                                    "way)", "runtime")

    # --- teacher training ----------------------------------------------------------------------------
    teacher_epochs: int = _f(5, "train-teacher: epochs (SGD, cosine learning rate)", "teacher")
    teacher_lr: float = _f(0.05, "train-teacher: SGD learning rate (momentum 0.9, nesterov)", "teacher")
    teacher_batch_size: int = _f(128, "train-teacher: batch size", "teacher")
    teacher_weight_decay: float = _f(5e-4, "train-teacher: SGD weight decay (not on biases and BatchNorm)", "teacher")
    teacher_flip: bool | None = _f(None, "train-teacher: random horizontal flips; None: on, except for mnist (digits "
                                   "are not mirror-symmetric)", "teacher")

    # --- runtime --------------------------------------------------------------------------------------
    device: str = _f("auto", "auto | cpu | cuda | cuda:N", "device")
    precision: str = _f("auto", "auto (bf16 autocast where the hardware has bf16 units) | fp32 | bf16", "device",
                        ("auto", "fp32", "bf16"))
    threads: int = _f(0, "CPU threads of this process; 0: torch's default", "runtime")
    loader_workers: int = _f(2, "DataLoader worker processes (torch loader) or DALI CPU threads", "runtime")
    out: str = _f("runs/run", "the run's output folder", "runtime")
    resume: bool = _f(False, "continue a killed run from the pieces it saved", "runtime")
    checkpoint_every: int = _f(10, "student training and relabelling: save their state every this many epochs",
                               "runtime")

    # ---------------------------------------------------------------------------------------------
    def resolved_factor(self, input_size: int) -> int:
        if self.factor is not None:
            return self.factor
        return 1 if input_size <= 64 else 2

    def resolved_refine(self) -> bool:
        if self.refine is not None:
            return self.refine
        return self.method in ("nrrdd", "sre2l")

    def resolved_cidd_keep(self) -> str:
        """CIDD's ranking: ``auto`` keeps the most confident candidates at IPC 1 and the least confident (the
        paper's rule) from IPC 2 up. The quality study (docs/study.md, validation split, Fashion-MNIST, 3 seeds)
        found the paper's rule 13 points below the most confident crop at IPC 1 and 0.5 above it at IPC 10;
        IPC 2-9 were not measured."""
        if self.cidd_keep != "auto":
            return self.cidd_keep
        return "high" if self.ipc == 1 else "low"

    def resolved_sre2l_flip(self) -> bool:
        """Flip during SRe2L synthesis as the teacher was trained: not for MNIST digits (train-teacher)."""
        if self.sre2l_flip is not None:
            return self.sre2l_flip
        return self.dataset != "mnist"

    def resolved_compile(self, device_type: str, n_images: int, epochs: int | None = None) -> bool:
        """torch.compile training where it pays. On CUDA always. On the CPU from ``CPU_COMPILE_MIN_SAMPLES`` = 20k
        training samples (epochs x images): IPC 10 x 10 classes x 300 epochs = 30k is on, IPC 1 (3k) and the
        demo's IPC 10 x 100 epochs (10k) are off, a teacher on 55k images is on. Measured (benchmarks/README.md):
        with bf16 units a cold compile costs ~25 s and saves ~18-21% a step; on 2 AVX2-only cores in fp32 it
        saves ~15-35% a step (a conv3 teacher: 1.06 vs 1.50 s a step), after a cold compile of ~1-2 min there
        and ~15 s with Inductor's on-disk cache warm (the second run of the same shapes onwards).
        ``epochs``: the run's (default: the student's ``epochs``). ``--compile`` / ``--no-compile`` decide."""
        if self.compile is not None:
            return self.compile
        samples = (self.epochs if epochs is None else epochs) * n_images
        return device_type == "cuda" or samples >= CPU_COMPILE_MIN_SAMPLES

    def resolved_sync_bn(self, device_type: str, world: int) -> bool:
        """BatchNorm statistics over the whole batch when it is split across processes. PyTorch's SyncBatchNorm
        runs on CUDA only; on the CPU each process normalises its part of the batch (within run-to-run noise)."""
        if world <= 1:
            return False
        if self.sync_bn is None:
            return device_type == "cuda"
        if self.sync_bn and device_type != "cuda":
            raise ValueError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm has no CPU implementation")
        return self.sync_bn

    def resolved_batch_size(self, num_classes: int) -> int:
        """RDED's student batch size rule, capped at the synthetic set size."""
        n = self.ipc * num_classes
        if self.batch_size > 0:
            return min(self.batch_size, n)
        bs = 10 if self.ipc <= 1 else 50 if self.ipc <= 10 else 100
        if num_classes >= 100:
            bs *= 2
        return min(bs, n)

    def resolved_mix_batch(self, num_classes: int) -> int:
        """CutMix per batch of this size (RDED's recipe), or 0: per sample."""
        return self.resolved_batch_size(num_classes) if self.recipe == "rded" else 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from .io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def __post_init__(self) -> None:
        for f in fields(self):
            valid = f.metadata.get("choices")
            if valid and getattr(self, f.name) not in valid:
                raise ValueError(f"{f.name} {getattr(self, f.name)!r} is not one of {', '.join(valid)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        kwargs = {}
        for k, v in d.items():
            if isinstance(v, list):
                v = tuple(v)
            kwargs[k] = v
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def fields_of(*stages: str) -> frozenset[str]:
    """The names of the RunConfig fields of these stages."""
    return frozenset(f.name for f in fields(RunConfig) if f.metadata["stage"] in stages)


# How a run runs, not what it computes: a killed run may resume with other values of these.
RUNTIME_FIELDS = fields_of("runtime")
# What a synthetic set does not depend on; the teacher enters it by its file's hash, not its path.
NOT_DISTILL = fields_of(*(s for s in STAGES if s not in DISTILL_STAGES))
# What training a teacher does not depend on: a killed `train-teacher` resumes whatever these are.
NOT_TEACHER = fields_of("discover", "refine", "student", "test", "runtime")
