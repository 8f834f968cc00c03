#!/usr/bin/env python
"""What the Triton kernels would run on a GPU, read from their compiled code: no GPU needed.

Every launch variant of ``nrrdd.kernels.aot`` (the launches the host launchers build at the sizes of real
runs) is compiled here for each ``--arch`` (sm_90 = H100/H200 by default; ``--quick``: sm_90 only, which is
also the default) by Triton's compiler and ptxas, and its cubin read back. Rows, provider ``triton-sm<arch>``:

* ``registers`` per thread and ``spill`` bytes per thread (local memory);
* ``sass_instructions``: the kernel's static instruction count;
* for straight-line kernels (masked Adam), ``requested_bytes`` and ``min_bytes``: the global bytes its loads
  and stores request per element against the bytes the op must move, and ``instructions`` per element.

These are counts, not times: they show how a kernel accesses memory and how much work it issues, and a
change to a kernel shows up here on any machine. Times need a GPU (``bench_kernels``).

    python -m benchmarks.bench_sass [--arch 80 90 100]    # rows appended to benchmarks/out/sass.csv (untracked)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import OUT, Recorder


def _reports(archs: list[int], only: str = "") -> list[dict]:
    """Run the compiler in a fresh process without the Triton interpreter (it cannot compile interpreter
    kernels) and read its reports."""
    import json

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "aot.json"
        env = dict(os.environ, TRITON_INTERPRET="0")
        cmd = [sys.executable, "-m", "nrrdd.kernels.aot", "--arch", *map(str, archs), "--only", only,
               "--json", str(out)]
        subprocess.run(cmd, env=env, check=True, stdout=sys.stderr)
        return json.loads(out.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT / "sass.csv", help="CSV, rows appended (default: %(default)s)")
    ap.add_argument("--arch", type=int, nargs="+", default=[90])
    ap.add_argument("--quick", action="store_true", help="sm_90 only (the default already)")
    ap.add_argument("--only", default="", help="only variants whose name contains this text")
    args = ap.parse_args(argv)
    archs = [90] if args.quick else args.arch
    rec = Recorder(torch.device("cpu"))
    reports = _reports(archs, args.only)
    for r in reports:
        op, _, rest = r["variant"].partition(" ")
        prov = f"triton-sm{r['arch']}"
        one = lambda metric, unit, v: rec.add(op, prov, rest, metric, unit, v, v, v)  # noqa: E731
        one("registers", "regs/thread", r["registers"])
        one("spill", "bytes", r["local_bytes"])
        one("sass_instructions", "instr", r["sass_instructions"])
        if r["load_bytes_per_element"] is not None:
            one("requested_bytes", "B/elem", r["load_bytes_per_element"] + r["store_bytes_per_element"])
            one("min_bytes", "B/elem", r["min_bytes_per_element"])
            one("instructions", "instr/elem", r["instructions_per_element"])
    rec.write_csv(args.out)
    from nrrdd.kernels.aot import Report, print_table

    print_table([Report(**r) for r in reports])
    return 0


if __name__ == "__main__":
    sys.exit(main())
