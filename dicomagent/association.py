"""One association, as the DIMSE service-user sees it (PS3.7 §7, PS3.8 §7).

``Association`` sits on top of a ``ULTransport``: it receives the Upper
Layer's indications and confirmations, assembles P-DATA into DIMSE messages
(``dimse.messages``), and sends messages back as PDVs. Two kinds:

- ``AcceptorAssociation``: made by the daemon for each incoming connection;
  negotiates with the agent's policy and hands each request to the handler
  the service registry names for it.
- ``RequestorAssociation``: made by ``associate()`` for the SCU side; its
  ``request()`` sends a request and waits for the response.

References
----------
PS3.7 §7.1 (association establishment), §9.1 / §10.1 (DIMSE services);
PS3.8 §7 (service primitives).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import types

from dicomagent.dimse.commands import C_CANCEL_RQ, MESSAGES, Message, encode_command
from dicomagent.dimse.messages import (DIMSEProtocolError, MemorySink, MessageAssembler,
                                      ReceivedMessage)
from dicomagent.dimse.status import UNRECOGNIZED_OPERATION
from dicomagent.ul.codes import (AbortReason, RejectSource, reject_reason_text)
from dicomagent.ul.connection import ULConnection
from dicomagent.ul.pdu import MCH_LAST
from dicomagent.ul.negotiation import (PresentationContext, ProposedContext, accepted_contexts,
                                       accepted_extended_negotiation, build_associate_rq)
from dicomagent.ul.primitives import (AAbortIndication, AAssociateConfirmation,
                                      AAssociateIndication, AAssociateRequest, APAbortIndication,
                                      AReleaseConfirmation, AReleaseIndication, PDataIndication)
from dicomagent.ul.states import State
from dicomagent.ul.transport import ULTransport
from dicomagent.uids import TRANSFER_SYNTAX_NAMES

log = logging.getLogger("dicomagent.association")


class AssociationError(Exception):
    """The association could not be used: refused, rejected, aborted, timed out."""


class AssociationRejected(AssociationError):
    def __init__(self, rj):
        self.rj = rj
        source = RejectSource(rj.source).name.lower().replace("_", "-") \
            if rj.source in RejectSource._value2member_map_ else f"source {rj.source}"
        super().__init__(f"association rejected ({'permanent' if rj.result == 1 else 'transient'}"
                         f", {source}): {reject_reason_text(rj.source, rj.reason)}")


class AssociationAborted(AssociationError):
    pass


def _abort_text(primitive) -> str:
    if isinstance(primitive, AAbortIndication):
        return "aborted by the peer (A-ABORT, service-user)"
    try:
        reason = AbortReason(primitive.reason).name.lower().replace("_", "-")
    except ValueError:
        reason = f"reason {primitive.reason}"
    return f"aborted ({reason}{': ' + primitive.detail if primitive.detail else ''})"


#: States where Table 9-10 accepts a P-DATA request (Evt9: DT-1, AR-7).
_CAN_SEND = {State.Sta6, State.Sta8}


class Association:
    """What both sides share: message assembly, sending, release and abort."""

    def __init__(self, requestor: bool, *, artim_timeout: float, idle_timeout: float | None,
                 network_timeout: float | None, send_cap: int, provider_check=None):
        self.connection = ULConnection(requestor, provider_check=provider_check,
                                       send_cap=send_cap)
        self.ul = ULTransport(self.connection, self, artim_timeout=artim_timeout,
                              idle_timeout=idle_timeout, network_timeout=network_timeout)
        self.assembler = MessageAssembler(self.open_sink)
        self.contexts: dict[int, PresentationContext] = {}
        #: SOP Class Extended Negotiation agreed, by SOP class (PS3.7 D.3.3.5).
        self.extended: dict[str, bytes] = {}
        self.calling_ae_title = ""
        self.called_ae_title = ""
        self._message_id = 0
        #: The event loop it runs on (``asyncio.get_running_loop()`` makes a system call,
        #: getpid, each time).
        self.loop = asyncio.get_running_loop()
        self.ended: asyncio.Future = self.loop.create_future()
        self.end_reason = ""
        #: (request message class, abstract syntax) -> handler, for requests from the peer.
        self.handlers: dict = {}
        #: (request message class, abstract syntax) -> sink opener, for their data sets.
        self.sinks: dict = {}
        #: Message IDs of our requests -> queue of their responses.
        self._responses: dict[int, asyncio.Queue] = {}
        #: Message IDs the peer cancelled with C-CANCEL-RQ (PS3.7 §9.3.2.3).
        self.cancelled: set[int] = set()
        self.dimse_timeout: float | None = None
        self._busy = 0
        #: What the services did on this association, for its closing log line
        #: (e.g. "C-STORE stored": 2000).
        self.counts: collections.Counter = collections.Counter()

    # --- messages from the peer ---------------------------------------------------------

    def open_sink(self, context_id: int, command: Message):
        """The handler's own sink where one is declared (C-STORE: a file), else memory."""
        context = self.contexts.get(context_id)
        if context is not None:
            opener = self.sinks.get((type(command), context.abstract_syntax))
            if opener is not None:
                return opener(self, context, command)
        return MemorySink()

    def on_message(self, received: ReceivedMessage) -> None:
        """A whole DIMSE message: a response goes to its waiter, a request to its handler."""
        command = received.command
        context = self.contexts.get(received.context_id)
        if context is None:
            log.warning("%s: %s on presentation context %d, which was not accepted; aborting",
                        self.describe(), command.NAME, received.context_id)
            self.abort()
            return
        if command.is_response:
            self._responses.setdefault(command.MessageIDBeingRespondedTo,
                                       asyncio.Queue()).put_nowait(received)
            return
        if type(command) is C_CANCEL_RQ:
            self.cancelled.add(command.MessageIDBeingRespondedTo)
            return
        handler = self.handlers.get((type(command), context.abstract_syntax))
        if handler is None:
            log.warning("%s: %s not supported on context %d (%s): status 0x%04X",
                        self.describe(), command.NAME, context.context_id,
                        context.abstract_syntax, UNRECOGNIZED_OPERATION)
            response = _response_for(command, UNRECOGNIZED_OPERATION)
            if response is not None:
                self.send_message(context.context_id, response)
            return
        result = handler(self, context, received)
        if type(result) is types.CoroutineType:
            self._busy += 1
            task = self.loop.create_task(result)
            task.add_done_callback(self._operation_done)

    def _operation_done(self, task: asyncio.Task) -> None:
        self._busy -= 1
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            log.error("%s: handler failed: %s", self.describe(), error,
                      exc_info=(type(error), error, error.__traceback__))

    def when_done(self, future: concurrent.futures.Future, callback) -> None:
        """Call ``callback(result)`` on the event loop once a worker thread's ``future`` is done.

        For a handler that hands its work to a thread (C-STORE: the archive's
        worker) and answers when it is done; the operation counts as in
        progress until then. Cheaper than awaiting the future in a task: the
        worker's completion schedules the callback itself, one loop iteration
        and no coroutine per message (a serial C-STORE sender waits for every
        response).
        """
        self._busy += 1
        loop = self.loop
        future.add_done_callback(
            lambda done: loop.call_soon_threadsafe(self._call_when_done, done, callback))

    def _call_when_done(self, future: concurrent.futures.Future, callback) -> None:
        self._busy -= 1
        try:
            callback(future.result())
        except Exception as error:  # noqa: BLE001 - logged like a failed handler task
            log.error("%s: handler failed: %s", self.describe(), error,
                      exc_info=(type(error), error, error.__traceback__))

    async def wait_response(self, message_id: int, timeout: float | None = None) -> ReceivedMessage:
        """The next response to our request ``message_id`` (C-FIND and C-MOVE give several).

        Raises ``AssociationError`` on the DIMSE timeout (and aborts), or when
        the association ends first.
        """
        queue = self._responses.setdefault(message_id, asyncio.Queue())
        if self.ended.done() and queue.empty():
            raise AssociationAborted(self.end_reason or "association ended")
        timeout = self.dimse_timeout if timeout is None else timeout
        try:
            received = await asyncio.wait_for(queue.get(), timeout)
        except asyncio.TimeoutError:
            self.abort()
            raise AssociationError(f"no response within {timeout:g} s (DIMSE timeout)") from None
        if received is None:
            queue.put_nowait(None)
            raise AssociationAborted(self.end_reason or "association ended")
        return received

    def done_with(self, message_id: int) -> None:
        """Forget the response queue of a finished request."""
        self._responses.pop(message_id, None)
        self.cancelled.discard(message_id)

    # --- primitives from the Upper Layer -------------------------------------------------

    def on_primitive(self, primitive) -> None:
        kind = type(primitive)
        if kind is PDataIndication:
            try:
                received = self.assembler.receive(primitive)
            except DIMSEProtocolError as error:
                log.warning("%s: %s; aborting", self.describe(), error)
                self.abort()
                return
            if received is not None:
                self.on_message(received)
        elif kind is AAssociateIndication:
            self.on_associate_indication(primitive)
        elif kind is AAssociateConfirmation:
            self.on_associate_confirmation(primitive)
        elif kind is AReleaseIndication:
            self.on_release_indication(primitive)
        elif kind is AReleaseConfirmation:
            self._end("released")
        elif kind in (AAbortIndication, APAbortIndication):
            self.assembler.abandon()
            text = _abort_text(primitive)
            if isinstance(primitive, APAbortIndication) and primitive.reason:
                log.warning("%s: %s", self.describe(), text)
            else:
                log.info("%s: %s", self.describe(), text)
            self._end(text)

    def on_associate_indication(self, indication) -> None:
        raise NotImplementedError

    def on_associate_confirmation(self, confirmation) -> None:
        raise NotImplementedError

    def on_release_indication(self, indication) -> None:
        """A-RELEASE indication: answer at once; we release only between operations."""
        self.connection.release_response()
        self.ul.run()
        self._end("released by the peer")

    def _end(self, reason: str) -> None:
        if not self.ended.done():
            self.end_reason = reason
            self.ended.set_result(reason)
            if self.counts:
                log.info("%s: %s; %s", self.describe(), reason,
                         ", ".join(f"{what} {count}" for what, count in self.counts.items()))
        for queue in self._responses.values():
            queue.put_nowait(None)

    # --- sending ---------------------------------------------------------------------------

    def next_message_id(self) -> int:
        self._message_id = (self._message_id % 0xFFFF) + 1
        return self._message_id

    def send_message(self, context_id: int, command: Message, data_set=None) -> None:
        """Send a command set and, if given, a data set (bytes-like) on a context.

        Raises ``AssociationAborted`` once the association no longer carries
        data (released, aborted: PS3.8 Table 9-10 allows P-DATA requests in
        Sta6 and Sta8 only).
        """
        connection = self.connection
        if connection.state not in _CAN_SEND:
            raise AssociationAborted(self.end_reason or f"association ended "
                                                        f"({connection.state.name})")
        connection.send_message_part(context_id, True, encode_command(command))
        if data_set is not None:
            connection.send_message_part(context_id, False, data_set)
        self.ul.run()

    async def send_file(self, context_id: int, command: Message, path: str, offset: int) -> None:
        """Send a command and, as its data set, a file's bytes from ``offset`` to the end.

        The file is read in large blocks and sent as PDVs cut to the peer's
        maximum, each a view of its block (no copy); the transport's flow
        control paces the reading.
        """
        connection = self.connection
        if connection.state not in _CAN_SEND:
            raise AssociationAborted(self.end_reason or "association ended")
        connection.send_message_part(context_id, True, encode_command(command))
        self.ul.run()
        step = connection.max_fragment_length
        with open(path, "rb") as handle:
            remaining = os.fstat(handle.fileno()).st_size - offset
            handle.seek(offset)
            if remaining <= 0:
                connection.send_pdv(context_id, MCH_LAST, b"")
                self.ul.run()
                return
            while remaining > 0:
                block = handle.read(min(max(step, 1 << 20), remaining))
                if not block:
                    raise AssociationError(f"{path} changed while it was being sent")
                remaining -= len(block)
                view = memoryview(block)
                for start in range(0, len(view), step):
                    fragment = view[start:start + step]
                    last = remaining == 0 and start + step >= len(view)
                    connection.send_pdv(context_id, MCH_LAST if last else 0, fragment)
                self.ul.run()
                await self.ul.drain()
                if self.ended.done():
                    raise AssociationAborted(self.end_reason)

    def abort(self) -> None:
        """A-ABORT request (service-user). The association is over for us at once: requests
        waiting for a response are told so now, not at their DIMSE timeout."""
        self.ul.abort()
        self._end("aborted by us (A-ABORT)")

    def describe(self) -> str:
        host, port = self.ul.peer[:2]
        return f"{self.calling_ae_title or '?'}@{host}:{port}"

    def context_for(self, abstract_syntax: str) -> PresentationContext:
        for context in self.contexts.values():
            if context.abstract_syntax == abstract_syntax:
                return context
        raise AssociationError(f"no accepted presentation context for {abstract_syntax}")


def _response_for(request: Message, status: int) -> Message | None:
    """A response of the request's own kind carrying only a status (PS3.7 C.5)."""
    response_class = MESSAGES.get(request.COMMAND_FIELD | 0x8000)
    if response_class is None or request.is_response:
        return None
    sop_class = getattr(request, "AffectedSOPClassUID", None) or \
        getattr(request, "RequestedSOPClassUID", None)
    return response_class(AffectedSOPClassUID=sop_class,
                          MessageIDBeingRespondedTo=request.MessageID, Status=status)


class AcceptorAssociation(Association):
    """An association the agent accepted: negotiation and dispatch to services."""

    def __init__(self, agent):
        config = agent.config
        super().__init__(False, artim_timeout=config.timeouts.artim,
                         idle_timeout=config.timeouts.dimse,
                         network_timeout=config.timeouts.network,
                         send_cap=agent.send_cap, provider_check=agent.provider_check)
        self.agent = agent
        self.handlers = agent.handlers
        self.sinks = agent.sinks
        self.dimse_timeout = config.timeouts.dimse

    def idle_timed_out(self) -> bool:
        """Abort an idle association only when no operation is in progress."""
        return self._busy == 0 and self.assembler.idle

    def on_release_indication(self, indication) -> None:
        """A-RELEASE indication. The archive indexes an object just after acknowledging
        it; what this association stored is in the index before the A-RELEASE-RP goes
        out, so that once a sender's association is released, a query from anywhere
        (another association, ``dicomagent ls``) finds what it sent."""
        pending = (self.agent.archive.caught_up() if self.counts["C-STORE stored"]
                   else None)
        if pending is None:
            super().on_release_indication(indication)
        else:
            self.when_done(pending, lambda _: self._release_once_indexed(indication))

    def _release_once_indexed(self, indication) -> None:
        if self.connection.state is State.Sta8:     # not aborted meanwhile
            super().on_release_indication(indication)

    def on_associate_indication(self, indication: AAssociateIndication) -> None:
        rq = indication.rq
        self.calling_ae_title = rq.calling_ae_title
        self.called_ae_title = rq.called_ae_title
        response, contexts = self.agent.negotiate(rq)
        self.connection.associate_response(response)
        if response.ac is not None:
            self.contexts = contexts
            self.extended = accepted_extended_negotiation(response.ac)
            log.info("%s association accepted: %s -> %s, %s", self.describe(),
                     rq.calling_ae_title, rq.called_ae_title, _describe_contexts(self.contexts)
                     if self.agent.log_contexts else f"{len(self.contexts)} contexts")
        else:
            rj = response.rj
            log.info("%s association rejected: %s -> %s: %s", self.describe(),
                     rq.calling_ae_title, rq.called_ae_title,
                     reject_reason_text(rj.source, rj.reason))
        self.ul.run()


def _describe_contexts(contexts: dict[int, PresentationContext]) -> str:
    """The accepted contexts in a few words: each one when few, a summary when many."""
    if not contexts:
        return "no accepted contexts"

    def name(ts: str) -> str:
        return TRANSFER_SYNTAX_NAMES.get(ts, ts)

    if len(contexts) <= 4:
        return ", ".join(f"{c.abstract_syntax} ({name(c.transfer_syntax)})"
                         for c in contexts.values())
    syntaxes = sorted({name(c.transfer_syntax) for c in contexts.values()})
    abstract = len({c.abstract_syntax for c in contexts.values()})
    return (f"{len(contexts)} contexts accepted for {abstract} SOP classes "
            f"({', '.join(syntaxes)})")


class RequestorAssociation(Association):
    """The SCU side: ``associate()`` makes one, ``request()`` uses it."""

    def __init__(self, *, artim_timeout: float = 30.0, dimse_timeout: float | None = 60.0,
                 network_timeout: float | None = 30.0, send_cap: int = 1 << 20):
        super().__init__(True, artim_timeout=artim_timeout, idle_timeout=None,
                         network_timeout=network_timeout, send_cap=send_cap)
        self.dimse_timeout = dimse_timeout
        self.network_timeout = network_timeout
        self.established: asyncio.Future = self.loop.create_future()
        self.ac = None

    def on_associate_confirmation(self, confirmation: AAssociateConfirmation) -> None:
        if not self.established.done():
            self.established.set_result(confirmation)

    def _end(self, reason: str) -> None:
        super()._end(reason)
        if not self.established.done():
            self.established.set_exception(AssociationAborted(reason))

    async def request(self, context_id: int, command: Message, data_set=None) -> ReceivedMessage:
        """Send a request and return its (first) response."""
        self.send_message(context_id, command, data_set)
        try:
            return await self.wait_response(command.MessageID)
        finally:
            self.done_with(command.MessageID)

    async def release(self) -> None:
        """A-RELEASE request; waits for the confirmation (or the end of the association)."""
        if self.ended.done():
            return
        self.connection.release_request()
        self.ul.run()
        try:
            await asyncio.wait_for(asyncio.shield(self.ended), self.ul.artim_timeout)
        except asyncio.TimeoutError:
            self.abort()
        await self.ul.closed


async def associate(host: str, port: int, calling_ae_title: str, called_ae_title: str,
                    contexts: list[ProposedContext], *, maximum_length_received: int = 0,
                    extra_sub_items: tuple = (),
                    artim_timeout: float = 30.0, dimse_timeout: float | None = 60.0,
                    network_timeout: float | None = 30.0) -> RequestorAssociation:
    """Open an association as requestor (PS3.8 §7.1: A-ASSOCIATE request).

    Raises ``AssociationError`` (refused, unreachable, timed out, aborted) or
    ``AssociationRejected``.
    """
    association = RequestorAssociation(artim_timeout=artim_timeout, dimse_timeout=dimse_timeout,
                                       network_timeout=network_timeout)
    rq = build_associate_rq(calling_ae_title, called_ae_title, contexts, maximum_length_received,
                            extra_sub_items)
    association.calling_ae_title = calling_ae_title
    association.called_ae_title = called_ae_title
    association.connection.associate_request(AAssociateRequest(rq))      # Evt1: AE-1
    association.connection.take_outputs()                                # OPEN_TRANSPORT: below
    try:
        await asyncio.wait_for(association.loop.create_connection(lambda: association.ul,
                                                                  host, port),
                               network_timeout)
    except asyncio.TimeoutError:
        raise AssociationError(f"no TCP connection to {host}:{port} within "
                               f"{network_timeout:g} s") from None
    except OSError as error:
        raise AssociationError(f"cannot connect to {host}:{port}: "
                               f"{error.strerror or error}") from None
    try:
        confirmation = await asyncio.wait_for(asyncio.shield(association.established),
                                              artim_timeout)
    except asyncio.TimeoutError:
        association.abort()
        raise AssociationError(f"no answer to A-ASSOCIATE-RQ within {artim_timeout:g} s") from None
    if confirmation.rj is not None:
        await association.ul.closed
        raise AssociationRejected(confirmation.rj)
    association.ac = confirmation.ac
    association.contexts = accepted_contexts(rq, confirmation.ac)
    association.extended = accepted_extended_negotiation(confirmation.ac)
    return association
