"""Reading the index's attributes straight from a data set's first bytes.

Every stored object needs the few dozen attributes of the seed's query tables
(``keys.INDEXED_TAGS``). They sit in the data set's header, before the pixel
data; this reader walks the top-level elements of the in-memory head, keeps
the raw values of those tags, and turns them into what the index stores: text
for matching, DICOM JSON (PS3.18 F, as pydicom writes it) for returning.

It handles the common case only: no indexed sequence present, a Specific
Character Set with one Python codec, every indexed element inside the head.
Otherwise it returns None and the archive asks pydicom (``record_from_dataset``).

References
----------
PS3.5 §6.2 (VRs), §7.1 (elements), §6.1.2.3 (character sets); PS3.18 Annex F.
"""

from __future__ import annotations

import struct

from pydicom.datadict import dictionary_VR

from dicomagent.archive.index import InstanceRecord
from dicomagent.archive.keys import INDEXED_TAGS, INSTANCE_KEYS, PATIENT_KEYS, SERIES_KEYS, STUDY_KEYS
from dicomagent.archive.structure import EXPLICIT_HEADER, IMPLICIT_HEADER, LONG_VRS, U32
from dicomagent.charsets import CODECS
from dicomagent.uids import EXPLICIT_VR_BIG_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN

_WANTED = set(INDEXED_TAGS)
_LAST_WANTED = max(INDEXED_TAGS)
#: PS3.5 Table 6.2-1. An element with another VR is read with a 2-byte length by the filing
#: walk (as DCMTK reads it) and as implicit VR by pydicom: this reader leaves it to pydicom.
_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO",
                  b"LT", b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ",
                  b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT",
                  b"UV"))
#: Where pydicom stops reading (``stop_before_pixels``): Float, Double Float and Pixel Data.
_PIXEL_DATA = frozenset((0x7FE00008, 0x7FE00009, 0x7FE00010))
_DICTIONARY_VR = {tag: dictionary_VR(tag) for tag in INDEXED_TAGS}
#: The VRs each indexed tag may have (PS3.6); an element saying another is left to pydicom.
_ALLOWED_VRS = {tag: frozenset(vr.split(" or ")) for tag, vr in _DICTIONARY_VR.items()}
_LEVEL = {key.tag: (level, key, f"{key.tag:08X}") for level, keys in (
    ("patient", PATIENT_KEYS), ("study", STUDY_KEYS), ("series", SERIES_KEYS),
    ("instance", INSTANCE_KEYS)) for key in keys}
_NUMBERS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}
_SINGLE_VALUED_TEXT = {"LT", "ST", "UT", "UR"}
_CHARSET_VRS = {"SH", "LO", "ST", "LT", "UT", "UC", "PN"}
#: VRs whose values pydicom trims one by one (its ``convert_text``); of the others' values
#: (CS, DA, TM, DT, PN, IS, DS, ...) it trims the last one only.
_EACH_VALUE_TRIMMED = {"SH", "LO", "UC"}


def scan_header(head: bytes, transfer_syntax: str, complete: bool = False
                ) -> dict[int, tuple[str, bytes]] | None:
    """Raw (VR, value) of the indexed tags among the top-level elements of ``head``.

    The scan goes on past the last indexed tag, up to the pixel data (where pydicom
    stops reading too), to see that the tags ascend: a data set with elements out of
    order or repeated (against PS3.5 §7.1), or with a VR that PS3.5 does not know, is
    left to pydicom, which sorts them and reads such an element its own way.

    None when the head does not hold them all for certain (it ends before the
    last indexed tag; or, when ``complete`` says the head is the whole data set,
    before the pixel data or the end), or the syntax is not an uncompressed or
    encapsulated one with plain elements.
    """
    if transfer_syntax == "1.2.840.10008.1.2.1.99":
        return None
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    little = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    # One unpack per element header: (group, element, length) for implicit VR,
    # (group, element, VR, 2-byte length) for explicit VR.
    header = IMPLICIT_HEADER[little] if implicit else EXPLICIT_HEADER[little]
    u32 = U32[little]
    found: dict[int, tuple[str, bytes]] = {}
    position, end = 0, len(head)
    tag = -1
    while True:
        if complete and position == end:
            return found
        if end - position < 8:
            return _held(found, tag, complete)
        previous = tag
        if implicit:
            group, element, length = header.unpack_from(head, position)
            raw_vr = None
        else:
            group, element, raw_vr, length = header.unpack_from(head, position)
            if raw_vr not in _VRS:
                return None
        tag = group << 16 | element
        if tag <= previous or group < 0x0008:
            return None             # out of order, repeated, or command / file meta
        if tag in _PIXEL_DATA:
            return found
        if raw_vr in LONG_VRS:
            if end - position < 12:
                return _held(found, tag, complete)
            (length,) = u32.unpack_from(head, position + 8)
            position += 12
        else:
            position += 8
        if length == 0xFFFFFFFF or length > end - position:
            # An undefined-length sequence (pydicom reads those), or a value that runs
            # past the head.
            return _held(found, tag, complete)
        if tag in _WANTED:
            vr = (_DICTIONARY_VR.get(tag, "UN") if raw_vr is None
                  else raw_vr.decode("ascii", "replace"))
            if vr == "SQ" or vr not in _ALLOWED_VRS[tag]:
                return None         # a sequence, UN or a VR the tag cannot have
            found[tag] = (vr, head[position:position + length])
        position += length


def _held(found: dict, tag: int, complete: bool) -> dict | None:
    """What a scan that cannot go on at ``tag`` has: every indexed tag, when it got past
    the last one in a head cut short (what lies beyond is taken to ascend); else None —
    and always for a whole data set, whose every element pydicom would read."""
    return found if tag > _LAST_WANTED and not complete else None


def _strings(vr: str, raw: bytes, codec: str) -> list[str]:
    text = raw.decode(codec if vr in _CHARSET_VRS else "ascii")
    if vr == "UI":
        text = text.rstrip("\x00 ")
        if text.strip("0123456789.\\"):
            raise ValueError("not a UID (pydicom trims such a value its own way)")
    if vr in _SINGLE_VALUED_TEXT:
        return [text.rstrip(" \x00")]
    if vr == "UI":
        return text.split("\\")
    parts = text.rstrip(" \x00").split("\\")     # the padding of the last value first
    if any(part[:1] in (" ", "\x00") for part in parts):
        # Leading padding: insignificant for most of these VRs (PS3.5 Table 6.2-1), but
        # pydicom keeps it, and the index must not depend on which of the two read it.
        raise ValueError("a value with leading spaces: pydicom reads it")
    if vr in _EACH_VALUE_TRIMMED:
        return [part.rstrip(" \x00") for part in parts]
    if any(part[-1:] in (" ", "\x00") for part in parts):
        # "OT  \\MR": pydicom trims the end of the whole text only, for these VRs.
        raise ValueError("padding at the end of a value before another: pydicom reads it")
    return parts


def _json(vr: str, raw: bytes, codec: str, little: bool) -> tuple[dict, str]:
    """(DICOM JSON element, text for matching) as pydicom would give them."""
    if not raw:
        return {"vr": vr}, ""
    if vr in _NUMBERS:
        size = struct.calcsize(_NUMBERS[vr])
        values = list(struct.unpack(f"{'<' if little else '>'}{len(raw) // size}{_NUMBERS[vr]}",
                                    raw[:len(raw) - len(raw) % size]))
        return {"vr": vr, "Value": values}, "\\".join(str(v) for v in values)
    strings = _strings(vr, raw, codec)
    if vr == "PN":
        # As pydicom: empty trailing component groups dropped ("Doe=" is "Doe"), an
        # empty one before another kept ("=山田^太郎": no alphabetic name).
        names, values = [], []
        for name in strings:
            groups = name.split("=")
            while groups and not groups[-1]:
                groups.pop()
            names.append("=".join(groups))
            values.append(dict(zip(("Alphabetic", "Ideographic", "Phonetic"), groups)))
        text = "\\".join(names)
        return ({"vr": vr, "Value": values} if text else {"vr": vr}), text
    text = "\\".join(strings)
    if not text:
        return {"vr": vr}, ""               # padding only: empty, as a zero length is
    if vr in ("IS", "DS") and any(s != s.strip() for s in strings):
        # "3\n": Python's int() and float() take it, pydicom's text is "3": pydicom reads it.
        raise ValueError("a number with white space in it")
    if vr == "IS":
        return {"vr": vr, "Value": [int(s) if s else None for s in strings]}, text
    if vr == "DS":
        return {"vr": vr, "Value": [float(s) if s else None for s in strings]}, text
    return {"vr": vr, "Value": strings}, text           # an empty one is "", as pydicom has it


#: ``_json`` results by its arguments: the patient, study and series attributes are
#: the same for every object of a series. The elements are shared between records:
#: nobody changes them (they are packed into the index as they are).
_JSON_SEEN: dict = {}


def _json_seen(vr: str, raw: bytes, codec: str, little: bool) -> tuple[dict, str]:
    key = (vr, raw, codec, little)
    result = _JSON_SEEN.get(key)
    if result is None:
        if len(_JSON_SEEN) >= 4096:
            _JSON_SEEN.clear()
        result = _JSON_SEEN[key] = _json(vr, raw, codec, little)
    return result


def record_from_head(head: bytes, transfer_syntax: str, complete: bool = False
                     ) -> InstanceRecord | None:
    """The index record, read without pydicom; None when pydicom must do it."""
    found = scan_header(head, transfer_syntax, complete)
    if found is None or 0x00080018 not in found:
        return None         # nothing usable here: let pydicom judge the data set
    little = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    codec = "ascii"
    charset = ""
    charset_json = None
    if 0x00080005 in found:
        vr, raw = found.pop(0x00080005)
        names = [n.strip(" \x00") for n in raw.decode("ascii", "replace").split("\\")]
        if len(names) != 1 or names[0] not in CODECS:
            return None
        charset = names[0]
        codec = CODECS[charset]
        charset_json = {"vr": "CS", "Value": [charset]} if charset else {"vr": "CS"}
    values = {"patient": {}, "study": {}, "series": {}, "instance": {}}
    attrs = {"patient": {}, "study": {}, "series": {}, "instance": {}}
    try:
        for tag, (vr, raw) in found.items():
            level, key, name = _LEVEL[tag]
            element, text = _json_seen(vr, raw, codec, little)
            attrs[level][name] = element
            values[level][key.keyword] = text
    except (UnicodeDecodeError, ValueError, struct.error):
        return None
    return InstanceRecord.of_levels(values, attrs, charset, charset_json)


def uids_from_record(record: InstanceRecord) -> tuple[str, str, str, str]:
    """SOP Class, SOP Instance, Study and Series Instance UIDs of a record."""
    return (record.instance.get("SOPClassUID", ""), record.instance.get("SOPInstanceUID", ""),
            record.study.get("StudyInstanceUID", ""), record.series.get("SeriesInstanceUID", ""))
