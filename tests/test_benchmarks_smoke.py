"""The benchmark suites still run (tiny sizes; the figures themselves are not checked here, only that each
suite produces its rows): a benchmark that rots is found by CI, not by the next person who profiles."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest
from imagefolders import imagenet_jpegs

ROOT = Path(__file__).resolve().parent.parent


def _run(args, out: Path) -> list[dict]:
    res = subprocess.run([sys.executable, "-m", *args, "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    with out.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.skipif(not imagenet_jpegs(), reason="foolbox wheel (its 20 ImageNet JPEGs) not installed")
def test_loader_benchmark_writes_rows_per_provider(tmp_path):
    rows = _run(["benchmarks.bench_loaders", "--copies", "1", "--repeats", "1", "--jobs", "validation",
                 "--batch-size", "8", "--workers", "1"], tmp_path / "l.csv")
    providers = {r["provider"] for r in rows if r["metric"] == "throughput"}
    assert "torch" in providers
    assert all(float(r["median"]) > 0 for r in rows)


def test_stage_benchmark_label_storage_rows(tmp_path):
    rows = _run(["benchmarks.bench_stages", "--skip", "throughput", "memory", "scaling", "--plots",
                 str(tmp_path / "plots")], tmp_path / "s.csv")
    per = {(r["provider"], r["shape"]): float(r["median"]) for r in rows if r["metric"] == "per_sample_epoch"}
    # fp16 storage: soft = 2 bytes x C, DBR = 2 x 2 bytes, measured from the written files
    assert per[("soft", "C1000 E2 N40")] == 2000 and per[("dbr", "C1000 E2 N40")] == 4


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST not installed")
def test_dist_benchmark_runs_one_and_two_processes(tmp_path):
    rows = _run(["benchmarks.bench_dist", "--quick"], tmp_path / "d.csv")
    got = {(r["name"], r["provider"], r["metric"]) for r in rows}
    assert ("dist_refine", "1proc", "throughput") in got and ("dist_refine", "2proc", "speedup") in got
    assert all(float(r["median"]) > 0 for r in rows)
