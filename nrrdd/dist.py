"""Several processes with ``torch.distributed``, launched by ``torchrun``: who does which piece of work.

One rule makes 1 and N processes write the same bytes: every stage cuts its work into the same pieces
whatever the number of processes, and piece ``k`` goes to rank ``k % world``. The pieces are

- discovery: batches of the candidate stream (``discover_batch_size`` candidates, classes in order),
- refinement: the refinement batches (``refine_batch_size`` images, classes interleaved),
- relabelling: the per-epoch sample batches,
- evaluation: every ``world``-th test image (only counts are combined).

A piece's inputs and random draws depend on (seed, piece) only, never on the rank, and a piece is always
computed as the same batch, so its floating-point result is the same bit for bit (given the same hardware,
precision and threads per process). Candidate files are screened (shared out, results all-gathered) before
discovery's batches are cut, so an unreadable file leaves out the same slot in 1 and N processes; a file that
passes screening but fails to decode is dropped from its own batch only. Results meet through collectives
on CPU tensors (a gloo group, also under NCCL) or, for refinement, through the run's resume pieces on the
shared output folder. Only rank 0 writes outputs; every stage ends with a barrier, so the next stage reads
complete files.

Student training is data parallel (DistributedDataParallel): each step's global batch (the same samples
as in one process) is split across ranks and gradients are averaged, so it follows the one-process run
up to float rounding and BatchNorm statistics over each rank's part of the batch (SyncBatchNorm on CUDA,
``--sync-bn``), i.e. within run-to-run noise, not bit for bit.
"""
from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, n_pieces: int) -> range:
        """The pieces of ``n_pieces`` this rank computes: ``rank, rank + world, ...``."""
        return range(self.rank, n_pieces, self.world)

    def owns(self, piece: int) -> bool:
        return piece % self.world == self.rank

    def barrier(self) -> None:
        if self.active:
            tdist.barrier(group=_cpu_group())

    def all_gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable, CPU tensors inside), in rank order, on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        tdist.all_gather_object(out, obj, group=_cpu_group())
        return out

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` in rank order on rank 0 (None elsewhere)."""
        if not self.active:
            return [obj]
        out = [None] * self.world if self.is_main else None
        tdist.gather_object(obj, out, dst=0, group=_cpu_group())
        return out

    def first(self, index: int) -> int:
        """The smallest of every rank's ``index`` that is not -1 (-1 when all are), on every rank: e.g. the
        earliest batch that went wrong, so that every rank stops, and with the same message."""
        if not self.active:
            return index
        none = 2 ** 62
        t = torch.tensor([index if index >= 0 else none], dtype=torch.int64)
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN, group=_cpu_group())
        return -1 if int(t) == none else int(t)

    def sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        tdist.all_reduce(t, group=_cpu_group())
        return t.tolist()


SINGLE = Dist()
_CPU_GROUP = None


def _cpu_group():
    return _CPU_GROUP


def env_world() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device, timeout_min: float = 60.0) -> tuple[Dist, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (once per process).

    Returns this process's :class:`Dist` and its device: ``cuda:LOCAL_RANK`` when the run is on CUDA (NCCL),
    the CPU otherwise (gloo). Without torchrun (``WORLD_SIZE`` unset or 1): :data:`SINGLE`, ``device``."""
    global _CPU_GROUP
    world = env_world()
    if world <= 1:
        return SINGLE, device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local} has no GPU: this node has {torch.cuda.device_count()}; start "
                               "at most that many processes per node (torchrun --nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=timeout_min)
        tdist.init_process_group(backend, timeout=timeout)
        # Object collectives (pickled CPU tensors) go through gloo even when the model's gradients use NCCL.
        _CPU_GROUP = tdist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else tdist.group.WORLD
    if rank != 0:
        warnings.filterwarnings("ignore", category=UserWarning)     # the same warnings as rank 0's, once is enough
    return Dist(rank, world, local), device


def teardown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()
