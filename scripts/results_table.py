"""The README's results table: Fashion-MNIST, conv3 -> conv3, IPC x seeds x (method, label mode).

Each (ipc, seed, method) is distilled once; every row trains a student and reports top-1 on the real test
set. Results accumulate in results/table_<dataset>.json (re-running skips what is done) and the markdown
table (mean +- std over seeds) is printed and written to results/table_<dataset>.md.

    python scripts/results_table.py --teacher runs/teachers/fashion-mnist_conv3_e3_s0/teacher.pt --ipc 10 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from nrrdd import pipeline
from nrrdd.config import RunConfig
from nrrdd.io import atomic_write_json, atomic_write_text

ROWS = ["random:online", "rded:online", "nrrdd:online", "nrrdd:dbr", "nrrdd:hard"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="+", default=ROWS)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--out", default="runs/table")
    args = ap.parse_args()
    base = RunConfig(teacher=args.teacher, epochs=args.epochs)
    path = Path("results") / f"table_{base.dataset}.json"
    data = json.loads(path.read_text()) if path.exists() else {"teacher": args.teacher, "runs": []}
    done = {(r["ipc"], r["seed"], r["method"], r["labels"], r["epochs"]) for r in data["runs"]}
    ctx = pipeline.make_context(base)
    for ipc in args.ipc:
        for seed in args.seeds:
            for row in args.rows:
                method, labels = row.split(":")
                if (ipc, seed, method, labels, args.epochs) in done:
                    continue
                syn = Path(args.out) / f"ipc{ipc}_s{seed}_{method}"
                cfg = base.replace(ipc=ipc, seed=seed, method=method, labels=labels, out=str(syn))
                times = {}
                if not (syn / "synthetic.safetensors").exists():
                    times.update(pipeline.run_distill(cfg, ctx=ctx)["timings"])
                if labels in ("dbr", "soft") and not (syn / f"labels_{labels}.safetensors").exists():
                    times.update(pipeline.run_relabel(cfg, syn, labels, ctx=ctx)["timings"])
                t0 = time.perf_counter()
                r = pipeline.run_evaluate(cfg, syn, labels, ctx=ctx)
                data["runs"].append({"ipc": ipc, "seed": seed, "method": method, "labels": labels,
                                     "epochs": args.epochs, "test_top1": r["test_top1"], "val_top1": r["val_top1"],
                                     "label_bytes": r["label_bytes"], "eval_s": time.perf_counter() - t0, **times})
                atomic_write_json(path, data)
                print(f"ipc {ipc} seed {seed} {method:<6} {labels:<6} test top-1 {r['test_top1']:.2f}%", flush=True)
    md = markdown(data["runs"])
    atomic_write_text(path.with_suffix(".md"), md)
    print(md)


def markdown(runs: list[dict]) -> str:
    ipcs = sorted({r["ipc"] for r in runs})
    rows = [row for row in ROWS if any(f"{r['method']}:{r['labels']}" == row for r in runs)]
    lines = ["| method | labels | " + " | ".join(f"IPC {i}" for i in ipcs) + " |",
             "|---|---|" + "---|" * len(ipcs)]
    for row in rows:
        method, labels = row.split(":")
        cells = []
        for i in ipcs:
            v = [r["test_top1"] for r in runs if (r["ipc"], r["method"], r["labels"]) == (i, method, labels)]
            if not v:
                cells.append("-")
            elif len(v) == 1:
                cells.append(f"{v[0]:.1f} (1 seed)")
            else:
                cells.append(f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f} ({len(v)} seeds)")
        lines.append(f"| {method} | {labels} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
