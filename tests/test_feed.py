"""The synthetic set fed to relabelling and training: streamed from host memory or held on the device, the
batches are the same numbers, and so are the labels and the trained student.

On a machine with CUDA the same tests run on the GPU too (streamed: pinned memory, a copy stream, events),
and one checks that the streamed set is never on the device."""
import threading

import pytest
import torch

from nrrdd.augment import epoch_augment, mixed_batch
from nrrdd.feed import SetFeed, set_on_device
from nrrdd.relabel import RelabelSettings, relabel
from nrrdd.runtime import QUIET, Runtime
from nrrdd.train import StudentSettings, train_student

# "cuda" without an index as runs in one process name it, "cuda:N" as torchrun's processes do
DEVICES = ["cpu"] + (["cuda", f"cuda:{torch.cuda.device_count() - 1}"] if torch.cuda.is_available() else [])


def _set(n=13, c=3, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, s, s, generator=g), torch.arange(n) % 5


def _feed_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nrrdd-feed")]


def _same(batch, want) -> None:
    for u, v in zip(batch, want):
        assert (u is None and v is None) or torch.equal(u.cpu(), v.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("ahead", [1, 2, 5])
def test_the_feed_makes_mixed_batch_s_batches(device, resident, ahead):
    images, labels = _set()
    stored = torch.randn(13, 2).half()
    aug = epoch_augment(seed=3, epoch=2, n=13, size=16, factor=2)
    order = torch.randperm(13, generator=torch.Generator().manual_seed(1))
    batches = list(order.split(4))                                  # 4, 4, 4, 1: a short last batch
    feed = SetFeed(images, labels, factor=2, device=device, resident=resident, ahead=ahead)
    assert feed.resident == resident and (resident or feed.images is images)    # streamed: the set not copied
    got = list(feed.batches(aug, batches, extra=lambda idx: stored[idx]))
    assert len(got) == 4
    for batch, idx in zip(got, batches):
        assert all(t.device == feed.device for t in batch)
        _same(batch, mixed_batch(images, labels, aug, idx, factor=2) + (stored[idx],))
    assert not _feed_threads()


def test_a_failing_gather_raises_in_the_caller_and_leaves_no_thread():
    images, labels = _set()
    aug = epoch_augment(seed=0, epoch=0, n=13, size=16, factor=1)
    feed = SetFeed(images, labels, factor=1, device="cpu", resident=False)
    with pytest.raises(IndexError):
        list(feed.batches(aug, [torch.arange(4), torch.tensor([0, 99])]))
    assert not _feed_threads()
    # a consumer that stops early (a NaN, a kill signal turned into an exception) leaves no thread either
    it = feed.batches(aug, [torch.arange(4)] * 6)
    next(it)
    it.close()
    assert not _feed_threads()


class _FailsAtStep(torch.nn.Module):
    """A student that runs out of memory at its third step (as a GPU can, mid-epoch)."""

    def __init__(self):
        super().__init__()
        self.fc, self.calls = torch.nn.Linear(3 * 16 * 16, 5), 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise torch.OutOfMemoryError("out of memory (test)")
        return self.fc(x.flatten(1))


def test_an_error_in_the_consumer_leaves_no_thread():
    """Training stops mid-epoch; its traceback (kept here by pytest.raises) holds the loop's frame, and the
    feed's thread must be gone all the same."""
    images, labels = _set()
    with pytest.raises(torch.OutOfMemoryError) as err:
        train_student(_FailsAtStep(), images, labels,
                      StudentSettings(mode="hard", epochs=2, batch_size=4, seed=0, factor=2, set_on_device=False))
    assert err.value.__traceback__ is not None and not _feed_threads()


def test_placement():
    images, _ = _set()
    assert set_on_device(images.nbytes, torch.device("cpu")) is True       # nothing to copy on the CPU
    assert set_on_device(images.nbytes, torch.device("cpu"), False) is False
    assert set_on_device(images.nbytes, torch.device("cpu"), True) is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_streamed_set_is_never_on_the_device():
    images, labels = torch.randn(1024, 3, 64, 64), torch.arange(1024) % 5        # 48 MiB; batches of 8: 384 KiB
    aug = epoch_augment(seed=0, epoch=0, n=1024, size=64, factor=2)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    feed = SetFeed(images, labels, factor=2, device="cuda", resident=False, ahead=2)
    for _ in feed.batches(aug, list(torch.arange(1024).split(8))):
        pass
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < images.nbytes / 8, f"{peak} bytes on the device for a streamed set of {images.nbytes}"
    big = 1 << 45                                                   # 32 TiB: no card holds that
    assert set_on_device(big, torch.device("cuda")) is False
    assert set_on_device(images.nbytes, torch.device("cuda")) is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_device_waits_for_a_slow_copy():
    """Each copy is held up on its stream (a 0.1 s spin kernel before it): a consumer that did not wait for
    the copy's event would read the batch before it arrived."""
    images, labels = _set()
    aug = epoch_augment(seed=3, epoch=2, n=13, size=16, factor=2)
    batches = list(torch.arange(13).split(4))
    for resident in (True, False):
        feed = SetFeed(images, labels, factor=2, device="cuda", resident=resident, ahead=2)
        prepare = feed._prepare

        def slow_prepare(*args):
            with torch.cuda.device(feed.device), torch.cuda.stream(feed._stream):
                torch.cuda._sleep(100_000_000)
            return prepare(*args)

        feed._prepare = slow_prepare
        for batch, idx in zip(feed.batches(aug, batches), batches):
            _same(batch, mixed_batch(images, labels, aug, idx, factor=2) + (None,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_step_never_waits_on_the_host_for_the_gpu():
    """No synchronising call (a copy from pageable memory, a read of a device value) while the feed makes
    its batches, the set on the device or in host memory: PyTorch's sync debug mode raises on one."""
    images, labels = _set(n=64, s=32)
    aug = epoch_augment(seed=0, epoch=0, n=64, size=32, factor=2)
    stored = torch.randn(64, 2).half()
    for resident in (True, False):
        feed = SetFeed(images, labels, factor=2, device="cuda", resident=resident)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for batch in feed.batches(aug, list(torch.arange(64).split(8)), extra=lambda idx: stored[idx]):
                (batch.x.sum() + batch.lam.sum() + batch.extra.float().sum()).neg_()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _teacher(c=3, s=16, k=5):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c * s * s, k)).eval()


@pytest.mark.parametrize("device", DEVICES)
def test_relabel_and_training_are_the_same_from_host_or_device(device):
    images, labels = _set()
    kw = dict(epochs=3, seed=4, factor=2, batch_size=4)
    rt = Runtime(device=torch.device(device), show_progress=False)
    made = {}
    for mode in ("dbr", "soft"):
        a = relabel(_teacher().to(device), images, labels, RelabelSettings(mode=mode, set_on_device=True, **kw), rt)
        b = relabel(_teacher().to(device), images, labels, RelabelSettings(mode=mode, set_on_device=False, **kw), rt)
        assert torch.equal(a, b)
        made[mode] = a
    students = []
    for on_device in (True, False):
        torch.manual_seed(1)
        student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 5))
        settings = StudentSettings(mode="dbr", set_on_device=on_device, **kw)
        students.append(train_student(student, images, labels, settings, rt, stored=made["dbr"]))
    for p, q in zip(students[0].state_dict().values(), students[1].state_dict().values()):
        assert torch.equal(p, q)


def _host_waits(fn) -> "collections.Counter":
    """Where ``fn`` made the host wait for the GPU: {(file, line): count}, from PyTorch's sync debug mode."""
    import collections
    import warnings

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return collections.Counter((w.filename, w.lineno) for w in seen if "synchroniz" in str(w.message).lower())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["dbr", "soft", "hard", "online"])
def test_a_training_step_never_waits_on_the_host_for_the_gpu(mode):
    """Whole training steps (feed, student, loss, AdamW, scheduler) and relabelling batches: the host waits for
    the GPU at the start (models and set to the device) and once per epoch (the NaN check), never per step.
    3 epochs of 8 steps: a wait per step is 24 at one place."""
    images, labels = _set(n=64, s=16)
    stored = None
    if mode in ("dbr", "soft"):
        kw = dict(mode=mode, epochs=3, seed=0, factor=2, batch_size=8)
        cuda = Runtime(device=torch.device("cuda"), show_progress=False)
        for on_device in (True, False):
            teacher = _teacher().cuda()
            waits = _host_waits(lambda: relabel(teacher, images, labels,
                                                RelabelSettings(set_on_device=on_device, **kw), cuda))
            assert max(waits.values(), default=0) <= 3, waits
        stored = relabel(_teacher(), images, labels, RelabelSettings(**kw), QUIET)
    for on_device in (True, False):
        student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 5)).cuda()
        teacher = _teacher().cuda() if mode == "online" else None
        waits = _host_waits(lambda: train_student(
            student, images, labels, StudentSettings(mode=mode, epochs=3, batch_size=8, seed=0, factor=2,
                                                     set_on_device=on_device),
            Runtime(device=torch.device("cuda"), show_progress=False), stored=stored, teacher=teacher))
        assert max(waits.values(), default=0) <= 3, waits
