"""PS3.4 C.2.2.2 and C.4.1: C-FIND matching, translated into SQL on the index.

``plan_query(identifier, model)`` reads a C-FIND (or C-MOVE/C-GET)
identifier and returns a ``Query``: the SQL that selects the matching
entities at the Query/Retrieve level, and what each response must return.
The kinds of matching (PS3.4 C.2.2.2):

- universal (an empty value, or only ``*``): no condition, the key is returned;
- single value: equality;
- list of UIDs (UI values separated by ``\\``): ``IN``;
- wild card (``*``, ``?`` on AE, CS, LO, LT, PN, SH, ST, UC, UT): SQLite ``GLOB``;
- range (DA, TM, DT: ``a-b``, ``-b``, ``a-``), and a Date and its Time
  combined into one date-time range (C.2.2.2.5.1);
- sequence matching: done in Python on the candidate rows (the sequences
  live in the index's msgpack records), see ``match_sequences``.

Keys the index does not hold are returned empty; if such a key had a value
the responses say so with status FF01 (C.4.1.3.1).

References
----------
PS3.4 C.2.2.2 (attribute matching), C.3 (levels and unique keys), C.4.1
(C-FIND SCP behaviour: hierarchical search), C.6.1 / C.6.2 (Study and Patient
Root information models).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag

from dicomagent.archive.keys import (INSTANCE_KEYS, PATIENT_KEYS, SERIES_COMPUTED_KEYS,
                                     SERIES_KEYS, STUDY_COMPUTED_KEYS, STUDY_KEYS, Key)

# C-FIND statuses (seed Table 40).
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900

WILDCARD_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"}
RANGE_VRS = {"DA", "TM", "DT"}

#: Table aliases in the SQL, by level.
ALIAS = {"PATIENT": "p", "STUDY": "s", "SERIES": "x", "IMAGE": "i"}

#: PS3.4 C.6.1.1 / C.6.2.1: the levels of each information model, top down.
MODEL_LEVELS = {
    "study": ("STUDY", "SERIES", "IMAGE"),
    "patient": ("PATIENT", "STUDY", "SERIES", "IMAGE"),
}

#: The unique key of each level (PS3.4 C.3.x).
UNIQUE_KEYS = {
    "PATIENT": 0x00100020,     # Patient ID
    "STUDY": 0x0020000D,       # Study Instance UID
    "SERIES": 0x0020000E,      # Series Instance UID
    "IMAGE": 0x00080018,       # SOP Instance UID
}

_STORED_LEVEL = {}
for _level, _keys in (("PATIENT", PATIENT_KEYS), ("STUDY", STUDY_KEYS), ("SERIES", SERIES_KEYS),
                      ("IMAGE", INSTANCE_KEYS)):
    for _key in _keys:
        _STORED_LEVEL[_key.tag] = (_level, _key)
_COMPUTED_LEVEL = {key.tag: ("STUDY", key) for key in STUDY_COMPUTED_KEYS}
_COMPUTED_LEVEL.update({key.tag: ("SERIES", key) for key in SERIES_COMPUTED_KEYS})

#: PS3.4 C.2.2.2.5.1: Date and Time keys that combine into one date-time range.
DATE_TIME_PAIRS = {
    0x00080020: 0x00080030,    # Study Date / Study Time
    0x00400244: 0x00400245,    # Performed Procedure Step Start Date / Time
    0x00080023: 0x00080033,    # Content Date / Content Time
    0x00700082: 0x00700083,    # Presentation Creation Date / Time
}

_NOT_KEYS = {0x00080005, 0x00080052, 0x00080054, 0x00080056}


class QueryError(Exception):
    """An identifier that does not fit the information model (status A900)."""

    def __init__(self, comment: str, status: int = IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS):
        self.status = status
        self.comment = comment
        super().__init__(comment)


@dataclass
class Query:
    level: str
    model: str
    sql: str
    params: list
    #: Top-level tags to return, in the identifier's order.
    return_tags: list[int]
    #: Sequence keys with a non-empty item: matched in Python on each row.
    sequence_filters: list[tuple[str, int, pydicom.Dataset]] = field(default_factory=list)
    #: An optional key had a value we cannot match on (status FF01).
    unsupported: bool = False


def text_value(element) -> str:
    """The value of an identifier element as the text DICOM would encode."""
    value = element.value
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def glob_pattern(value: str) -> str:
    """A DICOM wild card value as an SQLite GLOB pattern (``[`` is literal in DICOM)."""
    return value.replace("[", "[[]")


def _range_condition(column: str, value: str, params: list) -> str:
    """DA/TM/DT range ``lo-hi``: inclusive; a shorter bound matches every value it prefixes."""
    low, _, high = value.partition("-")
    parts = []
    if low:
        parts.append(f"{column} >= ?")
        params.append(low)
    if high:
        # "<= high, or starting with high" is "< high with its last character
        # incremented": a bound the index can use.
        parts.append(f"{column} < ?")
        params.append(high[:-1] + chr(ord(high[-1]) + 1))
    if not parts:
        return "1"
    return f"({column} <> '' AND {' AND '.join(parts)})"


def value_condition(column: str, vr: str, value: str, params: list) -> str | None:
    """The SQL condition for one key; None for universal matching.

    PS3.4 C.2.2.2.4: "*" matches any sequence of characters, the empty one
    included, so a value of only "*"s matches everything, absent values too.
    """
    if value == "" or value.strip("*") == "":
        return None
    if vr == "UI" and "\\" in value:
        uids = [uid for uid in value.split("\\") if uid]
        params.extend(uids)
        return f"{column} IN ({', '.join('?' * len(uids))})"
    if vr in RANGE_VRS and "-" in value:
        return _range_condition(column, value, params)
    if vr in WILDCARD_VRS and ("*" in value or "?" in value):
        params.append(glob_pattern(value))
        return f"{column} GLOB ?"
    params.append(value)
    return f"{column} = ?"


def _computed_condition(tag: int, value: str, params: list) -> str | None:
    """Modalities in Study matches studies with a series of any of the given modalities."""
    if tag != 0x00080061 or value in ("", "*"):
        return None
    parts = []
    for modality in value.split("\\"):
        if "*" in modality or "?" in modality:
            parts.append("m.Modality GLOB ?")
            params.append(glob_pattern(modality))
        else:
            parts.append("m.Modality = ?")
            params.append(modality)
    return (f"EXISTS (SELECT 1 FROM series m WHERE m.StudyInstanceUID = s.StudyInstanceUID "
            f"AND ({' OR '.join(parts)}))")


COMPUTED_SQL = {
    0x00080061: "(SELECT group_concat(Modality, '\\') FROM (SELECT DISTINCT Modality FROM "
                "series m WHERE m.StudyInstanceUID = s.StudyInstanceUID AND Modality <> '' "
                "ORDER BY Modality))",
    0x00201206: "(SELECT COUNT(*) FROM series m WHERE m.StudyInstanceUID = s.StudyInstanceUID)",
    0x00201208: "(SELECT COUNT(*) FROM instances n WHERE n.StudyInstanceUID = s.StudyInstanceUID)",
    0x00201209: "(SELECT COUNT(*) FROM instances n WHERE n.SeriesInstanceUID = x.SeriesInstanceUID)",
}

FROM_CLAUSE = {
    "PATIENT": "patients p",
    "STUDY": "studies s JOIN patients p ON p.patient_key = s.patient_key",
    "SERIES": ("series x JOIN studies s ON s.StudyInstanceUID = x.StudyInstanceUID "
               "JOIN patients p ON p.patient_key = s.patient_key"),
    "IMAGE": ("instances i JOIN series x ON x.SeriesInstanceUID = i.SeriesInstanceUID "
              "JOIN studies s ON s.StudyInstanceUID = x.StudyInstanceUID "
              "JOIN patients p ON p.patient_key = s.patient_key"),
}

ORDER_BY = {
    "PATIENT": "p.PatientID",
    "STUDY": "s.StudyDate, s.StudyTime, s.StudyInstanceUID",
    "SERIES": "CAST(x.SeriesNumber AS INTEGER), x.SeriesInstanceUID",
    "IMAGE": "CAST(i.InstanceNumber AS INTEGER), i.SOPInstanceUID",
}


def key_level(tag: int, model: str) -> tuple[str, Key, str] | None:
    """(level in ``model``, key, table alias) of an index key.

    Patient keys are study-level keys in the Study Root model (PS3.4
    C.6.1.1.2), but they are still stored in the patients table.
    """
    found = _STORED_LEVEL.get(tag) or _COMPUTED_LEVEL.get(tag)
    if found is None:
        return None
    level, key = found
    alias = ALIAS[level]
    if level == "PATIENT" and model == "study":
        return "STUDY", key, alias
    return level, key, alias


#: The tables joined at each level, as their aliases (top down).
JOINED = {"PATIENT": ("p",), "STUDY": ("p", "s"), "SERIES": ("p", "s", "x"),
          "IMAGE": ("p", "s", "x", "i")}


def plan_query(identifier: pydicom.Dataset, model: str, select_files: bool = False,
               combine_date_time: bool = False) -> Query:
    """Turn an identifier into SQL on the index (hierarchical search, PS3.4 C.4.1.3.1.1).

    ``select_files``: select the matching instances' files (for C-MOVE/C-GET)
    instead of the level's records. ``combine_date_time``: the SCU negotiated
    combined date-time matching (PS3.4 C.5.1.1.2, extended negotiation byte 2),
    so a Date and its Time are one range (C.2.2.2.5.1); otherwise each is
    matched on its own.
    """
    levels = MODEL_LEVELS[model]
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in levels:
        raise QueryError(f"Query/Retrieve Level {level!r} is not one of {', '.join(levels)}")
    depth = levels.index(level)
    params: list = []
    conditions: list[str] = []
    # PS3.4 C.4.1.2.1 / C.4.2.2.1: unique keys of every level above the query level.
    for upper in levels[:depth]:
        tag = UNIQUE_KEYS[upper]
        element = identifier.get(tag)
        value = text_value(element) if element is not None else ""
        if not value or "*" in value or "?" in value:
            raise QueryError(f"{keyword_for_tag(tag)} (unique key of the {upper} level) "
                             f"must be given for a {level} level query")
    query = Query(level, model, "", params, [])
    values: dict[int, str] = {}
    for element in identifier:
        tag = element.tag
        if tag in _NOT_KEYS or element.tag.group in (0x0000, 0x0002) or element.tag.element == 0:
            continue
        query.return_tags.append(tag)
        if element.VR == "SQ":
            value_present = bool(element.value) and item_has_matching_key(element.value[0])
        else:
            value_present = text_value(element).strip("*") != ""
        found = key_level(tag, model)
        if found is None or found[0] not in levels or levels.index(found[0]) > depth:
            if value_present:
                query.unsupported = True
            continue
        key_level_name, key, table = found
        if tag in _COMPUTED_LEVEL and tag != 0x00080061:
            if value_present:
                query.unsupported = True
            continue
        if element.VR == "SQ" or key.is_sequence:
            if value_present:
                query.sequence_filters.append((key_level_name, tag, element.value[0]))
            continue
        values[tag] = text_value(element)
        if tag == 0x00080061:
            condition = _computed_condition(tag, values[tag], params)
        elif combine_date_time and tag in DATE_TIME_PAIRS.values() \
                and _paired_date(identifier, tag):
            continue                      # handled with its date below
        elif combine_date_time and tag in DATE_TIME_PAIRS and _combined(identifier, tag):
            condition = date_time_condition(table, key.keyword,
                                             keyword_for_tag(DATE_TIME_PAIRS[tag]),
                                             values[tag], text_value(identifier[DATE_TIME_PAIRS[tag]]),
                                             params)
        else:
            column = f"{table}.{key.keyword}"
            condition = value_condition(column, key.vr, values[tag], params)
        if condition:
            conditions.append(condition)
    if select_files:
        select = "i.path, i.SOPClassUID, i.SOPInstanceUID, i.transfer_syntax"
        from_clause = FROM_CLAUSE["IMAGE"]
        order = "i.StudyInstanceUID, i.SeriesInstanceUID, CAST(i.InstanceNumber AS INTEGER)"
    else:
        columns = [f"{alias}.attrs" for alias in JOINED[level]]
        columns += [f"{COMPUTED_SQL[tag]}" for tag in query.return_tags
                    if tag in COMPUTED_SQL and computed_visible(tag, level)]
        select = ", ".join(columns)
        from_clause = FROM_CLAUSE[level]
        order = ORDER_BY[level]
    where = " AND ".join(conditions) if conditions else "1"
    query.sql = f"SELECT {select} FROM {from_clause} WHERE {where} ORDER BY {order}"
    return query


def item_has_matching_key(item: pydicom.Dataset) -> bool:
    """PS3.4 C.2.2.2.6: an item whose keys are all zero length (or "*") only asks for
    them to be returned; it does not select (DCMTK writes ``-k Seq[0].Key`` so)."""
    for element in item:
        if element.VR == "SQ":
            if element.value and item_has_matching_key(element.value[0]):
                return True
        elif text_value(element).strip("*") != "":
            return True
    return False


def computed_visible(tag: int, level: str) -> bool:
    """Computed study keys at STUDY level, the series count at SERIES level."""
    return (tag in (0x00080061, 0x00201206, 0x00201208) and level == "STUDY") or \
        (tag == 0x00201209 and level == "SERIES")


def _paired_date(identifier: pydicom.Dataset, time_tag: int) -> bool:
    """True when this Time key is combined with its Date key (see ``_combined``)."""
    for date_tag, paired in DATE_TIME_PAIRS.items():
        if paired == time_tag and date_tag in identifier:
            return _combined(identifier, date_tag)
    return False


def _combined(identifier: pydicom.Dataset, date_tag: int) -> bool:
    """PS3.4 C.2.2.2.5.1: a Date and its Time, both with values, one of them a range."""
    time_tag = DATE_TIME_PAIRS[date_tag]
    if time_tag not in identifier:
        return False
    date = text_value(identifier[date_tag])
    time = text_value(identifier[time_tag])
    return bool(date) and bool(time) and date != "*" and time != "*" and \
        ("-" in date or "-" in time)


def date_time_condition(alias: str, date_column: str, time_column: str, date: str, time: str,
                         params: list) -> str:
    """Date and Time as one date-time range: ``date-date`` with ``time-time`` spans
    from the first date at the first time to the last date at the last time.

    Both keys have values, so an entity matches only when it has both a date and a time
    (C.2.2.2.1: a key with a value does not match an empty or absent attribute): without
    its time, a date alone would compare as midnight."""
    date_low, _, date_high = date.partition("-") if "-" in date else (date, "", date)
    time_low, _, time_high = time.partition("-") if "-" in time else (time, "", time)
    date_column, time_column = f"{alias}.{date_column}", f"{alias}.{time_column}"
    column = f"({date_column} || {time_column})"
    low = date_low + time_low if date_low else ""
    high = date_high + time_high if date_high else ""
    if date_high and not time_high:
        high = date_high
    both = f"COALESCE({date_column}, '') <> '' AND COALESCE({time_column}, '') <> ''"
    return f"({both} AND {_range_condition(column, f'{low}-{high}', params)})"


def _matches_text(vr: str, query: str, stored: str) -> bool:
    """Python form of ``value_condition``, for keys inside sequence items."""
    if query.strip("*") == "":
        return True
    if vr == "UI" and "\\" in query:
        return stored in query.split("\\")
    if vr in RANGE_VRS and "-" in query:
        low, _, high = query.partition("-")
        if not stored:
            return False
        return (not low or stored >= low) and (not high or stored <= high or stored.startswith(high))
    if vr in WILDCARD_VRS and ("*" in query or "?" in query):
        import fnmatch
        return fnmatch.fnmatchcase(stored, query.replace("[", "[[]"))
    return stored == query


def item_matches(query_item: pydicom.Dataset, stored_items: list[pydicom.Dataset]) -> bool:
    """PS3.4 C.2.2.2.6: sequence matching — some stored item matches every key of the query item."""
    for stored in stored_items:
        if all(element_matches(element, stored) for element in query_item):
            return True
    return False


def element_matches(element, stored: pydicom.Dataset) -> bool:
    if element.VR == "SQ":
        if not element.value or not item_has_matching_key(element.value[0]):
            return True
        other = stored.get(element.tag)
        return other is not None and item_matches(element.value[0], list(other.value or []))
    query = text_value(element)
    if query.strip("*") == "":
        return True
    other = stored.get(element.tag)
    if other is None:
        return False
    if other.VM > 1 and element.VR != "UI":
        # A multi-valued attribute matches when one of its values does.
        return any(_matches_text(element.VR, query, str(value)) for value in other.value)
    return _matches_text(element.VR, query, text_value(other))


def vr_of(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"
