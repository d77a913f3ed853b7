"""PS3.10 §7: the DICOM File Format — preamble, prefix and File Meta Information.

The archive writes the header of a Part 10 file itself, before the data set
arrives: everything it needs is known from the C-STORE-RQ and the
presentation context (SOP Class and Instance UID, transfer syntax) and the
association (Source AE Title), so the data set can follow straight from the
network without being re-encoded.

The File Meta Information is always Explicit VR Little Endian (PS3.10 §7.1).

References
----------
PS3.10 §7.1 (DICOM File Meta Information), Table 7.1-1.
"""

from __future__ import annotations

import functools
import struct

from dicomagent.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

PREAMBLE = b"\x00" * 128
PREFIX = b"DICM"

_SHORT = struct.Struct("<HH2sH")     # tag, VR, 2-byte length (most VRs)
_LONG = struct.Struct("<HH2s2xI")    # tag, VR, reserved, 4-byte length (OB, …)


def _element(element: int, vr: str, value: bytes) -> bytes:
    if vr in ("OB", "OW", "UN", "SQ", "UT"):
        return _LONG.pack(0x0002, element, vr.encode(), len(value)) + value
    return _SHORT.pack(0x0002, element, vr.encode(), len(value)) + value


def _text(value: str, pad: bytes) -> bytes:
    data = value.encode("ascii")
    return data + pad if len(data) & 1 else data


def file_meta_information(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                          source_ae_title: str | None = None) -> bytes:
    """Preamble, "DICM" and the group 0002 elements of PS3.10 Table 7.1-1.

    (0002,0000) File Meta Information Group Length, (0002,0001) Version
    00\\01, (0002,0002) Media Storage SOP Class UID, (0002,0003) Media
    Storage SOP Instance UID, (0002,0010) Transfer Syntax UID, (0002,0012)
    Implementation Class UID, (0002,0013) Implementation Version Name,
    (0002,0016) Source Application Entity Title.
    """
    before, after = _elements_around_the_instance(sop_class_uid, transfer_syntax,
                                                  source_ae_title)
    body = before + _element(0x0003, "UI", _text(sop_instance_uid, b"\x00")) + after
    group_length = _element(0x0000, "UL", struct.pack("<I", len(body)))
    return PREAMBLE + PREFIX + group_length + body


@functools.lru_cache(maxsize=256)
def _elements_around_the_instance(sop_class_uid: str, transfer_syntax: str,
                                  source_ae_title: str | None) -> tuple[bytes, bytes]:
    """The elements before and after (0002,0003): the same for every object a sender
    sends in one SOP class and transfer syntax (made once; the header is written for
    every received object)."""
    return (_element(0x0001, "OB", b"\x00\x01")
            + _element(0x0002, "UI", _text(sop_class_uid, b"\x00")),
            _element(0x0010, "UI", _text(transfer_syntax, b"\x00"))
            + _element(0x0012, "UI", _text(IMPLEMENTATION_CLASS_UID, b"\x00"))
            + _element(0x0013, "SH", _text(IMPLEMENTATION_VERSION_NAME, b" "))
            + (_element(0x0016, "AE", _text(source_ae_title, b" ")) if source_ae_title
               else b""))


class NotPart10Error(ValueError):
    """The file is not a DICOM Part 10 file (no "DICM" prefix, or a broken header)."""


def read_file_meta(handle) -> tuple[dict[str, str], int]:
    """Read a Part 10 file's preamble and group 0002; return its UIDs and the data set offset.

    Only what sending and filing need: Media Storage SOP Class / Instance UID
    and Transfer Syntax UID (keys ``sop_class_uid``, ``sop_instance_uid``,
    ``transfer_syntax``), and Source Application Entity Title
    (``source_ae_title``, when present). The data set starts at the returned offset.
    """
    head = handle.read(132)
    if len(head) < 132 or head[128:132] != PREFIX:
        raise NotPart10Error("no DICM prefix at offset 128")
    names = {0x0002: "sop_class_uid", 0x0003: "sop_instance_uid", 0x0010: "transfer_syntax",
             0x0016: "source_ae_title"}
    meta: dict[str, str] = {}
    offset = 132
    end = None
    while end is None or offset < end:
        header = handle.read(8)
        if len(header) < 8:
            raise NotPart10Error("file meta information truncated")
        group, element, vr = struct.unpack_from("<HH2s", header)
        if group != 0x0002:
            if end is None:        # no group length: the meta ends where group 0002 ends
                handle.seek(offset)
                break
            raise NotPart10Error(f"({group:04X},{element:04X}) inside the file meta information")
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
            extra = handle.read(4)
            if len(extra) < 4:
                raise NotPart10Error("file meta information truncated")
            (length,) = struct.unpack("<I", extra)
            offset += 12
        else:
            (length,) = struct.unpack_from("<H", header, 6)
            offset += 8
        if length > 1 << 16:
            raise NotPart10Error(f"(0002,{element:04X}) length {length}")
        value = handle.read(length)
        if len(value) < length:
            raise NotPart10Error("file meta information truncated")
        offset += length
        if element == 0x0000:
            end = offset + struct.unpack("<I", value)[0]
        elif element in names:
            meta[names[element]] = value.decode("ascii", "replace").rstrip("\x00 ")
    if "transfer_syntax" not in meta:
        raise NotPart10Error("no Transfer Syntax UID in the file meta information")
    return meta, offset
