#!/usr/bin/env python
"""Each stage of nrrdd on its own: throughput, peak memory, label storage, and how cost grows.

Workload: Fashion-MNIST (real images, 28 px, the Debian package) with a conv3 teacher and student, at the
precision runs use (`--precision auto`: bf16 autocast where the hardware has bf16 units). The
teacher is a seeded, untrained conv3 unless ``--teacher`` is given: speed does not depend on the weights.
Every measurement runs in a fresh process, so its peak resident memory (process and workers, sampled every
10 ms) is that stage's alone; on a GPU peak CUDA memory is recorded too.

Rows (CSV format of every nrrdd benchmark, appended to ``--out``):

* ``discover``   images/s: candidate images scored per second (``classes * mipc``), method nrrdd (CIDD);
* ``refine``     image-steps/s: images x NRR iterations per second;
* ``relabel``    samples/s for soft and DBR labels (``epochs * images``), and the bytes of the label file;
* ``student``    samples/s of student training, eager and ``torch.compile`` (steady state, epochs after the
                 first), and ``cold_compile`` s (first epoch minus a steady one);
* ``evaluate``   images/s over the test split;
* ``label_storage`` bytes per sample per epoch measured from files the label writer produced (soft vs DBR,
  C = 10 and C = 1000 with random logits), and GB for ImageNet-1K at IPC 10/50/200 x 300 epochs, marked
  ``extrapolated``;
* ``set_memory`` copies: how many copies of the synthetic set refinement and writing hold at their peaks,
  measured as the growth of peak resident memory with the set's size (two sizes, 3 x 128 x 128 images;
  ``x set`` = the set's fp32 bytes): 1.33 is the least (the images and their masks);
* ``feed``       samples/s of student training (a tiny network, label mode hard) with the synthetic set copied
                 whole to the device (``set_on_device``) or left in host memory, memory-mapped, and each step's rows
                 streamed there (``streamed``); peak RSS and, on a GPU, peak device memory (``nrrdd/feed.py``);
* ``scaling_<stage>_<param>``: the log-log slope of time (and of peak memory) against ipc, mipc and the
  number of classes (1 = linear); plotted to ``--plots``.

    python -m benchmarks.bench_stages --quick
    python -m benchmarks.bench_stages          # rows appended to benchmarks/out/stages.csv (untracked)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import OUT, PeakMemory, Recorder, quantiles

SIZES = {  # (full, quick)
    "mipc": (300, 60), "ipc": (10, 5), "iterations": (20, 4), "epochs": (6, 3), "eval_images": (10000, 2000),
    "mipc_points": ([50, 150, 300, 600], [50, 150]), "ipc_points": ([1, 10, 50], [1, 5]),
    "class_points": ([2, 5, 10], [2, 5]),
    "set_points": ([1000, 3000], [200, 600]), "set_size": (128, 64),
    "feed": ((2000, 128, 100, 3), (400, 64, 50, 2)),     # (images, size, batch, epochs)
}


# ---- one measurement, in its own process -------------------------------------------------------------
def _class_subset(train, k: int):
    """The first ``k`` classes of an in-memory training split as a dataset of its own."""
    from nrrdd.data import TensorImageSet

    base, idx = train.locate(torch.arange(len(train)))
    keep = idx[base.labels[idx] < k]
    return TensorImageSet(base.images[keep], base.labels[keep], base.classes[:k], size=base.size)


def measure_set_memory(p: dict) -> dict:
    """How many copies of the synthetic set one phase of writing it out holds at its peak: ``n`` random images of
    3 x ``size`` x ``size``; ``phase`` "refine": refined for ``iterations`` steps as ``nrrdd distill`` does
    (into the same tensor); "write": written as a PNG folder + safetensors. The
    process's peak resident memory (``ru_maxrss``, exact) above what it held before the set existed, in units of
    the set's fp32 bytes. The teacher is tiny on purpose (one conv layer, BatchNorm, GAP + linear: original CAM)
    so that the set, not the network's activations, fills memory, as at ImageNet scale where the set is tens of
    GB."""
    import resource

    from nrrdd.data import Normalizer
    from nrrdd.rundir import write_synthetic
    from nrrdd.refine import RefineSettings, refine

    torch.set_num_threads(p["threads"])
    n, s = p["n"], p["size"]
    torch.manual_seed(0)
    teacher = _TinyTeacher().eval()
    for q in teacher.parameters():
        q.requires_grad_(False)
    norm = Normalizer([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    if p["phase"] == "refine":      # the teacher's one forward/backward pass before the baseline: its buffers
        refine(teacher, torch.zeros(100, 3, s, s), torch.arange(100) % 10, (norm.lo, norm.hi),
               RefineSettings(iterations=1))
    base = _rss_now()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, s, s, generator=g)         # normalised in place: one copy, also at its making
    images.sub_(norm.mean.view(1, 3, 1, 1)).div_(norm.std.view(1, 3, 1, 1))
    labels = torch.arange(n) % 10
    set_bytes = images.numel() * 4
    t = time.perf_counter()
    if p["phase"] == "refine":
        refine(teacher, images, labels, (norm.lo, norm.hi), RefineSettings(iterations=p["iterations"], batch_size=100),
               out=images)
    else:
        masks = torch.rand(n, 1, s, s, generator=g)
        with tempfile.TemporaryDirectory() as d:
            write_synthetic(Path(d), images, labels, masks, norm, [f"{c:05d}" for c in range(10)])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"set_bytes": set_bytes, "copies": (peak - base) / set_bytes, "peak_rss": peak,
            "seconds": time.perf_counter() - t}


def measure_feed(p: dict) -> dict:
    """Student training (label mode hard, the tiny network below: the feed's cost is as visible as it can be) on
    ``n`` random 3 x ``size`` x ``size`` images read from a safetensors file as ``nrrdd evaluate`` reads them
    (memory-mapped), with the set copied whole to the device (``on_device``) or streamed from host memory.
    Returns samples/s of the epochs after the first, peak RSS and, on CUDA, peak device memory."""
    from nrrdd.io import atomic_save_safetensors, load_safetensors
    from nrrdd.runtime import Runtime
    from nrrdd.train import StudentSettings, train_student

    torch.set_num_threads(p["threads"])
    dev = torch.device(p["device"])
    n, s = p["n"], p["size"]
    with tempfile.TemporaryDirectory() as d:
        g = torch.Generator().manual_seed(0)
        atomic_save_safetensors(Path(d) / "s.safetensors", {"images": torch.randn(n, 3, s, s, generator=g)})
        images, labels = load_safetensors(Path(d) / "s.safetensors")[0]["images"], torch.arange(n) % 10
        torch.manual_seed(0)
        kw = dict(mode="hard", batch_size=p["batch_size"], seed=0, factor=2, set_on_device=p["on_device"])
        rt = Runtime(device=dev, precision=p["precision"], show_progress=False)
        student = _TinyTeacher()
        train_student(student, images, labels, StudentSettings(epochs=1, **kw), rt)   # warm-up (and the page cache)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with PeakMemory() as mem:
            t = time.perf_counter()
            train_student(student, images, labels, StudentSettings(epochs=p["epochs"], **kw), rt)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            out = {"work": n * p["epochs"], "seconds": time.perf_counter() - t, "set_bytes": images.numel() * 4}
        out["peak_rss"] = mem.peak
        if dev.type == "cuda":
            out["peak_cuda"] = torch.cuda.max_memory_allocated()
    return out


class _TinyTeacher(torch.nn.Module):
    """3 -> 8 channels, BatchNorm, ReLU, global average pool, linear: ~200 multiply-adds per pixel."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.avgpool(torch.relu(self.bn(self.conv(x)))).flatten(1))


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(p: dict) -> dict:
    """Run one stage as described by ``p``; returns work done, seconds, and peak memory."""
    if p["stage"] == "set_memory":
        return measure_set_memory(p)
    if p["stage"] == "feed":
        return measure_feed(p)
    from nrrdd.data import load_splits
    from nrrdd.discover import DiscoverSettings, discover
    from nrrdd.models import build_model, load_model
    from nrrdd.refine import RefineSettings, refine
    from nrrdd.relabel import RelabelSettings, relabel
    from nrrdd.rundir import save_labels
    from nrrdd.runtime import Runtime
    from nrrdd.train import StudentSettings, evaluate, train_student

    torch.set_num_threads(p["threads"])
    dev = torch.device(p["device"])
    sp = load_splits("fashion-mnist", val_per_class=500)
    k = p.get("classes", 10)
    train = _class_subset(sp.train, k) if k < 10 else sp.train
    torch.manual_seed(0)
    teacher = (load_model("conv3", p["teacher"], 10, 1, 28) if p.get("teacher") else build_model("conv3", 10, 1, 28))
    teacher.to(dev).eval()
    for q in teacher.parameters():
        q.requires_grad_(False)
    prec = p["precision"]
    rt = Runtime(device=dev, precision=prec, show_progress=False)
    ipc, stage = p["ipc"], p["stage"]
    out: dict = {}

    def syn_set():
        g = torch.Generator().manual_seed(0)
        return torch.randn(k * ipc, 1, 28, 28, generator=g), torch.arange(k).repeat_interleave(ipc)

    with PeakMemory() as mem:
        t = time.perf_counter()
        if stage == "discover":
            discover(teacher, train, sp.normalizer,
                     DiscoverSettings(method="nrrdd", ipc=ipc, mipc=p["mipc"], num_crop=5, factor=1, seed=0), rt)
            out["work"] = k * p["mipc"]
        elif stage == "refine":
            x, y = syn_set()
            refine(teacher, x, y, (sp.normalizer.lo, sp.normalizer.hi), RefineSettings(iterations=p["iterations"]), rt)
            out["work"] = len(x) * p["iterations"]
        elif stage == "relabel":
            x, y = syn_set()
            labels = relabel(teacher, x, y, RelabelSettings(mode=p["mode"], epochs=p["epochs"], seed=0, factor=1,
                                                            batch_size=50), rt)
            out["work"] = len(x) * p["epochs"]
            with tempfile.TemporaryDirectory() as d:
                f = save_labels(Path(d) / "l.safetensors", labels, mode=p["mode"], seed=0, factor=1,
                                cutmix_alpha=1.0, temperature=1.0, synthetic_sha256="-")
                out["file_bytes"] = f.stat().st_size
        elif stage == "student":
            x, y = syn_set()
            student = build_model("conv3", k, 1, 28)
            ep = p["epochs"]
            kw = dict(mode="online", batch_size=50, seed=0, factor=1, compile=p["compile"])
            # first epoch: compiles (when on), warms up
            train_student(student, x, y, StudentSettings(epochs=1, **kw), rt, teacher=teacher)
            first = time.perf_counter() - t
            t = time.perf_counter()
            train_student(student, x, y, StudentSettings(epochs=ep, **kw), rt, teacher=teacher)
            out["work"] = len(x) * ep
            out["first_epoch_s"] = first
        elif stage == "evaluate":
            test = sp.test.subset(torch.arange(p["eval_images"]))
            evaluate(teacher, test, sp.normalizer, Runtime(device=dev, precision=prec, loader="torch",
                                                            show_progress=False))
            out["work"] = p["eval_images"]
        else:
            raise ValueError(stage)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - t
    out["peak_rss"] = mem.peak
    if dev.type == "cuda":
        out["peak_cuda"] = torch.cuda.max_memory_allocated()
    return out


def run_child(p: dict) -> dict:
    """One measurement in a fresh process, with an empty torch.compile cache (so a compile is cold)."""
    cmd = [sys.executable, "-m", "benchmarks.bench_stages", "--_child", json.dumps(p)]
    with tempfile.TemporaryDirectory(prefix="nrrdd_inductor_") as cache:
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    if res.returncode != 0:
        raise RuntimeError(f"{p['stage']} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---- the suite ---------------------------------------------------------------------------------------
def label_storage(rec: Recorder, table: list) -> None:
    """Bytes per sample per epoch from files ``save_labels`` writes, then ImageNet-1K extrapolated."""
    from nrrdd.rundir import save_labels

    E, N = 2, 40
    per = {}
    with tempfile.TemporaryDirectory() as d:
        for C in (10, 1000):
            for mode, width in (("soft", C), ("dbr", 2)):
                labels = torch.randn(E, N, width).half()
                f = save_labels(Path(d) / f"{mode}{C}.safetensors", labels, mode=mode, seed=0, factor=1,
                                cutmix_alpha=1.0, temperature=1.0, synthetic_sha256="-")
                b = f.stat().st_size
                # subtract the header: fit bytes = header + E*N*per_sample by writing two sizes
                labels2 = torch.randn(2 * E, N, width).half()
                f2 = save_labels(Path(d) / f"{mode}{C}b.safetensors", labels2, mode=mode, seed=0, factor=1,
                                 cutmix_alpha=1.0, temperature=1.0, synthetic_sha256="-")
                per_se = (f2.stat().st_size - b) / (E * N)
                per[(mode, C)] = per_se
                shape = f"C{C} E{E} N{N}"
                rec.add("label_storage", mode, shape, "file_size", "bytes", b, b, b)
                rec.add("label_storage", mode, shape, "per_sample_epoch", "bytes", per_se, per_se, per_se)
                table.append(("label_storage", mode, shape, f"{per_se:.0f} B/sample/epoch", f"file {b} B"))
    for ipc in (10, 50, 200):
        for mode in ("soft", "dbr"):
            gb = per[(mode, 1000)] * ipc * 1000 * 300 / 1e9
            shape = f"imagenet1k ipc{ipc} E300 (extrapolated)"
            rec.add("label_storage", mode, shape, "extrapolated_size", "GB", gb, gb, gb)
            table.append(("label_storage", mode, shape, f"{gb:.2f} GB", "extrapolated"))


def set_memory(rec: Recorder, table: list, size: dict, threads: int) -> None:
    """Copies of the synthetic set held at the peak of refinement and of writing: the slope of peak memory
    against the set's bytes over two set sizes, so that what does not grow with the set (PyTorch, the
    teacher, one batch's activations) drops out."""
    s = size["set_size"]
    for phase in ("refine", "write"):
        runs = [run_child(dict(stage="set_memory", phase=phase, threads=threads, n=n, size=s, iterations=1))
                for n in size["set_points"]]
        a, b = runs[0], runs[-1]
        copies = (b["peak_rss"] - a["peak_rss"]) / (b["set_bytes"] - a["set_bytes"])
        shape = f"n{size['set_points'][0]}..{size['set_points'][-1]} 3x{s}x{s}"
        rec.add("set_memory", phase, shape, "copies", "x set", copies, copies, copies)
        table.append(("set_memory", phase, shape, f"{copies:.2f} copies of the set", f"peak {b['peak_rss'] / 2**20:.0f} MiB"))


def fit_slope(xs, ys) -> float:
    """Least-squares slope of log(y) on log(x): the exponent of y ~ x^a."""
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
    return float(np.polyfit(lx, ly, 1)[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer points (a CPU smoke run)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per throughput point (default 3, quick 1)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", help="auto (as runs: bf16 where the hardware has it) | fp32 | bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--teacher", default=None, help="a conv3 Fashion-MNIST checkpoint (default: untrained)")
    ap.add_argument("--skip", nargs="*", default=[], help="parts to skip: throughput memory set feed storage scaling")
    ap.add_argument("--out", default=str(OUT / "stages.csv"), help="CSV file, rows appended (default: %(default)s)")
    ap.add_argument("--plots", default=str(OUT / "plots"), help="folder of the scaling plot (default: %(default)s)")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        print(json.dumps(measure(json.loads(args._child))))
        return 0
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    from nrrdd.runtime import resolve_precision

    args.precision = resolve_precision(args.precision, torch.device(args.device))
    q = 1 if args.quick else 0
    size = {k: v[q] for k, v in SIZES.items()}
    reps = args.repeats or (1 if args.quick else 3)
    base = dict(device=args.device, precision=args.precision, threads=args.threads, teacher=args.teacher,
                ipc=size["ipc"], mipc=size["mipc"], iterations=size["iterations"], epochs=size["epochs"],
                eval_images=size["eval_images"])
    rec = Recorder(torch.device(args.device))
    table: list = []
    t_all = time.perf_counter()

    def point(name, provider, shape, unit, p):
        runs = [run_child(p) for _ in range(reps)]
        rates = [r["work"] / r["seconds"] for r in runs]
        med, p20, p80 = quantiles(rates)
        rec.add(name, provider, shape, "throughput", unit, med, p20, p80)
        rss = max(r["peak_rss"] for r in runs) / 2**20
        rec.add(name, provider, shape, "peak_rss", "MiB", rss, rss, rss)
        if "peak_cuda" in runs[0]:
            c = max(r["peak_cuda"] for r in runs) / 2**20
            rec.add(name, provider, shape, "peak_cuda", "MiB", c, c, c)
        table.append((name, provider, shape, f"{med:,.0f} {unit}", f"peak RSS {rss:.0f} MiB"))
        print(f"  {name:<10} {provider:<14} {shape:<28} {med:>10,.1f} {unit:<14} RSS {rss:6.0f} MiB",
              file=sys.stderr, flush=True)
        return runs, med

    if "throughput" not in args.skip:
        sz = f"fmnist c10 ipc{size['ipc']} {args.precision}"
        point("discover", "nrrdd", f"fmnist c10 mipc{size['mipc']} {args.precision}", "images/s",
              dict(base, stage="discover"))
        point("refine", "nrr", f"{sz} it{size['iterations']}", "image-steps/s", dict(base, stage="refine"))
        for mode in ("soft", "dbr"):
            runs, _ = point("relabel", mode, f"{sz} E{size['epochs']}", "samples/s",
                            dict(base, stage="relabel", mode=mode))
            b = runs[0]["file_bytes"]
            rec.add("relabel", mode, f"{sz} E{size['epochs']}", "file_size", "bytes", b, b, b)
        for comp in (False, True):
            prov = "torch-compile" if comp else "torch-eager"
            runs, med = point("student", prov, f"{sz} E{size['epochs']} b50", "samples/s",
                              dict(base, stage="student", compile=comp))
            steady_epoch = size["ipc"] * 10 / med
            cold = [max(0.0, r["first_epoch_s"] - steady_epoch) for r in runs]
            c, c20, c80 = quantiles(cold)
            rec.add("student", prov, f"{sz} E{size['epochs']} b50", "cold_compile", "s", c, c20, c80)
            table.append(("student", prov, "first epoch overhead", f"{c:.1f} s", ""))
        point("evaluate", "torch", f"fmnist test {size['eval_images']} {args.precision}", "images/s",
              dict(base, stage="evaluate"))

    scaling = []
    if "memory" not in args.skip or "scaling" not in args.skip:
        xs, ts, ms = [], [], []
        for m in size["mipc_points"]:
            r = run_child(dict(base, stage="discover", mipc=m))
            xs.append(m), ts.append(r["seconds"]), ms.append(r["peak_rss"] / 2**20)
            rec.add("discover_memory", "nrrdd", f"fmnist c10 mipc{m}", "peak_rss", "MiB", ms[-1], ms[-1], ms[-1])
            table.append(("discover_memory", "nrrdd", f"mipc {m}", f"peak RSS {ms[-1]:.0f} MiB", f"{ts[-1]:.1f} s"))
        scaling.append(("discover", "mipc", xs, ts, ms))
    if "scaling" not in args.skip:
        for param, pts, stage in (("classes", size["class_points"], "discover"), ("ipc", size["ipc_points"], "refine"),
                                  ("ipc", size["ipc_points"], "student")):
            xs, ts, ms = [], [], []
            for v in pts:
                p = dict(base, stage=stage, compile=False, **{param: v})
                if stage == "student":
                    p["epochs"] = 2
                r = run_child(p)
                xs.append(v), ts.append(r["seconds"]), ms.append(r["peak_rss"] / 2**20)
            scaling.append((stage, param, xs, ts, ms))
        for stage, param, xs, ts, ms in scaling:
            a_t, a_m = fit_slope(xs, ts), fit_slope(xs, ms)
            rec.add(f"scaling_{stage}_{param}", "nrrdd", f"{param} {xs[0]}..{xs[-1]}", "time_exponent", "1",
                    a_t, a_t, a_t)
            rec.add(f"scaling_{stage}_{param}", "nrrdd", f"{param} {xs[0]}..{xs[-1]}", "memory_exponent", "1",
                    a_m, a_m, a_m)
            table.append((f"scaling_{stage}", param, f"{xs}", f"time ~ {param}^{a_t:.2f}",
                          f"memory ~ {param}^{a_m:.2f}"))
        plot_scaling(scaling, Path(args.plots))
    if "set" not in args.skip:
        set_memory(rec, table, size, args.threads)
    if "feed" not in args.skip:
        fs = size["feed"]
        shape = f"n{fs[0]} 3x{fs[1]}x{fs[1]} b{fs[2]} E{fs[3]} tiny {args.precision}"
        for on_device in (True, False):
            point("feed", "set_on_device" if on_device else "streamed", shape, "samples/s",
                  dict(base, stage="feed", n=fs[0], size=fs[1], batch_size=fs[2], epochs=fs[3], on_device=on_device))
    if "storage" not in args.skip:
        label_storage(rec, table)

    out = Path(args.out)
    rec.write_csv(out)
    print(f"\ndevice: {rec.common['device']}   torch {rec.common['torch_version']}   nrrdd "
          f"{rec.common['package_version']}   precision {args.precision}")
    for row in table:
        print("{:<16} {:<14} {:<40} {:<26} {}".format(*row))
    print(f"\n{len(rec.rows)} rows appended to {out} ({time.perf_counter() - t_all:.0f} s)")
    return 0


def plot_scaling(scaling, out_dir: Path) -> None:
    """One PNG: time and peak memory of each stage against its parameter, log-log, with the fitted slope."""
    if not scaling:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nrrdd.io import atomic_save_figure

    fig, axes = plt.subplots(2, len(scaling), figsize=(3.2 * len(scaling), 5.5), squeeze=False)
    for j, (stage, param, xs, ts, ms) in enumerate(scaling):
        for i, (ys, what) in enumerate(((ts, "time (s)"), (ms, "peak RSS (MiB)"))):
            ax = axes[i][j]
            ax.plot(xs, ys, "o-")
            ax.set_xscale("log")
            if i == 0:
                ax.set_yscale("log")
            else:                                   # memory: linear from 0, so "flat" looks flat
                ax.set_ylim(0, 1.2 * max(ys))
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.minorticks_off()
            ax.set_title(f"{stage} vs {param}: slope {fit_slope(xs, ys):.2f}", fontsize=9)
            ax.set_xlabel(param)
            ax.set_ylabel(what)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_figure(out_dir / "scaling_stages.png", fig)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
