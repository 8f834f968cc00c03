"""Stage 3a's storage: labels go to disk a chunk of epochs at a time and the label file is streamed from the
chunks, so the whole [E, N, C] tensor (30 GB of soft labels at ImageNet-1K IPC 50 x 300 epochs) is never in
memory; the file is the one the whole tensor would give, to the byte."""
import dataclasses

import pytest
import torch

from nrrdd.io import atomic_concat_safetensors, load_safetensors
from nrrdd.relabel import RelabelSettings, relabel
from nrrdd.rundir import LabelParts, save_labels


def _teacher():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 7)).eval()


def test_labels_in_chunks_make_the_file_the_whole_tensor_makes(tmp_path):
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(10, 1, 8, 8, generator=g), torch.arange(10) % 7
    settings = RelabelSettings(mode="soft", epochs=7, seed=3, factor=1, batch_size=4)
    whole = relabel(_teacher(), images, labels, settings)
    assert whole.shape == (7, 10, 7)
    parts = LabelParts(tmp_path / "parts", {"run": 1}, every=3)
    assert relabel(_teacher(), images, labels, settings, parts=parts) is None     # the labels stay on disk
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == [
        "epochs_00000-00003.safetensors", "epochs_00003-00006.safetensors", "epochs_00006-00007.safetensors"]
    meta = dict(mode="soft", seed=3, factor=1, cutmix_alpha=1.0, temperature=1.0, synthetic_sha256="abc")
    streamed = parts.write(tmp_path / "streamed.safetensors", 7, **meta)
    at_once = save_labels(tmp_path / "at_once.safetensors", whole, **meta)
    assert streamed.read_bytes() == at_once.read_bytes()
    with pytest.raises(RuntimeError, match="not of all 8"):
        parts.write(tmp_path / "more.safetensors", 8, **meta)


def test_a_resumed_relabelling_starts_after_its_last_chunk(tmp_path):
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(6, 1, 8, 8, generator=g), torch.arange(6) % 7
    settings = RelabelSettings(mode="dbr", epochs=5, seed=0, factor=1, batch_size=4)
    whole = relabel(_teacher(), images, labels, settings)
    parts = LabelParts(tmp_path / "p", {"run": 1}, every=2)
    # "killed" after epoch 2's chunk
    relabel(_teacher(), images, labels, dataclasses.replace(settings, epochs=3), parts=parts)
    (tmp_path / "p" / "epochs_00002-00003.safetensors").unlink()                # (the last chunk never written)
    again = LabelParts(tmp_path / "p", {"run": 1}, every=2)
    assert again.first_epoch() == 2
    relabel(_teacher(), images, labels, settings, parts=again)
    again.write(tmp_path / "l.safetensors", 5, mode="dbr", seed=0, factor=1, cutmix_alpha=1.0, temperature=1.0,
                synthetic_sha256="-")
    assert torch.equal(load_safetensors(tmp_path / "l.safetensors")[0]["labels"], whole)
    with pytest.raises(ValueError, match="other settings"):
        LabelParts(tmp_path / "p", {"run": 2}, every=2).first_epoch()


def test_concatenated_pieces_must_agree(tmp_path):
    from nrrdd.io import atomic_save_safetensors

    atomic_save_safetensors(tmp_path / "a.safetensors", {"labels": torch.zeros(2, 3, 4, dtype=torch.float16)})
    atomic_save_safetensors(tmp_path / "b.safetensors", {"labels": torch.zeros(1, 3, 5, dtype=torch.float16)})
    with pytest.raises(ValueError, match="the first piece"):
        atomic_concat_safetensors(tmp_path / "c.safetensors", "labels",
                                  [tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    assert not (tmp_path / "c.safetensors").exists()


def test_label_chunks_that_do_not_advance_are_refused(tmp_path):
    from nrrdd.io import atomic_save_safetensors

    parts = LabelParts(tmp_path / "p", {"run": 1}, every=2)
    parts.save(torch.zeros(2, 3, 4, dtype=torch.float16), 0, 2)
    atomic_save_safetensors(tmp_path / "p" / "epochs_00002-00002.safetensors", {"labels": torch.zeros(0, 3, 4)},
                            metadata={"identity": parts.store.identity})
    with pytest.raises(ValueError, match="at least one epoch"):
        LabelParts(tmp_path / "p", {"run": 1}, every=2).first_epoch()


class _NaNAtCall(torch.nn.Module):
    def __init__(self, bad_call: int):
        super().__init__()
        self.fc, self.calls, self.bad_call = torch.nn.Linear(64, 7), 0, bad_call

    def forward(self, x):
        self.calls += 1
        out = self.fc(x.flatten(1))
        return out.fill_(float("nan")) if self.calls == self.bad_call else out


@pytest.mark.parametrize("mode", ["dbr", "soft"])
def test_a_teacher_giving_nan_stops_the_relabelling_naming_the_batch(mode):
    """The check is read once per epoch (no host sync per batch on a GPU) but still names the first bad batch."""
    images, labels = torch.randn(13, 1, 8, 8), torch.arange(13) % 7
    with pytest.raises(FloatingPointError, match=r"NaN/inf labels at epoch 1, samples 8\.\."):
        relabel(_NaNAtCall(bad_call=4 + 3), images, labels,
                RelabelSettings(mode=mode, epochs=3, seed=0, factor=1, batch_size=4))        # 4 batches an epoch: call 7 is epoch 1's third batch
