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
    body = b"".join((
        _element(0x0001, "OB", b"\x00\x01"),
        _element(0x0002, "UI", _text(sop_class_uid, b"\x00")),
        _element(0x0003, "UI", _text(sop_instance_uid, b"\x00")),
        _element(0x0010, "UI", _text(transfer_syntax, b"\x00")),
        _element(0x0012, "UI", _text(IMPLEMENTATION_CLASS_UID, b"\x00")),
        _element(0x0013, "SH", _text(IMPLEMENTATION_VERSION_NAME, b" ")),
        _element(0x0016, "AE", _text(source_ae_title, b" ")) if source_ae_title else b"",
    ))
    group_length = _element(0x0000, "UL", struct.pack("<I", len(body)))
    return PREAMBLE + PREFIX + group_length + body
