"""Compile the Triton kernels for a GPU that is not here, and read what that GPU would run.

    python -m nrrdd.kernels.aot                 # table: every kernel variant for sm_80, sm_90, sm_100
    python -m nrrdd.kernels.aot --arch 90 --json out.json

Triton's compiler and NVIDIA's assembler and disassembler (ptxas, cuobjdump, shipped inside the
triton wheel) need no GPU and no driver.  For each variant below this module builds the launch the
host launcher would make (``plan_masked_adam`` / ``plan_dbr_rows`` / ``plan_dbr_distances``: same
arguments, same constexprs, same ``num_warps``), lets Triton specialise the arguments as its own
launcher does (16-divisibility of pointers and integers), compiles for the target
(``GPUTarget("cuda", arch, 32)``: 80 = A100, 90 = H100/H200, 100 = B200) and reads back from the cubin:

* registers per thread, local memory (spills), shared memory;
* the SASS: instruction count and every global load (LDG) and store (STG) with its width;
* for straight-line kernels (no loop), the global bytes requested per element, next to the minimum
  the op must move.

This checks that the kernels compile for real GPUs (the interpreter accepts code the compiler
rejects) and how they access memory.  It measures no time: that needs a GPU (benchmarks/README.md).
Interpreter-mode kernels cannot be compiled: run this with ``TRITON_INTERPRET`` unset or 0.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ._backend import Launch, triton_available, triton_interpreting

ARCHS = (80, 90, 100)

_MEM_RE = re.compile(r"\b(LDG|STG)((?:\.[A-Z0-9_]+)*)")
_LABEL_RE = re.compile(r"^\s*(\w+):\s*$")
_BRA_RE = re.compile(r"\bBRA\s+`?\(?(\w+)")
_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclass
class Variant:
    """One kernel launch to compile: ``name``, the Launch, and the elements it covers with the
    minimum global bytes it must move (for the bytes-per-element figure)."""

    name: str
    launch: Launch
    elements: int
    min_bytes: int


@dataclass
class Report:
    variant: str
    kernel: str
    arch: int
    num_warps: int
    registers: int
    local_bytes: int  # register spills, per thread
    stack_bytes: int  # call frames (the slow paths of IEEE division and square root), per thread
    shared_bytes: int
    sass_instructions: int  # all of the kernel's code
    main_instructions: int  # without the subroutines it calls (slow paths of IEEE division and square root)
    loads: dict = field(default_factory=dict)  # "LDG.E.128" -> count
    stores: dict = field(default_factory=dict)
    has_loop: bool = False
    load_bytes_per_element: float | None = None  # straight-line kernels only
    store_bytes_per_element: float | None = None
    instructions_per_element: float | None = None  # main_instructions per element
    min_bytes_per_element: float | None = None


def _width(suffix: str) -> int:
    """Bytes moved by one thread's LDG/STG with these suffixes (.E.128 -> 16, .E.U16 -> 2, .E -> 4)."""
    for s in suffix.split("."):
        if s in ("128", "64"):
            return int(s) // 8
        if s in ("U16", "S16"):
            return 2
        if s in ("U8", "S8"):
            return 1
    return 4


def _jit(kernel):
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    raise RuntimeError(
        "nrrdd.kernels.aot: the kernels were built for the Triton interpreter (TRITON_INTERPRET=1); "
        "run `TRITON_INTERPRET=0 python -m nrrdd.kernels.aot` in a fresh process"
    )


def compile_launch(launch: Launch, arch: int):
    """Compile ``launch`` for ``sm_<arch>`` as Triton's launcher would: returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = _jit(launch.kernel)
    target = GPUTarget("cuda", int(arch), 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    meta = dict(launch.meta)
    bound, specialization, options = binder(*launch.args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    from triton import knobs

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([knobs.nvidia.cuobjdump.path, flag, str(path)], capture_output=True, text=True,
                             check=True)
    return out.stdout


def _has_loop(lines: list[str]) -> bool:
    """A branch back to an earlier label, other than the end-of-kernel trap (``L: BRA L;``)."""
    seen: dict[str, int] = {}
    for i, line in enumerate(lines):
        m = _LABEL_RE.match(line)
        if m:
            seen[m.group(1)] = i
            continue
        b = _BRA_RE.search(line)
        if b and b.group(1) in seen and seen[b.group(1)] != i - 1:
            return True
    return False


def analyse(variant: Variant, arch: int) -> Report:
    """Compile one variant for ``sm_<arch>`` and read its resources and memory instructions."""
    ck = compile_launch(variant.launch, arch)
    cubin = ck.asm["cubin"]
    res = _RES_RE.search(_cuobjdump(cubin, "-res-usage"))
    if res is None:
        raise RuntimeError("nrrdd.kernels.aot: could not read the resource usage of the cubin")
    regs, stack, shared, local = map(int, res.groups())
    sass = [ln for ln in _cuobjdump(cubin, "-sass").splitlines() if ln.strip()]
    instr = [ln for ln in sass if re.match(r"\s*/\*[0-9a-f]{4}\*/", ln)]
    # subroutines (CALL targets) sit after the kernel's body; they run only for rare operands
    calls = [int(c, 16) for c in re.findall(r"CALL\.REL(?:\.NOINC)?\s+(0x[0-9a-f]+)", "\n".join(instr))]
    first_sub = min(calls) if calls else None
    main = [ln for ln in instr
            if first_sub is None or int(re.match(r"\s*/\*([0-9a-f]{4,})\*/", ln).group(1), 16) < first_sub]
    loads, stores = Counter(), Counter()
    ld_bytes = st_bytes = 0
    for ln in instr:
        m = _MEM_RE.search(ln)
        if m:
            op = m.group(1) + m.group(2)
            (loads if m.group(1) == "LDG" else stores)[op] += 1
            if m.group(1) == "LDG":
                ld_bytes += _width(m.group(2))
            else:
                st_bytes += _width(m.group(2))
    from triton.tools.disasm import get_sass

    loop = _has_loop(get_sass(cubin).splitlines())
    warps = int(variant.launch.meta.get("num_warps", 4))
    rep = Report(
        variant=variant.name, kernel=ck.name, arch=int(arch), num_warps=warps, registers=regs,
        local_bytes=local, stack_bytes=stack, shared_bytes=max(shared, int(ck.metadata.shared)),
        sass_instructions=len(instr), main_instructions=len(main), loads=dict(sorted(loads.items())), stores=dict(sorted(stores.items())),
        has_loop=loop,
    )
    if variant.elements:
        rep.min_bytes_per_element = variant.min_bytes / variant.elements
        if not loop:
            threads = 32 * warps
            programs = 1
            for g in variant.launch.grid:
                programs *= int(g)
            per = threads * programs / variant.elements
            rep.load_bytes_per_element = ld_bytes * per
            rep.store_bytes_per_element = st_bytes * per
            rep.instructions_per_element = len(main) * per
    return rep


# ----------------------------------------------------------------------------
# the variants the launchers produce, at the sizes of real runs
# ----------------------------------------------------------------------------


def masked_adam_variants(shape=(100, 3, 224, 224)) -> list[Variant]:
    """Refinement's step on one batch (100 images of 224 px, RGB) and the other launcher branches."""
    from .masked_adam import plan_masked_adam

    N, C, H, W = shape
    x = torch.empty(shape)
    t = lambda: torch.empty(shape)  # noqa: E731
    mask1 = torch.empty(N, 1, H, W)
    lo, hi = torch.full((C,), -2.0), torch.full((C,), 2.0)
    n = x.numel()
    state = 7 * 4 * n  # read x, g, m, v; write x, m, v (fp32)
    out = []

    def add(name, mask, mask_bytes, beta1=0.5, bounds=True, big=False):
        launch, _ = plan_masked_adam(x, t(), mask, t(), t(), step=3, lr=0.25, beta1=beta1,
                                     lo=lo if bounds else None, hi=hi if bounds else None)
        if big:  # the same launch as for >= 2**31 elements (64-bit offsets); not allocated here
            launch.meta["IDX64"] = True
        out.append(Variant(f"masked_adam {name}", launch, n, state + mask_bytes + (8 * C if bounds else 0)))

    sshape = "x".join(map(str, shape))
    add(f"{sshape} mask[N,1] fp32 +bounds", mask1, 4 * N * H * W)
    add(f"{sshape} mask[N,1] bool +bounds", torch.empty(N, 1, H, W, dtype=torch.bool), N * H * W)
    add(f"{sshape} mask[N,C] fp32", torch.empty(shape), 4 * n, bounds=False)
    add(f"{sshape} no mask, beta1 0.9", None, 0, beta1=0.9, bounds=False)
    add(f"{sshape} mask[N,1] fp32 +bounds int64", mask1, 4 * N * H * W, big=True)
    return out


def dbr_variants(B: int = 256, classes=(1000, 21841), dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    """DBR's student step (loss + gradient, l1 and l2), its no-grad loss, and relabelling's distances,
    at B = 256 for ImageNet-1K (C = 1000) and ImageNet-21K (C = 21841)."""
    from .dbr import plan_dbr_distances, plan_dbr_rows

    out = []
    y = torch.zeros(B, dtype=torch.long)
    f = torch.zeros(B)
    for C in classes:
        for dt in dtypes:
            z = torch.empty(B, C, dtype=dt)
            e = z.element_size()
            tag = f"{B}x{C} {str(dt).split('.')[-1]}"
            small = 2 * 8 * B + 3 * 4 * B + 4 * B  # labels, lam + teacher distances, loss rows
            for name, kw, min_bytes in (
                ("loss+grad l1", dict(squared=False, compute_grad=True), 2 * e * B * C + small),
                ("loss+grad l2", dict(squared=True, compute_grad=True), 2 * e * B * C + small),
                ("loss no-grad", dict(squared=False, compute_grad=False), e * B * C + small),
            ):
                launch, _ = plan_dbr_rows(z, y, y, f, f, f, 1.0, 1.0, grad_scale=1.0 / B, **kw)
                out.append(Variant(f"dbr {name} {tag}", launch, B * C, min_bytes))
            launch, _ = plan_dbr_distances(z, y, y, 1.0)
            out.append(Variant(f"dbr distances {tag}", launch, B * C, e * B * C + 2 * 8 * B + 2 * 4 * B))
    return out


def all_variants() -> list[Variant]:
    return masked_adam_variants() + dbr_variants()


def run(archs=ARCHS, variants: list[Variant] | None = None) -> list[Report]:
    if not triton_available():
        raise RuntimeError("nrrdd.kernels.aot: Triton is not importable")
    if triton_interpreting():
        _jit(None)  # raises the explanation
    variants = all_variants() if variants is None else variants
    return [analyse(v, a) for a in archs for v in variants]


def _fmt_mem(c: dict) -> str:
    return " ".join(f"{k.replace('.E', '')}x{n}" for k, n in c.items()) or "-"


def print_table(reports: list[Report], file=sys.stdout) -> None:
    hdr = ("variant", "sm", "warps", "regs", "spill", "stack", "smem", "instr", "main", "B/elem ld+st (min)",
           "loads", "stores")
    fmt = "{:<50} {:>3} {:>5} {:>4} {:>5} {:>5} {:>5} {:>5} {:>5}  {:<18} {:<30} {}"
    print(fmt.format(*hdr), file=file)
    print("-" * 170, file=file)
    for r in reports:
        if r.load_bytes_per_element is not None:
            bpe = f"{r.load_bytes_per_element + r.store_bytes_per_element:.1f} ({r.min_bytes_per_element:.1f})"
        else:
            bpe = "loop"
        print(fmt.format(r.variant, r.arch, r.num_warps, r.registers, r.local_bytes, r.stack_bytes, r.shared_bytes,
                         r.sass_instructions, r.main_instructions, bpe, _fmt_mem(r.loads), _fmt_mem(r.stores)), file=file)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nrrdd.kernels.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities x10 (80 90 100)")
    ap.add_argument("--only", default="", help="only variants whose name contains this text")
    ap.add_argument("--json", type=Path, help="also write the reports here")
    args = ap.parse_args(argv)
    variants = [v for v in all_variants() if args.only in v.name]
    reports = run(args.arch, variants)
    print_table(reports)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in reports], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
