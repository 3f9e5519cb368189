"""The process group ``torchrun`` sets up, shared by training and evaluation; and
:class:`ProcessLocalLock`, the lock of an object that is copied into other processes (a pipeline sent to
DataLoader workers)."""

from __future__ import annotations

import atexit
import os
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

#: How long ranks wait for each other in :meth:`DistributedContext.broadcast_object` and
#: :meth:`DistributedContext.gather_objects`: ranks of a long job (a cohort of slides) may finish hours
#: apart, past the process group's default timeout (10 min for NCCL, 30 for gloo). torchrun stops
#: every rank when one dies, so a long wait never outlives a crash.
OBJECT_TIMEOUT = timedelta(days=2)
_OBJECT_GROUPS: dict[tuple[int, int], Any] = {}


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable Python object; the others pass anything)."""
        if self.world_size <= 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=_object_group(self))
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank; also a barrier that waits up to
        :data:`OBJECT_TIMEOUT` (a plain :meth:`barrier` gives up after the group's default timeout)."""
        if self.world_size <= 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=_object_group(self))
        return out


def distributed_context() -> DistributedContext:
    """Join the process group ``torchrun`` set up (NCCL on GPUs, gloo on the CPU), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext()
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            from attnzoo._placement import local_cuda_ordinal

            torch.cuda.set_device(local_cuda_ordinal(local))
        dist.init_process_group(backend)
        _release_at_exit()
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local)


_FAILED: list[int] = []


def note_failure(status: int) -> None:
    """Say that this process is ending in failure (the command line's non-zero exit status): its process group is
    then left to the interpreter's teardown, as after an uncaught error (:func:`_release_at_exit`)."""
    _FAILED.append(status)


def _release_at_exit() -> None:
    """Destroy the process group this module made when the process ends: left to the interpreter's teardown, gloo's
    worker threads can abort the finished process ("terminate called without an active exception", exit -6, so a
    torchrun run that trained to the end fails). Not after a failure (an uncaught error, or :func:`note_failure`):
    a destroy waits for the rank's queued collectives, which a peer that stopped would never match (torchrun stops
    every rank when one dies)."""
    atexit.register(_destroy_unless_failed)


def _destroy_unless_failed() -> None:
    import torch.distributed as dist

    uncaught = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)  # set before any excepthook runs
    if not _FAILED and uncaught is None and dist.is_available() and dist.is_initialized():
        _OBJECT_GROUPS.clear()
        dist.destroy_process_group()


def _object_group(ctx: DistributedContext) -> Any:
    """A gloo group over every rank for Python objects (CPU tensors, whatever the default backend is)
    with :data:`OBJECT_TIMEOUT`; made on first use, which every rank reaches at the same call."""
    import torch.distributed as dist

    key = (ctx.world_size, id(dist.group.WORLD))  # a new default group (after destroy + init) gets its own
    if key not in _OBJECT_GROUPS:
        _OBJECT_GROUPS[key] = dist.new_group(backend="gloo", timeout=OBJECT_TIMEOUT)
    return _OBJECT_GROUPS[key]


class ProcessLocalLock:
    """A ``threading.Lock`` (``with lock: ...``) that pickles as a new, unlocked one: an object holding it stays
    picklable (a pipeline for spawned DataLoader workers), and a copy unpickled in another process (pickling,
    ``spawn``/``forkserver`` workers), whose threads are its own, never waits on this process's holder. A
    ``fork`` does not pickle: the child gets a copy of the lock's state, as with a plain ``threading.Lock``
    (held in the child if a thread of the parent held it at the fork)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()

    def __reduce__(self) -> tuple[type[ProcessLocalLock], tuple[()]]:
        return type(self), ()
