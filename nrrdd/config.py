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


CPU_COMPILE_MIN_SAMPLES = 100_000   # see RunConfig.resolved_compile


@dataclass
class RunConfig:
    # --- data -----------------------------------------------------------------------------------
    dataset: str = "fashion-mnist"      # fashion-mnist | mnist | cifar10 | cifar100 | imagefolder | RDED's subsets
    data_root: str | None = None        # where the dataset lives (default: the named dataset's usual place)
    test_root: str | None = None        # imagefolder only: folder of the test/val split
    val_per_class: int = 500            # held out of the training split for tuning (never the test set)
    train_limit: int = 0                # >0: use only this many training images (seeded), for quick runs
    test_limit: int = 0                 # >0: evaluate on the first this-many test images only (quick runs)
    test_per_class: int = 0             # >0: evaluate on the first this-many test images of each class (RDED's val_ipc)
    input_size: int | None = None       # None: the dataset's native size
    mean: str | None = None             # normalisation: per-channel means "0.5,0.5,0.5" or a preset; None: the data's
    std: str | None = None              # per-channel stds, or a preset; None: the preset named by mean, else the data's
    seed: int = 0

    # --- models -----------------------------------------------------------------------------------
    arch: str = "conv3"                 # teacher: registry name, torchvision name, or package.module:ClassName
    arch_kwargs: str = "{}"             # JSON object: constructor kwargs of --arch (num_classes added if accepted)
    student: str = "conv3"              # student architecture (same forms as arch)
    student_kwargs: str = "{}"          # JSON object: constructor kwargs of --student
    teacher: str | None = None          # teacher checkpoint path ({"model": state_dict} or a state_dict)

    # --- stage 1: discovery ---------------------------------------------------------------------------
    method: str = "nrrdd"               # nrrdd (CIDD + NRR) | rded | random | sre2l (noise + unmasked synthesis)
    ipc: int = 10
    mipc: int = 300                     # real candidate images per class
    num_crop: int = 5
    factor: int | None = None           # patches per side; None: 1 below 64 px, 2 above (METHOD.md)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_min_side: int = 0              # >0: no discovery crop smaller than this many px a side (raises crop_scale[0])
    whole_image: bool = False           # the whole image is one more candidate crop of every image
    cam: str = "auto"                   # auto (CAM where exact, else Grad-CAM) | cam | gradcam
    cidd_keep: str = "low"              # CIDD keeps the lowest-confidence crops [paper]; "high" = RDED's rule
    cidd_quantile: float = 0.0          # CIDD keeps the crops from this quantile of its confidence ranking on
    cidd_correct: bool = False          # CIDD ranks crops the teacher assigns to another class last
    discover_batch_size: int = 256

    # --- stage 2: refinement (NRR) ------------------------------------------------------------------
    refine: bool | None = None          # None: on for nrrdd and sre2l, off for rded/random (rded+refine = ablation)
    nrr_eps: float = 0.5                # M = max(0, eps - CAM) [default]
    nrr_iterations: int = 500           # [default]
    nrr_lr: float = 0.25                # Adam on pixels, SRe2L's settings [default]
    nrr_betas: tuple[float, float] = (0.5, 0.9)
    nrr_adam_eps: float = 1e-8
    a_bn: float = 0.01
    first_bn_multiplier: float = 10.0
    mask_every: int = 0                 # 0: mask fixed from the start [default]; k: recompute every k steps
    nrr_mask_mode: str = "step"         # step (mask on Adam's step) [default] | grad (on the gradient) | sgd
    refine_batch_size: int = 100

    # --- SRe2L synthesis (method sre2l): noise init, then the refinement loop unmasked ----------------
    # Adam lr/betas/eps, a_bn, first_bn_multiplier and refine_batch_size are the nrr_* / shared fields above.
    sre2l_iterations: int = 1000        # SRe2L's recover iterations
    sre2l_jitter: int = 4               # each step the batch is rolled by (dy, dx), each uniform in [0, jitter] px
    sre2l_flip: bool | None = None      # each step the batch is flipped horizontally with p 0.5; None: off for mnist

    # --- stage 3: relabel + student training --------------------------------------------------------
    labels: str = "online"              # online | soft | dbr | hard
    epochs: int = 300                   # student epochs (RDED)
    batch_size: int = 0                 # 0: RDED's rule (ipc 1 -> 10, 10 -> 50, 50 -> 100, x2 for >=100 classes)
    lr: float = 1e-3                    # AdamW (RDED)
    weight_decay: float = 0.01
    temperature: float = 20.0           # KL temperature for soft labels with CutMix (RDED)
    cutmix_alpha: float = 1.0
    recipe: str = "nrrdd"               # nrrdd (CutMix per sample, cosine to 0 per step) | rded (RDED's own)
    alpha_dbr: float = 1.0              # [default]
    dbr_distance: str = "l1"            # l1 [default] | l2 | smooth-l1
    dbr_temperature: float = 1.0        # [default] temperature of the distances (stored and the student's)
    dbr_sce_temperature: float | None = None  # temperature of DBR's CutMix cross-entropy; None: dbr_temperature
    eval_batch_size: int = 500
    compile: bool | None = None         # torch.compile student training; None: where it pays (see resolved_compile)
    sync_bn: bool | None = None         # several processes: SyncBatchNorm in the student; None: on CUDA (CPU has none)
    set_on_device: bool | None = None   # relabel/train: the whole synthetic set on the device; None: if it fits

    # --- teacher training ----------------------------------------------------------------------------
    teacher_epochs: int = 5
    teacher_lr: float = 0.05
    teacher_batch_size: int = 128
    teacher_weight_decay: float = 5e-4

    # --- runtime --------------------------------------------------------------------------------------
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    precision: str = "auto"             # auto (bf16 autocast where the hardware has bf16 units) | fp32 | bf16
    threads: int = 0                    # 0: torch's default
    loader: str = "auto"                # image decoding for image folders: auto (DALI if installed) | dali | torch
    loader_workers: int = 2             # DataLoader worker processes (torch) or DALI CPU threads
    out: str = "runs/run"
    resume: bool = False                # continue a killed run from its last checkpoint (student: per epoch)
    checkpoint_every: int = 10          # student training: save its state every this many epochs

    # ---------------------------------------------------------------------------------------------
    def resolved_factor(self, input_size: int) -> int:
        if self.factor is not None:
            return self.factor
        return 1 if input_size <= 64 else 2

    def resolved_refine(self) -> bool:
        if self.refine is not None:
            return self.refine
        return self.method in ("nrrdd", "sre2l")

    def resolved_sre2l_flip(self) -> bool:
        """Flip during SRe2L synthesis as the teacher was trained: not for MNIST digits (train-teacher)."""
        if self.sre2l_flip is not None:
            return self.sre2l_flip
        return self.dataset != "mnist"

    def resolved_compile(self, device_type: str, n_images: int) -> bool:
        """torch.compile student training where it pays. On CUDA always. On the CPU only for long runs: measured
        on 2 cores (conv3, bf16, benchmarks/README.md) a cold compile costs ~24 s and then saves ~18% per
        step, which breaks even near 60k training samples (epochs x images); it is on from
        ``CPU_COMPILE_MIN_SAMPLES`` = 100k (IPC 50 x 10 classes x 300 epochs = 150k: on; IPC 10: 30k: off).
        ``--compile`` / ``--no-compile`` decide."""
        if self.compile is not None:
            return self.compile
        return device_type == "cuda" or self.epochs * n_images >= CPU_COMPILE_MIN_SAMPLES

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
