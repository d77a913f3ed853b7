"""PS3.7 §9.3, §10.3 and Annex E: DIMSE command sets, encoded by hand.

A command set is group 0000 only, always Implicit VR Little Endian (PS3.7
§6.3.1): tag (4 bytes), value length (4 bytes), value. It is small and on
every message, so it is decoded here with ``struct`` rather than by pydicom.

Each message is a frozen dataclass named as PS3.7 names it (``C_ECHO_RQ``),
whose fields are the PS3.7 keywords of its command fields, in the order of
its table; ``COMMAND_FIELD`` is its Command Field value (PS3.7 Annex E).
``encode_command(message)`` and ``decode_command(data)`` convert.

References
----------
PS3.7 §9.3 (DIMSE-C), §10.3 (DIMSE-N), Annex E (Command Dictionary, Table E.1-1).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields

#: Command Data Set Type (0000,0800) value meaning "no data set" (PS3.7 Annex E).
NO_DATA_SET = 0x0101
#: A value other than 0x0101 means a data set follows; 0x0000 is customary.
DATA_SET_PRESENT = 0x0000

# Priority (0000,0700), PS3.7 Annex E.
PRIORITY_MEDIUM, PRIORITY_HIGH, PRIORITY_LOW = 0x0000, 0x0001, 0x0002


class CommandDecodeError(Exception):
    """A command set that cannot be decoded; names the element that was wrong."""


# PS3.7 Table E.1-1: tag -> (keyword, VR). The VRs used in group 0000 are
# UL, US, UI, AE, AT and LO.
COMMAND_ELEMENTS = {
    0x00000000: ("CommandGroupLength", "UL"),
    0x00000002: ("AffectedSOPClassUID", "UI"),
    0x00000003: ("RequestedSOPClassUID", "UI"),
    0x00000100: ("CommandField", "US"),
    0x00000110: ("MessageID", "US"),
    0x00000120: ("MessageIDBeingRespondedTo", "US"),
    0x00000600: ("MoveDestination", "AE"),
    0x00000700: ("Priority", "US"),
    0x00000800: ("CommandDataSetType", "US"),
    0x00000900: ("Status", "US"),
    0x00000901: ("OffendingElement", "AT"),
    0x00000902: ("ErrorComment", "LO"),
    0x00000903: ("ErrorID", "US"),
    0x00001000: ("AffectedSOPInstanceUID", "UI"),
    0x00001001: ("RequestedSOPInstanceUID", "UI"),
    0x00001002: ("EventTypeID", "US"),
    0x00001005: ("AttributeIdentifierList", "AT"),
    0x00001008: ("ActionTypeID", "US"),
    0x00001020: ("NumberOfRemainingSuboperations", "US"),
    0x00001021: ("NumberOfCompletedSuboperations", "US"),
    0x00001022: ("NumberOfFailedSuboperations", "US"),
    0x00001023: ("NumberOfWarningSuboperations", "US"),
    0x00001030: ("MoveOriginatorApplicationEntityTitle", "AE"),
    0x00001031: ("MoveOriginatorMessageID", "US"),
}
TAGS = {keyword: (tag, vr) for tag, (keyword, vr) in COMMAND_ELEMENTS.items()}

_ELEMENT_HEADER = struct.Struct("<HHI")
_US = struct.Struct("<H")
_UL = struct.Struct("<I")


class Message:
    """What every DIMSE message shares; subclasses are frozen slotted dataclasses."""

    __slots__ = ()
    COMMAND_FIELD: int
    NAME: str

    @property
    def has_data_set(self) -> bool:
        return self.CommandDataSetType != NO_DATA_SET

    @property
    def is_response(self) -> bool:
        return bool(self.COMMAND_FIELD & 0x8000)


def _message(name: str, command_field: int):
    """Class decorator: a frozen, slotted dataclass registered under its Command Field."""

    def make(cls):
        cls.COMMAND_FIELD = command_field
        cls.NAME = name
        cls = dataclass(frozen=True, slots=True)(cls)
        cls.FIELD_ORDER = tuple(f.name for f in fields(cls))
        MESSAGES[command_field] = cls
        return cls

    return make


MESSAGES: dict[int, type] = {}

# Every field is optional at the codec level (None = absent); which are
# required is the service's business (PS3.7 tables: M, U, C).
# --- DIMSE-C (PS3.7 §9.3) ---------------------------------------------------------------


@_message("C-STORE-RQ", 0x0001)
class C_STORE_RQ(Message):
    """PS3.7 §9.3.1.1, Table 9.3-1."""
    AffectedSOPClassUID: str | None = None
    MessageID: int | None = None
    Priority: int | None = PRIORITY_MEDIUM
    CommandDataSetType: int | None = DATA_SET_PRESENT
    AffectedSOPInstanceUID: str | None = None
    MoveOriginatorApplicationEntityTitle: str | None = None
    MoveOriginatorMessageID: int | None = None


@_message("C-STORE-RSP", 0x8001)
class C_STORE_RSP(Message):
    """PS3.7 §9.3.1.2, Table 9.3-2."""
    AffectedSOPClassUID: str | None = None
    MessageIDBeingRespondedTo: int | None = None
    CommandDataSetType: int | None = NO_DATA_SET
    Status: int | None = 0x0000
    AffectedSOPInstanceUID: str | None = None
    OffendingElement: tuple[int, ...] | None = None
    ErrorComment: str | None = None


@_message("C-FIND-RQ", 0x0020)
class C_FIND_RQ(Message):
    """PS3.7 §9.3.2.1, Table 9.3-3."""
    AffectedSOPClassUID: str | None = None
    MessageID: int | None = None
    Priority: int | None = PRIORITY_MEDIUM
    CommandDataSetType: int | None = DATA_SET_PRESENT


@_message("C-FIND-RSP", 0x8020)
class C_FIND_RSP(Message):
    """PS3.7 §9.3.2.2, Table 9.3-4."""
    AffectedSOPClassUID: str | None = None
    MessageIDBeingRespondedTo: int | None = None
    CommandDataSetType: int | None = NO_DATA_SET
    Status: int | None = 0x0000
    OffendingElement: tuple[int, ...] | None = None
    ErrorComment: str | None = None


@_message("C-GET-RQ", 0x0010)
class C_GET_RQ(Message):
    """PS3.7 §9.3.3.1, Table 9.3-5."""
    AffectedSOPClassUID: str | None = None
    MessageID: int | None = None
    Priority: int | None = PRIORITY_MEDIUM
    CommandDataSetType: int | None = DATA_SET_PRESENT


@_message("C-GET-RSP", 0x8010)
class C_GET_RSP(Message):
    """PS3.7 §9.3.3.2, Table 9.3-6."""
    AffectedSOPClassUID: str | None = None
    MessageIDBeingRespondedTo: int | None = None
    CommandDataSetType: int | None = NO_DATA_SET
    Status: int | None = 0x0000
    NumberOfRemainingSuboperations: int | None = None
    NumberOfCompletedSuboperations: int | None = None
    NumberOfFailedSuboperations: int | None = None
    NumberOfWarningSuboperations: int | None = None
    OffendingElement: tuple[int, ...] | None = None
    ErrorComment: str | None = None


@_message("C-MOVE-RQ", 0x0021)
class C_MOVE_RQ(Message):
    """PS3.7 §9.3.4.1, Table 9.3-7."""
    AffectedSOPClassUID: str | None = None
    MessageID: int | None = None
    Priority: int | None = PRIORITY_MEDIUM
    CommandDataSetType: int | None = DATA_SET_PRESENT
    MoveDestination: str | None = None


@_message("C-MOVE-RSP", 0x8021)
class C_MOVE_RSP(Message):
    """PS3.7 §9.3.4.2, Table 9.3-8."""
    AffectedSOPClassUID: str | None = None
    MessageIDBeingRespondedTo: int | None = None
    CommandDataSetType: int | None = NO_DATA_SET
    Status: int | None = 0x0000
    NumberOfRemainingSuboperations: int | None = None
    NumberOfCompletedSuboperations: int | None = None
    NumberOfFailedSuboperations: int | None = None
    NumberOfWarningSuboperations: int | None = None
    OffendingElement: tuple[int, ...] | None = None
    ErrorComment: str | None = None


@_message("C-ECHO-RQ", 0x0030)
class C_ECHO_RQ(Message):
    """PS3.7 §9.3.5.1, Table 9.3-12."""
    AffectedSOPClassUID: str | None = None
    MessageID: int | None = None
    CommandDataSetType: int | None = NO_DATA_SET


@_message("C-ECHO-RSP", 0x8030)
class C_ECHO_RSP(Message):
    """PS3.7 §9.3.5.2, Table 9.3-13."""
    AffectedSOPClassUID: str | None = None
    MessageIDBeingRespondedTo: int | None = None
    CommandDataSetType: int | None = NO_DATA_SET
    Status: int | None = 0x0000
    ErrorComment: str | None = None


@_message("C-CANCEL-RQ", 0x0FFF)
class C_CANCEL_RQ(Message):
    """PS3.7 §9.3.2.3 (C-FIND), §9.3.3.3, §9.3.4.3: the cancel request."""
    MessageIDBeingRespondedTo: int | None = None
    CommandDataSetType: int | None = NO_DATA_SET


# --- DIMSE-N (PS3.7 §10.3) ---------------------------------------------------------------

@_message("N-EVENT-REPORT-RQ", 0x0100)
class N_EVENT_REPORT_RQ(Message):
    """PS3.7 §10.3.1.1, Table 10.3-1."""
    AffectedSOPClassUID: str | None = None
    MessageID: int | None = None
    CommandDataSetType: int | None = DATA_SET_PRESENT
    AffectedSOPInstanceUID: str | None = None
    EventTypeID: int | None = None


@_message("N-EVENT-REPORT-RSP", 0x8100)
class N_EVENT_REPORT_RSP(Message):
    """PS3.7 §10.3.1.2, Table 10.3-2."""
    AffectedSOPClassUID: str | None = None
    MessageIDBeingRespondedTo: int | None = None
    CommandDataSetType: int | None = NO_DATA_SET
    Status: int | None = 0x0000
    AffectedSOPInstanceUID: str | None = None
    EventTypeID: int | None = None
    ErrorComment: str | None = None
    ErrorID: int | None = None


@_message("N-GET-RQ", 0x0110)
class N_GET_RQ(Message):
    """PS3.7 §10.3.2.1, Table 10.3-3."""
    RequestedSOPClassUID: str | None = None
    MessageID: int | None = None
    CommandDataSetType: int | None = NO_DATA_SET
    RequestedSOPInstanceUID: str | None = None
    AttributeIdentifierList: tuple[int, ...] | None = None


@_message("N-GET-RSP", 0x8110)
class N_GET_RSP(Message):
    """PS3.7 §10.3.2.2, Table 10.3-4."""
    AffectedSOPClassUID: str | None = None
    MessageIDBeingRespondedTo: int | None = None
    CommandDataSetType: int | None = NO_DATA_SET
    Status: int | None = 0x0000
    AffectedSOPInstanceUID: str | None = None
    ErrorComment: str | None = None
    ErrorID: int | None = None


@_message("N-SET-RQ", 0x0120)
class N_SET_RQ(Message):
    """PS3.7 §10.3.3.1, Table 10.3-5."""
    RequestedSOPClassUID: str | None = None
    MessageID: int | None = None
    CommandDataSetType: int | None = DATA_SET_PRESENT
    RequestedSOPInstanceUID: str | None = None


@_message("N-SET-RSP", 0x8120)
class N_SET_RSP(Message):
    """PS3.7 §10.3.3.2, Table 10.3-6."""
    AffectedSOPClassUID: str | None = None
    MessageIDBeingRespondedTo: int | None = None
    CommandDataSetType: int | None = NO_DATA_SET
    Status: int | None = 0x0000
    AffectedSOPInstanceUID: str | None = None
    OffendingElement: tuple[int, ...] | None = None
    ErrorComment: str | None = None
    ErrorID: int | None = None


@_message("N-ACTION-RQ", 0x0130)
class N_ACTION_RQ(Message):
    """PS3.7 §10.3.4.1, Table 10.3-7."""
    RequestedSOPClassUID: str | None = None
    MessageID: int | None = None
    CommandDataSetType: int | None = DATA_SET_PRESENT
    RequestedSOPInstanceUID: str | None = None
    ActionTypeID: int | None = None


@_message("N-ACTION-RSP", 0x8130)
class N_ACTION_RSP(Message):
    """PS3.7 §10.3.4.2, Table 10.3-8."""
    AffectedSOPClassUID: str | None = None
    MessageIDBeingRespondedTo: int | None = None
    CommandDataSetType: int | None = NO_DATA_SET
    Status: int | None = 0x0000
    AffectedSOPInstanceUID: str | None = None
    ActionTypeID: int | None = None
    ErrorComment: str | None = None
    ErrorID: int | None = None


@_message("N-CREATE-RQ", 0x0140)
class N_CREATE_RQ(Message):
    """PS3.7 §10.3.5.1, Table 10.3-9."""
    AffectedSOPClassUID: str | None = None
    MessageID: int | None = None
    CommandDataSetType: int | None = DATA_SET_PRESENT
    AffectedSOPInstanceUID: str | None = None


@_message("N-CREATE-RSP", 0x8140)
class N_CREATE_RSP(Message):
    """PS3.7 §10.3.5.2, Table 10.3-10."""
    AffectedSOPClassUID: str | None = None
    MessageIDBeingRespondedTo: int | None = None
    CommandDataSetType: int | None = NO_DATA_SET
    Status: int | None = 0x0000
    AffectedSOPInstanceUID: str | None = None
    ErrorComment: str | None = None
    ErrorID: int | None = None


@_message("N-DELETE-RQ", 0x0150)
class N_DELETE_RQ(Message):
    """PS3.7 §10.3.6.1, Table 10.3-11."""
    RequestedSOPClassUID: str | None = None
    MessageID: int | None = None
    CommandDataSetType: int | None = NO_DATA_SET
    RequestedSOPInstanceUID: str | None = None


@_message("N-DELETE-RSP", 0x8150)
class N_DELETE_RSP(Message):
    """PS3.7 §10.3.6.2, Table 10.3-12."""
    AffectedSOPClassUID: str | None = None
    MessageIDBeingRespondedTo: int | None = None
    CommandDataSetType: int | None = NO_DATA_SET
    Status: int | None = 0x0000
    AffectedSOPInstanceUID: str | None = None
    ErrorComment: str | None = None
    ErrorID: int | None = None


# --- the codec ---------------------------------------------------------------------------

def _encode_value(vr: str, value) -> bytes:
    if vr == "US":
        return _US.pack(value)
    if vr == "UL":
        return _UL.pack(value)
    if vr == "AT":
        return b"".join(struct.pack("<HH", tag >> 16, tag & 0xFFFF) for tag in value)
    # Latin-1, as decoded: a value that came off the wire can always be echoed back.
    data = value.encode("latin-1")
    if len(data) & 1:
        data += b"\x00" if vr == "UI" else b" "
    return data


def encode_command(message: Message) -> bytes:
    """The command set of ``message``: its elements in tag order, then the group length.

    PS3.7 §6.3.1: Implicit VR Little Endian; (0000,0000) Command Group Length
    counts the bytes after it.
    """
    parts = []
    for tag, name, vr in _ENCODING_ORDER[type(message)]:
        value = message.COMMAND_FIELD if name is None else getattr(message, name)
        if value is None:
            continue
        data = _encode_value(vr, value)
        parts.append(_ELEMENT_HEADER.pack(0x0000, tag, len(data)))
        parts.append(data)
    body = b"".join(parts)
    return _ELEMENT_HEADER.pack(0, 0, 4) + _UL.pack(len(body)) + body


#: Per message class: (element, field name, VR) of its elements in tag order, Command
#: Field (0000,0100) among them with name None (it is the class, not a field).
_ENCODING_ORDER = {
    cls: sorted([(TAGS[name][0] & 0xFFFF, name, TAGS[name][1]) for name in cls.FIELD_ORDER]
                + [(0x0100, None, "US")], key=lambda element: element[0])
    for cls in MESSAGES.values()}


def decode_command(data) -> Message:
    """Decode a whole command set into its message class.

    Elements of group 0000 not in PS3.7 Table E.1-1 (and retired ones) are
    skipped; an unknown Command Field, a missing one, a length that runs past
    the end, or an element outside group 0000 raise ``CommandDecodeError``.
    """
    view = memoryview(data)
    end = len(view)
    offset = 0
    values: dict[str, object] = {}
    unpack_header = _ELEMENT_HEADER.unpack_from
    while offset < end:
        if end - offset < 8:
            raise CommandDecodeError(f"{end - offset} stray bytes at the end of the command set")
        group, element, length = unpack_header(view, offset)
        offset += 8
        if group != 0x0000:
            raise CommandDecodeError(f"element ({group:04X},{element:04X}) outside group 0000")
        if length > end - offset:
            raise CommandDecodeError(f"(0000,{element:04X}) length {length} exceeds the "
                                     f"{end - offset} bytes left")
        known = COMMAND_ELEMENTS.get(element)
        if known is not None:
            name, vr = known
            values[name] = _decode_value(vr, view[offset:offset + length], element)
        offset += length
    command_field = values.pop("CommandField", None)
    values.pop("CommandGroupLength", None)
    cls = MESSAGES.get(command_field)
    if cls is None:
        raise CommandDecodeError("Command Field (0000,0100) missing" if command_field is None
                                 else f"unknown Command Field 0x{command_field:04X}")
    for name in _REQUIRED[cls]:
        if values.get(name) is None:
            raise CommandDecodeError(f"{cls.NAME}: {name} ({_TAG_TEXT[name]}) missing")
    # Absent fields are None, never the class defaults (a response without a
    # Status must not read as Success).
    return cls(**{name: values.get(name) for name in cls.FIELD_ORDER})


_TAG_TEXT = {keyword: f"0000,{tag & 0xFFFF:04X}" for keyword, (tag, _) in TAGS.items()}


def _required(cls) -> tuple[str, ...]:
    """PS3.7 §9.3 / §10.3: the fields without which nobody can answer or act.

    Every message has Command Data Set Type; a response has the Message ID it
    answers and a Status; a request (C-CANCEL aside) has a Message ID.
    """
    names = ["CommandDataSetType"]
    if cls.COMMAND_FIELD & 0x8000:
        names += ["MessageIDBeingRespondedTo", "Status"]
    elif cls.COMMAND_FIELD == 0x0FFF:
        names += ["MessageIDBeingRespondedTo"]
    else:
        names += ["MessageID"]
    return tuple(names)


_REQUIRED = {cls: _required(cls) for cls in MESSAGES.values()}


def _decode_value(vr: str, value: memoryview, element: int):
    if vr == "US":
        if len(value) != 2:
            raise CommandDecodeError(f"(0000,{element:04X}) US of length {len(value)}")
        return _US.unpack_from(value)[0]
    if vr == "UL":
        if len(value) != 4:
            raise CommandDecodeError(f"(0000,{element:04X}) UL of length {len(value)}")
        return _UL.unpack_from(value)[0]
    if vr == "AT":
        if len(value) % 4:
            raise CommandDecodeError(f"(0000,{element:04X}) AT of length {len(value)}")
        pairs = struct.unpack_from(f"<{len(value) // 2}H", value)
        return tuple((pairs[i] << 16) | pairs[i + 1] for i in range(0, len(pairs), 2))
    text = bytes(value).decode("latin-1")
    return text.rstrip("\x00 ") if vr == "UI" else text.strip(" \x00")
