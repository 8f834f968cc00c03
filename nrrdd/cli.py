"""``nrrdd`` command line. Every RunConfig field is a flag (``--nrr-eps 0.5``); RDED's flag names are aliases.

Precedence: RunConfig defaults, then ``--config FILE`` (JSON), then flags.

Methods (``--method``): nrrdd, rded, random, sre2l. Models (``--arch``, ``--student``): a registered name, a
torchvision classifier, or your own class as ``package.module:ClassName`` with ``--arch-kwargs`` /
``--student-kwargs`` (a JSON object of constructor arguments).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from dataclasses import fields
from pathlib import Path

from .config import STAGES, RunConfig

# RDED's flag names, accepted unchanged.
ALIASES = {
    "dataset": ["--subset"], "arch": ["--arch-name"], "student": ["--stud-name"], "epochs": ["--re-epochs"],
    "batch_size": ["--re-batch-size"],
}


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field, grouped by stage, with the field's meaning, default and valid values."""
    p.add_argument("--config", help="JSON file of config values (flags override it)")
    groups = {stage: p.add_argument_group(f"{stage}: {what}") for stage, what in STAGES.items()}
    hints = typing.get_type_hints(RunConfig)
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        names = [flag] + ALIASES.get(f.name, [])
        text = f"{f.metadata['help']} (default: {f.default!r})"
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=text.replace("%", "%%"))
        if f.metadata["choices"]:
            kw["choices"] = f.metadata["choices"]
        g = groups[f.metadata["stage"]]
        tp = hints[f.name]
        if tp in (bool, typing.Optional[bool]):
            g.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            continue
        args = typing.get_args(tp)
        if typing.get_origin(tp) is tuple:
            g.add_argument(*names, type=args[0], nargs=len(args), metavar=f.name.upper(), **kw)
            continue
        base = next((a for a in args if a is not type(None)), tp) if args else tp
        if base in (str, int, float) and f.default is None:
            g.add_argument(*names, type=_none_or(base), **kw)
        else:
            g.add_argument(*names, type=base, **kw)


def _none_or(tp):
    def parse(s: str):
        return None if s.lower() in ("none", "auto") else tp(s)

    parse.__name__ = tp.__name__
    return parse


def build_config(ns: argparse.Namespace) -> RunConfig:
    cfg = RunConfig.load(ns.config) if getattr(ns, "config", None) else RunConfig()
    changes = {f.name: getattr(ns, f.name) for f in fields(RunConfig) if hasattr(ns, f.name)}
    for k, v in changes.items():
        if isinstance(v, list):
            changes[k] = tuple(v)
    return cfg.replace(**changes)


def _print(obj) -> None:
    from .dist import env_world

    if env_world() > 1 and int(os.environ.get("RANK", "0")) != 0:
        return                                      # under torchrun only rank 0 reports
    print(json.dumps(obj, indent=2, default=str))


def make_parser() -> argparse.ArgumentParser:
    """The ``nrrdd`` command line: one subcommand each, every RunConfig field a flag."""
    parser = argparse.ArgumentParser(prog="nrrdd", description="NRR-DD dataset distillation (with RDED and SRe2L).",
                                     epilog="Your own teacher or student: --arch package.module:ClassName "
                                            "[--arch-kwargs JSON] (see `nrrdd distill --help`).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-teacher", help="train a teacher (--arch, your own package.module:ClassName too) on "
                                             "the real training split; report test top-1")
    _add_config_flags(p)
    p = sub.add_parser("distill", help="stage 1 (+ stage 2): write a synthetic set to --out "
                                       "(--method nrrdd | rded | random | sre2l)")
    _add_config_flags(p)
    p = sub.add_parser("relabel", help="stored labels (dbr or soft) for the synthetic set in --syn")
    p.add_argument("--syn", help="distill output folder (default: --out)")
    _add_config_flags(p)
    p = sub.add_parser("evaluate", help="train a student on --syn and report real test top-1")
    p.add_argument("--syn", help="distill output folder (default: --out)")
    p.add_argument("--label-file", help="stored labels (default: <syn>/labels_<mode>.safetensors)")
    _add_config_flags(p)
    p = sub.add_parser("run", help="distill + (relabel) + evaluate, like RDED's main.py")
    _add_config_flags(p)
    p = sub.add_parser("demo", help="Fashion-MNIST, conv3, IPC 10: random / RDED / NRR-DD and label modes")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (minutes, not accurate)")
    p.add_argument("--methods", nargs="+", default=None, help="subset of rows, e.g. nrrdd:online rded:online")
    _add_config_flags(p)
    p = sub.add_parser("compare", help="methods x label modes x IPC x seeds: one table (mean ± std over seeds) and "
                                       "one image sheet; continues an earlier --results file")
    p.add_argument("--rows", nargs="+", default=None, metavar="METHOD:LABELS",
                   help="e.g. nrrdd:online nrrdd:dbr rded:online random:online sre2l:soft; METHOD:LABELS@10 (or @1,10): "
                        "that row at those of --ipcs only (default: the demo's rows random, rded, nrrdd with online "
                        "labels, nrrdd with dbr and hard)")
    p.add_argument("--ipcs", type=int, nargs="+", default=None, help="images per class, e.g. 1 10 50 (default: --ipc)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="e.g. 0 1 2 (default: --seed)")
    p.add_argument("--results", default=None,
                   help="results JSON, continued when it exists; the table goes beside it as .md "
                        "(default: <out>/compare.json)")
    _add_config_flags(p)
    p = sub.add_parser("check", help="before the expensive work: dataset layout and files, images per class vs "
                                     "mipc, teacher checkpoint, class order and accuracy, output folder")
    p.add_argument("--val-images", type=int, default=500, help="validation images for the teacher's accuracy")
    _add_config_flags(p)
    p = sub.add_parser("convert-fkd", help="an SRe2L/FKD soft-label folder (epoch_*/batch_*.tar) as one safetensors "
                                           "file, read without running code from it (weights_only=True)")
    p.add_argument("fkd_path", help="the --fkd-path folder of SRe2L's relabelling")
    p.add_argument("output", help="the .safetensors file to write")
    p.add_argument("--fkd-seed", type=int, default=42, help="SRe2L's --fkd-seed, to record which image each row is "
                                                            "(-1: do not)")
    p = sub.add_parser("show-config", help="print the resolved config as JSON")
    _add_config_flags(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = make_parser().parse_args(argv)
    cfg = build_config(ns)
    args = sys.argv[1:] if argv is None else argv
    if any(a == "--subset" or a.startswith("--subset=") for a in args):     # started the RDED way: its sizes,
        from .rded import apply_subset                                    # teacher, batch, lr, output folder

        given = _explicit(ns) | (set(json.loads(open(ns.config).read())) if getattr(ns, "config", None) else set())
        cfg = apply_subset(cfg, given, set_out=ns.command in ("run", "distill", "relabel", "evaluate"))
    from .dist import env_world

    if env_world() > 1 and ns.command in ("compare", "demo", "train-teacher", "check", "convert-fkd"):
        print(f"nrrdd {ns.command}: error: runs in one process; under torchrun use distill, relabel, evaluate "
              "or run", file=sys.stderr)
        return 2

    from . import pipeline
    from .relabel import STORED

    try:
        if ns.command == "show-config":
            _print(cfg.to_dict())
        elif ns.command == "convert-fkd":
            from .fkd import convert
            from .io import refuse_overwrite

            refuse_overwrite(ns.output, "a file")
            _print(convert(ns.fkd_path, ns.output, None if ns.fkd_seed < 0 else ns.fkd_seed))
        elif ns.command == "check":
            from .check import format_findings, run_check

            findings = run_check(cfg, val_images=ns.val_images)
            print(format_findings(findings))
            return 1 if any(f.level == "error" for f in findings) else 0
        elif ns.command == "train-teacher":
            _print(pipeline.run_train_teacher(cfg))
        elif ns.command == "distill":
            _print(pipeline.run_distill(cfg))
            _rded_link(cfg)
        elif ns.command == "relabel":
            if "labels" in _explicit(ns) and cfg.labels not in STORED:
                raise ValueError(f"relabel stores dbr or soft labels; --labels {cfg.labels} needs none (train with "
                                 f"`nrrdd evaluate --labels {cfg.labels}`)")
            mode = cfg.labels if cfg.labels in STORED else "dbr"      # no --labels: DBR, the method's
            _print(pipeline.run_relabel(cfg, ns.syn or cfg.out, mode))
        elif ns.command == "evaluate":
            _print(pipeline.run_evaluate(cfg, ns.syn or cfg.out, cfg.labels, ns.label_file))
        elif ns.command == "run":
            ctx = pipeline.make_context(cfg)
            res = {"distill": pipeline.run_distill(cfg, ctx=ctx)}
            _rded_link(cfg)
            if cfg.labels in STORED:
                res["relabel"] = pipeline.run_relabel(cfg, cfg.out, cfg.labels, ctx=ctx)
            res["evaluate"] = pipeline.run_evaluate(cfg, cfg.out, cfg.labels, ctx=ctx)
            _print(res)
        elif ns.command == "compare":
            _compare(cfg, ns)
        elif ns.command == "demo":
            from .demo import run_demo

            run_demo(cfg, quick=ns.quick, rows=ns.methods, explicit=_explicit(ns))
    except (OSError, ValueError, FloatingPointError, RuntimeError) as e:     # OSError: missing/unwritable files
        from .dist import env_world

        rank = f" (rank {os.environ.get('RANK')})" if env_world() > 1 else ""
        print(f"nrrdd {ns.command}{rank}: error: {e}", file=sys.stderr)
        return 2
    finally:
        from .dist import teardown

        teardown()
    return 0


def _compare(cfg: RunConfig, ns: argparse.Namespace) -> None:
    from .compare import DEFAULT_ROWS, run_compare

    if not cfg.teacher:
        raise ValueError("--teacher is required: train one with `nrrdd train-teacher --out DIR` (then --teacher "
                         "DIR/teacher.pt), or run `nrrdd demo` once (it keeps its teacher in runs/teachers/)")
    if "out" not in _explicit(ns) and cfg.out == RunConfig().out:
        cfg = cfg.replace(out="runs/compare")

    def report(r: dict) -> None:
        print(f"ipc {r['ipc']} seed {r['seed']} {r['method']:<6} {r['labels']:<6} test top-1 {r['test_top1']:.2f}%",
              flush=True)

    res = run_compare(cfg, ns.rows or DEFAULT_ROWS, ns.ipcs or [cfg.ipc], ns.seeds or [cfg.seed], ns.results,
                      on_result=report)
    print()
    print(res.markdown, end="")
    print(f"\nresults {res.results}, table {res.results.with_suffix('.md')}"
          + (f", image sheet {res.sheet}" if res.sheet else ""))


def _rded_link(cfg: RunConfig) -> None:
    from .dist import env_world
    from .rded import SUBSETS, link_syn_data

    if cfg.dataset in SUBSETS and Path(cfg.out).parts[:1] == ("exp",) and \
            (env_world() <= 1 or int(os.environ.get("RANK", "0")) == 0):
        link_syn_data(cfg.out)


def _explicit(ns: argparse.Namespace) -> set[str]:
    return {f.name for f in fields(RunConfig) if hasattr(ns, f.name)}


if __name__ == "__main__":
    sys.exit(main())
