"""The results tables of docs/results.md: ``nrrdd compare`` with the defaults of nrrdd/config.py, seeds 0-2, IPC 1, 10, 50.

    python scripts/results_table.py --teacher results/teachers/fashion-mnist_conv3_e10_s0/teacher.pt
    python scripts/results_table.py --dataset mnist --teacher results/teachers/mnist_conv3_e3_s0/teacher.pt

One ``nrrdd compare`` command per dataset. Fashion-MNIST: every row of the results table (SRe2L at IPC 10 only,
the row ``sre2l:online@10``). MNIST: the second table's rows. Any other flag goes to ``nrrdd compare``
unchanged. Re-running continues the results file; ``--print`` only prints the command; ``--summary`` runs nothing:
it rewrites the table from the results file as it stands and writes it and the targets' verdict (below) into
the docs.

The same command may run in several processes at once (``--threads 1`` each, one per core): they share the grid
(see ``nrrdd compare --help``). When the whole grid is done, the table compare wrote (``results/table_<dataset>.md``)
replaces the text between ``<!-- table_<dataset>:start -->`` and ``<!-- table_<dataset>:end -->`` in each of
:data:`DOCS` that has them.

Each invocation ends by writing ``results/table_<dataset>_targets.md``: issue 14's targets (NRR-DD online above
random and RDED online at every IPC, by at least 1 point at IPC 10 and 50; NRR-DD DBR within 2 points of NRR-DD
online at IPC 10 and 50), each judged on the means over seeds 0-2 of the test split: met, missed, or waiting
while a run it needs is missing. It goes into the docs with the table, between ``targets_<dataset>`` markers.

The sets whose distillation takes hours (NRR-DD's and SRe2L's: the refinement) are kept with the results, under
``results/sets/<dataset>/<set>/`` (``synthetic.safetensors``, ``config.json``, ``manifest_distill.json``; no PNGs):
``--summary`` stores each finished one, and a run copies the stored ones into its ``--out`` first, so the grid is
carried on elsewhere (another machine, a fresh clone) without distilling them again. A stored set whose bytes do
not match its manifest's ``synthetic_sha256`` is refused; compare checks its teacher and settings before reuse.
"""
import shutil
import json
import statistics
import sys
from pathlib import Path

from nrrdd.cli import build_config, main, make_parser
from nrrdd.compare import grid_settings, load_results, parse_rows, write_table
from nrrdd.io import atomic_write_text, file_lock, load_safetensors, tensor_sha256, write_between_markers

ROWS = {
    "fashion-mnist": ["random:online", "rded:online", "nrrdd:online", "nrrdd:soft", "nrrdd:dbr", "random:hard",
                      "rded:hard", "nrrdd:hard", "sre2l:online@10"],
    "mnist": ["random:online", "rded:online", "nrrdd:online", "nrrdd:dbr"],
}
DOCS = [Path("README.md"), Path("docs/results.md")]
SEEDS = [0, 1, 2]
# (ipc, row, other, least): the row's mean minus the other's must be at least ``least`` points (above it when 0);
# "DBR within 2 points of online" is one-sided: DBR above online meets it
TARGETS = [(ipc, "nrrdd:online", other, least) for ipc, least in ((1, 0.0), (10, 1.0), (50, 1.0))
           for other in ("random:online", "rded:online")] + \
          [(ipc, "nrrdd:dbr", "nrrdd:online", -2.0) for ipc in (10, 50)]
DOCS_LOCK = Path("results/docs.lock")
SETS = Path("results/sets")
SLOW_SETS = ("nrrdd", "sre2l")          # methods whose sets are kept under SETS (a random or RDED set takes a minute)
SET_FILES = ("synthetic.safetensors", "config.json", "manifest_distill.json")    # the manifest last: "finished"


def command(argv: list[str]) -> list[str]:
    """The ``nrrdd compare`` arguments of the table of ``--dataset`` (default fashion-mnist)."""
    dataset = argv[argv.index("--dataset") + 1] if "--dataset" in argv else "fashion-mnist"
    return ["compare", "--rows", *ROWS[dataset], "--ipcs", "1", "10", "50", "--seeds", "0", "1", "2",
            "--out", f"runs/table_{dataset}", "--results", f"results/table_{dataset}.json", *argv]


def targets(runs: list[dict], epochs: int, seeds: list[int] = SEEDS) -> str:
    """The verdict on each of :data:`TARGETS`, a markdown table: both rows' means over ``seeds`` (runs with
    ``epochs`` student epochs), the gap, and met / missed, or ``waiting`` while a seed of either row is missing."""
    def mean(ipc: int, row: str) -> float | None:
        method, labels = row.split(":")
        v = {r["seed"]: r["test_top1"] for r in runs if r["epochs"] == epochs and r["ipc"] == ipc
             and (r["method"], r["labels"]) == (method, labels) and r["seed"] in seeds}
        return statistics.mean(v.values()) if len(v) == len(seeds) else None

    lines = [f"| IPC | target | {len(seeds)}-seed means, test top-1 | gap | verdict |", "|---|---|---|---|---|"]
    for ipc, row, other, least in sorted(TARGETS, key=lambda t: t[0]):
        need = (f"{row} within {-least:g} points of {other}" if least < 0 else
                f"{row} above {other}" + (f" by at least {least:g} point{'s' * (least != 1)}" if least else ""))
        a, b = mean(ipc, row), mean(ipc, other)
        if a is None or b is None:
            lines.append(f"| {ipc} | {need} | - | - | waiting |")
            continue
        met = _meets(a - b, least)
        shown = f"{a - b:+.2f}" if _meets(round(a - b, 2), least) == met else f"{a - b:+.4f}"  # 0.9967 is not +1.00
        lines.append(f"| {ipc} | {need} | {a:.2f} vs {b:.2f} | {shown} | {'met' if met else '**missed**'} |")
    return "\n".join(lines) + "\n"


def _meets(gap: float, least: float) -> bool:
    """``gap`` at least ``least`` points, or above 0 when ``least`` is 0; 1e-9: the float noise of a mean, no more."""
    return gap >= least - 1e-9 if least else gap > 1e-9


def write_targets(argv: list[str]) -> Path:
    """``results/table_<dataset>_targets.md`` from the results file of the compare arguments ``argv``."""
    ns = make_parser().parse_args(argv)
    results = Path(ns.results)
    runs = json.loads(results.read_text())["runs"] if results.exists() else []
    return atomic_write_text(results.with_name(results.stem + "_targets.md"),
                             targets(runs, build_config(ns).epochs))      # seeds 0-2, whatever --seeds ran


def write_summary_table(argv: list[str]) -> None:
    """The markdown table beside the results file of the compare arguments ``argv``, rewritten from what the
    file holds (the table compare writes as runs land, in the format of this version of the code). The file is
    checked as compare checks it (its teacher and settings); nothing is written when it does not exist yet."""
    ns = make_parser().parse_args(argv)
    cfg, results = build_config(ns), Path(ns.results)
    if not results.exists():
        return
    with file_lock(results.with_suffix(".lock")):
        try:
            runs = load_results(results, cfg.teacher, grid_settings(cfg))["runs"]
        except ValueError as e:
            raise SystemExit(f"--summary: {e}") from None
        write_table(results, runs, [r.name for r in parse_rows(ns.rows, ns.ipcs)], cfg)


def write_docs(argv: list[str], verdict: Path) -> None:
    """The table compare wrote and the targets' ``verdict`` (:func:`write_targets`) into each of :data:`DOCS` that
    has their markers."""
    results = Path(make_parser().parse_args(argv).results)
    dataset = results.stem.removeprefix("table_")
    with file_lock(DOCS_LOCK):              # two datasets' tables may finish at once: one writer per doc
        for kind, text in (("table", results.with_suffix(".md")), ("targets", verdict)):
            if not text.exists():
                continue
            for doc in DOCS:
                if write_between_markers(doc, f"{kind}_{dataset}", text.read_text(), add_missing=False):
                    print(f"{doc}: {kind}_{dataset} updated from {text}")


def _sets(argv: list[str]) -> tuple[Path, Path]:
    """(the compare ``--out`` folder of the grid, its folder of stored sets under :data:`SETS`)."""
    ns = make_parser().parse_args(argv)
    return Path(ns.out), SETS / Path(ns.results).stem.removeprefix("table_")


def _finished(folder: Path) -> bool:
    return all((folder / f).is_file() for f in SET_FILES)


def _digest(path: Path) -> str | None:
    """The ``synthetic_sha256`` of a synthetic set's file, as the pipeline writes it (its images and labels
    tensors); None for a file that is not a readable set."""
    try:
        t, _ = load_safetensors(path)
        return tensor_sha256(t["images"], t["labels"])
    except Exception:                       # truncated, not safetensors, or no images/labels: not the set
        return None


def _copy_set(src: Path, dst: Path) -> None:
    """The finished set ``src`` into ``dst``, each file through a temporary name, the manifest last, after its
    ``synthetic_sha256`` is checked against the copied bytes: a half-copied or damaged set is never taken for one."""
    want = json.loads((src / "manifest_distill.json").read_text()).get("synthetic_sha256")
    dst.mkdir(parents=True, exist_ok=True)
    for name in SET_FILES:
        tmp = dst / f".{name}.tmp"
        shutil.copyfile(src / name, tmp)
        if name == "manifest_distill.json" and _digest(dst / "synthetic.safetensors") != want:
            tmp.unlink()
            raise SystemExit(f"{src}: synthetic.safetensors does not match its manifest's synthetic_sha256; "
                             "not copied (distil it again, or restore the file)")
        tmp.replace(dst / name)


def save_sets(argv: list[str]) -> list[Path]:
    """Each finished set of :data:`SLOW_SETS` in the grid's ``--out`` not yet stored (or stored with other bytes)
    into :data:`SETS`; the stored folders it wrote."""
    out, store = _sets(argv)
    saved = []
    for folder in sorted(out.glob("ipc*_s*_*")):
        if folder.name.rsplit("_", 1)[-1] not in SLOW_SETS or not _finished(folder):
            continue
        dst = store / folder.name
        if _finished(dst) and all((dst / f).read_bytes() == (folder / f).read_bytes() for f in SET_FILES):
            continue
        _copy_set(folder, dst)
        saved.append(dst)
    return saved


def restore_sets(argv: list[str]) -> list[Path]:
    """Each stored set (:func:`save_sets`) the grid's ``--out`` lacks (no finished set there) copied into it; the
    folders it wrote. Compare then reuses them after checking their teacher and settings."""
    out, store = _sets(argv)
    restored = []
    for src in sorted(store.glob("ipc*_s*_*")):
        dst = out / src.name
        if _finished(src) and not (dst / "manifest_distill.json").exists():
            _copy_set(src, dst)
            restored.append(dst)
    return restored


def run(argv: list[str]) -> int:
    if "--print" in argv:
        print(" ".join(["nrrdd", *command([a for a in argv if a != "--print"])]))
        return 0
    if "--summary" in argv:                 # what the results file holds now, complete or not
        argv = command([a for a in argv if a != "--summary"])
        write_summary_table(argv)
        for folder in save_sets(argv):
            print(f"stored the finished set {folder}")
        verdict = write_targets(argv)
        write_docs(argv, verdict)
        print(verdict.read_text(), end="")
        return 0
    argv = command(argv)
    for folder in restore_sets(argv):
        print(f"{folder}: copied from the stored sets")
    rc = main(argv)
    verdict = write_targets(argv)
    if rc == 0 and not missing(argv):
        write_docs(argv, verdict)
    return rc


def missing(argv: list[str]) -> int:
    """Runs of the grid of the compare arguments ``argv`` not yet in its results file."""
    ns = make_parser().parse_args(argv)
    epochs = build_config(ns).epochs
    rows = parse_rows(ns.rows, ns.ipcs)
    results = Path(ns.results)
    runs = json.loads(results.read_text())["runs"] if results.exists() else []
    have = {(r["ipc"], r["seed"], r["method"], r["labels"]) for r in runs if r["epochs"] == epochs}
    return sum((ipc, seed, r.method, r.labels) not in have for ipc in ns.ipcs for seed in ns.seeds for r in rows
               if r.runs_at(ipc))

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
