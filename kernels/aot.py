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

# LDG/STG with their suffixes, not LDGSTS / LDGDEPBAR (async copies to shared memory)
_MEM_RE = re.compile(r"\b(LDG|STG)((?:\.[A-Z0-9_]+)*)(?![\w])")
_ADDR_RE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/")
# a branch and its target address, in cuobjdump's raw SASS: "@!P0 BRA 0x9f0", "BRA.U !UP0, 0x2e0"
_BRA_RE = re.compile(r"\bBRA(?:\.[A-Z]+)*\s+(?:[!@A-Z0-9]+\s*,\s*)?`?\(?(0x[0-9a-f]+)")
_CALL_RE = re.compile(r"\bCALL\.REL(?:\.NOINC)?\s+(0x[0-9a-f]+)")
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
    i32_index_arithmetic: int = 0  # 64-bit-offset launches only: 32-bit integer ops on program-id values
    loads: dict = field(default_factory=dict)  # "LDG.E.128" -> count
    stores: dict = field(default_factory=dict)
    has_loop: bool = False
    load_bytes_per_element: float | None = None  # straight-line kernels only
    store_bytes_per_element: float | None = None
    instructions_per_element: float | None = None  # main_instructions per element
    min_bytes_per_element: float | None = None


def _width(suffix: str) -> int:
    """Bytes moved by one thread's LDG/STG with these suffixes (.E.128 -> 16, .E.U16 -> 2, .E -> 4)."""
    for part in suffix.split("."):
        if part in ("256", "128", "64"):
            return int(part) // 8
        if part in ("U16", "S16"):
            return 2
        if part in ("U8", "S8"):
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


def _sass_body(instr: list[str]) -> tuple[list[str], bool]:
    """(the kernel's own code, whether it loops), from cuobjdump's SASS lines with their addresses.

    Left out: the subroutines it calls (each from a CALL target to its RET: the slow paths of IEEE division
    and square root, run only for rare operands; ptxas also uses CALL as a plain jump, with no RET) and what follows the end-of-kernel trap (a branch to
    itself). A loop is a branch back to an address before its own."""
    addrs = [int(_ADDR_RE.match(line).group(1), 16) for line in instr]
    skip = [False] * len(instr)
    for t in {int(c, 16) for line in instr for c in _CALL_RE.findall(line)}:
        start = addrs.index(t) if t in addrs else len(instr)
        for end in range(start, len(instr)):
            if re.search(r"\bRET\b", instr[end]):  # a subroutine; a CALL that never returns is a jump
                skip[start:end + 1] = [True] * (end + 1 - start)
                break
    main, loop = [], False
    for line, addr, sub in zip(instr, addrs, skip):
        b = _BRA_RE.search(line)
        target = int(b.group(1), 16) if b else None
        if target == addr:          # the trap: the kernel's code is over
            break
        if sub:
            continue
        main.append(line)
        if target is not None and target < addr:
            loop = True
    return main, loop


_DEF_RE = re.compile(r"^\s*(%[\w]+)(?::\d+)?\s*=\s*([\w.]+)\s+(.*)$")


def _i32_program_id_arithmetic(ttir: str) -> int:
    """32-bit integer multiplies, adds and subtractions on values derived from the program id, in Triton's IR.

    A launch for tensors of 2**31 elements or more must compute every offset in 64 bits: one such op can
    wrap an offset (as the flat path's block offset did before it widened the program id first)."""
    tainted: set[str] = set()
    bad = 0
    for line in ttir.splitlines():
        m = _DEF_RE.match(line)
        if not m:
            continue
        name, op, rest = m.groups()
        rest = rest.split(" loc(")[0]
        uses = set(re.findall(r"%[\w]+", rest))
        if op == "tt.get_program_id" or uses & tainted:
            tainted.add(name)
            if op in ("arith.muli", "arith.addi", "arith.subi") and re.search(r"\bi32\b|xi32>", rest):
                bad += 1
    return bad


def analyse(variant: Variant, arch: int) -> Report:
    """Compile one variant for ``sm_<arch>`` and read its resources and memory instructions."""
    ck = compile_launch(variant.launch, arch)
    cubin = ck.asm["cubin"]
    res = _RES_RE.search(_cuobjdump(cubin, "-res-usage"))
    if res is None:
        raise RuntimeError("nrrdd.kernels.aot: could not read the resource usage of the cubin")
    regs, stack, shared, local = map(int, res.groups())
    instr = [ln for ln in _cuobjdump(cubin, "-sass").splitlines() if _ADDR_RE.match(ln)]
    main, loop = _sass_body(instr)
    loads, stores = Counter(), Counter()
    ld_bytes = st_bytes = 0
    for ln in main:
        m = _MEM_RE.search(ln)
        if m:
            op = m.group(1) + m.group(2)
            (loads if m.group(1) == "LDG" else stores)[op] += 1
            if m.group(1) == "LDG":
                ld_bytes += _width(m.group(2))
            else:
                st_bytes += _width(m.group(2))
    i32_mul = _i32_program_id_arithmetic(ck.asm["ttir"]) if variant.launch.meta.get("IDX64") else 0
    warps = int(variant.launch.meta.get("num_warps", 4))
    rep = Report(
        variant=variant.name, kernel=ck.name, arch=int(arch), num_warps=warps, registers=regs,
        local_bytes=local, stack_bytes=stack, shared_bytes=max(shared, int(ck.metadata.shared)),
        sass_instructions=len(instr), main_instructions=len(main), i32_index_arithmetic=i32_mul,
        loads=dict(sorted(loads.items())), stores=dict(sorted(stores.items())), has_loop=loop,
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
    """Refinement's step on one batch (100 images of 224 px, RGB), the other launcher branches, and the
    shapes that take other paths: Fashion-MNIST's one channel (flat), 30 x 30 planes (H*W divides by 4, not 16)."""
    from .masked_adam import AdamStep, plan_masked_adam

    out = []

    def add(name, shape, mask_shape=None, mask_dtype=torch.float32, beta1=0.5, bounds=True, big=False):
        N, C, H, W = shape
        t = lambda: torch.empty(shape)  # noqa: E731
        mask = None if mask_shape is None else torch.empty(mask_shape, dtype=mask_dtype)
        lo, hi = (torch.full((C,), -2.0), torch.full((C,), 2.0)) if bounds else (None, None)
        launch, _ = plan_masked_adam(t(), t(), mask, t(), t(), AdamStep(step=3, lr=0.25, beta1=beta1, lo=lo, hi=hi))
        n = N * C * H * W
        if big:  # the launch for 3 * 2**30 elements (64-bit offsets), without allocating them: same kernel,
            # only the sizes differ (x, its plane count and the grid scaled by the same factor)
            k = 3 * 2**30 // n
            args = list(launch.args)
            if launch.meta["CH"] == 1 and args[7] == 1:       # flat: one plane of n elements
                args[8] *= k                                   # HW
                args[9] = -(-args[8] // launch.meta["BLOCK"])  # n_blocks
                launch.grid = (args[9],)
            else:                                              # k times the images
                launch.grid = (launch.grid[0] * k,)
            launch.args = tuple(args)
            launch.meta["IDX64"] = True
            n *= k
        mask_bytes = 0 if mask is None else mask.numel() * mask.element_size() * n // (N * C * H * W)
        min_bytes = 7 * 4 * n + mask_bytes + (8 * C if bounds else 0)  # x, g, m, v read; x, m, v written
        tag = "x".join(map(str, shape))
        out.append(Variant(f"masked_adam {tag} {name}", launch, n, min_bytes))

    N, C, H, W = shape
    add("mask[N,1] fp32 +bounds", shape, (N, 1, H, W))
    add("mask[N,1] bool +bounds", shape, (N, 1, H, W), torch.bool)
    add("mask[N,C] fp32", shape, shape, bounds=False)
    add("no mask, beta1 0.9", shape, None, beta1=0.9, bounds=False)
    add("mask[N,1] fp32 +bounds int64", shape, (N, 1, H, W), big=True)
    add("no mask int64", shape, None, bounds=False, big=True)
    add("mask[N,1] fp32 +bounds", (100, 1, 28, 28), (100, 1, 28, 28))
    add("mask[N,1] fp32 +bounds", (100, 3, 30, 30), (100, 1, 30, 30))
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
                launch, _ = plan_dbr_rows(z, y, y, f, f, f, 1.0, 1.0, grad_scale=1.0 / B, device_type="cuda", **kw)
                out.append(Variant(f"dbr {name} {tag}", launch, B * C, min_bytes))
            launch, _ = plan_dbr_distances(z, y, y, 1.0, device_type="cuda")
            out.append(Variant(f"dbr distances {tag}", launch, B * C, e * B * C + 2 * 8 * B + 2 * 4 * B))
    return out


def all_variants() -> list[Variant]:
    return masked_adam_variants() + dbr_variants()


def supported() -> bool:
    """Whether this Triton has the parts the compiler check uses (its own launcher's argument
    specialisation: Triton 3.4 or newer)."""
    if not triton_available():
        return False
    try:
        from triton import knobs  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError:
        return False
    return hasattr(JITFunction, "_pack_args")


def run(archs=ARCHS, variants: list[Variant] | None = None) -> list[Report]:
    if not supported():
        raise RuntimeError("nrrdd.kernels.aot needs Triton 3.4 or newer (its launcher's argument "
                           "specialisation, triton.knobs); this one lacks them")
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
