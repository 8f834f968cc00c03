#!/usr/bin/env python
"""Benchmark of the nrrdd.kernels ops, side by side in one run:

* ``torch-eager``   : the plain PyTorch reference;
* ``torch-compile`` : the same reference through ``torch.compile`` (Inductor);
* ``triton``        : the fused Triton kernel (CUDA only);
* ``triton-prev``   : with ``--prev-kernels DIR``, the kernels of an earlier version (a copy of its
  ``kernels/`` folder, e.g. ``git archive REV kernels | tar -x -C /tmp/prev``), timed in the same run
  as the current ones: a kernel change measured before and after, side by side (CUDA only).

Ops and sizes (full run): masked Adam on the refinement batch 100 x 3 x 224 x 224 with a
[N, 1, H, W] mask and per-channel bounds; DBR loss forward+backward and DBR distances
(forward) at B = 256 for C = 1000 and C = 21841.  ``--quick`` shrinks sizes and repeats
so that it runs on a CPU in well under a minute.

For each op: median / p20 / p80 time, the minimum bytes the op must move, the achieved
GB/s, and this machine's measured streaming bandwidth (the best of ``dst.copy_(src)`` and an
in-place ``a.add_(b)`` on ~256 MB; see ``bench_copy`` for why copy alone understates it) as the
reference.  Rows are appended to ``--out`` (CSV, header written for a new file)
and a readable table is printed.

    python -m benchmarks.bench_kernels --quick
    python -m benchmarks.bench_kernels                 # rows appended to benchmarks/out/kernels.csv (untracked)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import OUT, Recorder, quantiles
from nrrdd.kernels import dbr_distances, dbr_loss
from nrrdd.kernels._backend import triton_available
from nrrdd.kernels.dbr import dbr_distances_reference, dbr_loss_reference
from nrrdd.kernels.masked_adam import masked_adam_reference_, masked_adam_triton_

# ----------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, reps: int, warmup: int, setup=None) -> list[float]:
    """Per-call times in ms (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if setup is not None:
            setup()
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def load_prev_kernels(folder: str | Path):
    """An earlier version's ``kernels/`` folder as the package ``nrrdd_prev_kernels``, its operators
    renamed to the namespace ``nrrdd_prev`` so that they do not collide with the current ones."""
    import atexit
    import importlib
    import importlib.util
    import shutil
    import tempfile

    src = Path(folder)
    if (src / "kernels").is_dir():
        src = src / "kernels"
    name = "nrrdd_prev_kernels"
    if name in sys.modules:  # its operators are registered for the life of the process: load once
        if sys.modules[name].__nrrdd_prev_source__ != str(src.resolve()):
            raise RuntimeError(f"previous kernels were loaded from {sys.modules[name].__nrrdd_prev_source__}; "
                               f"one folder per process ({src})")
        return importlib.import_module(f"{name}.masked_adam"), importlib.import_module(f"{name}.dbr")
    tmp = Path(tempfile.mkdtemp(prefix="nrrdd_prev_kernels_"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    for f in src.glob("*.py"):
        text = f.read_text().replace('"nrrdd::', '"nrrdd_prev::').replace("torch.ops.nrrdd.", "torch.ops.nrrdd_prev.")
        (tmp / f.name).write_text(text)
    spec = importlib.util.spec_from_file_location(name, tmp / "__init__.py", submodule_search_locations=[str(tmp)])
    mod = importlib.util.module_from_spec(spec)
    mod.__nrrdd_prev_source__ = str(src.resolve())
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return importlib.import_module(f"{name}.masked_adam"), importlib.import_module(f"{name}.dbr")


# ----------------------------------------------------------------------------
# context
# ----------------------------------------------------------------------------


class KernelRecorder(Recorder):
    def op(self, name, provider, shape, times_ms, min_bytes, copy_gbs):
        med, p20, p80 = quantiles(times_ms)
        self.add(name, provider, shape, "time", "ms", med, p20, p80)
        self.add(name, provider, shape, "min_bytes", "MB", min_bytes / 1e6, min_bytes / 1e6, min_bytes / 1e6)
        # GB/s from the time quantiles (p20 of the bandwidth comes from p80 of the time)
        gbs = lambda t: min_bytes / (t * 1e-3) / 1e9  # noqa: E731
        self.add(name, provider, shape, "bandwidth", "GB/s", gbs(med), gbs(p80), gbs(p20))
        self.table.append((name, provider, shape, med, p20, p80, min_bytes / 1e6, gbs(med), gbs(med) / copy_gbs))

    def print_table(self, copy_gbs: float) -> None:
        print(f"\ndevice: {self.common['device']}   torch {self.common['torch_version']}   "
              f"nrrdd {self.common['package_version']}")
        print(f"reference bandwidth (best of copy and in-place add): {copy_gbs:.1f} GB/s\n")
        hdr = ("op", "provider", "shape", "median ms", "p20 ms", "p80 ms", "min MB", "GB/s", "% ref")
        fmt = "{:<20} {:<14} {:<22} {:>10} {:>10} {:>10} {:>9} {:>9} {:>7}"
        print(fmt.format(*hdr))
        print("-" * 118)
        for name, prov, shape, med, p20, p80, mb, gbs, frac in self.table:
            print(fmt.format(name, prov, shape, f"{med:.3f}", f"{p20:.3f}", f"{p80:.3f}",
                             f"{mb:.1f}", f"{gbs:.1f}", f"{100 * frac:.1f}"))


# ----------------------------------------------------------------------------
# benchmarks
# ----------------------------------------------------------------------------


def bench_copy(rec: KernelRecorder, device, nbytes: int, reps: int, warmup: int) -> float:
    """The reference bandwidth: the faster of two plain streaming ops on ``nbytes`` buffers.

    * ``copy``: ``dst.copy_(src)``, counted as read + write (2 n). On CPUs a store to a line not in cache
      first reads it (write-allocate), so the memory really moves 3 n and this figure understates it.
    * ``add_``: ``a.add_(b)`` in place, read a, read b, write a (3 n), no write-allocate: the pattern of
      the in-place kernels measured here (masked Adam updates x, m and v in place).

    A measured rate, not a hard ceiling: a kernel with more concurrent streams can exceed it somewhat."""
    n = nbytes // 4
    a = torch.randn(n, device=device)
    b = torch.randn(n, device=device)
    shape = f"{nbytes / 2**20:.0f}MiB"
    best = 0.0
    ops = (("copy", lambda: b.copy_(a), 2 * n * 4), ("add_", lambda: a.add_(b, alpha=1e-9), 3 * n * 4))
    for name, fn, moved in ops:
        med, p20, p80 = quantiles(time_fn(fn, device, reps, warmup))
        gbs = lambda t: moved / (t * 1e-3) / 1e9  # noqa: E731
        rec.add(name, "torch", shape, "time", "ms", med, p20, p80)
        rec.add(name, "torch", shape, "bandwidth", "GB/s", gbs(med), gbs(p80), gbs(p20))
        best = max(best, gbs(med))
    del a, b
    return best


def bench_masked_adam(rec: KernelRecorder, device, shape, reps, warmup, copy_gbs, providers, prev=None):
    N, C, H, W = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device)
    g = torch.randn(shape, generator=gen).to(device)
    m = torch.zeros(shape, device=device)
    v = torch.zeros(shape, device=device)
    mask = (torch.rand(N, 1, H, W, generator=gen) > 0.3).float().to(device)
    lo = torch.tensor([-2.1, -2.0, -1.8][:C] + [-2.0] * max(0, C - 3), device=device)
    hi = torch.tensor([2.2, 2.4, 2.6][:C] + [2.5] * max(0, C - 3), device=device)
    kw = dict(step=10, lr=0.25, beta1=0.5, beta2=0.9, eps=1e-8, lo=lo, hi=hi)
    numel = x.numel()
    min_bytes = (4 * numel + N * H * W) * 4 + 3 * numel * 4  # read x,g,m,v,mask; write x,m,v
    sshape = "x".join(map(str, shape))

    fns = {"torch-eager": lambda: masked_adam_reference_(x, g, mask, m, v, **kw)}
    if "torch-compile" in providers:
        compiled = torch.compile(masked_adam_reference_, dynamic=False)
        fns["torch-compile"] = lambda: compiled(x, g, mask, m, v, **kw)
    if "triton" in providers:
        fns["triton"] = lambda: masked_adam_triton_(x, g, mask, m, v, **kw)
        if prev is not None:
            fns["triton-prev"] = lambda: prev[0].masked_adam_triton_(x, g, mask, m, v, **kw)
    for prov, fn in fns.items():
        if prov not in providers:
            continue
        t0 = time.perf_counter()
        times = time_fn(fn, device, reps, warmup)
        rec.op("masked_adam", prov, sshape, times, min_bytes, copy_gbs)
        print(f"  masked_adam {prov:<14} {sshape}: {quantiles(times)[0]:.3f} ms "
              f"({time.perf_counter() - t0:.1f} s incl. warm-up/compile)", file=sys.stderr)


def bench_dbr(rec: KernelRecorder, device, B, C, reps, warmup, copy_gbs, providers, dtype=torch.float32, prev=None):
    gen = torch.Generator(device="cpu").manual_seed(1)
    logits0 = (torch.randn(B, C, generator=gen) * 3).to(device=device, dtype=dtype)
    yo = torch.randint(0, C, (B,), generator=gen).to(device)
    ya = torch.randint(0, C, (B,), generator=gen).to(device)
    lam = torch.rand(B, generator=gen).to(device)
    to = (torch.rand(B, generator=gen) * 4).to(device)
    ta = (torch.rand(B, generator=gen) * 4).to(device)
    z = logits0.clone().requires_grad_(True)
    esize = logits0.element_size()
    small = 2 * B * 8 + 3 * B * 4 + B * 4  # labels, lam + targets, per-row loss
    sshape = f"{B}x{C}" + ("" if dtype == torch.float32 else f" {str(dtype).split('.')[-1]}")

    def clear():
        z.grad = None

    kw = dict(alpha=1.0, temperature=1.0, distance="l1", reduction="mean")

    def fb(loss_fn):
        def run():
            loss_fn(z, yo, ya, lam, to, ta, **kw).backward()

        return run

    fwdbwd = {"torch-eager": fb(dbr_loss_reference)}
    fwd = {"torch-eager": lambda: dbr_distances_reference(logits0, yo, ya, 1.0)}
    if "torch-compile" in providers:
        fwdbwd["torch-compile"] = fb(torch.compile(dbr_loss_reference, dynamic=False))
        cd = torch.compile(dbr_distances_reference, dynamic=False)
        fwd["torch-compile"] = lambda: cd(logits0, yo, ya, 1.0)
    if "triton" in providers:
        fwdbwd["triton"] = fb(lambda *a, **k: dbr_loss(*a, backend="triton", **k))
        fwd["triton"] = lambda: dbr_distances(logits0, yo, ya, 1.0, backend="triton")
        if prev is not None:
            fwdbwd["triton-prev"] = fb(lambda *a, **k: prev[1].dbr_loss(*a, backend="triton", **k))
            fwd["triton-prev"] = lambda: prev[1].dbr_distances(logits0, yo, ya, 1.0, backend="triton")

    for prov, fn in fwdbwd.items():
        if prov not in providers:
            continue
        t0 = time.perf_counter()
        times = time_fn(fn, device, reps, warmup, setup=clear)
        rec.op("dbr_loss_fwd_bwd", prov, sshape, times, 2 * B * C * esize + small, copy_gbs)
        print(f"  dbr_loss fwd+bwd {prov:<14} {sshape}: {quantiles(times)[0]:.3f} ms "
              f"({time.perf_counter() - t0:.1f} s incl. warm-up/compile)", file=sys.stderr)
    for prov, fn in fwd.items():
        if prov not in providers:
            continue
        with torch.no_grad():
            times = time_fn(fn, device, reps, warmup)
        rec.op("dbr_distances", prov, sshape, times, B * C * esize + 2 * B * 8 + 2 * B * 4, copy_gbs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(OUT / "kernels.csv"), help="CSV file, rows appended (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats (CPU smoke run)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--reps", type=int, default=None, help="timed repeats per op")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls per op")
    ap.add_argument("--providers", default="torch-eager,torch-compile,triton",
                    help="comma-separated subset of torch-eager,torch-compile,triton")
    ap.add_argument("--half", action="store_true", help="also time DBR with bf16 logits")
    ap.add_argument("--prev-kernels", default=None, help="an earlier version's kernels/ folder: adds triton-prev")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    providers = {p.strip() for p in args.providers.split(",") if p.strip()}
    if "triton" in providers and not (device.type == "cuda" and triton_available()):
        print("note: Triton provider skipped (needs a CUDA device and triton)", file=sys.stderr)
        providers.discard("triton")

    if args.quick:
        reps, warmup = args.reps or 5, args.warmup or 2
        copy_bytes = 64 * 2**20
        adam_shape = (4, 3, 64, 64)
        dbr_cfgs = [(32, 1000), (8, 21841)]
    else:
        reps, warmup = args.reps or 50, args.warmup or 5
        copy_bytes = 256 * 2**20
        adam_shape = (100, 3, 224, 224)
        dbr_cfgs = [(256, 1000), (256, 21841)]

    prev = None
    if args.prev_kernels and "triton" in providers:
        prev = load_prev_kernels(args.prev_kernels)
        providers.add("triton-prev")

    rec = KernelRecorder(device)
    t0 = time.perf_counter()
    copy_gbs = bench_copy(rec, device, copy_bytes, max(reps, 5), warmup)
    bench_masked_adam(rec, device, adam_shape, reps, warmup, copy_gbs, providers, prev)
    for B, C in dbr_cfgs:
        bench_dbr(rec, device, B, C, reps, warmup, copy_gbs, providers, prev=prev)
        if args.half:
            bench_dbr(rec, device, B, C, reps, warmup, copy_gbs, providers, dtype=torch.bfloat16, prev=prev)
    rec.print_table(copy_gbs)
    out = Path(args.out)
    rec.write_csv(out)
    print(f"\n{len(rec.rows)} rows appended to {out}  ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
