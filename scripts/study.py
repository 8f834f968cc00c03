"""The quality study: NRR-DD's open choices, decided on the validation split held out of the training set.

Every trial distils (a set is shared by the trials that differ only in student settings), trains a student
and records its top-1 on the held-out validation images, for each IPC and seed asked for. The test split is
never evaluated here. Trials are grouped in rounds, one per open question of the method (METHOD.md, "What is
still uncertain"); each round's trials are variations of the current defaults (``nrrdd.config.RunConfig``).

    python scripts/study.py run --teacher T --ipcs 1 --seeds 0 1 2 [--rounds candidates rule] [--threads 1]
    python scripts/study.py report [--ipcs 1 10]

``run`` appends to ``results/sweep_<dataset>_study.json`` (re-running skips the trials already there). The same
command may run in several processes at once (each with ``--threads``): each trial is claimed by one of them
(a lock file), and a synthetic set is distilled once, the others waiting for it. ``report`` prints, per IPC, each trial's
mean ± std over seeds, its gain over its round's control with the same label mode, and whether the gain is larger
than twice the larger of the two seed spreads (the rule for moving a default).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

from nrrdd import pipeline
from nrrdd.config import NOT_DISTILL, RunConfig
from nrrdd.io import file_lock, file_sha256, write_between_markers
from nrrdd.relabel import STORED
from nrrdd.rundir import RunDir

# round -> [(trial name, method, label mode, overrides)]; the first trial of each label mode is the control.
ROUNDS: dict[str, list[tuple[str, str, str, dict]]] = {
    "controls": [
        ("random online", "random", "online", {}),
        ("random hard", "random", "hard", {}),
        ("rded online", "rded", "online", {}),
    ],
    "candidates": [       # crop geometry on small images
        ("default", "nrrdd", "online", {}),
        ("crop>=14px", "nrrdd", "online", {"crop_min_side": 14}),
        ("crop>=20px", "nrrdd", "online", {"crop_min_side": 20}),
        ("crop>=24px", "nrrdd", "online", {"crop_min_side": 24}),
        ("whole image", "nrrdd", "online", {"whole_image": True}),    # CIDD then keeps whole images only
    ],
    "rule": [             # what "low confidence" means
        ("default", "nrrdd", "online", {}),
        ("correct only", "nrrdd", "online", {"cidd_correct": True}),
        ("quantile 0.5", "nrrdd", "online", {"cidd_quantile": 0.5}),
        ("correct, quantile 0.5", "nrrdd", "online", {"cidd_correct": True, "cidd_quantile": 0.5}),
        ("high (RDED's rule)", "nrrdd", "online", {"cidd_keep": "high"}),
    ],
    "combined": [         # crop geometry and rule together (each alone is in its round)
        ("default", "nrrdd", "online", {}),
        ("whole image, correct only", "nrrdd", "online", {"whole_image": True, "cidd_correct": True}),
        ("whole image, quantile 0.5", "nrrdd", "online", {"whole_image": True, "cidd_quantile": 0.5}),
        ("crop>=20px, correct only", "nrrdd", "online", {"crop_min_side": 20, "cidd_correct": True}),
        ("crop>=20px, quantile 0.5", "nrrdd", "online", {"crop_min_side": 20, "cidd_quantile": 0.5}),
    ],
    "update": [           # where the mask enters the refinement
        ("default", "nrrdd", "online", {}),
        ("no refinement", "nrrdd", "online", {"refine": False}),
        ("mask on gradient", "nrrdd", "online", {"nrr_mask_mode": "grad"}),
        # plain SGD's rate is not scale-free: 5 gives a first step of ~0.05 (normalised units) at the 90th
        # percentile of the pixel gradients of a batch of 10 (IPC 1) with the 10-epoch teacher; batches of 100
        # have ~50x smaller gradients (the loss is a batch mean)
        ("masked sgd, lr 5", "nrrdd", "online", {"nrr_mask_mode": "sgd", "nrr_lr": 5.0}),
        ("eps 0.3", "nrrdd", "online", {"nrr_eps": 0.3}),
        ("100 iterations", "nrrdd", "online", {"nrr_iterations": 100}),     # a fifth of the refinement's time
    ],
    "refined random": [   # NRR's refinement on random real images: does it add anything to the images themselves?
        ("random online", "random", "online", {}),
        ("random + NRR", "random", "online", {"refine": True}),
    ],
    "recipe": [           # the student's recipe (default rded), on NRR-DD and on random images
        ("default", "nrrdd", "online", {}),
        ("nrrdd recipe", "nrrdd", "online", {"recipe": "nrrdd"}),
        ("random online", "random", "online", {}),
        ("random, nrrdd recipe", "random", "online", {"recipe": "nrrdd"}),
    ],
    "factor": [           # RDED's stitching on small images: factor x factor smaller crops per synthetic image
        ("default", "nrrdd", "online", {}),
        ("factor 2", "nrrdd", "online", {"factor": 2}),
        ("random online", "random", "online", {}),
        ("random, factor 2", "random", "online", {"factor": 2}),
        ("rded online", "rded", "online", {}),
        ("rded, factor 2", "rded", "online", {"factor": 2}),
    ],
    "dbr": [              # DBR's loss against stored soft labels on the same images
        ("soft (stored)", "nrrdd", "soft", {}),
        ("dbr", "nrrdd", "dbr", {}),
        ("dbr alpha 4", "nrrdd", "dbr", {"alpha_dbr": 4.0}),
        ("dbr T 4", "nrrdd", "dbr", {"dbr_temperature": 4.0}),
        ("dbr T 4, CE at T 1", "nrrdd", "dbr", {"dbr_temperature": 4.0, "dbr_sce_temperature": 1.0}),
        ("dbr T 4, CE at T 1, alpha 4", "nrrdd", "dbr", {"dbr_temperature": 4.0, "dbr_sce_temperature": 1.0,
                                                         "alpha_dbr": 4.0}),
        ("dbr smooth-l1", "nrrdd", "dbr", {"dbr_distance": "smooth-l1"}),
        # at IPC 10 T 4 beat T 1 and a sharper cross-entropy (T 1) hurt: further along that line
        ("dbr T 10", "nrrdd", "dbr", {"dbr_temperature": 10.0}),
        ("dbr T 20", "nrrdd", "dbr", {"dbr_temperature": 20.0}),
    ],
}

# trials run under earlier defaults that would repeat a default now: reported with their round, not run again
RETIRED: dict[str, list[tuple[str, str, str, dict]]] = {
    "recipe": [("rded recipe", "nrrdd", "online", {"recipe": "rded"}),
               ("random, rded recipe", "random", "online", {"recipe": "rded"})],
}

def results_path(dataset: str) -> Path:
    return Path("results") / f"sweep_{dataset}_study.json"


@contextmanager
def locked(path: Path):
    """Read-modify-write of the results file by several processes, one at a time."""
    with file_lock(path.with_suffix(".lock")):
        data = json.loads(path.read_text()) if path.exists() else None
        box = {"data": data}
        yield box
        if box["data"] is not None:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(box["data"], indent=1) + "\n")
            tmp.replace(path)


def _resolved(cfg: RunConfig) -> dict:
    """``cfg`` as a dict with the settings that depend on the IPC resolved (``cidd_keep auto`` at IPC 10 is
    ``low``): the same set and student whichever way they were asked for."""
    return cfg.replace(cidd_keep=cfg.resolved_cidd_keep()).to_dict()


def distill_key(cfg: RunConfig, teacher_sha: str) -> str:
    """A synthetic set's settings (the fields it depends on) and teacher, as a short hash naming its folder."""
    d = {k: v for k, v in _resolved(cfg).items() if k not in NOT_DISTILL}
    return _hash({**d, "teacher_sha256": teacher_sha})


def config_key(cfg: RunConfig, teacher_sha: str) -> str:
    """Every setting of a trial but how it runs (threads, output folder), and its teacher."""
    d = {k: v for k, v in _resolved(cfg).items() if k not in ("out", "threads", "resume", "teacher")}
    return _hash({**d, "teacher_sha256": teacher_sha})


def _hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def linked(folder: Path, syn: Path) -> Path:
    """``folder`` holding links to the synthetic set of ``syn`` (what relabel and evaluate read)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in (RunDir(syn).synthetic, RunDir(syn).config, RunDir(syn).manifest("distill")):
        if not (folder / f.name).exists():
            (folder / f.name).symlink_to(f.resolve())
    return folder


def run(args) -> None:
    base = RunConfig(dataset=args.dataset, teacher=args.teacher, epochs=args.epochs, threads=args.threads)
    if args.config:
        base = RunConfig.load(args.config).replace(dataset=args.dataset, teacher=args.teacher, epochs=args.epochs,
                                                   threads=args.threads)
    # the defaults the trials vary, as their difference from RunConfig's (a later round builds on a winner)
    plain = RunConfig().to_dict()
    skip = {"teacher", "epochs", "threads", "dataset"}
    base_diff = {k: v for k, v in json.loads(json.dumps(base.to_dict())).items()
                 if k not in skip and json.loads(json.dumps(plain[k])) != v}
    base_name = json.dumps(base_diff, sort_keys=True)
    teacher_sha = file_sha256(args.teacher)
    path = results_path(base.dataset)
    with locked(path) as box:
        if box["data"] is None:
            box["data"] = {"dataset": base.dataset, "teacher": args.teacher, "teacher_sha256": teacher_sha,
                           "metric": "val_top1: top-1 % on the validation images held out of the training split",
                           "trials": []}
        elif box["data"].get("teacher_sha256", teacher_sha) != teacher_sha:     # the same file, wherever it is
            raise SystemExit(f"{path} holds trials of another teacher ({box['data']['teacher']}); move it away first")
    todo = []
    for rnd in args.rounds:
        for name, method, labels, over in ROUNDS[rnd]:
            if args.trials and name not in args.trials:
                continue
            for ipc in args.ipcs:
                for seed in args.seeds:
                    cfg = base.replace(method=method, labels=labels, ipc=ipc, seed=seed, **over)
                    todo.append((rnd, name, cfg, over, distill_key(cfg, teacher_sha)))
    out = Path(args.out)
    (out / "claims").mkdir(parents=True, exist_ok=True)
    ctx = None
    for rnd, name, cfg, over, key in todo:
        with locked(path) as box:
            done = any((t["round"], t["name"], t["ipc"], t["seed"], t["epochs"], t.get("base", "{}"))
                       == (rnd, name, cfg.ipc, cfg.seed, cfg.epochs, base_name) for t in box["data"]["trials"])
            box["data"] = None                                  # nothing to write
        claim = out / "claims" / f"{_hash([rnd, name, cfg.ipc, cfg.seed, cfg.epochs, base_name])}.lock"
        with file_lock(claim, block=False) as mine:             # another process has it: on to the next
            if done or not mine:
                continue
            syn = out / f"{cfg.dataset}_ipc{cfg.ipc}_s{cfg.seed}_{cfg.method}_{key}"
            ctx = pipeline.make_context(cfg, like=ctx)
            t0 = time.perf_counter()
            syn.mkdir(parents=True, exist_ok=True)
            with file_lock(syn / ".lock"):                      # one process distils a set; the others wait
                if not RunDir(syn).manifest("distill").exists():
                    pipeline.run_distill(cfg.replace(out=str(syn), resume=True), show_progress=False, ctx=ctx)
            # every student setting gets a folder of its own beside the set (links to it): its stored labels and
            # evaluation are never read by a trial with other settings (epochs, recipe, temperatures, ...)
            student = linked(syn / "students" / config_key(cfg, teacher_sha), syn)
            with file_lock(student / ".lock"):
                eval_file = RunDir(student).evaluation(pipeline.eval_tag(cfg, cfg.labels))
                if eval_file.exists():
                    r = json.loads(eval_file.read_text())
                else:
                    if cfg.labels in STORED and not RunDir(student).labels(cfg.labels).exists():
                        pipeline.run_relabel(cfg.replace(resume=True), student, cfg.labels, show_progress=False,
                                             ctx=ctx)
                    r = pipeline.run_evaluate(cfg.replace(resume=True), student, cfg.labels, show_progress=False,
                                              ctx=ctx, validation_only=True)
            record(path, rnd, name, cfg, over, r, time.perf_counter() - t0, key, base_name)


def record(path: Path, rnd: str, name: str, cfg: RunConfig, over: dict, r: dict, seconds: float, key: str,
           base_name: str) -> None:
    rec = {"round": rnd, "name": name, "method": cfg.method, "labels": cfg.labels, "ipc": cfg.ipc,
           "seed": cfg.seed, "epochs": cfg.epochs, "overrides": over, "val_top1": r["val_top1"],
           "seconds": round(seconds, 1), "set": key, "base": base_name}
    with locked(path) as box:
        box["data"]["trials"].append(rec)
    print(f"[{rnd}] {name:<28} ipc {cfg.ipc:<3} seed {cfg.seed} {cfg.labels:<6} val {r['val_top1']:.2f}% "
          f"({rec['seconds']:.0f} s)", flush=True)


def summarise(trials: list[dict], ipcs: list[int] | None = None) -> list[dict]:
    """Per (round, trial, ipc, epochs), in the order of :data:`ROUNDS`: mean, std and number of seeds; the gain over
    the round's control (its first trial with the same method and label mode) and whether it is larger than
    twice the larger seed spread (std) of the two. The gain and the spreads are taken on the seeds both ran: a
    trial run on seed 0 only is compared with the control's seed 0, not with its mean over three seeds."""
    groups: dict[tuple, dict[int, float]] = {}
    for t in trials:                    # a round re-run on other defaults is another round
        rnd = t["round"] if t.get("base", "{}") == "{}" else f"{t['round']} on {_short(t['base'])}"
        groups.setdefault((rnd, t["name"], t["ipc"], t["epochs"]), {})[t["seed"]] = t["val_top1"]
    bases = {r for r, *_ in groups}
    sd = lambda x: statistics.stdev(x) if len(x) > 1 else float("nan")  # noqa: E731
    rows = []
    for ipc, epochs in sorted({(k[2], k[3]) for k in groups}):
        if ipcs and ipc not in ipcs:
            continue
        for rnd, trials_of_round in [(b, ROUNDS[b.split(" on ")[0]] + RETIRED.get(b.split(" on ")[0], [])) for b in
                                     sorted(bases, key=lambda b: (list(ROUNDS).index(b.split(" on ")[0]), b))]:
            for name, method, labels, _ in trials_of_round:
                by_seed = groups.get((rnd, name, ipc, epochs))
                if not by_seed:
                    continue
                control = next(t for t in trials_of_round if (t[1], t[2]) == (method, labels))
                c_seed = groups.get((rnd, control[0], ipc, epochs)) or _run_elsewhere(groups, rnd, control, ipc, epochs)
                control = control[0]
                common = sorted(set(by_seed) & set(c_seed))
                v, c = [by_seed[s] for s in common], [c_seed[s] for s in common]
                gain = statistics.mean(v) - statistics.mean(c) if common else float("nan")
                spread = max(sd(v), sd(c)) if common else float("nan")
                every = list(by_seed.values())
                rows.append({"round": rnd, "name": name, "labels": labels, "ipc": ipc, "epochs": epochs,
                             "mean": statistics.mean(every), "std": sd(every), "n": len(every), "control": control,
                             "gain": gain, "significant": name != control and len(common) > 1
                             and abs(gain) > 2 * spread})
    return rows


def _short(base: str) -> str:
    """A trial's defaults (its ``base``, JSON) as ``field=value, ...``."""
    return ", ".join(f"{k}={v}" for k, v in json.loads(base).items())


def _run_elsewhere(groups: dict, rnd: str, trial: tuple, ipc: int, epochs: int) -> dict[int, float]:
    """The results of ``trial`` (name, method, labels, overrides) under another round with the same settings and
    defaults (e.g. the ``default`` of ``rule`` for the ``default`` of ``candidates``): a control run once serves
    every round it controls."""
    on = rnd.split(" on ", 1)[1] if " on " in rnd else None
    for other, defs in ROUNDS.items():
        for name, *definition in defs:
            if definition == list(trial[1:]):
                v = groups.get((other if on is None else f"{other} on {on}", name, ipc, epochs))
                if v:
                    return v
    return {}


def table(rows: list[dict]) -> str:
    """The report's markdown table of :func:`summarise` rows."""
    lines = ["| round | trial | labels | IPC | epochs | val top-1 | vs control | > 2x spread |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['name']} | {r['labels']} | {r['ipc']} | {r['epochs']} | {r['mean']:.2f} ± "
              f"{r['std']:.2f} ({r['n']}) | {r['gain']:+.2f} | {'yes' if r['significant'] else ''} |" for r in rows]
    return "\n".join(lines) + "\n"


def report(args) -> None:
    data = json.loads(results_path(args.dataset).read_text())
    rows = summarise(data["trials"], args.ipcs)
    print(f"{data['metric']}; teacher {data['teacher']}\n")
    print(table(rows), end="")
    if args.doc:                # each IPC's table between the doc's <!-- ipc<N>:start/end --> markers
        for ipc in sorted({r["ipc"] for r in rows}):
            if write_between_markers(args.doc, f"ipc{ipc}", table([r for r in rows if r["ipc"] == ipc]),
                                     add_missing=False):
                print(f"{args.doc}: IPC {ipc} table updated")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--teacher", required=True)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--config", help="a JSON config: the defaults the trials vary (default: RunConfig's); the "
                                    "trials record how it differs from RunConfig's")
    p.add_argument("--ipcs", type=int, nargs="+", default=[1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--rounds", nargs="+", default=list(ROUNDS), choices=list(ROUNDS))
    p.add_argument("--trials", nargs="*", help="only the trials of these names (default: every trial of the rounds)")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--threads", type=int, default=0)
    p = sub.add_parser("report")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--ipcs", type=int, nargs="*")
    p.add_argument("--doc", help="also write each IPC's table between <!-- ipc<N>:start --> and <!-- ipc<N>:end --> "
                                 "in this file (e.g. docs/study.md)")
    args = ap.parse_args()
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
