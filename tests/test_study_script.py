"""scripts/study.py's summary: gains against each round's control and the twice-the-spread rule, by hand."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location("study", Path(__file__).parents[1] / "scripts" / "study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def _trials(name, rnd, labels, values, ipc=1, base="{}"):
    return [dict(round=rnd, name=name, labels=labels, ipc=ipc, epochs=300, seed=s, val_top1=v, base=base)
            for s, v in enumerate(values)]


def test_gain_against_the_rounds_control_and_the_spread_rule():
    trials = (_trials("default", "candidates", "online", [60.0, 62.0, 64.0])            # mean 62, std 2
              + _trials("crop>=20px", "candidates", "online", [70.0, 71.0, 72.0])       # +9 > 2 x 2
              + _trials("crop>=14px", "candidates", "online", [63.0, 65.0, 67.0])       # +3 < 2 x 2
              + _trials("dbr", "dbr", "dbr", [50.0, 50.0])
              + _trials("dbr alpha 4", "dbr", "dbr", [52.0, 52.0]))                     # std 0: any gain counts
    rows = {(r["round"], r["name"]): r for r in study.summarise(trials)}
    assert rows[("candidates", "default")]["gain"] == 0 and not rows[("candidates", "default")]["significant"]
    assert rows[("candidates", "crop>=20px")]["gain"] == 9.0 and rows[("candidates", "crop>=20px")]["significant"]
    assert rows[("candidates", "crop>=14px")]["gain"] == 3.0 and not rows[("candidates", "crop>=14px")]["significant"]
    assert math.isclose(rows[("candidates", "default")]["std"], 2.0)
    assert rows[("dbr", "dbr alpha 4")]["significant"]
    # rounds come out in ROUNDS order, trials in their round's order
    assert [k for k in rows] == [("candidates", "default"), ("candidates", "crop>=14px"),
                                 ("candidates", "crop>=20px"), ("dbr", "dbr"), ("dbr", "dbr alpha 4")]


def test_the_gain_is_taken_on_the_seeds_both_ran():
    """A trial run on seed 0 only against a control run on seeds 0-2: the gain is against the control's seed 0
    (51 - 50 = +1), not its 3-seed mean (54, which would give -3); with one common seed no gain is significant.
    Run on seeds 0 and 1 (51, 52 against 50, 52): gain +0.5, spread max(std) = 1.41 -> not significant."""
    control = _trials("dbr", "dbr", "dbr", [50.0, 52.0, 60.0])
    rows = {r["name"]: r for r in study.summarise(control + _trials("dbr T 4", "dbr", "dbr", [51.0]))}
    assert rows["dbr T 4"]["gain"] == 1.0 and not rows["dbr T 4"]["significant"]
    assert rows["dbr"]["n"] == 3 and rows["dbr"]["mean"] == 54.0
    rows = {r["name"]: r for r in study.summarise(control + _trials("dbr T 4", "dbr", "dbr", [51.0, 52.0]))}
    assert rows["dbr T 4"]["gain"] == 0.5 and rows["dbr T 4"]["mean"] == 51.5 and not rows["dbr T 4"]["significant"]


def test_a_round_on_other_defaults_is_reported_apart():
    trials = (_trials("default", "rule", "online", [60.0, 61.0])
              + _trials("default", "rule", "online", [70.0, 71.0], base='{"cidd_keep": "low", "crop_min_side": 20}'))
    rows = study.summarise(trials)
    assert [(r["round"], r["mean"]) for r in rows] == [("rule", 60.5), ("rule on cidd_keep=low, crop_min_side=20",
                                                                         70.5)]


def test_a_control_run_in_another_round_serves_this_one():
    """``candidates`` has no run of its ``default`` at this IPC, ``rule`` has (the same settings): the gain is
    against it."""
    trials = (_trials("default", "rule", "online", [60.0, 62.0, 64.0])
              + _trials("crop>=20px", "candidates", "online", [70.0, 71.0, 72.0]))
    rows = {(r["round"], r["name"]): r for r in study.summarise(trials)}
    assert rows[("candidates", "crop>=20px")]["gain"] == 9.0 and rows[("candidates", "crop>=20px")]["significant"]
    assert ("candidates", "default") not in rows


def test_the_results_table_is_one_compare_command():
    spec = importlib.util.spec_from_file_location("results_table", Path(__file__).parents[1] / "scripts" /
                                                  "results_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    from nrrdd.compare import Row, parse_rows

    for dataset in ("fashion-mnist", "mnist"):
        argv = table.command(["--dataset", dataset, "--teacher", "t.pt"])
        assert argv[0] == "compare" and argv.count("compare") == 1
        assert argv[argv.index("--results") + 1] == f"results/table_{dataset}.json"
        rows = argv[argv.index("--rows") + 1:argv.index("--ipcs")]
        ipcs = [int(i) for i in argv[argv.index("--ipcs") + 1:argv.index("--seeds")]]
        assert ipcs == [1, 10, 50] and argv[argv.index("--seeds") + 1:argv.index("--out")] == ["0", "1", "2"]
        parsed = parse_rows(rows, ipcs)
        assert (Row("sre2l", "online", (10,)) in parsed) == (dataset == "fashion-mnist")


def test_the_docs_get_the_table_only_when_the_whole_grid_is_done(tmp_path):
    """With several processes on one grid, the one that finishes it (nothing missing) updates the docs."""
    spec = importlib.util.spec_from_file_location("results_table", Path(__file__).parents[1] / "scripts" /
                                                  "results_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    results = tmp_path / "t.json"
    argv = table.command(["--teacher", "t.pt", "--results", str(results)])          # the last --results wins
    assert table.missing(argv) == 8 * 3 * 3 + 3                 # 8 rows at IPC 1, 10, 50 and SRe2L at 10, 3 seeds
    run = dict(ipc=10, seed=2, method="sre2l", labels="online", epochs=300, test_top1=1.0)
    results.write_text(json.dumps({"teacher": "t.pt", "runs": [run, {**run, "seed": 1},
                                                               {**run, "seed": 0, "epochs": 100}]}))
    assert table.missing(argv) == 8 * 3 * 3 + 1
    assert table.missing([*argv, "--epochs", "100"]) == 8 * 3 * 3 + 2


def test_cidd_keep_auto_names_the_same_set_as_the_rule_it_resolves_to():
    """Trials on the current defaults reuse the sets of trials that asked for the rule by name."""
    from nrrdd.config import RunConfig

    base = RunConfig(dataset="fashion-mnist", teacher="t.pt", method="nrrdd")
    for ipc, rule, other in ((1, "high", "low"), (10, "low", "high")):
        auto, named = base.replace(ipc=ipc), base.replace(ipc=ipc, cidd_keep=rule)
        assert study.distill_key(auto, "sha") == study.distill_key(named, "sha")
        assert study.config_key(auto, "sha") == study.config_key(named, "sha")
        assert study.distill_key(auto, "sha") != study.distill_key(base.replace(ipc=ipc, cidd_keep=other), "sha")


def test_a_retired_trial_is_reported_with_its_round():
    """A trial that repeats today's default (``rded recipe`` once the default is rded's) is not run again, but its
    records stay in the report, against its round's control on the same defaults."""
    base = '{"recipe": "nrrdd"}'
    trials = (_trials("default", "recipe", "online", [60.0, 61.0, 62.0], base=base)
              + _trials("rded recipe", "recipe", "online", [65.0, 66.0, 67.0], base=base))
    rows = {r["name"]: r for r in study.summarise(trials)}
    assert rows["rded recipe"]["round"] == "recipe on recipe=nrrdd" and rows["rded recipe"]["gain"] == 5.0
    assert "rded recipe" not in [name for name, *_ in study.ROUNDS["recipe"]]
    assert study.table(list(rows.values())).splitlines()[2].startswith("| recipe on recipe=nrrdd | default |")


def test_each_target_is_met_missed_or_waiting_by_hand(tmp_path):
    spec = importlib.util.spec_from_file_location("results_table", Path(__file__).parents[1] / "scripts" /
                                                  "results_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)

    def rows(method, labels, ipc, values, epochs=300):
        return [dict(method=method, labels=labels, ipc=ipc, seed=s, epochs=epochs, test_top1=v)
                for s, v in enumerate(values)]
    runs = (rows("nrrdd", "online", 1, [70.0, 71.0, 72.0]) + rows("random", "online", 1, [70.0, 70.0, 70.0])
            + rows("rded", "online", 1, [71.0, 70.0, 72.0])                  # equal means: not above
            + rows("nrrdd", "online", 10, [86.0, 86.5, 85.5]) + rows("random", "online", 10, [85.0, 85.0, 85.0])
            + rows("rded", "online", 10, [85.0, 85.0, 85.01])                 # 0.9967 above: not 1
            + rows("nrrdd", "dbr", 10, [84.0, 84.0, 84.0])                    # exactly 2 below: within
            + rows("nrrdd", "dbr", 10, [99.0, 99.0, 99.0], epochs=100)        # another grid's runs: ignored
            + rows("nrrdd", "online", 50, [90.0, 90.0]) + rows("random", "online", 50, [80.0, 80.0, 80.0]))
    lines = table.targets(runs, epochs=300).splitlines()[2:]
    verdicts = [(int(line.split("|")[1]), line.split("|")[4].strip(), line.split("|")[5].strip()) for line in lines]
    assert verdicts == [(1, "+1.00", "met"), (1, "+0.00", "**missed**"),
                        (10, "+1.00", "met"), (10, "+0.9967", "**missed**"), (10, "-2.00", "met"),
                        (50, "-", "waiting"), (50, "-", "waiting"), (50, "-", "waiting")]    # seed 2 missing
    assert "71.00 vs 70.00" in lines[0] and "86.00 vs 85.00" in lines[3]
    assert "within 2 points of nrrdd:online" in lines[4]

    # --summary: the verdict beside the results file, and with the table into each doc that has their markers
    results = tmp_path / "table_x.json"
    results.write_text(json.dumps({"teacher": "t.pt", "runs": runs}))
    (tmp_path / "table_x.md").write_text("| the table |\n")
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- table_x:start -->\n<!-- table_x:end -->\ntext\n"
                   "<!-- targets_x:start -->\n<!-- targets_x:end -->\n")
    table.DOCS, table.DOCS_LOCK = [doc, tmp_path / "no_markers.md"], tmp_path / "docs.lock"
    table.SETS = tmp_path / "sets"          # --summary stores finished sets: none of the project's folders
    assert table.run(["--teacher", "t.pt", "--results", str(results), "--out", str(tmp_path / "runs"),
                      "--summary"]) == 0
    assert not (tmp_path / "sets").exists()
    verdict = (tmp_path / "table_x_targets.md").read_text()
    assert verdict == table.targets(runs, epochs=300)
    md = (tmp_path / "table_x.md").read_text()          # rewritten from the results file, this grid's epochs only
    assert "| the table |" not in md and "| nrrdd | dbr | - | 84.0 ± 0.0 (3 seeds) | - |" in md
    assert "| random | online | 70.0 ± 0.0 (3 seeds) | 85.0 ± 0.0 (3 seeds) | 80.0 ± 0.0 (3 seeds) |" in md
    assert doc.read_text() == (f"<!-- table_x:start -->\n{md}<!-- table_x:end -->\ntext\n"
                               f"<!-- targets_x:start -->\n{verdict}<!-- targets_x:end -->\n")
    assert not (tmp_path / "no_markers.md").exists()
    with pytest.raises(SystemExit, match="teacher"):           # checked as compare checks it: nothing rewritten
        table.run(["--teacher", "other.pt", "--results", str(results), "--out", str(tmp_path / "runs"), "--summary"])
    assert (tmp_path / "table_x.md").read_text() == md


def test_slow_sets_are_stored_with_the_results_and_restored_checked(tmp_path):
    spec = importlib.util.spec_from_file_location("results_table", Path(__file__).parents[1] / "scripts" /
                                                  "results_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    from safetensors.torch import save_file
    from nrrdd.io import tensor_sha256
    table.SETS = tmp_path / "sets"
    out = tmp_path / "runs"
    images, labels = torch.arange(24.0).reshape(2, 1, 3, 4), torch.tensor([0, 1])

    def a_set(name, finished=True):
        d = out / name
        d.mkdir(parents=True)
        save_file({"images": images, "labels": labels}, str(d / "synthetic.safetensors"))
        (d / "config.json").write_text("{}")
        (d / "syn").mkdir()                                         # the PNGs stay behind
        if finished:                    # the manifest's digest is the pipeline's: of the tensors, not the file
            (d / "manifest_distill.json").write_text(
                json.dumps({"synthetic_sha256": tensor_sha256(images, labels)}))
        return d
    a_set("ipc50_s0_nrrdd")
    a_set("ipc50_s0_rded")                                          # a minute to distil: not stored
    a_set("ipc50_s1_nrrdd", finished=False)                         # still refining: not stored
    argv = table.command(["--teacher", "t.pt", "--out", str(out), "--results", str(tmp_path / "table_fm.json")])
    stored = tmp_path / "sets" / "fm" / "ipc50_s0_nrrdd"
    assert table.save_sets(argv) == [stored]
    assert sorted(p.name for p in stored.iterdir()) == ["config.json", "manifest_distill.json",
                                                        "synthetic.safetensors"]
    assert table.save_sets(argv) == []                              # stored already, same bytes
    assert sorted(p.name for p in (tmp_path / "sets" / "fm").iterdir()) == ["ipc50_s0_nrrdd"]

    # another machine: a fresh --out gets the stored set, byte for byte; a finished set there is left alone
    fresh = table.command(["--teacher", "t.pt", "--out", str(tmp_path / "fresh"),
                           "--results", str(tmp_path / "table_fm.json")])
    assert table.restore_sets(fresh) == [tmp_path / "fresh" / "ipc50_s0_nrrdd"]
    assert ((tmp_path / "fresh" / "ipc50_s0_nrrdd" / "synthetic.safetensors").read_bytes()
            == (out / "ipc50_s0_nrrdd" / "synthetic.safetensors").read_bytes())
    assert table.restore_sets(fresh) == []

    # a stored set whose bytes are not its manifest's: refused, and no manifest (no "finished") where it went
    save_file({"images": images + 1, "labels": labels}, str(stored / "synthetic.safetensors"))   # other pixels
    damaged = tmp_path / "third"
    with pytest.raises(SystemExit, match="synthetic_sha256"):
        table.restore_sets(table.command(["--teacher", "t.pt", "--out", str(damaged),
                                          "--results", str(tmp_path / "table_fm.json")]))
    assert not (damaged / "ipc50_s0_nrrdd" / "manifest_distill.json").exists()
    (stored / "synthetic.safetensors").write_bytes(b"truncated")                          # not a set at all
    with pytest.raises(SystemExit, match="synthetic_sha256"):
        table.restore_sets(table.command(["--teacher", "t.pt", "--out", str(tmp_path / "fourth"),
                                          "--results", str(tmp_path / "table_fm.json")]))
