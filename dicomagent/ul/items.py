"""PS3.8 §9.3.2–9.3.3 and PS3.7 Annex D.3.3: the items and sub-items of the
A-ASSOCIATE-RQ and A-ASSOCIATE-AC PDUs.

Every item starts with the same four bytes (PS3.8 §9.3.2)::

    1       Item-type
    2       Reserved
    3-4     Item-length (big endian, counts the bytes that follow)

``decode(value)`` takes the bytes after that header (the caller has checked
the length against what is left), ``nbytes`` is the size of the whole item
including its header, and ``encode_into(buf, offset)`` writes it and returns
the offset after it.

References
----------
PS3.8 §9.3.2 (A-ASSOCIATE-RQ items), §9.3.3 (A-ASSOCIATE-AC items),
Annex D (Maximum Length); PS3.7 Annex D.3.3 (the other user information sub-items).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dicomagent.ul.codes import PDUDecodeError

#: PS3.8 §9.3.2: Item-type, Reserved, Item-length.
ITEM_HEADER = struct.Struct(">BBH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U16U16 = struct.Struct(">HH")


def decode_text(value: memoryview) -> str:
    """A UID or name field: ASCII, trailing NUL or space padding removed.

    Interpretation: PS3.8 §9.3.2.2 forbids padding UIDs, but some
    implementations pad with NUL or space; we remove both on receipt.
    Bytes outside ASCII are kept (as Latin-1) so that negotiation, not the
    decoder, says the value is unknown.
    """
    return bytes(value).decode("latin-1").rstrip("\x00 ")


def iter_items(view: memoryview, offset: int, end: int, where: str):
    """Yield ``(item_type, value_view)`` for the items between offset and end.

    Each Item-length is checked against the bytes left before it is used.
    """
    unpack = ITEM_HEADER.unpack_from
    while offset < end:
        if end - offset < 4:
            raise PDUDecodeError(where, detail=f"{end - offset} stray bytes after the last item")
        item_type, _, length = unpack(view, offset)
        offset += 4
        if length > end - offset:
            raise PDUDecodeError(where, detail=f"item 0x{item_type:02X} length {length} "
                                              f"exceeds the {end - offset} bytes left")
        yield item_type, view[offset:offset + length]
        offset += length


def _put_header(buf: bytearray, offset: int, item_type: int, length: int) -> int:
    ITEM_HEADER.pack_into(buf, offset, item_type, 0, length)
    return offset + 4


@dataclass(frozen=True, slots=True)
class UnknownItem:
    """An item or sub-item of a type this implementation does not know.

    PS3.8 §9.3.1: unrecognised items are ignored on receipt; we keep their
    bytes so that ``probe`` can report them.
    """

    item_type: int
    value: bytes

    @classmethod
    def decode(cls, item_type: int, value: memoryview) -> UnknownItem:
        return cls(item_type, bytes(value))

    @property
    def nbytes(self) -> int:
        return 4 + len(self.value)

    def encode_into(self, buf: bytearray, offset: int) -> int:
        offset = _put_header(buf, offset, self.item_type, len(self.value))
        buf[offset:offset + len(self.value)] = self.value
        return offset + len(self.value)


class _NameItem:
    """An item whose whole value is one ASCII string (a UID or a name)."""

    __slots__ = ()
    ITEM_TYPE: int

    @classmethod
    def decode(cls, value: memoryview):
        return cls(decode_text(value))

    @property
    def nbytes(self) -> int:
        return 4 + len(self.name)

    def encode_into(self, buf: bytearray, offset: int) -> int:
        data = self.name.encode("latin-1")
        offset = _put_header(buf, offset, self.ITEM_TYPE, len(data))
        buf[offset:offset + len(data)] = data
        return offset + len(data)


@dataclass(frozen=True, slots=True)
class ApplicationContextItem(_NameItem):
    """PS3.8 §9.3.2.1, Table 9-12: Item-type 10H, Application-context-name."""

    ITEM_TYPE = 0x10
    name: str


@dataclass(frozen=True, slots=True)
class AbstractSyntaxSubItem(_NameItem):
    """PS3.8 §9.3.2.2.1, Table 9-14: Item-type 30H, Abstract-syntax-name."""

    ITEM_TYPE = 0x30
    name: str


@dataclass(frozen=True, slots=True)
class TransferSyntaxSubItem(_NameItem):
    """PS3.8 §9.3.2.2.2, Table 9-15: Item-type 40H, Transfer-syntax-name."""

    ITEM_TYPE = 0x40
    name: str


@dataclass(frozen=True, slots=True)
class PresentationContextItemRQ:
    """PS3.8 §9.3.2.2, Table 9-13: Item-type 20H::

        5       Presentation-context-ID (odd, 1-255)
        6-8     Reserved
        9-xxx   one Abstract Syntax Sub-Item, one or more Transfer Syntax Sub-Items
    """

    ITEM_TYPE = 0x20
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]

    @classmethod
    def decode(cls, value: memoryview) -> PresentationContextItemRQ:
        if len(value) < 4:
            raise PDUDecodeError("Presentation-context-ID", detail="item shorter than 4 bytes")
        abstract_syntax = None
        transfer_syntaxes = []
        for item_type, sub in iter_items(value, 4, len(value), "Presentation Context Item"):
            if item_type == 0x30:
                abstract_syntax = decode_text(sub)
            elif item_type == 0x40:
                transfer_syntaxes.append(decode_text(sub))
        if abstract_syntax is None:
            raise PDUDecodeError("Abstract Syntax Sub-Item", detail="missing")
        return cls(value[0], abstract_syntax, tuple(transfer_syntaxes))

    @property
    def nbytes(self) -> int:
        return (8 + 4 + len(self.abstract_syntax)
                + sum(4 + len(ts) for ts in self.transfer_syntaxes))

    def encode_into(self, buf: bytearray, offset: int) -> int:
        offset = _put_header(buf, offset, self.ITEM_TYPE, self.nbytes - 4)
        buf[offset:offset + 4] = bytes((self.context_id, 0, 0, 0))
        offset = AbstractSyntaxSubItem(self.abstract_syntax).encode_into(buf, offset + 4)
        for ts in self.transfer_syntaxes:
            offset = TransferSyntaxSubItem(ts).encode_into(buf, offset)
        return offset


@dataclass(frozen=True, slots=True)
class PresentationContextItemAC:
    """PS3.8 §9.3.3.2, Table 9-18: Item-type 21H::

        5       Presentation-context-ID
        6       Reserved
        7       Result/Reason (0 acceptance, 1 user-rejection, 2 no-reason,
                3 abstract-syntax-not-supported, 4 transfer-syntaxes-not-supported)
        8       Reserved
        9-xxx   one Transfer Syntax Sub-Item (not significant unless accepted)
    """

    ITEM_TYPE = 0x21
    context_id: int
    result: int
    transfer_syntax: str = ""

    @classmethod
    def decode(cls, value: memoryview) -> PresentationContextItemAC:
        if len(value) < 4:
            raise PDUDecodeError("Presentation-context-ID", detail="item shorter than 4 bytes")
        transfer_syntax = ""
        for item_type, sub in iter_items(value, 4, len(value), "Presentation Context Item"):
            if item_type == 0x40:
                transfer_syntax = decode_text(sub)
        return cls(value[0], value[2], transfer_syntax)

    @property
    def nbytes(self) -> int:
        return 8 + 4 + len(self.transfer_syntax)

    def encode_into(self, buf: bytearray, offset: int) -> int:
        offset = _put_header(buf, offset, self.ITEM_TYPE, self.nbytes - 4)
        buf[offset:offset + 4] = bytes((self.context_id, 0, self.result, 0))
        return TransferSyntaxSubItem(self.transfer_syntax).encode_into(buf, offset + 4)


# --- User Information sub-items (PS3.8 Annex D, PS3.7 Annex D.3.3) ----------------------

@dataclass(frozen=True, slots=True)
class MaximumLengthSubItem:
    """PS3.8 Annex D.1, Table D.1-1: Item-type 51H, Maximum-length-received (4 bytes).

    0 means no maximum: the sender accepts P-DATA-TF PDUs of any length.
    """

    ITEM_TYPE = 0x51
    maximum_length_received: int

    @classmethod
    def decode(cls, value: memoryview) -> MaximumLengthSubItem:
        if len(value) != 4:
            raise PDUDecodeError("Maximum-length-received", detail=f"length {len(value)}, not 4")
        return cls(_U32.unpack_from(value, 0)[0])

    nbytes = 8

    def encode_into(self, buf: bytearray, offset: int) -> int:
        offset = _put_header(buf, offset, self.ITEM_TYPE, 4)
        _U32.pack_into(buf, offset, self.maximum_length_received)
        return offset + 4


@dataclass(frozen=True, slots=True)
class ImplementationClassUIDSubItem(_NameItem):
    """PS3.7 Annex D.3.3.2.1, Table D.3-1: Item-type 52H, Implementation-class-uid."""

    ITEM_TYPE = 0x52
    name: str


@dataclass(frozen=True, slots=True)
class ImplementationVersionNameSubItem(_NameItem):
    """PS3.7 Annex D.3.3.2.3, Table D.3-3: Item-type 55H, Implementation-version-name."""

    ITEM_TYPE = 0x55
    name: str


@dataclass(frozen=True, slots=True)
class AsynchronousOperationsWindowSubItem:
    """PS3.7 Annex D.3.3.3.1, Table D.3-7: Item-type 53H::

        5-6     Maximum-number-operations-invoked
        7-8     Maximum-number-operations-performed
    """

    ITEM_TYPE = 0x53
    maximum_number_operations_invoked: int
    maximum_number_operations_performed: int

    @classmethod
    def decode(cls, value: memoryview) -> AsynchronousOperationsWindowSubItem:
        if len(value) != 4:
            raise PDUDecodeError("Asynchronous Operations Window Sub-Item",
                                 detail=f"length {len(value)}, not 4")
        return cls(*_U16U16.unpack_from(value, 0))

    nbytes = 8

    def encode_into(self, buf: bytearray, offset: int) -> int:
        offset = _put_header(buf, offset, self.ITEM_TYPE, 4)
        _U16U16.pack_into(buf, offset, self.maximum_number_operations_invoked,
                          self.maximum_number_operations_performed)
        return offset + 4


@dataclass(frozen=True, slots=True)
class SCPSCURoleSelectionSubItem:
    """PS3.7 Annex D.3.3.4, Tables D.3-9 and D.3-10: Item-type 54H::

        5-6     UID-length
        7-xxx   SOP-class-uid
        xxx+1   SCU-role (0 or 1)
        xxx+2   SCP-role (0 or 1)
    """

    ITEM_TYPE = 0x54
    sop_class_uid: str
    scu_role: int
    scp_role: int

    @classmethod
    def decode(cls, value: memoryview) -> SCPSCURoleSelectionSubItem:
        if len(value) < 2:
            raise PDUDecodeError("UID-length", detail="role selection sub-item too short")
        uid_length = _U16.unpack_from(value, 0)[0]
        if 2 + uid_length + 2 != len(value):
            raise PDUDecodeError("UID-length", detail=f"{uid_length} does not fit the sub-item")
        return cls(decode_text(value[2:2 + uid_length]), value[2 + uid_length],
                   value[3 + uid_length])

    @property
    def nbytes(self) -> int:
        return 4 + 2 + len(self.sop_class_uid) + 2

    def encode_into(self, buf: bytearray, offset: int) -> int:
        uid = self.sop_class_uid.encode("latin-1")
        offset = _put_header(buf, offset, self.ITEM_TYPE, self.nbytes - 4)
        _U16.pack_into(buf, offset, len(uid))
        offset += 2
        buf[offset:offset + len(uid)] = uid
        offset += len(uid)
        buf[offset] = self.scu_role
        buf[offset + 1] = self.scp_role
        return offset + 2


@dataclass(frozen=True, slots=True)
class SOPClassExtendedNegotiationSubItem:
    """PS3.7 Annex D.3.3.5, Table D.3-11: Item-type 56H::

        5-6     SOP-class-uid-length
        7-xxx   SOP-class-uid
        xxx-yyy Service-class-application-information
    """

    ITEM_TYPE = 0x56
    sop_class_uid: str
    service_class_application_information: bytes

    @classmethod
    def decode(cls, value: memoryview) -> SOPClassExtendedNegotiationSubItem:
        if len(value) < 2:
            raise PDUDecodeError("SOP-class-uid-length", detail="sub-item too short")
        uid_length = _U16.unpack_from(value, 0)[0]
        if 2 + uid_length > len(value):
            raise PDUDecodeError("SOP-class-uid-length", detail=f"{uid_length} exceeds the sub-item")
        return cls(decode_text(value[2:2 + uid_length]), bytes(value[2 + uid_length:]))

    @property
    def nbytes(self) -> int:
        return 4 + 2 + len(self.sop_class_uid) + len(self.service_class_application_information)

    def encode_into(self, buf: bytearray, offset: int) -> int:
        uid = self.sop_class_uid.encode("latin-1")
        info = self.service_class_application_information
        offset = _put_header(buf, offset, self.ITEM_TYPE, self.nbytes - 4)
        _U16.pack_into(buf, offset, len(uid))
        offset += 2
        buf[offset:offset + len(uid)] = uid
        offset += len(uid)
        buf[offset:offset + len(info)] = info
        return offset + len(info)


def _read_u16_string(value: memoryview, offset: int, field: str) -> tuple[str, int]:
    if len(value) - offset < 2:
        raise PDUDecodeError(field, detail="length field missing")
    length = _U16.unpack_from(value, offset)[0]
    offset += 2
    if length > len(value) - offset:
        raise PDUDecodeError(field, detail=f"length {length} exceeds the sub-item")
    return decode_text(value[offset:offset + length]), offset + length


def _write_u16_bytes(buf: bytearray, offset: int, data: bytes) -> int:
    _U16.pack_into(buf, offset, len(data))
    offset += 2
    buf[offset:offset + len(data)] = data
    return offset + len(data)


@dataclass(frozen=True, slots=True)
class SOPClassCommonExtendedNegotiationSubItem:
    """PS3.7 Annex D.3.3.6, Table D.3-12: Item-type 57H (byte 2 is Sub-Item-version, 0)::

        5-6     SOP-class-uid-length, then SOP-class-uid
        ...     Service-class-uid-length (2), Service-class-uid
        ...     Related-general-sop-class-identification-length (2), then
                Related-general-sop-class-identification sub-fields, each a
                2-byte length and a UID
    """

    ITEM_TYPE = 0x57
    sop_class_uid: str
    service_class_uid: str
    related_general_sop_class_uids: tuple[str, ...] = ()

    @classmethod
    def decode(cls, value: memoryview) -> SOPClassCommonExtendedNegotiationSubItem:
        field = "SOP Class Common Extended Negotiation Sub-Item"
        sop_class_uid, offset = _read_u16_string(value, 0, field)
        service_class_uid, offset = _read_u16_string(value, offset, field)
        if len(value) - offset < 2:
            raise PDUDecodeError(field, detail="related general SOP class length missing")
        related_length = _U16.unpack_from(value, offset)[0]
        offset += 2
        end = offset + related_length
        if end != len(value):
            raise PDUDecodeError(field, detail=f"related length {related_length} does not fit")
        related = []
        while offset < end:
            uid, offset = _read_u16_string(value[:end], offset, field)
            related.append(uid)
        return cls(sop_class_uid, service_class_uid, tuple(related))

    @property
    def nbytes(self) -> int:
        return (4 + 2 + len(self.sop_class_uid) + 2 + len(self.service_class_uid) + 2
                + sum(2 + len(uid) for uid in self.related_general_sop_class_uids))

    def encode_into(self, buf: bytearray, offset: int) -> int:
        offset = _put_header(buf, offset, self.ITEM_TYPE, self.nbytes - 4)
        offset = _write_u16_bytes(buf, offset, self.sop_class_uid.encode("latin-1"))
        offset = _write_u16_bytes(buf, offset, self.service_class_uid.encode("latin-1"))
        related = self.related_general_sop_class_uids
        _U16.pack_into(buf, offset, sum(2 + len(uid) for uid in related))
        offset += 2
        for uid in related:
            offset = _write_u16_bytes(buf, offset, uid.encode("latin-1"))
        return offset


@dataclass(frozen=True, slots=True)
class UserIdentitySubItemRQ:
    """PS3.7 Annex D.3.3.7.1, Table D.3-14: Item-type 58H::

        5       User-Identity-Type (1 username, 2 username and passcode,
                3 Kerberos, 4 SAML, 5 JWT)
        6       Positive-response-requested (0 or 1)
        7-8     Primary-field-length, then Primary-field
        ...     Secondary-field-length (2), then Secondary-field
    """

    ITEM_TYPE = 0x58
    user_identity_type: int
    positive_response_requested: int
    primary_field: bytes
    secondary_field: bytes = b""

    @classmethod
    def decode(cls, value: memoryview) -> UserIdentitySubItemRQ:
        field = "User Identity Sub-Item"
        if len(value) < 4:
            raise PDUDecodeError(field, detail="sub-item too short")
        primary_length = _U16.unpack_from(value, 2)[0]
        offset = 4 + primary_length
        if offset + 2 > len(value):
            raise PDUDecodeError("Primary-field-length", detail=f"{primary_length} exceeds the sub-item")
        secondary_length = _U16.unpack_from(value, offset)[0]
        if offset + 2 + secondary_length != len(value):
            raise PDUDecodeError("Secondary-field-length",
                                 detail=f"{secondary_length} does not fit the sub-item")
        return cls(value[0], value[1], bytes(value[4:offset]),
                   bytes(value[offset + 2:offset + 2 + secondary_length]))

    @property
    def nbytes(self) -> int:
        return 4 + 2 + 2 + len(self.primary_field) + 2 + len(self.secondary_field)

    def encode_into(self, buf: bytearray, offset: int) -> int:
        offset = _put_header(buf, offset, self.ITEM_TYPE, self.nbytes - 4)
        buf[offset] = self.user_identity_type
        buf[offset + 1] = self.positive_response_requested
        offset = _write_u16_bytes(buf, offset + 2, self.primary_field)
        return _write_u16_bytes(buf, offset, self.secondary_field)


@dataclass(frozen=True, slots=True)
class UserIdentitySubItemAC:
    """PS3.7 Annex D.3.3.7.2, Table D.3-15: Item-type 59H::

        5-6     Server-response-length, then Server-response
    """

    ITEM_TYPE = 0x59
    server_response: bytes

    @classmethod
    def decode(cls, value: memoryview) -> UserIdentitySubItemAC:
        if len(value) < 2:
            raise PDUDecodeError("Server-response-length", detail="sub-item too short")
        length = _U16.unpack_from(value, 0)[0]
        if 2 + length != len(value):
            raise PDUDecodeError("Server-response-length", detail=f"{length} does not fit")
        return cls(bytes(value[2:]))

    @property
    def nbytes(self) -> int:
        return 4 + 2 + len(self.server_response)

    def encode_into(self, buf: bytearray, offset: int) -> int:
        offset = _put_header(buf, offset, self.ITEM_TYPE, self.nbytes - 4)
        return _write_u16_bytes(buf, offset, self.server_response)


USER_INFORMATION_SUB_ITEMS = {
    cls.ITEM_TYPE: cls
    for cls in (MaximumLengthSubItem, ImplementationClassUIDSubItem,
                AsynchronousOperationsWindowSubItem, SCPSCURoleSelectionSubItem,
                ImplementationVersionNameSubItem, SOPClassExtendedNegotiationSubItem,
                SOPClassCommonExtendedNegotiationSubItem, UserIdentitySubItemRQ,
                UserIdentitySubItemAC)
}


@dataclass(frozen=True, slots=True)
class UserInformationItem:
    """PS3.8 §9.3.2.3 / §9.3.3.3, Table 9-16: Item-type 50H, a list of sub-items.

    The sub-items are kept in the order received; the properties below find
    the ones negotiation needs.
    """

    ITEM_TYPE = 0x50
    sub_items: tuple = ()

    @classmethod
    def decode(cls, value: memoryview) -> UserInformationItem:
        sub_items = []
        for item_type, sub in iter_items(value, 0, len(value), "User Information Item"):
            sub_class = USER_INFORMATION_SUB_ITEMS.get(item_type)
            if sub_class is None:
                sub_items.append(UnknownItem.decode(item_type, sub))
            else:
                sub_items.append(sub_class.decode(sub))
        return cls(tuple(sub_items))

    @property
    def nbytes(self) -> int:
        return 4 + sum(item.nbytes for item in self.sub_items)

    def encode_into(self, buf: bytearray, offset: int) -> int:
        offset = _put_header(buf, offset, self.ITEM_TYPE, self.nbytes - 4)
        for item in self.sub_items:
            offset = item.encode_into(buf, offset)
        return offset

    def _first(self, cls):
        for item in self.sub_items:
            if type(item) is cls:
                return item
        return None

    @property
    def maximum_length_received(self) -> int | None:
        item = self._first(MaximumLengthSubItem)
        return None if item is None else item.maximum_length_received

    @property
    def implementation_class_uid(self) -> str | None:
        item = self._first(ImplementationClassUIDSubItem)
        return None if item is None else item.name

    @property
    def implementation_version_name(self) -> str | None:
        item = self._first(ImplementationVersionNameSubItem)
        return None if item is None else item.name

    @property
    def asynchronous_operations_window(self) -> AsynchronousOperationsWindowSubItem | None:
        return self._first(AsynchronousOperationsWindowSubItem)

    @property
    def role_selections(self) -> tuple[SCPSCURoleSelectionSubItem, ...]:
        return tuple(i for i in self.sub_items if type(i) is SCPSCURoleSelectionSubItem)

    @property
    def user_identity(self) -> UserIdentitySubItemRQ | None:
        return self._first(UserIdentitySubItemRQ)


#: Items of the A-ASSOCIATE-RQ / -AC variable field (PS3.8 §9.3.2, §9.3.3).
ASSOCIATE_RQ_ITEMS = {cls.ITEM_TYPE: cls for cls in
                      (ApplicationContextItem, PresentationContextItemRQ, UserInformationItem)}
ASSOCIATE_AC_ITEMS = {cls.ITEM_TYPE: cls for cls in
                      (ApplicationContextItem, PresentationContextItemAC, UserInformationItem)}
