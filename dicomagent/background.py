"""A background task of the daemon that works through a durable queue.

The storage commitment ``Reporter`` and the MPPS ``Forwarder`` both read what
waits in the database, try what is due, and then sleep until the next retry
is due or until someone adds work (``wake()``). This is that loop's frame;
each subclass writes ``_round()``, which returns how long to sleep.
"""

from __future__ import annotations

import asyncio


class QueueWorker:
    """Started and stopped with the daemon; ``wake()`` when work was added."""

    def __init__(self):
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            delay = await self._round()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def _round(self) -> float:
        """Do what is due; the seconds until the next look (a wake() cuts it short)."""
        raise NotImplementedError
