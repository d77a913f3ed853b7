"""PS3.8 §9.3: the seven Upper Layer PDUs.

Every PDU starts with the same six bytes (PS3.8 §9.3.1)::

    1       PDU-type
    2       Reserved
    3-6     PDU-length (big endian, counts the bytes that follow)

``decode(view)`` takes the whole PDU, header included, ``nbytes`` is its
size and ``encode_into(buf, offset)`` writes it; ``encode()`` returns fresh
bytes. Reserved fields are written as zero and not tested on receipt.

P-DATA-TF is special: a P-DATA-TF PDU may be of any length (the agent
advertises no maximum), so the receiving side does not decode it whole; the
stream reader in ``ul/stream.py`` hands out its PDVs piece by piece. The
``P_DATA_TF`` class here serves the sending side and the tests.

References
----------
PS3.8 §9.3.1–§9.3.8, Tables 9-11 to 9-26.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dicomagent.ul.codes import AbortReason, PDUDecodeError, PDUType
from dicomagent.ul.items import (ASSOCIATE_AC_ITEMS, ASSOCIATE_RQ_ITEMS, ApplicationContextItem,
                                 PresentationContextItemAC, PresentationContextItemRQ,
                                 UnknownItem, UserInformationItem, iter_items)

#: PS3.8 §9.3.1: PDU-type, Reserved, PDU-length.
PDU_HEADER = struct.Struct(">BBI")

#: PS3.8 Table 9-11 / 9-17: the fixed part of A-ASSOCIATE-RQ and -AC::
#:
#:     1       PDU-type (01H / 02H)     7-8     Protocol-version (bit 0 = version 1)
#:     2       Reserved                 9-10    Reserved
#:     3-6     PDU-length               11-26   Called-AE-title (16 bytes, space padded)
#:                                      27-42   Calling-AE-title
#:                                      43-74   Reserved (32 bytes)
ASSOCIATE_FIXED = struct.Struct(">BBIHH16s16s32x")

#: PS3.8 Table 9-21 / 9-26: A-ASSOCIATE-RJ and A-ABORT::
#:
#:     1 PDU-type, 2 Reserved, 3-6 PDU-length (4), 7 Reserved,
#:     8 Result (RJ) / Reserved (ABORT), 9 Source, 10 Reason/Diag.
FOUR_BYTE_BODY = struct.Struct(">BBIBBBB")

#: PS3.8 §9.3.5.1: a PDV item header: Item-length (4), Presentation-context-ID (1),
#: and the first byte of the value, the Message Control Header (PS3.8 Annex E.2).
PDV_HEADER = struct.Struct(">IBB")

#: Largest A-ASSOCIATE / A-RELEASE / A-ABORT PDU we take into memory.
#: Local extension: PS3.8 sets no limit; 1 MiB is far above any real
#: association request (128 presentation contexts take about 20 KiB) and
#: keeps a lying PDU-length from costing memory.
MAX_CONTROL_PDU_LENGTH = 1 << 20

#: Message Control Header bits (PS3.8 Annex E.2).
MCH_COMMAND = 0x01
MCH_LAST = 0x02


def _ae_title(raw: bytes) -> str:
    """Called/Calling-AE-title: 16 bytes, leading and trailing spaces insignificant."""
    return raw.decode("latin-1").strip(" \x00")


def _encode_ae_title(title: str, field: str) -> bytes:
    """16 bytes, space padded.

    An empty title is written as 16 spaces: PS3.8 does not allow a blank AE
    title, but an A-ASSOCIATE-AC echoes whatever the request carried, and a
    peer that sent a blank one must get an answer, not a crash.
    """
    data = title.encode("latin-1")
    if len(data) > 16:
        raise ValueError(f"{field} must be at most 16 characters: {title!r}")
    return data.ljust(16, b" ")


class _AssociatePDU:
    """What A-ASSOCIATE-RQ and A-ASSOCIATE-AC share: the fixed part and a list of items."""

    __slots__ = ()
    PDU_TYPE: int
    ITEMS: dict

    @classmethod
    def decode(cls, view: memoryview):
        if len(view) < ASSOCIATE_FIXED.size:
            raise PDUDecodeError("PDU-length", detail=f"{cls.__name__} of {len(view)} bytes")
        _, _, length, version, _, called, calling = ASSOCIATE_FIXED.unpack_from(view, 0)
        if length + 6 != len(view):
            raise PDUDecodeError("PDU-length", detail=f"{length} does not match the PDU")
        items = []
        for item_type, value in iter_items(view, ASSOCIATE_FIXED.size, len(view),
                                           "Variable items"):
            item_class = cls.ITEMS.get(item_type)
            if item_class is None:
                items.append(UnknownItem.decode(item_type, value))
            else:
                items.append(item_class.decode(value))
        return cls(_ae_title(called), _ae_title(calling), tuple(items), version)

    @property
    def nbytes(self) -> int:
        return ASSOCIATE_FIXED.size + sum(item.nbytes for item in self.variable_items)

    def encode_into(self, buf: bytearray, offset: int) -> int:
        ASSOCIATE_FIXED.pack_into(
            buf, offset, self.PDU_TYPE, 0, self.nbytes - 6, self.protocol_version, 0,
            _encode_ae_title(self.called_ae_title, "Called-AE-title"),
            _encode_ae_title(self.calling_ae_title, "Calling-AE-title"))
        offset += ASSOCIATE_FIXED.size
        for item in self.variable_items:
            offset = item.encode_into(buf, offset)
        return offset

    def encode(self) -> bytes:
        buf = bytearray(self.nbytes)
        self.encode_into(buf, 0)
        return bytes(buf)

    def _first(self, cls):
        for item in self.variable_items:
            if type(item) is cls:
                return item
        return None

    @property
    def application_context_name(self) -> str | None:
        item = self._first(ApplicationContextItem)
        return None if item is None else item.name

    @property
    def user_information(self) -> UserInformationItem:
        return self._first(UserInformationItem) or UserInformationItem()


@dataclass(frozen=True, slots=True)
class A_ASSOCIATE_RQ(_AssociatePDU):
    """PS3.8 §9.3.2, Table 9-11: A-ASSOCIATE-RQ PDU (type 01H).

    Variable items: one Application Context Item, one or more Presentation
    Context Items (RQ), one User Information Item; unknown items are kept.
    """

    PDU_TYPE = PDUType.A_ASSOCIATE_RQ
    ITEMS = ASSOCIATE_RQ_ITEMS
    called_ae_title: str
    calling_ae_title: str
    variable_items: tuple = ()
    protocol_version: int = 1

    @property
    def presentation_contexts(self) -> tuple[PresentationContextItemRQ, ...]:
        return tuple(i for i in self.variable_items if type(i) is PresentationContextItemRQ)


@dataclass(frozen=True, slots=True)
class A_ASSOCIATE_AC(_AssociatePDU):
    """PS3.8 §9.3.3, Table 9-17: A-ASSOCIATE-AC PDU (type 02H).

    Called- and Calling-AE-title are reserved here but shall hold the values
    of the A-ASSOCIATE-RQ; they are not tested on receipt.
    """

    PDU_TYPE = PDUType.A_ASSOCIATE_AC
    ITEMS = ASSOCIATE_AC_ITEMS
    called_ae_title: str
    calling_ae_title: str
    variable_items: tuple = ()
    protocol_version: int = 1

    @property
    def presentation_contexts(self) -> tuple[PresentationContextItemAC, ...]:
        return tuple(i for i in self.variable_items if type(i) is PresentationContextItemAC)


class _FourBytePDU:
    """A PDU whose body is four bytes: A-ASSOCIATE-RJ, A-RELEASE-RQ/RP, A-ABORT."""

    __slots__ = ()
    PDU_TYPE: int
    nbytes = 10

    @classmethod
    def _unpack(cls, view: memoryview) -> tuple[int, int, int]:
        if len(view) != 10:
            raise PDUDecodeError("PDU-length", detail=f"{cls.__name__} must be 10 bytes, "
                                                      f"not {len(view)}")
        _, _, _, _, b8, b9, b10 = FOUR_BYTE_BODY.unpack_from(view, 0)
        return b8, b9, b10

    def _pack_into(self, buf: bytearray, offset: int, b8: int, b9: int, b10: int) -> int:
        FOUR_BYTE_BODY.pack_into(buf, offset, self.PDU_TYPE, 0, 4, 0, b8, b9, b10)
        return offset + 10

    def encode(self) -> bytes:
        buf = bytearray(10)
        self.encode_into(buf, 0)
        return bytes(buf)


@dataclass(frozen=True, slots=True)
class A_ASSOCIATE_RJ(_FourBytePDU):
    """PS3.8 §9.3.4, Table 9-21: A-ASSOCIATE-RJ PDU (type 03H)::

        8   Result (1 rejected-permanent, 2 rejected-transient)
        9   Source (1 service-user, 2 service-provider ACSE, 3 service-provider presentation)
        10  Reason/Diag. (see ``codes.RejectReason``)
    """

    PDU_TYPE = PDUType.A_ASSOCIATE_RJ
    result: int
    source: int
    reason: int

    @classmethod
    def decode(cls, view: memoryview) -> A_ASSOCIATE_RJ:
        return cls(*cls._unpack(view))

    def encode_into(self, buf: bytearray, offset: int) -> int:
        return self._pack_into(buf, offset, self.result, self.source, self.reason)


@dataclass(frozen=True, slots=True)
class A_RELEASE_RQ(_FourBytePDU):
    """PS3.8 §9.3.6, Table 9-24: A-RELEASE-RQ PDU (type 05H), four reserved bytes."""

    PDU_TYPE = PDUType.A_RELEASE_RQ

    @classmethod
    def decode(cls, view: memoryview) -> A_RELEASE_RQ:
        cls._unpack(view)
        return cls()

    def encode_into(self, buf: bytearray, offset: int) -> int:
        return self._pack_into(buf, offset, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class A_RELEASE_RP(_FourBytePDU):
    """PS3.8 §9.3.7, Table 9-25: A-RELEASE-RP PDU (type 06H), four reserved bytes."""

    PDU_TYPE = PDUType.A_RELEASE_RP

    @classmethod
    def decode(cls, view: memoryview) -> A_RELEASE_RP:
        cls._unpack(view)
        return cls()

    def encode_into(self, buf: bytearray, offset: int) -> int:
        return self._pack_into(buf, offset, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class A_ABORT(_FourBytePDU):
    """PS3.8 §9.3.8, Table 9-26: A-ABORT PDU (type 07H)::

        9   Source (0 service-user, 2 service-provider)
        10  Reason/Diag. (significant for source 2; see ``codes.AbortReason``)
    """

    PDU_TYPE = PDUType.A_ABORT
    source: int
    reason: int = AbortReason.REASON_NOT_SPECIFIED

    @classmethod
    def decode(cls, view: memoryview) -> A_ABORT:
        _, source, reason = cls._unpack(view)
        return cls(source, reason)

    def encode_into(self, buf: bytearray, offset: int) -> int:
        return self._pack_into(buf, offset, 0, self.source, self.reason)


@dataclass(frozen=True, slots=True)
class PresentationDataValueItem:
    """PS3.8 §9.3.5.1, Table 9-23: one PDV item::

        1-4     Item-length (counts the context ID and the PDV)
        5       Presentation-context-ID
        6-xxx   Presentation-data-value: Message Control Header (Annex E.2)
                then a fragment of a command set or data set
    """

    context_id: int
    message_control_header: int
    data: bytes

    @property
    def nbytes(self) -> int:
        return 6 + len(self.data)


@dataclass(frozen=True, slots=True)
class P_DATA_TF:
    """PS3.8 §9.3.5, Table 9-22: P-DATA-TF PDU (type 04H), one or more PDV items."""

    PDU_TYPE = PDUType.P_DATA_TF
    pdvs: tuple[PresentationDataValueItem, ...]

    @classmethod
    def decode(cls, view: memoryview) -> P_DATA_TF:
        """Decode a whole P-DATA-TF PDU (the tests' and fuzzers' path)."""
        if len(view) < 6:
            raise PDUDecodeError("PDU-length", detail="P-DATA-TF header truncated")
        _, _, length = PDU_HEADER.unpack_from(view, 0)
        if length + 6 != len(view):
            raise PDUDecodeError("PDU-length", detail=f"{length} does not match the PDU")
        if length < 6:
            raise PDUDecodeError("PDU-length", detail="a P-DATA-TF holds at least one PDV item")
        pdvs = []
        offset = 6
        while offset < len(view):
            if len(view) - offset < 6:
                raise PDUDecodeError("Item-length", detail="PDV item header truncated")
            item_length, context_id, mch = PDV_HEADER.unpack_from(view, offset)
            if item_length < 2 or item_length > len(view) - offset - 4:
                raise PDUDecodeError("Item-length", detail=f"PDV item length {item_length} "
                                                           f"does not fit the PDU")
            pdvs.append(PresentationDataValueItem(
                context_id, mch, bytes(view[offset + 6:offset + 4 + item_length])))
            offset += 4 + item_length
        return cls(tuple(pdvs))

    @property
    def nbytes(self) -> int:
        return 6 + sum(pdv.nbytes for pdv in self.pdvs)

    def encode_into(self, buf: bytearray, offset: int) -> int:
        PDU_HEADER.pack_into(buf, offset, self.PDU_TYPE, 0, self.nbytes - 6)
        offset += 6
        for pdv in self.pdvs:
            PDV_HEADER.pack_into(buf, offset, len(pdv.data) + 2, pdv.context_id,
                                 pdv.message_control_header)
            offset += 6
            buf[offset:offset + len(pdv.data)] = pdv.data
            offset += len(pdv.data)
        return offset

    def encode(self) -> bytes:
        buf = bytearray(self.nbytes)
        self.encode_into(buf, 0)
        return bytes(buf)


def p_data_tf_header(context_id: int, message_control_header: int, fragment_length: int) -> bytes:
    """The 12 bytes before a PDV fragment in a P-DATA-TF PDU that carries one PDV.

    The sending side writes this header and the fragment together
    (``transport.writelines([header, fragment])``), so a data set is never
    copied into a PDU buffer.
    """
    return (PDU_HEADER.pack(PDUType.P_DATA_TF, 0, fragment_length + 6)
            + PDV_HEADER.pack(fragment_length + 2, context_id, message_control_header))


#: PDUs decoded whole, by PDU-type; P-DATA-TF is streamed (``ul/stream.py``).
CONTROL_PDUS = {
    PDUType.A_ASSOCIATE_RQ: A_ASSOCIATE_RQ,
    PDUType.A_ASSOCIATE_AC: A_ASSOCIATE_AC,
    PDUType.A_ASSOCIATE_RJ: A_ASSOCIATE_RJ,
    PDUType.A_RELEASE_RQ: A_RELEASE_RQ,
    PDUType.A_RELEASE_RP: A_RELEASE_RP,
    PDUType.A_ABORT: A_ABORT,
}

ALL_PDUS = {**CONTROL_PDUS, PDUType.P_DATA_TF: P_DATA_TF}


def decode_pdu(data) -> object:
    """Decode one whole PDU of any type (the tests' and fuzzers' entry point).

    Raises only ``PDUDecodeError``.
    """
    view = memoryview(data)
    if len(view) < 6:
        raise PDUDecodeError("PDU-length", detail="fewer than 6 bytes")
    pdu_type, _, length = PDU_HEADER.unpack_from(view, 0)
    pdu_class = ALL_PDUS.get(pdu_type)
    if pdu_class is None:
        raise PDUDecodeError("PDU-type", AbortReason.UNRECOGNIZED_PDU, f"0x{pdu_type:02X}")
    if length + 6 != len(view):
        raise PDUDecodeError("PDU-length", detail=f"{length} does not match {len(view) - 6} bytes")
    return pdu_class.decode(view)
