"""benchmarks/report.py and ``python -m benchmarks``: comparing, tabulating and plotting benchmark CSVs."""
from __future__ import annotations

import csv
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
from benchmarks.common import FIELDS  # noqa: E402


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
    out = tmp_path / "out.csv"
    assert cli.run_suite("ok", out, quick=False) == "ok"
    assert out.read_text() == f"--out {out}"
    assert cli.run_suite("bad", out, quick=False) == "failed (exit 3)"
    assert cli.run_suite("none", out, quick=False) == "missing"


def test_run_moves_aside_plots_and_tables(tmp_path, monkeypatch):
    import benchmarks.__main__ as cli

    out, plots, readme = tmp_path / "latest.csv", tmp_path / "plots", tmp_path / "README.md"
    write_csv(out, [row(name="earlier")])
    calls = []

    def fake_suite(suite, path, quick):
        calls.append((suite, path, quick))
        if suite == "loaders":
            return "failed (exit 2)"
        write_csv(path, [row(name=f"{suite}_op", median=2.0)])
        return "ok"

    monkeypatch.setattr(cli, "run_suite", fake_suite)
    rc = cli.main(["run", "--quick", "--suites", "kernels", "loaders", "--out", str(out), "--plots", str(plots),
                   "--readme", str(readme)])
    assert rc == 1 and calls == [("kernels", out.resolve(), True), ("loaders", out.resolve(), True)]
    assert [r["name"] for r in report.read_rows(tmp_path / "latest.prev.csv")] == ["earlier"]
    assert [r["name"] for r in report.read_rows(out)] == ["kernels_op"]
    assert [p.name for p in plots.iterdir()] == ["kernels_op.png"]
    assert "| kernels_op | torch | 8x8 | time | 2 | 2 | 2 | ms |" in readme.read_text()
