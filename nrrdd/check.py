"""``nrrdd check``: find what would make a run fail or mislead, before the expensive work.

Checks, in order (a failed check that later ones depend on stops the list):

1. the dataset loads: files present, folder layout (class folders, no empty class, test classes = train
   classes);
2. image files (image folders): every training file screened as the loaders screen it; unreadable files
   are counted per class and listed (a run would skip them);
3. images per class against ``mipc`` and against the ``ipc * factor**2`` patches discovery needs;
4. the teacher: checkpoint loads with ``weights_only``, class count, class order and architecture against
   its ``teacher.json``;
5. the teacher's top-1 on a validation subset: near chance means a wrong checkpoint, wrong class order or
   wrong normalisation; more than ``TOP1_GAP`` points below the test top-1 its teacher.json records is a
   warning naming normalisation (``--mean``/``--std``) and resizing as likely causes;
6. the output folder: an existing synthetic set there would be refused, not overwritten;
7. resources: the host memory distillation's process 0 needs at its peak (the synthetic set and its masks,
   plus the allocator's slack, as ``bench_stages``' ``set_memory`` measured it) against what the machine
   has, and the disk the run writes (refinement pieces, synthetic set, PNGs, label files and their chunks)
   against the free space at ``--out``; on CUDA, whether relabelling and training will hold the set on the
   device or stream it from host memory (``nrrdd/feed.py``).

Each finding is an ``error`` (the run would fail or be meaningless) or a ``warning`` (it would run, with a
caveat). ``nrrdd check`` prints them and exits 1 when there is an error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RunConfig


@dataclass
class Finding:
    level: str          # "ok" | "warning" | "error"
    check: str
    message: str


def run_check(cfg: RunConfig, val_images: int = 500) -> list[Finding]:
    from .data import DatasetLayoutError, DatasetNotFound, FolderImageSet, check_image_file
    from .pipeline import _SPLITS_CACHE, _data_key, _runtime, load_teacher, make_context
    from .train import evaluate

    out: list[Finding] = []

    def add(level, check, message):
        out.append(Finding(level, check, message))

    # 1. dataset (read from disk now, not from this process's cache of loaded datasets)
    _SPLITS_CACHE.pop(_data_key(cfg), None)
    try:
        ctx = make_context(cfg)
    except (DatasetNotFound, DatasetLayoutError, ValueError, RuntimeError) as e:
        add("error", "dataset", str(e))
        return out
    sp = ctx.splits
    add("ok", "dataset", f"{cfg.dataset}: {len(sp.classes)} classes, {len(sp.train)} training, {len(sp.val)} "
                         f"validation and {len(sp.test)} test images, {sp.channels}x{sp.size}x{sp.size}"
                         + (f" (input size {sp.size_rule})" if sp.size_rule else ""))

    # 2. files
    base, base_idx = sp.train.locate(torch.arange(len(sp.train)))
    usable = torch.ones(len(sp.train), dtype=torch.bool)
    if isinstance(base, FolderImageSet):
        bad = []
        for k, i in enumerate(base_idx.tolist()):
            reason = check_image_file(base.samples[i][0])
            if reason is not None:
                usable[k] = False
                bad.append(f"{base.samples[i][0]}: {reason}")
        for path, reason in base.ignored:
            bad.append(f"{path}: {reason}")
        if bad:
            add("warning", "files", f"{len(bad)} files would be skipped, e.g. {bad[:3]}")
        else:
            add("ok", "files", f"all {len(base_idx)} training files pass the screening")

    # 3. images per class
    factor = cfg.resolved_factor(sp.size)
    need = cfg.ipc * factor * factor if cfg.method != "sre2l" else 0
    counts = torch.bincount(sp.train.labels[usable], minlength=len(sp.classes))
    short = [(sp.classes[c], int(n)) for c, n in enumerate(counts.tolist()) if n < need]
    few = [(sp.classes[c], int(n)) for c, n in enumerate(counts.tolist()) if need <= n < cfg.mipc]
    if short:
        add("error", "images per class", f"{len(short)} classes have fewer usable images than the {need} patches "
                                         f"discovery needs (ipc {cfg.ipc} x factor {factor}^2): {short[:5]}")
    if few:
        add("warning", "images per class", f"{len(few)} classes have fewer than mipc={cfg.mipc} images (all of "
                                           f"them are then candidates): {few[:5]}")
    if not short and not few:
        add("ok", "images per class", f"every class has >= mipc={cfg.mipc} usable images "
                                      f"(min {int(counts.min())})")

    # 4. teacher
    if not cfg.teacher:
        add("warning" if cfg.method == "random" else "error", "teacher", "no --teacher given")
        teacher = None
    else:
        try:
            teacher = load_teacher(ctx)
            add("ok", "teacher", f"{cfg.teacher} loads as --arch {cfg.arch} with {len(sp.classes)} classes")
        except Exception as e:  # noqa: BLE001 - every load failure is a finding
            add("error", "teacher", f"{type(e).__name__}: {e}")
            teacher = None

    # 5. teacher accuracy on a validation subset
    if teacher is not None and len(sp.val):
        n = min(val_images, len(sp.val))
        rt = _runtime(ctx, show_progress=False)
        acc = evaluate(teacher, sp.val.subset(torch.arange(n)), sp.normalizer, rt, batch_size=cfg.eval_batch_size)
        chance = 100.0 / len(sp.classes)
        if acc < 2 * chance:
            add("error", "teacher accuracy", f"top-1 {acc:.1f}% on {n} validation images, near chance "
                                             f"({chance:.1f}%): wrong checkpoint, class order or normalisation?")
        else:
            add("ok", "teacher accuracy", f"top-1 {acc:.1f}% on {n} validation images (chance {chance:.1f}%)")
            recorded = _recorded_top1(cfg.teacher)
            if recorded is not None and acc < recorded - TOP1_GAP:
                add("warning", "teacher accuracy",
                    f"top-1 {acc:.1f}% here, {recorded:.1f}% recorded in its teacher.json: the images may be "
                    f"normalised otherwise than the teacher was trained with (now mean "
                    f"{[round(v, 4) for v in sp.normalizer.mean.flatten().tolist()]}, std "
                    f"{[round(v, 4) for v in sp.normalizer.std.flatten().tolist()]}; set --mean/--std), or "
                    "resized otherwise (--input-size)")

    # 6. output folder
    from .rundir import RunDir

    if RunDir(cfg.out).synthetic.exists():
        add("warning", "output", f"{cfg.out} already holds a synthetic set: distill would refuse to overwrite it "
                                 "(choose another --out)")
    # 7. memory and disk for a set of this size
    for level, message in resource_findings(cfg, n_images=cfg.ipc * len(sp.classes), channels=sp.channels,
                                            size=sp.size, num_classes=len(sp.classes), device=ctx.device):
        add(level, "resources", message)
    return out


# Peak host memory of distillation's process 0 above its start: the images and their [N, 1, H, W] masks, and the
# allocator's slack of up to 0.5 x the images (set_memory measured 1.35-1.81 x the images for RGB, where the
# masks are 0.33 of them)
SET_SLACK = 0.5


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def host_memory() -> tuple[int, int] | None:
    """(available, total) bytes of this machine's memory, from /proc/meminfo; None where it cannot be read."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(info["MemAvailable"].split()[0]) * 1024, int(info["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def disk_free(path: str | Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    import shutil

    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def resource_findings(cfg: RunConfig, *, n_images: int, channels: int, size: int, num_classes: int,
                      device: torch.device) -> list[tuple[str, str]]:
    """(level, message) for the memory and disk a run of ``cfg`` needs, for ``n_images`` synthetic images of
    ``channels`` x ``size`` x ``size``."""
    images = n_images * channels * size * size * 4
    masks = n_images * size * size * 4
    found = []
    peak = (1 + SET_SLACK) * images + masks
    mem = host_memory()
    what = f"distillation holds the set ({n_images} images, {_gb(images)} in fp32) and its masks in memory: ~{_gb(peak)}"
    if mem is None:
        found.append(("ok", f"{what} (this machine's memory could not be read)"))
    elif peak > mem[1]:
        found.append(("error", f"{what}, more than this machine has ({_gb(mem[1])}): lower --ipc or use a "
                               "machine with more memory"))
    elif peak > mem[0]:
        found.append(("warning", f"{what}, more than is available now ({_gb(mem[0])} of {_gb(mem[1])})"))
    else:
        found.append(("ok", f"{what}; {_gb(mem[0])} available"))
    # on disk at the peak: the refinement pieces (images and masks) while the set is written, the set
    # (safetensors, images + masks), its PNGs (at most 1 byte per value), and the label file with its chunks
    refined = cfg.resolved_refine()
    disk = (images + masks) * (2 if refined else 1) + images / 4
    label_width = {"soft": num_classes, "dbr": 2}.get(cfg.labels, 0)
    labels = cfg.epochs * n_images * label_width * 2
    disk += 2 * labels
    free = disk_free(cfg.out)
    detail = (f"the run writes up to ~{_gb(disk)} to {cfg.out} (set and PNGs" + (", refinement pieces" if refined else "")
              + (f", {cfg.labels} labels of {cfg.epochs} epochs {_gb(labels)} and their chunks" if labels else "") + ")")
    if disk > free:
        found.append(("error", f"{detail}, but {_gb(free)} is free there"))
    else:
        found.append(("ok", f"{detail}; {_gb(free)} free"))
    if device.type == "cuda":
        from .feed import RESIDENT_FRACTION, set_on_device

        on = set_on_device(images, device, cfg.set_on_device)
        free_dev = torch.cuda.mem_get_info(device)[0]
        found.append(("ok", f"relabelling and training will {'copy the set to' if on else 'stream the set to'} "
                            f"{device} ({_gb(images)}; {_gb(free_dev)} free there, the set goes whole when it "
                            f"takes at most {RESIDENT_FRACTION:.0%}; --set-on-device decides)"))
    return found


TOP1_GAP = 10.0      # points below the teacher's recorded test top-1 that `check` warns about


def _recorded_top1(teacher: str | None) -> float | None:
    from .rundir import teacher_meta_path

    meta = teacher_meta_path(teacher) if teacher else None
    if meta is None or not meta.exists():
        return None
    value = json.loads(meta.read_text()).get("test_top1")
    return float(value) if value is not None else None


def format_findings(findings: list[Finding]) -> str:
    mark = {"ok": "ok     ", "warning": "WARNING", "error": "ERROR  "}
    lines = [f"{mark[f.level]} {f.check:<18} {f.message}" for f in findings]
    n_err = sum(f.level == "error" for f in findings)
    n_warn = sum(f.level == "warning" for f in findings)
    lines.append(f"\n{n_err} error(s), {n_warn} warning(s)")
    return "\n".join(lines)
