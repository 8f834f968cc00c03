"""Run the benchmark suites, compare runs, plot and tabulate them (rows in the CSV format of ``benchmarks.common``).

    python -m benchmarks run [--quick] [--suites kernels stages ...]   # -> benchmarks/out/ (untracked)
    python -m benchmarks run --update-baseline                          # ... and make it the committed baseline
    python -m benchmarks compare [--baseline CSV] [--current CSV]
    python -m benchmarks plot --csv CSV [--out DIR]
    python -m benchmarks table --csv CSV [--readme FILE]

``run`` starts each suite as ``python -m benchmarks.bench_<suite> --out CSV`` from the repository root, one after
the other (a failing or missing suite is reported and the others still run; the exit code is then 1). By default
everything goes to the git-ignored ``benchmarks/out/``: ``latest_<cpu|cuda>.csv``, ``plots/`` and the markdown
table ``latest_<cpu|cuda>.md``; nothing tracked is written. The CSV is started fresh: an existing one is moved
aside to ``<name>.prev.csv`` (its rows appended there after those of earlier runs).

The committed baseline is ``benchmarks/results/baseline_<cpu|cuda>.csv``, its plots (``benchmarks/results/plots/``,
``plots_cuda/`` for CUDA) and the table in ``benchmarks/README.md``; ``compare`` checks a run against it.
``run --update-baseline`` writes all three from the run, and only when every suite of the run succeeded and the
run is a full one (not ``--quick``). When the run covered every suite, its rows replace the baseline's; with
``--suites``, they replace the baseline's rows of each (name, provider) the run measured, and the others are kept.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import report
from benchmarks.common import FIELDS, OUT
from nrrdd.io import atomic_copy, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"        # the committed baseline
README = ROOT / "benchmarks" / "README.md"       # holds the baseline's table
SUITES = ("kernels", "sass", "loaders", "stages", "dist")
# Extra arguments of each suite in quick mode (bench_loaders has no --quick: fewer images and passes instead).
QUICK_ARGS = {"kernels": ["--quick"], "sass": ["--quick"], "loaders": ["--copies", "5", "--repeats", "2"], "stages": ["--quick"],
              "dist": ["--quick"]}
# Suites that draw figures of their own: the option naming their folder (the run's plots folder is passed).
PLOTS_ARG = {"stages": "--plots"}


def _device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _show(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def baseline_files(kind: str) -> tuple[Path, Path, str]:
    """The committed baseline of a device kind: (CSV, plots folder, README table marker)."""
    if kind == "cpu":
        return RESULTS / "baseline_cpu.csv", RESULTS / "plots", "benchmarks-table"
    return RESULTS / f"baseline_{kind}.csv", RESULTS / f"plots_{kind}", f"benchmarks-table-{kind}"


def move_aside(out: Path) -> Path | None:
    """Start ``out`` fresh without losing data: its rows go to ``<stem>.prev.csv`` (appended after the rows already
    there, one header). Returns that path, or None when ``out`` did not exist."""
    if not out.exists():
        return None
    prev = out.with_name(f"{out.stem}.prev.csv")
    old = prev.read_text() if prev.exists() else ""
    if not old.strip():
        os.replace(out, prev)
        return prev
    new = out.read_text().splitlines(keepends=True)
    if new and old.splitlines()[0] != new[0].rstrip("\n"):
        raise SystemExit(f"{out} and {prev} have different headers: move one of them away first")
    atomic_write_text(prev, old.rstrip("\n") + "\n" + "".join(new[1:]))
    out.unlink()
    return prev


def suite_command(suite: str, out: Path, quick: bool, plots: Path) -> list[str]:
    """The command line of one suite: its rows to ``out``, its own figures (if any) to ``plots``."""
    cmd = [sys.executable, "-m", f"benchmarks.bench_{suite}", "--out", str(out)]
    if suite in PLOTS_ARG:
        cmd += [PLOTS_ARG[suite], str(plots)]
    return cmd + (QUICK_ARGS.get(suite, []) if quick else [])


def run_suite(suite: str, out: Path, quick: bool, plots: Path) -> str:
    """Run one suite (output streamed); its status: "ok", "missing" or "failed (exit N)"."""
    if not (ROOT / "benchmarks" / f"bench_{suite}.py").exists():
        print(f"\n== {suite}: benchmarks/bench_{suite}.py does not exist, skipped", flush=True)
        return "missing"
    cmd = suite_command(suite, out, quick, plots)
    print(f"\n== {suite}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    status = "ok" if rc == 0 else f"failed (exit {rc})"
    print(f"== {suite}: {status} in {time.perf_counter() - t0:.1f} s", flush=True)
    return status


def _pngs(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.glob("*.png")} if folder.is_dir() else {}


def _raw_rows(path: Path) -> list[dict]:
    """The rows of a CSV as written (strings), so that rows kept in the baseline keep their exact text."""
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def update_baseline(run_csv: Path, kind: str, replace_all: bool, figures: list[Path]) -> list[Path]:
    """Make the run in ``run_csv`` the committed baseline of ``kind``: its CSV (the run's rows replace all of the
    baseline's when ``replace_all``, else the baseline's rows of each (name, provider) the run measured: a name can
    span suites, as masked_adam's times in ``kernels`` and its compiled code in ``sass``), the plots of the run's
    benchmark names (from the whole baseline) plus ``figures`` (drawn by the suites themselves), and the README
    table of the whole baseline. Returns the paths written."""
    base_csv, plots_dir, marker = baseline_files(kind)
    new = _raw_rows(run_csv)
    measured = {(r["name"], r["provider"]) for r in new}
    old = [] if replace_all or not base_csv.exists() else [
        r for r in _raw_rows(base_csv) if (r["name"], r["provider"]) not in measured]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS)      # the same dialect as Recorder.write_csv
    w.writeheader()
    w.writerows(old + new)
    written = [atomic_write_text(base_csv, buf.getvalue())]
    rows = report.read_rows(base_csv)
    names = {name for name, _ in measured}
    written += report.plot([r for r in rows if r["name"] in names], plots_dir)
    written += [atomic_copy(f, plots_dir / f.name) for f in figures]
    written.append(report.update_readme(README, report.markdown_table(rows), marker))
    return written


def cmd_run(args) -> int:
    kind = _device_kind()
    out = Path(args.out).resolve() if args.out else OUT / f"latest_{kind}.csv"
    plots = Path(args.plots).resolve() if args.plots else out.parent / "plots"
    print(f"output: {_show(out)}, {_show(plots)}/" + ("" if args.update_baseline else
          "  (the committed baseline is left alone; --update-baseline writes it)"), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    prev = move_aside(out)
    if prev is not None:
        print(f"earlier rows of {out.name} moved to {_show(prev)}")
    before = _pngs(plots)
    status = {s: run_suite(s, out, args.quick, plots) for s in args.suites}
    figures = sorted(p for p, t in _pngs(plots).items() if before.get(p) != t)   # drawn by the suites
    rows = report.read_rows(out) if out.exists() else []
    if rows:
        for p in report.plot(rows, plots):
            print(f"plot: {_show(p)}")
        table = atomic_write_text(out.with_suffix(".md"), report.markdown_table(rows))
        print(f"table: {_show(table)}")
    print(f"\n{len(rows)} rows in {_show(out)}")
    for s, st in status.items():
        print(f"  {s:<8} {st}")
    ok = all(st == "ok" for st in status.values())
    if args.update_baseline:
        if not ok or not rows:
            print("\nbaseline NOT updated: " + ("a suite did not succeed" if not ok else "the run has no rows"))
            return 1
        replace_all = set(args.suites) >= set(SUITES)
        written = update_baseline(out, kind, replace_all, figures)
        n = len({(r["name"], r["provider"]) for r in rows})
        how = "replaced by this run" if replace_all else f"the rows of {n} (name, provider) pairs replaced"
        print(f"\nbaseline updated ({how}):")
        for p in written:
            print(f"  {_show(p)}")
    else:
        current = "" if out == OUT / f"latest_{kind}.csv" else f" --current {_show(out)}"
        print(f"\ncompare with the committed baseline: python -m benchmarks compare{current}")
    return 0 if ok else 1


def cmd_compare(args) -> int:
    kind = _device_kind()
    base = Path(args.baseline) if args.baseline else baseline_files(kind)[0]
    cur = Path(args.current) if args.current else OUT / f"latest_{kind}.csv"
    for p, what in ((base, "baseline"), (cur, "run")):
        if not p.exists():
            hint = " (python -m benchmarks run writes it)" if what == "run" else ""
            raise SystemExit(f"no such {what} CSV: {p}{hint}")
    print(f"baseline: {_show(base)}\ncurrent:  {_show(cur)}\n")
    print(report.format_compare(report.compare(report.read_rows(base), report.read_rows(cur), args.tolerance)))
    return 0


def cmd_plot(args) -> int:
    for p in report.plot(report.read_rows(args.csv), args.out):
        print(p)
    return 0


def cmd_table(args) -> int:
    table = report.markdown_table(report.read_rows(args.csv))
    print(table)
    if args.readme:
        print(f"written to {report.update_readme(args.readme, table, args.marker)}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the suites into one CSV (untracked benchmarks/out/), plot and tabulate it")
    p.add_argument("--quick", action="store_true",
                   help="small sizes and few repeats: a smoke run, not for comparing (refused with --update-baseline)")
    p.add_argument("--suites", nargs="+", default=list(SUITES), choices=SUITES)
    p.add_argument("--out", help=f"CSV (default: {_show(OUT)}/latest_<cpu|cuda>.csv); an existing one is moved aside "
                                 "to <name>.prev.csv; the table goes beside it as <name>.md")
    p.add_argument("--plots", help="folder of the PNGs (default: plots/ beside the CSV)")
    p.add_argument("--update-baseline", action="store_true",
                   help="also make this run the committed baseline: benchmarks/results/baseline_<cpu|cuda>.csv, its "
                        "plots and the table in benchmarks/README.md (only if every suite succeeds; not with --quick); "
                        "with --suites, only the baseline's rows of each (name, provider) the run measured are replaced")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("compare", help="baseline vs current CSV, a verdict per measurement")
    p.add_argument("--baseline", help="default: the committed benchmarks/results/baseline_<cpu|cuda>.csv")
    p.add_argument("--current", help=f"default: the latest run, {_show(OUT)}/latest_<cpu|cuda>.csv")
    p.add_argument("--tolerance", type=float, default=0.05, help="relative change counted as the same (at least)")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("plot", help="one PNG per benchmark name")
    p.add_argument("--csv", required=True)
    p.add_argument("--out", default=str(OUT / "plots"), help="folder of the PNGs (default: %(default)s)")
    p.set_defaults(fn=cmd_plot)

    p = sub.add_parser("table", help="the markdown table of a CSV, printed (and put into a README with --readme)")
    p.add_argument("--csv", required=True)
    p.add_argument("--readme", help="file to put the table into, between its markers (default: print only)")
    p.add_argument("--marker", default="benchmarks-table", help="name of the markers (default: %(default)s)")
    p.set_defaults(fn=cmd_table)

    args = ap.parse_args(argv)
    if args.command == "run" and args.quick and args.update_baseline:
        ap.error("--update-baseline needs a full run: --quick figures are a smoke test, not a baseline")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
