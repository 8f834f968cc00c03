"""``nrrdd compare`` (and the demo as a configuration of it) on the blob data of ``tests/blobs.py``.

A LeNet teacher (with BatchNorm, so NRR-DD's refinement has statistics to match) learns the blobs in seconds;
the grid is tiny: 2 rows, IPC 1, 2 seeds, 5 student epochs.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from blobs import write_blobs

from nrrdd import pipeline
from nrrdd.cli import main
from nrrdd import compare
from nrrdd.compare import Row, markdown, parse_rows

TESTS = Path(__file__).parent
LENET = ["--arch", "lenet:LeNet", "--arch-kwargs", '{"batch_norm": true}', "--student", "lenet:LeNet"]
TINY = ["--mipc", "10", "--nrr-iterations", "5", "--re-epochs", "5"]
RUN_KEYS = {"ipc", "seed", "method", "labels", "epochs", "test_top1", "val_top1", "label_bytes", "eval_s"}
TIMING_KEYS = {"discover", "refine", "write", "relabel"}

pytestmark = pytest.mark.slow


def build_config_for(argv):
    """The RunConfig that ``nrrdd compare ARGV`` would run with."""
    import argparse

    from nrrdd.cli import _add_config_flags, build_config

    p = argparse.ArgumentParser()
    _add_config_flags(p)
    return build_config(p.parse_args(argv))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(TESTS))           # the user's model module, lenet.py, lives beside the tests
        root = write_blobs(tmp_path_factory.mktemp("blobs"))
        yield ["--dataset", "mnist", "--data-root", str(root), "--val-per-class", "5", "--threads", "1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("teacher")
    assert main(["train-teacher", *LENET, "--out", str(out), "--teacher-epochs", "2", "--teacher-batch-size", "64",
                 *data]) == 0
    return out / "teacher.pt"


def test_compare_table_sheet_and_resume(teacher, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--rows", "random:online", "nrrdd:dbr", "--ipcs", "1", "--seeds", "0", "1", "--out", str(out),
            "--teacher", str(teacher), *LENET, *TINY, *data]
    assert main(argv) == 0
    printed = capsys.readouterr().out

    results = json.loads((out / "compare.json").read_text())
    assert set(results) == {"teacher", "settings", "runs"} and results["teacher"] == str(teacher)
    from nrrdd.cli import build_config, make_parser
    assert results["settings"] == compare.grid_settings(build_config(make_parser().parse_args(argv)))
    assert results["settings"]["nrr_iterations"] == 5 and "seed" not in results["settings"]
    runs = results["runs"]
    assert [(r["ipc"], r["seed"], r["method"], r["labels"], r["epochs"]) for r in runs] == [
        (1, 0, "random", "online", 5), (1, 0, "nrrdd", "dbr", 5), (1, 1, "random", "online", 5),
        (1, 1, "nrrdd", "dbr", 5)]
    for r in runs:
        assert RUN_KEYS <= set(r) <= RUN_KEYS | TIMING_KEYS, r
    assert set(runs[0]) - RUN_KEYS == {"discover", "write"} and runs[0]["label_bytes"] == 0    # random: no refine
    assert set(runs[1]) - RUN_KEYS == TIMING_KEYS and runs[1]["label_bytes"] > 0
    assert (out / "ipc1_s1_nrrdd" / "labels_dbr.safetensors").exists()

    md = (out / "compare.md").read_text()
    assert md in printed
    lines = md.splitlines()
    assert lines[0] == "| method | labels | IPC 1 |"
    for line, (method, labels) in zip(lines[2:], [("random", "online"), ("nrrdd", "dbr")]):
        v = [r["test_top1"] for r in runs if (r["method"], r["labels"]) == (method, labels)]
        assert line == f"| {method} | {labels} | {statistics.mean(v):.1f} ± {statistics.stdev(v):.1f} (2 seeds) |"

    from PIL import Image

    with Image.open(out / "sheet_compare.png") as im:
        assert im.format == "PNG" and im.width > im.height     # 10 classes across, 2 methods down
    assert not list(out.glob(".*"))                             # no temporary files left

    # Resume: the same command does no work and changes nothing.
    before = (out / "compare.json").read_text()
    for name in ("run_distill", "run_relabel", "run_evaluate"):
        monkeypatch.setattr(pipeline, name, lambda *a, **k: pytest.fail("a finished run was run again"))
    assert main(argv) == 0
    assert (out / "compare.json").read_text() == before
    assert "resuming: 4 of 4 runs" in capsys.readouterr().out

    # A new row for the same sets evaluates only: the synthetic sets on disk are reused.
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "run_distill", lambda *a, **k: pytest.fail("a synthetic set was distilled again"))
    assert main([*argv[:4], "random:hard", *argv[4:]]) == 0
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert [(r["seed"], r["labels"]) for r in runs[4:]] == [(0, "hard"), (1, "hard")]
    assert set(runs[4]) == RUN_KEYS                              # it distilled and relabelled nothing
    assert "| random | hard |" in (out / "compare.md").read_text()


def test_compare_refuses_to_mix(teacher, data, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--rows", "random:online", "--ipcs", "1", "--out", str(out), *LENET, *TINY, *data]
    assert main([*argv, "--teacher", str(teacher)]) == 0

    other = tmp_path / "other" / "teacher.pt"                   # the same teacher under another path
    other.parent.mkdir()
    shutil.copy(teacher, other)
    shutil.copy(teacher.with_suffix(".json"), other.with_suffix(".json"))
    capsys.readouterr()
    assert main([*argv, "--teacher", str(other)]) == 2
    assert "holds results of teacher" in capsys.readouterr().err

    # another distillation setting must not silently reuse the set distilled under the old one
    assert main([*argv, "--teacher", str(teacher), "--rows", "random:hard", "--mipc", "12",
                 "--results", str(tmp_path / "new.json")]) == 2
    assert "mipc 10 (now 12)" in capsys.readouterr().err

    # nor may a results file take runs of other settings, nor report its runs as done for them
    before = (out / "compare.json").read_text()
    for flag in (["--nrr-eps", "0.3"], ["--recipe", "nrrdd"], ["--rows", "random:hard", "--temperature", "4"]):
        assert main([*argv, "--teacher", str(teacher), *flag]) == 2
        err = capsys.readouterr().err
        assert "holds runs made with other settings" in err and "(now " in err, err
    assert (out / "compare.json").read_text() == before
    # how a run runs is not a setting of its results: it continues
    assert main([*argv, "--teacher", str(teacher), "--threads", "2", "--checkpoint-every", "3"]) == 0
    assert "resuming: 1 of 1 runs" in capsys.readouterr().out


HOLDER = """
import json, sys, time
from pathlib import Path
from nrrdd.io import file_lock
claim, results = Path(sys.argv[1]), Path(sys.argv[2])
with file_lock(claim):
    Path(str(claim) + ".held").touch()
    while not (results.exists() and json.loads(results.read_text())["runs"]):
        time.sleep(0.2)
"""                 # holds a run's lock until another run is in the results file, then exits without doing it


def test_a_run_held_by_a_process_that_dies_is_done_by_another(teacher, data, tmp_path, monkeypatch, capsys):
    """A run whose lock another process holds is left to it while there is other work; at the end the process
    waits for that lock, and when the holder died without the result it does the run itself (on the set on disk)."""
    out = tmp_path / "cmp"
    argv = ["compare", "--rows", "nrrdd:online", "nrrdd:hard", "--ipcs", "1", "--out", str(out),
            "--teacher", str(teacher), *LENET, *TINY, *data]
    tag = pipeline.eval_tag(build_config_for(LENET).replace(seed=0), "hard")
    claim = out / "locks" / f"ipc1_s0_nrrdd_{tag}_e5.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(claim), str(out / "compare.json")])
    while not Path(str(claim) + ".held").exists():
        assert holder.poll() is None
        time.sleep(0.1)
    distilled = []
    real = pipeline.run_distill
    monkeypatch.setattr(pipeline, "run_distill", lambda *a, **k: distilled.append(1) or real(*a, **k))
    assert main(argv) == 0
    assert holder.wait(timeout=60) == 0
    printed = capsys.readouterr().out
    assert printed.index("with online labels") < printed.index("with hard labels") and len(distilled) == 1
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert [(r["method"], r["labels"]) for r in runs] == [("nrrdd", "online"), ("nrrdd", "hard")]
    assert "| nrrdd | hard |" in (out / "compare.md").read_text()


def test_an_evaluation_killed_before_its_record_is_added_from_its_file(teacher, data, tmp_path, monkeypatch, capsys):
    """Killed between writing ``eval_<tag>.json`` and adding it to the results file: the next run adds it from
    the file when its manifest has the same settings, and refuses when they differ."""
    out = tmp_path / "cmp"
    argv = ["compare", "--rows", "random:hard", "--ipcs", "1", "--out", str(out), "--teacher", str(teacher),
            *LENET, *TINY, *data]
    assert main(argv) == 0
    results = out / "compare.json"
    done = json.loads(results.read_text())
    results.write_text(json.dumps({**done, "runs": []}))           # as if killed before the append
    monkeypatch.setattr(pipeline, "run_evaluate", lambda *a, **k: pytest.fail("the student was trained again"))
    capsys.readouterr()
    assert main([*argv, "--threads", "2"]) == 0                        # runtime settings may differ
    assert "added from its file" in capsys.readouterr().out
    again = json.loads(results.read_text())["runs"]
    assert [r["test_top1"] for r in again] == [r["test_top1"] for r in done["runs"]]

    results.write_text(json.dumps({**done, "runs": []}))
    assert main([*argv, "--lr", "0.002"]) == 2                         # another student setting: not this run
    assert "holds runs made with other settings: lr 0.001 (now 0.002)" in capsys.readouterr().err
    results.write_text(json.dumps({"teacher": done["teacher"], "runs": []}))   # a file that records no settings
    assert main([*argv, "--lr", "0.002"]) == 2                         # the evaluation's own manifest refuses it
    assert "has no such run" in capsys.readouterr().err


def test_two_processes_share_one_grid(teacher, data, tmp_path):
    """The same command in two processes at once: every run of the grid is done once, each synthetic set is
    distilled once, and the results file holds every run (neither process overwrites the other's)."""
    out = tmp_path / "cmp"
    argv = ["compare", "--rows", "random:online", "nrrdd:online", "nrrdd:dbr", "nrrdd:hard", "--ipcs", "1",
            "--seeds", "0", "1", "--out", str(out), "--teacher", str(teacher), *LENET, *TINY, *data]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-m", "nrrdd", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    printed = "".join(outputs)
    assert printed.count("training a student") == 8                      # 4 rows x 2 seeds, each once
    assert printed.count("distilling with nrrdd") == 2 and printed.count("distilling with random") == 2
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert sorted((r["seed"], r["method"], r["labels"]) for r in runs) == sorted(
        (s, m, lab) for s in (0, 1) for m, lab in [("random", "online"), ("nrrdd", "online"), ("nrrdd", "dbr"),
                                                   ("nrrdd", "hard")])
    md = (out / "compare.md").read_text()                                # by the last process to finish
    for row in ("| random | online |", "| nrrdd | online |", "| nrrdd | dbr |", "| nrrdd | hard |"):
        assert f"{row} " in md and "(2 seeds)" in md.split(row)[1].splitlines()[0]


def test_compare_needs_a_teacher_and_valid_rows(tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--teacher is required" in err and "nrrdd train-teacher" in err and "nrrdd demo" in err
    assert parse_rows(["nrrdd:dbr", "rded:online", "nrrdd:dbr"]) == [Row("nrrdd", "dbr"), Row("rded", "online")]
    for bad in ("nrrdd", "nrr:online", "nrrdd:dbrr", "@10"):
        with pytest.raises(ValueError, match="expected method:labels"):
            parse_rows([bad])


def test_a_row_can_run_at_some_ipcs_only():
    rows = parse_rows(["random:online", "sre2l:online@10", "rded:hard@1,50,1"], ipcs=[1, 10, 50])
    assert rows == [Row("random", "online"), Row("sre2l", "online", (10,)), Row("rded", "hard", (1, 50))]
    assert [r.name for r in rows] == ["random:online", "sre2l:online", "rded:hard"]
    assert [[r.runs_at(i) for i in (1, 10, 50)] for r in rows] == [[True] * 3, [False, True, False],
                                                                  [True, False, True]]
    assert parse_rows(["sre2l:online@10", "sre2l:online@10"]) == [Row("sre2l", "online", (10,))]
    with pytest.raises(ValueError, match="IPC 20 is not among --ipcs 1 10"):
        parse_rows(["sre2l:online@20"], ipcs=[1, 10])
    with pytest.raises(ValueError, match="comma-separated list of IPCs"):
        parse_rows(["sre2l:online@ten"])
    with pytest.raises(ValueError, match="given twice with different IPCs"):
        parse_rows(["sre2l:online@10", "sre2l:online"])


def test_compare_runs_a_row_only_at_its_ipcs(teacher, data, tmp_path, monkeypatch):
    ran = []

    def fake_run(cfg, syn, *args, **kw):            # the grid, not the runs: record what would run
        ran.append((cfg.ipc, cfg.seed, cfg.method, cfg.labels))
        return {"ipc": cfg.ipc, "seed": cfg.seed, "method": cfg.method, "labels": cfg.labels, "epochs": cfg.epochs,
                "test_top1": 50.0}

    monkeypatch.setattr(compare, "_run", fake_run)
    cfg = build_config_for(["--teacher", str(teacher), "--out", str(tmp_path), *LENET, *TINY, *data])
    res = compare.run_compare(cfg, ["random:online", "random:hard@2"], ipcs=[1, 2], seeds=[0], sheet=False,
                              show_progress=False)
    assert ran == [(1, 0, "random", "online"), (2, 0, "random", "online"), (2, 0, "random", "hard")]
    assert [(c.record["ipc"], c.record["labels"]) for c in res.cells] == [(1, "online"), (2, "online"), (2, "hard")]
    assert "| random | hard | - | 50.0 (1 seed) |" in res.markdown
    with pytest.raises(ValueError, match="IPC 3 is not among --ipcs 1 2"):
        compare.run_compare(cfg, ["random:hard@3"], ipcs=[1, 2], seeds=[0], sheet=False)


def test_markdown_mean_std_over_seeds():
    def run(ipc, seed, method, labels, top1, epochs=300):
        return {"ipc": ipc, "seed": seed, "method": method, "labels": labels, "epochs": epochs, "test_top1": top1}

    runs = [run(1, 0, "rded", "online", 80.0), run(1, 1, "rded", "online", 82.0), run(10, 0, "rded", "online", 90.04),
            run(1, 0, "nrrdd", "dbr", 70.0), run(1, 1, "nrrdd", "dbr", 10.0, epochs=5)]
    assert markdown(runs, rows=["nrrdd:dbr", "sre2l:online"], epochs=300).splitlines() == [
        "| method | labels | IPC 1 | IPC 10 |",
        "|---|---|---|---|",
        "| nrrdd | dbr | 70.0 (1 seed) | - |",
        "| rded | online | 81.0 ± 1.4 (2 seeds) | 90.0 (1 seed) |",
    ]


def test_demo_is_a_small_compare(data, tmp_path, monkeypatch, capsys):
    import argparse

    from nrrdd.cli import _add_config_flags, _explicit, build_config
    from nrrdd.demo import run_demo

    monkeypatch.chdir(tmp_path)                                 # the demo caches its teacher in runs/teachers/
    p = argparse.ArgumentParser()
    _add_config_flags(p)
    ns = p.parse_args([*LENET, *TINY, *data, "--ipc", "1", "--teacher-epochs", "1", "--out", "demo"])
    rows = run_demo(build_config(ns), rows=["random:online", "nrrdd:dbr"], explicit=_explicit(ns))
    printed = capsys.readouterr().out
    assert "distilling with nrrdd ..." in printed and "training a student on nrrdd with dbr labels ..." in printed
    head = "method   labels   top-1 % vs random  label bytes discover s  refine s relabel s  train s"
    assert head in printed

    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(saved) == {"config", "teacher", "rows", "total_s", "quick"} and saved["rows"] == rows
    assert [(r["method"], r["labels"]) for r in rows] == [("random", "online"), ("nrrdd", "dbr")]
    keys = {"method", "labels", "ipc", "seed", "test_top1", "val_top1", "label_bytes", "discover_s", "refine_s",
            "relabel_s", "train_s"}
    assert all(set(r) == keys for r in rows)
    assert rows[0]["refine_s"] == 0 and rows[0]["relabel_s"] == 0
    assert rows[1]["refine_s"] > 0 and rows[1]["relabel_s"] > 0 and rows[1]["train_s"] > 0
    for name in ("sheet_nrrdd.png", "sheet_compare.png", "compare.json", "compare.md"):
        assert (tmp_path / "demo" / name).exists(), name


def test_demo_table_shows_the_gain_over_random_images_with_the_same_labels():
    from nrrdd.demo import format_table

    def row(method, labels, top1):
        return dict(method=method, labels=labels, test_top1=top1, label_bytes=0, discover_s=0.0, refine_s=0.0,
                    relabel_s=0.0, train_s=1.0)

    lines = format_table([row("random", "online", 80.0), row("nrrdd", "online", 82.5),
                          row("nrrdd", "dbr", 79.0)]).splitlines()
    assert lines[2].split()[:4] == ["random", "online", "80.00", "+0.00"]
    assert lines[3].split()[:4] == ["nrrdd", "online", "82.50", "+2.50"]
    assert lines[4].split()[:4] == ["nrrdd", "dbr", "79.00", "-"]
