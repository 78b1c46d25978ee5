"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Test files that start a Ray cluster: under pytest-xdist they share one worker, so two clusters never run side by side.
RAY_FILES = {"tests/worker/test_ray.py", "tests/entrypoints/test_ray_server.py"}
# Where the long tests live (vLLM servers and engines, TP ranks, training): handed out first, so the run does not end
# on one worker finishing a long file while the other idles.
LONG_FIRST = ("ray", "tests/entrypoints/", "tests/worker/", "tests/multimodal/", "tests/training/")

# Under pytest-xdist, each worker's vLLM engines compute on a core of their own. vLLM's CPU worker binds its threads
# to cores ("auto": core 0, the other reserved), so two workers' engines would otherwise share core 0 while core 1
# idles. A test that sets its own binding (the tensor-parallel ones: "0|1") still does.
_xdist_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if _xdist_worker.startswith("gw") and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
    _cores = sorted(os.sched_getaffinity(0))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(_cores[int(_xdist_worker[2:]) % len(_cores)])


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """The README's `pytest -n 2`: each test file runs whole on one worker, in file order, so a module's fixtures (a
    server, spawned ranks) start once as in a plain run; the Ray files share one worker; the rooms with the long
    tests go first. (pytest-xdist's `--dist loadgroup` cannot group here: it renames node ids, which pytest 9.2 no
    longer lets a plugin do.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        ordered = False  # the work queue is put in LONG_FIRST order once, before the first file is handed out

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "ray" if path in RAY_FILES else path

        def _assign_work_unit(self, node: object) -> None:
            if self.workqueue and not self.ordered:
                self.ordered = True
                order = sorted(self.workqueue.items(), key=lambda unit: (
                    not unit[0].startswith(LONG_FIRST), -len(unit[1])))
                self.workqueue.clear()
                self.workqueue.update(order)
            super()._assign_work_unit(node)

    return FileScheduling(config, log)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny tensors: on a shared CPU, thread wake-ups cost 10-30x the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- nothing left behind: processes and /dev/shm segments (tensor-parallel, Ray and server tests) -------------

SHM = Path("/dev/shm")


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every live process (zombies are dead: they hold no memory or segments)."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z":
                table[int(entry.name)] = (int(fields[1]), fields[19])  # ppid, starttime
    return table


def _mapped_segments(pids) -> set[str]:
    """The /dev/shm names these processes have mapped."""
    names = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        names.update(line.split("/dev/shm/", 1)[1].split()[0] for line in maps.splitlines() if "/dev/shm/" in line)
    return names


class LeftoverWatch:
    """Every process this test process starts (and what those start, also once orphaned), and /dev/shm.

    A thread samples the process table: a process started since the watch began counts as ours if its parent is
    this process or one already counted (so an engine core whose API server was killed stays counted after init
    adopts it; a server of a wider-scoped fixture, already running, is not ours); it also notes the
    /dev/shm names our processes map. At the end, a counted process still alive is a leftover, and so is a noted
    name still in /dev/shm that was not there before (names of other jobs on a shared machine are never noted).
    """

    def __init__(self, poll_s: float = 0.25) -> None:
        self.shm_before = set(os.listdir(SHM))
        self.ours: dict[int, str] = {}  # pid -> start time (a reused pid is another process)
        self.mapped: set[str] = set()  # /dev/shm names our processes mapped
        self.before = {(pid, start) for pid, (_, start) in _process_table().items()}
        self.poll_s = poll_s
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="leftover-watch", daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        table = _process_table()
        me = os.getpid()
        grew = True
        while grew:  # parents before children, whatever the pid order
            grew = False
            for pid, (ppid, start) in table.items():
                parent_is_ours = ppid in self.ours and self.ours[ppid] == table.get(ppid, (0, ""))[1]
                if pid not in self.ours and (ppid == me or parent_is_ours) and (pid, start) not in self.before:
                    if ppid == me and _is_resource_tracker(pid):
                        continue  # this process's own tracker lives as long as it does (and unlinks at its exit)
                    self.ours[pid] = start
                    grew = True
        self.mapped |= _mapped_segments(pid for pid, start in self.ours.items() if table.get(pid, (0, ""))[1] == start)

    def _run(self) -> None:
        while not self.stopped.wait(self.poll_s):
            self._sample()

    def leftovers(self) -> tuple[list[str], list[str]]:
        """(processes still alive, as 'pid cmdline'; segments left in /dev/shm)."""
        table = _process_table()
        alive = [pid for pid, start in self.ours.items() if table.get(pid, (0, None))[1] == start]
        # sem.*: 32-byte named semaphores, not memory (loky's outlive their process by design)
        left = {name for name in self.mapped - self.shm_before if not name.startswith("sem.") and (SHM / name).exists()}
        return [f"{pid} {_cmdline(pid)}" for pid in alive], sorted(left)

    def check(self, timeout: float = 20.0) -> None:
        """Fail unless, within `timeout`, every process we started is gone and no new segment is left."""
        self._sample()
        self.stopped.set()
        self.thread.join()
        deadline = time.time() + timeout
        while (left := self.leftovers()) != ([], []) and time.time() < deadline:
            time.sleep(0.2)
        assert left == ([], []), f"left behind after {timeout:.0f}s: processes {left[0]}, /dev/shm {left[1]}"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def _is_resource_tracker(pid: int) -> bool:
    return "multiprocessing.resource_tracker" in _cmdline(pid)


@pytest.fixture
def leaves_nothing() -> Iterator[LeftoverWatch]:
    """After the test: no process it started is alive and no /dev/shm segment it made is left."""
    watch = LeftoverWatch()
    yield watch
    watch.check()


@pytest.fixture(scope="module")
def module_leaves_nothing() -> Iterator[LeftoverWatch]:
    """`leaves_nothing` for a module whose processes are module fixtures (servers, spawned ranks)."""
    watch = LeftoverWatch()
    yield watch
    watch.check()
