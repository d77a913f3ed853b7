"""The asyncio driver around the sans-IO Upper Layer core (PS3.8 §9.1).

``ULTransport`` is an ``asyncio.Protocol``: it feeds received bytes and
transport events to its ``ULConnection`` and carries out the outputs the
actions recorded: writes, primitives for the local user, the ARTIM timer
(PS3.8 §9.1.5), opening and closing the connection. This is the only module
under ``ul/`` that knows asyncio.

The local user is any object with ``on_primitive(primitive)``; it may also
define ``idle_timed_out() -> bool`` (asked when nothing arrived for
``idle_timeout`` seconds in an established association: True aborts).

References
----------
PS3.8 §9.1 (TCP/IP transport), §9.1.5 (ARTIM timer).
"""

from __future__ import annotations

import asyncio
import logging
import socket

from dicomagent.ul.connection import (CLOSE_TRANSPORT, OPEN_TRANSPORT, START_ARTIM, STOP_ARTIM,
                                      Deliver, Send, ULConnection)
from dicomagent.ul.states import State

log = logging.getLogger("dicomagent.ul")

_ESTABLISHED = {State.Sta6, State.Sta7, State.Sta8, State.Sta9, State.Sta10, State.Sta11,
                State.Sta12}


class ULTransport(asyncio.Protocol):
    """Drive one ``ULConnection`` over one TCP connection.

    Parameters
    ----------
    connection : ULConnection
    user : object
        Receives ``on_primitive(primitive)`` for every indication and confirmation.
    artim_timeout : float
        PS3.8 §9.1.5 ARTIM timer, seconds.
    idle_timeout : float or None
        Established association with nothing received for this long: ask the
        user whether to abort.
    network_timeout : float or None
        A PDU that started arriving and then stalled for this long: abort.
    """

    def __init__(self, connection: ULConnection, user, artim_timeout: float = 30.0,
                 idle_timeout: float | None = None, network_timeout: float | None = None):
        self.connection = connection
        self.user = user
        self.artim_timeout = artim_timeout
        self.idle_timeout = idle_timeout
        self.network_timeout = network_timeout
        self.transport: asyncio.Transport | None = None
        self.peer = ("?", 0)
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self._loop = asyncio.get_running_loop()
        self._artim: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._last_received = 0.0
        self._running = False
        self._can_write = True
        self._write_waiters: list[asyncio.Future] = []

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.peer = transport.get_extra_info("peername") or ("?", 0)
        self._last_received = self._loop.time()
        if self.connection.is_requestor:
            self.connection.transport_connected()        # Evt2
        else:
            self.connection.connection_made()            # Evt5
        self._arm_watchdog()
        self.run()

    def data_received(self, data: bytes) -> None:
        self._last_received = self._loop.time()
        connection = self.connection
        before = connection.state
        connection.receive_data(data)
        if before is State.Sta2 and connection.last_action == "AA-1":
            # Table 9-10 gives no indication for AA-1 in Sta2 (there is no
            # association yet), so the failure is logged here.
            log.warning("%s:%s %s (Sta2): A-ABORT sent", *self.peer[:2],
                        connection.abort_detail)
        self.run()

    def eof_received(self):
        return False        # close the transport: connection_lost follows

    def connection_lost(self, exc) -> None:
        self.connection.connection_lost()                 # Evt17
        self.run()
        self._cancel_timers()
        self.transport = None
        self._release_writers()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._can_write = False

    def resume_writing(self) -> None:
        self._can_write = True
        self._release_writers()

    # --- flow control for large sends ------------------------------------------------------

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        if self._can_write or self.transport is None:
            return
        waiter = self._loop.create_future()
        self._write_waiters.append(waiter)
        await waiter

    def _release_writers(self) -> None:
        waiters, self._write_waiters = self._write_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # --- carrying out the core's outputs ---------------------------------------------------

    def run(self) -> None:
        """Perform every output the core has recorded, in order (not re-entrant)."""
        if self._running:
            return
        self._running = True
        try:
            connection = self.connection
            while True:
                outputs = connection.take_outputs()
                if not outputs:
                    return
                for output in outputs:
                    kind = type(output)
                    if kind is Send:
                        if self.transport is not None:
                            buffers = output.buffers
                            if len(buffers) == 1:
                                self.transport.write(buffers[0])
                            else:
                                self.transport.writelines(buffers)
                    elif kind is Deliver:
                        self.user.on_primitive(output.primitive)
                    elif output is START_ARTIM:
                        self._stop_artim()
                        self._artim = self._loop.call_later(self.artim_timeout, self._artim_fired)
                    elif output is STOP_ARTIM:
                        self._stop_artim()
                    elif output is CLOSE_TRANSPORT:
                        if self.transport is not None:
                            self.transport.close()
                    elif output is OPEN_TRANSPORT:
                        pass            # the requestor's connect() opens it (see association.py)
        finally:
            self._running = False

    def _stop_artim(self) -> None:
        if self._artim is not None:
            self._artim.cancel()
            self._artim = None

    def _artim_fired(self) -> None:
        self._artim = None
        if self.connection.state in (State.Sta2, State.Sta13):
            log.info("%s:%s ARTIM timer expired in %s, closing", *self.peer[:2],
                     self.connection.state.name)
            self.connection.artim_expired()              # Evt18
            self.run()

    def _cancel_timers(self) -> None:
        self._stop_artim()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _arm_watchdog(self) -> None:
        periods = [t for t in (self.idle_timeout, self.network_timeout) if t]
        if periods:
            self._watchdog = self._loop.call_later(min(periods) / 4, self._check_watchdog)

    def _check_watchdog(self) -> None:
        """Abort an association whose peer stalled mid-PDU or went idle too long."""
        self._watchdog = None
        connection = self.connection
        if self.transport is None or connection.state in (State.Sta1, State.Sta13):
            return      # closing: ARTIM decides (PS3.8 Table 9-10, Evt17/Evt18)
        silent = self._loop.time() - self._last_received
        if (self.network_timeout and not connection.reader_idle
                and silent >= self.network_timeout):
            log.warning("%s:%s no data for %.1f s in the middle of a PDU (%s): aborting",
                        *self.peer[:2], silent, connection.state.name)
            self.abort()
        elif (self.idle_timeout and connection.state in _ESTABLISHED
              and silent >= self.idle_timeout
              and getattr(self.user, "idle_timed_out", lambda: True)()):
            log.warning("%s:%s association idle for %.0f s: aborting", *self.peer[:2], silent)
            self.abort()
        self._arm_watchdog()

    def abort(self) -> None:
        """A-ABORT request (Evt15) from the local user, where the table allows it."""
        state = self.connection.state
        if state is State.Sta1:
            if self.transport is not None:
                self.transport.close()
            return
        self.connection.abort_request()
        self.run()
