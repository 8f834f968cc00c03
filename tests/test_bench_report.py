"""benchmarks/report.py and ``python -m benchmarks``: comparing, tabulating and plotting benchmark CSVs."""
from __future__ import annotations

import csv
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# benchmarks/ is not installed: import it from the repository (appended, so an installed nrrdd still wins)
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.__main__ import move_aside  # noqa: E402
from benchmarks.common import FIELDS, OUT  # noqa: E402
from nrrdd.io import write_between_markers  # noqa: E402


def row(name="op", provider="torch", shape="8x8", metric="time", unit="ms", median=10.0, p20=None, p80=None,
        device="cpu x86_64 (2 threads)", timestamp="2026-01-01T00:00:00+00:00") -> dict:
    return dict(name=name, provider=provider, shape=shape, metric=metric, unit=unit, median=median,
                p20=median if p20 is None else p20, p80=median if p80 is None else p80, device=device,
                torch_version="2.0", package_version="0.1.0", timestamp=timestamp)


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    return path


def verdict(base: dict, cur: dict, tolerance: float = 0.05) -> dict:
    (res,) = report.compare([base], [cur], tolerance)
    return res


@pytest.mark.parametrize("metric,unit,b,c,expected", [
    ("time", "ms", 10.0, 8.0, "faster"),
    ("time", "ms", 10.0, 12.0, "slower"),
    ("throughput", "images/s", 100.0, 130.0, "faster"),
    ("throughput", "images/s", 100.0, 70.0, "slower"),
    ("bandwidth", "GB/s", 20.0, 10.0, "slower"),
    ("cold_compile", "s", 30.0, 20.0, "faster"),
    ("peak_rss", "MiB", 500.0, 400.0, "smaller"),
    ("peak_cuda", "MiB", 500.0, 600.0, "larger"),
    ("per_sample_epoch", "bytes/sample-epoch", 100.0, 200.0, "larger"),
    ("extrapolated_size", "GB", 2.0, 1.0, "smaller"),
    ("copy", "MB/s", 100.0, 200.0, "n/a"),
    ("epoch", "samples/s", 10.0, 20.0, "faster"),
    ("accuracy", "%", 50.0, 90.0, "n/a"),
])
def test_compare_directions(metric, unit, b, c, expected):
    res = verdict(row(metric=metric, unit=unit, median=b), row(metric=metric, unit=unit, median=c))
    assert res["verdict"] == expected
    assert res["change"] == pytest.approx(c / b - 1)
    assert (res["baseline"], res["current"], res["note"]) == (b, c, "")


def test_compare_tolerance_and_noise():
    assert verdict(row(median=10.0), row(median=10.4))["verdict"] == "same"          # 4% < 5% tolerance
    assert verdict(row(median=10.0), row(median=10.4), tolerance=0.01)["verdict"] == "slower"
    # 20% slower, but the current row's p20-p80 spread is +-25% of its median: noise, not a change
    noisy = verdict(row(median=10.0), row(median=12.0, p20=9.0, p80=15.0))
    assert noisy["verdict"] == "same" and noisy["threshold"] == pytest.approx(0.25)
    # the baseline's spread counts too; the larger half-spread wins
    assert verdict(row(median=10.0, p20=7.0, p80=13.0), row(median=12.0))["threshold"] == pytest.approx(0.3)
    assert verdict(row(median=10.0, p20=9.9, p80=10.1), row(median=12.0))["verdict"] == "slower"


def test_compare_missing_new_latest_and_device():
    old = row(name="a", median=50.0, timestamp="2025-01-01T00:00:00+00:00")
    base = [old, row(name="a", median=10.0, timestamp="2026-01-01T00:00:00+00:00"), row(name="gone")]
    cur = [row(name="a", median=5.0, device="NVIDIA H100"), row(name="fresh", median=3.0)]
    res = {r["name"]: r for r in report.compare(base, cur)}
    assert [r["name"] for r in report.compare(base, cur)] == ["a", "gone", "fresh"]
    assert res["a"]["baseline"] == 10.0 and res["a"]["verdict"] == "faster"            # newest baseline row
    assert res["a"]["note"] == "different device: cpu x86_64 (2 threads) vs NVIDIA H100"
    assert (res["gone"]["verdict"], res["gone"]["current"]) == ("missing", None)
    assert (res["fresh"]["verdict"], res["fresh"]["baseline"], res["fresh"]["current"]) == ("new", None, 3.0)
    text = report.format_compare(report.compare(base, cur))
    lines = text.splitlines()
    assert lines[0].split() == ["name", "provider", "shape", "metric", "baseline", "current", "change", "verdict"]
    assert lines[2].endswith("-50.0%  faster (different device)")
    assert lines[-2:] == ["different device: cpu x86_64 (2 threads) vs NVIDIA H100", "1 faster, 1 missing, 1 new"]


def test_read_rows_and_latest(tmp_path):
    rows = [row(median=1.0, timestamp="2026-01-02T00:00:00+00:00"), row(median=2.0),
            row(median=3.0, device="gpu"), row(median=4.0, shape="16x16")]
    back = report.read_rows(write_csv(tmp_path / "r.csv", rows))
    assert [r["median"] for r in back] == [1.0, 2.0, 3.0, 4.0] and back[0]["p20"] == 1.0
    assert [r["median"] for r in report.latest(back)] == [1.0, 3.0, 4.0]


def test_markdown_table_and_update_readme(tmp_path):
    rows = [row(name="zeta", median=1.5, p20=1.25, p80=2.0), row(name="alpha", provider="triton", median=0.123456),
            row(name="zeta", median=9.0, timestamp="2025-01-01T00:00:00+00:00")]                  # older: dropped
    table = report.markdown_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("device: cpu x86_64 (2 threads); torch 2.0; nrrdd 0.1.0")
    assert lines[2] == "| name | provider | shape | metric | median | p20 | p80 | unit |"
    assert lines[4:] == ["| alpha | triton | 8x8 | time | 0.1235 | 0.1235 | 0.1235 | ms |",
                         "| zeta | torch | 8x8 | time | 1.5 | 1.25 | 2 | ms |"]

    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nintro\n")
    report.update_readme(readme, table)
    first = readme.read_text()
    assert first.startswith("# Benchmarks\n\nintro\n\n<!-- benchmarks-table:start -->\n")
    assert first.endswith("| zeta | torch | 8x8 | time | 1.5 | 1.25 | 2 | ms |\n<!-- benchmarks-table:end -->\n")

    readme.write_text(first + "\n## after\n")
    report.update_readme(readme, "NEW TABLE\n")
    assert readme.read_text() == ("# Benchmarks\n\nintro\n\n<!-- benchmarks-table:start -->\nNEW TABLE\n"
                                  "<!-- benchmarks-table:end -->\n\n## after\n")

    readme.write_text("<!-- benchmarks-table:end -->\n<!-- benchmarks-table:start -->\n")
    with pytest.raises(ValueError, match="out of order"):
        report.update_readme(readme, table)


def test_results_table_goes_between_its_markers_or_nowhere(tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text("# R\n<!-- table_mnist:start -->\nold\n<!-- table_mnist:end -->\nafter\n")
    assert write_between_markers(doc, "table_mnist", "| a |\n|---|\n", add_missing=False) == doc
    assert doc.read_text() == "# R\n<!-- table_mnist:start -->\n| a |\n|---|\n<!-- table_mnist:end -->\nafter\n"
    # results_table.py leaves a doc without the markers alone
    assert write_between_markers(doc, "table_fashion-mnist", "x", add_missing=False) is None
    assert write_between_markers(tmp_path / "missing.md", "table_mnist", "x", add_missing=False) is None
    assert "x" not in doc.read_text() and not (tmp_path / "missing.md").exists()
    doc.write_text("<!-- table_mnist:start -->\n")                    # one marker only: refused, not guessed
    with pytest.raises(ValueError, match="incomplete"):
        write_between_markers(doc, "table_mnist", "x", add_missing=False)


def test_plot_writes_one_png_per_name(tmp_path):
    rows = [row(name="op/a", median=2.0, p20=1.5, p80=3.0), row(name="op/a", provider="triton", median=1.0),
            row(name="op/a", metric="bandwidth", unit="GB/s", median=5.0), row(name="b", metric="peak_rss", unit="MiB")]
    paths = report.plot(rows, tmp_path / "plots")
    assert [p.name for p in paths] == ["op_a.png", "b.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["b.png", "op_a.png"]       # no temp files


def test_move_aside_keeps_every_row(tmp_path):
    out = write_csv(tmp_path / "latest_cpu.csv", [row(median=1.0)])
    assert move_aside(tmp_path / "missing.csv") is None
    prev = move_aside(out)
    assert prev == tmp_path / "latest_cpu.prev.csv" and not out.exists()
    write_csv(out, [row(median=2.0), row(median=3.0)])
    assert move_aside(out) == prev and not out.exists()
    assert [r["median"] for r in report.read_rows(prev)] == [1.0, 2.0, 3.0]


@pytest.mark.slow
def test_cli_compare(tmp_path):
    base = write_csv(tmp_path / "base.csv", [row(median=10.0), row(name="gone")])
    cur = write_csv(tmp_path / "cur.csv", [row(median=20.0), row(name="fresh")])
    cmd = [sys.executable, "-m", "benchmarks", "compare", "--baseline", str(base), "--current", str(cur)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()
    assert any(line.split()[:2] == ["op", "torch"] and line.endswith("+100.0%  slower") for line in out)
    assert out[-1] == "1 missing, 1 new, 1 slower"


def test_run_suite_statuses(tmp_path, monkeypatch):
    import benchmarks.__main__ as cli

    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "bench_ok.py").write_text(
        "import sys\nopen(sys.argv[sys.argv.index('--out') + 1], 'w').write(' '.join(sys.argv[1:]))\n")
    (tmp_path / "benchmarks" / "bench_bad.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setattr(cli, "ROOT", tmp_path)
    out, plots = tmp_path / "out.csv", tmp_path / "plots"
    assert cli.run_suite("ok", out, quick=False, plots=plots) == "ok"
    assert out.read_text() == f"--out {out}"
    assert cli.run_suite("bad", out, quick=False, plots=plots) == "failed (exit 3)"
    assert cli.run_suite("none", out, quick=False, plots=plots) == "missing"
    # a suite that draws figures of its own is told where: the run's plots folder, never its default
    assert cli.suite_command("stages", out, True, plots)[2:] == ["benchmarks.bench_stages", "--out", str(out),
                                                                 "--plots", str(plots), "--quick"]


def test_run_moves_aside_plots_and_tables(tmp_path, monkeypatch):
    import benchmarks.__main__ as cli

    out, plots = tmp_path / "latest.csv", tmp_path / "plots"
    write_csv(out, [row(name="earlier")])
    calls = []

    def fake_suite(suite, path, quick, plots):
        calls.append((suite, path, quick))
        if suite == "loaders":
            return "failed (exit 2)"
        write_csv(path, [row(name=f"{suite}_op", median=2.0)])
        return "ok"

    monkeypatch.setattr(cli, "run_suite", fake_suite)
    rc = cli.main(["run", "--quick", "--suites", "kernels", "loaders", "--out", str(out), "--plots", str(plots)])
    assert rc == 1 and calls == [("kernels", out.resolve(), True), ("loaders", out.resolve(), True)]
    assert [r["name"] for r in report.read_rows(tmp_path / "latest.prev.csv")] == ["earlier"]
    assert [r["name"] for r in report.read_rows(out)] == ["kernels_op"]
    assert [p.name for p in plots.iterdir()] == ["kernels_op.png"]
    assert "| kernels_op | torch | 8x8 | time | 2 | 2 | 2 | ms |" in (tmp_path / "latest.md").read_text()


# ---- where runs write: the untracked folder by default, the committed baseline only on request ----------------
def _digests(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders)."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """The runner with its output folder in tmp and a tmp copy of the committed baseline (results/ and the README);
    suites replaced by a fake that writes one row per (name, provider) of ``names[suite]`` (median ``median``) and,
    for ``stages``, a figure of its own into the plots folder it is given."""
    import benchmarks.__main__ as cli

    results, readme, out = tmp_path / "results", tmp_path / "README.md", tmp_path / "out"
    shutil.copytree(cli.RESULTS, results, ignore=shutil.ignore_patterns("*.prev.csv"))
    shutil.copy(cli.README, readme)
    monkeypatch.setattr(cli, "RESULTS", results)
    monkeypatch.setattr(cli, "README", readme)
    monkeypatch.setattr(cli, "OUT", out)
    box = type("Sandbox", (), {})()
    box.cli, box.results, box.readme, box.out, box.kind = cli, results, readme, out, cli._device_kind()
    box.names = {s: [(f"{s}_op", "torch")] for s in cli.SUITES}
    box.median, box.fail, box.calls = 2.0, set(), []

    def fake_suite(suite, path, quick, plots):
        box.calls.append(suite)
        if suite in box.fail:
            return "failed (exit 1)"
        rows = [row(name=n, provider=p, median=box.median, timestamp="2030-01-01T00:00:00+00:00")
                for n, p in box.names[suite]]
        write_csv(path, (report.read_rows(path) if path.exists() else []) + rows)
        if suite == "stages":
            plots.mkdir(parents=True, exist_ok=True)
            (plots / "scaling_stages.png").write_bytes(b"\x89PNG\r\n\x1a\n fake figure")
        return "ok"

    monkeypatch.setattr(cli, "run_suite", fake_suite)
    return box


def test_default_run_leaves_the_committed_baseline_alone(sandbox, capsys):
    committed = _digests(sandbox.results, sandbox.readme)
    assert any(p.endswith(".png") for p in committed) and any(p.endswith(".csv") for p in committed)
    assert sandbox.cli.main(["run", "--suites", "kernels", "stages"]) == 0
    assert _digests(sandbox.results, sandbox.readme) == committed
    latest = sandbox.out / f"latest_{sandbox.kind}.csv"
    assert [r["name"] for r in report.read_rows(latest)] == ["kernels_op", "stages_op"]
    assert sorted(p.name for p in (sandbox.out / "plots").iterdir()) == ["kernels_op.png", "scaling_stages.png",
                                                                        "stages_op.png"]
    assert "| stages_op | torch |" in latest.with_suffix(".md").read_text()
    text = capsys.readouterr().out
    assert f"output: {latest}" in text and "--update-baseline writes it" in text and "baseline updated" not in text


def test_defaults_point_into_an_untracked_folder(monkeypatch, capsys):
    """The runner's and every suite's default output lies in benchmarks/out/, which git ignores and holds nothing
    tracked."""
    import importlib

    import benchmarks.__main__ as cli

    assert OUT == ROOT / "benchmarks" / "out" and not str(OUT).startswith(str(cli.RESULTS))
    monkeypatch.setenv("COLUMNS", "1000")                   # help lines unwrapped: whole paths
    for suite, wanted in [("kernels", ["kernels.csv"]), ("sass", ["sass.csv"]), ("loaders", ["loaders.csv"]),
                          ("stages", ["stages.csv", "plots"]), ("dist", ["dist.csv"])]:
        mod = importlib.import_module(f"benchmarks.bench_{suite}")
        with pytest.raises(SystemExit):
            mod.main(["--help"])
        help_text = capsys.readouterr().out
        for name in wanted:
            assert f"(default: {OUT / name})" in help_text, (suite, help_text)
    git = shutil.which("git")
    if git is None or subprocess.run([git, "-C", str(ROOT), "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    probe = OUT / "latest_cpu.csv"
    assert subprocess.run([git, "-C", str(ROOT), "check-ignore", "-q", str(probe)]).returncode == 0
    tracked = subprocess.run([git, "-C", str(ROOT), "ls-files", "--", str(OUT)], capture_output=True, text=True)
    assert tracked.stdout == ""


def _table_block(text: str, marker: str = "benchmarks-table") -> str:
    """What a README holds between the table markers."""
    start, end = f"<!-- {marker}:start -->\n", f"<!-- {marker}:end -->"
    return text[text.index(start) + len(start):text.index(end)]


@pytest.mark.slow
def test_update_baseline_writes_csv_plots_and_readme_table(sandbox, monkeypatch, capsys):
    base_csv, plots, marker = sandbox.cli.baseline_files(sandbox.kind)
    assert base_csv.parent == sandbox.results
    base_csv.write_bytes((ROOT / "benchmarks" / "results" / "baseline_cpu.csv").read_bytes())  # any kind: rows to keep
    old_text = base_csv.read_text()
    old_png = (plots / "masked_adam.png").read_bytes() if (plots / "masked_adam.png").exists() else None
    readme_before = sandbox.readme.read_text()
    plotted = []

    def spy_plot(rows, out_dir, _plot=report.plot):
        plotted.extend(rows)
        return _plot(rows, out_dir)

    monkeypatch.setattr(sandbox.cli.report, "plot", spy_plot)

    # a run of some suites: its rows replace the baseline's rows of each (name, provider) it measured, others stay
    sandbox.names["kernels"] = [("masked_adam", "torch-eager"), ("copy", "torch")]
    sandbox.median = 123.0
    assert sandbox.cli.main(["run", "--suites", "kernels", "stages", "--update-baseline"]) == 0
    measured = {("masked_adam", "torch-eager"), ("copy", "torch"), ("stages_op", "torch")}
    rows = report.read_rows(base_csv)
    assert {(r["name"], r["provider"]): r["median"] for r in rows if (r["name"], r["provider"]) in measured} == \
        dict.fromkeys(measured, 123.0)
    assert sum((r["name"], r["provider"]) in measured for r in rows) == 3                  # old rows of those gone
    old_lines = old_text.splitlines()[1:]
    kept = [line for line, r in zip(old_lines, csv.DictReader(old_text.splitlines()))
            if (r["name"], r["provider"]) not in measured]
    assert len(kept) < len(old_lines) and base_csv.read_text().splitlines()[1:len(kept) + 1] == kept  # same text
    # masked_adam's plot shows the baseline's rows of that name: the new times and the kept ones (sass's counts)
    assert {r["provider"] for r in plotted if r["name"] == "masked_adam"} == \
        {r["provider"] for r in rows if r["name"] == "masked_adam"} >= {"torch-eager", "torch-compile", "triton-sm90"}
    assert (plots / "masked_adam.png").read_bytes() != old_png
    assert (plots / "scaling_stages.png").read_bytes().endswith(b"fake figure")
    readme = sandbox.readme.read_text()
    assert _table_block(readme, marker) == report.markdown_table(rows)
    if marker in readme_before:                                                      # the rest of the README kept
        assert readme.replace(_table_block(readme, marker), "") == readme_before.replace(
            _table_block(readme_before, marker), "")
    assert "baseline updated (the rows of 3 (name, provider) pairs replaced)" in capsys.readouterr().out

    # a run of every suite replaces the whole baseline
    sandbox.median = 7.0
    assert sandbox.cli.main(["run", "--update-baseline"]) == 0
    assert [(r["name"], r["provider"]) for r in report.read_rows(base_csv)] == [
        pair for s in sandbox.cli.SUITES for pair in sandbox.names[s]]
    assert _table_block(sandbox.readme.read_text(), marker) == report.markdown_table(report.read_rows(base_csv))
    assert "baseline updated (replaced by this run)" in capsys.readouterr().out


def test_update_baseline_refused_for_quick_runs_and_failed_suites(sandbox, capsys):
    committed = _digests(sandbox.results, sandbox.readme)
    with pytest.raises(SystemExit) as e:
        sandbox.cli.main(["run", "--quick", "--update-baseline"])
    assert e.value.code == 2 and sandbox.calls == [] and "--quick" in capsys.readouterr().err
    sandbox.fail = {"loaders"}
    assert sandbox.cli.main(["run", "--suites", "kernels", "loaders", "--update-baseline"]) == 1
    assert sandbox.calls == ["kernels", "loaders"] and "baseline NOT updated" in capsys.readouterr().out
    assert _digests(sandbox.results, sandbox.readme) == committed
    assert (sandbox.out / f"latest_{sandbox.kind}.csv").exists()                    # the run itself is kept


def test_compare_defaults_to_the_latest_run_against_the_committed_baseline(sandbox, capsys):
    base_csv = sandbox.cli.baseline_files(sandbox.kind)[0]
    with pytest.raises(SystemExit, match="python -m benchmarks run writes it"):
        sandbox.cli.main(["compare"])
    write_csv(base_csv, [row(median=10.0)])
    sandbox.out.mkdir()
    write_csv(sandbox.out / f"latest_{sandbox.kind}.csv", [row(median=20.0)])
    assert sandbox.cli.main(["compare"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "1 slower"


def test_committed_table_and_plots_are_the_baselines():
    """benchmarks/README.md's table is that of the committed CSV, and every committed plot belongs to it."""
    import benchmarks.__main__ as cli

    base_csv, plots, marker = cli.baseline_files("cpu")
    rows = report.read_rows(base_csv)
    assert _table_block(cli.README.read_text(), marker) == report.markdown_table(rows)
    names = {report._slug(r["name"]) for r in rows} | {"scaling_stages"}
    assert {p.stem for p in plots.glob("*.png")} <= names
