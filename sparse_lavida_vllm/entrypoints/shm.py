"""Nothing left in /dev/shm: vLLM's shared-memory names are unlinked once every user has mapped them."""

from __future__ import annotations

import functools


def _unlink_shm(name: str) -> None:
    """Remove a POSIX shared-memory name (a file under /dev/shm on Linux); mappings of it stay valid."""
    import _posixshmem

    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass


def unlink_once_joined(init_cpu_shm):
    """Wrap vLLM's _CPUSHMDistributed._init_cpu_shm (the tensor-parallel collectives on CPU): once every rank has
    joined, unlink the segment this rank created.

    vLLM's C++ SHM manager creates one /dev/shm segment per rank (`<group>-cpushm_<rank>`, 4 MiB) and unlinks them
    only from its destructor, i.e. at a clean interpreter exit: a worker that is killed (the executor's shutdown,
    our orphan watchdog, the OOM killer) leaves them behind for good. _init_cpu_shm returns after a barrier that
    follows every rank's join, so by then every rank has mapped every segment and nothing opens one by name again:
    the name can go right away. The memory lives until the last mapping ends, so the collectives are unaffected and
    nothing stays in /dev/shm however the workers end (the destructor's later unlink finds no name, harmlessly).
    """

    @functools.wraps(init_cpu_shm)
    def wrapper(self):
        handle = init_cpu_shm(self)
        _unlink_shm(f"{self.group_name}_{self.communicator.rank}")
        return handle

    wrapper.__sparse_lavida__ = True
    return wrapper


def _release_name(owner) -> None:
    """A vLLM ring buffer or tensor arena this process created: remove its /dev/shm name now, keep the mapping."""
    from multiprocessing import resource_tracker

    memory = getattr(owner, "shared_memory", None)
    if memory is None or not getattr(owner, "is_creator", False):
        return
    _unlink_shm(memory.name)
    resource_tracker.unregister(memory._name, "shared_memory")  # nothing left for the tracker to clean up
    owner.is_creator = False  # so that its __del__ does not unlink the name a second time


def unlink_once_ready(wait_until_ready):
    """Wrap vLLM's MessageQueue.wait_until_ready (engine core <-> workers, the TP group's broadcaster): once every
    reader is connected, the writer unlinks the segments it created (`psm_*`, up to 240 MiB each).

    Python's resource tracker unlinks a segment whose creator died only if the tracker outlives it (a process-group
    kill takes both), and Ray workers each run their own. A reader maps the ring buffer (and tensor arena) before it
    subscribes, and the writer returns from here only after every local reader's subscription: from then on nothing
    opens the segments by name, so the names can go while the mappings serve the queue until its processes end.
    """

    @functools.wraps(wait_until_ready)
    def wrapper(self):
        wait_until_ready(self)
        if self._is_writer:
            _release_name(getattr(self, "buffer", None))
            _release_name(getattr(self, "tensor_arena", None))

    wrapper.__sparse_lavida__ = True
    return wrapper
