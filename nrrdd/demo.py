"""``nrrdd demo``: Fashion-MNIST, conv3 teacher (trained once, then reused), IPC 10.

Rows: random / RDED / NRR-DD with online soft labels, NRR-DD with DBR and with hard labels. Prints one
table (method, label mode, student top-1, label bytes, time per stage), writes ``results.json`` and a PNG
sheet of NRR-DD images per class beside their CAM masks.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .config import RunConfig
from .io import atomic_write_json, load_safetensors
from . import pipeline

DEFAULT_ROWS = ["random:online", "rded:online", "nrrdd:online", "nrrdd:dbr", "nrrdd:hard"]

# The demo's own settings, applied unless the user gave the flag.
DEMO = dict(dataset="fashion-mnist", arch="conv3", student="conv3", ipc=10, teacher_epochs=5)
QUICK = dict(teacher_epochs=1, mipc=20, nrr_iterations=5, epochs=5, val_per_class=50)


def _teacher_dir(cfg: RunConfig) -> Path:
    return Path("runs") / "teachers" / f"{cfg.dataset}_{cfg.arch}_e{cfg.teacher_epochs}_s{cfg.seed}"


def ensure_teacher(cfg: RunConfig) -> tuple[RunConfig, dict]:
    """Reuse the teacher trained by an earlier demo on the same data split, else train it.

    A cached teacher is reused only if it was trained on exactly this split (same dataset fingerprint),
    so it has never seen the validation images of this run."""
    fingerprint = pipeline.make_context(cfg).splits.fingerprint()
    tdir = _teacher_dir(cfg)
    meta_path = pipeline.teacher_meta_path(tdir / "teacher.pt")
    if meta_path.exists() and json.loads(meta_path.read_text()).get("dataset_fingerprint") != fingerprint:
        tdir = tdir.with_name(f"{tdir.name}_{fingerprint[:10]}")
    ckpt = tdir / "teacher.pt"
    if ckpt.exists() and pipeline.teacher_meta_path(ckpt).exists():
        meta = json.loads(pipeline.teacher_meta_path(ckpt).read_text())
        print(f"reusing teacher {ckpt} (test top-1 {meta['test_top1']:.2f}%)")
        return cfg.replace(teacher=str(ckpt)), {"test_top1": meta["test_top1"], "reused": True}
    print(f"training teacher {cfg.arch} on {cfg.dataset} ({cfg.teacher_epochs} epochs) -> {ckpt}")
    res = pipeline.run_train_teacher(cfg.replace(out=str(tdir)))
    print(f"teacher test top-1 {res['test_top1']:.2f}% in {res['timings']['train']:.0f} s")
    return cfg.replace(teacher=str(ckpt)), {"test_top1": res["test_top1"], "reused": False,
                                            "train_s": res["timings"]["train"]}


def run_demo(cfg: RunConfig, *, quick: bool = False, rows: list[str] | None = None,
             explicit: set[str] = frozenset()) -> list[dict]:
    t0 = time.perf_counter()
    settings = dict(DEMO, **(QUICK if quick else {}))
    cfg = cfg.replace(**{k: v for k, v in settings.items() if k not in explicit})
    if "out" not in explicit:
        cfg = cfg.replace(out=str(Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")))
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"demo output folder {out} is not empty; choose another --out")
    cfg, teacher = ensure_teacher(cfg)
    rows = rows or DEFAULT_ROWS
    results, distilled = [], {}
    ctx = pipeline.make_context(cfg)
    for row in rows:
        method, labels = row.split(":")
        mcfg = cfg.replace(method=method, labels=labels, out=str(out / method))
        if method not in distilled:
            print(f"distilling with {method} ...")
            distilled[method] = pipeline.run_distill(mcfg, ctx=ctx)["timings"]
        relabel_s = 0.0
        if labels in ("dbr", "soft"):
            relabel_s = pipeline.run_relabel(mcfg, mcfg.out, labels, ctx=ctx)["timings"]["relabel"]
        print(f"training a student on {method} with {labels} labels ...")
        r = pipeline.run_evaluate(mcfg, mcfg.out, labels, ctx=ctx)
        dt = distilled[method]
        results.append({"method": method, "labels": labels, "ipc": cfg.ipc, "seed": cfg.seed,
                        "test_top1": r["test_top1"], "val_top1": r["val_top1"], "label_bytes": r["label_bytes"],
                        "discover_s": dt.get("discover", 0.0), "refine_s": dt.get("refine", 0.0),
                        "relabel_s": relabel_s, "train_s": r["timings"]["train"]})
    table = format_table(results)
    print()
    print(table)
    total = time.perf_counter() - t0
    print(f"\nteacher test top-1 {teacher['test_top1']:.2f}%; total {total / 60:.1f} min; outputs in {out}")
    atomic_write_json(out / "results.json", {"config": cfg.to_dict(), "teacher": teacher, "rows": results,
                                             "total_s": total, "quick": quick})
    if "nrrdd" in distilled:
        sheet(out / "nrrdd", out / "sheet_nrrdd.png", ctx.splits.classes)
        print(f"sheet of NRR-DD images and their CAM masks: {out / 'sheet_nrrdd.png'}")
    return results


def format_table(rows: list[dict]) -> str:
    head = f"{'method':<8} {'labels':<7} {'top-1 %':>8} {'label bytes':>12} {'discover s':>10} {'refine s':>9} " \
           f"{'relabel s':>9} {'train s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<8} {r['labels']:<7} {r['test_top1']:>8.2f} {r['label_bytes']:>12,d} "
                     f"{r['discover_s']:>10.1f} {r['refine_s']:>9.1f} {r['relabel_s']:>9.1f} {r['train_s']:>8.1f}")
    return "\n".join(lines)


def sheet(syn_dir: Path, path: Path, classes: list[str], per_class: int = 4) -> Path:
    """One row per class: ``per_class`` synthetic images, each followed by its NRR mask (white = free to
    change, black = critical, kept exactly)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, meta = load_safetensors(syn_dir / "synthetic.safetensors")
    mean, std = json.loads(meta["mean"]), json.loads(meta["std"])
    images, labels, masks = t["images"], t["labels"], t["masks"]
    n_cls = len(classes)
    fig, axes = plt.subplots(n_cls, 2 * per_class, figsize=(2 * per_class * 1.1, n_cls * 1.1), squeeze=False)
    for c in range(n_cls):
        idx = (labels == c).nonzero().flatten()[:per_class].tolist()
        for j in range(per_class):
            ax_i, ax_m = axes[c, 2 * j], axes[c, 2 * j + 1]
            for ax in (ax_i, ax_m):
                ax.set_xticks([])
                ax.set_yticks([])
            if j >= len(idx):
                continue
            img = images[idx[j]]
            for ch in range(img.shape[0]):
                img[ch] = img[ch] * std[ch] + mean[ch]
            img = img.clamp(0, 1).permute(1, 2, 0).numpy()
            ax_i.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax_m.imshow(masks[idx[j], 0].numpy(), cmap="gray", vmin=0, vmax=max(1e-6, float(masks.max())))
        axes[c, 0].set_ylabel(classes[c], rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("NRR-DD synthetic images | NRR mask M = max(0, eps - CAM)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
