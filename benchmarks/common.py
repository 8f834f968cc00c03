"""What every benchmark shares: the CSV row format, quantiles, and the run's context (device, versions)."""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import threading
from pathlib import Path

import torch

#: Where runs write by default (git-ignored): a run never touches the committed baseline in benchmarks/results/
#: unless asked to (``python -m benchmarks run --update-baseline``).
OUT = Path(__file__).resolve().parent / "out"

FIELDS = [
    "name", "provider", "shape", "metric", "unit", "median", "p20", "p80",
    "device", "torch_version", "package_version", "timestamp",
]


def quantiles(ts: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80)."""
    ts = sorted(ts)
    if len(ts) == 1:
        return ts[0], ts[0], ts[0]
    q = statistics.quantiles(ts, n=10, method="inclusive")  # deciles
    return statistics.median(ts), q[1], q[7]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"cpu {cpu} ({torch.get_num_threads()} threads)"


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("nrrdd")
    except Exception:
        return "unknown"


class Recorder:
    """Collects CSV rows that share the run's context."""

    def __init__(self, device: torch.device):
        self.rows: list[dict] = []
        self.table: list[tuple] = []
        self.common = dict(
            device=device_name(device),
            torch_version=torch.__version__,
            package_version=package_version(),
            timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )

    def add(self, name, provider, shape, metric, unit, med, p20, p80):
        self.rows.append(
            dict(name=name, provider=provider, shape=shape, metric=metric, unit=unit,
                 median=f"{med:.6g}", p20=f"{p20:.6g}", p80=f"{p80:.6g}", **self.common)
        )

    def write_csv(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerows(self.rows)


def _tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/statm") as f:
                rss[int(d)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [root]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


class PeakMemory:
    """Samples the resident memory of this process and its children every ``every`` seconds."""

    def __init__(self, every: float = 0.01):
        self.every, self.peak = every, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        pid = os.getpid()
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_bytes(pid))
            self._stop.wait(self.every)

    def __enter__(self):
        self.peak = _tree_rss_bytes(os.getpid())
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
