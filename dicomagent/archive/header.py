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
from dicomagent.jsonencode import CODECS
from dicomagent.uids import EXPLICIT_VR_BIG_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN

_WANTED = set(INDEXED_TAGS)
_LAST_WANTED = max(INDEXED_TAGS)
_DICTIONARY_VR = {tag: dictionary_VR(tag) for tag in INDEXED_TAGS}
_LEVEL = {key.tag: (level, key, f"{key.tag:08X}") for level, keys in (
    ("patient", PATIENT_KEYS), ("study", STUDY_KEYS), ("series", SERIES_KEYS),
    ("instance", INSTANCE_KEYS)) for key in keys}
_NUMBERS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}
_SINGLE_VALUED_TEXT = {"LT", "ST", "UT", "UR"}
_CHARSET_VRS = {"SH", "LO", "ST", "LT", "UT", "UC", "PN"}


def scan_header(head: bytes, transfer_syntax: str, complete: bool = False
                ) -> dict[int, tuple[str, bytes]] | None:
    """Raw (VR, value) of the indexed tags among the top-level elements of ``head``.

    None when the head does not hold them all for certain (it ends before the
    pixel data or the last indexed tag, unless ``complete``: the head is the
    whole data set), or the syntax is not an uncompressed or encapsulated one
    with plain elements.
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
    while True:
        if complete and position == end:
            return found
        if end - position < 8:
            return None
        if implicit:
            group, element, length = header.unpack_from(head, position)
            raw_vr = None
        else:
            group, element, raw_vr, length = header.unpack_from(head, position)
        tag = group << 16 | element
        if tag > _LAST_WANTED:
            return found            # past every indexed tag: the head held them all
        if raw_vr in LONG_VRS:
            if end - position < 12:
                return None
            (length,) = u32.unpack_from(head, position + 8)
            position += 12
        else:
            position += 8
        if length == 0xFFFFFFFF:
            return None             # an undefined-length sequence: pydicom reads those
        if length > end - position:
            return None
        if tag in _WANTED:
            vr = (_DICTIONARY_VR.get(tag, "UN") if raw_vr is None
                  else raw_vr.decode("ascii", "replace"))
            if vr == "SQ" or vr == "UN":
                return None
            found[tag] = (vr, head[position:position + length])
        position += length


def _strings(vr: str, raw: bytes, codec: str) -> list[str]:
    text = raw.decode(codec if vr in _CHARSET_VRS else "ascii")
    if vr == "UI":
        text = text.rstrip("\x00 ")
    parts = [text] if vr in _SINGLE_VALUED_TEXT else text.split("\\")
    if vr in _SINGLE_VALUED_TEXT:
        return [parts[0].rstrip(" \x00")]
    return [part.strip(" \x00") if vr not in ("UI",) else part for part in parts]


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
    text = "\\".join(strings)
    if vr == "PN":
        values = []
        for name in strings:
            groups = name.split("=")
            value = {}
            for label, group in zip(("Alphabetic", "Ideographic", "Phonetic"), groups):
                if group:
                    value[label] = group
            values.append(value)
        return {"vr": vr, "Value": values}, text
    if vr == "IS":
        return {"vr": vr, "Value": [int(s) if s else None for s in strings]}, text
    if vr == "DS":
        return {"vr": vr, "Value": [float(s) if s else None for s in strings]}, text
    if not text:
        return {"vr": vr}, ""
    return {"vr": vr, "Value": [s if s else None for s in strings]}, text


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
        names = [n.strip(" \x00") for n in raw.decode("ascii").split("\\")]
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
