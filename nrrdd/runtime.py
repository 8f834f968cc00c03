"""Device, precision and progress: the few runtime decisions every stage shares."""
from __future__ import annotations

import contextlib
import functools
import math
import sys

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .dist import SINGLE, Dist


@dataclass(frozen=True)
class Runtime:
    """How a stage runs, shared by every stage: where it computes, in which precision, in how many processes,
    how it reads image files, and whether it shows progress. None of it is in a stage's settings."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    dist: Dist = SINGLE
    loader: str = "auto"            # image folders: auto (DALI if installed) | dali | torch
    workers: int = 2                # DataLoader worker processes (torch) or DALI CPU threads
    show_progress: bool = True


QUIET = Runtime(show_progress=False)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine")
    return dev


@functools.lru_cache(maxsize=None)
def cpu_has_bf16_units() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls/convolutions are then 2-3x faster than fp32 on the CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision in ("fp32", "bf16"):
        return precision
    if precision != "auto":
        raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16_units() else "fp32"


def autocast(device: torch.device | str, precision: str):
    """bf16 autocast for forward passes, or nothing for fp32. Parameters and optimiser state stay fp32."""
    device = torch.device(device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cosine(step: int, total: int) -> float:
    """The cosine learning-rate factor, without warm-up, at ``step`` (0-based) of ``total``, held at 0 after the
    end: refinement's Adam on the pixels (SRe2L's policy), the student's AdamW and the teacher's SGD."""
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


def progress(iterable, desc: str, enable: bool = True, total: int | None = None, **kw):
    return tqdm(iterable, desc=desc, total=total, disable=not enable, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0, leave=False, **kw)


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
