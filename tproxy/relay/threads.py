"""Running interceptors' thread jobs off the event loop, for both relay shells.

An interceptor's :meth:`~tproxy.interceptor.Interceptor.run_in_thread` makes a
:class:`~tproxy.timers.ThreadJob`; the flow core hands it out
(:meth:`~tproxy.relay.core.FlowCore.take_thread_jobs`) and the shell (the
hub, :mod:`tproxy.hub`, or the trio-stream shell, :mod:`.streams`) runs it
with :func:`run_job` in a task of a nursery it owns, then feeds
:meth:`~tproxy.relay.core.FlowCore.thread_done` back to the flow's core.

Bound: at most :data:`THREAD_JOBS` jobs run at once per engine process (one
:class:`trio.CapacityLimiter` per trio run, shared by both shells); more wait
for a slot, their flows' reading held meanwhile. It is not trio's default
thread limiter, so slow hooks cannot starve the name lookups
(``getaddrinfo``) that trio also runs in threads.

Shutdown: a job is abandoned when its task is cancelled (the flow's relay or
the engine ends): the shell does not wait for it, and its result is
dropped. Python cannot stop a thread, so ``fn`` itself runs on in its worker
thread until it returns.
"""

from __future__ import annotations

import trio

from ..timers import ThreadJob

THREAD_JOBS = 32
"""Thread jobs that may run at once per engine process (the rest wait for a slot)."""

_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("tproxy_thread_jobs")


def job_limiter() -> trio.CapacityLimiter:
    """The limiter of this trio run's thread jobs (made on first use)."""
    try:
        return _LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(THREAD_JOBS)
        _LIMITER.set(limiter)
        return limiter


async def run_job(job: ThreadJob) -> None:
    """Run ``job.run()`` in a worker thread; abandoned (not awaited) if cancelled.

    ``job.run`` keeps ``fn``'s result or ``Exception``; a ``BaseException``
    from ``fn`` (``SystemExit`` from a careless hook) is kept as the job's
    error too, so it fails only its flow.
    """
    try:
        await trio.to_thread.run_sync(job.run, abandon_on_cancel=True, limiter=job_limiter())
    except (trio.Cancelled, KeyboardInterrupt):
        raise
    except BaseException as exc:  # not an Exception (job.run keeps those): SystemExit...
        job.error = RuntimeError(f"run_in_thread: {exc!r}")
        job.done = True
