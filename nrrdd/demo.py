"""``nrrdd demo``: a small ``nrrdd compare`` (Fashion-MNIST, conv3 teacher trained once then reused, IPC 10, seed 0).

Rows (``compare.DEFAULT_ROWS``): random / RDED / NRR-DD with online soft labels, NRR-DD with DBR and with hard
labels. Prints one table (method, label mode, student top-1, label bytes, time per stage), writes
``results.json``, compare's files (``compare.json``, ``compare.md``, ``sheet_compare.png``) and a PNG sheet of
NRR-DD images per class beside their CAM masks (``sheet_nrrdd.png``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from . import pipeline
from .compare import DEFAULT_ROWS, run_compare
from .config import RunConfig
from .io import atomic_write_json
from .rundir import RunDir, teacher_meta_path
from .sheets import mask_sheet

# The demo's own settings, applied unless the user gave the flag. For time on 2 CPU cores without bf16 units: a
# 2-epoch teacher, 100 refinement steps and 100 student epochs (the defaults: 500 and 300).
DEMO = dict(dataset="fashion-mnist", arch="conv3", student="conv3", ipc=10, teacher_epochs=2, nrr_iterations=100,
            epochs=100)
QUICK = dict(teacher_epochs=1, mipc=20, nrr_iterations=5, epochs=5, val_per_class=50)


def _teacher_dir(cfg: RunConfig) -> Path:
    return Path("runs") / "teachers" / f"{cfg.dataset}_{cfg.arch}_e{cfg.teacher_epochs}_s{cfg.seed}"


def ensure_teacher(cfg: RunConfig) -> tuple[RunConfig, dict]:
    """Reuse the teacher trained by an earlier demo on the same data split, else train it.

    A cached teacher is reused only if it was trained on exactly this split (same dataset fingerprint),
    so it has never seen the validation images of this run."""
    fingerprint = pipeline.make_context(cfg).splits.fingerprint()
    tdir = _teacher_dir(cfg)
    meta_path = teacher_meta_path(RunDir(tdir).teacher)
    if meta_path.exists() and json.loads(meta_path.read_text()).get("dataset_fingerprint") != fingerprint:
        tdir = tdir.with_name(f"{tdir.name}_{fingerprint[:10]}")
    ckpt = RunDir(tdir).teacher
    if ckpt.exists() and teacher_meta_path(ckpt).exists():
        meta = json.loads(teacher_meta_path(ckpt).read_text())
        print(f"reusing teacher {ckpt} (test top-1 {meta['test_top1']:.2f}%)")
        return cfg.replace(teacher=str(ckpt)), {"test_top1": meta["test_top1"], "reused": True}
    print(f"training teacher {cfg.arch} on {cfg.dataset} ({cfg.teacher_epochs} epochs) -> {ckpt}")
    res = pipeline.run_train_teacher(cfg.replace(out=str(tdir)))
    print(f"teacher test top-1 {res['test_top1']:.2f}% in {res['timings']['train']:.0f} s")
    return cfg.replace(teacher=str(ckpt)), {"test_top1": res["test_top1"], "reused": False,
                                            "train_s": res["timings"]["train"]}


def run_demo(cfg: RunConfig, *, quick: bool = False, rows: list[str] | None = None,
             explicit: set[str] = frozenset()) -> list[dict]:
    """``nrrdd compare`` at one IPC and seed, with a cached teacher, its own table and the NRR mask sheet."""
    t0 = time.perf_counter()
    settings = dict(DEMO, **(QUICK if quick else {}))
    cfg = cfg.replace(**{k: v for k, v in settings.items() if k not in explicit})
    if "out" not in explicit:
        cfg = cfg.replace(out=str(Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")))
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"demo output folder {out} is not empty; choose another --out")
    own = [f"{k} {v}" for k, v in settings.items() if k not in explicit]
    if own:
        print(f"demo settings (flags override them): {', '.join(own)}")
    cfg, teacher = ensure_teacher(cfg)
    comparison = run_compare(cfg, rows or DEFAULT_ROWS, ipcs=[cfg.ipc], seeds=[cfg.seed])
    results = []
    for cell in comparison.cells:
        r, s = cell.record, cell.stage_s
        results.append({"method": r["method"], "labels": r["labels"], "ipc": r["ipc"], "seed": r["seed"],
                        "test_top1": r["test_top1"], "val_top1": r["val_top1"], "label_bytes": r["label_bytes"],
                        "discover_s": s.get("discover", 0.0), "refine_s": s.get("refine", 0.0),
                        "relabel_s": s.get("relabel", 0.0), "train_s": s["train"]})
    table = format_table(results)
    print()
    print(table)
    total = time.perf_counter() - t0
    print(f"\nteacher test top-1 {teacher['test_top1']:.2f}%; total {total / 60:.1f} min; outputs in {out}")
    atomic_write_json(out / "results.json", {"config": cfg.to_dict(), "teacher": teacher, "rows": results,
                                             "total_s": total, "quick": quick})
    nrrdd = next((c.syn for c in comparison.cells if c.record["method"] == "nrrdd"), None)
    if nrrdd is not None:
        mask_sheet(nrrdd, out / "sheet_nrrdd.png")
        print(f"sheet of NRR-DD images and their CAM masks: {out / 'sheet_nrrdd.png'}")
    return results


def format_table(rows: list[dict]) -> str:
    """One line per row; ``vs random``: its top-1 minus random images' with the same label mode (DD-Ranking's
    improvement over random), where the demo has that row."""
    head = f"{'method':<8} {'labels':<7} {'top-1 %':>8} {'vs random':>9} {'label bytes':>12} {'discover s':>10} " \
           f"{'refine s':>9} {'relabel s':>9} {'train s':>8}"
    lines = [head, "-" * len(head)]
    random = {r["labels"]: r["test_top1"] for r in rows if r["method"] == "random"}
    for r in rows:
        vs = f"{r['test_top1'] - random[r['labels']]:+9.2f}" if r["labels"] in random else f"{'-':>9}"
        lines.append(f"{r['method']:<8} {r['labels']:<7} {r['test_top1']:>8.2f} {vs} {r['label_bytes']:>12,d} "
                     f"{r['discover_s']:>10.1f} {r['refine_s']:>9.1f} {r['relabel_s']:>9.1f} {r['train_s']:>8.1f}")
    return "\n".join(lines)
