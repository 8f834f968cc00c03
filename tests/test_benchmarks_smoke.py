"""The benchmark suites still run (tiny sizes; the figures themselves are not checked here, only that each
suite produces its rows): a benchmark that rots is found by CI, not by the next person who profiles."""
import csv
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from imagefolders import imagenet_jpegs

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is imported from the checkout (it is not installed)
    sys.path.append(str(ROOT))


def _committed() -> dict[str, str]:
    """sha256 of the committed baseline's files: the CSVs, plots and the README with its table."""
    files = sorted((ROOT / "benchmarks" / "results").rglob("*")) + [ROOT / "benchmarks" / "README.md"]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files
            if f.is_file() and not f.name.endswith(".prev.csv")}

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def leaves_the_baseline_alone():
    """No suite writes the committed baseline (a figure drawn to a default folder in benchmarks/results/ would)."""
    before = _committed()
    yield
    assert _committed() == before


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
    rows = _run(["benchmarks.bench_stages", "--skip", "throughput", "memory", "scaling", "set", "feed", "--plots",
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


def test_sass_benchmark_rows(tmp_path):
    """Compiled for sm_90 here: the masked Adam rows carry the bytes its memory instructions request per
    element next to the minimum (the fused kernel requests less than 5% more)."""
    pytest.importorskip("triton")
    rows = _run(["benchmarks.bench_sass", "--only", "masked_adam 100x3x224x224 mask[N,1] fp32 +bounds"],
                tmp_path / "k.csv")
    got = {r["metric"]: float(r["median"]) for r in rows if r["provider"] == "triton-sm90" and "int64" not in r["shape"]}
    assert got["spill"] == 0 and got["registers"] > 0
    assert got["min_bytes"] <= got["requested_bytes"] <= 1.05 * got["min_bytes"]


def test_prev_kernels_load_beside_the_current_ones():
    """bench_kernels --prev-kernels: an earlier kernels/ folder loads as a second package whose operators live
    in the namespace nrrdd_prev, and runs beside the current one (here the current folder itself, through the
    Triton interpreter: the same bits)."""
    import torch

    from nrrdd.kernels._backend import triton_available, triton_interpreting

    if not (triton_available() and triton_interpreting()):
        pytest.skip("needs the Triton interpreter")
    from benchmarks.bench_kernels import load_prev_kernels
    from nrrdd.kernels import dbr_loss, masked_adam_

    prev_adam, prev_dbr = load_prev_kernels(ROOT / "kernels")
    assert prev_dbr.__name__ == "nrrdd_prev_kernels.dbr" and hasattr(torch.ops.nrrdd_prev, "dbr_loss_rows")
    g = torch.Generator().manual_seed(0)
    x, grad = torch.randn(2, 3, 5, 6, generator=g), torch.randn(2, 3, 5, 6, generator=g)
    mask = (torch.rand(2, 1, 5, 6, generator=g) > 0.5).float()
    a = [x.clone(), torch.zeros_like(x), torch.zeros_like(x)]
    b = [x.clone(), torch.zeros_like(x), torch.zeros_like(x)]
    masked_adam_(*a[:1], grad, mask, *a[1:], step=1, lr=0.1, backend="triton")
    prev_adam.masked_adam_(*b[:1], grad, mask, *b[1:], step=1, lr=0.1, backend="triton")
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and not torch.equal(a[0], x)
    z, y, f = torch.randn(3, 10, generator=g), torch.tensor([1, 2, 3]), torch.rand(3, generator=g)
    assert torch.equal(dbr_loss(z, y, y, f, f, f, backend="triton"), prev_dbr.dbr_loss(z, y, y, f, f, f, backend="triton"))


def test_set_memory_and_feed_rows(tmp_path):
    rows = _run(["benchmarks.bench_stages", "--quick", "--skip", "throughput", "memory", "scaling", "storage"],
                tmp_path / "m.csv")
    got = {(r["provider"], r["metric"], r["unit"]) for r in rows if r["name"] == "set_memory"}
    assert got == {("refine", "copies", "x set"), ("write", "copies", "x set")}
    feed = {r["provider"]: float(r["median"]) for r in rows if r["name"] == "feed" and r["metric"] == "throughput"}
    assert set(feed) == {"set_on_device", "streamed"} and min(feed.values()) > 0
