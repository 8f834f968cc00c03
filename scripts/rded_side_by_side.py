"""RDED's own code and nrrdd on the same teacher, data and machine: accuracy and seconds per stage.

The setting is RDED's CIFAR-10 script (``scripts/cifar10_10ipc_conv3_to_conv3_cr5.sh`` in LINs-lab/RDED) in a
folder laid out as RDED's README asks. The images are Fashion-MNIST written as 32 px RGB PNGs (the only
real 10-class data installed offline); the teacher is a conv3 trained on them by ``nrrdd train-teacher`` and
saved where RDED's code looks for it, as ``{"model": state_dict}``.

    python scripts/rded_side_by_side.py prepare WORK [--train-per-class 2000] [--teacher-epochs 5]
    python scripts/rded_side_by_side.py rded WORK --code RDED_CHECKOUT [--seeds 0 1 2]
    python scripts/rded_side_by_side.py nrrdd WORK [--seeds 0 1 2] [--recipe rded]
    python scripts/rded_side_by_side.py report WORK        # or: report results/rded_side_by_side.json

``prepare`` writes ``WORK/data/cifar10/{train,val}/<class>/<n>.png`` (train: the first ``--train-per-class``
training images of each class; val: the whole test split, 1000 per class, RDED's ``val_ipc`` for cifar10) and
trains the teacher. ``rded`` runs RDED's ``main.py`` stages (selection, then relabel + training + evaluation)
from ``WORK/rded_s<seed>`` with ``--seed``: RDED's code needs a CPU patch first (below). ``nrrdd`` runs RDED's
command line with ``nrrdd run`` from ``WORK/nrrdd_<recipe>_s<seed>``. Each run appends to
``WORK/side_by_side.json``; ``report`` prints the table (mean ± std over seeds of the final-epoch top-1 on
the 10,000 val images, and the seconds of each stage).

RDED's code on a CPU: delete every ``.cuda()`` call in ``synthesize/*.py`` and ``validation/*.py``
(``sed -i 's/\\.cuda()//g' synthesize/*.py validation/*.py``); nothing else changes. ``nn.DataParallel`` without
GPUs calls the model directly. Keep that patched copy outside this repository.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path


# RDED's command (its README and scripts/cifar10_10ipc_conv3_to_conv3_cr5.sh)
RDED_FLAGS = ["--subset", "cifar10", "--arch-name", "conv3", "--factor", "1", "--num-crop", "5", "--mipc", "300",
              "--ipc", "10", "--stud-name", "conv3", "--re-epochs", "300"]

# RDED's main.py with each stage timed (its main.py calls the same two functions in this order)
RDED_RUNNER = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
sys.argv = ["main.py"] + json.loads(sys.argv[1])
sys.path.insert(0, {code!r})
from argument import args
from synthesize.main import main as synth_main
from validation.main import main as valid_main
t0 = time.perf_counter(); synth_main(args); t1 = time.perf_counter(); valid_main(args); t2 = time.perf_counter()
print("STAGE_SECONDS " + json.dumps({{"select": t1 - t0, "train_eval": t2 - t1}}), flush=True)
"""


def _fashion_mnist():
    from nrrdd.data import load_splits

    sp = load_splits("fashion-mnist", val_per_class=0)
    base = lambda s: getattr(s, "base", s)         # the whole split (no validation images held out)
    return base(sp.train), base(sp.test)


def _write(images, labels, root: Path, per_class: int | None) -> int:
    from PIL import Image
    n = 0
    counts: dict[int, int] = {}
    for x, y in zip(images, labels.tolist()):
        if per_class is not None and counts.get(y, 0) >= per_class:
            continue
        d = root / f"{y:05d}"
        d.mkdir(parents=True, exist_ok=True)
        px = Image.fromarray(x[0].numpy()).resize((32, 32), Image.BILINEAR).convert("RGB")
        px.save(d / f"{counts.get(y, 0):05d}.png")
        counts[y] = counts.get(y, 0) + 1
        n += 1
    return n


def prepare(args) -> None:
    work = Path(args.work).resolve()
    data = work / "data" / "cifar10"
    if not (data / "val").exists():
        train, test = _fashion_mnist()
        n_train = _write(train.images, train.labels, data / "train.tmp", args.train_per_class)
        n_val = _write(test.images, test.labels, data / "val.tmp", None)
        (data / "train.tmp").rename(data / "train")
        (data / "val.tmp").rename(data / "val")
        print(f"wrote {n_train} train and {n_val} val PNGs (32 px RGB) under {data}")
    teacher = work / "data" / "pretrain_models" / "cifar10_conv3.pth"
    if not teacher.exists():
        out = work / "teacher"
        subprocess.run(["nrrdd", "train-teacher", "--subset", "cifar10", "--arch", "conv3",
                        "--teacher-epochs", str(args.teacher_epochs), "--out", str(out),
                        "--threads", str(args.threads)], cwd=work, check=True)
        ckpt = next(out.rglob("teacher.pt"))
        teacher.parent.mkdir(parents=True, exist_ok=True)
        os.link(ckpt, teacher)                       # already {"model": state_dict}, RDED's format
        print(f"teacher: {teacher} ({json.loads((ckpt.parent / 'teacher.json').read_text())['test_top1']}% on val)")


def _record(work: Path, rec: dict) -> None:
    path = work / "side_by_side.json"
    data = json.loads(path.read_text()) if path.exists() else {"setting": " ".join(RDED_FLAGS), "runs": []}
    data["runs"] = [r for r in data["runs"] if (r["code"], r["seed"]) != (rec["code"], rec["seed"])] + [rec]
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(rec), flush=True)


def _rundir(work: Path, name: str) -> Path:
    d = work / name
    d.mkdir(exist_ok=True)
    if not (d / "data").exists():
        (d / "data").symlink_to(work / "data")
    return d


def run_rded(args) -> None:
    work, code = Path(args.work).resolve(), Path(args.code).resolve()
    if "cuda()" in (code / "validation" / "main.py").read_text():
        raise SystemExit(f"{code}: RDED's code still calls .cuda(); patch a copy first (see this script's help)")
    for seed in args.seeds:
        d = _rundir(work, f"rded_s{seed}")
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", RDED_RUNNER.format(code=str(code)),
                            json.dumps(RDED_FLAGS + ["--seed", str(seed)])],
                           cwd=d, capture_output=True, text=True)
        (d / "log.txt").write_text(p.stdout + p.stderr)
        if p.returncode:
            raise SystemExit(f"RDED's code failed (seed {seed}); see {d / 'log.txt'}")
        _record(work, {"code": "RDED", "seed": seed, **parse_rded_log(p.stdout),
                       "total_seconds": round(time.perf_counter() - t0, 1)})


def parse_rded_log(stdout: str) -> dict:
    """RDED's validation prints ``TEST:\\nIter <epoch>: loss = .., Top-1 err = <100 - top1>, ...`` at its evaluated
    epochs and ``Best accuracy is <top1>@<epoch>`` at the end; the runner adds ``STAGE_SECONDS {json}``."""
    errs = re.findall(r"TEST:\s*Iter (\d+): loss = [\d.]+,\s*Top-1 err = ([\d.]+)", stdout)
    best = re.search(r"Best accuracy is ([\d.]+)@(\d+)", stdout)
    if not errs or best is None or "STAGE_SECONDS " not in stdout:
        raise ValueError("no final evaluation in RDED's output")
    stages = json.loads(stdout.split("STAGE_SECONDS ")[-1].splitlines()[0])
    return {"final_top1": round(100 - float(errs[-1][1]), 2), "final_epoch": int(errs[-1][0]),
            "best_top1": round(float(best.group(1)), 2), "seconds": {k: round(v, 1) for k, v in stages.items()}}


def run_nrrdd(args) -> None:
    work = Path(args.work).resolve()
    for seed in args.seeds:
        name = f"nrrdd_{args.recipe}_s{seed}"
        d = _rundir(work, name)
        out = d / "exp"
        t0 = time.perf_counter()
        cmd = ["nrrdd", "run", "--method", "rded", "--recipe", args.recipe, *RDED_FLAGS, "--seed", str(seed),
               "--out", str(out), "--threads", str(args.threads)]
        p = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
        (d / "log.txt").write_text(" ".join(cmd) + "\n" + p.stdout + p.stderr)
        if p.returncode:
            raise SystemExit(f"nrrdd failed (seed {seed}); see {d / 'log.txt'}")
        ev = json.loads(next(out.glob("eval_online_*.json")).read_text())
        t = {**json.loads((out / "manifest_distill.json").read_text())["timings"], **ev["timings"]}
        _record(work, {"code": f"nrrdd --recipe {args.recipe}", "seed": seed, "final_top1": ev["test_top1"],
                       "final_epoch": ev["epochs"] - 1, "seconds": {k: round(v, 1) for k, v in t.items()},
                       "total_seconds": round(time.perf_counter() - t0, 1)})


def report(args) -> None:
    path = Path(args.work)
    data = json.loads((path if path.is_file() else path / "side_by_side.json").read_text())
    codes = list(dict.fromkeys(r["code"] for r in data["runs"]))
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else float("nan")  # noqa: E731
    print(f"setting: {data['setting']}\n")
    print("| code | seeds | final-epoch top-1 | per seed | seconds per stage (mean) | total s |")
    print("|---|---|---|---|---|---|")
    for c in codes:
        rs = sorted((r for r in data["runs"] if r["code"] == c), key=lambda r: r["seed"])
        acc = [r["final_top1"] for r in rs]
        stages = {k: statistics.mean(r["seconds"][k] for r in rs) for k in rs[0]["seconds"]}
        print(f"| {c} | {','.join(str(r['seed']) for r in rs)} | {statistics.mean(acc):.2f} ± {sd(acc):.2f} | "
              f"{' / '.join(f'{a:.2f}' for a in acc)} | {', '.join(f'{k} {v:.0f}' for k, v in stages.items())} | "
              f"{statistics.mean(r['total_seconds'] for r in rs):.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("work")
    p.add_argument("--train-per-class", type=int, default=2000)
    p.add_argument("--teacher-epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p = sub.add_parser("rded")
    p.add_argument("work")
    p.add_argument("--code", required=True, help="a checkout of LINs-lab/RDED with the CPU patch")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p = sub.add_parser("nrrdd")
    p.add_argument("work")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--recipe", default="rded", choices=["rded", "nrrdd"])
    p.add_argument("--threads", type=int, default=0)
    p = sub.add_parser("report")
    p.add_argument("work", help="WORK, or a copy of its side_by_side.json (results/rded_side_by_side.json)")
    args = ap.parse_args()
    {"prepare": prepare, "rded": run_rded, "nrrdd": run_nrrdd, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
