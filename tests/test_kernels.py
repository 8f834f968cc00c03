"""Tests of nrrdd.kernels: Triton kernels against their plain-PyTorch references.

By default the kernels run through the Triton interpreter on CPU tensors (TRITON_INTERPRET=1 is set by
conftest.py); on a GPU machine ``TRITON_INTERPRET=0 pytest tests/test_kernels.py`` compiles them and runs
the same tests on CUDA tensors (DEV below; written for that, not yet run on a GPU: scripts/gpu_check.sh
does it when one is lent).  Random data always comes from seeded CPU generators and is then moved to DEV,
so both runs check the same values."""

from __future__ import annotations

import math

import pytest
import torch

from nrrdd.kernels import (
    DBRLoss,
    MaskedAdam,
    dbr_distances,
    dbr_distances_reference,
    dbr_loss,
    dbr_loss_reference,
    masked_adam_,
    masked_adam_reference_,
)
from nrrdd.kernels import _backend
from nrrdd.kernels._backend import resolve_backend, triton_available, triton_interpreting

# Where the Triton paths run: compiled kernels need CUDA tensors, the interpreter takes CPU ones.
DEV = torch.device("cuda") if (torch.cuda.is_available() and not triton_interpreting()) else torch.device("cpu")
# Triton can run here: interpreted (on CPU tensors), or compiled with a GPU to run on.
TRITON_RUNS = triton_available() and (triton_interpreting() or DEV.type == "cuda")

needs_triton = pytest.mark.skipif(
    not TRITON_RUNS,
    reason="Triton cannot run here: needs triton plus TRITON_INTERPRET=1 (CPU) or a CUDA GPU",
)


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


# ============================================================================
# backend selection
# ============================================================================


def test_backend_resolution(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("NRRDD_BACKEND", raising=False)
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    monkeypatch.setenv("NRRDD_BACKEND", "torch")
    assert resolve_backend("auto", cpu) == "torch"
    if triton_available() and triton_interpreting():
        assert resolve_backend("triton", cpu) == "triton"  # keyword wins
        monkeypatch.setenv("NRRDD_BACKEND", "triton")
        assert resolve_backend("auto", cpu) == "triton"  # env wins over auto
        assert resolve_backend("torch", cpu) == "torch"  # keyword wins over env
    monkeypatch.setenv("NRRDD_BACKEND", "bogus")
    with pytest.raises(ValueError):
        resolve_backend("auto", cpu)
    monkeypatch.delenv("NRRDD_BACKEND")
    with pytest.raises(ValueError):
        resolve_backend("cuda", cpu)


def test_backend_triton_missing(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("NRRDD_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_TRITON_OK", False)
    monkeypatch.setattr(_backend, "_INTERPRET", False)
    assert resolve_backend("auto", cpu) == "torch"
    with pytest.raises(RuntimeError, match="Triton is not importable"):
        resolve_backend("triton", cpu)


def test_backend_triton_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("NRRDD_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_TRITON_OK", True)
    monkeypatch.setattr(_backend, "_INTERPRET", False)
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_backend("triton", torch.zeros(1))


# ============================================================================
# masked Adam
# ============================================================================


def _adam_state(shape, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)  # drawn on CPU: the same values on every device
    x = torch.randn(shape, generator=g)
    m = torch.randn(shape, generator=g) * 0.1
    v = torch.rand(shape, generator=g) * 0.1
    return x.to(device), m.to(device), v.to(device)


@needs_triton
@pytest.mark.parametrize(
    "shape,mask_kind,bounds",
    [
        ((2, 3, 5, 7), "bcast", True),
        ((2, 3, 5, 7), "full", False),
        ((1, 1, 1, 1), "bcast", True),
        ((3, 3, 33, 35), "bcast", True),  # > one block, H*W not a multiple of it
        ((2, 4, 17, 19), "bool", True),
        ((2, 3, 9, 11), "frac", False),
        ((2, 3, 9, 11), "none", True),
        ((2, 10, 5, 7), "bcast", True),  # more channels than the kernel unrolls: one plane per program
        ((2, 10, 5, 7), "full", True),
        ((3, 1, 6, 5), "bcast", True),  # one channel, per-channel bounds
        ((4, 3, 1, 1), "bcast", True),  # 1x1 planes
        ((2, 3, 40, 40), "frac", True),  # planes of 1600: a full block and a partial one
        ((2, 3, 30, 30), "bcast", True),  # H*W divides by 4, not 16
        ((2, 3, 6, 5), "bool", True),  # H*W divides by 2 only
    ],
)
def test_masked_adam_triton_matches_reference(shape, mask_kind, bounds):
    N, C, H, W = shape
    x, m, v = _adam_state(shape, device=DEV)
    gen = torch.Generator().manual_seed(1)
    if mask_kind == "bcast":
        mask = (torch.rand(N, 1, H, W, generator=gen) > 0.5).float()
    elif mask_kind == "full":
        mask = (torch.rand(shape, generator=gen) > 0.5).float()
    elif mask_kind == "bool":
        mask = torch.rand(N, 1, H, W, generator=gen) > 0.5
    elif mask_kind == "frac":
        mask = torch.rand(N, 1, H, W, generator=gen)
        mask[mask < 0.3] = 0.0
    else:
        mask = None
    if mask is not None:
        mask = mask.to(DEV)
    lo = hi = None
    if bounds:
        lo = -torch.linspace(0.5, 1.5, C, device=DEV)
        hi = torch.linspace(0.7, 1.2, C, device=DEV)
    a = [x.clone(), m.clone(), v.clone()]
    b = [x.clone(), m.clone(), v.clone()]
    for step in range(1, 4):
        grad = torch.randn(shape, generator=gen).to(DEV)
        kw = dict(step=step, lr=0.1, beta1=0.5, beta2=0.9, eps=1e-8, lo=lo, hi=hi)
        masked_adam_(a[0], grad, mask, a[1], a[2], backend="triton", **kw)
        masked_adam_reference_(b[0], grad, mask, b[1], b[2], **kw)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    if mask is not None:
        keep = (mask == 0).expand(shape)
        if bounds:  # x started partly out of bounds: masked pixels are clamped, nothing else
            x_exp = torch.minimum(torch.maximum(x, lo.view(1, C, 1, 1)), hi.view(1, C, 1, 1))
        else:
            x_exp = x
        assert torch.equal(_bits(a[0])[keep], _bits(x_exp)[keep])
        assert torch.equal(_bits(b[0])[keep], _bits(x_exp)[keep])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_masked_adam_critical_pixels_bit_identical(backend):
    shape = (2, 3, 13, 11)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(shape, generator=gen) * 2 - 1  # in bounds
    x0[0, 0, 0, 0] = -0.0  # signed zero must survive too
    mask = (torch.rand(2, 1, 13, 11, generator=gen) > 0.4).float()
    mask[0, 0, 0, 0] = 0.0
    x0, mask = x0.to(DEV), mask.to(DEV)
    lo, hi = torch.full((3,), -1.0, device=DEV), torch.full((3,), 1.0, device=DEV)
    x = x0.clone().requires_grad_(True)
    opt = MaskedAdam([x], mask=mask, lr=0.5, betas=(0.5, 0.9), eps=1e-8, bounds=(lo, hi), backend=backend)
    for _ in range(40):
        opt.zero_grad()
        loss = ((x - 3.0) ** 2).sum() + (x * torch.randn(shape, generator=gen).to(DEV)).sum()
        loss.backward()
        opt.step()
    keep = (mask == 0).expand(shape)
    assert torch.equal(x.detach()[keep], x0[keep])
    assert torch.equal(_bits(x.detach())[keep], _bits(x0)[keep])
    # the unmasked pixels moved and stayed within the bounds
    assert not torch.equal(x.detach()[~keep], x0[~keep])
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert (x.detach()[~keep] == 1.0).any()  # pushed against the upper bound


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_masked_adam_bounds_clamp_out_of_bounds_start(backend):
    """Documented: a masked-out pixel that starts outside the box is clamped onto it."""
    shape = (1, 2, 3, 4)
    x = torch.full(shape, 5.0, device=DEV)
    x[0, 1] = -5.0
    x[0, 0, 0, 0] = 0.25  # in bounds: untouched
    mask = torch.zeros(1, 1, 3, 4, device=DEV)
    m, v = torch.zeros(shape, device=DEV), torch.zeros(shape, device=DEV)
    lo, hi = torch.tensor([-1.0, -2.0], device=DEV), torch.tensor([1.0, 2.0], device=DEV)
    masked_adam_(x, torch.ones(shape, device=DEV), mask, m, v, step=1, lr=0.1, lo=lo, hi=hi, backend=backend)
    assert x[0, 0, 0, 0].item() == 0.25
    assert (x[0, 0].flatten()[1:] == 1.0).all()
    assert (x[0, 1] == -2.0).all()
    # the moments are updated everywhere
    assert (m != 0).all() and (v != 0).all()


@pytest.mark.parametrize("mask_kind", ["ones_bcast", "ones_full", "none"])
def test_masked_adam_equals_torch_adam(mask_kind):
    shape = (3, 3, 9, 10)
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(shape, generator=gen)
    mask = {
        "ones_bcast": torch.ones(3, 1, 9, 10),
        "ones_full": torch.ones(shape),
        "none": None,
    }[mask_kind]
    xa = x0.clone().requires_grad_(True)
    xb = x0.clone().requires_grad_(True)
    oa = torch.optim.Adam([xa], lr=0.25, betas=(0.5, 0.9), eps=1e-8, foreach=False)
    ob = MaskedAdam([xb], mask=mask, lr=0.25, betas=(0.5, 0.9), eps=1e-8, backend="torch")
    sa = torch.optim.lr_scheduler.CosineAnnealingLR(oa, T_max=20)
    sb = torch.optim.lr_scheduler.CosineAnnealingLR(ob, T_max=20)
    target = torch.randn(shape, generator=gen)
    for _ in range(20):
        for x, o in ((xa, oa), (xb, ob)):
            o.zero_grad()
            ((x - target) ** 2 * torch.linspace(0.1, 3, shape[-1])).sum().backward()
        oa.step()
        ob.step()
        sa.step()
        sb.step()
        assert torch.equal(xa, xb)
    assert torch.equal(oa.state[xa]["exp_avg"], ob.state[xb]["exp_avg"])
    assert torch.equal(oa.state[xa]["exp_avg_sq"], ob.state[xb]["exp_avg_sq"])
    assert ob.state[xb]["step"].item() == 20


@needs_triton
def test_masked_adam_optimizer_triton_vs_reference_and_set_mask():
    shape = (2, 3, 8, 9)
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(shape, generator=gen).to(DEV)
    m1 = (torch.rand(2, 1, 8, 9, generator=gen) > 0.5).float().to(DEV)
    m2 = (torch.rand(2, 1, 8, 9, generator=gen) > 0.5).float().to(DEV)
    lo, hi = torch.tensor([-2.0, -1.5, -1.0], device=DEV), torch.tensor([2.0, 1.5, 1.0], device=DEV)
    xs = {}
    for be in ("torch", "triton"):
        x = x0.clone().requires_grad_(True)
        opt = MaskedAdam([x], mask=m1, lr=0.1, bounds=(lo, hi), backend=be)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        g = torch.Generator().manual_seed(11)
        for it in range(10):
            if it == 5:
                opt.set_mask(m2)
            opt.zero_grad()
            (x * torch.randn(shape, generator=g).to(DEV)).sum().backward()
            opt.step()
            sched.step()
        xs[be] = x.detach()
    torch.testing.assert_close(xs["triton"], xs["torch"], rtol=1e-5, atol=1e-6)


def test_masked_adam_rejects_bad_shapes():
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError):
        masked_adam_(x, torch.zeros(2, 3, 4, 5), None, torch.zeros_like(x), torch.zeros_like(x), step=1, lr=0.1)
    with pytest.raises(ValueError):
        masked_adam_(x, x.clone(), torch.ones(2, 2, 4, 4), torch.zeros_like(x), torch.zeros_like(x), step=1, lr=0.1)
    with pytest.raises(ValueError):
        masked_adam_(x, x.clone(), None, torch.zeros_like(x), torch.zeros_like(x), step=1, lr=0.1, lo=torch.zeros(2))


# ============================================================================
# DBR
# ============================================================================


def _dbr_inputs(B, C, dtype=torch.float32, seed=0, scale=3.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)  # drawn on CPU: the same values on every device
    logits = (torch.randn(B, C, generator=g) * scale).to(dtype)
    y_org = torch.randint(0, C, (B,), generator=g)
    y_aug = torch.randint(0, C, (B,), generator=g)
    if B > 1:
        y_aug[0] = y_org[0]  # same label in one row
    lam = torch.rand(B, generator=g)
    d_org_t = torch.rand(B, generator=g) * 4
    d_aug_t = torch.rand(B, generator=g) * 4
    return tuple(t.to(device) for t in (logits, y_org, y_aug, lam, d_org_t, d_aug_t))


DBR_SHAPES = [(1, 1), (1, 7), (4, 1), (3, 3), (5, 1000), (4, 1001), (2, 21841)]


@needs_triton
@pytest.mark.parametrize("B,C", DBR_SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_dbr_distances_triton(B, C, temperature):
    logits, yo, ya, *_ = _dbr_inputs(B, C, device=DEV)
    d1 = dbr_distances(logits, yo, ya, temperature, backend="triton")
    d2 = dbr_distances_reference(logits, yo, ya, temperature)
    for a, b in zip(d1, d2):
        assert a.dtype == torch.float32 and a.shape == (B,)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dbr_distances_reference_is_cross_entropy():
    logits, yo, ya, *_ = _dbr_inputs(6, 13)
    d_org, d_aug = dbr_distances(logits, yo, ya, 2.0, backend="torch")
    ce = torch.nn.functional.cross_entropy(logits / 2.0, yo, reduction="none")
    torch.testing.assert_close(d_org, ce)
    torch.testing.assert_close(d_aug, torch.nn.functional.cross_entropy(logits / 2.0, ya, reduction="none"))


def _check_loss_and_grad(B, C, lam_kind, distance, reduction, temperature, alpha=0.7, seed=0):
    logits, yo, ya, lam, to, ta = _dbr_inputs(B, C, seed=seed, device=DEV)
    lam_arg = lam if lam_kind == "row" else 0.3
    z1 = logits.clone().requires_grad_(True)
    z2 = logits.clone().requires_grad_(True)
    kw = dict(alpha=alpha, temperature=temperature, distance=distance, reduction=reduction)
    l1 = dbr_loss(z1, yo, ya, lam_arg, to, ta, backend="triton", **kw)
    l2 = dbr_loss_reference(z2, yo, ya, lam_arg, to, ta, **kw)
    assert l1.dtype == torch.float32 and l1.shape == l2.shape
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    up = torch.randn(l2.shape, generator=torch.Generator().manual_seed(9)).to(DEV) if reduction == "none" else None
    (l1 if up is None else l1 * up).sum().backward()
    (l2 if up is None else l2 * up).sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("B,C", [(1, 1), (1, 7), (4, 1), (3, 3), (5, 1000), (4, 1001)])
@pytest.mark.parametrize("distance", ["l1", "l2"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dbr_loss_triton_shapes(B, C, distance, reduction):
    _check_loss_and_grad(B, C, "row", distance, reduction, temperature=1.0)


@needs_triton
@pytest.mark.parametrize("C,width,align", [(1000, 1008, 8), (1000, 1003, 1), (12, 16, 4), (6, 6, 2)])
def test_dbr_rows_with_a_stride_other_than_c(C, width, align):
    """Logits that are a column slice of a wider tensor (row stride != C): the kernel's alignment hint
    (the largest power of two up to 16 dividing C and the row stride) must not assume more."""
    from nrrdd.kernels._backend import pow2_divisor

    assert pow2_divisor(C, width) == align
    B = 3
    wide, yo, ya, lam, to, ta = _dbr_inputs(B, width, seed=12, device=DEV)
    yo, ya = yo % C, ya % C
    z1 = wide[:, :C].detach().requires_grad_(False)
    assert z1.stride(0) == width
    for a, b in zip(dbr_distances(z1, yo, ya, backend="triton"), dbr_distances_reference(z1, yo, ya)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    zw = wide.clone().requires_grad_(True)
    z2 = wide[:, :C].clone().requires_grad_(True)
    l1 = dbr_loss(zw[:, :C], yo, ya, lam, to, ta, distance="l2", backend="triton")
    l2 = dbr_loss_reference(z2, yo, ya, lam, to, ta, distance="l2")
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(zw.grad[:, :C], z2.grad, rtol=1e-5, atol=1e-6)
    assert (zw.grad[:, C:] == 0).all()


@needs_triton
@pytest.mark.parametrize("lam_kind", ["scalar", "row"])
@pytest.mark.parametrize("distance", ["l1", "l2"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_dbr_loss_triton_lam_temperature(lam_kind, distance, temperature):
    _check_loss_and_grad(6, 37, lam_kind, distance, "mean", temperature, alpha=1.3, seed=4)


@needs_triton
@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_dbr_loss_triton_large_c(distance):
    _check_loss_and_grad(2, 21841, "row", distance, "mean", temperature=1.0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C", [1000, 21841])
def test_dbr_loss_triton_half(dtype, C):
    B = 2
    logits, yo, ya, lam, to, ta = _dbr_inputs(B, C, dtype=dtype, seed=2, device=DEV)
    z1 = logits.clone().requires_grad_(True)
    z2 = logits.float().requires_grad_(True)  # exact (fp32) gradient of the same values
    d1 = dbr_distances(logits, yo, ya, backend="triton")
    d2 = dbr_distances_reference(logits, yo, ya)
    for a, b in zip(d1, d2):
        assert a.dtype == torch.float32
        assert _rel_rms(a, b) < 5e-3
    for reduction in ("none", "mean"):
        z1.grad = z2.grad = None
        l1 = dbr_loss(z1, yo, ya, lam, to, ta, distance="l2", reduction=reduction, backend="triton")
        l2 = dbr_loss_reference(z2, yo, ya, lam, to, ta, distance="l2", reduction=reduction)
        assert l1.dtype == torch.float32
        assert _rel_rms(l1, l2) < 5e-3
        l1.sum().backward()
        l2.sum().backward()
        assert z1.grad.dtype == dtype
        assert _rel_rms(z1.grad, z2.grad) < 5e-3


@pytest.mark.parametrize("distance", ["l1", "l2"])
@pytest.mark.parametrize("lam_kind", ["scalar", "row"])
def test_dbr_loss_reference_gradcheck(distance, lam_kind):
    logits, yo, ya, lam, to, ta = _dbr_inputs(3, 5, seed=1)
    # keep d - d_t away from 0 so that |.| is differentiable at the sample points
    z = logits.double().requires_grad_(True)
    with torch.no_grad():
        d_org, d_aug = dbr_distances_reference(z, yo, ya, 1.5)
    to = (d_org + 0.5 * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)).detach()
    ta = (d_aug - 0.5 * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)).detach()
    lam_arg = lam.double() if lam_kind == "row" else 0.4

    def f(z):
        return dbr_loss_reference(
            z, yo, ya, lam_arg, to, ta, alpha=0.8, temperature=1.5, distance=distance, reduction="none"
        )

    assert f(z).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-6)


def _dbr_rows_by_formula(logits, y_org, y_aug, lam, d_org_t, d_aug_t, alpha, temperature, squared, grad_scale):
    """What ``nrrdd::dbr_loss_rows`` returns, in plain torch: the per-row loss and the gradient buffer
    ``grad_scale * d loss_row / d logits`` by the analytic formula the kernel uses (kernels/dbr.py)."""
    z = logits.float() / temperature
    logp = torch.log_softmax(z, dim=-1)
    yo = y_org.long().view(-1, 1)
    ya = y_aug.long().view(-1, 1)
    d_org = -logp.gather(1, yo).squeeze(1)
    d_aug = -logp.gather(1, ya).squeeze(1)
    eo = d_org - d_org_t
    ea = d_aug - d_aug_t
    if squared:
        rows = lam * d_org + (1 - lam) * d_aug + alpha * (eo * eo + ea * ea)
        wo = lam + alpha * 2.0 * eo
        wa = (1 - lam) + alpha * 2.0 * ea
    else:
        rows = lam * d_org + (1 - lam) * d_aug + alpha * (eo.abs() + ea.abs())
        wo = lam + alpha * torch.sign(eo)
        wa = (1 - lam) + alpha * torch.sign(ea)
    g = logp.exp_().mul_((wo + wa).unsqueeze(1))
    g.scatter_add_(1, yo, -wo.unsqueeze(1))
    g.scatter_add_(1, ya, -wa.unsqueeze(1))
    g.mul_(grad_scale / temperature)
    return rows, g.to(logits.dtype)


@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_dbr_op_gradient_formula_matches_reference(distance):
    """The analytic gradient the kernel writes (the module docstring's formula, in plain torch) against
    autograd through the reference; where Triton runs, the operator's rows, gradient buffer and backward
    (which divides grad_scale back out of the upstream gradient) too."""
    logits, yo, ya, lam, to, ta = _dbr_inputs(4, 11, seed=6)
    z = logits.clone().requires_grad_(True)
    ref = dbr_loss_reference(z, yo, ya, lam, to, ta, alpha=0.9, temperature=2.0, distance=distance, reduction="none")
    up = torch.randn(4)
    (ref * up).sum().backward()
    rows, buf = _dbr_rows_by_formula(logits, yo, ya, lam, to, ta, 0.9, 2.0, distance == "l2", 0.5)
    torch.testing.assert_close(rows, ref)
    torch.testing.assert_close(buf * (up / 0.5).unsqueeze(1), z.grad)
    if not TRITON_RUNS:
        return
    dev = [t.to(DEV) for t in (logits, yo, ya, lam, to, ta)]
    z1 = dev[0].clone().requires_grad_(True)
    rows1, buf1 = torch.ops.nrrdd.dbr_loss_rows(z1, *dev[1:], 0.9, 2.0, distance == "l2", True, 0.5)
    torch.testing.assert_close(rows1.cpu(), rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buf1.cpu(), buf, rtol=1e-5, atol=1e-6)
    (rows1 * up.to(DEV)).sum().backward()
    torch.testing.assert_close(z1.grad.cpu(), z.grad, rtol=1e-5, atol=1e-6)


def test_dbr_l1_gradient_at_zero_is_sign():
    """dist'(0) = 0 for l1, as torch.abs."""
    logits, yo, ya, lam, _, _ = _dbr_inputs(3, 6, seed=8, device=DEV)
    backends = ["torch"] + (["triton"] if TRITON_RUNS else [])
    grads = []
    for be in backends:
        # targets from the same backend: d - d_t is exactly 0
        d_org, d_aug = dbr_distances(logits, yo, ya, backend=be)
        z = logits.clone().requires_grad_(True)
        dbr_loss(z, yo, ya, lam, d_org, d_aug, alpha=1.0, backend=be).backward()
        grads.append(z.grad)
    z = logits.clone().requires_grad_(True)
    zeros = torch.zeros(3, device=DEV)
    dbr_loss_reference(z, yo, ya, lam, zeros, zeros, alpha=0.0).backward()  # alpha term has zero grad
    for g in grads:
        torch.testing.assert_close(g, z.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_dbr_module_and_no_grad(backend):
    logits, yo, ya, lam, to, ta = _dbr_inputs(3, 9, seed=3, device=DEV)
    crit = DBRLoss(alpha=0.5, temperature=2.0, distance="l2", reduction="sum", backend=backend)
    z = logits.clone().requires_grad_(True)
    out = crit(z, yo, ya, lam, to, ta)
    ref = dbr_loss_reference(logits, yo, ya, lam, to, ta, alpha=0.5, temperature=2.0, distance="l2", reduction="sum")
    torch.testing.assert_close(out, ref)
    out.backward()
    assert z.grad is not None and z.grad.shape == z.shape
    with torch.no_grad():
        torch.testing.assert_close(crit(z, yo, ya, lam, to, ta), ref)
    assert "distance='l2'" in repr(crit)
    with pytest.raises(ValueError):
        DBRLoss(distance="l3")


@pytest.mark.slow
@needs_triton
def test_dbr_opcheck():
    logits, yo, ya, lam, to, ta = _dbr_inputs(4, 10, seed=2, device=DEV)
    z = logits.clone().requires_grad_(True)
    for squared in (False, True):
        torch.library.opcheck(
            torch.ops.nrrdd.dbr_loss_rows.default, (z, yo, ya, lam, to, ta, 0.5, 2.0, squared, True, 0.25)
        )
    torch.library.opcheck(
        torch.ops.nrrdd.dbr_loss_rows.default, (logits, yo, ya, lam, to, ta, 0.5, 1.0, False, False, 1.0)
    )
    torch.library.opcheck(torch.ops.nrrdd.dbr_distances.default, (logits, yo, ya, 1.0))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_triton)])
def test_dbr_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    B, D, C = 4, 8, 10
    model = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.ReLU(), torch.nn.Linear(16, C)).to(DEV)
    logits, yo, ya, lam, to, ta = _dbr_inputs(B, C, seed=5, device=DEV)
    inp = torch.randn(B, D).to(DEV)

    def student_step(inp, yo, ya, lam, to, ta):
        out = model(inp)
        return dbr_loss(out, yo, ya, lam, to, ta, alpha=0.5, temperature=2.0, backend=backend)

    compiled = torch.compile(student_step, fullgraph=True)
    loss_c = compiled(inp, yo, ya, lam, to, ta)
    loss_c.backward()
    grads_c = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_e = student_step(inp, yo, ya, lam, to, ta)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for gc, p in zip(grads_c, model.parameters()):
        torch.testing.assert_close(gc, p.grad, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@needs_triton
def test_masked_adam_op_opcheck_and_compiles_without_graph_break():
    """The Triton masked Adam is the registered op nrrdd::masked_adam_triton_ (declared in-place on x, m,
    v), so a compiled refinement step keeps it in one graph, with the reference's result."""
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 5, 6)
    x, grad = torch.randn(shape, generator=g).to(DEV), torch.randn(shape, generator=g).to(DEV)
    mask = (torch.rand(2, 1, 5, 6, generator=g) > 0.4).float().to(DEV)
    lo, hi = torch.full((3,), -1.0, device=DEV), torch.full((3,), 1.0, device=DEV)
    args = (x.clone(), grad, mask, torch.zeros_like(x), torch.zeros_like(x), 1.0, 0.1, 0.5, 0.9, 1e-8, lo, hi)
    torch.library.opcheck(torch.ops.nrrdd.masked_adam_triton_.default, args)

    def step(x, m, v):
        masked_adam_(x, grad, mask, m, v, step=1, lr=0.1, lo=lo, hi=hi, backend="triton")
        return x * 2

    ref = [x.clone(), torch.zeros_like(x), torch.zeros_like(x)]
    masked_adam_(ref[0], grad, mask, ref[1], ref[2], step=1, lr=0.1, lo=lo, hi=hi, backend="torch")
    got = [x.clone(), torch.zeros_like(x), torch.zeros_like(x)]
    out = torch.compile(step, fullgraph=True)(*got)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, 2 * ref[0], atol=1e-6, rtol=1e-5)
