"""Backend selection shared by the kernels of nrrdd.kernels.

Every public op takes ``backend="auto" | "triton" | "torch"``.  The effective
choice is, in order of precedence:

1. an explicit ``backend="triton"`` or ``backend="torch"`` keyword;
2. the ``NRRDD_BACKEND`` environment variable (read at call time);
3. ``auto``: Triton for CUDA tensors when Triton is importable, the plain
   PyTorch reference otherwise.

With ``TRITON_INTERPRET=1`` in the environment *before Triton is imported*,
the Triton kernels run on CPU tensors through the Triton interpreter (slow;
meant for tests).  "auto" never picks the interpreter for CPU tensors: it
picks the reference.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "NRRDD_BACKEND"


def _probe_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def _probe_interpret() -> bool:
    if not _TRITON_OK:
        return False
    try:
        from triton import knobs  # triton >= 3.4

        return bool(knobs.runtime.interpret)
    except Exception:
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Probed once, at import (before our kernels are decorated): Triton decides at
# decoration time whether a kernel is compiled or interpreted, and plain module
# constants keep torch.compile from tracing into Triton's C extension.
_TRITON_OK = _probe_triton()
_INTERPRET = _probe_interpret()


def triton_available() -> bool:
    """True when ``triton`` and ``triton.language`` import."""
    return _TRITON_OK


def triton_interpreting() -> bool:
    """True when our Triton kernels were built as interpreter functions
    (``TRITON_INTERPRET=1`` was set before ``nrrdd.kernels`` was imported)."""
    return _INTERPRET


def _requested(backend: str | None) -> str:
    if backend is None:
        backend = "auto"
    backend = str(backend).strip().lower()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {env!r}")
            backend = env
    return backend


def resolve_backend(backend: str | None, *tensors: torch.Tensor | None) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op on ``tensors``.

    Raises a clear error when Triton is asked for but cannot run.
    """
    choice = _requested(backend)
    devices = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
    all_cuda = bool(devices) and devices == {"cuda"}
    if choice == "auto":
        return "triton" if (all_cuda and triton_available()) else "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(
                "nrrdd.kernels: backend='triton' was requested (keyword or "
                f"{ENV_VAR}) but Triton is not importable on this machine; "
                "use backend='torch' or 'auto'."
            )
        if not all_cuda and not triton_interpreting():
            raise RuntimeError(
                "nrrdd.kernels: backend='triton' needs CUDA tensors (got devices "
                f"{sorted(devices)}); to run the kernels on CPU set TRITON_INTERPRET=1 "
                "before importing triton, or use backend='torch' / 'auto'."
            )
        return "triton"
    return "torch"


def check_backend_arg(backend: str | None) -> str:
    """Validate a backend keyword at construction time (MaskedAdam, DBRLoss)."""
    if backend is None:
        return "auto"
    b = str(backend).strip().lower()
    if b not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return b


def pow2_divisor(*ints: int) -> int:
    """The largest power of two up to 16 dividing every integer (0 divides by anything): what a kernel may
    tell Triton about a size, which on its own assumes 16 or nothing."""
    a = 16
    while a > 1 and any(i % a for i in ints):
        a //= 2
    return a


class Launch:
    """One Triton kernel launch exactly as a host launcher builds it: ``kernel[grid](*args, **meta)``,
    ``meta`` holding the constexpr arguments and launch options (``num_warps``).

    The launchers build a Launch and call it; ``nrrdd.kernels.aot`` compiles the same Launch for a
    GPU that is not here, so what it reports is what the launcher would run."""

    __slots__ = ("kernel", "grid", "args", "meta")

    def __init__(self, kernel, grid: tuple, args: tuple, meta: dict):
        self.kernel, self.grid, self.args, self.meta = kernel, tuple(grid), tuple(args), dict(meta)

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)
