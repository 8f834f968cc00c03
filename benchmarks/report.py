"""Reading, comparing, plotting and tabulating benchmark CSVs (the row format of ``benchmarks.common``).

Pure functions over rows (dicts with the keys of ``common.FIELDS``; ``median``, ``p20`` and ``p80`` as
floats), used by ``python -m benchmarks``:

* :func:`read_rows`, :func:`latest`   : load a CSV; keep the newest row of each measurement;
* :func:`compare`, :func:`format_compare` : baseline vs current, with a verdict per row;
* :func:`plot`                        : one PNG per benchmark name;
* :func:`markdown_table`, :func:`update_readme` : the table between a README's markers.

Every file is written atomically (``nrrdd.io``).
"""
from __future__ import annotations

import csv
import datetime as _dt
import re
from pathlib import Path

from nrrdd.io import atomic_save_figure, write_between_markers

#: What identifies one measurement across runs (``compare``); ``latest`` adds the device.
KEY = ("name", "provider", "shape", "metric", "unit")

# Which way is better, by metric first, then by unit: (sign, (word if better, word if worse)).
# sign +1: higher is better; -1: lower is better.
_SPEED_UP = (+1, ("faster", "slower"))
_SPEED_DOWN = (-1, ("faster", "slower"))
_SIZE_DOWN = (-1, ("smaller", "larger"))
_BY_METRIC = {"throughput": _SPEED_UP, "bandwidth": _SPEED_UP, "time": _SPEED_DOWN, "cold_compile": _SPEED_DOWN,
              "peak_rss": _SIZE_DOWN, "peak_cuda": _SIZE_DOWN,
              # counts read from compiled kernels (bench_sass): fewer is better, "min_bytes" is a constant
              "registers": _SIZE_DOWN, "spill": _SIZE_DOWN, "sass_instructions": _SIZE_DOWN,
              "instructions": _SIZE_DOWN, "requested_bytes": _SIZE_DOWN,
              "copies": _SIZE_DOWN}
_BY_UNIT = {"images/s": _SPEED_UP, "samples/s": _SPEED_UP, "image-steps/s": _SPEED_UP, "GB/s": _SPEED_UP,
            "ms": _SPEED_DOWN, "s": _SPEED_DOWN}
_SIZE_UNITS = {"bytes", "KiB", "kB", "MiB", "MB", "GiB", "GB"}


# ---- reading --------------------------------------------------------------------------------------
def read_rows(path: str | Path) -> list[dict]:
    """The rows of one benchmark CSV, in file order; ``median``, ``p20`` and ``p80`` as floats."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("median", "p20", "p80"):
            r[k] = float(r[k])
    return rows


def _time(row: dict) -> _dt.datetime:
    t = _dt.datetime.fromisoformat(row["timestamp"])
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def _newest(rows: list[dict], key: tuple[str, ...]) -> dict[tuple, dict]:
    """Per ``key``, the row with the newest timestamp (the later row in the list on a tie)."""
    out: dict[tuple, dict] = {}
    for r in rows:
        k = tuple(r[f] for f in key)
        if k not in out or _time(r) >= _time(out[k]):
            out[k] = r
    return out


def latest(rows: list[dict]) -> list[dict]:
    """Per (name, provider, shape, metric, unit, device), the row with the newest timestamp, in input order."""
    keep = {id(r) for r in _newest(rows, KEY + ("device",)).values()}
    return [r for r in rows if id(r) in keep]


# ---- comparing ------------------------------------------------------------------------------------
def direction(metric: str, unit: str) -> tuple[int, tuple[str, str]] | None:
    """Which way is better for a metric: (+1 higher / -1 lower, (better word, worse word)), or None if unknown.

    The metric decides first (``throughput``, ``time``, ``peak_rss``...), then the unit (``images/s``, ``ms``...);
    a unit counting bytes (``bytes``, ``MiB``, ``GB``..., also per something other than time, as in
    ``bytes/sample-epoch``) is a size, lower is better."""
    if metric in _BY_METRIC:
        return _BY_METRIC[metric]
    if unit in _BY_UNIT:
        return _BY_UNIT[unit]
    amount, _, per = unit.partition("/")
    if amount in _SIZE_UNITS and per not in ("s", "ms"):
        return _SIZE_DOWN
    return None


def _half_spread(row: dict) -> float:
    """Half the p20-p80 spread relative to the median (0 for a zero median)."""
    return abs(row["p80"] - row["p20"]) / 2 / abs(row["median"]) if row["median"] else 0.0


def _compare_one(base: dict, cur: dict, tolerance: float) -> dict:
    b, c = base["median"], cur["median"]
    change = (c - b) / abs(b) if b else (0.0 if c == b else float("inf") if c > b else float("-inf"))
    threshold = max(tolerance, _half_spread(base), _half_spread(cur))
    way = direction(base["metric"], base["unit"])
    if way is None:
        verdict = "n/a"
    elif abs(change) <= threshold:
        verdict = "same"
    else:
        sign, (better, worse) = way
        verdict = better if sign * change > 0 else worse
    note = "" if base["device"] == cur["device"] else f"different device: {base['device']} vs {cur['device']}"
    return dict(baseline=b, current=c, change=change, threshold=threshold, verdict=verdict, note=note)


def compare(baseline_rows: list[dict], current_rows: list[dict], tolerance: float = 0.05) -> list[dict]:
    """Baseline vs current, one result per measurement (matched by name, provider, shape, metric, unit; the
    newest row of each side).

    Each result has the key fields and ``baseline``, ``current`` (medians, None when absent), ``change`` (relative,
    current / baseline - 1, None when a side is absent), ``threshold`` and ``verdict``:

    * ``faster`` / ``slower`` (time, throughput) or ``smaller`` / ``larger`` (memory, bytes);
    * ``same`` when ``|change| <= threshold = max(tolerance, noise)``, the noise being the larger of the two rows'
      half p20-p80 spread relative to their median;
    * ``n/a`` for a metric of unknown direction (:func:`direction`);
    * ``missing`` (only in the baseline) or ``new`` (only in the current rows).

    ``note`` says "different device: A vs B" when the two rows come from different devices (compared anyway).
    Results follow the baseline's order, then the new rows in current order.
    """
    base, cur = _newest(baseline_rows, KEY), _newest(current_rows, KEY)
    out = []
    for k, b in base.items():
        res = dict(zip(KEY, k))
        if k in cur:
            res.update(_compare_one(b, cur[k], tolerance))
        else:
            res.update(baseline=b["median"], current=None, change=None, threshold=None, verdict="missing", note="")
        out.append(res)
    for k, c in cur.items():
        if k not in base:
            out.append(dict(zip(KEY, k), baseline=None, current=c["median"], change=None, threshold=None,
                            verdict="new", note=""))
    return out


def _aligned(header: tuple[str, ...], lines: list[tuple[str, ...]], right: set[int]) -> list[str]:
    """Plain-text columns, numbers (columns in ``right``) right-aligned."""
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    head = fmt(header).rstrip()
    return [head, "-" * len(head), *(fmt(x).rstrip() for x in lines)]


def format_compare(results: list[dict]) -> str:
    """A readable table of :func:`compare`'s results, then the device pairs of rows marked "different device" and
    a count of each verdict."""
    def num(x):
        return "-" if x is None else f"{x:.4g}"

    lines = []
    for r in results:
        change = "-" if r["change"] is None else f"{100 * r['change']:+.1f}%"
        verdict = r["verdict"] + (" (different device)" if r["note"] else "")
        lines.append((r["name"], r["provider"], r["shape"], f"{r['metric']} [{r['unit']}]",
                      num(r["baseline"]), num(r["current"]), change, verdict))
    header = ("name", "provider", "shape", "metric", "baseline", "current", "change", "verdict")
    notes = sorted({r["note"] for r in results if r["note"]})
    counts: dict[str, int] = {}
    for r in results:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    summary = ", ".join(f"{n} {v}" for v, n in sorted(counts.items())) or "no rows"
    return "\n".join(_aligned(header, lines, right={4, 5, 6}) + [""] + notes + [summary])


# ---- plotting -------------------------------------------------------------------------------------
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "benchmark"


def plot(rows: list[dict], out_dir: str | Path) -> list[Path]:
    """One PNG per benchmark ``name`` in ``out_dir`` (``<name>.png``), of the :func:`latest` rows.

    One subplot per (metric, unit); in each, a horizontal bar per (provider, shape) at the median with p20-p80
    error bars (the device is added to the label when the name's rows come from several devices).
    Returns the paths written."""
    from matplotlib.figure import Figure  # no pyplot: no global state; PNGs are drawn by Agg

    groups: dict[str, list[dict]] = {}
    for r in latest(rows):
        groups.setdefault(r["name"], []).append(r)
    paths = []
    for name, group in groups.items():
        panels: dict[tuple[str, str], list[dict]] = {}
        for r in group:
            panels.setdefault((r["metric"], r["unit"]), []).append(r)
        several_devices = len({r["device"] for r in group}) > 1
        n_bars = max(len(p) for p in panels.values())
        fig = Figure(figsize=(7, 1.0 + (0.35 * n_bars + 0.8) * len(panels)))
        axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
        for ax, ((metric, unit), panel) in zip(axes, panels.items()):
            labels = [f"{r['provider']}  {r['shape']}" + (f"  [{r['device']}]" if several_devices else "")
                      for r in panel]
            med = [r["median"] for r in panel]
            err = [[max(0.0, r["median"] - min(r["p20"], r["p80"])) for r in panel],
                   [max(0.0, max(r["p20"], r["p80"]) - r["median"]) for r in panel]]
            ax.barh(range(len(panel)), med, xerr=err, color="tab:blue", ecolor="black", capsize=3)
            ax.set_yticks(range(len(panel)), labels, fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{metric} [{unit}]", fontsize=9)
            ax.tick_params(axis="x", labelsize=8)
        fig.suptitle(name)
        fig.tight_layout()
        paths.append(atomic_save_figure(Path(out_dir) / f"{_slug(name)}.png", fig, dpi=100))
    return paths


# ---- README table ---------------------------------------------------------------------------------
def markdown_table(rows: list[dict]) -> str:
    """A markdown table of the :func:`latest` rows (name, provider, shape, metric, median, p20, p80, unit), sorted by
    name (file order within a name), under a line naming the device(s), torch and nrrdd versions and the newest
    timestamp; a device column is added when the rows come from several devices."""
    rows = sorted(latest(rows), key=lambda r: r["name"])
    if not rows:
        return "_no benchmark rows_\n"
    devices = sorted({r["device"] for r in rows})
    context = (f"device: {', '.join(devices)}; torch {', '.join(sorted({r['torch_version'] for r in rows}))}; "
               f"nrrdd {', '.join(sorted({r['package_version'] for r in rows}))}; "
               f"run {max(rows, key=_time)['timestamp']}")
    cols = ["name", "provider", "shape", "metric", "median", "p20", "p80", "unit"]
    cols += ["device"] if len(devices) > 1 else []

    def cell(r, c):
        v = r[c]
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = [context, "", "| " + " | ".join(cols) + " |",
             "|" + "|".join("---:" if c in ("median", "p20", "p80") else "---" for c in cols) + "|"]
    lines += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def update_readme(readme_path: str | Path, table: str, marker: str = "benchmarks-table") -> Path:
    """Put ``table`` between ``<!-- {marker}:start -->`` and ``<!-- {marker}:end -->`` in the file, keeping the rest
    (:func:`nrrdd.io.write_between_markers`: absent markers are added at the end of the file)."""
    return write_between_markers(readme_path, marker, table)
