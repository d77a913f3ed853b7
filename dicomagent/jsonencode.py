"""PS3.18 Annex F DICOM JSON to PS3.5 bytes, for C-FIND responses.

The index keeps each level's attributes as DICOM JSON; a C-FIND response is
those attributes encoded in the presentation context's transfer syntax.
Going through pydicom (JSON -> Dataset -> bytes) costs most of a query's
time, so the common cases are encoded here directly: text, person names,
numbers, tags and sequences, in the character sets that have one Python
codec. Anything else (binary values, ISO 2022 character sets, a value the
character set cannot hold) raises ``Unsupported`` and the caller falls back
to pydicom.

References
----------
PS3.18 Annex F (DICOM JSON model); PS3.5 §6.2 (value representations),
§7.1 (data elements), §7.5 (sequences with defined length), §6.1.2.3
(character sets).
"""

from __future__ import annotations

import struct

from dicomagent.charsets import CODECS
from dicomagent.transcode import UNCOMPRESSED


class Unsupported(Exception):
    """Something this encoder leaves to pydicom."""


#: VRs whose text is in the Specific Character Set (PS3.5 §6.1.2.3); others are ASCII.
CHARSET_VRS = {"SH", "LO", "ST", "LT", "UT", "UC", "PN"}
#: PS3.5 Table 7.1-1: VRs with a 4-byte length in Explicit VR.
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
NUMBERS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "SV": "q",
           "UV": "Q"}
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def _text(vr: str, values: list, codec: str) -> bytes:
    if vr == "PN":
        parts = []
        for value in values:
            if isinstance(value, dict):
                parts.append("=".join(value.get(g, "") for g in _PN_GROUPS).rstrip("="))
            else:
                parts.append("" if value is None else str(value))
        text = "\\".join(parts)
    elif vr == "DS":
        text = "\\".join("" if v is None else _ds(v) for v in values)
    else:
        text = "\\".join("" if v is None else str(v) for v in values)
    try:
        data = text.encode(codec if vr in CHARSET_VRS else "ascii")
    except UnicodeEncodeError:
        raise Unsupported(f"{vr} value not in the character set") from None
    if len(data) & 1:
        data += b"\x00" if vr == "UI" else b" "
    return data


def _ds(value) -> str:
    text = str(value)
    if len(text) > 16:
        raise Unsupported("DS value longer than 16 characters")
    return text


def _value(vr: str, element: dict, codec: str, implicit: bool, little: bool) -> bytes:
    if "InlineBinary" in element or "BulkDataURI" in element:
        raise Unsupported("binary value")
    values = element.get("Value")
    if not values:
        return b""
    order = "<" if little else ">"
    if vr in NUMBERS:
        return struct.pack(f"{order}{len(values)}{NUMBERS[vr]}", *values)
    if vr == "AT":
        tags = [int(v, 16) for v in values]
        return struct.pack(f"{order}{2 * len(tags)}H",
                           *[half for t in tags for half in (t >> 16, t & 0xFFFF)])
    if vr == "SQ":
        items = []
        for item in values:
            body = encode_elements(item, implicit, little, codec)
            items.append(struct.pack(order + "HHI", 0xFFFE, 0xE000, len(body)) + body)
        return b"".join(items)
    if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
        raise Unsupported(f"{vr} value")
    return _text(vr, values, codec)


def encode_elements(elements: dict, implicit: bool, little: bool, codec: str = "ascii") -> bytes:
    """Encode a DICOM JSON object (one data set) in the given VR and byte order."""
    charset = elements.get("00080005")
    if charset is not None:
        names = charset.get("Value") or [""]
        if len(names) != 1 or names[0] not in CODECS:
            raise Unsupported(f"Specific Character Set {names}")
        codec = CODECS[names[0]]
    order = "<" if little else ">"
    short = struct.Struct(order + "HH2sH")
    long = struct.Struct(order + "HH2s2xI")
    bare = struct.Struct(order + "HHI")
    out = []
    for key in sorted(elements):
        element = elements[key]
        vr = element["vr"]
        group, number = int(key[:4], 16), int(key[4:], 16)
        data = _value(vr, element, codec, implicit, little)
        if implicit:
            out.append(bare.pack(group, number, len(data)))
        elif vr in LONG_VRS:
            out.append(long.pack(group, number, vr.encode(), len(data)))
        else:
            if len(data) > 0xFFFF:
                raise Unsupported(f"{vr} value of {len(data)} bytes")
            out.append(short.pack(group, number, vr.encode(), len(data)))
        out.append(data)
    return b"".join(out)


def encode_json(elements: dict, transfer_syntax: str) -> bytes:
    """A DICOM JSON data set in one of the uncompressed transfer syntaxes."""
    if transfer_syntax not in UNCOMPRESSED:
        raise Unsupported(f"transfer syntax {transfer_syntax}")
    implicit, little = UNCOMPRESSED[transfer_syntax]
    return encode_elements(elements, implicit, little)
