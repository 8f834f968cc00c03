"""Run the benchmark suites, compare runs, plot and tabulate them (rows in the CSV format of ``benchmarks.common``).

    python -m benchmarks run [--quick] [--suites kernels loaders stages]   # -> results/latest_<cpu|cuda>.csv,
                                                                           #    plots and the README table
    python -m benchmarks compare --baseline benchmarks/results/baseline_cpu.csv [--current CSV]
    python -m benchmarks plot --csv CSV --out DIR
    python -m benchmarks table --csv CSV --readme benchmarks/README.md

``run`` starts each suite as ``python -m benchmarks.bench_<suite> --out CSV`` from the repository root, one after
the other (a failing or missing suite is reported and the others still run; the exit code is then 1). The CSV is
started fresh: an existing one is moved aside to ``<name>.prev.csv`` (its rows appended there after those of
earlier runs), so a baseline for ``compare`` is never lost. To keep a baseline, copy a run's CSV to
``benchmarks/results/baseline_<cpu|cuda>.csv``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import report
from nrrdd.io import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SUITES = ("kernels", "sass", "loaders", "stages", "dist")
# Extra arguments of each suite in quick mode (bench_loaders has no --quick: fewer images and passes instead).
QUICK_ARGS = {"kernels": ["--quick"], "sass": ["--quick"], "loaders": ["--copies", "5", "--repeats", "2"], "stages": ["--quick"],
              "dist": ["--quick"]}


def _device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _default_csv(prefix: str) -> Path:
    """``benchmarks/results/<prefix>_<cpu|cuda>.csv``, by this machine's device."""
    return RESULTS / f"{prefix}_{_device_kind()}.csv"


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


def run_suite(suite: str, out: Path, quick: bool) -> str:
    """Run one suite (output streamed); its status: "ok", "missing" or "failed (exit N)"."""
    if not (ROOT / "benchmarks" / f"bench_{suite}.py").exists():
        print(f"\n== {suite}: benchmarks/bench_{suite}.py does not exist, skipped", flush=True)
        return "missing"
    cmd = [sys.executable, "-m", f"benchmarks.bench_{suite}", "--out", str(out)]
    cmd += QUICK_ARGS[suite] if quick else []
    print(f"\n== {suite}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    status = "ok" if rc == 0 else f"failed (exit {rc})"
    print(f"== {suite}: {status} in {time.perf_counter() - t0:.1f} s", flush=True)
    return status


def cmd_run(args) -> int:
    out = Path(args.out).resolve() if args.out else _default_csv("latest")
    prev = move_aside(out)
    if prev is not None:
        print(f"earlier rows of {out.name} moved to {prev}")
    status = {s: run_suite(s, out, args.quick) for s in args.suites}
    rows = report.read_rows(out) if out.exists() else []
    if rows:
        for p in report.plot(rows, args.plots):
            print(f"plot: {p}")
        if not args.no_readme:
            print(f"table: {report.update_readme(args.readme, report.markdown_table(rows))}")
    print(f"\n{len(rows)} rows in {out}")
    for s, st in status.items():
        print(f"  {s:<8} {st}")
    return 0 if all(st == "ok" for st in status.values()) else 1


def cmd_compare(args) -> int:
    base = Path(args.baseline) if args.baseline else _default_csv("baseline")
    cur = Path(args.current) if args.current else _default_csv("latest")
    for p in (base, cur):
        if not p.exists():
            raise SystemExit(f"no such CSV: {p}")
    print(f"baseline: {base}\ncurrent:  {cur}\n")
    print(report.format_compare(report.compare(report.read_rows(base), report.read_rows(cur), args.tolerance)))
    return 0


def cmd_plot(args) -> int:
    for p in report.plot(report.read_rows(args.csv), args.out):
        print(p)
    return 0


def cmd_table(args) -> int:
    table = report.markdown_table(report.read_rows(args.csv))
    print(table)
    print(f"written to {report.update_readme(args.readme, table)}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the suites into one CSV, then plot it and update the README table")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (CPU smoke run)")
    p.add_argument("--suites", nargs="+", default=list(SUITES), choices=SUITES)
    p.add_argument("--out", help="CSV (default: benchmarks/results/latest_<cpu|cuda>.csv); an existing one is "
                                 "moved aside to <name>.prev.csv")
    p.add_argument("--plots", default=str(RESULTS / "plots"), help="folder of the PNGs")
    p.add_argument("--readme", default=str(ROOT / "benchmarks" / "README.md"), help="file of the table")
    p.add_argument("--no-readme", action="store_true", help="leave the README table alone")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("compare", help="baseline vs current CSV, a verdict per measurement")
    p.add_argument("--baseline", help="default: benchmarks/results/baseline_<cpu|cuda>.csv")
    p.add_argument("--current", help="default: benchmarks/results/latest_<cpu|cuda>.csv")
    p.add_argument("--tolerance", type=float, default=0.05, help="relative change counted as the same (at least)")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("plot", help="one PNG per benchmark name")
    p.add_argument("--csv", required=True)
    p.add_argument("--out", default=str(RESULTS / "plots"), help="folder of the PNGs")
    p.set_defaults(fn=cmd_plot)

    p = sub.add_parser("table", help="the markdown table of a CSV, printed and put into a README")
    p.add_argument("--csv", required=True)
    p.add_argument("--readme", default=str(ROOT / "benchmarks" / "README.md"))
    p.set_defaults(fn=cmd_table)

    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
