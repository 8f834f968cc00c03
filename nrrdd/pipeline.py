"""The stages as runs with inputs and outputs on disk: train-teacher, distill, relabel, evaluate.

distill per method: ``nrrdd`` CIDD discovery + masked refinement (NRR); ``rded`` RDED's discovery (refinement
off unless ``--refine``); ``random`` real images; ``sre2l`` Gaussian noise + unmasked refinement with SRe2L's
jitter and flip (``sre2l_*`` fields). Teachers and students may be any model ``nrrdd.models.build_model``
accepts, your own ``package.module:ClassName`` included.

Each writes its config and a manifest (versions, seed, teacher hash, dataset fingerprint) next to its
outputs and refuses to overwrite existing outputs.

Output layout of a distill run (``--out DIR``)::

    DIR/syn/00000/class00000_id00000.png   RDED's layout, lossless PNG (pixel values)
    DIR/synthetic.safetensors              images (normalised float32), labels, masks
    DIR/config.json, DIR/manifest_distill.json
    DIR/labels_dbr.safetensors             after `nrrdd relabel --labels dbr`
    DIR/eval_<labels>.json                 after `nrrdd evaluate`
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cam import require_cam
from .config import NOT_DISTILL, NOT_TEACHER, RUNTIME_FIELDS, RunConfig
from .data import Splits, describe_class_mismatch, load_splits
from .discover import DiscoverSettings, assemble, select
from .dist import SINGLE, Dist, setup as setup_dist
from .io import (ChunkStore, atomic_torch_save, atomic_write_json, ensure_writable, file_sha256, refuse_overwrite,
                 safetensors_header, tensor_sha256)
from .models import build_model, load_model, parse_model_kwargs
from .refine import RefineSettings, refine, rows_of_rank
from .relabel import RelabelSettings, relabel
from .rundir import (DiscoveryStore, LabelParts, RunDir, TrainCheckpoint, load_labels, read_synthetic,
                     teacher_meta_path, unfinished_set, write_manifest, write_synthetic)
from .runtime import Runtime, resolve_device, resolve_precision, set_threads
from .train import StudentSettings, TeacherSettings, evaluate, train_student, train_teacher


@dataclass
class Context:
    cfg: RunConfig
    device: torch.device
    precision: str
    splits: Splits
    timings: dict[str, float] = field(default_factory=dict)
    dist: Dist = SINGLE             # this process's rank among those torchrun started (nrrdd.dist)

    @property
    def factor(self) -> int:
        return self.cfg.resolved_factor(self.splits.size)


_SPLITS_CACHE: dict[tuple, Splits] = {}


def _data_key(cfg: RunConfig) -> tuple:
    return (cfg.dataset, cfg.data_root, cfg.input_size, cfg.val_per_class, cfg.test_root, cfg.train_limit,
            cfg.test_limit, cfg.test_per_class, cfg.mean, cfg.std)


def make_context(cfg: RunConfig, like: Context | None = None) -> Context:
    """A run's context. ``like``: reuse its device and loaded data (several runs in one process)."""
    if like is not None:
        if _data_key(like.cfg) != _data_key(cfg) or like.cfg.device != cfg.device:
            raise ValueError("a shared context must have the same data and device settings as the run")
        return Context(cfg, like.device, like.precision, like.splits, dist=like.dist)
    set_threads(cfg.threads)
    dist, device = setup_dist(resolve_device(cfg.device))
    key = _data_key(cfg)
    if key not in _SPLITS_CACHE:
        _SPLITS_CACHE[key] = load_splits(cfg.dataset, cfg.data_root, input_size=cfg.input_size,
                                         val_per_class=cfg.val_per_class, test_root=cfg.test_root,
                                         train_limit=cfg.train_limit, test_limit=cfg.test_limit,
                                         test_per_class=cfg.test_per_class, mean=cfg.mean, std=cfg.std)
    return Context(cfg, device, resolve_precision(cfg.precision, device), _SPLITS_CACHE[key], dist=dist)


def _provenance(ctx: Context) -> dict:
    """What every manifest records besides the config: dataset fingerprint and teacher file hash."""
    facts = {"dataset_fingerprint": ctx.splits.fingerprint(), "device": str(ctx.device), "precision": ctx.precision,
             "processes": ctx.dist.world}
    if ctx.splits.size_rule:
        facts["input_size_rule"] = ctx.splits.size_rule
    facts["normalisation"] = {"mean": ctx.splits.normalizer.mean.flatten().tolist(),
                              "std": ctx.splits.normalizer.std.flatten().tolist()}
    if ctx.cfg.teacher and Path(ctx.cfg.teacher).exists():
        facts["teacher_sha256"] = file_sha256(ctx.cfg.teacher)
    return facts


def _runtime(ctx: Context, show_progress: bool = True) -> Runtime:
    """How this run's stages run: its device, precision, processes and loader."""
    return Runtime(device=ctx.device, precision=ctx.precision, dist=ctx.dist, loader=ctx.cfg.loader,
                   workers=ctx.cfg.loader_workers, show_progress=show_progress)


def _evaluate(ctx: Context, model: torch.nn.Module, data, skipped: list) -> float:
    """``model``'s top-1 on ``data`` (the test or validation images) in this run's way."""
    return evaluate(model, data, ctx.splits.normalizer, _runtime(ctx, show_progress=False),
                    batch_size=ctx.cfg.eval_batch_size, skipped=skipped)


def _identity(ctx: Context, ignore: frozenset[str] = RUNTIME_FIELDS, **inputs) -> dict:
    """What a resumed stage must share with the killed one: its settings (but ``ignore``), data and teacher
    (and ``inputs``)."""
    ident = {k: v for k, v in ctx.cfg.to_dict().items() if k not in ignore}
    # the kind of device, not its index or the number of processes: a run may resume on other GPUs, or
    # with another number of them (every piece of work is the same whatever the number of processes)
    facts = {k: v for k, v in _provenance(ctx).items() if k != "processes"}
    facts["device"] = ctx.device.type
    return {**ident, **facts, **inputs}


def _refuse_leftover(cfg: RunConfig, leftover: bool, what: str) -> None:
    """A killed run's pieces are continued with --resume, never silently reused or deleted."""
    if leftover and not cfg.resume:
        raise FileExistsError(f"{what}: pass --resume to continue it (or remove them to start over)")


def _timed(ctx: Context, name: str):
    class T:
        def __enter__(self):
            self.t = time.perf_counter()

        def __exit__(self, *a):
            ctx.timings[name] = ctx.timings.get(name, 0.0) + time.perf_counter() - self.t

    return T()


# --- teacher -------------------------------------------------------------------------------------------
def run_train_teacher(cfg: RunConfig, show_progress: bool = True) -> dict:
    ctx = make_context(cfg)
    if ctx.dist.active:
        raise ValueError("train-teacher runs in one process: start it without torchrun")
    out = Path(cfg.out)
    run = RunDir(out)
    ckpt = run.teacher
    refuse_overwrite(ckpt, "a teacher checkpoint")
    ensure_writable(out)
    sp = ctx.splits
    torch.manual_seed(cfg.seed)                     # the initial weights: the same teacher from the same command
    model = build_model(cfg.arch, len(sp.classes), sp.channels, sp.size, cfg.arch_kwargs)
    skipped: list = []
    # a teacher epoch is a pass over the whole training set: its state is saved after each
    state = TrainCheckpoint(run.teacher_state, _identity(ctx, NOT_TEACHER), every=1)
    _refuse_leftover(cfg, state.path.exists(), f"{state.path} holds the state of an interrupted teacher training")
    with _timed(ctx, "train"):
        settings = TeacherSettings.of(cfg, device_type=ctx.device.type, n_images=len(sp.train))
        train_teacher(model, sp.train, sp.normalizer, settings, _runtime(ctx, show_progress), skipped=skipped,
                      checkpoint=state)
    with _timed(ctx, "evaluate"):
        test = _evaluate(ctx, model, sp.test, skipped)
        val = _evaluate(ctx, model, sp.val, skipped) if len(sp.val) else None
    atomic_torch_save(ckpt, {"model": {k: v.cpu() for k, v in model.state_dict().items()}})
    meta = {"arch": cfg.arch, "arch_kwargs": parse_model_kwargs(cfg.arch_kwargs), "dataset": cfg.dataset,
            "classes": sp.classes, "channels": sp.channels, "input_size": sp.size, "test_top1": test, "val_top1": val,
            "epochs": cfg.teacher_epochs, "dataset_fingerprint": sp.fingerprint(), "sha256": file_sha256(ckpt)}
    atomic_write_json(teacher_meta_path(ckpt), meta)
    cfg.replace(teacher=str(ckpt)).save(run.teacher_config)
    state.remove()                                  # the teacher is written: the training state is spent
    write_manifest(out, stage="train_teacher", config=cfg.to_dict(), **_provenance(ctx),
                   teacher_sha256=meta["sha256"], timings=ctx.timings, results={"test_top1": test, "val_top1": val},
                   skipped_files=[{"file": p, "reason": r} for p, r in skipped])
    return {"checkpoint": str(ckpt), **meta, "timings": dict(ctx.timings)}


def load_teacher(ctx: Context) -> torch.nn.Module:
    cfg, sp = ctx.cfg, ctx.splits
    if not cfg.teacher:
        raise ValueError("no teacher given: pass --teacher PATH (train one with `nrrdd train-teacher`)")
    meta_path = teacher_meta_path(cfg.teacher)
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("classes") and meta["classes"] != sp.classes:
            raise ValueError(f"the classes of {cfg.dataset} {cfg.data_root or ''} do not match those teacher "
                             f"{cfg.teacher} was trained on: {describe_class_mismatch(meta['classes'], sp.classes)}")
        if meta.get("arch") and meta["arch"] != cfg.arch:
            raise ValueError(f"teacher {cfg.teacher} is a {meta['arch']!r}, but --arch is {cfg.arch!r}")
        if "arch_kwargs" in meta and meta["arch_kwargs"] != parse_model_kwargs(cfg.arch_kwargs):
            raise ValueError(f"teacher {cfg.teacher} was built with --arch-kwargs {json.dumps(meta['arch_kwargs'])}, "
                             f"but --arch-kwargs is {cfg.arch_kwargs}")
        if meta.get("dataset_fingerprint") not in (None, sp.fingerprint()):
            warnings.warn(f"teacher {cfg.teacher} was trained on another split of the data (different "
                          "--val-per-class, --train-limit or files): it may have seen this run's validation images")
    model = load_model(cfg.arch, cfg.teacher, len(sp.classes), sp.channels, sp.size, cfg.arch_kwargs)
    model.to(ctx.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _ignored(sp: Splits) -> list[dict]:
    """Files in an image folder's class folders that are not images by name (left out when listing)."""
    base = sp.train.locate([])[0]
    return [{"file": p, "reason": r} for p, r in getattr(base, "ignored", [])]


# --- distill -------------------------------------------------------------------------------------------
METHODS = ("nrrdd", "rded", "random", "sre2l")


def run_distill(cfg: RunConfig, show_progress: bool = True, ctx: Context | None = None) -> dict:
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    sre2l = cfg.method == "sre2l"
    if sre2l and not cfg.resolved_refine():
        raise ValueError("method sre2l synthesises its images by refinement from noise: --no-refine would "
                         "leave pure noise")
    ctx = make_context(cfg, like=ctx)
    out = Path(cfg.out)
    run = RunDir(out)
    if not _reopen_unfinished(cfg, ctx, out):         # else write_synthetic replaces the set, atomically
        refuse_overwrite(run.synthetic, "a synthetic set")
        refuse_overwrite(run.png, "a folder of synthetic images")
    sp = ctx.splits
    teacher = load_teacher(ctx) if (cfg.method != "random" or cfg.resolved_refine()) else None
    needs_cam = cfg.method == "nrrdd" or (cfg.resolved_refine() and not sre2l)
    if needs_cam:
        try:
            require_cam(teacher, cfg.cam)
        except ValueError as e:
            raise ValueError(f"teacher --arch {cfg.arch!r} cannot give the CAM that method {cfg.method!r} needs "
                             f"({'discovery and ' if cfg.method == 'nrrdd' else ''}refinement mask): {e}. "
                             "Use a convolutional teacher, or --method rded / sre2l (no CAM)") from e
    ensure_writable(out)                            # checks done; before the work
    refined = cfg.resolved_refine()
    found = DiscoveryStore(run.discover_parts, _identity(ctx, NOT_DISTILL))
    _refuse_leftover(cfg, found.exists() or ChunkStore(run.refine_parts, {}).exists(),
                     f"{out}/discover.parts and refine.parts hold the pieces of an interrupted distillation")
    ctx.dist.barrier()                              # every rank has looked for leftovers before any is written
    d = found.load() if cfg.resume else None
    resumed_selection = d is not None
    settings, rt = DiscoverSettings.of(cfg, factor=ctx.factor, size=sp.size), _runtime(ctx, show_progress)
    if d is None:
        with _timed(ctx, "discover"):
            d = select(teacher, sp.train, sp.normalizer, settings, rt)
        if refined and ctx.dist.is_main and d.images is None:   # a resumed run starts from here
            found.save(d)
    # The images this process needs: all in one process; under torchrun those of its refinement batches
    # (rank 0 writes the set: without refinement it needs all of them, the others none).
    rows = None
    if ctx.dist.active:
        rows = (rows_of_rank(d.labels, cfg.refine_batch_size, ctx.dist) if refined
                else torch.arange(len(d.labels)) if ctx.dist.is_main else torch.arange(0))
    with _timed(ctx, "discover"):                   # stage 1's second half: the chosen crops' pixels
        d = assemble(d, sp.train, sp.normalizer, settings, rt, rows=rows)
    if d.rows is None:
        images = sp.normalizer(d.images)
    else:                                           # only the rows written (the others are untouched memory)
        images = torch.empty_like(d.images)
        images[d.rows] = sp.normalizer(d.images[d.rows])
    selection = _selection_sha256(d)
    d.images = None                                 # one copy of the set in memory, not two
    # an unrefined set's masks (all ones); refinement makes its own
    masks = None if refined else torch.ones(images.shape[0], 1, *images.shape[-2:])
    parts = ChunkStore(run.refine_parts, _identity(ctx, NOT_DISTILL, discovered=selection))
    if refined:
        with _timed(ctx, "refine"):
            r = refine(teacher, images, d.labels, (sp.normalizer.lo, sp.normalizer.hi), RefineSettings.of(cfg), rt,
                       parts=parts, out=images)     # in place: the set is held once
        if r is not None:                           # None on ranks other than 0, which write nothing
            images, masks = r.images, r.masks
    if not ctx.dist.is_main:
        return _follower_done(ctx, {"out": str(out), "n_images": int(images.shape[0])})
    with _timed(ctx, "write"):
        write_synthetic(out, images, d.labels, masks, sp.normalizer, sp.classes)
    cfg.save(run.config)
    # the manifest marks the run finished; the pieces go after it, so a kill before it can still --resume
    write_manifest(out, stage="distill", config=cfg.to_dict(), **_provenance(ctx),
                   synthetic_sha256=tensor_sha256(images, d.labels), factor=ctx.factor, refined=refined,
                   timings=dict(ctx.timings), loader=d.loader, skipped_files=d.skipped + _ignored(sp),
                   sources=d.sources, selection_resumed=resumed_selection)
    parts.remove()                                  # the synthetic set is written: its pieces are spent
    found.remove()
    ctx.dist.barrier()                              # the other ranks wait for the files
    return {"out": str(out), "n_images": int(images.shape[0]), "timings": dict(ctx.timings)}


def _reopen_unfinished(cfg: RunConfig, ctx: Context, out: Path) -> bool:
    """Whether this run finishes a distillation killed after it began writing its set but before its manifest
    (written last, before the resume pieces are removed): ``synthetic.safetensors`` there, its PNG folder
    staged (``.syn.partial``) or published (``syn``), no ``manifest_distill.json``. With --resume and the run's
    resume pieces there, the set is made again from them (the same bytes: every refined batch is among them)
    and replaces the file and the folder atomically; the old ones stay until then. Otherwise the run stops
    and says what to do."""
    if not unfinished_set(out):
        return False
    found = DiscoveryStore(RunDir(out).discover_parts, _identity(ctx, NOT_DISTILL))
    pieces = found.exists() or ChunkStore(RunDir(out).refine_parts, {}).exists()
    what = f"{out} holds the synthetic set of a distillation killed before it finished (no manifest_distill.json)"
    if not pieces:
        raise FileExistsError(f"{what}, and no resume pieces to make it again from: remove synthetic.safetensors "
                              "and the syn/ or .syn.partial/ folder, and run again")
    if not cfg.resume:
        raise FileExistsError(f"{what}: pass --resume to make it again from the resume pieces in {out}")
    if found.exists():
        found.load()                                # pieces of other settings: refused here, before any work
    return True


def _selection_sha256(d) -> str:
    """What the synthetic images are cut from (class, image, box, slot of every patch), or the images themselves
    (sre2l's noise): the same on every process, whichever images it holds."""
    if d.sources and "box" in d.sources[0]:
        picks = [(s["class"], s["image"], s["box"], s["slot"]) for s in d.sources]
        return hashlib.sha256(json.dumps(picks).encode()).hexdigest()
    return tensor_sha256(d.images, d.labels)


def _follower_done(ctx: Context, result: dict) -> dict:
    """A rank other than 0 at the end of a stage: wait until rank 0 has written the stage's files."""
    ctx.dist.barrier()
    return {**result, "rank": ctx.dist.rank, "timings": dict(ctx.timings)}


# --- relabel -------------------------------------------------------------------------------------------
def run_relabel(cfg: RunConfig, syn_dir: str | Path, mode: str, show_progress: bool = True,
                ctx: Context | None = None) -> dict:
    ctx = make_context(cfg, like=ctx)
    out = RunDir(syn_dir).labels(mode)
    refuse_overwrite(out, f"a {mode} label file")
    ensure_writable(syn_dir)
    images, labels, _, _ = read_synthetic(syn_dir)
    parts = LabelParts(RunDir(syn_dir).label_parts(mode), _identity(ctx), cfg.checkpoint_every)
    _refuse_leftover(cfg, parts.exists(), f"{parts.folder} holds the labels of an interrupted relabelling")
    teacher = load_teacher(ctx)
    settings = RelabelSettings.of(cfg, mode=mode, factor=ctx.factor, num_classes=len(ctx.splits.classes))
    with _timed(ctx, "relabel"):
        relabel(teacher, images, labels, settings, _runtime(ctx, show_progress), parts=parts)
    if not ctx.dist.is_main:
        return _follower_done(ctx, {"labels_file": str(out)})
    # the labels are on disk in chunks (one chunk at a time was in memory): the file is their concatenation
    parts.write(out, cfg.epochs, mode=mode, seed=cfg.seed, factor=ctx.factor, cutmix_alpha=cfg.cutmix_alpha,
                temperature=settings.temperature, synthetic_sha256=tensor_sha256(images, labels),
                mix_batch=settings.mix_batch)
    parts.remove()                                  # the label file is written: its chunks are spent
    write_manifest(syn_dir, stage=f"relabel_{mode}", config=cfg.to_dict(), **_provenance(ctx), labels_file=str(out),
                   label_bytes=out.stat().st_size, timings=dict(ctx.timings))
    ctx.dist.barrier()
    return {"labels_file": str(out), "label_bytes": out.stat().st_size, "shape": safetensors_header(out)[0]["labels"]["shape"],
            "timings": dict(ctx.timings)}


# --- evaluate ------------------------------------------------------------------------------------------
def run_evaluate(cfg: RunConfig, syn_dir: str | Path, label_mode: str, label_file: str | Path | None = None,
                 show_progress: bool = True, ctx: Context | None = None, validation_only: bool = False) -> dict:
    """Train a student on the synthetic set; report top-1 on the held-out validation images and (unless
    ``validation_only``, as when tuning) on the test split."""
    ctx = make_context(cfg, like=ctx)
    sp = ctx.splits
    tag = eval_tag(cfg, label_mode)
    out = RunDir(syn_dir).evaluation(tag)
    refuse_overwrite(out, "an evaluation result")
    ensure_writable(syn_dir)
    images, labels, _, meta = read_synthetic(syn_dir)
    if meta.get("classes") and json.loads(meta["classes"]) != sp.classes:
        raise ValueError(f"synthetic set {syn_dir} was made for other classes than {cfg.dataset}'s")
    stored, label_bytes = None, 0
    if label_mode in ("soft", "dbr"):
        label_file = Path(label_file or RunDir(syn_dir).labels(label_mode))
        stored, lmeta = load_labels(label_file)
        if lmeta.get("synthetic_sha256") != tensor_sha256(images, labels):
            raise ValueError(f"{label_file} was computed for another synthetic set than {syn_dir}")
        if int(lmeta.get("seed", cfg.seed)) != cfg.seed:
            raise ValueError(f"{label_file} replays the augmentation of seed {lmeta['seed']}, not {cfg.seed}")
        for key, want in (("cutmix_alpha", cfg.cutmix_alpha), ("factor", ctx.factor)):
            if key in lmeta and float(lmeta[key]) != float(want):
                raise ValueError(f"{label_file} replays the augmentation of {key} {lmeta[key]}, but this student "
                                 f"uses {want}: relabel with the same settings")
        mix_batch = cfg.resolved_mix_batch(len(sp.classes))
        if int(lmeta.get("mix_batch", 0)) != mix_batch:
            raise ValueError(f"{label_file} replays CutMix {_mixing(int(lmeta.get('mix_batch', 0)))}, but this "
                             f"student (--recipe {cfg.recipe}) mixes {_mixing(mix_batch)}: relabel with the same "
                             "--recipe and --batch-size")
        if label_mode == "dbr" and "temperature" in lmeta and float(lmeta["temperature"]) != cfg.dbr_temperature:
            raise ValueError(f"{label_file} holds distances at temperature {lmeta['temperature']}, not at "
                             f"--dbr-temperature {cfg.dbr_temperature}: relabel with the same temperature")
        label_bytes = label_file.stat().st_size
    teacher = load_teacher(ctx) if label_mode == "online" else None
    torch.manual_seed(cfg.seed)
    student = build_model(cfg.student, len(sp.classes), sp.channels, sp.size, cfg.student_kwargs)
    sync_bn = cfg.resolved_sync_bn(ctx.device.type, ctx.dist.world)
    # torch.compile of a DDP model with SyncBatchNorm has open PyTorch issues (pytorch#107372): only on request
    compiled = cfg.resolved_compile(ctx.device.type, images.shape[0]) and (cfg.compile is True or not sync_bn)
    ckpt = TrainCheckpoint(RunDir(syn_dir).student_state(tag), _identity(ctx), cfg.checkpoint_every)
    _refuse_leftover(cfg, ckpt.path.exists(), f"{ckpt.path} holds the state of an interrupted evaluation")
    with _timed(ctx, "train"):
        settings = StudentSettings.of(cfg, mode=label_mode, factor=ctx.factor, num_classes=len(sp.classes),
                                      compile=compiled, sync_bn=sync_bn)
        student = train_student(student, images, labels, settings, _runtime(ctx, show_progress), teacher=teacher,
                                stored=stored, checkpoint=ckpt)
    with _timed(ctx, "evaluate"):
        skipped: list = []
        test = None if validation_only else _evaluate(ctx, student, sp.test, skipped)
        val = _evaluate(ctx, student, sp.val, skipped) if len(sp.val) else None
    if not ctx.dist.is_main:
        return _follower_done(ctx, {"labels": label_mode, "test_top1": test, "val_top1": val})
    result = {"labels": label_mode, "student": cfg.student, "seed": cfg.seed, "test_top1": test, "val_top1": val,
              "label_bytes": label_bytes, "n_images": int(images.shape[0]), "epochs": cfg.epochs, "compiled": compiled,
              "timings": dict(ctx.timings)}
    atomic_write_json(out, result)
    ckpt.remove()                                   # the result is written: the training state is spent
    write_manifest(syn_dir, stage=f"evaluate_{tag}", config=cfg.to_dict(), **_provenance(ctx), results=result,
                   skipped_files=[{"file": p, "reason": r} for p, r in skipped])
    ctx.dist.barrier()
    return result


def _mixing(mix_batch: int) -> str:
    return f"per batch of {mix_batch}" if mix_batch else "per sample"


def eval_tag(cfg: RunConfig, label_mode: str) -> str:
    """Names an evaluation of a synthetic set: ``<syn>/eval_<tag>.json``, one per label mode, student and seed."""
    student_tag = re.sub(r"[^\w.-]", ".", cfg.student)        # package.module:Class -> package.module.Class
    tag = f"{label_mode}_{student_tag}_s{cfg.seed}" + (f"_a{cfg.alpha_dbr:g}" if label_mode == "dbr" else "")
    if cfg.recipe != RunConfig.recipe:              # student settings other than the defaults name themselves
        tag += f"_{cfg.recipe}"
    if label_mode == "dbr":
        if cfg.dbr_distance != "l1":
            tag += f"_{cfg.dbr_distance}"
        if cfg.dbr_temperature != 1.0:
            tag += f"_T{cfg.dbr_temperature:g}"
        if cfg.dbr_sce_temperature is not None:
            tag += f"_Tsce{cfg.dbr_sce_temperature:g}"
    return tag
