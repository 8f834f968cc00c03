"""Distance-based regularisation (DBR) of NRR-DD: per-sample cross-entropy
"distances" of the original and the augmented label, and the DBR loss.

For logits ``z`` [B, C] at temperature ``T`` and a label ``y``::

    d_y = -log_softmax(z / T)[y]

and the per-row loss, with the teacher's distances ``d_org_t``, ``d_aug_t``::

    lam*d_org + (1-lam)*d_aug + alpha*(dist(d_org - d_org_t) + dist(d_aug - d_aug_t))

``dist`` = abs ("l1", gradient sign(.) with sign(0) = 0, as torch.abs) or square ("l2").

The Triton path streams each row once with an online softmax (running max and
sum; no [B, C] temporary) and, when a gradient is needed, makes a second pass
that writes ``d loss_row / d z`` into a buffer during the forward, in the
logits' dtype (Liger-Kernel style); backward only scales the buffer by the
upstream per-row gradient.  With ``p = softmax(z/T)``::

    d loss_row / dz = (w_org*(p - e_org) + w_aug*(p - e_aug)) / T
    w_org = lam + alpha*dist'(d_org - d_org_t),  w_aug = (1-lam) + alpha*dist'(d_aug - d_aug_t)

The Triton kernels run as operators (namespace ``nrrdd``), usable under torch.compile(fullgraph=True):

* ``nrrdd::dbr_distances(logits, y_org, y_aug, temperature) -> (d_org, d_aug)``
* ``nrrdd::dbr_loss_rows(logits, y_org, y_aug, lam, d_org_t, d_aug_t, alpha, temperature,
  squared, compute_grad, grad_scale) -> (loss_rows [B] fp32, grad_buffer)``
  where ``grad_buffer = grad_scale * d loss_rows / d logits`` (``grad_scale`` = 1/B for a
  mean reduction, divided back out of the upstream gradient in backward); its
  autograd formula (register_autograd) differentiates ``loss_rows`` w.r.t. the logits
  only (labels, ``lam`` and the teacher distances get no gradient).  ``grad_buffer`` is
  non-differentiable and is empty when ``compute_grad`` is False.

Labels must lie in [0, C): the Triton path does not check them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from ._backend import Launch, check_backend_arg, pow2_divisor, resolve_backend, triton_available

__all__ = [
    "dbr_distances",
    "dbr_loss",
    "DBRLoss",
    "DBROptions",
    "dbr_distances_reference",
    "dbr_loss_reference",
]

_DISTANCES = ("l1", "l2")
_REDUCTIONS = ("mean", "sum", "none")


class DBROptions(NamedTuple):
    """The options of the DBR loss: the keyword arguments of ``dbr_loss`` and ``dbr_loss_reference``.

    ``distance``: "l1" (abs) or "l2" (square); ``reduction``: "mean", "sum" or "none" ([B])."""

    alpha: float = 1.0
    temperature: float = 1.0
    distance: str = "l1"
    reduction: str = "mean"

    def check(self) -> None:
        if self.distance not in _DISTANCES:
            raise ValueError(f"distance must be one of {_DISTANCES}, got {self.distance!r}")
        if self.reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {self.reduction!r}")


# ----------------------------------------------------------------------------
# plain PyTorch references (differentiable through autograd)
# ----------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp32/fp16/bf16 inputs, float64 kept (for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dbr_distances_reference(
    logits: torch.Tensor, y_org: torch.Tensor, y_aug: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(-log_softmax(logits/T)[y_org], -log_softmax(logits/T)[y_aug])`` in fp32
    (float64 for float64 logits)."""
    logp = torch.log_softmax(logits.to(_acc_dtype(logits.dtype)) / temperature, dim=-1)
    d_org = -logp.gather(1, y_org.long().view(-1, 1)).squeeze(1)
    d_aug = -logp.gather(1, y_aug.long().view(-1, 1)).squeeze(1)
    return d_org, d_aug


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def _check_args(logits, y_org, y_aug, options: DBROptions | None = None):
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, C], got {tuple(logits.shape)}")
    B = logits.shape[0]
    if y_org.shape != (B,) or y_aug.shape != (B,):
        raise ValueError(
            f"labels must be [B]={B}, got {tuple(y_org.shape)} and {tuple(y_aug.shape)}"
        )
    if options is not None:
        options.check()


def dbr_loss_reference(logits, y_org, y_aug, lam, d_org_t, d_aug_t, **options) -> torch.Tensor:
    """Plain PyTorch DBR loss (fp32; float64 for float64 logits), differentiable by autograd;
    ``options``: the fields of :class:`DBROptions`."""
    o = DBROptions(**options)
    _check_args(logits, y_org, y_aug, o)
    d_org, d_aug = dbr_distances_reference(logits, y_org, y_aug, o.temperature)
    acc = d_org.dtype
    if isinstance(lam, torch.Tensor):
        lam = lam.to(acc)
    t_org = d_org_t.to(acc) if isinstance(d_org_t, torch.Tensor) else d_org_t
    t_aug = d_aug_t.to(acc) if isinstance(d_aug_t, torch.Tensor) else d_aug_t
    dist = torch.abs if o.distance == "l1" else torch.square
    rows = lam * d_org + (1 - lam) * d_aug + o.alpha * (dist(d_org - t_org) + dist(d_aug - t_aug))
    return _reduce(rows, o.reduction)


# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _dbr_row_kernel(
        z_ptr,
        stride_z,
        g_ptr,
        stride_g,
        yo_ptr,
        ya_ptr,
        lam_ptr,
        to_ptr,
        ta_ptr,
        do_ptr,
        da_ptr,
        loss_ptr,
        C,
        inv_t,
        alpha,
        grad_scale,  # multiplies the stored gradient (1/B for reduction mean)
        COMPUTE_LOSS: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr,
        SQUARED: tl.constexpr,
        BLOCK: tl.constexpr,
        ALIGN: tl.constexpr,  # a power of two dividing C and both row strides (up to 16)
    ):
        # C = 1000 (ImageNet-1K) divides by 8, enough for 16-byte loads of its rows; Triton assumes 16 or
        # nothing. (n // A) * A == n here, and that form tells the compiler that A divides n.
        if ALIGN > 1 and ALIGN < 16:
            C = (C // ALIGN) * ALIGN
            stride_z = (stride_z // ALIGN) * ALIGN
            stride_g = (stride_g // ALIGN) * ALIGN
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_z
        yo = tl.load(yo_ptr + row)
        ya = tl.load(ya_ptr + row)

        # pass 1: online softmax (running max m, running sum s of exp(x - m))
        m = float("-inf")
        s = 0.0
        for start in range(0, C, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(z_row + cols, mask=cols < C, other=float("-inf")).to(tl.float32) * inv_t
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        d_org = lse - tl.load(z_row + yo).to(tl.float32) * inv_t
        d_aug = lse - tl.load(z_row + ya).to(tl.float32) * inv_t

        if COMPUTE_LOSS:
            lam = tl.load(lam_ptr + row)
            eo = d_org - tl.load(to_ptr + row)
            ea = d_aug - tl.load(ta_ptr + row)
            if SQUARED:
                loss = lam * d_org + (1.0 - lam) * d_aug + alpha * (eo * eo + ea * ea)
                wo = lam + alpha * 2.0 * eo
                wa = (1.0 - lam) + alpha * 2.0 * ea
            else:
                loss = lam * d_org + (1.0 - lam) * d_aug + alpha * (tl.abs(eo) + tl.abs(ea))
                so = tl.where(eo > 0.0, 1.0, tl.where(eo < 0.0, -1.0, 0.0))
                sa = tl.where(ea > 0.0, 1.0, tl.where(ea < 0.0, -1.0, 0.0))
                wo = lam + alpha * so
                wa = (1.0 - lam) + alpha * sa
            tl.store(loss_ptr + row, loss)
            if COMPUTE_GRAD:
                # pass 2: d loss_row / dz = ((wo + wa) p - wo e_org - wa e_aug) / T
                g_row = g_ptr + row * stride_g
                wsum = wo + wa
                gs = inv_t * grad_scale
                for start in range(0, C, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    cmask = cols < C
                    x = tl.load(z_row + cols, mask=cmask, other=0.0).to(tl.float32) * inv_t
                    p = tl.exp(x - lse)
                    g = wsum * p - tl.where(cols == yo, wo, 0.0) - tl.where(cols == ya, wa, 0.0)
                    g = g * gs
                    tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=cmask)
        else:
            tl.store(do_ptr + row, d_org)
            tl.store(da_ptr + row, d_aug)


def _launch_cfg(C: int, device_type: str) -> tuple[int, int]:
    cap = 8192 if device_type != "cuda" else 4096
    block = min(triton.next_power_of_2(max(int(C), 1)), cap)
    block = max(block, 16)
    num_warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    return block, num_warps


def _plan_rows(logits: torch.Tensor, device_type: str | None):
    """What both launches of the row kernel share: ``(z, B, C, options)``, ``z`` the logits with unit column
    stride, ``options`` the launch's block size, alignment hint and warps."""
    if not triton_available():
        raise RuntimeError("nrrdd.kernels: Triton is not importable")
    z = logits if logits.stride(-1) == 1 else logits.contiguous()
    B, C = z.shape
    block, warps = _launch_cfg(C, device_type or z.device.type)
    return z, B, C, dict(BLOCK=block, ALIGN=pow2_divisor(C, z.stride(0)), num_warps=warps)


def plan_dbr_distances(logits, y_org, y_aug, temperature: float = 1.0, device_type: str | None = None):
    """The launch of the distances kernel, without running it: ``(launch or None, (d_org, d_aug))``.
    ``device_type``: the device the launch is for (default: the logits'; nrrdd.kernels.aot plans for "cuda")."""
    z, B, C, options = _plan_rows(logits, device_type)
    d_org = torch.empty(B, dtype=torch.float32, device=z.device)
    d_aug = torch.empty(B, dtype=torch.float32, device=z.device)
    if B == 0:
        return None, (d_org, d_aug)
    launch = Launch(
        _dbr_row_kernel,
        (B,),
        (z, z.stride(0), z, 0, y_org.contiguous(), y_aug.contiguous(), d_org, d_org, d_org, d_org, d_aug, d_org,
         C, 1.0 / float(temperature), 0.0, 1.0),
        dict(COMPUTE_LOSS=False, COMPUTE_GRAD=False, SQUARED=False, **options),
    )
    return launch, (d_org, d_aug)


def plan_dbr_rows(
    logits, y_org, y_aug, lam, d_org_t, d_aug_t, alpha, temperature, squared, compute_grad, grad_scale=1.0,
    device_type: str | None = None,
):
    """The launch of the loss kernel, without running it: ``(launch or None, (loss_rows, grad_buffer))``.
    ``device_type`` as for :func:`plan_dbr_distances`."""
    z, B, C, options = _plan_rows(logits, device_type)
    loss = torch.empty(B, dtype=torch.float32, device=z.device)
    grad = torch.empty((B, C) if compute_grad else (0,), dtype=z.dtype, device=z.device)
    if B == 0:
        return None, (loss, grad)
    launch = Launch(
        _dbr_row_kernel,
        (B,),
        (z, z.stride(0), grad, C if compute_grad else 0,
         y_org.contiguous(), y_aug.contiguous(),
         lam.contiguous(), d_org_t.contiguous(), d_aug_t.contiguous(),
         loss, loss, loss,
         C, 1.0 / float(temperature), float(alpha), float(grad_scale)),
        dict(COMPUTE_LOSS=True, COMPUTE_GRAD=bool(compute_grad), SQUARED=bool(squared), **options),
    )
    return launch, (loss, grad)


def _run(planned):
    """Run a planned launch (if any) and return its outputs."""
    launch, out = planned
    if launch is not None:
        launch()
    return out


# ----------------------------------------------------------------------------
# operator registration
# ----------------------------------------------------------------------------


@torch.library.custom_op("nrrdd::dbr_distances", mutates_args=())
def _dbr_distances_op(
    logits: torch.Tensor, y_org: torch.Tensor, y_aug: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(plan_dbr_distances(logits, y_org, y_aug, temperature))


@_dbr_distances_op.register_fake
def _(logits, y_org, y_aug, temperature):
    B = logits.shape[0]
    return (
        logits.new_empty((B,), dtype=torch.float32),
        logits.new_empty((B,), dtype=torch.float32),
    )


@torch.library.custom_op("nrrdd::dbr_loss_rows", mutates_args=())
def _dbr_loss_rows_op(
    logits: torch.Tensor,
    y_org: torch.Tensor,
    y_aug: torch.Tensor,
    lam: torch.Tensor,
    d_org_t: torch.Tensor,
    d_aug_t: torch.Tensor,
    alpha: float,
    temperature: float,
    squared: bool,
    compute_grad: bool,
    grad_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(plan_dbr_rows(
        logits, y_org, y_aug, lam, d_org_t, d_aug_t, alpha, temperature, squared, compute_grad, grad_scale
    ))


@_dbr_loss_rows_op.register_fake
def _(logits, y_org, y_aug, lam, d_org_t, d_aug_t, alpha, temperature, squared, compute_grad, grad_scale):
    B, C = logits.shape
    loss = logits.new_empty((B,), dtype=torch.float32)
    grad = logits.new_empty((B, C) if compute_grad else (0,))
    return loss, grad


def _dbr_setup_context(ctx, inputs, output):
    _logits, _y_org, _y_aug, _lam, _d_org_t, _d_aug_t, _alpha, _temperature, _squared, compute_grad, grad_scale = inputs
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.compute_grad = compute_grad
    ctx.grad_scale = grad_scale
    ctx.num_inputs = len(inputs)
    ctx.save_for_backward(grad)


def _dbr_backward(ctx, grad_loss, _grad_buffer):
    (grad,) = ctx.saved_tensors
    if not ctx.compute_grad:
        raise RuntimeError(
            "nrrdd::dbr_loss_rows was called with compute_grad=False; "
            "call dbr_loss with grad enabled to differentiate it"
        )
    # the buffer already holds grad_scale * d loss_row / dz: divide it back out of the
    # upstream gradient (exactly 1.0 for loss.mean().backward()), so the common case
    # rounds the half-precision gradient once only
    scale = (grad_loss.float() / ctx.grad_scale).unsqueeze(1)
    if grad.dtype == torch.float32:
        g = grad * scale
    else:
        g = (grad.float() * scale).to(grad.dtype)
    return (g,) + (None,) * (ctx.num_inputs - 1)  # a gradient for the logits only


_dbr_loss_rows_op.register_autograd(_dbr_backward, setup_context=_dbr_setup_context)


# ----------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------


def dbr_distances(
    logits: torch.Tensor,
    y_org: torch.Tensor,
    y_aug: torch.Tensor,
    temperature: float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy distances of both labels, ``(d_org, d_aug)``, fp32 [B]; no gradient."""
    _check_args(logits, y_org, y_aug)
    be = resolve_backend(backend, logits)
    with torch.no_grad():
        if be == "triton":
            return torch.ops.nrrdd.dbr_distances(logits.detach(), y_org, y_aug, float(temperature))
        d_org, d_aug = dbr_distances_reference(logits.detach(), y_org, y_aug, temperature)
        return d_org, d_aug


def _as_rows(v, B: int, device, name: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        t = v.detach().to(device=device, dtype=torch.float32).reshape(-1)
        if t.numel() == 1 and B != 1:
            t = t.expand(B)
        if t.shape[0] != B:
            raise ValueError(f"{name} must be a scalar or have B={B} values, got {tuple(v.shape)}")
        return t.contiguous()
    return torch.full((B,), float(v), dtype=torch.float32, device=device)


def dbr_loss(logits, y_org, y_aug, lam, d_org_t, d_aug_t, *, backend: str = "auto", **options) -> torch.Tensor:
    """DBR loss (fp32), differentiable w.r.t. ``logits`` (see the module docstring).

    ``lam``: python float or [B] tensor; ``d_org_t``/``d_aug_t``: the teacher's distances
    [B] (treated as constants).  ``options``: the fields of :class:`DBROptions` (``alpha=1.0``,
    ``temperature=1.0``, ``distance="l1"``, ``reduction="mean"``).
    """
    o = DBROptions(**options)
    _check_args(logits, y_org, y_aug, o)
    be = resolve_backend(backend, logits)
    if be == "torch":
        return dbr_loss_reference(logits, y_org, y_aug, lam, d_org_t, d_aug_t, **options)
    B = logits.shape[0]
    dev = logits.device
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    rows, _ = torch.ops.nrrdd.dbr_loss_rows(
        logits,
        y_org,
        y_aug,
        _as_rows(lam, B, dev, "lam"),
        _as_rows(d_org_t, B, dev, "d_org_t"),
        _as_rows(d_aug_t, B, dev, "d_aug_t"),
        float(o.alpha),
        float(o.temperature),
        o.distance == "l2",
        compute_grad,
        1.0 / B if (o.reduction == "mean" and B > 0) else 1.0,
    )
    return _reduce(rows, o.reduction)


class DBRLoss(nn.Module):
    """Module form of :func:`dbr_loss`:
    ``DBRLoss(alpha=1.0, temperature=1.0, distance="l1", reduction="mean", backend="auto")``,
    ``forward(logits, y_org, y_aug, lam, d_org_t, d_aug_t)``."""

    def __init__(
        self,
        alpha: float = 1.0,
        temperature: float = 1.0,
        distance: str = "l1",
        reduction: str = "mean",
        backend: str = "auto",
    ):
        super().__init__()
        DBROptions(alpha, temperature, distance, reduction).check()
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.distance = distance
        self.reduction = reduction
        self.backend = check_backend_arg(backend)

    def forward(self, logits, y_org, y_aug, lam, d_org_t, d_aug_t):
        return dbr_loss(
            logits, y_org, y_aug, lam, d_org_t, d_aug_t,
            alpha=self.alpha, temperature=self.temperature, distance=self.distance,
            reduction=self.reduction, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, temperature={self.temperature}, distance={self.distance!r}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )
