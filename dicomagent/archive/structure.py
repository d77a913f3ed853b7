"""PS3.5 §7: checking that a received data set's element lengths hold together.

pydicom reads a truncated data set without complaint (the last value simply
comes out short), so before the archive keeps a data set it walks the
element headers: every length must fit in what is left, sequences and items
must close, and the top level must end exactly at the end of the data. Only
headers are read; values (pixel data included) are skipped.

References
----------
PS3.5 §7.1 (data elements, explicit and implicit VR), §7.5 (nesting of
data sets: items and delimiters), §A.4 (encapsulated pixel data).
"""

from __future__ import annotations

import struct

from dicomagent.uids import IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN

UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITATION = 0xFFFEE00D
SEQUENCE_DELIMITATION = 0xFFFEE0DD
#: PS3.5 Table 7.1-1: explicit VRs with a 2-byte reserved field and a 4-byte length.
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
            b"UT", b"UV"}
MAX_DEPTH = 64


class StructureError(ValueError):
    """The data set's lengths do not hold together."""


class _Source:
    """Reads ``length`` bytes at a data set offset: from the in-memory head when it
    covers them, else from the file (whose data set starts at ``file_offset``)."""

    def __init__(self, head: bytes | bytearray, path: str | None, file_offset: int):
        self.head = head
        self.path = path
        self.file_offset = file_offset
        self.handle = None

    def read(self, position: int, length: int) -> bytes:
        if position + length <= len(self.head):
            return self.head[position:position + length]
        if self.path is None:
            raise StructureError("data set ends inside an element header")
        if self.handle is None:
            self.handle = open(self.path, "rb")
        self.handle.seek(self.file_offset + position)
        data = self.handle.read(length)
        if len(data) < length:
            raise StructureError("data set ends inside an element header")
        return data

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def check_structure(head: bytes | bytearray, size: int, transfer_syntax: str, path: str | None = None,
                    file_offset: int = 0, wanted: frozenset[int] = frozenset()
                    ) -> dict[int, bytes]:
    """Raise ``StructureError`` unless the data set of ``size`` bytes is well formed.

    ``head`` holds its first bytes (all of them when ``path`` is None).
    Returns the raw values of the ``wanted`` top-level elements met on the
    way (the archive asks for the four UIDs that name an object's path).
    Deflated and other transfer syntaxes whose data set is not plain
    elements are not checked (and nothing is returned).
    """
    found: dict[int, bytes] = {}
    if transfer_syntax == "1.2.840.10008.1.2.1.99":
        return found
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    little = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    source = _Source(head, path, file_offset)
    try:
        end = _walk(source, 0, size, implicit, little, 0, stop_at_delimiter=False,
                    wanted=wanted, found=found)
        if end != size:
            raise StructureError(f"{size - end} bytes after the last element")
    finally:
        source.close()
    return found


#: Element headers by byte order (True: little endian): explicit VR (tag, VR, 2-byte
#: length), implicit VR and items (tag, 4-byte length), and a 4-byte length alone.
EXPLICIT_HEADER = {True: struct.Struct("<HH2sH"), False: struct.Struct(">HH2sH")}
IMPLICIT_HEADER = {True: struct.Struct("<HHI"), False: struct.Struct(">HHI")}
U32 = {True: struct.Struct("<I"), False: struct.Struct(">I")}


def _walk(source: _Source, position: int, end: int, implicit: bool, little: bool,
          depth: int, stop_at_delimiter: bool, wanted: frozenset[int] = frozenset(),
          found: dict | None = None) -> int:
    """Walk elements from ``position`` to ``end`` (or to an item delimiter); keep the
    values of ``wanted`` tags in ``found`` (the top level passes them).

    Headers inside the in-memory head are read from it directly (this runs for
    every stored object, on the event loop); past it, from the file.
    """
    if depth > MAX_DEPTH:
        raise StructureError("sequences nested deeper than 64")
    explicit_header, implicit_header, u32 = (EXPLICIT_HEADER[little], IMPLICIT_HEADER[little],
                                             U32[little])
    head = source.head
    in_memory = len(head)
    while position < end:
        if end - position < 8:
            raise StructureError(f"{end - position} stray bytes at offset {position}")
        if position + 12 <= in_memory:
            header, at = head, position
        else:
            header, at = source.read(position, min(12, end - position)), 0
        if implicit:
            group, element, length = implicit_header.unpack_from(header, at)
            vr = b""
            position += 8
        else:
            group, element, vr, length = explicit_header.unpack_from(header, at)
            if group == 0xFFFE:             # items and delimiters have no VR
                (length,) = u32.unpack_from(header, at + 4)
                vr = b""
                position += 8
            elif vr in LONG_VRS:
                if end - position < 12:
                    raise StructureError(f"element ({group:04X},{element:04X}) header truncated")
                (length,) = u32.unpack_from(header, at + 8)
                position += 12
            else:
                position += 8
        tag = group << 16 | element
        if tag == ITEM_DELIMITATION:
            if not stop_at_delimiter:
                raise StructureError(f"item delimiter outside an item at offset "
                                     f"{position - 8}")
            return position
        if length == UNDEFINED:
            if vr not in (b"SQ", b"UN", b"OB", b"OW", b""):
                raise StructureError(f"undefined length on ({group:04X},{element:04X}) {vr!r}")
            # PS3.5 §6.2.2: an undefined-length UN holds Implicit VR Little Endian.
            position = _walk_sequence(source, position, end, implicit or vr == b"UN",
                                      little, depth + 1, tag)
            continue
        if length > end - position:
            raise StructureError(f"element ({group:04X},{element:04X}) length {length} exceeds "
                                 f"the {end - position} bytes left")
        if tag in wanted:
            found[tag] = source.read(position, length)
        if vr == b"SQ":
            _walk_items(source, position, position + length, implicit, little, depth + 1)
        elif implicit and length >= 8 and _is_sequence_value(source, position, little):
            # Interpretation: PS3.5 §7.1.3 — with implicit VR only the data
            # dictionary tells a sequence; a value that starts with an Item tag is
            # walked as one, and left opaque if it does not parse as items.
            try:
                _walk_items(source, position, position + length, implicit, little, depth + 1)
            except StructureError:
                pass
        position += length
    return position


def _is_sequence_value(source: _Source, position: int, little: bool) -> bool:
    """Implicit VR: a defined-length value (of 8 bytes or more) that starts with an Item
    tag is a sequence."""
    head = source.head
    data, at = (head, position) if position + 4 <= len(head) else (source.read(position, 4), 0)
    group, element = struct.unpack_from("<HH" if little else ">HH", data, at)
    return (group << 16 | element) == ITEM


def _walk_items(source: _Source, position: int, end: int, implicit: bool, little: bool,
                depth: int) -> None:
    """The items of a defined-length sequence value."""
    u32 = struct.Struct("<I" if little else ">I")
    while position < end:
        if end - position < 8:
            raise StructureError("sequence value ends inside an item header")
        header = source.read(position, 8)
        tag = struct.unpack_from("<HH" if little else ">HH", header)
        if (tag[0] << 16 | tag[1]) != ITEM:
            raise StructureError(f"({tag[0]:04X},{tag[1]:04X}) where an item was expected")
        (length,) = u32.unpack_from(header, 4)
        position += 8
        if length == UNDEFINED:
            position = _walk(source, position, end, implicit, little, depth, True)
        else:
            if length > end - position:
                raise StructureError(f"item length {length} exceeds its sequence")
            _walk(source, position, position + length, implicit, little, depth, False)
            position += length


def _walk_sequence(source: _Source, position: int, end: int, implicit: bool, little: bool,
                   depth: int, tag: int) -> int:
    """An undefined-length sequence (or encapsulated pixel data) up to its delimiter."""
    u32 = struct.Struct("<I" if little else ">I")
    while True:
        if end - position < 8:
            raise StructureError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) has no sequence "
                                 f"delimiter before the end")
        header = source.read(position, 8)
        group, element = struct.unpack_from("<HH" if little else ">HH", header)
        item_tag = group << 16 | element
        (length,) = u32.unpack_from(header, 4)
        position += 8
        if item_tag == SEQUENCE_DELIMITATION:
            return position
        if item_tag != ITEM:
            raise StructureError(f"({group:04X},{element:04X}) inside a sequence")
        if length == UNDEFINED:
            position = _walk(source, position, end, implicit, little, depth, True)
        elif length > end - position:
            raise StructureError(f"item length {length} exceeds the data set")
        else:
            if tag != 0x7FE00010:          # fragments of encapsulated pixel data are opaque
                _walk(source, position, position + length, implicit, little, depth, False)
            position += length
