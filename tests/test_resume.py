"""Faults: a run killed with SIGKILL at random points and resumed with --resume ends exactly (byte for byte)
where an uninterrupted run ends - teacher training, student training, relabelling, distillation; leftover state
is refused without --resume and with other settings; an unwritable output folder fails before any work; a full disk
fails with a clear error and leaves no partial output."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from imagefolders import needs_fmnist

from nrrdd.cli import main

pytestmark = [needs_fmnist, pytest.mark.slow]
SMALL = ["--train-limit", "2000", "--test-limit", "200", "--val-per-class", "20", "--threads", "1"]


def _evaluate_args(syn, *extra):
    return ["evaluate", "--labels", "hard", "--out", str(syn), "--ipc", "2", "--epochs", "150",
            "--checkpoint-every", "1", *SMALL, *extra]


def _spawn(args):
    code = f"import sys; from nrrdd.cli import main; sys.exit(main({args!r}))"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _progress(folder, pattern):
    """What a run has saved so far (names and write times of its pieces); changes with every save."""
    return frozenset((p.name, p.stat().st_mtime_ns) for p in folder.glob(pattern)) if folder.exists() else None


def _kill_three_times(args, folder, pattern, seed):
    """Start ``args`` (with --resume after the first time) and SIGKILL it at a random moment after it saved
    something new, three times; each attempt must still be running when it is killed."""
    rng = random.Random(seed)
    for attempt in range(3):
        before = _progress(folder, pattern)
        p = _spawn(args(*(["--resume"] if attempt else [])))
        deadline = time.time() + 120
        while _progress(folder, pattern) == before and p.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        assert p.poll() is None, f"{args()[0]} finished before it could be killed"
        p.send_signal(signal.SIGKILL)
        p.wait()


def _killed_then_resumed(args, state, output, other_settings, seed):
    """``args`` killed three times while it saves ``state``: no ``output`` yet; the leftover state is refused
    without --resume and with ``other_settings``; --resume finishes, and the spent state is removed."""
    _kill_three_times(args, state.parent, state.name, seed=seed)
    assert not output.exists()
    assert main(args()) == 2                                      # leftover state: refused without --resume
    assert main(args(*other_settings, "--resume")) == 2           # other settings: refused
    assert main(args("--resume")) == 0
    assert not state.exists()                                     # spent state is removed once the result is in


def test_killed_student_training_resumes_to_the_same_result(tmp_path):
    syn = tmp_path / "syn"
    assert main(["distill", "--method", "random", "--no-refine", "--ipc", "2", "--mipc", "10", "--out", str(syn),
                 *SMALL]) == 0
    ref = tmp_path / "ref"
    shutil.copytree(syn, ref)
    assert main(_evaluate_args(ref)) == 0
    expected = json.loads((ref / "eval_hard_conv3_s0.json").read_text())

    _killed_then_resumed(lambda *x: _evaluate_args(syn, *x), syn / "checkpoint_hard_conv3_s0.pt",
                         syn / "eval_hard_conv3_s0.json", ["--lr", "0.01"], seed=0)
    got = json.loads((syn / "eval_hard_conv3_s0.json").read_text())
    assert (got["test_top1"], got["val_top1"]) == (expected["test_top1"], expected["val_top1"])


def test_killed_teacher_training_resumes_to_the_same_teacher(tmp_path):
    args = lambda d, *x: ["train-teacher", "--out", str(d), "--teacher-epochs", "6", "--teacher-batch-size", "64",  # noqa: E731
                          "--train-limit", "1000", "--test-limit", "200", "--val-per-class", "20", "--threads", "1", *x]
    ref = tmp_path / "ref"
    assert main(args(ref)) == 0
    out = tmp_path / "killed"
    _killed_then_resumed(lambda *x: args(out, *x), out / "checkpoint_teacher.pt", out / "teacher.pt",
                         ["--teacher-lr", "0.01"], seed=1)
    assert (out / "teacher.pt").read_bytes() == (ref / "teacher.pt").read_bytes()


def test_killed_relabelling_resumes_to_byte_identical_labels(tmp_path):
    import torch

    from nrrdd.models import build_model

    torch.manual_seed(0)
    teacher = tmp_path / "t.pt"
    torch.save({"model": build_model("conv3", 10, 1, 28).state_dict()}, teacher)
    syn = tmp_path / "syn"
    assert main(["distill", "--method", "random", "--no-refine", "--ipc", "2", "--mipc", "10", "--out", str(syn),
                 *SMALL]) == 0
    ref = tmp_path / "ref"
    shutil.copytree(syn, ref)
    args = lambda d, *x: ["relabel", "--labels", "soft", "--teacher", str(teacher), "--out", str(d),  # noqa: E731
                          "--ipc", "2", "--epochs", "400", "--checkpoint-every", "5", *SMALL, *x]
    assert main(args(ref)) == 0
    parts = syn / "labels_soft.parts"
    _kill_three_times(lambda *x: args(syn, *x), parts, "epochs_*", seed=1)
    assert not (syn / "labels_soft.safetensors").exists()
    assert main(args(syn)) == 2                                   # leftover chunks: refused without --resume
    assert main(args(syn, "--resume")) == 0
    assert (syn / "labels_soft.safetensors").read_bytes() == (ref / "labels_soft.safetensors").read_bytes()
    assert not parts.exists()


def test_killed_distillation_resumes_after_discovery_at_its_refinement_batch(tmp_path):
    import torch

    from nrrdd.models import build_model

    torch.manual_seed(0)
    teacher = tmp_path / "t.pt"
    torch.save({"model": build_model("conv3", 10, 1, 28).state_dict()}, teacher)
    args = lambda d, *x: ["distill", "--teacher", str(teacher), "--out", str(d),  # noqa: E731
                          "--ipc", "2", "--mipc", "10", "--nrr-iterations", "120", "--refine-batch-size", "4", *SMALL, *x]
    assert main(args(tmp_path / "ref")) == 0
    syn = tmp_path / "syn"
    parts = syn / "refine.parts"
    _kill_three_times(lambda *x: args(syn, *x), parts, "batch_*", seed=2)
    assert not (syn / "synthetic.safetensors").exists()
    assert main(args(syn)) == 2                                   # leftover batches: refused without --resume
    assert main(args(syn, "--nrr-eps", "0.3", "--resume")) == 2   # other settings: refused
    assert (syn / "discover.parts" / "discovered.safetensors").exists()
    assert main(args(syn, "--resume")) == 0
    assert (syn / "synthetic.safetensors").read_bytes() == (tmp_path / "ref" / "synthetic.safetensors").read_bytes()
    assert not parts.exists() and not (syn / "discover.parts").exists()
    manifest = json.loads((syn / "manifest_distill.json").read_text())
    assert manifest["selection_resumed"] is True                  # resumed after discovery, not rerun
    ref_manifest = json.loads((tmp_path / "ref" / "manifest_distill.json").read_text())
    assert ref_manifest["selection_resumed"] is False
    assert manifest["sources"] == ref_manifest["sources"]


_KILL_AT = {  # code run before the CLI in a child process: SIGKILL itself at one step of finishing a distillation
    # synthetic.safetensors written, its PNG folder not yet renamed from .syn.partial to syn
    "publish": ("from pathlib import Path\n"
                "rename = Path.rename\n"
                "def killed(self, target):\n"
                "    if self.name == '.syn.partial':\n"
                "        os.kill(os.getpid(), signal.SIGKILL)\n"
                "    return rename(self, target)\n"
                "Path.rename = killed\n"),
    # the set and its folder published, config.json written, the manifest not yet
    "manifest": ("import nrrdd.pipeline as P\n"
                 "P.write_manifest = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"),
}


@pytest.mark.parametrize("at", sorted(_KILL_AT))
def test_distillation_killed_while_finishing_is_finished_by_resume(tmp_path, capsys, at):
    """The last steps of a distillation: synthetic.safetensors, the PNG folder renamed from its staging name,
    config.json, the manifest, then the resume pieces removed. A SIGKILL before the manifest leaves an
    unfinished run; --resume makes the set again from the pieces (refused without --resume, and with other
    settings), to the same bytes, and finishes it."""
    import torch

    from nrrdd.models import build_model

    torch.manual_seed(0)
    teacher = tmp_path / "t.pt"
    torch.save({"model": build_model("conv3", 10, 1, 28).state_dict()}, teacher)
    args = lambda d, *x: ["distill", "--teacher", str(teacher), "--out", str(d),  # noqa: E731
                          "--ipc", "2", "--mipc", "10", "--nrr-iterations", "3", *SMALL, *x]
    ref = tmp_path / "ref"
    assert main(args(ref)) == 0
    syn = tmp_path / "syn"
    code = f"import os, signal, sys\n{_KILL_AT[at]}from nrrdd.cli import main; sys.exit(main({args(syn)!r}))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]
    assert (syn / "synthetic.safetensors").exists() and not (syn / "manifest_distill.json").exists()
    assert ((syn / ".syn.partial").is_dir(), (syn / "syn").is_dir()) == ((True, False) if at == "publish" else (False, True))
    capsys.readouterr()
    assert main(args(syn)) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(args(syn, "--nrr-eps", "0.3", "--resume")) == 2   # pieces of other settings: refused, nothing removed
    assert (syn / "synthetic.safetensors").exists()
    assert main(args(syn, "--resume")) == 0
    for name in ["synthetic.safetensors", *(str(q.relative_to(ref)) for q in (ref / "syn").rglob("*.png"))]:
        assert (syn / name).read_bytes() == (ref / name).read_bytes(), name
    assert sorted(q.name for q in (syn / "syn").rglob("*.png")) == sorted(q.name for q in (ref / "syn").rglob("*.png"))
    assert not any((syn / n).exists() for n in (".syn.partial", ".syn.old", "refine.parts", "discover.parts"))
    assert json.loads((syn / "manifest_distill.json").read_text())["selection_resumed"] is True


def test_interrupted_write_without_resume_pieces_is_left_alone_with_a_message(tmp_path, capsys):
    """An unrefined set keeps no resume pieces: an interrupted publication cannot be checked against these
    settings, so nothing is removed and the message says what to do."""
    args = ["distill", "--method", "random", "--no-refine", "--ipc", "2", "--mipc", "10", "--out", str(tmp_path / "s"),
            *SMALL]
    assert main(args) == 0
    (tmp_path / "s" / "syn").rename(tmp_path / "s" / ".syn.partial")     # the state a kill before the rename leaves:
    (tmp_path / "s" / "manifest_distill.json").unlink()                  # (the manifest is written last)
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    assert "no resume pieces to make it again from: remove synthetic.safetensors" in capsys.readouterr().err
    assert (tmp_path / "s" / "synthetic.safetensors").exists() and (tmp_path / "s" / ".syn.partial").is_dir()


def test_unwritable_output_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    rc = main(["distill", "--method", "random", "--no-refine", "--ipc", "1", "--mipc", "5",
               "--out", str(blocker / "out"), *SMALL])
    assert rc == 2
    assert "is not writable" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs), mounted for the test; skipped where mounting is not permitted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_fails_cleanly_and_leaves_nothing_half_written(small_disk, tmp_path, capsys):
    args = ["distill", "--method", "random", "--no-refine", "--ipc", "2", "--mipc", "10", *SMALL]
    ref = tmp_path / "ref"
    assert main([*args, "--out", str(ref)]) == 0
    need = (ref / "synthetic.safetensors").stat().st_size
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * (free - need // 2))          # room for the PNGs, not for synthetic.safetensors
    out = small_disk / "run"
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == [], left                                  # no PNG folder, no safetensors, no temporary file
    filler.unlink()                                          # space freed: the same command now succeeds
    assert main([*args, "--out", str(out)]) == 0
    for name in ["synthetic.safetensors", *(str(p.relative_to(ref)) for p in (ref / "syn").rglob("*.png"))]:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert oct((out / "synthetic.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_synthetic_images_holding_nan_are_refused_with_image_and_class(tmp_path, capsys):
    from nrrdd.io import atomic_save_safetensors, load_safetensors

    syn = tmp_path / "syn"
    assert main(["distill", "--method", "random", "--no-refine", "--ipc", "2", "--mipc", "10", "--out", str(syn),
                 *SMALL]) == 0
    t, meta = load_safetensors(syn / "synthetic.safetensors")
    t["images"][7, 0, 3, 3] = float("nan")                     # image 7: class 3 (2 per class, in class order)
    atomic_save_safetensors(syn / "synthetic.safetensors", t, metadata=meta)
    capsys.readouterr()
    assert main(["evaluate", "--labels", "hard", "--out", str(syn), "--ipc", "2", "--epochs", "1", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "NaN/inf" in err and "images [7]" in err and "classes [3]" in err, err
