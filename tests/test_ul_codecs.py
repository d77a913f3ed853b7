"""PS3.8 §9.3: the PDU and item codecs and the streaming PDU reader.

- every PDU and item survives ``decode(encode(x)) == x``;
- bytes that are not a PDU (random, or a valid PDU mutated) raise only
  ``PDUDecodeError``, and what does decode re-encodes to the same PDU;
- hand-written byte strings, laid out field by field from PS3.8 Tables 9-11
  to 9-26, pin the codec to the standard and not only to itself;
- ``PDUReader`` gives the same PDUs and PDV values however the stream is cut,
  and names the field and the A-ABORT reason of what it refuses.

References
----------
PS3.8 §9.3.1-§9.3.8, Tables 9-11 to 9-26; Annex D; Annex E.2.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import strategies as s
from dicomagent.ul.codes import AbortReason, PDUDecodeError
from dicomagent.ul.items import (ApplicationContextItem, MaximumLengthSubItem,
                                 PresentationContextItemAC, PresentationContextItemRQ,
                                 UnknownItem, UserInformationItem)
from dicomagent.ul.pdu import (A_ABORT, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ,
                               A_RELEASE_RP, A_RELEASE_RQ, MAX_CONTROL_PDU_LENGTH, P_DATA_TF,
                               PresentationDataValueItem, decode_pdu, p_data_tf_header)
from dicomagent.ul.stream import PDUReader

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


def encode_item(item) -> bytes:
    buf = bytearray(item.nbytes)
    end = item.encode_into(buf, 0)
    assert end == item.nbytes
    return bytes(buf)


def decode_item(cls, data: bytes):
    """Decode an item the way its container does: type and length from the header."""
    view = memoryview(data)
    assert int.from_bytes(data[2:4], "big") == len(data) - 4, "Item-length"
    if cls is UnknownItem:
        return UnknownItem.decode(data[0], view[4:])
    assert data[0] == cls.ITEM_TYPE, "Item-type"
    return cls.decode(view[4:])


# --- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("pdu_class", list(s.PDU_STRATEGIES), ids=lambda c: c.__name__)
@FAST
@given(data=st.data())
def test_pdu_round_trip(pdu_class, data):
    pdu = data.draw(s.PDU_STRATEGIES[pdu_class])
    encoded = pdu.encode()
    assert len(encoded) == pdu.nbytes
    assert encoded[0] == pdu_class.PDU_TYPE
    assert int.from_bytes(encoded[2:6], "big") == len(encoded) - 6   # PDU-length
    decoded = decode_pdu(encoded)
    assert type(decoded) is pdu_class
    assert decoded == pdu


@FAST
@given(pdu=s.pdus, prefix=st.integers(0, 16))
def test_pdu_encode_into_writes_only_its_own_bytes(pdu, prefix):
    buf = bytearray(b"\xAA" * (prefix + pdu.nbytes + 3))
    end = pdu.encode_into(buf, prefix)
    assert end == prefix + pdu.nbytes
    assert buf[:prefix] == b"\xAA" * prefix and buf[end:] == b"\xAA" * 3
    assert bytes(buf[prefix:end]) == pdu.encode()


@pytest.mark.parametrize("item_class", [*s.ITEM_STRATEGIES, UnknownItem],
                         ids=lambda c: c.__name__)
@FAST
@given(data=st.data())
def test_item_round_trip(item_class, data):
    strategy = s.ITEM_STRATEGIES[item_class] if item_class in s.ITEM_STRATEGIES else s.unknown_items({})
    item = data.draw(strategy)
    encoded = encode_item(item)
    assert decode_item(item_class, encoded) == item


@FAST
@given(item=s.items, prefix=st.integers(0, 16))
def test_item_encode_into_at_an_offset(item, prefix):
    buf = bytearray(b"\x55" * (prefix + item.nbytes + 2))
    end = item.encode_into(buf, prefix)
    assert end == prefix + item.nbytes
    assert buf[:prefix] == b"\x55" * prefix and buf[end:] == b"\x55\x55"
    assert bytes(buf[prefix:end]) == encode_item(item)


def test_item_of_the_largest_length_round_trips():
    # Item-length is 2 bytes (PS3.8 §9.3.2): 65535 is the largest value.
    item = ApplicationContextItem("1" * 0xFFFF)
    encoded = encode_item(item)
    assert encoded[:4] == b"\x10\x00\xFF\xFF"
    assert decode_item(ApplicationContextItem, encoded) == item


def test_unknown_items_are_kept_in_a_pdu():
    rq = A_ASSOCIATE_RQ("SCP", "SCU", (UnknownItem(0x77, b"\x01\x02"),
                                       UserInformationItem((UnknownItem(0x5F, b"x"),))))
    assert decode_pdu(rq.encode()) == rq


# --- what is not a PDU ------------------------------------------------------------------------

def decode_or_error(data: bytes):
    """decode_pdu, where anything but a PDU or a PDUDecodeError fails the test."""
    try:
        return decode_pdu(data)
    except PDUDecodeError as error:
        assert isinstance(error.field, str) and error.field
        assert isinstance(error.reason, AbortReason)
        return None


#: Bytes that start like one of the seven PDUs (or an eighth) with a plausible length.
plausible_pdus = st.builds(
    lambda pdu_type, body, lie: bytes([pdu_type, 0])
    + (len(body) if lie is None else lie).to_bytes(4, "big") + body,
    st.integers(0, 9), st.binary(max_size=120), st.none() | st.integers(0, 200))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200) | plausible_pdus)
def test_random_bytes_raise_only_pdu_decode_error(data):
    decode_or_error(data)


@st.composite
def mutated_pdus(draw):
    return draw(s.mutated(draw(s.pdus).encode()))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated_pdus())
def test_mutated_pdus_raise_only_pdu_decode_error(data):
    decode_or_error(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated_pdus())
def test_what_decodes_re_encodes_to_the_same_pdu(data):
    """decode -> encode -> decode agrees (the fuzzers' invariant, in the test suite)."""
    pdu = decode_or_error(data)
    if pdu is not None:
        assert decode_pdu(pdu.encode()) == pdu


@pytest.mark.parametrize("pdu_class", [A_ASSOCIATE_RQ, A_ASSOCIATE_AC], ids=lambda c: c.__name__)
def test_blank_ae_title_decodes_to_something_that_encodes(pdu_class):
    """A blank Called-AE-title off the wire must not give a PDU that cannot be sent.

    PS3.8 Table 9-11 says 16 spaces "shall not be used" in an A-ASSOCIATE-RQ,
    and Table 9-17 says the A-ASSOCIATE-AC echoes the RQ's value and is not
    tested on receipt. An acceptor builds its A-ASSOCIATE-AC from the RQ
    (``negotiate`` copies ``rq.called_ae_title``), so what decodes must encode.
    Either answer is consistent: refuse it on decoding (PDUDecodeError), or
    keep it and encode it back (what the codec does).
    """
    data = bytearray(pdu_class("ANY-SCP", "ECHOSCU").encode())
    data[10:26] = b" " * 16                   # bytes 11-26: Called-AE-title
    try:
        pdu = decode_pdu(bytes(data))
    except PDUDecodeError as error:
        assert error.field == "Called-AE-title"
        return
    assert decode_pdu(pdu.encode()) == pdu


# --- the bytes of the standard ------------------------------------------------------------------

def test_a_associate_rj_bytes():
    # PS3.8 Table 9-21: rejected-permanent (1), service-user (1), called-AE-title-not-recognized (7).
    expected = bytes([
        0x03,                       # 1     PDU-type 03H
        0x00,                       # 2     Reserved
        0x00, 0x00, 0x00, 0x04,     # 3-6   PDU-length
        0x00,                       # 7     Reserved
        0x01,                       # 8     Result
        0x01,                       # 9     Source
        0x07,                       # 10    Reason/Diag.
    ])
    rj = A_ASSOCIATE_RJ(1, 1, 7)
    assert rj.encode() == expected
    assert decode_pdu(expected) == rj


def test_a_abort_bytes():
    # PS3.8 Table 9-26: service-provider (2), invalid-PDU-parameter value (6).
    expected = bytes([
        0x07,                       # 1     PDU-type 07H
        0x00,                       # 2     Reserved
        0x00, 0x00, 0x00, 0x04,     # 3-6   PDU-length
        0x00,                       # 7     Reserved
        0x00,                       # 8     Reserved
        0x02,                       # 9     Source
        0x06,                       # 10    Reason/Diag.
    ])
    abort = A_ABORT(2, 6)
    assert abort.encode() == expected
    assert decode_pdu(expected) == abort


def test_a_release_bytes():
    # PS3.8 Tables 9-24 and 9-25: type, reserved, length 4, four reserved bytes.
    assert A_RELEASE_RQ().encode() == b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
    assert A_RELEASE_RP().encode() == b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
    # Reserved fields are not tested on receipt (PS3.8 §9.3.1).
    assert decode_pdu(b"\x05\xFF\x00\x00\x00\x04\xFF\xFF\xFF\xFF") == A_RELEASE_RQ()


VERIFICATION = b"1.2.840.10008.1.1"              # 17 bytes
IMPLICIT_VR_LE = b"1.2.840.10008.1.2"            # 17 bytes
DICOM_APP_CONTEXT = b"1.2.840.10008.3.1.1.1"     # 21 bytes

#: A minimal A-ASSOCIATE-RQ, laid out from PS3.8 Tables 9-11, 9-12, 9-13, 9-14,
#: 9-15, 9-16 and D.1-1, as echoscu sends it (less its implementation sub-items).
MINIMAL_RQ_BYTES = b"".join([
    b"\x01",                                  # 1       PDU-type 01H
    b"\x00",                                  # 2       Reserved
    (155).to_bytes(4, "big"),                 # 3-6     PDU-length
    b"\x00\x01",                              # 7-8     Protocol-version: bit 0
    b"\x00\x00",                              # 9-10    Reserved
    b"ANY-SCP         ",                      # 11-26   Called-AE-title, space padded
    b"ECHOSCU         ",                      # 27-42   Calling-AE-title
    bytes(32),                                # 43-74   Reserved
    # Application Context Item (Table 9-12)
    b"\x10\x00", (21).to_bytes(2, "big"), DICOM_APP_CONTEXT,
    # Presentation Context Item (Table 9-13): ID 1, three reserved bytes
    b"\x20\x00", (46).to_bytes(2, "big"), b"\x01\x00\x00\x00",
    b"\x30\x00", (17).to_bytes(2, "big"), VERIFICATION,        # Abstract Syntax (9-14)
    b"\x40\x00", (17).to_bytes(2, "big"), IMPLICIT_VR_LE,      # Transfer Syntax (9-15)
    # User Information Item (Table 9-16) holding a Maximum Length Sub-Item (D.1-1)
    b"\x50\x00", (8).to_bytes(2, "big"),
    b"\x51\x00", (4).to_bytes(2, "big"), (16384).to_bytes(4, "big"),
])

MINIMAL_RQ = A_ASSOCIATE_RQ(
    "ANY-SCP", "ECHOSCU",
    (ApplicationContextItem(DICOM_APP_CONTEXT.decode()),
     PresentationContextItemRQ(1, VERIFICATION.decode(), (IMPLICIT_VR_LE.decode(),)),
     UserInformationItem((MaximumLengthSubItem(16384),))))


def test_minimal_a_associate_rq_bytes():
    assert len(MINIMAL_RQ_BYTES) == 6 + 155          # the test's own arithmetic
    assert MINIMAL_RQ.encode() == MINIMAL_RQ_BYTES
    rq = decode_pdu(MINIMAL_RQ_BYTES)
    assert rq == MINIMAL_RQ
    assert rq.application_context_name == DICOM_APP_CONTEXT.decode()
    assert rq.presentation_contexts[0].transfer_syntaxes == (IMPLICIT_VR_LE.decode(),)
    assert rq.user_information.maximum_length_received == 16384


def test_minimal_a_associate_ac_bytes():
    expected = b"".join([
        b"\x02\x00", (134).to_bytes(4, "big"), b"\x00\x01\x00\x00",
        b"ANY-SCP         ", b"ECHOSCU         ", bytes(32),
        b"\x10\x00", (21).to_bytes(2, "big"), DICOM_APP_CONTEXT,
        # Presentation Context Item AC (Table 9-18): ID 1, reserved, result 0, reserved
        b"\x21\x00", (25).to_bytes(2, "big"), b"\x01\x00\x00\x00",
        b"\x40\x00", (17).to_bytes(2, "big"), IMPLICIT_VR_LE,
        b"\x50\x00", (8).to_bytes(2, "big"),
        b"\x51\x00", (4).to_bytes(2, "big"), (0).to_bytes(4, "big"),
    ])
    assert len(expected) == 6 + 134
    ac = A_ASSOCIATE_AC("ANY-SCP", "ECHOSCU", (
        ApplicationContextItem(DICOM_APP_CONTEXT.decode()),
        PresentationContextItemAC(1, 0, IMPLICIT_VR_LE.decode()),
        UserInformationItem((MaximumLengthSubItem(0),))))
    assert ac.encode() == expected
    assert decode_pdu(expected) == ac


def test_ae_title_spaces_are_not_significant():
    data = bytearray(MINIMAL_RQ_BYTES)
    data[10:26] = b"  ANY-SCP       "            # leading spaces (PS3.8 Table 9-11)
    assert decode_pdu(bytes(data)).called_ae_title == "ANY-SCP"


def test_padded_uid_is_read_without_its_padding():
    # Interpretation in items.decode_text: trailing NUL or space padding is removed.
    data = MINIMAL_RQ_BYTES.replace(b"\x10\x00\x00\x15" + DICOM_APP_CONTEXT,
                                    b"\x10\x00\x00\x16" + DICOM_APP_CONTEXT + b"\x00")
    data = bytearray(data)
    data[2:6] = (len(data) - 6).to_bytes(4, "big")
    assert decode_pdu(bytes(data)).application_context_name == DICOM_APP_CONTEXT.decode()


def test_p_data_tf_bytes():
    # PS3.8 Table 9-22 and 9-23, Annex E.2: one PDV, last fragment of a command.
    expected = b"".join([
        b"\x04\x00", (12).to_bytes(4, "big"),       # PDU-type 04H, Reserved, PDU-length
        (8).to_bytes(4, "big"),                      # Item-length
        b"\x01",                                     # Presentation-context-ID
        b"\x03",                                     # Message Control Header: command, last
        b"ABCDEF",                                   # the fragment
    ])
    pdu = P_DATA_TF((PresentationDataValueItem(1, 3, b"ABCDEF"),))
    assert pdu.encode() == expected
    assert decode_pdu(expected) == pdu
    assert p_data_tf_header(1, 3, 6) + b"ABCDEF" == expected


@pytest.mark.parametrize("data, field, reason", [
    (b"\x08\x00\x00\x00\x00\x04\x00\x00\x00\x00", "PDU-type", AbortReason.UNRECOGNIZED_PDU),
    (b"\x05\x00\x00\x00\x00\x05\x00\x00\x00\x00\x00", "PDU-length",
     AbortReason.INVALID_PDU_PARAMETER_VALUE),
    (b"\x05\x00\x00\x00\x00\x04\x00\x00\x00", "PDU-length",
     AbortReason.INVALID_PDU_PARAMETER_VALUE),
    (b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x09\x01\x03", "Item-length",
     AbortReason.INVALID_PDU_PARAMETER_VALUE),
    (b"\x04\x00\x00\x00\x00\x00", "PDU-length", AbortReason.INVALID_PDU_PARAMETER_VALUE),
])
def test_decode_errors_name_the_field(data, field, reason):
    with pytest.raises(PDUDecodeError) as caught:
        decode_pdu(data)
    assert caught.value.field == field
    assert caught.value.reason == reason


# --- the streaming reader ---------------------------------------------------------------------

class Recorder:
    """A PDUReader owner that writes down each callback (copying each view at once)."""

    def __init__(self):
        self.calls = []

    def on_pdu(self, pdu):
        self.calls.append(("pdu", pdu))

    def on_p_data_tf(self):
        self.calls.append(("p-data-tf",))

    def on_pdv(self, context_id, message_control_header, fragment, pdv_complete):
        assert isinstance(fragment, memoryview)
        self.calls.append(("pdv", context_id, message_control_header, bytes(fragment),
                           pdv_complete))

    def normalised(self):
        """The calls with each PDV's pieces joined: what must not depend on the cuts."""
        out = []
        pending = None
        for call in self.calls:
            if call[0] != "pdv":
                assert pending is None, "a PDV was interrupted"
                out.append(call)
                continue
            _, cid, mch, piece, complete = call
            if pending is None:
                pending = [cid, mch, b""]
            assert (cid, mch) == tuple(pending[:2]), "a PDV changed context or header"
            pending[2] += piece
            if complete:
                out.append(("pdv", *pending))
                pending = None
        assert pending is None, "a PDV was left incomplete"
        return out


def expected_calls(pdus):
    out = []
    for pdu in pdus:
        if type(pdu) is P_DATA_TF:
            out.append(("p-data-tf",))
            out.extend(("pdv", pdv.context_id, pdv.message_control_header, pdv.data)
                       for pdv in pdu.pdvs)
        else:
            out.append(("pdu", pdu))
    return out


def feed(chunks):
    owner = Recorder()
    reader = PDUReader(owner)
    for chunk in chunks:
        reader.feed(chunk)
    return owner, reader


@st.composite
def streams(draw):
    pdus = draw(st.lists(s.pdus, min_size=1, max_size=5))
    stream = b"".join(pdu.encode() for pdu in pdus)
    return pdus, stream, draw(s.split_points(len(stream), max_splits=12))


@FAST
@given(streams())
def test_reader_gives_the_same_pdus_however_the_stream_is_cut(case):
    pdus, stream, points = case
    whole, whole_reader = feed([stream])
    split, split_reader = feed(s.cut(stream, points))
    assert whole.normalised() == expected_calls(pdus)
    assert split.normalised() == whole.normalised()
    assert whole_reader.idle and split_reader.idle


@QUICK
@given(streams())
def test_reader_byte_by_byte(case):
    pdus, stream, _ = case
    owner, reader = feed([stream[i:i + 1] for i in range(len(stream))])
    assert owner.normalised() == expected_calls(pdus)
    assert reader.idle


@FAST
@given(case=streams(), junk=st.binary(min_size=1, max_size=40))
def test_reader_errors_do_not_depend_on_the_cuts(case, junk):
    pdus, stream, points = case
    stream = stream + junk
    outcomes = []
    for chunks in ([stream], s.cut(stream, points)):
        owner = Recorder()
        reader = PDUReader(owner)
        try:
            for chunk in chunks:
                reader.feed(chunk)
            outcomes.append(("ok", owner.normalised() if reader.idle else None))
        except PDUDecodeError as error:
            assert reader.failed
            outcomes.append(("error", error.field, error.reason))
    assert outcomes[0] == outcomes[1]


def test_reader_delivers_pdv_pieces_as_they_arrive():
    pdu = P_DATA_TF((PresentationDataValueItem(3, 0, b"0123456789"),)).encode()
    owner, reader = feed([pdu[:15], pdu[15:]])
    assert owner.calls == [("p-data-tf",), ("pdv", 3, 0, b"012", False),
                           ("pdv", 3, 0, b"3456789", True)]


def test_reader_empty_pdv_is_delivered_complete():
    pdu = P_DATA_TF((PresentationDataValueItem(1, 2, b""),
                     PresentationDataValueItem(1, 3, b"x"))).encode()
    owner, _ = feed([pdu])
    assert owner.calls == [("p-data-tf",), ("pdv", 1, 2, b"", True), ("pdv", 1, 3, b"x", True)]


def reader_error(chunks) -> PDUDecodeError:
    owner = Recorder()
    reader = PDUReader(owner)
    with pytest.raises(PDUDecodeError) as caught:
        for chunk in chunks:
            reader.feed(chunk)
    assert reader.failed
    reader.feed(A_RELEASE_RQ().encode())          # a failed reader reads nothing more
    assert owner.calls[-1:] != [("pdu", A_RELEASE_RQ())]
    return caught.value


def test_reader_lying_pdv_item_length():
    # PDU-length 12 holds one PDV item of 6 + 2 bytes; the item says 100.
    data = b"\x04\x00" + (12).to_bytes(4, "big") + (100).to_bytes(4, "big") + b"\x01\x03AB"
    error = reader_error([data + b"CDEF" * 30])
    assert error.field == "Item-length"
    assert error.reason is AbortReason.INVALID_PDU_PARAMETER_VALUE


def test_reader_pdv_item_length_below_two():
    data = b"\x04\x00" + (6).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\x01\x03"
    error = reader_error([data])
    assert (error.field, error.reason) == ("Item-length", AbortReason.INVALID_PDU_PARAMETER_VALUE)


def test_reader_p_data_tf_without_a_pdv_item():
    error = reader_error([b"\x04\x00\x00\x00\x00\x03\x00\x00\x00"])
    assert (error.field, error.reason) == ("PDU-length", AbortReason.INVALID_PDU_PARAMETER_VALUE)


@pytest.mark.parametrize("pdu_type", [0x00, 0x08, 0x10, 0xFF])
def test_reader_unknown_pdu_type(pdu_type):
    error = reader_error([bytes([pdu_type, 0, 0, 0, 0, 4]), b"\x00" * 4])
    assert error.field == "PDU-type"
    assert error.reason is AbortReason.UNRECOGNIZED_PDU


def test_reader_oversized_control_pdu_is_refused_on_its_header():
    header = b"\x01\x00" + (MAX_CONTROL_PDU_LENGTH + 1).to_bytes(4, "big")
    error = reader_error([header])                     # nothing of the body is needed
    assert error.field == "PDU-length"
    assert error.reason is AbortReason.INVALID_PDU_PARAMETER_VALUE


def test_reader_waits_for_a_control_pdu_of_the_largest_length():
    owner, reader = feed([b"\x01\x00" + MAX_CONTROL_PDU_LENGTH.to_bytes(4, "big")])
    assert not reader.failed and not reader.idle and owner.calls == []


def test_reader_control_pdu_with_a_wrong_length():
    # An A-RELEASE-RQ is 4 bytes after its header (PS3.8 Table 9-24).
    error = reader_error([b"\x05\x00\x00\x00\x00\x06" + bytes(6)])
    assert (error.field, error.reason) == ("PDU-length", AbortReason.INVALID_PDU_PARAMETER_VALUE)


def test_reader_item_error_inside_an_associate_rq():
    data = bytearray(MINIMAL_RQ_BYTES)
    data[76:78] = (200).to_bytes(2, "big")      # Application Context Item-length lies
    error = reader_error([bytes(data)])
    assert error.reason is AbortReason.INVALID_PDU_PARAMETER_VALUE
