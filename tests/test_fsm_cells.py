"""PS3.8 §9.2: cells of Table 9-10, driven through ``ULConnection`` with no socket.

A requestor or acceptor connection is brought to a state by feeding it the
real bytes of PDUs and the primitives the standard expects on the way; each
test then feeds one event and checks the outputs the action records and the
next state. A ``RuleBasedStateMachine`` wires a requestor and an acceptor
together in memory and drives them with random primitives, cuts of the byte
stream, timer expiries, transport closes and garbage.

References
----------
PS3.8 §9.2.1 (Tables 9-1, 9-2), §9.2.2 (Tables 9-6 to 9-9), §9.2.3 (Table 9-10),
§9.3 (PDUs), Table 9-26 (A-ABORT reasons).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from dicomagent.ul.codes import AbortReason, LocalProtocolError
from dicomagent.ul.connection import (CLOSE_TRANSPORT, OPEN_TRANSPORT, START_ARTIM, STOP_ARTIM,
                                      Deliver, Send, ULConnection)
from dicomagent.ul.fsm import lookup
from dicomagent.ul.items import (ApplicationContextItem, MaximumLengthSubItem,
                                 PresentationContextItemAC, PresentationContextItemRQ,
                                 UserInformationItem)
from dicomagent.ul.pdu import (MCH_COMMAND, MCH_LAST, A_ABORT, A_ASSOCIATE_AC, A_ASSOCIATE_RJ,
                               A_ASSOCIATE_RQ, A_RELEASE_RP, A_RELEASE_RQ, P_DATA_TF,
                               PresentationDataValueItem, decode_pdu)
from dicomagent.ul.primitives import (AAbortIndication, AAssociateConfirmation,
                                      AAssociateIndication, AAssociateRequest,
                                      AAssociateResponse, APAbortIndication,
                                      AReleaseConfirmation, AReleaseIndication, PDataIndication)
from dicomagent.ul.states import Event, State

S = State
APP_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"


def make_rq(maximum_length: int = 16384, protocol_version: int = 1) -> A_ASSOCIATE_RQ:
    return A_ASSOCIATE_RQ("ANY-SCP", "ECHOSCU", (
        ApplicationContextItem(APP_CONTEXT),
        PresentationContextItemRQ(1, VERIFICATION, (IMPLICIT_VR_LE,)),
        UserInformationItem((MaximumLengthSubItem(maximum_length),))), protocol_version)


def make_ac(rq: A_ASSOCIATE_RQ, maximum_length: int = 32768) -> A_ASSOCIATE_AC:
    return A_ASSOCIATE_AC(rq.called_ae_title, rq.calling_ae_title, (
        ApplicationContextItem(APP_CONTEXT),
        *(PresentationContextItemAC(pc.context_id, 0, IMPLICIT_VR_LE)
          for pc in rq.presentation_contexts),
        UserInformationItem((MaximumLengthSubItem(maximum_length),))))


RQ = make_rq()
AC = make_ac(RQ)
RJ = A_ASSOCIATE_RJ(1, 1, 7)
ABORT_USER = A_ABORT(0, 0)
RELEASE_RQ_BYTES = A_RELEASE_RQ().encode()
RELEASE_RP_BYTES = A_RELEASE_RP().encode()
P_DATA = P_DATA_TF((PresentationDataValueItem(1, MCH_COMMAND, b"first"),
                    PresentationDataValueItem(1, MCH_COMMAND | MCH_LAST, b"second")))


def sent(pdu) -> Send:
    """The output of ``ctx.send(pdu)``."""
    return Send((pdu.encode(),))


# --- bringing a connection to a state -----------------------------------------------------------

def _receive(pdu):
    data = pdu if isinstance(pdu, bytes) else pdu.encode()
    return lambda c: c.receive_data(data)


_ACCEPTOR_STEPS = {
    S.Sta2: [lambda c: c.connection_made()],                                    # AE-5
    S.Sta3: [_receive(RQ)],                                                     # AE-6
    S.Sta6: [lambda c: c.associate_response(AAssociateResponse(ac=AC))],        # AE-7
}
_REQUESTOR_STEPS = {
    S.Sta4: [lambda c: c.associate_request(AAssociateRequest(RQ))],             # AE-1
    S.Sta5: [lambda c: c.transport_connected()],                                # AE-2
    S.Sta6: [_receive(AC)],                                                     # AE-3
}
#: From Sta6 on, both sides walk the same release and abort paths.
_FROM_STA6 = {
    S.Sta7: [S.Sta6, lambda c: c.release_request()],                            # AR-1
    S.Sta8: [S.Sta6, _receive(RELEASE_RQ_BYTES)],                               # AR-2
    S.Sta13: [S.Sta6, lambda c: c.abort_request()],                             # AA-1
}
#: Release collision (PS3.8 §9.2.2, AR-8): Sta9/Sta11 requestor, Sta10/Sta12 acceptor.
_REQUESTOR_COLLISION = {
    S.Sta9: [S.Sta7, _receive(RELEASE_RQ_BYTES)],                               # AR-8
    S.Sta11: [S.Sta9, lambda c: c.release_response()],                          # AR-9
}
_ACCEPTOR_COLLISION = {
    S.Sta10: [S.Sta7, _receive(RELEASE_RQ_BYTES)],                              # AR-8
    S.Sta12: [S.Sta10, _receive(RELEASE_RP_BYTES)],                             # AR-10
}

REQUESTOR_STATES = [S.Sta1, S.Sta4, S.Sta5, S.Sta6, S.Sta7, S.Sta8, S.Sta9, S.Sta11, S.Sta13]
ACCEPTOR_STATES = [S.Sta2, S.Sta3, S.Sta6, S.Sta7, S.Sta8, S.Sta10, S.Sta12, S.Sta13]


def _steps(requestor: bool, state: State) -> list:
    chain = [*(_REQUESTOR_STEPS if requestor else _ACCEPTOR_STEPS).items()]
    linear = [s for s, _ in chain]
    if state in linear:
        out = []
        for s, steps in chain:
            out += steps
            if s is state:
                return out
    table = {**_FROM_STA6, **(_REQUESTOR_COLLISION if requestor else _ACCEPTOR_COLLISION)}
    if state not in table:
        raise ValueError(f"no path to {state.name} for the {'requestor' if requestor else 'acceptor'}")
    previous, *steps = table[state]
    return _steps(requestor, previous) + steps


def connection_in(requestor: bool, state: State, **kwargs) -> ULConnection:
    """A requestor or acceptor ULConnection brought to ``state``, its outputs taken."""
    connection = ULConnection(requestor, **kwargs)
    if state is not S.Sta1:
        for step in _steps(requestor, state):
            step(connection)
    assert connection.state is state
    connection.take_outputs()
    return connection


def requestor_in(state: State, **kwargs) -> ULConnection:
    return connection_in(True, state, **kwargs)


def acceptor_in(state: State, **kwargs) -> ULConnection:
    return connection_in(False, state, **kwargs)


def step(connection: ULConnection, event) -> list:
    """Feed one event (a callable on the connection); return the outputs."""
    event(connection)
    return connection.take_outputs()


def assert_provider_abort(outputs, reason: AbortReason):
    """AA-8: A-ABORT (source 2, ``reason``), A-P-ABORT indication, start ARTIM."""
    assert len(outputs) == 3, outputs
    assert outputs[0] == sent(A_ABORT(2, reason))
    assert type(outputs[1]) is Deliver and type(outputs[1].primitive) is APAbortIndication
    assert outputs[1].primitive.reason == reason
    assert outputs[2] is START_ARTIM


# --- the paths themselves --------------------------------------------------------------------

@pytest.mark.parametrize("state", REQUESTOR_STATES, ids=lambda s: s.name)
def test_requestor_reaches(state):
    assert requestor_in(state).state is state


@pytest.mark.parametrize("state", ACCEPTOR_STATES, ids=lambda s: s.name)
def test_acceptor_reaches(state):
    assert acceptor_in(state).state is state


# --- association establishment (Table 9-6) ---------------------------------------------------------

def test_evt1_sta1_ae1_opens_the_transport():
    c = ULConnection(True)
    assert step(c, lambda c: c.associate_request(AAssociateRequest(RQ))) == [OPEN_TRANSPORT]
    assert c.state is S.Sta4


def test_evt2_sta4_ae2_sends_the_a_associate_rq():
    c = requestor_in(S.Sta4)
    assert step(c, lambda c: c.transport_connected()) == [sent(RQ)]
    assert c.state is S.Sta5


def test_evt3_sta5_ae3_confirms_the_association():
    c = requestor_in(S.Sta5)
    assert step(c, _receive(AC)) == [Deliver(AAssociateConfirmation(ac=AC))]
    assert c.state is S.Sta6
    assert (c.rq, c.ac, c.peer_maximum_length) == (RQ, AC, 32768)


def test_evt4_sta5_ae4_confirms_the_rejection_and_closes():
    c = requestor_in(S.Sta5)
    assert step(c, _receive(RJ)) == [Deliver(AAssociateConfirmation(rj=RJ)), CLOSE_TRANSPORT]
    assert c.state is S.Sta1


def test_evt5_sta1_ae5_starts_artim():
    c = ULConnection(False)
    assert step(c, lambda c: c.connection_made()) == [START_ARTIM]
    assert c.state is S.Sta2


def test_evt6_sta2_ae6_acceptable_rq_is_indicated():
    c = acceptor_in(S.Sta2)
    assert step(c, _receive(RQ)) == [STOP_ARTIM, Deliver(AAssociateIndication(RQ))]
    assert c.state is S.Sta3
    assert c.rq == RQ and c.peer_maximum_length == 16384


def test_evt6_sta2_ae6_provider_check_rejects():
    # Source 3 (service-provider, presentation), reason 2 local-limit-exceeded.
    rj = A_ASSOCIATE_RJ(2, 3, 2)
    c = acceptor_in(S.Sta2, provider_check=lambda rq: rj)
    outputs = step(c, _receive(RQ))
    assert outputs == [STOP_ARTIM, Send((b"\x03\x00\x00\x00\x00\x04\x00\x02\x03\x02",)),
                       START_ARTIM]
    assert c.state is S.Sta13
    assert c.rq is None


def test_evt6_sta2_ae6_protocol_version_2_is_rejected():
    # PS3.8 §9.3.2: only bit 0 (version 1) is tested. Version 2 has it clear: rejected-
    # permanent (1), service-provider ACSE (2), protocol-version-not-supported (2).
    c = acceptor_in(S.Sta2)
    outputs = step(c, _receive(make_rq(protocol_version=2)))
    assert outputs == [STOP_ARTIM, Send((b"\x03\x00\x00\x00\x00\x04\x00\x01\x02\x02",)),
                       START_ARTIM]
    assert c.state is S.Sta13


def test_evt6_sta2_ae6_protocol_version_with_bit_0_set_is_accepted():
    c = acceptor_in(S.Sta2)
    step(c, _receive(make_rq(protocol_version=0x0003)))
    assert c.state is S.Sta3


def test_evt7_sta3_ae7_sends_the_a_associate_ac():
    c = acceptor_in(S.Sta3)
    assert step(c, lambda c: c.associate_response(AAssociateResponse(ac=AC))) == [sent(AC)]
    assert c.state is S.Sta6 and c.ac == AC


def test_evt8_sta3_ae8_sends_the_a_associate_rj_and_starts_artim():
    c = acceptor_in(S.Sta3)
    outputs = step(c, lambda c: c.associate_response(AAssociateResponse(rj=RJ)))
    assert outputs == [sent(RJ), START_ARTIM]
    assert c.state is S.Sta13


# --- data transfer (Table 9-7) -------------------------------------------------------------------

def test_evt9_sta6_dt1_sends_header_and_fragment_as_two_buffers():
    c = acceptor_in(S.Sta6)
    fragment = memoryview(b"hello")
    outputs = step(c, lambda c: c.send_pdv(1, MCH_COMMAND | MCH_LAST, fragment))
    assert len(outputs) == 1 and type(outputs[0]) is Send
    header, body = outputs[0].buffers
    assert body is fragment                                   # never copied
    assert bytes(header) == (b"\x04\x00\x00\x00\x00\x0b"      # P-DATA-TF, PDU-length 11
                             b"\x00\x00\x00\x07\x01\x03")     # Item-length 7, context 1, MCH
    assert decode_pdu(bytes(header) + bytes(body)) == P_DATA_TF(
        (PresentationDataValueItem(1, 3, b"hello"),))
    assert c.state is S.Sta6


def test_send_message_part_fits_the_peer_maximum_length():
    c = acceptor_in(S.Sta6)            # the requestor said Maximum Length 16384
    data = bytes(range(256)) * 200     # 51200 bytes
    c.send_message_part(3, False, data)
    outputs = c.take_outputs()
    wire = [b"".join(bytes(b) for b in out.buffers) for out in outputs]
    assert all(len(pdu) - 6 <= 16384 for pdu in wire)
    pdvs = [pdv for pdu in wire for pdv in decode_pdu(pdu).pdvs]
    assert b"".join(pdv.data for pdv in pdvs) == data
    assert [pdv.message_control_header for pdv in pdvs] == [0] * (len(pdvs) - 1) + [MCH_LAST]
    assert {pdv.context_id for pdv in pdvs} == {3}


def test_send_message_part_empty_command_is_one_last_pdv():
    c = requestor_in(S.Sta6)
    c.send_message_part(1, True, b"")
    (out,) = c.take_outputs()
    assert decode_pdu(b"".join(out.buffers)) == P_DATA_TF(
        (PresentationDataValueItem(1, MCH_COMMAND | MCH_LAST, b""),))


def test_evt9_sta8_ar7_sends_p_data():
    c = acceptor_in(S.Sta8)
    outputs = step(c, lambda c: c.send_pdv(1, 0, b"x"))
    assert len(outputs) == 1 and type(outputs[0]) is Send
    assert c.state is S.Sta8


def pdata_deliveries(outputs):
    assert all(type(o) is Deliver and type(o.primitive) is PDataIndication for o in outputs)
    return [(o.primitive.context_id, o.primitive.message_control_header,
             bytes(o.primitive.fragment), o.primitive.pdv_complete) for o in outputs]


@pytest.mark.parametrize("requestor", [True, False], ids=["requestor", "acceptor"])
def test_evt10_sta6_dt2_delivers_each_pdv(requestor):
    c = connection_in(requestor, S.Sta6)
    outputs = step(c, _receive(P_DATA))
    assert pdata_deliveries(outputs) == [(1, MCH_COMMAND, b"first", True),
                                         (1, MCH_COMMAND | MCH_LAST, b"second", True)]
    assert c.state is S.Sta6


def test_evt10_sta6_dt2_delivers_pieces_as_they_arrive():
    c = acceptor_in(S.Sta6)
    data = P_DATA.encode()
    first = step(c, lambda c: c.receive_data(data[:14]))
    rest = step(c, lambda c: c.receive_data(data[14:]))
    assert pdata_deliveries(first) == [(1, MCH_COMMAND, b"fi", False)]
    assert pdata_deliveries(rest) == [(1, MCH_COMMAND, b"rst", True),
                                      (1, MCH_COMMAND | MCH_LAST, b"second", True)]


def test_evt10_sta7_ar6_still_delivers():
    c = requestor_in(S.Sta7)
    assert len(pdata_deliveries(step(c, _receive(P_DATA)))) == 2
    assert c.state is S.Sta7


def test_evt10_sta13_aa6_delivers_nothing():
    c = acceptor_in(S.Sta13)
    assert step(c, _receive(P_DATA)) == []
    assert c.state is S.Sta13


def test_evt10_sta2_aa1_aborts():
    c = acceptor_in(S.Sta2)
    assert step(c, _receive(P_DATA)) == [sent(A_ABORT(0, 0)), START_ARTIM]
    assert c.state is S.Sta13


def test_evt10_sta8_aa8_aborts_and_delivers_no_data():
    c = acceptor_in(S.Sta8)
    assert_provider_abort(step(c, _receive(P_DATA)), AbortReason.UNEXPECTED_PDU)
    assert c.state is S.Sta13


# --- association release (Table 9-8) ---------------------------------------------------------

def test_evt11_sta6_ar1_sends_a_release_rq():
    c = requestor_in(S.Sta6)
    assert step(c, lambda c: c.release_request()) == [Send((RELEASE_RQ_BYTES,))]
    assert c.state is S.Sta7


def test_evt12_sta6_ar2_indicates_the_release():
    c = acceptor_in(S.Sta6)
    assert step(c, _receive(RELEASE_RQ_BYTES)) == [Deliver(AReleaseIndication())]
    assert c.state is S.Sta8


def test_evt13_sta7_ar3_confirms_and_closes():
    c = requestor_in(S.Sta7)
    assert step(c, _receive(RELEASE_RP_BYTES)) == [Deliver(AReleaseConfirmation()),
                                                   CLOSE_TRANSPORT]
    assert c.state is S.Sta1


def test_evt14_sta8_ar4_sends_a_release_rp_and_starts_artim():
    c = acceptor_in(S.Sta8)
    assert step(c, lambda c: c.release_response()) == [Send((RELEASE_RP_BYTES,)), START_ARTIM]
    assert c.state is S.Sta13


def test_release_collision_requestor_side():
    c = requestor_in(S.Sta7)
    assert step(c, _receive(RELEASE_RQ_BYTES)) == [Deliver(AReleaseIndication(collision=True))]
    assert c.state is S.Sta9                                             # AR-8
    assert step(c, lambda c: c.release_response()) == [Send((RELEASE_RP_BYTES,))]
    assert c.state is S.Sta11                                            # AR-9
    assert step(c, _receive(RELEASE_RP_BYTES)) == [Deliver(AReleaseConfirmation()),
                                                   CLOSE_TRANSPORT]
    assert c.state is S.Sta1                                             # AR-3


def test_release_collision_acceptor_side():
    c = acceptor_in(S.Sta7)
    assert step(c, _receive(RELEASE_RQ_BYTES)) == [Deliver(AReleaseIndication(collision=True))]
    assert c.state is S.Sta10                                            # AR-8
    assert step(c, _receive(RELEASE_RP_BYTES)) == [Deliver(AReleaseConfirmation())]
    assert c.state is S.Sta12                                            # AR-10
    assert step(c, lambda c: c.release_response()) == [Send((RELEASE_RP_BYTES,)), START_ARTIM]
    assert c.state is S.Sta13                                            # AR-4
    assert step(c, lambda c: c.connection_lost()) == [STOP_ARTIM]
    assert c.state is S.Sta1                                             # AR-5


def test_release_collision_both_sides_wired_together():
    requestor, acceptor = requestor_in(S.Sta6), acceptor_in(S.Sta6)
    requestor.release_request()
    acceptor.release_request()
    # Each A-RELEASE-RQ crosses the other on the wire.
    to_acceptor = b"".join(b for o in requestor.take_outputs() for b in o.buffers)
    to_requestor = b"".join(b for o in acceptor.take_outputs() for b in o.buffers)
    requestor.receive_data(to_requestor)
    acceptor.receive_data(to_acceptor)
    assert (requestor.state, acceptor.state) == (S.Sta9, S.Sta10)
    requestor.take_outputs()
    acceptor.take_outputs()
    requestor.release_response()                                          # AR-9
    acceptor.receive_data(b"".join(b for o in requestor.take_outputs() for b in o.buffers))
    assert acceptor.state is S.Sta12                                      # AR-10
    acceptor.release_response()                                           # AR-4
    requestor.receive_data(b"".join(b for o in acceptor.take_outputs()
                                    if type(o) is Send for b in o.buffers))
    assert requestor.state is S.Sta1                                      # AR-3
    assert requestor.take_outputs() == [Deliver(AReleaseConfirmation()), CLOSE_TRANSPORT]
    acceptor.connection_lost()                                            # AR-5
    assert acceptor.state is S.Sta1


# --- association abort (Table 9-9) --------------------------------------------------------------

@pytest.mark.parametrize("state", [S.Sta3, S.Sta6, S.Sta7, S.Sta8, S.Sta10, S.Sta12],
                         ids=lambda s: s.name)
def test_evt15_aa1_sends_a_user_a_abort(state):
    c = acceptor_in(state)
    assert step(c, lambda c: c.abort_request()) == [sent(A_ABORT(0, 0)), START_ARTIM]
    assert c.state is S.Sta13


def test_evt15_sta4_aa2_closes_the_transport_being_opened():
    c = requestor_in(S.Sta4)
    assert step(c, lambda c: c.abort_request()) == [STOP_ARTIM, CLOSE_TRANSPORT]
    assert c.state is S.Sta1


@pytest.mark.parametrize("state", [S.Sta2, S.Sta13], ids=lambda s: s.name)
def test_evt15_local_extension_closes(state):
    c = acceptor_in(state)
    assert step(c, lambda c: c.abort_request()) == [STOP_ARTIM, CLOSE_TRANSPORT]
    assert c.state is S.Sta1


@pytest.mark.parametrize("state", [S.Sta5, S.Sta6, S.Sta7, S.Sta9, S.Sta11],
                         ids=lambda s: s.name)
def test_evt16_aa3_user_abort_is_indicated_and_closes(state):
    c = requestor_in(state)
    assert step(c, _receive(ABORT_USER)) == [Deliver(AAbortIndication(0, 0)), CLOSE_TRANSPORT]
    assert c.state is S.Sta1


def test_evt16_sta6_aa3_provider_abort_is_an_a_p_abort():
    c = acceptor_in(S.Sta6)
    outputs = step(c, _receive(A_ABORT(2, 6)))
    assert len(outputs) == 2 and outputs[1] is CLOSE_TRANSPORT
    assert type(outputs[0].primitive) is APAbortIndication
    assert outputs[0].primitive.reason == 6
    assert c.state is S.Sta1


@pytest.mark.parametrize("state", [S.Sta2, S.Sta13], ids=lambda s: s.name)
def test_evt16_aa2_stops_artim_and_closes(state):
    c = acceptor_in(state)
    assert step(c, _receive(ABORT_USER)) == [STOP_ARTIM, CLOSE_TRANSPORT]
    assert c.state is S.Sta1


def test_evt17_sta2_aa5_stops_artim():
    c = acceptor_in(S.Sta2)
    assert step(c, lambda c: c.connection_lost()) == [STOP_ARTIM]
    assert c.state is S.Sta1


@pytest.mark.parametrize("state", [S.Sta4, S.Sta5, S.Sta6, S.Sta7, S.Sta8, S.Sta9, S.Sta11],
                         ids=lambda s: s.name)
def test_evt17_aa4_indicates_a_p_abort(state):
    c = requestor_in(state)
    outputs = step(c, lambda c: c.connection_lost())
    assert len(outputs) == 1 and type(outputs[0].primitive) is APAbortIndication
    assert c.state is S.Sta1


def test_evt17_sta13_ar5_stops_artim():
    c = acceptor_in(S.Sta13)
    assert step(c, lambda c: c.connection_lost()) == [STOP_ARTIM]
    assert c.state is S.Sta1


def test_evt17_in_sta1_is_nothing():
    c = requestor_in(S.Sta7)
    step(c, _receive(RELEASE_RP_BYTES))
    assert step(c, lambda c: c.connection_lost()) == []
    assert c.state is S.Sta1


@pytest.mark.parametrize("state", [S.Sta2, S.Sta13], ids=lambda s: s.name)
def test_evt18_aa2_artim_expired_closes(state):
    c = acceptor_in(state)
    assert step(c, lambda c: c.artim_expired()) == [STOP_ARTIM, CLOSE_TRANSPORT]
    assert c.state is S.Sta1


GARBAGE = [
    # (bytes, A-ABORT reason of PS3.8 Table 9-26)
    (b"\x08\x00\x00\x00\x00\x04\x00\x00\x00\x00", AbortReason.UNRECOGNIZED_PDU),
    (b"\xFF\x00\x00\x00\x00\x00", AbortReason.UNRECOGNIZED_PDU),
    (b"\x05\x00\x00\x00\x00\x02\x00\x00", AbortReason.INVALID_PDU_PARAMETER_VALUE),
    (b"\x04\x00\x00\x00\x00\x08\x00\x00\x00\x64\x01\x03xx", AbortReason.INVALID_PDU_PARAMETER_VALUE),
    (b"\x01\x00\x7F\xFF\xFF\xFF", AbortReason.INVALID_PDU_PARAMETER_VALUE),
]


@pytest.mark.parametrize("data, reason", GARBAGE, ids=[f"garbage{i}" for i in range(len(GARBAGE))])
@pytest.mark.parametrize("requestor", [True, False], ids=["requestor", "acceptor"])
def test_evt19_sta6_aa8_aborts_with_the_reason(requestor, data, reason):
    c = connection_in(requestor, S.Sta6)
    assert_provider_abort(step(c, lambda c: c.receive_data(data)), reason)
    assert c.state is S.Sta13
    # Nothing after the garbage is read: the framing is lost.
    assert step(c, lambda c: c.receive_data(P_DATA.encode() + RELEASE_RQ_BYTES)) == []
    assert c.state is S.Sta13


def test_evt19_sta2_aa1_aborts_as_service_user():
    c = acceptor_in(S.Sta2)
    assert step(c, lambda c: c.receive_data(GARBAGE[0][0])) == [sent(A_ABORT(0, 0)), START_ARTIM]
    assert c.state is S.Sta13


def test_evt19_sta13_aa7_sends_a_provider_abort():
    c = acceptor_in(S.Sta13)
    assert step(c, lambda c: c.receive_data(GARBAGE[0][0])) == [
        sent(A_ABORT(2, AbortReason.UNRECOGNIZED_PDU))]
    assert c.state is S.Sta13


def test_evt19_after_a_pdv_started_stops_delivery():
    c = acceptor_in(S.Sta6)
    data = P_DATA.encode()
    data = data[:6] + (200).to_bytes(4, "big") + data[10:]   # first PDV's Item-length lies
    outputs = step(c, lambda c: c.receive_data(data))
    assert_provider_abort(outputs, AbortReason.INVALID_PDU_PARAMETER_VALUE)


def test_evt3_sta6_aa8_unexpected_pdu():
    c = requestor_in(S.Sta6)
    assert_provider_abort(step(c, _receive(AC)), AbortReason.UNEXPECTED_PDU)
    assert c.state is S.Sta13


def test_evt6_sta13_aa7_answers_an_rq_with_an_abort():
    c = acceptor_in(S.Sta13)
    assert step(c, _receive(RQ)) == [sent(A_ABORT(2, AbortReason.UNEXPECTED_PDU))]
    assert c.state is S.Sta13


@pytest.mark.parametrize("pdu", [AC, RJ, A_RELEASE_RQ(), A_RELEASE_RP(), P_DATA],
                         ids=lambda p: type(p).__name__)
def test_sta13_aa6_ignores_pdus(pdu):
    c = requestor_in(S.Sta13)
    assert step(c, _receive(pdu)) == []
    assert c.state is S.Sta13


def test_receive_data_in_sta1_is_ignored():
    c = ULConnection(False)
    assert step(c, _receive(RQ)) == []
    assert c.state is S.Sta1


# --- bytes that follow the PDU that ended the association ------------------------------------------

@pytest.mark.parametrize("start, closing, after", [
    (S.Sta6, ABORT_USER, RELEASE_RQ_BYTES),                      # AA-3, then a PDU
    (S.Sta6, ABORT_USER, b"\x08garbage"),                         # AA-3, then garbage
    (S.Sta7, RELEASE_RP_BYTES, ABORT_USER.encode()),              # AR-3, then a PDU
    (S.Sta5, RJ, P_DATA.encode()),                                # AE-4, then P-DATA
], ids=["abort+release-rq", "abort+garbage", "release-rp+abort", "rj+p-data"])
def test_bytes_after_the_end_in_the_same_chunk_are_ignored(start, closing, after):
    """Once an action closed the transport (Sta1), the rest of the chunk is no event.

    The transport may hand over the closing PDU and what the peer sent after it in
    one ``data_received`` call; a PDU after it must not become an event in Sta1 (a
    blank cell: LocalProtocolError out of ``receive_data``).
    """
    c = requestor_in(start)
    closing = closing if isinstance(closing, bytes) else closing.encode()
    c.receive_data(closing + after)                 # must not raise
    assert c.state is S.Sta1
    assert c.take_outputs()[-1] is CLOSE_TRANSPORT


@pytest.mark.parametrize("closing", [ABORT_USER, A_ABORT(2, 6)], ids=["user", "provider"])
def test_no_p_data_indication_after_the_end_in_the_same_chunk(closing):
    """P-DATA after an A-ABORT in the same chunk is not delivered (AA-3 closed it all).

    The association already received P-DATA (DT-2 set ``deliver_p_data``); the
    A-ABORT ends it (AA-3, Sta1) and the P-DATA-TF that follows in the same read
    must not reach the user after the A-ABORT indication and the close.
    """
    c = acceptor_in(S.Sta6)
    step(c, _receive(P_DATA))
    outputs = step(c, lambda c: c.receive_data(closing.encode() + P_DATA.encode()))
    assert c.state is S.Sta1
    assert outputs[-1] is CLOSE_TRANSPORT, outputs
    assert not any(type(o) is Deliver and type(o.primitive) is PDataIndication
                   for o in outputs)


# --- every received PDU in every reachable state follows the table ---------------------------------

RECEIVED = {
    Event.Evt3: AC.encode(),
    Event.Evt4: RJ.encode(),
    Event.Evt6: RQ.encode(),
    Event.Evt10: P_DATA.encode(),
    Event.Evt12: RELEASE_RQ_BYTES,
    Event.Evt13: RELEASE_RP_BYTES,
    Event.Evt16: ABORT_USER.encode(),
    Event.Evt19: GARBAGE[0][0],
}
_REACHABLE = ([(True, s) for s in REQUESTOR_STATES if s not in (S.Sta1, S.Sta4)]
              + [(False, s) for s in ACCEPTOR_STATES])


@pytest.mark.parametrize("event", list(RECEIVED), ids=lambda e: e.name)
@pytest.mark.parametrize("requestor, state", _REACHABLE,
                         ids=[f"{'rq' if r else 'ac'}-{s.name}" for r, s in _REACHABLE])
def test_received_pdu_follows_table_9_10(requestor, state, event):
    c = connection_in(requestor, state)
    action = lookup(event, state)
    assert action is not None, "PS3.8 gives every PDU event a cell where a transport exists"
    trace = []
    c.trace = lambda *args: trace.append(args)
    c.receive_data(RECEIVED[event])
    assert trace[0][:3] == (state, event, action.name)
    assert c.state in action.next_states
    assert c.state is trace[-1][3]


# --- primitives in blank cells ----------------------------------------------------------------

PRIMITIVES = {
    Event.Evt1: lambda c: c.associate_request(AAssociateRequest(RQ)),
    Event.Evt2: lambda c: c.transport_connected(),
    Event.Evt5: lambda c: c.connection_made(),
    Event.Evt7: lambda c: c.associate_response(AAssociateResponse(ac=AC)),
    Event.Evt8: lambda c: c.associate_response(AAssociateResponse(rj=RJ)),
    Event.Evt9: lambda c: c.send_pdv(1, MCH_LAST, b"data"),
    Event.Evt11: lambda c: c.release_request(),
    Event.Evt14: lambda c: c.release_response(),
    Event.Evt15: lambda c: c.abort_request(),
    Event.Evt18: lambda c: c.artim_expired(),
}
_BLANK = [(requestor, state, event)
          for requestor, states in ((True, REQUESTOR_STATES), (False, ACCEPTOR_STATES))
          for state in states for event in PRIMITIVES if lookup(event, state) is None]


@pytest.mark.parametrize("requestor, state, event", _BLANK,
                         ids=[f"{'rq' if r else 'ac'}-{e.name}-{s.name}" for r, s, e in _BLANK])
def test_primitive_in_a_blank_cell_is_a_local_error(requestor, state, event):
    c = connection_in(requestor, state)
    with pytest.raises(LocalProtocolError, match=f"{event.name}.*{state.name}"):
        PRIMITIVES[event](c)
    assert c.state is state
    assert c.take_outputs() == []


# --- two connections wired together ----------------------------------------------------------------

#: The primitives a rule may pick, and the event each is.
LOCAL = {
    "associate_request": Event.Evt1,
    "accept": Event.Evt7,
    "reject": Event.Evt8,
    "send_pdv": Event.Evt9,
    "release_request": Event.Evt11,
    "release_response": Event.Evt14,
    "abort_request": Event.Evt15,
    "artim_expired": Event.Evt18,
}


class Side:
    """One end: its ULConnection and what the test knows about its transport."""

    def __init__(self, name: str, connection: ULConnection):
        self.name = name
        self.conn = connection
        self.inbox = bytearray()      # bytes sent by the peer, not yet received here
        self.attached = True          # the transport is open at this end
        self.closed = False           # this end output CLOSE_TRANSPORT
        self.peer_closed = False      # the peer closed: the close follows the inbox
        self.artim = False
        self.garbage_in = False       # garbage was put on the wire towards this end
        self.sent_pdvs: list[tuple] = []
        self.received_pdvs: list[tuple] = []
        self.pending_pdv = b""
        self.delivered: list = []
        self.sent_control: list = []

    @property
    def state(self) -> State:
        return self.conn.state


class ULPair(RuleBasedStateMachine):
    """A requestor and an acceptor ULConnection talking through memory (PS3.8 §9.2)."""

    def __init__(self):
        super().__init__()
        self.req: Side | None = None
        self.acc: Side | None = None
        self.link = None                 # None, "connecting" or "open"

    # --- plumbing --------------------------------------------------------------------------

    def sides(self):
        return [side for side in (self.req, self.acc) if side is not None]

    def peer(self, side: Side) -> Side | None:
        return self.acc if side is self.req else self.req

    def call(self, side: Side, event) -> None:
        """Feed one event to one side and carry out its outputs, as the driver does."""
        event(side.conn)
        self.perform(side)

    def perform(self, side: Side) -> None:
        for output in side.conn.take_outputs():
            # CLOSE_TRANSPORT is the last thing a connection ever outputs.
            assert not side.closed, f"{side.name} output {output!r} after closing"
            if type(output) is Send:
                assert side.attached, f"{side.name} sent on a closed transport"
                data = b"".join(bytes(b) for b in output.buffers)
                self.check_sent(side, data)
                peer = self.peer(side)
                if self.link == "open" and peer is not None and peer.attached:
                    peer.inbox += data
            elif type(output) is Deliver:
                self.check_delivered(side, output.primitive)
            elif output is START_ARTIM:
                side.artim = True
            elif output is STOP_ARTIM:
                side.artim = False
            elif output is OPEN_TRANSPORT:
                assert side is self.req and self.link is None
                self.link = "connecting"
            elif output is CLOSE_TRANSPORT:
                self.close(side)
            else:
                raise AssertionError(f"unknown output {output!r}")

    def close(self, side: Side) -> None:
        """CLOSE_TRANSPORT at one end: the peer reads what is on the wire, then the close."""
        if self.link == "connecting":
            self.link = None
        side.attached = False
        side.closed = True
        side.inbox.clear()
        peer = self.peer(side)
        if peer is not None and peer.attached:
            peer.peer_closed = True
        # The driver's transport reports its own close too; in Sta1 it is no event.
        side.conn.connection_lost()
        assert side.conn.take_outputs() == []
        side.artim = False

    def check_sent(self, side: Side, data: bytes) -> None:
        if data[0] == 0x04:
            # One PDV per P-DATA-TF (send_pdv), within the peer's Maximum Length.
            pdu_length = int.from_bytes(data[2:6], "big")
            limit = side.conn.peer_maximum_length
            if limit:
                assert pdu_length <= max(limit, 7)
            (pdv,) = decode_pdu(data).pdvs
            side.sent_pdvs.append((pdv.context_id, pdv.message_control_header, pdv.data))
        else:
            side.sent_control.append(decode_pdu(data))

    def check_delivered(self, side: Side, primitive) -> None:
        if type(primitive) is PDataIndication:
            side.pending_pdv += bytes(primitive.fragment)      # valid during this call only
            if primitive.pdv_complete:
                side.received_pdvs.append((primitive.context_id,
                                           primitive.message_control_header, side.pending_pdv))
                side.pending_pdv = b""
            return
        side.delivered.append(primitive)
        peer = self.peer(side)
        if side.garbage_in or peer is None:
            return
        if type(primitive) is AAssociateIndication:
            assert primitive.rq == self.rq
        elif type(primitive) is AAssociateConfirmation:
            assert (primitive.ac or primitive.rj) in peer.sent_control

    def idle(self) -> bool:
        return all(side.state is S.Sta1 for side in self.sides())

    @staticmethod
    def rarely(data) -> bool:
        """True one time in ten: the rules that end an association, so that most
        runs get far enough to release it."""
        return data.draw(st.integers(0, 9), label="rarely") == 7

    # --- rules -------------------------------------------------------------------------------

    _MAXIMUM_LENGTHS = st.sampled_from([0, 7, 16, 100, 16384])
    _PROTOCOL_VERSIONS = st.sampled_from([1, 1, 1, 1, 1, 2, 3])

    @initialize(maximum_length=_MAXIMUM_LENGTHS, protocol_version=_PROTOCOL_VERSIONS,
                acceptor_first=st.booleans())
    def start(self, maximum_length, protocol_version, acceptor_first):
        """Every run starts with an A-ASSOCIATE request whose transport is open."""
        self.associate(maximum_length, protocol_version)
        self.connect(acceptor_first)

    @precondition(lambda self: self.idle())
    @rule(maximum_length=_MAXIMUM_LENGTHS, protocol_version=_PROTOCOL_VERSIONS)
    def associate(self, maximum_length, protocol_version):
        """Evt1: a new association, on a new pair of connections."""
        self.rq = make_rq(maximum_length, protocol_version)
        self.req = Side("requestor", ULConnection(True))
        self.acc = None
        self.link = None
        self.call(self.req, lambda c: c.associate_request(AAssociateRequest(self.rq)))

    @precondition(lambda self: self.link == "connecting")
    @rule(acceptor_first=st.booleans())
    def connect(self, acceptor_first):
        """Evt5 at the acceptor, Evt2 at the requestor."""
        self.link = "open"
        self.acc = Side("acceptor", ULConnection(False))
        if acceptor_first:
            self.call(self.acc, lambda c: c.connection_made())
            self.call(self.req, lambda c: c.transport_connected())
        else:
            self.call(self.req, lambda c: c.transport_connected())
            self.call(self.acc, lambda c: c.connection_made())

    @precondition(lambda self: self.link == "connecting")
    @rule(data=st.data())
    def connect_fails(self, data):
        """Evt17 in Sta4: the TCP connect failed."""
        if not self.rarely(data):
            return
        self.link = None
        self.req.attached = False
        self.call(self.req, lambda c: c.connection_lost())

    @precondition(lambda self: any(side.attached and side.inbox for side in self.sides()))
    @rule(data=st.data())
    def transfer(self, data):
        """Some of the bytes on the wire arrive (any cut)."""
        side = data.draw(st.sampled_from([s for s in self.sides() if s.attached and s.inbox]))
        size = data.draw(st.integers(1, len(side.inbox)) | st.just(len(side.inbox)))
        chunk = bytes(side.inbox[:size])
        del side.inbox[:size]
        self.call(side, lambda c: c.receive_data(chunk))

    @precondition(lambda self: any(side.attached and side.inbox for side in self.sides()))
    @rule(data=st.data())
    def pump(self, data):
        """Everything on the wire arrives, both ways, in random cuts, until it is quiet."""
        while True:
            ready = [s for s in self.sides() if s.attached and s.inbox]
            if not ready:
                return
            side = data.draw(st.sampled_from(ready))
            size = data.draw(st.integers(1, len(side.inbox)) | st.just(len(side.inbox)))
            chunk = bytes(side.inbox[:size])
            del side.inbox[:size]
            self.call(side, lambda c: c.receive_data(chunk))

    @precondition(lambda self: any(side.attached and side.peer_closed and not side.inbox
                                   for side in self.sides()))
    @rule(data=st.data())
    def closed_by_peer(self, data):
        """Evt17: the peer's close arrives after all it sent."""
        side = data.draw(st.sampled_from([s for s in self.sides()
                                          if s.attached and s.peer_closed and not s.inbox]))
        side.attached = False
        self.call(side, lambda c: c.connection_lost())

    @precondition(lambda self: self.acc is not None and self.acc.state is S.Sta3)
    @rule(maximum_length=st.sampled_from([0, 7, 16, 100, 32768]))
    def accept(self, maximum_length):
        """Evt7: A-ASSOCIATE response (accept)."""
        ac = make_ac(self.rq, maximum_length)
        self.call(self.acc, lambda c: c.associate_response(AAssociateResponse(ac=ac)))

    @precondition(lambda self: self.acc is not None and self.acc.state is S.Sta3)
    @rule(data=st.data(), result=st.sampled_from([1, 2]), reason=st.sampled_from([1, 2, 3, 7]))
    def reject(self, data, result, reason):
        """Evt8: A-ASSOCIATE response (reject)."""
        if not self.rarely(data):
            return
        rj = A_ASSOCIATE_RJ(result, 1, reason)
        self.call(self.acc, lambda c: c.associate_response(AAssociateResponse(rj=rj)))

    @precondition(lambda self: any(side.state in (S.Sta6, S.Sta8) for side in self.sides()))
    @rule(data=st.data(), is_command=st.booleans(), payload=st.binary(max_size=120))
    def send_p_data(self, data, is_command, payload):
        """Evt9 (DT-1 in Sta6, AR-7 in Sta8), a message part cut to the peer's maximum."""
        side = data.draw(st.sampled_from([s for s in self.sides()
                                          if s.state in (S.Sta6, S.Sta8)]))
        self.call(side, lambda c: c.send_message_part(1, is_command, payload))

    @precondition(lambda self: any(side.state is S.Sta6 for side in self.sides()))
    @rule(data=st.data())
    def release_request(self, data):
        """Evt11: A-RELEASE request."""
        side = data.draw(st.sampled_from([s for s in self.sides() if s.state is S.Sta6]))
        self.call(side, lambda c: c.release_request())

    @precondition(lambda self: any(side.state in (S.Sta8, S.Sta9, S.Sta12)
                                   for side in self.sides()))
    @rule(data=st.data())
    def release_response(self, data):
        """Evt14: A-RELEASE response."""
        side = data.draw(st.sampled_from([s for s in self.sides()
                                          if s.state in (S.Sta8, S.Sta9, S.Sta12)]))
        self.call(side, lambda c: c.release_response())

    @precondition(lambda self: any(lookup(Event.Evt15, side.state) for side in self.sides()))
    @rule(data=st.data())
    def abort_request(self, data):
        """Evt15: A-ABORT request, where the table (or a local extension) has a cell."""
        if not self.rarely(data):
            return
        side = data.draw(st.sampled_from([s for s in self.sides()
                                          if lookup(Event.Evt15, s.state)]))
        self.call(side, lambda c: c.abort_request())

    @precondition(lambda self: any(side.artim for side in self.sides()))
    @rule(data=st.data())
    def artim_expires(self, data):
        """Evt18: the ARTIM timer that was started runs out."""
        side = data.draw(st.sampled_from([s for s in self.sides() if s.artim]))
        if side.state is S.Sta2 and not self.rarely(data):
            return                       # the A-ASSOCIATE-RQ usually comes in time
        side.artim = False
        self.call(side, lambda c: c.artim_expired())

    @precondition(lambda self: self.link == "open")
    @rule(data=st.data())
    def network_failure(self, data):
        """The transport connection breaks: Evt17 at both ends, whatever was in flight."""
        if not self.rarely(data):
            return
        self.link = None
        for side in self.sides():
            side.inbox.clear()
            if side.attached:
                side.attached = False
                self.call(side, lambda c: c.connection_lost())

    #: What a confused or hostile peer may put on the wire: any PDU in any state
    #: (Evt3, 4, 6, 10, 12, 13, 16 everywhere), or bytes that are not a PDU (Evt19).
    _STRAY = st.sampled_from([AC.encode(), RJ.encode(), RQ.encode(), P_DATA.encode(),
                              RELEASE_RQ_BYTES, RELEASE_RP_BYTES, ABORT_USER.encode(),
                              A_ABORT(2, 6).encode(), b"\x08\x00\x00\x00\x00\x00",
                              b"\x04\x00\x00\x00\x00\x02\x00\x00",
                              b"\x05\x00\x00\x00\x00\x03\x00\x00\x00"])
    _JUNK = st.binary(min_size=1, max_size=24)

    @precondition(lambda self: self.link == "open"
                  and any(side.attached for side in self.sides()))
    @rule(data=st.data(), stray=st.lists(_STRAY | _JUNK, min_size=1, max_size=3))
    def stray_bytes(self, data, stray):
        """PDUs the state does not expect, or garbage, on the wire towards one end."""
        if data.draw(st.integers(0, 2), label="sometimes") != 1:
            return
        side = data.draw(st.sampled_from([s for s in self.sides() if s.attached]))
        side.inbox += b"".join(stray)
        side.garbage_in = True

    @precondition(lambda self: self.req is not None)
    @rule(data=st.data())
    def forbidden_primitive(self, data):
        """A primitive the table forbids in this state: LocalProtocolError, nothing else."""
        side = data.draw(st.sampled_from(self.sides()))
        blank = [name for name, event in LOCAL.items() if lookup(event, side.state) is None]
        if not blank:
            return
        name = data.draw(st.sampled_from(blank))
        state = side.state
        with pytest.raises(LocalProtocolError):
            {
                "associate_request": lambda c: c.associate_request(AAssociateRequest(RQ)),
                "accept": lambda c: c.associate_response(AAssociateResponse(ac=AC)),
                "reject": lambda c: c.associate_response(AAssociateResponse(rj=RJ)),
                "send_pdv": lambda c: c.send_pdv(1, MCH_LAST, b"x"),
                "release_request": lambda c: c.release_request(),
                "release_response": lambda c: c.release_response(),
                "abort_request": lambda c: c.abort_request(),
                "artim_expired": lambda c: c.artim_expired(),
            }[name](side.conn)
        assert side.state is state
        assert side.conn.take_outputs() == []

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def artim_runs_exactly_in_sta2_and_sta13(self):
        for side in self.sides():
            assert side.artim == (side.state in (S.Sta2, S.Sta13)), (side.name, side.state)

    @invariant()
    def a_transport_exactly_outside_sta1(self):
        for side in self.sides():
            assert side.attached == (side.state is not S.Sta1), (side.name, side.state)

    @invariant()
    def p_data_arrives_in_order_and_whole(self):
        for side in self.sides():
            peer = self.peer(side)
            if peer is not None and not side.garbage_in:
                assert side.received_pdvs == peer.sent_pdvs[:len(side.received_pdvs)]

    def teardown(self):
        for side in self.sides():                   # close the transport at both ends
            side.inbox.clear()
            if side.attached:
                side.attached = False
                self.call(side, lambda c: c.connection_lost())
        for side in self.sides():                   # and let the timers run out
            if side.artim:
                side.artim = False
                self.call(side, lambda c: c.artim_expired())
        for side in self.sides():
            assert side.state is S.Sta1, (side.name, side.state)


ULPair.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow,
                                                           HealthCheck.filter_too_much])
test_requestor_and_acceptor_wired_together = ULPair.TestCase
