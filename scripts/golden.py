"""Fingerprints of a small real Fashion-MNIST run, for checking that a refactor changes no output.

    python scripts/golden.py OUT_DIR                    # on the old code: OUT_DIR/fingerprints.json
    python scripts/golden.py OUT_DIR2                   # on the new code, same machine
    diff OUT_DIR/fingerprints.json OUT_DIR2/fingerprints.json   # empty: the same outputs, bit for bit

It trains a teacher (1 epoch on 2,000 images), distils IPC 2 with NRR-DD, RDED, random and SRe2L, relabels
(soft, DBR) and trains a student per label mode (5 epochs), all on one thread, and prints the sha256 of every
tensor file and every accuracy. Floating-point results depend on the CPU's instruction set: compare two runs
on the same machine, not against a file from another.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from nrrdd.cli import main as nrrdd
from nrrdd.rundir import RunDir

DATA = ["--dataset", "fashion-mnist", "--train-limit", "2000", "--test-limit", "500", "--val-per-class", "20",
        "--threads", "1", "--loader", "torch", "--loader-workers", "0"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def call(*args: str) -> None:
    if nrrdd([*args, *DATA]) != 0:
        raise SystemExit(f"nrrdd {' '.join(args)} failed")


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=False)
    teacher = out / "teacher"
    call("train-teacher", "--out", str(teacher), "--teacher-epochs", "1")
    t = str(teacher / "teacher.pt")
    prints: dict[str, str | float] = {"teacher.pt": sha(teacher / "teacher.pt")}
    small = ["--ipc", "2", "--mipc", "20", "--epochs", "5", "--teacher", t]
    for method, extra in [("nrrdd", ["--nrr-iterations", "30"]), ("rded", []), ("random", []),
                          ("sre2l", ["--sre2l-iterations", "30"])]:
        syn = out / method
        call("distill", "--method", method, "--out", str(syn), *small, *extra)
        prints[f"{method}/synthetic.safetensors"] = sha(RunDir(syn).synthetic)
        modes = ["online", "soft", "dbr", "hard"] if method == "nrrdd" else ["online"]
        for mode in modes:
            if mode in ("soft", "dbr"):
                call("relabel", "--labels", mode, "--syn", str(syn), *small)
                prints[f"{method}/labels_{mode}.safetensors"] = sha(RunDir(syn).labels(mode))
            call("evaluate", "--labels", mode, "--syn", str(syn), "--no-compile", *small)
            for f in sorted(syn.glob(f"eval_{mode}_*.json")):
                r = json.loads(f.read_text())
                prints[f"{method}/{f.name}"] = f"test {r['test_top1']} val {r['val_top1']}"
    (out / "fingerprints.json").write_text(json.dumps(prints, indent=1) + "\n")
    print(out / "fingerprints.json")


if __name__ == "__main__":
    main()
