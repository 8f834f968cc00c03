"""Masked Adam: one fused pass of Adam over an image batch, with a pixel mask and
per-channel bounds (NRR-DD refinement of the non-critical pixels).

Per element, with ``g = grad`` and ``t = step``::

    exp_avg    = lerp(exp_avg, g, 1 - b1)              (= b1*exp_avg + (1-b1)*g)
    exp_avg_sq = exp_avg_sq*b2 + (1-b2)*g*g
    denom      = sqrt(exp_avg_sq) / sqrt(1 - b2**t) + eps
    x          = x - mask * (lr / (1 - b1**t)) * exp_avg / denom
    x          = clamp(x, lo[c], hi[c])

This is the op order of ``torch.optim.Adam(foreach=False)`` (``_single_tensor_adam``),
so with an all-ones mask and no bounds the reference is bit-identical to it.

Guarantees on masked-out pixels (``mask == 0``):

* ``x`` is left bit-identical (``torch.where(mask != 0, x_new, x)``: no ``x - 0*u``
  rounding, signed-zero flip, or NaN/Inf propagation from the update);
* the bounds are still applied: clamping an in-bounds value returns it exactly,
  but a pixel that *starts* out of bounds is moved onto the bound even where
  the mask is 0 (so the result always lies in the box);
* the moments ``exp_avg`` and ``exp_avg_sq`` are updated everywhere, as for the
  unmasked pixels (the mask gates the parameter update only), so a pixel that
  becomes trainable later (``MaskedAdam.set_mask``) continues from live moments.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple, Optional, Sequence

import torch
from torch.autograd.graph import increment_version
from torch.optim import Optimizer

from ._backend import Launch, check_backend_arg, pow2_divisor, resolve_backend, triton_available

__all__ = [
    "AdamStep", "masked_adam_", "masked_adam_reference_", "masked_adam_triton_", "plan_masked_adam", "MaskedAdam",
]


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


class AdamStep(NamedTuple):
    """The scalars of one masked Adam step: the keyword arguments of ``masked_adam_``,
    ``masked_adam_reference_`` and ``masked_adam_triton_`` (``step`` and ``lr`` required).

    ``step``: the 1-based step count *after* incrementing, as in torch.optim.Adam; ``lo``/``hi``:
    per-channel bounds (None, a number, or [C] values)."""

    step: float
    lr: float
    beta1: float = 0.5
    beta2: float = 0.9
    eps: float = 1e-8
    lo: Any = None
    hi: Any = None

    def scales(self) -> tuple[float, float]:
        """``(step_size, sqrt(bias_correction2))`` = ``(lr / (1 - beta1**t), (1 - beta2**t) ** 0.5)``,
        in torch.optim.Adam's op order."""
        step = float(self.step)
        bias_correction1 = 1 - self.beta1**step
        bias_correction2 = 1 - self.beta2**step
        return float(self.lr) / bias_correction1, bias_correction2**0.5


def _bounds_tensors(lo, hi, C: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Normalise per-channel bounds to two fp32 [C] tensors (or None)."""
    if lo is None and hi is None:
        return None

    def conv(b, fill):
        if b is None:
            return torch.full((C,), fill, dtype=torch.float32, device=device)
        t = torch.as_tensor(b, dtype=torch.float32, device=device).reshape(-1)
        if t.numel() == 1 and C != 1:
            t = t.expand(C)
        if t.numel() != C:
            raise ValueError(f"bounds must have one value per channel ({C}), got {t.numel()}")
        return t.contiguous()

    return conv(lo, float("-inf")), conv(hi, float("inf"))


def _check_shapes(x, grad, mask, exp_avg, exp_avg_sq):
    if x.dim() < 2:
        raise ValueError(f"x must be [N, C, ...] (4-D [N, C, H, W] expected), got {tuple(x.shape)}")
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(x.shape)}")
    if mask is not None:
        try:
            torch.broadcast_shapes(mask.shape, x.shape)
        except RuntimeError as e:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to x {tuple(x.shape)}"
            ) from e


# ----------------------------------------------------------------------------
# plain PyTorch reference
# ----------------------------------------------------------------------------


@torch.no_grad()
def masked_adam_reference_(x, grad, mask, exp_avg, exp_avg_sq, **hyper) -> None:
    """Plain PyTorch masked Adam, in place; ``hyper``: the fields of :class:`AdamStep`."""
    h = AdamStep(**hyper)
    _check_shapes(x, grad, mask, exp_avg, exp_avg_sq)
    step_size, bias_correction2_sqrt = h.scales()

    g = grad if grad.dtype == exp_avg.dtype else grad.to(exp_avg.dtype)
    exp_avg.lerp_(g, 1 - h.beta1)
    exp_avg_sq.mul_(h.beta2).addcmul_(g, g, value=1 - h.beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(h.eps)

    xs = x if x.dtype == exp_avg.dtype else x.to(exp_avg.dtype)
    # Exactly torch.optim.Adam's update where mask == 1 ...
    new = torch.addcdiv(xs, exp_avg, denom, value=-step_size)
    if mask is not None:
        # ... x + mask*u for fractional masks, x untouched where mask == 0.
        u = torch.zeros_like(xs).addcdiv_(exp_avg, denom, value=-step_size)
        partial = xs + mask * u
        new = torch.where(mask == 1, new, torch.where(mask == 0, xs, partial))
    b = _bounds_tensors(h.lo, h.hi, x.shape[1], x.device)
    if b is not None:
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        new = torch.minimum(torch.maximum(new, b[0].view(shape)), b[1].view(shape))
    x.copy_(new)


# ----------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _masked_adam_kernel(
        x_ptr,
        g_ptr,
        m_ptr,
        v_ptr,
        mask_ptr,
        lo_ptr,
        hi_ptr,
        C,  # channels of x: plane p = n*C + c
        HW,  # elements per plane
        n_blocks,  # programs per group of planes: cdiv(HW, BLOCK)
        w1,  # 1 - beta1 (lerp weight)
        one_minus_w1,  # beta1 = 1 - w1, as torch's lerp computes it
        beta2,
        one_minus_beta2,
        bc2_sqrt,
        eps,
        neg_step_size,
        CH: tl.constexpr,  # planes per program: all C channels of one image (unrolled), or 1
        LERP_SMALL: tl.constexpr,  # w1 < 0.5: torch's lerp uses the self-anchored form
        HAS_MASK: tl.constexpr,
        MASK_BCAST: tl.constexpr,  # mask is [N, 1, H, W], one plane per image, shared by its C planes
        HAS_BOUNDS: tl.constexpr,
        IDX64: tl.constexpr,
        BLOCK: tl.constexpr,
        ALIGN: tl.constexpr,  # a power of two up to 16 dividing HW (Triton assumes 16 or nothing)
    ):
        # program (group, block): BLOCK elements of each of the CH planes group*CH ... group*CH + CH-1.
        # With CH = C the broadcast mask is read once for all channels and the bounds are per-program
        # scalars: no per-element division to find the channel or the mask element.
        pid = tl.program_id(0)
        if IDX64:  # every offset below derives from pid: all 64-bit (a flat plane's hw reaches n itself)
            pid = pid.to(tl.int64)
        # (n // A) * A == n here; the form tells the compiler that A divides n, for 16-byte accesses
        if ALIGN > 1 and ALIGN < 16:  # (16: Triton knows it on its own)
            HW = (HW // ALIGN) * ALIGN
        group = pid // n_blocks
        plane0 = group * CH
        hw = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
        valid = hw < HW
        if HAS_MASK:
            if MASK_BCAST:
                mk = tl.load(mask_ptr + (plane0 // C) * HW + hw, mask=valid, other=0).to(tl.float32)
        for i in tl.static_range(CH):
            offs = (plane0 + i) * HW + hw
            x_raw = tl.load(x_ptr + offs, mask=valid, other=0.0)
            x = x_raw.to(tl.float32)
            g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + offs, mask=valid, other=0.0)
            v = tl.load(v_ptr + offs, mask=valid, other=0.0)

            # first moment: torch.lerp(m, g, w1)
            if LERP_SMALL:
                m = m + w1 * (g - m)
            else:
                m = g - (g - m) * one_minus_w1
            # second moment: v*b2 + ((1-b2)*g)*g  (torch's mul_ + addcmul_)
            v = v * beta2 + (one_minus_beta2 * g) * g
            denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
            u = tl.div_rn(neg_step_size * m, denom)

            if HAS_MASK:
                if not MASK_BCAST:
                    mk = tl.load(mask_ptr + offs, mask=valid, other=0).to(tl.float32)
                x_new = tl.where(mk != 0.0, x + mk * u, x)
            else:
                x_new = x + u

            if HAS_BOUNDS:
                c = (plane0 + i) % C
                x_new = tl.minimum(tl.maximum(x_new, tl.load(lo_ptr + c)), tl.load(hi_ptr + c))

            tl.store(m_ptr + offs, m, mask=valid)
            tl.store(v_ptr + offs, v, mask=valid)
            tl.store(x_ptr + offs, x_new.to(x_raw.dtype), mask=valid)


_BLOCK = 1024  # elements of one plane per program (fewer for small planes)
_MAX_UNROLL = 8  # images with up to this many channels are handled one image per program


def plan_masked_adam(
    x, grad, mask, exp_avg, exp_avg_sq, h: AdamStep
) -> tuple[Launch | None, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The launch of the fused kernel for these tensors and the step's scalars ``h``, without running it.

    Returns ``(launch, write_back)``: ``launch`` is None when there is nothing to do; ``write_back``
    pairs each in-place tensor with the contiguous tensor the kernel writes (the same tensor when it
    is contiguous already)."""
    if not triton_available():
        raise RuntimeError("nrrdd.kernels: Triton is not importable")
    _check_shapes(x, grad, mask, exp_avg, exp_avg_sq)
    if exp_avg.dtype != torch.float32 or exp_avg_sq.dtype != torch.float32:
        raise TypeError("masked_adam_: exp_avg and exp_avg_sq must be float32")
    N, C = x.shape[0], x.shape[1]
    n = x.numel()
    # in-place tensors must be contiguous; otherwise work on copies and copy back
    xs = x if x.is_contiguous() else x.contiguous()
    ms = exp_avg if exp_avg.is_contiguous() else exp_avg.contiguous()
    vs = exp_avg_sq if exp_avg_sq.is_contiguous() else exp_avg_sq.contiguous()
    write_back = [(x, xs), (exp_avg, ms), (exp_avg_sq, vs)]
    if n == 0:
        return None, write_back
    gs = grad.contiguous()

    has_mask = mask is not None
    bcast = False
    mk = xs  # dummy pointer when there is no mask
    if has_mask:
        mk = mask
        if mk.dtype == torch.bool:
            mk = mk.view(torch.uint8) if mk.is_contiguous() else mk.contiguous().view(torch.uint8)
        if mk.dim() == x.dim() and mk.shape[0] == N and mk.shape[2:] == x.shape[2:] and mk.shape[1] in (1, C):
            bcast = mk.shape[1] == 1 and C != 1
            mk = mk.contiguous()
        else:  # unusual broadcast: materialise (rare path)
            mk = mk.expand(x.shape).contiguous()
    b = _bounds_tensors(h.lo, h.hi, C, x.device)
    lo_t, hi_t = (b if b is not None else (xs, xs))

    planes, HW, CH = N * C, n // (N * C), C if C <= _MAX_UNROLL else 1
    if (b is None or C == 1) and not bcast:
        # nothing depends on the channel: one flat plane (no lanes idle on small H*W)
        planes, HW, CH, C = 1, n, 1, 1
    block = min(_BLOCK, max(16, triton.next_power_of_2(HW)))
    n_blocks = triton.cdiv(HW, block)

    step_size, bc2_sqrt = h.scales()
    w1 = 1 - h.beta1
    launch = Launch(
        _masked_adam_kernel,
        ((planes // CH) * n_blocks,),
        (xs, gs, ms, vs, mk, lo_t, hi_t, C, HW, n_blocks,
         w1, 1 - w1, h.beta2, 1 - h.beta2, bc2_sqrt, h.eps, -step_size),
        dict(CH=CH, LERP_SMALL=abs(w1) < 0.5, HAS_MASK=has_mask, MASK_BCAST=bcast, HAS_BOUNDS=b is not None,
             IDX64=n + block >= 2**31, BLOCK=block, ALIGN=pow2_divisor(HW), num_warps=4),
    )
    return launch, write_back


@torch.no_grad()
def _run_triton(x, grad, mask, exp_avg, exp_avg_sq, h: AdamStep) -> None:
    launch, write_back = plan_masked_adam(x, grad, mask, exp_avg, exp_avg_sq, h)
    if launch is None:
        return
    launch()
    for dst, src in write_back:
        if src is not dst:
            dst.copy_(src)
        else:  # the kernel wrote behind autograd's back: bump the version counter
            increment_version(dst)


def masked_adam_triton_(x, grad, mask, exp_avg, exp_avg_sq, **hyper) -> None:
    """Launch the fused Triton kernel (same semantics as the reference; ``hyper``: the fields of
    :class:`AdamStep`)."""
    _run_triton(x, grad, mask, exp_avg, exp_avg_sq, AdamStep(**hyper))


# ----------------------------------------------------------------------------
# public functional API
# ----------------------------------------------------------------------------


def masked_adam_(x, grad, mask, exp_avg, exp_avg_sq, *, backend: str = "auto", **hyper) -> None:
    """One masked Adam step, in place on ``x``, ``exp_avg``, ``exp_avg_sq``.

    ``x, grad, exp_avg, exp_avg_sq``: [N, C, H, W]; ``mask``: [N, 1, H, W] (broadcast
    over channels) or [N, C, H, W], any dtype (bool, uint8, float), or None (= all ones);
    ``hyper``: the fields of :class:`AdamStep` (``step``, ``lr``, ``beta1=0.5``, ``beta2=0.9``,
    ``eps=1e-8``, per-channel bounds ``lo=None``, ``hi=None``).
    """
    be = resolve_backend(backend, x, grad, exp_avg, exp_avg_sq, mask)
    if be != "triton":  # plain PyTorch: traceable, so torch.compile fuses it itself
        masked_adam_reference_(x, grad, mask, exp_avg, exp_avg_sq, **hyper)
        return
    # through the registered op: opaque to torch.compile (no graph break), mutation declared
    h = AdamStep(**hyper)
    lo, hi = _bounds_tensors(h.lo, h.hi, x.shape[1], x.device) or (None, None)
    torch.ops.nrrdd.masked_adam_triton_(
        x, grad, mask, exp_avg, exp_avg_sq, float(h.step), float(h.lr), float(h.beta1), float(h.beta2), float(h.eps),
        lo, hi,
    )


# an operator's schema needs its scalars spelled out: the one place besides AdamStep that lists them
@torch.library.custom_op("nrrdd::masked_adam_triton_", mutates_args=("x", "exp_avg", "exp_avg_sq"))
def _masked_adam_triton_op(
    x: torch.Tensor,
    grad: torch.Tensor,
    mask: Optional[torch.Tensor],
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    lo: Optional[torch.Tensor],
    hi: Optional[torch.Tensor],
) -> None:
    _run_triton(x, grad, mask, exp_avg, exp_avg_sq, AdamStep(step, lr, beta1, beta2, eps, lo, hi))


@_masked_adam_triton_op.register_fake
def _(*args) -> None:  # returns nothing: the op only writes its inputs
    return None


# ----------------------------------------------------------------------------
# optimizer
# ----------------------------------------------------------------------------


class MaskedAdam(Optimizer):
    """Adam whose parameter update is gated by a pixel mask, with per-channel bounds.

    Drop-in for ``torch.optim.Adam`` in an SRe2L-style loop::

        opt = MaskedAdam([x], mask=M, lr=0.25, betas=(0.5, 0.9), eps=1e-8, bounds=(lo, hi))
        loss.backward(); opt.step()

    ``mask``: a tensor broadcastable to the parameter ([N, 1, H, W] or [N, C, H, W]) used
    for every parameter, a list with one mask (or None) per parameter, or None (plain Adam).
    ``bounds``: None or ``(lo, hi)`` per-channel [C] values (either may be None).
    State per parameter: ``step`` (float32 scalar tensor, as torch.optim.Adam),
    ``exp_avg``, ``exp_avg_sq`` (float32).  ``group["lr"]`` is read at every step, so LR
    schedulers work.  ``set_mask`` replaces the mask between steps.
    """

    def __init__(
        self,
        params: Iterable,
        mask: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.9),
        eps: float = 1e-8,
        bounds: tuple | None = None,
        backend: str = "auto",
    ):
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}")
        if bounds is not None and len(bounds) != 2:
            raise ValueError("bounds must be None or a pair (lo, hi)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, bounds=bounds)
        super().__init__(params, defaults)
        self.backend = check_backend_arg(backend)
        self._masks: dict[int, torch.Tensor | None] = {}
        self.set_mask(mask)

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def set_mask(self, mask) -> None:
        """Replace the mask(s): a tensor for all parameters, a list (one per parameter,
        in param-group order), or None (no masking)."""
        params = self._params()
        if mask is None or isinstance(mask, torch.Tensor):
            masks = [mask] * len(params)
        else:
            masks = list(mask)
            if len(masks) != len(params):
                raise ValueError(f"got {len(masks)} masks for {len(params)} parameters")
        for p, m in zip(params, masks):
            if m is not None:
                if m.device != p.device:
                    m = m.to(p.device)
                try:
                    torch.broadcast_shapes(m.shape, p.shape)
                except RuntimeError as e:
                    raise ValueError(
                        f"mask of shape {tuple(m.shape)} does not broadcast to parameter "
                        f"{tuple(p.shape)}"
                    ) from e
                m = m.detach()
            self._masks[id(p)] = m

    def get_mask(self, p: torch.Tensor) -> torch.Tensor | None:
        return self._masks.get(id(p))

    def _bounds(self, group: dict, p: torch.Tensor):
        """The group's bounds as fp32 [C] tensors on ``p``'s device, converted once
        (no host-to-device copy per step); recomputed if ``group["bounds"]`` changes."""
        bounds = group.get("bounds")
        if bounds is None:
            return None, None
        key = (id(bounds), p.device, p.shape[1] if p.dim() > 1 else 1)
        cache = getattr(self, "_bounds_cache", None)
        if cache is None:
            cache = self._bounds_cache = {}
        hit = cache.get(key)
        if hit is None or hit[0] is not bounds:
            b = _bounds_tensors(bounds[0], bounds[1], key[2], p.device)
            hit = cache[key] = (bounds, b)
        return hit[1] if hit[1] is not None else (None, None)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            lr = float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MaskedAdam does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"].item()
                lo, hi = self._bounds(group, p)
                masked_adam_(
                    p, p.grad, self._masks.get(id(p)), state["exp_avg"], state["exp_avg_sq"],
                    step=step, lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                    lo=lo, hi=hi, backend=self.backend,
                )
        return loss
