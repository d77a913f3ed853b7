"""PS3.7: the command set codec and the assembly of messages from P-DATA fragments.

References
----------
PS3.7 §6.3.1 (command set: group 0000, Implicit VR Little Endian), §9.3 and
§10.3 (the messages), Annex E (command dictionary); PS3.8 Annex E.2 (Message
Control Header).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import strategies as s
from dicomagent.dimse.commands import (_REQUIRED, COMMAND_ELEMENTS, MESSAGES, NO_DATA_SET, C_ECHO_RQ,
                                       C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP, CommandDecodeError,
                                       decode_command, encode_command)
from dicomagent.dimse.messages import (MAX_COMMAND_SET_LENGTH, DIMSEProtocolError,
                                       MessageAssembler)
from dicomagent.ul.connection import Deliver, Send, ULConnection
from dicomagent.ul.items import MaximumLengthSubItem, UserInformationItem
from dicomagent.ul.pdu import MCH_COMMAND, MCH_LAST, A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from dicomagent.ul.primitives import AAssociateRequest, AAssociateResponse, PDataIndication

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def elements(data: bytes) -> list[tuple[int, bytes]]:
    """(tag, value) of each element of an Implicit VR Little Endian group 0000."""
    out, offset = [], 0
    while offset < len(data):
        group, element, length = struct.unpack_from("<HHI", data, offset)
        out.append(((group << 16) | element, data[offset + 8:offset + 8 + length]))
        offset += 8 + length
    return out


# --- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("command_field", sorted(MESSAGES), ids=lambda cf: MESSAGES[cf].NAME)
@FAST
@given(data=st.data())
def test_command_round_trip_every_field_present(command_field, data):
    message = data.draw(s.messages_of(MESSAGES[command_field], present=True))
    assert decode_command(encode_command(message)) == message


@FAST
@given(message=s.messages)
def test_command_round_trip(message):
    """Any message, any field absent (None) or present."""
    assert decode_command(encode_command(message)) == message


def test_absent_fields_decode_as_absent():
    """None = absent: an optional field left out of the command set decodes as None,
    never as the class default (Priority 0, Status 0x0000…)."""
    invented = {}
    for cls in MESSAGES.values():
        required = _REQUIRED[cls]
        empty = cls(**{name: (1 if name in required else None) for name in cls.FIELD_ORDER})
        decoded = decode_command(encode_command(empty))
        extra = {name: getattr(decoded, name) for name in cls.FIELD_ORDER
                 if getattr(decoded, name) is not None and name not in required}
        if extra:
            invented[cls.NAME] = extra
    assert invented == {}


def test_response_without_status_is_not_success():
    # PS3.7 Table 9.3-2: Status is mandatory in a C-STORE-RSP. A peer that leaves it
    # out must not be read as Success (0x0000): nothing acknowledged may be lost.
    # Such a command set is refused (the association is then aborted).
    data = encode_command(C_STORE_RSP(AffectedSOPClassUID=CT_IMAGE_STORAGE,
                                      MessageIDBeingRespondedTo=7, Status=None))
    assert 0x00000900 not in dict(elements(data))
    with pytest.raises(CommandDecodeError, match="Status"):
        decode_command(data)


@pytest.mark.parametrize("command_field", sorted(MESSAGES))
def test_required_fields_missing_are_refused(command_field):
    cls = MESSAGES[command_field]
    for name in _REQUIRED[cls]:
        message = cls(**{n: (None if n == name else 1) if n in _REQUIRED[cls] else None
                         for n in cls.FIELD_ORDER})
        with pytest.raises(CommandDecodeError, match=name):
            decode_command(encode_command(message))


@FAST
@given(message=s.complete_messages)
def test_command_set_layout(message):
    """PS3.7 §6.3.1: group 0000 only, tags ascending, even lengths, group length first."""
    data = encode_command(message)
    found = elements(data)
    tags = [tag for tag, _ in found]
    assert tags == sorted(tags) and len(set(tags)) == len(tags)
    assert tags[0] == 0x00000000
    assert found[0][1] == struct.pack("<I", len(data) - 12)
    assert all(tag >> 16 == 0 and tag in COMMAND_ELEMENTS for tag in tags)
    assert all(len(value) % 2 == 0 for _, value in found)
    assert dict(found)[0x00000100] == struct.pack("<H", message.COMMAND_FIELD)


def test_c_echo_rq_bytes():
    # PS3.7 §9.3.5.1, Table 9.3-12 in Implicit VR Little Endian (§6.3.1): tag as
    # group, element (2 + 2 bytes LE), 4-byte length, value; a UI of odd length
    # is padded with one NUL.
    expected = b"".join([
        b"\x00\x00\x00\x00", b"\x04\x00\x00\x00", (56).to_bytes(4, "little"),  # Group Length
        b"\x00\x00\x02\x00", b"\x12\x00\x00\x00", b"1.2.840.10008.1.1\x00",  # Affected SOP Class
        b"\x00\x00\x00\x01", b"\x02\x00\x00\x00", b"\x30\x00",          # Command Field C-ECHO-RQ
        b"\x00\x00\x10\x01", b"\x02\x00\x00\x00", b"\x01\x00",          # Message ID 1
        b"\x00\x00\x00\x08", b"\x02\x00\x00\x00", b"\x01\x01",          # Command Data Set Type
    ])
    assert len(expected) == 12 + 56
    message = C_ECHO_RQ(AffectedSOPClassUID=VERIFICATION, MessageID=1)
    assert encode_command(message) == expected
    assert decode_command(expected) == message
    assert not message.has_data_set and not message.is_response


def test_c_echo_rsp_decodes_as_dcmtk_sends_it():
    data = b"".join([
        b"\x00\x00\x00\x00\x04\x00\x00\x00", (66).to_bytes(4, "little"),
        b"\x00\x00\x02\x00\x12\x00\x00\x00", b"1.2.840.10008.1.1\x00",
        b"\x00\x00\x00\x01\x02\x00\x00\x00\x30\x80",
        b"\x00\x00\x20\x01\x02\x00\x00\x00\x01\x00",
        b"\x00\x00\x00\x08\x02\x00\x00\x00\x01\x01",
        b"\x00\x00\x00\x09\x02\x00\x00\x00\x00\x00",
    ])
    assert len(data) == 12 + 66
    assert decode_command(data) == C_ECHO_RSP(AffectedSOPClassUID=VERIFICATION,
                                              MessageIDBeingRespondedTo=1,
                                              CommandDataSetType=NO_DATA_SET, Status=0)


def test_unknown_and_retired_elements_are_skipped():
    data = bytearray(encode_command(C_ECHO_RQ(AffectedSOPClassUID=VERIFICATION, MessageID=3)))
    data += b"\x00\x00\x00\x02\x02\x00\x00\x00AB"    # (0000,0200) Initiator, retired
    assert decode_command(bytes(data)) == C_ECHO_RQ(AffectedSOPClassUID=VERIFICATION,
                                                    MessageID=3)


# --- what is not a command set -----------------------------------------------------------------

def decode_or_error(data: bytes):
    try:
        return decode_command(data)
    except CommandDecodeError:
        return None


#: Random elements of group 0000 (known or not), so that decoding gets past the first tag.
random_command_sets = st.lists(
    st.tuples(st.sampled_from(sorted(COMMAND_ELEMENTS)) | st.integers(0, 0xFFFF),
              st.binary(max_size=20)),
    max_size=8,
).map(lambda els: b"".join(struct.pack("<HHI", 0, tag & 0xFFFF, len(v)) + v for tag, v in els))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=120) | random_command_sets)
def test_random_bytes_raise_only_command_decode_error(data):
    decode_or_error(data)


@st.composite
def mutated_commands(draw):
    return draw(s.mutated(encode_command(draw(s.messages))))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated_commands())
def test_mutated_command_sets_raise_only_command_decode_error(data):
    decode_or_error(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated_commands() | random_command_sets)
def test_what_decodes_re_encodes_to_the_same_message(data):
    message = decode_or_error(data)
    if message is not None:
        assert decode_command(encode_command(message)) == message


def test_non_ascii_uid_off_the_wire_can_be_echoed_back():
    """A command decoded from the wire can be encoded again (an SCP echoes its UIDs).

    ``decode_command`` reads text as latin-1 and ``encode_command`` writes ASCII,
    so a C-STORE-RQ whose Affected SOP Instance UID holds a byte above 7FH
    decodes, and the C-STORE-RSP that echoes the UID fails with
    UnicodeEncodeError. Either refuse the value on decoding
    (CommandDecodeError) or encode text as latin-1 too.
    """
    good = encode_command(C_STORE_RQ(AffectedSOPClassUID=CT_IMAGE_STORAGE, MessageID=1,
                                     AffectedSOPInstanceUID="1.2.3.4"))
    data = good.replace(b"1.2.3.4\x00", b"1.2.3.\xe9\x00")
    try:
        rq = decode_command(data)
    except CommandDecodeError:
        return
    rsp = C_STORE_RSP(AffectedSOPClassUID=rq.AffectedSOPClassUID,
                      MessageIDBeingRespondedTo=rq.MessageID,
                      AffectedSOPInstanceUID=rq.AffectedSOPInstanceUID)
    assert decode_command(encode_command(rsp)) == rsp


@pytest.mark.parametrize("data, words", [
    (b"\x00\x00\x00\x01\x02\x00\x00\x00\x99\x99", "unknown Command Field"),
    (b"\x00\x00\x10\x01\x02\x00\x00\x00\x01\x00", "missing"),
    (b"\x08\x00\x00\x01\x02\x00\x00\x00\x30\x00", "outside group 0000"),
    (b"\x00\x00\x00\x01\x09\x00\x00\x00\x30\x00", "exceeds"),
    (b"\x00\x00\x00\x01\x04\x00\x00\x00\x30\x00\x00\x00", "US of length 4"),
    (b"\x00\x00\x00\x01\x02\x00", "stray bytes"),
])
def test_decode_errors(data, words):
    with pytest.raises(CommandDecodeError, match=words):
        decode_command(data)


# --- MessageAssembler ------------------------------------------------------------------------------

def indications(context_id: int, is_command: bool, data: bytes, pdv_cuts: list[int],
                piece_cuts: list[int]):
    """P-DATA indications for ``data`` sent as PDVs cut at ``pdv_cuts``, each PDV then
    arriving in pieces cut at ``piece_cuts`` (offsets into the whole of ``data``).

    Each fragment is a memoryview of a scratch buffer that is overwritten after the
    call, as a receive buffer is: the assembler must copy what it keeps.
    """
    kind = MCH_COMMAND if is_command else 0
    bounds = [0, *pdv_cuts, len(data)]
    pdvs = list(zip(bounds, bounds[1:]))
    for n, (start, end) in enumerate(pdvs):
        mch = kind | (MCH_LAST if n == len(pdvs) - 1 else 0)
        inner = [c for c in piece_cuts if start < c < end]
        pieces = list(zip([start, *inner], [*inner, end]))
        for m, (a, b) in enumerate(pieces):
            yield context_id, mch, data[a:b], m == len(pieces) - 1


def feed_assembler(assembler, stream):
    """Feed (context, mch, bytes, complete) tuples; return the messages completed."""
    done = []
    for context_id, mch, piece, complete in stream:
        scratch = bytearray(piece)
        result = assembler.receive(PDataIndication(context_id, mch, memoryview(scratch),
                                                   complete))
        scratch[:] = b"\xEE" * len(scratch)           # the receive buffer is reused
        if result is not None:
            done.append(result)
    return done


@st.composite
def cuts(draw, length: int, max_cuts: int = 10):
    return draw(s.split_points(length, max_splits=max_cuts)) if length > 1 else []


@FAST
@given(message=s.messages_of(C_STORE_RQ, present=True), data_set=st.binary(min_size=1,
                                                                            max_size=600),
       context_id=st.integers(1, 255).filter(lambda n: n % 2), data=st.data())
def test_assembler_joins_a_command_and_data_set_from_many_fragments(message, data_set,
                                                                    context_id, data):
    message = C_STORE_RQ(**{**{n: getattr(message, n) for n in message.FIELD_ORDER},
                            "CommandDataSetType": 0x0000})
    command = encode_command(message)
    stream = [
        *indications(context_id, True, command, data.draw(cuts(len(command))),
                     data.draw(cuts(len(command)))),
        *indications(context_id, False, data_set, data.draw(cuts(len(data_set))),
                     data.draw(cuts(len(data_set)))),
    ]
    assembler = MessageAssembler()
    done = feed_assembler(assembler, stream)
    assert len(done) == 1
    assert done[0].context_id == context_id
    assert done[0].command == message
    assert done[0].data_set == data_set
    assert assembler.idle


@FAST
@given(data=st.data())
def test_assembler_message_without_data_set(data):
    message = C_ECHO_RQ(AffectedSOPClassUID=VERIFICATION, MessageID=data.draw(s.u16))
    command = encode_command(message)
    assembler = MessageAssembler()
    done = feed_assembler(assembler, indications(1, True, command,
                                                 data.draw(cuts(len(command))),
                                                 data.draw(cuts(len(command)))))
    assert [(m.context_id, m.command, m.data_set) for m in done] == [(1, message, None)]
    assert assembler.idle


def test_assembler_opens_the_sink_the_caller_chooses():
    opened = []

    class Sink:
        def __init__(self):
            self.parts = []

        def write(self, fragment):
            self.parts.append(bytes(fragment))

        def finish(self):
            return b"|".join(self.parts)

        def discard(self):
            self.parts = None

    def open_sink(context_id, command):
        opened.append((context_id, type(command).__name__))
        return Sink()

    command = encode_command(C_STORE_RQ(AffectedSOPClassUID=CT_IMAGE_STORAGE, MessageID=1,
                                        AffectedSOPInstanceUID="1.2.3"))
    assembler = MessageAssembler(open_sink)
    done = feed_assembler(assembler, [(3, 3, command, True), (3, 0, b"ab", True),
                                      (3, 2, b"cd", True)])
    assert opened == [(3, "C_STORE_RQ")]
    assert done[0].data_set == b"ab|cd"


def test_assembler_data_fragment_before_any_command():
    with pytest.raises(DIMSEProtocolError, match="before its command"):
        MessageAssembler().receive(PDataIndication(1, MCH_LAST, memoryview(b"data"), True))


def test_assembler_command_context_switch_mid_command():
    command = encode_command(C_ECHO_RQ(AffectedSOPClassUID=VERIFICATION, MessageID=1))
    assembler = MessageAssembler()
    assembler.receive(PDataIndication(1, MCH_COMMAND, memoryview(command[:10]), True))
    with pytest.raises(DIMSEProtocolError, match="context 3"):
        assembler.receive(PDataIndication(3, MCH_COMMAND | MCH_LAST,
                                          memoryview(command[10:]), True))


def test_assembler_data_set_on_another_context():
    command = encode_command(C_STORE_RQ(AffectedSOPClassUID=CT_IMAGE_STORAGE, MessageID=1))
    assembler = MessageAssembler()
    assert assembler.receive(PDataIndication(1, MCH_COMMAND | MCH_LAST, memoryview(command),
                                             True)) is None
    with pytest.raises(DIMSEProtocolError, match="context 3"):
        assembler.receive(PDataIndication(3, MCH_LAST, memoryview(b"ds"), True))


def test_assembler_command_while_data_set_expected():
    command = encode_command(C_STORE_RQ(AffectedSOPClassUID=CT_IMAGE_STORAGE, MessageID=1))
    assembler = MessageAssembler()
    assembler.receive(PDataIndication(1, MCH_COMMAND | MCH_LAST, memoryview(command), True))
    with pytest.raises(DIMSEProtocolError, match="data set was expected"):
        assembler.receive(PDataIndication(1, MCH_COMMAND | MCH_LAST, memoryview(command), True))


def test_assembler_oversized_command_set():
    assembler = MessageAssembler()
    chunk = memoryview(bytes(4096))
    with pytest.raises(DIMSEProtocolError, match="longer than"):
        for _ in range(MAX_COMMAND_SET_LENGTH // 4096 + 1):
            assembler.receive(PDataIndication(1, MCH_COMMAND, chunk, True))


def test_assembler_command_set_of_the_largest_length_is_taken():
    # Exactly MAX_COMMAND_SET_LENGTH bytes: a valid command and an unknown element.
    command = encode_command(C_ECHO_RQ(AffectedSOPClassUID=VERIFICATION, MessageID=1))
    filler = MAX_COMMAND_SET_LENGTH - len(command) - 8
    data = command + struct.pack("<HHI", 0, 0x7777, filler) + bytes(filler)
    assert len(data) == MAX_COMMAND_SET_LENGTH
    done = feed_assembler(MessageAssembler(), indications(1, True, data, [30000], []))
    assert done[0].command == C_ECHO_RQ(AffectedSOPClassUID=VERIFICATION, MessageID=1)


def test_assembler_invalid_command_set():
    with pytest.raises(DIMSEProtocolError, match="invalid command set"):
        MessageAssembler().receive(PDataIndication(1, MCH_COMMAND | MCH_LAST,
                                                   memoryview(b"\x01\x02"), True))


def test_assembler_abandon_discards_the_sink():
    discarded = []

    class Sink:
        def write(self, fragment):
            pass

        def finish(self):
            return None

        def discard(self):
            discarded.append(True)

    command = encode_command(C_STORE_RQ(AffectedSOPClassUID=CT_IMAGE_STORAGE, MessageID=1))
    assembler = MessageAssembler(lambda context_id, command: Sink())
    feed_assembler(assembler, [(1, 3, command, True), (1, 0, b"partial", True)])
    assert not assembler.idle
    assembler.abandon()
    assert discarded == [True] and assembler.idle


# --- through the Upper Layer: send_message_part -> bytes -> PDataIndication -> message -------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(max_length=st.sampled_from([0, 7, 16, 64, 1000]), data_set=st.binary(max_size=400),
       data=st.data())
def test_message_through_two_connections(max_length, data_set, data):
    """A C-STORE-RQ sent with the peer's Maximum Length arrives whole, however cut."""
    rq = A_ASSOCIATE_RQ("SCP", "SCU", (UserInformationItem((MaximumLengthSubItem(0),)),))
    ac = A_ASSOCIATE_AC("SCP", "SCU", (UserInformationItem((MaximumLengthSubItem(max_length),)),))
    requestor, acceptor = ULConnection(True), ULConnection(False)
    requestor.associate_request(AAssociateRequest(rq))
    requestor.transport_connected()
    acceptor.connection_made()
    acceptor.receive_data(rq.encode())
    acceptor.associate_response(AAssociateResponse(ac=ac))
    requestor.receive_data(ac.encode())
    requestor.take_outputs()
    acceptor.take_outputs()

    message = C_STORE_RQ(AffectedSOPClassUID=CT_IMAGE_STORAGE, MessageID=5,
                         AffectedSOPInstanceUID="1.2.3.4.5")
    requestor.send_message_part(1, True, encode_command(message))
    requestor.send_message_part(1, False, data_set)
    sends = requestor.take_outputs()
    assert all(type(out) is Send for out in sends)
    for out in sends:
        pdu_length = sum(len(b) for b in out.buffers) - 6
        assert max_length == 0 or pdu_length <= max(max_length, 7)
    wire = b"".join(bytes(b) for out in sends for b in out.buffers)

    assembler = MessageAssembler()
    done = []
    for chunk in s.cut(wire, data.draw(s.split_points(len(wire), max_splits=10))):
        acceptor.receive_data(chunk)
        for out in acceptor.take_outputs():
            assert type(out) is Deliver and type(out.primitive) is PDataIndication
            result = assembler.receive(out.primitive)
            if result is not None:
                done.append(result)
    assert [(m.command, m.data_set) for m in done] == [(message, data_set)]
