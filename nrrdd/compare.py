"""``nrrdd compare``: methods x label modes x IPC x seeds in one command, one table, one image sheet.

Rows are ``method:labels`` (``nrrdd:dbr``, ``rded:online``, ``sre2l:soft`` ...), run at every IPC asked for, or
``method:labels@ipc[,ipc...]`` (``sre2l:online@10``) for a row run only at those IPCs. Each (ipc, seed, method) is
distilled once into ``<out>/ipc{ipc}_s{seed}_{method}``; each row relabels it when its label mode needs stored
labels (dbr, soft), trains a student and reports top-1 on the real test split. Results accumulate in a JSON
file (default ``<out>/compare.json``)::

    {"teacher": "runs/teachers/.../teacher.pt",
     "settings": {every config field the runs share: what :func:`grid_settings` keeps},
     "runs": [{"ipc", "seed", "method", "labels", "epochs", "test_top1", "val_top1", "label_bytes", "eval_s",
               and the seconds of the stages that run did itself: "discover", "refine", "write", "relabel"}]}

Re-running continues it: runs already there (same ipc, seed, method, labels, epochs) are skipped, and a grid
with other settings (another ``--nrr-eps``, ``--recipe`` ...) or another teacher is refused: give it another
file. Beside it the markdown table (``.md``: rows x IPC, mean ± std over seeds) and ``<out>/sheet_compare.png``
(the first IPC and seed: one row of images per method, the same classes in every row).

The same command may run in several processes at once (one per core with ``--threads 1``, or one per GPU): each
run of the grid is claimed by one process (a lock file under ``<out>/locks``), a synthetic set is distilled by
one of them (the others take other runs meanwhile), and the results file and its table are read and written
under a lock. Each process returns when the whole grid is done: at the end it waits for the runs the others
hold, and does a run itself when its holder died.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from . import pipeline, sheets
from .config import NOT_DISTILL, RUNTIME_FIELDS, RunConfig, fields_of
from .io import atomic_write_json, atomic_write_text, file_lock, file_sha256
from .relabel import STORED                # label modes read from a `relabel` file
from .rundir import RunDir, teacher_meta_path

DEFAULT_ROWS = ["random:online", "rded:online", "nrrdd:online", "nrrdd:dbr", "nrrdd:hard"]
LABEL_MODES = ("online", "soft", "dbr", "hard")


@dataclass
class Cell:
    """One (ipc, seed, method:labels) of the grid."""
    record: dict                # its entry in the results file (made now or by an earlier call)
    syn: Path                   # its synthetic set's folder
    stage_s: dict[str, float]   # seconds per stage, as the stage files recorded them: discover, refine, write
                                # (its method's distillation), relabel, train (student training)


@dataclass
class Comparison:
    results: Path               # the JSON file; the markdown table is results.with_suffix(".md")
    data: dict                  # its content: {"teacher": str, "runs": [...]}
    cells: list[Cell]           # the grid's finished runs, in order ipc, seed, row
    markdown: str
    sheet: Path | None


class Row(NamedTuple):
    """One row of the table: a method and a label mode, at the IPCs ``ipcs`` only (None: at every IPC)."""
    method: str
    labels: str
    ipcs: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        return f"{self.method}:{self.labels}"

    def runs_at(self, ipc: int) -> bool:
        return self.ipcs is None or ipc in self.ipcs


def parse_rows(rows: list[str], ipcs: list[int] | None = None) -> list[Row]:
    """``["nrrdd:dbr", "sre2l:online@10", ...]`` -> ``[Row("nrrdd", "dbr"), Row("sre2l", "online", (10,)), ...]``;
    duplicates dropped (a method:labels given twice is an error when the two name different IPCs), order kept.
    ``ipcs``: the IPCs of the grid; a row may only name IPCs among them."""
    parsed: dict[str, Row] = {}
    for row in rows:
        spec, at, where = row.partition("@")
        method, sep, labels = spec.partition(":")
        if not sep or method not in pipeline.METHODS or labels not in LABEL_MODES:
            raise ValueError(f"row {row!r}: expected method:labels with method one of {', '.join(pipeline.METHODS)} "
                             f"and labels one of {', '.join(LABEL_MODES)} (e.g. nrrdd:dbr), optionally @IPC[,IPC] "
                             "(e.g. sre2l:online@10)")
        only = None
        if at:
            try:
                only = tuple(dict.fromkeys(int(i) for i in where.split(",")))
            except ValueError:
                raise ValueError(f"row {row!r}: after @ comes a comma-separated list of IPCs, e.g. @10 or "
                                 "@1,10") from None
            missing = [i for i in only if ipcs is not None and i not in ipcs]
            if missing:
                raise ValueError(f"row {row!r}: IPC {', '.join(map(str, missing))} is not among --ipcs "
                                 f"{' '.join(map(str, ipcs))}")
        r = Row(method, labels, only)
        if r.name in parsed and parsed[r.name] != r:
            raise ValueError(f"row {r.name} is given twice with different IPCs: {row!r}")
        parsed.setdefault(r.name, r)
    if not parsed:
        raise ValueError("no rows to compare: give --rows method:labels ...")
    return list(parsed.values())


def run_compare(base: RunConfig, rows: list[str], ipcs: list[int], seeds: list[int],
                results: str | Path | None = None, *, show_progress: bool = True,
                on_result: Callable[[dict], None] | None = None, sheet: bool = True) -> Comparison:
    """Distil, relabel and evaluate every (ipc, seed, row) not yet in ``results``; write the table and sheet.

    ``base``: everything but ipc, seed, method, labels (taken from the grid); ``base.out`` holds the synthetic
    sets. ``on_result(record)`` is called after each new run is saved."""
    if not ipcs or not seeds:
        raise ValueError("give at least one IPC (--ipcs) and one seed (--seeds)")
    grid_rows = parse_rows(rows, ipcs)
    if not base.teacher:
        raise ValueError("no teacher given: pass --teacher PATH (train one with `nrrdd train-teacher`)")
    if not Path(base.teacher).exists():
        raise FileNotFoundError(f"teacher {base.teacher} not found (train one with `nrrdd train-teacher`)")
    out = Path(base.out)
    path = Path(results) if results else out / "compare.json"
    lock = path.with_suffix(".lock")
    settings = grid_settings(base)
    with file_lock(lock):
        data = load_results(path, base.teacher, settings)
    grid = [(ipc, seed, r.method, r.labels) for ipc in ipcs for seed in seeds for r in grid_rows if r.runs_at(ipc)]
    n_done = sum(_find(data, (ipc, seed, m, lab, base.epochs)) is not None for ipc, seed, m, lab in grid)
    if n_done:
        print(f"resuming: {n_done} of {len(grid)} runs are already in {path}")
    ctx = pipeline.make_context(base)
    teacher_sha = file_sha256(base.teacher)
    several = len(ipcs) * len(seeds) > 1
    names = [r.name for r in grid_rows]
    locks = out / "locks"

    def table(data: dict) -> str:               # written with each new run, under the results file's lock
        return write_table(path, data["runs"], names, base)

    # First pass: the runs no other process holds, and whose set is on disk or free to distil; the rest wait
    # for the second, which waits for their locks: a run whose holder died is done here.
    todo = [(ipc, seed, m, lab) for ipc, seed, m, lab in grid if _find(data, (ipc, seed, m, lab, base.epochs)) is None]
    for wait in (False, True):
        if wait and todo:
            print(f"{len(todo)} runs of this grid are held by other processes: waiting for them (or doing those "
                  "whose process stopped)", flush=True)
        later = []
        for ipc, seed, method, labels in todo:
            syn = out / f"ipc{ipc}_s{seed}_{method}"
            cfg = base.replace(ipc=ipc, seed=seed, method=method, labels=labels, out=str(syn))
            key = (ipc, seed, method, labels, base.epochs)
            claim = locks / f"{syn.name}_{pipeline.eval_tag(cfg, labels)}_e{base.epochs}.lock"
            with file_lock(claim, block=wait) as mine:
                if not mine:                                # another process is running it
                    later.append((ipc, seed, method, labels))
                    continue
                with file_lock(lock):                       # it may have finished it before this claim
                    data = load_results(path, base.teacher, settings)
                if _find(data, key) is not None:
                    continue
                where = f" (IPC {ipc}, seed {seed})" if several else ""
                record = _run(cfg, syn, path, where, teacher_sha, ctx, show_progress,
                              set_lock=locks / f"{syn.name}.lock", wait=wait)
                if record is None:                          # its set is being distilled by another process
                    later.append((ipc, seed, method, labels))
                    continue
                with file_lock(lock):                       # another process may have added runs meanwhile
                    data = load_results(path, base.teacher, settings)
                    data["runs"].append(record)
                    atomic_write_json(path, data)
                    table(data)
            if on_result:
                on_result(record)
        todo = later
    with file_lock(lock):
        data = load_results(path, base.teacher, settings)
        md = table(data)
    cells = []
    for ipc, seed, method, labels in grid:
        record = _find(data, (ipc, seed, method, labels, base.epochs))
        if record is None:          # a run another process gave up on (its error is in its output)
            continue
        syn = out / f"ipc{ipc}_s{seed}_{method}"
        cfg = base.replace(ipc=ipc, seed=seed, method=method, labels=labels, out=str(syn))
        cells.append(Cell(record, syn, stage_seconds(cfg, syn)))
    sheet_path = None
    if sheet:
        sets = {r.method: out / f"ipc{ipcs[0]}_s{seeds[0]}_{r.method}" for r in grid_rows}
        sets = {m: d for m, d in sets.items() if RunDir(d).synthetic.exists()}
        if sets:
            sheet_path = sheets.method_sheet(sets, out / "sheet_compare.png",
                                             title=f"first synthetic image per class, IPC {ipcs[0]}, seed {seeds[0]}")
    return Comparison(path, data, cells, md, sheet_path)


# The fields a results file's runs may differ in (the grid's own, how a run runs) or that are checked apart (the
# teacher, by its path; train-teacher's settings do not enter a compare).
NOT_SHARED = frozenset({"ipc", "seed", "method", "labels", "epochs", "out"}) | RUNTIME_FIELDS | \
    fields_of("teacher", "device")


def grid_settings(cfg: RunConfig) -> dict:
    """What every run of one results file shares: ``cfg`` as config.json holds it, less :data:`NOT_SHARED`."""
    return {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items() if k not in NOT_SHARED}


def load_results(path: Path, teacher: str, settings: dict | None = None) -> dict:
    """The results file to continue, or a new one. Its runs must come from the same teacher and, where
    ``settings`` (:func:`grid_settings`) is given, the same settings; a file written before settings were recorded
    takes these."""
    if not path.exists():
        return {"teacher": teacher, "runs": [], **({"settings": settings} if settings is not None else {})}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise ValueError(f"{path} is not a results file of `nrrdd compare` (expected {{\"teacher\": ..., "
                         "\"runs\": [...]}}): give another --results")
    if Path(str(data.get("teacher"))).resolve() != Path(teacher).resolve():
        raise ValueError(f"{path} holds results of teacher {data.get('teacher')}, not of --teacher {teacher}: "
                         "give another --results file (or the same teacher)")
    if settings is not None:
        saved = data.setdefault("settings", settings)
        diff = [f"{k} {saved[k]!r} (now {v!r})" for k, v in settings.items() if k in saved and saved[k] != v]
        if diff:
            raise ValueError(f"{path} holds runs made with other settings: {'; '.join(diff)}. Give another "
                             "--results file (or the same settings)")
    return data


def _find(data: dict, key: tuple) -> dict | None:
    return next((r for r in data["runs"] if (r["ipc"], r["seed"], r["method"], r["labels"], r["epochs"]) == key),
                None)


def _run(cfg: RunConfig, syn: Path, results: Path, where: str, teacher_sha: str, ctx: pipeline.Context,
         show_progress: bool, set_lock: Path, wait: bool = True) -> dict | None:
    """One row of the grid: distil (unless this (ipc, seed, method) is on disk), relabel if needed, evaluate.

    A compare continues what an interrupted one left: its stages run with ``resume`` on (a leftover piece
    of other settings is still refused). ``set_lock``: held while the set is looked for and distilled; when
    another process holds it, None at once (``wait`` False) or after waiting for it."""
    cfg = cfg.replace(resume=True)
    method, labels = cfg.method, cfg.labels
    times: dict[str, float] = {}
    run = RunDir(syn)
    with file_lock(set_lock, block=wait) as mine:
        if not mine:
            return None
        if run.synthetic.exists() and run.manifest("distill").exists():
            _check_reusable(cfg, syn, teacher_sha)         # a finished distillation (its manifest is written last)
        else:
            print(f"distilling with {method}{where} ...")
            times.update(pipeline.run_distill(cfg, show_progress=show_progress, ctx=ctx)["timings"])
    record = {"ipc": cfg.ipc, "seed": cfg.seed, "method": method, "labels": labels, "epochs": cfg.epochs}
    tag = pipeline.eval_tag(cfg, labels)
    if run.evaluation(tag).exists():
        r = _finished_evaluation(cfg, syn, tag, results)
        return {**record, "test_top1": r["test_top1"], "val_top1": r["val_top1"], "label_bytes": r["label_bytes"],
                "eval_s": sum(r.get("timings", {}).get(k, 0.0) for k in ("train", "evaluate"))}
    if labels in STORED and not run.labels(labels).exists():
        times.update(pipeline.run_relabel(cfg, syn, labels, show_progress=show_progress, ctx=ctx)["timings"])
    print(f"training a student on {method} with {labels} labels{where} ...")
    t0 = time.perf_counter()
    r = pipeline.run_evaluate(cfg, syn, labels, show_progress=show_progress, ctx=ctx)
    return {**record, "test_top1": r["test_top1"], "val_top1": r["val_top1"], "label_bytes": r["label_bytes"],
            "eval_s": time.perf_counter() - t0, **times}


def _finished_evaluation(cfg: RunConfig, syn: Path, tag: str, results: Path) -> dict:
    """The result of an evaluation of this run found on disk but not in the results file (its process was killed
    before adding it): reused when its manifest says it ran with these settings, else an error."""
    run = RunDir(syn)
    manifest = run.manifest(f"evaluate_{tag}")
    now = json.loads(json.dumps(cfg.to_dict()))
    skip = RUNTIME_FIELDS | {"out"}
    saved = json.loads(manifest.read_text())["config"] if manifest.exists() else None
    if saved is None or any(saved.get(k) != v for k, v in now.items() if k not in skip):
        raise FileExistsError(f"{run.evaluation(tag)} exists but {results} has no such run: another run (other "
                              "--results, or other student settings) evaluated this synthetic set. Use another "
                              "--out, or that run's --results")
    print(f"{run.evaluation(tag)}: an evaluation with these settings finished but was not in {results}: "
          "added from its file")
    return json.loads(run.evaluation(tag).read_text())


def _check_reusable(cfg: RunConfig, syn: Path, teacher_sha: str) -> None:
    """A synthetic set on disk is reused only if it was distilled by the same teacher with the same settings."""
    now = json.loads(json.dumps(cfg.to_dict()))            # tuples as lists, as config.json holds them
    run = RunDir(syn)
    saved = json.loads(run.config.read_text()) if run.config.exists() else {}
    diff = [f"{k} {saved[k]!r} (now {now[k]!r})" for k in sorted(now)
            if k in saved and k not in NOT_DISTILL and saved[k] != now[k]]
    manifest = run.manifest("distill")
    sha = json.loads(manifest.read_text()).get("teacher_sha256") if manifest.exists() else None
    if sha and sha != teacher_sha:
        diff.append(f"teacher sha256 {sha[:12]}... (now {teacher_sha[:12]}...)")
    if diff:
        raise ValueError(f"{syn} holds a synthetic set distilled with other settings: {'; '.join(diff)}. "
                         "Use another --out (or the same settings)")


def stage_seconds(cfg: RunConfig, syn: Path) -> dict[str, float]:
    """Seconds per stage of one row as its stage files recorded them (missing files: stage left out)."""
    s: dict[str, float] = {}
    run = RunDir(syn)
    for manifest in (run.manifest("distill"), run.manifest(f"relabel_{cfg.labels}")):
        if manifest.exists():
            s.update(json.loads(manifest.read_text()).get("timings", {}))
    eval_file = run.evaluation(pipeline.eval_tag(cfg, cfg.labels))
    if eval_file.exists():
        s["train"] = json.loads(eval_file.read_text())["timings"]["train"]
    return s


def write_table(path: Path, runs: list[dict], rows: list[str], cfg: RunConfig) -> str:
    """The markdown beside the results file ``path`` (``.md``): the table of ``rows`` (``method:labels``) and
    DD-Ranking's numbers, from ``runs`` with ``cfg``'s student epochs and teacher. Returns the text."""
    md = markdown(runs, rows=rows, epochs=cfg.epochs)
    md += "\n" + dd_ranking(runs, full_hard_top1(cfg), rows=rows, epochs=cfg.epochs)
    atomic_write_text(Path(path).with_suffix(".md"), md)
    return md


def full_hard_top1(cfg: RunConfig) -> float | None:
    """Test top-1 of the student architecture trained with hard labels on all the training images: the teacher's
    (teacher.json) when the teacher is that architecture (train-teacher trains on hard labels), else None
    (unknown: no teacher, no teacher.json, or another architecture)."""
    meta = teacher_meta_path(cfg.teacher) if cfg.teacher else None
    if meta is None or not meta.exists() or cfg.student != cfg.arch:
        return None
    m = json.loads(meta.read_text())
    same = m.get("arch") == cfg.student and m.get("arch_kwargs", {}) == json.loads(cfg.student_kwargs or "{}")
    return float(m["test_top1"]) if same and m.get("test_top1") is not None else None


def _mean_of(runs: list[dict], ipc: int, method: str, labels: str) -> float | None:
    v = [r["test_top1"] for r in runs if (r["ipc"], r["method"], r["labels"]) == (ipc, method, labels)]
    return statistics.mean(v) if v else None


def dd_ranking(runs: list[dict], full_hard: float | None, rows: list[str] | None = None,
               epochs: int | None = None) -> str:
    """DD-Ranking's two numbers per row and IPC, in points of test top-1 (means over seeds):

    - IOR, improvement over random: the row minus ``random`` with the same label mode (what the images add
      beyond the labels' training);
    - HLR, hard-label recovery: ``full_hard`` (the student architecture trained with hard labels on all the
      training images) minus the method with hard labels (lower is better: the gap its images leave). It is a
      number per method and IPC, shown on the method's hard-label row and blank on its other rows; without
      hard-label rows the table has no HLR columns.
    A cell is ``-`` where a run it needs is missing."""
    runs = [r for r in runs if epochs is None or r["epochs"] == epochs]
    names = [n for n in dict.fromkeys([*(rows or []), *(f"{r['method']}:{r['labels']}" for r in runs)])
             if any(f"{r['method']}:{r['labels']}" == n for r in runs)]
    ipcs = sorted({r["ipc"] for r in runs})
    hlr = any(n.endswith(":hard") for n in names)     # HLR comes from the hard-label rows: without them, no column
    head = "" if not hlr else (f" (HLR from {full_hard:.2f}: the teacher, same architecture, hard labels, all "
                               "training images)" if full_hard is not None else
                               " (HLR unknown: no teacher.json of the student's architecture)")
    lines = [f"DD-Ranking, points of test top-1{head}", "",
             "| method | labels | " + " | ".join(f"IPC {i} IOR" + (f" | IPC {i} HLR" if hlr else "") for i in ipcs)
             + " |", "|---|---|" + ("---|---|" if hlr else "---|") * len(ipcs)]
    for name in names:
        method, labels = name.split(":")
        cells = []
        for i in ipcs:
            own, rnd = _mean_of(runs, i, method, labels), _mean_of(runs, i, "random", labels)
            cells.append("-" if own is None or rnd is None else f"{own - rnd:+.1f}")
            if hlr:                                 # on the hard-label row, own is the method's hard-label mean
                cells.append("" if labels != "hard" else "-" if own is None or full_hard is None else
                             f"{full_hard - own:.1f}")
        lines.append(f"| {method} | {labels} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(runs: list[dict], rows: list[str] | None = None, epochs: int | None = None) -> str:
    """Rows ``method:labels`` (``rows`` first, then any others in ``runs``) x columns IPC; each cell the test
    top-1 % over seeds, ``mean ± std (n seeds)``. ``epochs``: only runs with this many student epochs."""
    runs = [r for r in runs if epochs is None or r["epochs"] == epochs]
    names = [n for n in dict.fromkeys([*(rows or []), *(f"{r['method']}:{r['labels']}" for r in runs)])
             if any(f"{r['method']}:{r['labels']}" == n for r in runs)]
    ipcs = sorted({r["ipc"] for r in runs})
    lines = ["| method | labels | " + " | ".join(f"IPC {i}" for i in ipcs) + " |",
             "|---|---|" + "---|" * len(ipcs)]
    for name in names:
        method, labels = name.split(":")
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
