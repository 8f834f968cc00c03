"""Files: atomic writes, safetensors, hashes and the run manifest.

Nothing is ever half-written: every file goes to a temporary name in the same folder and is renamed
into place, so a killed run leaves either the old file or the new one.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()      # what open() would give: mkstemp's files are private (0600)


def _atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return _atomic(path, write)


def write_between_markers(path: str | Path, marker: str, text: str, *, add_missing: bool = True) -> Path | None:
    """Put ``text`` between ``<!-- {marker}:start -->`` and ``<!-- {marker}:end -->`` in the file at ``path``,
    keeping the rest; written atomically.

    Markers that are both absent are added at the end of the file (a missing file is created) with
    ``add_missing``; without it nothing is written and None returned. Raises ValueError when only one marker is
    present or they are out of order."""
    path = Path(path)
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    body = path.read_text() if path.exists() else ""
    i, j = body.find(start), body.find(end)
    block = f"{start}\n{text.strip(chr(10))}\n{end}"
    if i < 0 and j < 0:
        if not add_missing:
            return None
        body = (body.rstrip("\n") + "\n\n" if body.strip() else "") + block + "\n"
    elif 0 <= i < j:
        body = body[:i] + block + body[j + len(end):]
    else:
        raise ValueError(f"{path}: markers {start} ... {end} incomplete or out of order")
    return atomic_write_text(path, body)


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """``src``'s bytes as ``dst``, written atomically."""
    return _atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    def write(tmp: str) -> None:
        # through a file object: torch.save names the archive inside after a *path* (here the random temporary
        # name), which made the same weights hash differently on every save
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    return _atomic(path, write)


META_KEY = "nrrdd"         # the safetensors metadata key holding this project's metadata as canonical JSON


def atomic_save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor],
                            metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # One canonical JSON string under one key: safetensors writes a metadata dict in a different key order
    # from one process to the next, and the same data must give the same bytes (resumed or sharded runs).
    meta = {META_KEY: json.dumps(metadata, sort_keys=True)} if metadata else None

    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=meta)
        except Exception as e:      # safetensors reports I/O failures (a full disk) as its own error type
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            errno_ = int(code.group(1))
            raise OSError(errno_, f"{os.strerror(errno_)} while writing {path}") from e

    return _atomic(path, write)


def safetensors_header(path: str | Path) -> tuple[dict, int]:
    """(the header of a safetensors file, the offset of its data)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def atomic_concat_safetensors(path: str | Path, name: str, pieces: list[str | Path],
                              metadata: dict[str, str] | None = None) -> Path:
    """One safetensors file holding tensor ``name``: the concatenation, along the first dimension, of the tensor
    ``name`` of every file in ``pieces``, in order. Streamed: the pieces' bytes are copied through a small
    buffer, so nothing near the whole tensor is ever in memory. The bytes are those
    :func:`atomic_save_safetensors` writes for the whole tensor (same header, same padding)."""
    heads = []
    for piece in pieces:
        header, start = safetensors_header(piece)
        if name not in header:
            raise ValueError(f"{piece} holds no tensor {name!r}")
        heads.append((Path(piece), header[name], start))
    if not heads:
        raise ValueError(f"no pieces to concatenate into {path}")
    dtype, rest = heads[0][1]["dtype"], heads[0][1]["shape"][1:]
    for piece, h, _ in heads:
        if h["dtype"] != dtype or h["shape"][1:] != rest:
            raise ValueError(f"{piece}: {name} is {h['dtype']} {h['shape']}, the first piece {dtype} [*, {rest}]")
    nbytes = sum(h["data_offsets"][1] - h["data_offsets"][0] for _, h, _ in heads)
    shape = [sum(h["shape"][0] for _, h, _ in heads), *rest]
    header: dict = {}
    if metadata:
        header["__metadata__"] = {META_KEY: json.dumps(metadata, sort_keys=True)}
    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)                   # safetensors aligns the data to 8 bytes

    def write(tmp: str) -> None:
        try:
            with open(tmp, "wb") as out:
                out.write(len(text).to_bytes(8, "little") + text)
                for piece, h, start in heads:
                    with open(piece, "rb") as f:
                        f.seek(start + h["data_offsets"][0])
                        left = h["data_offsets"][1] - h["data_offsets"][0]
                        while left:
                            buf = f.read(min(left, 64 << 20))
                            if not buf:
                                raise OSError(errno.EIO, f"{piece} ends before its data does")
                            out.write(buf)
                            left -= len(buf)
                out.flush()
                os.fsync(out.fileno())
        except OSError as e:
            raise OSError(e.errno or errno.EIO, f"{e.strerror or e} while writing {path}") from e

    return _atomic(path, write)


def load_safetensors(path: str | Path, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; ``tensors=False``: the metadata alone (the header is read,
    not the data)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for k in f.keys() if tensors else ():
            out[k] = f.get_tensor(k)
    if META_KEY in meta:                # written by atomic_save_safetensors; older files hold a plain dict
        meta = json.loads(meta[META_KEY])
    return out, meta


def atomic_save_image(path: str | Path, image, **kwargs) -> Path:
    """Save a PIL image atomically; the format comes from the final suffix."""
    path = Path(path)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}[path.suffix.lower()]
    return _atomic(path, lambda tmp: image.save(tmp, format=fmt, **kwargs))


def atomic_save_figure(path: str | Path, fig, **kwargs) -> Path:
    """Save a matplotlib figure atomically; the format comes from the final suffix."""
    fmt = Path(path).suffix.lstrip(".").lower()
    return _atomic(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def tensor_sha256(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def versions() -> dict[str, str]:
    import numpy
    import torchvision

    from . import __version__

    v = {
        "nrrdd": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }
    try:
        import triton

        v["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional on CPU
        pass
    return v


def refuse_overwrite(path: str | Path, what: str) -> None:
    """Outputs are never deleted or overwritten silently."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(
            f"{what} already exists at {path}; this run would overwrite it. "
            f"Choose another --out folder (existing outputs are never deleted)."
        )


@contextlib.contextmanager
def file_lock(path: str | Path, block: bool = True) -> Iterator[bool]:
    """An exclusive lock (``flock``) on the file ``path`` (created, never removed) while inside. ``block=False``:
    yields False at once when another process holds it (and True when this one got it). The lock goes with the
    process: a killed holder frees it. On a file system without ``flock`` (some network mounts) it warns and
    yields True without a lock: one process at a time is then up to the user."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            warnings.warn(f"{path}: the file system does not lock files ({e.strerror}); run one process at a time "
                          "on this folder", stacklevel=3)
            yield True
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class ChunkStore:
    """Pieces of a stage in progress, one safetensors file each (written atomically), for resuming.

    Every piece carries the run's ``identity`` (a JSON string); a folder holding pieces of another identity
    is refused, so a resume never mixes two configurations. ``remove()`` once the stage's output is written.
    """

    def __init__(self, folder: str | Path, identity: dict):
        self.folder = Path(folder)
        self.identity = json.dumps(identity, sort_keys=True, default=str)

    def exists(self) -> bool:
        return self.folder.is_dir() and any(self.folder.glob("*.safetensors"))

    def save(self, name: str, tensors: dict[str, torch.Tensor], **meta: str) -> None:
        atomic_save_safetensors(self.folder / f"{name}.safetensors", {k: v.contiguous() for k, v in tensors.items()},
                                metadata={"identity": self.identity, **meta})

    def load(self, name: str, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """A piece (None when absent), its identity checked; ``tensors=False``: its metadata only."""
        path = self.folder / f"{name}.safetensors"
        if not path.exists():
            return None
        tensors, meta = load_safetensors(path, tensors)
        if meta.get("identity") != self.identity:
            raise ValueError(f"{path} was written by a run with other settings: it cannot be resumed with these; "
                             f"remove {self.folder} or use another --out")
        return tensors, meta

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def ensure_writable(folder: str | Path) -> None:
    """Fail before any work, with the reason, when ``folder`` cannot be created or written to."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".nrrdd-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OSError(f"output folder {folder} is not writable ({e.strerror or e}): choose another --out") from e
