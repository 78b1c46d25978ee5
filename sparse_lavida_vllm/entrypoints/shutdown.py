"""How a served process stops: the SIGTERM drain (503s for new requests, a deadline for running ones) and the
orphan watchdog of the engine core and workers."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import threading
import time

# Set in the API server when a SIGTERM / SIGINT starts the shutdown: new requests get 503, running ones drain.
_draining = False
SHUTTING_DOWN = "the server is shutting down and admits no new requests"


def is_draining() -> bool:
    """Whether this process's server has started its shutdown (plugin.py's request hooks answer 503 then)."""
    return _draining


def shutting_down(message: str) -> Exception:
    """A 503 that every layer passes through quietly: vLLM's generate() re-raises a GracefulHTTPError as is, the
    streaming routes turn a GenerationError into an error event without logging a traceback."""
    from http import HTTPStatus

    from vllm.exceptions import GracefulHTTPError, RetryableRequestError

    class ServerShuttingDown(RetryableRequestError, GracefulHTTPError):
        def __init__(self, message: str) -> None:
            Exception.__init__(self, message)
            self.message = message
            self.status_code = self.http_status = HTTPStatus.SERVICE_UNAVAILABLE

    return ServerShuttingDown(message)


def _drain_budget(timeout: float) -> tuple[float, float]:
    """(deadline, engine timeout) for a --shutdown-timeout: unfinished requests are ended at the deadline, the
    engine core is killed if still there at the engine timeout; the API server's own exit (~2 s) fits the rest,
    so the whole process group is gone within --shutdown-timeout."""
    engine_timeout = timeout - min(4.0, timeout / 3)
    return max(engine_timeout - 4.0, engine_timeout / 2), engine_timeout


def mark_draining(shutdown):
    """Wrap AsyncLLM.shutdown, which a SIGTERM calls (in a thread) with --shutdown-timeout.

    From then on new requests get 503. vLLM's drain lets running requests finish; the ones still running at the
    deadline get a clean 503 (an error event when streamed) and are aborted in the engine core, which then has no
    work left and stops in order instead of being killed mid-step.
    """

    @functools.wraps(shutdown)
    def wrapper(self, timeout: float | None = None):
        global _draining
        handler = getattr(self, "output_handler", None)
        timer = None
        if not _draining and timeout and handler is not None and not handler.done():
            deadline, timeout = _drain_budget(timeout)
            loop = handler.get_loop()
            timer = threading.Timer(deadline, lambda: loop.call_soon_threadsafe(_end_unfinished, self))
            timer.daemon = True
            timer.start()
        _draining = True
        try:
            return shutdown(self, timeout=timeout)
        finally:
            if timer is not None:
                timer.cancel()

    wrapper.__sparse_lavida__ = True
    return wrapper


def _end_unfinished(async_llm) -> None:
    """In the API server's event loop, at the drain deadline: 503 for every unfinished request, abort them all."""
    import asyncio

    request_ids = list(async_llm.output_processor.request_states)
    if not request_ids:
        return
    logging.getLogger(__name__).warning("[shutdown] ending %d request(s) still running at the drain deadline",
                                        len(request_ids))
    async_llm.output_processor.propagate_error(
        shutting_down("the server shut down before this request finished (--shutdown-timeout)"))
    asyncio.ensure_future(async_llm.abort(request_ids, internal=True))


class QuietOrderlyStop:
    """A logging filter: the output handler's 'engine dead' traceback is expected once a drain has stopped it."""

    def filter(self, record) -> bool:
        return not (_draining and record.getMessage().startswith("AsyncLLM output_handler failed"))


def die_with_parent(poll_s: float = 0.25) -> None:
    """In a process vLLM started (engine core, worker): exit when the parent dies, however it died.

    A SIGKILLed API server gets no chance to stop its engine core, which would keep its memory, and its children,
    for minutes. A daemon thread polls the parent pid (PR_SET_PDEATHSIG would fire when the *thread* that started
    us ends, not the process) and SIGKILLs this process once we are re-parented; our own children then see us go
    the same way. The shared memory needs no step here: its names are unlinked once all users have mapped them
    (entrypoints/shm.py), so it is freed with the last process that maps it.
    """
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None:  # the main process (API server, offline LLM) watches nobody
        return

    def watch() -> None:
        while os.getppid() == parent.pid:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="sparse-lavida-parent-watchdog", daemon=True).start()
