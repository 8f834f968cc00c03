"""The results tables of docs/results.md: ``nrrdd compare`` with the defaults of nrrdd/config.py, seeds 0-2, IPC 1, 10, 50.

    python scripts/results_table.py --teacher results/teachers/fashion-mnist_conv3_e10_s0/teacher.pt
    python scripts/results_table.py --dataset mnist --teacher results/teachers/mnist_conv3_e3_s0/teacher.pt

One ``nrrdd compare`` command per dataset. Fashion-MNIST: every row of the results table (SRe2L at IPC 10 only,
the row ``sre2l:online@10``). MNIST: the second table's rows. Any other flag goes to ``nrrdd compare``
unchanged. Re-running continues the results file; ``--print`` only prints the command.

The same command may run in several processes at once (``--threads 1`` each, one per core): they share the grid
(see ``nrrdd compare --help``). When the whole grid is done, the table compare wrote (``results/table_<dataset>.md``)
replaces the text between ``<!-- table_<dataset>:start -->`` and ``<!-- table_<dataset>:end -->`` in each of
:data:`DOCS` that has them.
"""
import json
import sys
from pathlib import Path

from nrrdd.cli import build_config, main, make_parser
from nrrdd.compare import parse_rows
from nrrdd.io import file_lock, write_between_markers

ROWS = {
    "fashion-mnist": ["random:online", "rded:online", "nrrdd:online", "nrrdd:soft", "nrrdd:dbr", "random:hard",
                      "rded:hard", "nrrdd:hard", "sre2l:online@10"],
    "mnist": ["random:online", "rded:online", "nrrdd:online", "nrrdd:dbr"],
}
DOCS = [Path("README.md"), Path("docs/results.md")]
DOCS_LOCK = Path("results/docs.lock")


def command(argv: list[str]) -> list[str]:
    """The ``nrrdd compare`` arguments of the table of ``--dataset`` (default fashion-mnist)."""
    dataset = argv[argv.index("--dataset") + 1] if "--dataset" in argv else "fashion-mnist"
    return ["compare", "--rows", *ROWS[dataset], "--ipcs", "1", "10", "50", "--seeds", "0", "1", "2",
            "--out", f"runs/table_{dataset}", "--results", f"results/table_{dataset}.json", *argv]


def run(argv: list[str]) -> int:
    if "--print" in argv:
        print(" ".join(["nrrdd", *command([a for a in argv if a != "--print"])]))
        return 0
    argv = command(argv)
    rc = main(argv)
    if rc == 0 and not missing(argv):
        table = Path(make_parser().parse_args(argv).results).with_suffix(".md")
        dataset = table.stem.removeprefix("table_")
        with file_lock(DOCS_LOCK):          # two datasets' tables may finish at once: one writer per doc
            for doc in DOCS:
                if write_between_markers(doc, f"table_{dataset}", table.read_text(), add_missing=False):
                    print(f"{doc}: table_{dataset} updated from {table}")
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
