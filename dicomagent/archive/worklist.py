"""Worklist items: what is kept of them, and C-FIND matching on them.

Two worklists use this module: the Modality Worklist (``MODALITY``) and the
General Purpose Worklist (``GENERAL_PURPOSE``, whose work items are General
Purpose Scheduled Procedure Steps). Each is a ``Model``: a table of the
workflow store, the keys held in its columns, and, for the Modality
Worklist, the sequence whose item is the step.

A worklist item (PS3.4 K.6, PS3.3 Modality Worklist) is a data set with one
Scheduled Procedure Step Sequence item: the step to perform, the requested
procedure, the imaging service request, the visit and the patient (the seed's
Tables 49-57). An item with several steps is kept as one row per step, each
returned with its own step only, as PS3.4 K.6.1.2.2 asks of responses.

Matching follows the query/retrieve rules of PS3.4 C.2.2.2 and shares their
code (``dicomagent.archive.query``): the keys of ``MATCHING_KEYS`` are columns
of the ``worklist`` table and matched in SQL (single value, wild card, UID
list, range); Scheduled Procedure Step Start Date and Time, both given and
one a range, are matched together as one date-time range (C.2.2.2.5.1, as
worklist servers such as DCMTK's do); every other key with a value, nested
sequences included, is matched on the candidate rows in Python.

References
----------
PS3.4 K.6.1 (Modality Worklist Information Model), K.4.1.3 (SCP behaviour),
C.2.2.2 (matching); seed 3.1.3.2.6, Tables 49-57.
"""

from __future__ import annotations

from dataclasses import dataclass

import pydicom
from pydicom.datadict import dictionary_VR

from dicomagent.archive.query import (date_time_condition, element_matches,
                                      item_has_matching_key, value_condition, text_value)

SCHEDULED_PROCEDURE_STEP_SEQUENCE = 0x00400100
SPS_START_DATE, SPS_START_TIME = 0x00400002, 0x00400003


@dataclass(frozen=True)
class Column:
    keyword: str
    tag: int
    vr: str
    #: True for an attribute of the Scheduled Procedure Step Sequence item.
    in_step: bool = False
    #: Often multi-valued (any value may match): matched in Python, not SQL.
    multi_valued: bool = False


MATCHING_KEYS = (
    Column("PatientName", 0x00100010, "PN"),
    Column("PatientID", 0x00100020, "LO"),
    Column("PatientBirthDate", 0x00100030, "DA"),
    Column("PatientSex", 0x00100040, "CS"),
    Column("AccessionNumber", 0x00080050, "SH"),
    Column("ReferringPhysicianName", 0x00080090, "PN"),
    Column("RequestedProcedureID", 0x00401001, "SH"),
    Column("StudyInstanceUID", 0x0020000D, "UI"),
    Column("AdmissionID", 0x00380010, "LO"),
    Column("ScheduledStationAETitle", 0x00400001, "AE", True, True),
    Column("ScheduledProcedureStepStartDate", SPS_START_DATE, "DA", True),
    Column("ScheduledProcedureStepStartTime", SPS_START_TIME, "TM", True),
    Column("Modality", 0x00080060, "CS", True),
    Column("ScheduledPerformingPhysicianName", 0x00400006, "PN", True),
    Column("ScheduledProcedureStepID", 0x00400009, "SH", True),
    Column("ScheduledStationName", 0x00400010, "SH", True),
    Column("ScheduledProcedureStepLocation", 0x00400011, "SH", True),
    Column("ScheduledProcedureStepStatus", 0x00400020, "CS", True),
)
COLUMNS = tuple(key.keyword for key in MATCHING_KEYS)


@dataclass(frozen=True)
class Model:
    """A worklist: its table, its column keys, and the sequence holding the step."""

    table: str
    keys: tuple[Column, ...]
    step_sequence: int | None
    #: ORDER BY of the responses.
    order_by: str

    @property
    def top(self) -> dict[int, Column]:
        return {key.tag: key for key in self.keys if not key.in_step and not key.multi_valued}

    @property
    def step(self) -> dict[int, Column]:
        return {key.tag: key for key in self.keys if key.in_step and not key.multi_valued}


MODALITY = Model("worklist", MATCHING_KEYS, SCHEDULED_PROCEDURE_STEP_SEQUENCE,
                 "ScheduledProcedureStepStartDate, ScheduledProcedureStepStartTime, item_id")

#: General Purpose Worklist (PS3.4 2003, K.6.2): the keys of seed Tables 58-61 kept as
#: columns; the code sequences and human performers are matched in Python.
GP_MATCHING_KEYS = (
    Column("PatientName", 0x00100010, "PN"),
    Column("PatientID", 0x00100020, "LO"),
    Column("StudyInstanceUID", 0x0020000D, "UI"),
    Column("SOPInstanceUID", 0x00080018, "UI"),
    Column("ScheduledProcedureStepID", 0x00400009, "SH"),
    Column("GeneralPurposeScheduledProcedureStepStatus", 0x00404001, "CS"),
    Column("GeneralPurposeScheduledProcedureStepPriority", 0x00404003, "CS"),
    Column("ScheduledProcedureStepStartDateTime", 0x00404005, "DT"),
    Column("ExpectedCompletionDateTime", 0x00404011, "DT"),
    Column("InputAvailabilityFlag", 0x00404020, "CS"),
)
GP_COLUMNS = tuple(key.keyword for key in GP_MATCHING_KEYS)
GENERAL_PURPOSE = Model("gpsps", GP_MATCHING_KEYS, None,
                        "ScheduledProcedureStepStartDateTime, sop_instance_uid")

#: Not keys: Specific Character Set, and the File Meta group.
_NOT_KEYS = {0x00080005}


class InvalidItem(ValueError):
    """A data set that cannot be a worklist item (the message says why)."""


def split_item(ds: pydicom.Dataset) -> list[tuple[dict, dict]]:
    """(columns, DICOM JSON) for each Scheduled Procedure Step of a worklist item."""
    steps = ds.get(SCHEDULED_PROCEDURE_STEP_SEQUENCE)
    if steps is None or steps.VR != "SQ" or not steps.value:
        raise InvalidItem("Scheduled Procedure Step Sequence (0040,0100) missing or empty")
    try:
        whole = ds.to_json_dict()
    except Exception as error:  # noqa: BLE001 - pydicom's many ways to fail on a value
        raise InvalidItem(f"a value cannot be read: {error}") from None
    for key in list(whole):
        if key.startswith("0002"):
            del whole[key]
    key = f"{SCHEDULED_PROCEDURE_STEP_SEQUENCE:08X}"
    rows = []
    for step, step_json in zip(steps.value, whole[key]["Value"]):
        attrs = dict(whole)
        attrs[key] = {"vr": "SQ", "Value": [step_json]}
        columns = {}
        for column in MATCHING_KEYS:
            element = (step if column.in_step else ds).get(column.tag)
            columns[column.keyword] = text_value(element) if element is not None else ""
        rows.append((columns, attrs))
    return rows


@dataclass
class WorklistQuery:
    """SQL on a worklist's table, and what must still be matched in Python."""

    where: str
    params: list
    identifier: pydicom.Dataset
    #: The identifier's keys with values that SQL did not match (None: nothing left).
    remaining: pydicom.Dataset | None


def plan(identifier: pydicom.Dataset, model: Model = MODALITY) -> WorklistQuery:
    """Turn a worklist C-FIND identifier into a ``WorklistQuery`` on ``model``'s table."""
    params: list = []
    conditions: list[str] = []
    remaining = pydicom.Dataset()
    top = model.top
    for element in identifier:
        tag = int(element.tag)
        if tag in _NOT_KEYS or element.tag.group in (0x0000, 0x0002) or element.tag.element == 0:
            continue
        if tag == model.step_sequence and element.VR == "SQ":
            if element.value:
                rest = _plan_step(model, element.value[0], conditions, params)
                if rest is not None:
                    remaining.add_new(tag, "SQ", [rest])
            continue
        _plan_key(model.table, top, element, conditions, params, remaining)
    return WorklistQuery(" AND ".join(conditions) or "1", params, identifier,
                         remaining if len(remaining) else None)


def _plan_step(model: Model, item: pydicom.Dataset, conditions: list[str], params: list
               ) -> pydicom.Dataset | None:
    """Conditions for the step's column keys; the item of what is left, or None."""
    rest = pydicom.Dataset()
    date = item.get(SPS_START_DATE)
    time = item.get(SPS_START_TIME)
    combined = _combined(date, time)
    if combined:
        conditions.append(date_time_condition(
            model.table, "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime",
            text_value(date), text_value(time), params))
    step = model.step
    for element in item:
        if combined and int(element.tag) in (SPS_START_DATE, SPS_START_TIME):
            continue
        _plan_key(model.table, step, element, conditions, params, rest)
    return rest if len(rest) else None


def _plan_key(table: str, columns: dict[int, Column], element, conditions: list[str],
              params: list, rest: pydicom.Dataset) -> None:
    """A column key becomes an SQL condition; any other key with a value stays in ``rest``,
    to be matched in Python."""
    column = columns.get(int(element.tag))
    if column is not None and element.VR != "SQ":
        condition = value_condition(f"{table}.{column.keyword}", column.vr,
                                    text_value(element), params)
        if condition:
            conditions.append(condition)
    elif _has_value(element):
        rest.add(element)


def _combined(date, time) -> bool:
    """PS3.4 C.2.2.2.5.1: both given with a value, and one of them a range."""
    if date is None or time is None:
        return False
    date_text, time_text = text_value(date), text_value(time)
    return date_text.strip("*") != "" and time_text.strip("*") != "" and \
        ("-" in date_text or "-" in time_text)


def _has_value(element) -> bool:
    if element.VR == "SQ":
        return bool(element.value) and item_has_matching_key(element.value[0])
    return text_value(element).strip("*") != ""


def matches(query: WorklistQuery, attrs: dict) -> bool:
    """Python matching of what SQL left (PS3.4 C.2.2.2, sequence matching included)."""
    if query.remaining is None:
        return True
    stored = pydicom.Dataset.from_json(attrs)
    return all(element_matches(element, stored) for element in query.remaining)


def response(identifier: pydicom.Dataset, attrs: dict) -> dict:
    """The response identifier (DICOM JSON): each key of ``identifier`` with the stored
    value, or empty when the item has none (PS3.4 K.4.1.3.1); a sequence key with an
    item returns, from each stored item, the keys of that item."""
    out = project(identifier, attrs)
    if "00080005" in attrs:
        out["00080005"] = attrs["00080005"]
    return out


def project(query: pydicom.Dataset, stored: dict) -> dict:
    out: dict = {}
    for element in query:
        tag = int(element.tag)
        if tag in _NOT_KEYS or element.tag.group in (0x0000, 0x0002) or element.tag.element == 0:
            continue
        key = f"{tag:08X}"
        value = stored.get(key)
        if element.VR == "SQ" and element.value and value is not None:
            items = value.get("Value") or []
            out[key] = {"vr": "SQ", "Value": [project(element.value[0], item) for item in items]}
        elif value is not None:
            out[key] = value
        else:
            out[key] = {"vr": _vr(element)}
    return out


def _vr(element) -> str:
    if element.VR in ("UN", "OB or OW", "US or SS", "US or SS or OW"):
        try:
            return dictionary_VR(element.tag)
        except KeyError:
            return "UN"
    return element.VR
