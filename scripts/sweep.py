"""Tune NRR-DD's open parameters on the validation split held out of the training set (never the test set).

One-at-a-time sweep around METHOD.md's defaults: each trial distils (cached when only student settings
change), trains a student and records its top-1 on the held-out validation images. The test split is not
evaluated at all here. Writes results/sweep_<dataset>_ipc<ipc>.json and prints a table.

    python scripts/sweep.py --teacher runs/teachers/fashion-mnist_conv3_e3_s0/teacher.pt
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nrrdd import pipeline
from nrrdd.config import RunConfig
from nrrdd.io import atomic_write_json

# (name, label mode, overrides): stage-2 parameters with online soft labels, alpha_dbr with DBR labels.
TRIALS = [
    ("default", "online", {}),
    ("eps=0.3", "online", {"nrr_eps": 0.3}),
    ("eps=0.7", "online", {"nrr_eps": 0.7}),
    ("iters=100", "online", {"nrr_iterations": 100}),
    ("lr=0.05", "online", {"nrr_lr": 0.05}),
    ("a_bn=0", "online", {"a_bn": 0.0}),
    ("a_bn=0.1", "online", {"a_bn": 0.1}),
    ("no-refine", "online", {"refine": False}),
    ("dbr alpha=1", "dbr", {}),
    ("dbr alpha=0.5", "dbr", {"alpha_dbr": 0.5}),
    ("dbr alpha=2", "dbr", {"alpha_dbr": 2.0}),
]
STUDENT_ONLY = {"alpha_dbr", "labels", "epochs", "lr", "temperature", "dbr_distance", "dbr_temperature"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--only", nargs="*", help="trial names to run")
    args = ap.parse_args()
    base = RunConfig(teacher=args.teacher, ipc=args.ipc, epochs=args.epochs, method="nrrdd")
    ctx = pipeline.make_context(base)
    results_path = Path("results") / f"sweep_{base.dataset}_ipc{args.ipc}.json"
    done = json.loads(results_path.read_text())["trials"] if results_path.exists() else []
    have = {t["name"] for t in done}
    distilled: dict[str, str] = {}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name, labels, over in TRIALS:
        if (args.only and name not in args.only) or name in have:
            continue
        cfg = base.replace(labels=labels, **over)
        dkey = json.dumps({k: v for k, v in over.items() if k not in STUDENT_ONLY}, sort_keys=True)
        if dkey not in distilled:
            syn = Path(args.out) / f"{stamp}-{len(distilled)}"
            pipeline.run_distill(cfg.replace(out=str(syn)), ctx=ctx)
            distilled[dkey] = str(syn)
        syn = distilled[dkey]
        if labels == "dbr" and not (Path(syn) / "labels_dbr.safetensors").exists():
            pipeline.run_relabel(cfg, syn, "dbr", ctx=ctx)
        t0 = time.perf_counter()
        r = pipeline.run_evaluate(cfg, syn, labels, ctx=ctx, validation_only=True)
        done.append({"name": name, "labels": labels, "overrides": over, "val_top1": r["val_top1"],
                     "seconds": time.perf_counter() - t0, "syn": syn})
        print(f"{name:<16} {labels:<7} val top-1 {r['val_top1']:.2f}%", flush=True)
        atomic_write_json(results_path, {"dataset": base.dataset, "ipc": args.ipc, "epochs": args.epochs,
                                         "teacher": args.teacher, "metric": "val_top1 (held-out training images)",
                                         "trials": done})
    print(json.dumps([(t["name"], round(t["val_top1"], 2)) for t in done], indent=1))


if __name__ == "__main__":
    main()
