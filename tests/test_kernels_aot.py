"""The Triton kernels compiled for real GPUs (sm_80 A100, sm_90 H100/H200, sm_100 B200) on this CPU-only
machine, by Triton's own compiler and NVIDIA's ptxas (nrrdd.kernels.aot): the interpreter runs code the
compiler would reject, so the interpreter tests alone do not show that the kernels build for a GPU.

Each variant is the launch the host launcher builds at the size of a real run (refinement batch
100 x 3 x 224 x 224; DBR at B = 256 for C = 1000 and 21841, fp32/bf16/fp16). Checked from the cubin:
it compiles, nothing spills, and the memory instructions are the ones the kernels were written for.
No timing: that needs a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nrrdd.kernels import aot

pytestmark = [pytest.mark.skipif(not aot.supported(), reason="needs Triton 3.4 or newer (nrrdd.kernels.aot)"),
              pytest.mark.slow]

ARCHS = (80, 90, 100)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    # a fresh process without the interpreter: conftest.py set TRITON_INTERPRET=1 for this one
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, "-m", "nrrdd.kernels.aot", "--arch", *map(str, ARCHS), "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _pick(reports, prefix):
    rows = [r for r in reports if r["variant"].startswith(prefix)]
    assert rows, f"no variant named {prefix!r}"
    return rows


def test_every_variant_compiles_for_every_arch_without_spilling(reports):
    names = {v.name for v in aot.all_variants()}
    assert {(r["variant"], r["arch"]) for r in reports} == {(n, a) for n in names for a in ARCHS}
    for r in reports:
        assert r["sass_instructions"] > 0, r
        assert r["local_bytes"] == 0, f"{r['variant']} spills {r['local_bytes']} bytes on sm_{r['arch']}"
        assert r["registers"] <= 128, r  # at most 128: 4 warps of 128 threads keep 4 programs per SM


def test_masked_adam_moves_close_to_the_minimum(reports):
    """Straight-line code (one pass, no loop) whose global loads and stores request at most 5% more bytes per
    element than the op must move at the refinement batch's size: x, g, m, v read and x, m, v written once with
    16-byte accesses, the broadcast mask read once for all channels, the bounds once per program. (Requested
    bytes count idle lanes of a partial block too: 30 x 30 planes in blocks of 1024 request 18% more.)"""
    for r in _pick(reports, "masked_adam"):
        assert not r["has_loop"], r["variant"]
        moved = r["load_bytes_per_element"] + r["store_bytes_per_element"]
        assert moved >= r["min_bytes_per_element"], (r["variant"], r["arch"], moved)  # the count misses nothing
        if "224x224" in r["variant"]:
            assert moved <= 1.05 * r["min_bytes_per_element"], (r["variant"], r["arch"], moved,
                                                                r["min_bytes_per_element"])
        # 16-byte accesses also where H*W divides by 4 only (30 x 30) and for one channel (28 x 28)
        assert set(r["stores"]) == {"STG.E.128"}, (r["variant"], r["arch"], r["stores"])


def test_64_bit_launches_compute_offsets_in_64_bits(reports):
    """Tensors of 2**31 elements or more: no 32-bit arithmetic on a value derived from the program id (the
    flat path once multiplied its block index by BLOCK in 32 bits; this check finds that)."""
    rows = [r for r in _pick(reports, "masked_adam") if "int64" in r["variant"]]
    assert {r["variant"].split(" ", 2)[2] for r in rows} == {"mask[N,1] fp32 +bounds int64", "no mask int64"}
    for r in rows:
        assert r["i32_index_arithmetic"] == 0, (r["variant"], r["arch"])


def test_dbr_kernels_are_found_to_loop(reports):
    """The DBR kernels stream each row in blocks: the loop detector must see that on every arch (sm_100
    branches back with BRA.U), or it would report bytes per element for code that runs many times."""
    for r in _pick(reports, "dbr "):
        assert r["has_loop"] and r["load_bytes_per_element"] is None, (r["variant"], r["arch"])


@pytest.mark.parametrize("dtype,narrow", [("float32", "LDG.E"), ("bfloat16", "LDG.E.U16"), ("float16", "LDG.E.U16")])
def test_dbr_rows_of_imagenet_1k_are_read_with_16_byte_loads(reports, dtype, narrow):
    """C = 1000 divides by 8 but not 16: without the kernel's alignment hint every logit was a separate
    2- or 4-byte load. With it, the rows stream in 16-byte loads; only the per-row scalars (the two
    labels' logits, lam, the teacher's distances) stay narrow."""
    for r in _pick(reports, "dbr "):
        if not r["variant"].endswith(f"256x1000 {dtype}"):
            continue
        assert r["loads"].get("LDG.E.128", 0) >= 1, (r["variant"], r["arch"], r["loads"])
        assert r["loads"].get(narrow, 0) <= 5, (r["variant"], r["arch"], r["loads"])
        if "loss+grad" in r["variant"]:  # the gradient row is written with 16-byte stores too
            assert r["stores"].get("STG.E.128", 0) >= 1, (r["variant"], r["arch"], r["stores"])
