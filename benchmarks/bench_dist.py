#!/usr/bin/env python
"""Several processes (torchrun): each stage's throughput in 1 and N processes, and the speed-up.

One ``nrrdd run`` (distill with refinement, DBR relabelling, student training, evaluation) on Fashion-MNIST
with conv3, per process count, in fresh processes. The figures come from the stage timings the run's
manifests record (rank 0's, which include waiting for the other ranks, but not process start-up or data
loading). On the CPU the processes share the same cores (1 process x T threads against N x T/N), so the
speed-up there measures the cost of sharing out the work, not added compute; on a GPU each process has its
own GPU (N <= the GPUs of the machine).

Rows (CSV format of every nrrdd benchmark, appended to ``--out``): ``dist_<stage>`` with provider
``<N>proc`` and metric ``throughput`` (discover images/s, refine image-steps/s, relabel and student
samples/s, evaluate images/s), and metric ``speedup`` (x, against 1 process) for N > 1; ``dist_run``
``peak_rss`` (MiB): the peak resident memory of all the run's processes together (sampled every 10 ms). Work is shared out
by batch: a stage with fewer batches than processes leaves processes idle (the refinement batch is 25 here,
so 100 images make 4 batches).

    python -m benchmarks.bench_dist --quick
    python -m benchmarks.bench_dist --processes 1 2 4 8       # on a machine with 8 GPUs
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

import torch

from benchmarks.common import OUT, PeakMemory, Recorder, quantiles

SIZES = {  # (full, quick)
    "ipc": (10, 2), "mipc": (100, 20), "iterations": (30, 3), "epochs": (20, 3), "train_limit": (10000, 3000),
    "test_limit": (2000, 300), "refine_batch": (25, 5),    # 4 refinement batches: work for up to 4 processes
}
VAL_PER_CLASS = 20


def stage_rates(out: Path, size: dict) -> dict[str, float]:
    """Throughput per stage from the manifests of one finished ``nrrdd run`` in ``out``."""
    man = {p.stem.removeprefix("manifest_"): json.loads(p.read_text()) for p in out.glob("manifest_*.json")}
    dist, rel = man["distill"]["timings"], man["relabel_dbr"]["timings"]
    ev = next(m for k, m in man.items() if k.startswith("evaluate_"))["results"]["timings"]
    n_images = 10 * size["ipc"]
    return {
        "discover": 10 * size["mipc"] / dist["discover"],
        "refine": n_images * size["iterations"] / dist["refine"],
        "relabel": n_images * size["epochs"] / rel["relabel"],
        "student": n_images * size["epochs"] / ev["train"],
        "evaluate": (size["test_limit"] + 10 * VAL_PER_CLASS) / ev["evaluate"],
    }


UNITS = {"discover": "images/s", "refine": "image-steps/s", "relabel": "samples/s", "student": "samples/s",
         "evaluate": "images/s"}


def run_once(n: int, size: dict, teacher: Path, out: Path, threads: int, device: str) -> dict[str, float]:
    args = ["run", "--teacher", str(teacher), "--out", str(out), "--ipc", str(size["ipc"]),
            "--mipc", str(size["mipc"]), "--nrr-iterations", str(size["iterations"]),
            "--refine-batch-size", str(size["refine_batch"]), "--epochs", str(size["epochs"]), "--labels", "dbr",
            "--train-limit", str(size["train_limit"]), "--test-limit", str(size["test_limit"]),
            "--val-per-class", str(VAL_PER_CLASS), "--no-compile", "--device", device,
            "--threads", str(max(1, threads // n) if device == "cpu" else threads)]
    launch = [sys.executable, "-m", "nrrdd"] if n == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "nrrdd"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // n)), "PYTHONWARNINGS": "ignore"}
    with PeakMemory() as mem:
        base = mem.peak                             # this process alone
        r = subprocess.run(launch + args, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{n} processes: nrrdd run failed:\n{r.stderr[-3000:]}")
    return {**stage_rates(out, size), "peak_rss": (mem.peak - base) / 2**20}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run)")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=None, help="runs per process count (default 3, quick 1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in all (shared out)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(OUT / "dist.csv"), help="CSV file, rows appended (default: %(default)s)")
    args = ap.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and max(args.processes) > torch.cuda.device_count():
        raise SystemExit(f"{max(args.processes)} processes need as many GPUs; this machine has "
                         f"{torch.cuda.device_count()}")
    size = {k: v[1 if args.quick else 0] for k, v in SIZES.items()}
    reps = args.repeats or (1 if args.quick else 3)
    procs = sorted(set(args.processes) | {1})
    shape = (f"fmnist conv3 ipc{size['ipc']} mipc{size['mipc']} it{size['iterations']} rb{size['refine_batch']} "
             f"ep{size['epochs']}")
    rec = Recorder(torch.device(device))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        from nrrdd.models import build_model

        torch.manual_seed(0)            # an untrained teacher: speed does not depend on the weights
        teacher = Path(tmp) / "teacher.pt"
        torch.save({"model": build_model("conv3", 10, 1, 28).state_dict()}, teacher)
        rates: dict[int, dict[str, list[float]]] = {}
        for rep in range(reps):
            for n in procs:             # interleaved, so drift of the machine hits every process count alike
                got = run_once(n, size, teacher, Path(tmp) / f"r{rep}_p{n}", args.threads, device)
                for stage, v in got.items():
                    rates.setdefault(n, {}).setdefault(stage, []).append(v)
    print(f"{'stage':<10}{'unit':<15}" + "".join(f"{f'{n} proc':>12}" for n in procs)
          + "".join(f"{f'x{n}':>8}" for n in procs if n > 1))
    for stage, unit in UNITS.items():
        med = {}
        for n in procs:
            m, p20, p80 = quantiles(rates[n][stage])
            med[n] = m
            rec.add(f"dist_{stage}", f"{n}proc", shape, "throughput", unit, m, p20, p80)
            if n > 1:
                ratios = [v / w for v, w in zip(rates[n][stage], rates[1][stage])]
                rec.add(f"dist_{stage}", f"{n}proc", shape, "speedup", "x", *quantiles(ratios))
        print(f"{stage:<10}{unit:<15}" + "".join(f"{med[n]:>12.1f}" for n in procs)
              + "".join(f"{med[n] / med[1]:>8.2f}" for n in procs if n > 1))
    for n in procs:                     # all processes of the run together (torchrun's agent included)
        rec.add("dist_run", f"{n}proc", shape, "peak_rss", "MiB", *quantiles(rates[n]["peak_rss"]))
    print(f"{'peak RSS':<10}{'MiB, all procs':<15}" + "".join(f"{quantiles(rates[n]['peak_rss'])[0]:>12.0f}"
                                                            for n in procs))
    rec.write_csv(Path(args.out))
    print(f"{len(rec.rows)} rows -> {args.out} ({time.perf_counter() - t0:.0f} s; {device}, {args.threads} threads "
          f"in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
