"""PS3.8 §9.2: the sans-IO Upper Layer core for one transport connection.

A ``ULConnection`` takes bytes (``receive_data``) and primitives (the
``*_request`` / ``*_response`` methods, and the transport's own events) and
turns each into an event of Table 9-10. The action it looks up records its
outputs; the driver collects them with ``take_outputs()`` and performs them:

- ``Send(buffers)``: write these buffers, in order, to the transport;
- ``Deliver(primitive)``: an indication or confirmation for the local user;
- ``START_ARTIM`` / ``STOP_ARTIM``: the ARTIM timer (PS3.8 §9.1.5);
- ``OPEN_TRANSPORT`` / ``CLOSE_TRANSPORT``: the transport connection.

Nothing here reads a clock or a socket, so a test can put a connection in
any state and feed it any event.

References
----------
PS3.8 §9.1 (service definition), §9.2 (state machine), Annex E (PDVs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from dicomagent.ul.codes import (AbortReason, LocalProtocolError, PDUDecodeError, RejectResult,
                                 RejectSource, RejectReason)
from dicomagent.ul.fsm import lookup
from dicomagent.ul.pdu import (MCH_COMMAND, MCH_LAST, PDU_HEADER, PDV_HEADER, A_ABORT,
                               A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ, A_RELEASE_RP,
                               A_RELEASE_RQ)
from dicomagent.ul.codes import PDUType
from dicomagent.ul.primitives import AAssociateRequest, AAssociateResponse, PDataIndication
from dicomagent.ul.states import Event, State
from dicomagent.ul.stream import PDUReader


@dataclass(frozen=True, slots=True)
class Send:
    """Write these buffers, in this order, to the transport connection."""

    buffers: tuple


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand this indication or confirmation primitive to the local user."""

    primitive: object


@dataclass(frozen=True, slots=True)
class TimerOrTransport:
    """An output with no argument: ARTIM timer start/stop, transport open/close."""

    name: str


START_ARTIM = TimerOrTransport("start ARTIM")
STOP_ARTIM = TimerOrTransport("stop ARTIM")
OPEN_TRANSPORT = TimerOrTransport("open transport")
CLOSE_TRANSPORT = TimerOrTransport("close transport")

#: Event of each received control PDU (PS3.8 Table 9-2).
PDU_EVENTS = {
    A_ASSOCIATE_AC: Event.Evt3,
    A_ASSOCIATE_RJ: Event.Evt4,
    A_ASSOCIATE_RQ: Event.Evt6,
    A_RELEASE_RQ: Event.Evt12,
    A_RELEASE_RP: Event.Evt13,
    A_ABORT: Event.Evt16,
}

#: When the peer says its Maximum Length Received is 0 (no limit), we still
#: cut P-DATA-TF PDUs at this size. Local extension: PS3.8 Annex D.1 lets us
#: send any length; a bounded PDU keeps the peer's buffers bounded too.
DEFAULT_UNLIMITED_SEND_CAP = 1 << 20


@functools.lru_cache(maxsize=512)
def _encode(pdu) -> bytes:
    """Encode a control PDU; PDUs are immutable, and the same A-ASSOCIATE-AC or
    A-RELEASE-RP is sent again and again, so the bytes are kept."""
    return pdu.encode()


def default_provider_check(rq: A_ASSOCIATE_RQ) -> A_ASSOCIATE_RJ | None:
    """PS3.8 §9.3.2: the service-provider's own test of an A-ASSOCIATE-RQ.

    Protocol-version: only bit 0 (version 1) is tested.
    """
    if not rq.protocol_version & 1:
        return A_ASSOCIATE_RJ(RejectResult.REJECTED_PERMANENT, RejectSource.SERVICE_PROVIDER_ACSE,
                              RejectReason.PROTOCOL_VERSION_NOT_SUPPORTED)
    return None


class ULConnection:
    """The Upper Layer protocol machine of one association, requestor or acceptor.

    Parameters
    ----------
    requestor : bool
        True for the association-requestor (it starts in Sta1 and issues
        ``associate_request``), False for the acceptor (``connection_made``).
    provider_check : callable, optional
        Called in AE-6 with the A-ASSOCIATE-RQ; returns an A-ASSOCIATE-RJ to
        refuse it at the service-provider level (protocol version, local
        limit exceeded), or None. ``default_provider_check`` is always applied.
    send_cap : int
        Largest P-DATA-TF PDU length we send to a peer that set no maximum.
    trace : callable, optional
        ``trace(state, event, action_name, next_state)`` after each transition.
    """

    def __init__(self, requestor: bool, provider_check=None,
                 send_cap: int = DEFAULT_UNLIMITED_SEND_CAP, trace=None):
        self.is_requestor = requestor
        self.state = State.Sta1
        self._outputs: list = []
        self._reader = PDUReader(self)
        self._provider_check = provider_check
        self._send_cap = send_cap
        self.trace = trace
        self.pending_request: A_ASSOCIATE_RQ | None = None
        #: The A-ASSOCIATE-RQ of this association (both sides), once known.
        self.rq: A_ASSOCIATE_RQ | None = None
        #: The A-ASSOCIATE-AC of this association (both sides), once known.
        self.ac: A_ASSOCIATE_AC | None = None
        #: The peer's Maximum Length Received (0 = no limit).
        self.peer_maximum_length = 0
        #: Set by DT-2 / AR-6: the PDVs of the current P-DATA-TF go to the user.
        self.deliver_p_data = False
        #: A-ABORT Reason/Diag. and our account of it, for AA-7 / AA-8.
        self.abort_reason = AbortReason.UNEXPECTED_PDU
        self.abort_detail = ""
        #: Name of the last action taken (e.g. "AA-1"), for the driver's log.
        self.last_action = ""

    # --- outputs, as the actions record them -------------------------------------------

    def take_outputs(self) -> list:
        """Return the outputs recorded since the last call, oldest first."""
        outputs, self._outputs = self._outputs, []
        return outputs

    def send(self, pdu) -> None:
        self._outputs.append(Send((_encode(pdu),)))

    def send_buffers(self, buffers) -> None:
        self._outputs.append(Send(buffers))

    def deliver(self, primitive) -> None:
        self._outputs.append(Deliver(primitive))

    def start_artim(self) -> None:
        self._outputs.append(START_ARTIM)

    def stop_artim(self) -> None:
        self._outputs.append(STOP_ARTIM)

    def open_transport(self) -> None:
        self._outputs.append(OPEN_TRANSPORT)

    def close_transport(self) -> None:
        self._outputs.append(CLOSE_TRANSPORT)

    def provider_check(self, rq: A_ASSOCIATE_RQ) -> A_ASSOCIATE_RJ | None:
        rj = default_provider_check(rq)
        if rj is None and self._provider_check is not None:
            rj = self._provider_check(rq)
        return rj

    def association_requested(self, rq: A_ASSOCIATE_RQ) -> None:
        """AE-6 accepted the request: remember it and the peer's maximum length."""
        self.rq = rq
        self.peer_maximum_length = rq.user_information.maximum_length_received or 0

    def association_accepted(self, ac: A_ASSOCIATE_AC) -> None:
        """AE-3: remember the acceptor's answer and its maximum length."""
        self.rq = self.pending_request
        self.ac = ac
        self.peer_maximum_length = ac.user_information.maximum_length_received or 0

    # --- the table -------------------------------------------------------------------------

    def _dispatch(self, event: Event, argument=None) -> None:
        state = self.state
        act = lookup(event, state)
        if act is None:
            raise LocalProtocolError(f"{event.name} ({event.value}) is not allowed in "
                                     f"{state.name} ({state.value})")
        next_state = act(self, argument)
        if next_state not in act.next_states:
            raise RuntimeError(f"{act.name} returned {next_state.name}")
        self.state = next_state
        self.last_action = act.name
        if next_state is State.Sta1:
            # The connection is over: nothing after this, even in the same chunk, counts.
            self.deliver_p_data = False
            self._reader.stop()
        if self.trace is not None:
            self.trace(state, event, act.name, next_state)

    # --- events from the local user (request and response primitives) -----------------------

    def associate_request(self, request: AAssociateRequest) -> None:
        """Evt1: A-ASSOCIATE request primitive."""
        self._dispatch(Event.Evt1, request)

    def associate_response(self, response: AAssociateResponse) -> None:
        """Evt7 (accept, ``response.ac``) or Evt8 (reject, ``response.rj``)."""
        if response.ac is not None:
            self.ac = response.ac
            self._dispatch(Event.Evt7, response)
        else:
            self._dispatch(Event.Evt8, response)

    def release_request(self) -> None:
        """Evt11: A-RELEASE request primitive."""
        self._dispatch(Event.Evt11)

    def release_response(self) -> None:
        """Evt14: A-RELEASE response primitive."""
        self._dispatch(Event.Evt14)

    def abort_request(self) -> None:
        """Evt15: A-ABORT request primitive."""
        self._dispatch(Event.Evt15)

    @property
    def max_fragment_length(self) -> int:
        """The largest PDV fragment that fits the peer's Maximum Length Received."""
        limit = self.peer_maximum_length or self._send_cap
        return max(limit - 6, 1)

    def send_pdv(self, context_id: int, message_control_header: int, fragment) -> None:
        """Evt9: one P-DATA request carrying one PDV, sent as one P-DATA-TF PDU.

        The caller keeps ``fragment`` within ``max_fragment_length``; the PDU
        header and the fragment are sent as two buffers, so the fragment is
        never copied.
        """
        length = len(fragment)
        header = (PDU_HEADER.pack(PDUType.P_DATA_TF, 0, length + 6)
                  + PDV_HEADER.pack(length + 2, context_id, message_control_header))
        self._dispatch(Event.Evt9, (header, fragment) if length else (header,))

    def send_message_part(self, context_id: int, is_command: bool, data) -> None:
        """Send a whole command set or data set as PDVs fitting the peer's maximum.

        PS3.8 Annex E.2: the Message Control Header says command or data set,
        and marks the last fragment.
        """
        view = memoryview(data)
        step = self.max_fragment_length
        kind = MCH_COMMAND if is_command else 0
        offset = 0
        total = len(view)
        while True:
            end = min(offset + step, total)
            last = end == total
            self.send_pdv(context_id, kind | (MCH_LAST if last else 0), view[offset:end])
            if last:
                return
            offset = end

    # --- events from the transport ---------------------------------------------------------

    def connection_made(self) -> None:
        """Evt5 (acceptor): transport connection indication."""
        self._dispatch(Event.Evt5)

    def transport_connected(self) -> None:
        """Evt2 (requestor): transport connection confirmation."""
        self._dispatch(Event.Evt2)

    def connection_lost(self) -> None:
        """Evt17: transport connection closed indication."""
        if self.state is not State.Sta1:
            self._dispatch(Event.Evt17)

    def artim_expired(self) -> None:
        """Evt18: ARTIM timer expired."""
        self._dispatch(Event.Evt18)

    def receive_data(self, data) -> None:
        """Bytes from the transport: Evt3, 4, 6, 10, 12, 13, 16 or 19.

        A ``PDUDecodeError`` becomes Evt19 here and never leaves this method.
        """
        if self.state is State.Sta1:
            return
        try:
            self._reader.feed(data)
        except PDUDecodeError as error:
            if self.state is State.Sta1:
                return
            self.abort_reason = error.reason
            self.abort_detail = f"invalid PDU in {self.state.name}: {error}"
            self.deliver_p_data = False
            self._dispatch(Event.Evt19, error)

    @property
    def reader_idle(self) -> bool:
        """True when no PDU is half received (for the idle timeout)."""
        return self._reader.idle

    # --- callbacks of the PDU reader --------------------------------------------------------

    def on_pdu(self, pdu) -> None:
        if self.state is State.Sta1:
            return          # the connection ended earlier in this chunk: nothing more counts
        self.abort_reason = AbortReason.UNEXPECTED_PDU
        self.abort_detail = f"unexpected {type(pdu).__name__} in {self.state.name}"
        self._dispatch(PDU_EVENTS[type(pdu)], pdu)

    def on_p_data_tf(self) -> None:
        if self.state is State.Sta1:
            return
        self.abort_reason = AbortReason.UNEXPECTED_PDU
        self.abort_detail = f"unexpected P_DATA_TF in {self.state.name}"
        self.deliver_p_data = False
        self._dispatch(Event.Evt10)

    def on_pdv(self, context_id: int, message_control_header: int, fragment,
               pdv_complete: bool) -> None:
        if self.deliver_p_data:
            self._outputs.append(Deliver(PDataIndication(context_id, message_control_header,
                                                         fragment, pdv_complete)))
