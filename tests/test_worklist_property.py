"""Modality Worklist C-FIND matching agrees with the PS3.4 C.2.2.2 rules, on random worklists.

Hypothesis builds a small worklist (one to four items, pydicom data sets with one or two
Scheduled Procedure Step Sequence (0040,0100) items each), stores it the way the daemon
does (``worklist.split_item``, one row per step, then ``WorkflowStore.add_worklist_items``
into a store in a temporary file, emptied between examples), and draws a random
identifier from what the items hold: Patient's Name, Patient ID, Accession Number,
Requested Procedure ID, Requested Procedure Description, Study Instance UID, and in the
identifier's Scheduled Procedure Step Sequence item Modality, Scheduled Station AE Title,
Scheduled Procedure Step Start Date and Start Time, Scheduled Performing Physician's
Name, Scheduled Procedure Step ID and Scheduled Protocol Code Sequence > Code Value /
Coding Scheme Designator; with universal (zero length, only "*"), single value, wild card
("*", "?"), range (``a-b``, ``a-``, ``-b`` on DA and TM) and UID list values. The rows
the SCP selects (``worklist.plan``'s SQL through ``WorkflowStore.query_worklist``, then
``worklist.matches``) must be exactly the rows ``reference_rows`` selects: a direct
reading of PS3.4 C.2.2.2 over the items, written without looking at the implementation's
matching code. A row is one step of an item, matched with its own step only (PS3.4
K.6.1.2.2).

Stored values include characters that SQL LIKE and GLOB give a meaning ("_", "%", "[")
and a multi-valued Scheduled Station AE Title (``AA32\\AA33``): a multi-valued attribute
matches when one of its values does (C.2.2.2.1). Matching is case-sensitive (also for
PN, which C.2.2.2.1 lets an SCP match case-insensitively; this SCP does not).

Interpretations:

- PS3.4 C.2.2.2.5.1 (combined Date and Time range): Scheduled Procedure Step Start Date
  and Start Time, both with values and at least one of them a range, are one date-time
  range from the first date at the first time to the last date at the last time; a
  missing lower time is the start of the day, a missing upper time its end; a missing
  lower (upper) date leaves the range open below (above). A row without a date or a time
  is outside any such range (``test_combined_range_needs_date_and_time`` holds such
  rows, one case each). The random identifiers never pair a date range with a
  single time (the combination has no clear meaning); they do generate a single date
  with a time range and a date range with a time range (also one whose lower time is
  later in the day than its upper time, which a date range of several days makes
  meaningful).
- A time bound of coarser precision covers its whole period (``0930`` as an upper bound
  is up to 09:30:59, as a lower bound from 09:30:00); a stored time of fewer digits
  (``0930``, ``14``) is that time with the missing digits zero. No two stored times are
  the same time written differently, so single value (exact) matching of times needs no
  reading beyond C.2.2.2.1.

References
----------
PS3.4 C.2.2.2 (attribute matching), K.6.1 (Modality Worklist Information Model),
K.4.1.3 (SCP behaviour).
"""

from __future__ import annotations

import os
import tempfile

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from dicomagent.archive.workflow import WorkflowStore
from dicomagent.archive.worklist import MODALITY, matches, plan, split_item


@pytest.fixture(autouse=True)
def no_value_validation():
    """Wild cards and ranges in identifiers are what this file is about: pydicom need not
    warn of them."""
    settings_ = pydicom.config.settings
    saved = settings_.reading_validation_mode, settings_.writing_validation_mode
    settings_.reading_validation_mode = settings_.writing_validation_mode = pydicom.config.IGNORE
    yield
    settings_.reading_validation_mode, settings_.writing_validation_mode = saved


# --- the worklist --------------------------------------------------------------------------------

ROOT = "1.2.826.0.1.3680043.8.498.77."
STUDY_UIDS = [ROOT + "1", ROOT + "2", ROOT + "12"]
DATES = ["20240110", "20240111", "20240301", "20241231"]
TIMES = ["080000", "120000", "163000", "0930", "14"]
CODE_VALUES = ["PROTO-CT1", "PROTO-MR", "X_1", "XY1"]
SCHEMES = ["99LOCAL", "DCM"]

#: keyword -> values an item may hold (None: the attribute is absent).
ITEM_POOL = {
    "PatientName": ["DOE^JOHN", "DOE^JANE", "SMITH^ANN", "", None],
    "PatientID": ["PID1", "PID2", "P_1", "PX1"],
    "AccessionNumber": ["ACC1", "ACC2", "ACC10", "A%C", "A[1]C", "A_C", "AXC", "", None],
    "RequestedProcedureID": ["RP1", "RP2", "RP10", None],
    "RequestedProcedureDescription": ["CT HEAD", "MR KNEE", "", None],
    "StudyInstanceUID": STUDY_UIDS + [None],
}
#: keyword -> values a Scheduled Procedure Step may hold.
STEP_POOL = {
    "Modality": ["CT", "MR", "US"],
    "ScheduledStationAETitle": ["AA32", "AA33", "AA32\\AA33", "STN1", None],
    "ScheduledProcedureStepStartDate": DATES + [None],
    "ScheduledProcedureStepStartTime": TIMES + ["", None],
    "ScheduledPerformingPhysicianName": ["HOUSE^GREG", "WHO^", "", None],
    "ScheduledProcedureStepID": ["SPS1", "SPS2", "SPS10"],
}
TOP_KEYS = list(ITEM_POOL)
STEP_KEYS = list(STEP_POOL) + ["ScheduledProtocolCodeSequence"]
DATE_KEY, TIME_KEY = "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime"
TEXT_VRS = {"AE", "CS", "LO", "PN", "SH"}


def vr(keyword: str) -> str:
    return pydicom.datadict.dictionary_VR(keyword)


def present(pool: dict):
    return st.fixed_dictionaries({k: st.sampled_from(v) for k, v in pool.items()}).map(
        lambda d: {k: v for k, v in d.items() if v is not None})


protocol_codes = st.lists(
    st.fixed_dictionaries({"CodeValue": st.sampled_from(CODE_VALUES),
                           "CodingSchemeDesignator": st.sampled_from(SCHEMES)}),
    min_size=1, max_size=2)
steps = st.tuples(present(STEP_POOL), st.one_of(st.none(), protocol_codes)).map(
    lambda t: {**t[0], **({"ScheduledProtocolCodeSequence": t[1]} if t[1] else {})})
#: An item: top-level attributes, and "steps", a list of one or two step dicts.
items = st.tuples(present(ITEM_POOL), st.lists(steps, min_size=1, max_size=2)).map(
    lambda t: {**t[0], "steps": t[1]})
worklists = st.lists(items, min_size=1, max_size=4)


def _fill(ds: Dataset, attrs: dict) -> Dataset:
    for keyword, value in attrs.items():
        if isinstance(value, list):
            setattr(ds, keyword, [_fill(Dataset(), entry) for entry in value])
        else:
            ds.add_new(pydicom.datadict.tag_for_keyword(keyword), vr(keyword),
                       value if value != "" else None)
    return ds


def dataset_of(item: dict) -> Dataset:
    ds = _fill(Dataset(), {k: v for k, v in item.items() if k != "steps"})
    ds.ScheduledProcedureStepSequence = [_fill(Dataset(), step) for step in item["steps"]]
    return ds


def fill_store(store: WorkflowStore, worklist: list[dict]) -> dict[int, tuple[int, int]]:
    """Empty the store, add every item as the daemon does; row id -> (item, step)."""
    store.remove_worklist_items([row[0] for row in store.worklist_items()])
    assert store.worklist_items() == []
    rows = {}
    for i, item in enumerate(worklist):
        split = split_item(dataset_of(item))
        assert len(split) == len(item["steps"])
        ids = store.add_worklist_items([(columns, attrs, "test") for columns, attrs in split])
        for s, row_id in enumerate(ids):
            rows[row_id] = (i, s)
    return rows


# --- the reference matcher: PS3.4 C.2.2.2, read directly ---------------------------------------

def universal(query: str) -> bool:
    """C.2.2.2.3: zero length; C.2.2.2.4: only "*" matches any value, even none."""
    return query == "" or set(query) == {"*"}


def wildcard(pattern: str, value: str) -> bool:
    """C.2.2.2.4: "*" any run of characters (also none), "?" one character, all else literal."""
    def match(p: int, v: int) -> bool:
        if p == len(pattern):
            return v == len(value)
        if pattern[p] == "*":
            return any(match(p + 1, w) for w in range(v, len(value) + 1))
        if v < len(value) and (pattern[p] == "?" or pattern[p] == value[v]):
            return match(p + 1, v + 1)
        return False

    return match(0, 0)


def time_point(text: str, end: bool = False) -> str:
    """A TM value as HHMMSS: missing minutes and seconds are 00 (a stored value, a lower
    bound) or 59 (an upper bound, which covers its whole period)."""
    fill = "59" if end else "00"
    hours, minutes, seconds = text[0:2], text[2:4] or fill, text[4:6] or fill
    return hours + minutes + seconds


def bounds(query: str) -> tuple[str, str]:
    """C.2.2.2.5: ``a-b``, ``a-``, ``-b``; a single value is both bounds."""
    if "-" in query:
        low, high = query.split("-")
        return low, high
    return query, query


def one_value(keyword: str, query: str, stored: str) -> bool:
    """Does one stored value match a non-universal key value?"""
    kind = vr(keyword)
    if kind == "UI":
        return stored in query.split("\\")                          # C.2.2.2.2
    if kind == "DA" and "-" in query:                                # C.2.2.2.5
        low, high = bounds(query)
        return (not low or stored >= low) and (not high or stored <= high)
    if kind == "TM" and "-" in query:
        low, high = bounds(query)
        at = time_point(stored)
        return (not low or at >= time_point(low)) and (not high or at <= time_point(high, True))
    if kind in TEXT_VRS and ("*" in query or "?" in query):
        return wildcard(query, stored)                               # C.2.2.2.4
    return stored == query                                           # C.2.2.2.1, case-sensitive


def key_matches(keyword: str, query: str, stored: str | None) -> bool:
    if universal(query):
        return True
    if not stored:                       # absent or zero length: only universal matches
        return False
    # C.2.2.2.1: an attribute with several values matches when one of them does.
    return any(one_value(keyword, query, value) for value in stored.split("\\"))


def date_time_matches(date_q: str, time_q: str, date: str | None, time: str | None) -> bool:
    """C.2.2.2.5.1: one range from the first date at the first time to the last date at
    the last time (see the module docstring)."""
    if not date or not time:
        return False
    date_low, date_high = bounds(date_q)
    time_low, time_high = bounds(time_q)
    at = (date, time_point(time))
    low = (date_low, time_point(time_low) if time_low else "000000")
    high = (date_high, time_point(time_high, True) if time_high else "235959")
    return (not date_low or at >= low) and (not date_high or at <= high)


def sequence_matches(query_item: dict, stored_items: list[dict] | None) -> bool:
    """C.2.2.2.6: some stored item matches every key of the query item; an item of only
    universal keys asks for the sequence to be returned and selects nothing out."""
    keys = {k: v for k, v in query_item.items() if not universal(v)}
    if not keys:
        return True
    return any(all(key_matches(k, v, stored.get(k)) for k, v in keys.items())
               for stored in stored_items or [])


def step_matches(query_step: dict, step: dict) -> bool:
    date_q, time_q = query_step.get(DATE_KEY, ""), query_step.get(TIME_KEY, "")
    together = not universal(date_q) and not universal(time_q) and \
        ("-" in date_q or "-" in time_q)
    for keyword, query in query_step.items():
        if keyword == "ScheduledProtocolCodeSequence":
            ok = sequence_matches(query, step.get(keyword))
        elif together and keyword in (DATE_KEY, TIME_KEY):
            ok = date_time_matches(date_q, time_q, step.get(DATE_KEY), step.get(TIME_KEY))
        else:
            ok = key_matches(keyword, query, step.get(keyword))
        if not ok:
            return False
    return True


def reference_rows(worklist: list[dict], top: dict, query_step: dict | None
                   ) -> set[tuple[int, int]]:
    """(item, step) of every row the identifier selects. A row is an item with one of its
    steps: the top-level keys are matched on the item, the step's keys on that step."""
    selected = set()
    for i, item in enumerate(worklist):
        if not all(key_matches(k, v, item.get(k)) for k, v in top.items()):
            continue
        for s, step in enumerate(item["steps"]):
            if query_step is None or step_matches(query_step, step):
                selected.add((i, s))
    return selected


# --- random identifiers --------------------------------------------------------------------------

def _stored(worklist: list[dict], keyword: str) -> list[str]:
    """The single values the worklist holds for a keyword (multi-valued ones split)."""
    found = []
    for item in worklist:
        for where in [item, *item["steps"]]:
            value = where.get(keyword)
            for part in (value.split("\\") if isinstance(value, str) and value else []):
                if part not in found:
                    found.append(part)
    return found or ["NOPE"]


@st.composite
def text_query(draw, stored: list[str]) -> str:
    """A value for a text key built from one the worklist holds."""
    value = draw(st.sampled_from(stored))
    kind = draw(st.sampled_from(["single", "single", "prefix", "suffix", "inner", "question",
                                 "universal", "missing", "case"]))
    if kind == "single":
        return value
    if kind == "universal":
        return draw(st.sampled_from(["", "*", "**"]))
    if kind == "missing":
        return value + "Z"
    if kind == "case":
        return value.lower()
    cut = draw(st.integers(0, len(value)))
    if kind == "prefix":
        return value[:cut] + "*"
    if kind == "suffix":
        return "*" + value[cut:]
    if kind == "inner":
        return "*" + value[cut:cut + 2] + "*"
    position = draw(st.integers(0, len(value) - 1))
    return value[:position] + "?" + value[position + 1:]


#: Precisions a range bound may have: a time to the second, minute or hour.
PRECISIONS = {"DA": [8], "TM": [6, 6, 4, 2]}


@st.composite
def range_query(draw, keyword: str, stored: list[str]) -> str:
    kind_vr = vr(keyword)
    pool = DATES if kind_vr == "DA" else TIMES
    values = sorted(set([v for v in stored if v != "NOPE"] + pool))

    def bound() -> str:
        return draw(st.sampled_from(values))[:draw(st.sampled_from(PRECISIONS[kind_vr]))]

    kind = draw(st.sampled_from(["closed", "closed", "open-end", "open-start", "single",
                                 "universal"]))
    if kind == "closed":
        low, high = sorted([bound(), bound()])
        return f"{low}-{high}"
    if kind == "open-end":
        return f"{bound()}-"
    if kind == "open-start":
        return f"-{bound()}"
    if kind == "single":
        return draw(st.sampled_from(values))
    return ""


@st.composite
def uid_query(draw, stored: list[str]) -> str:
    kind = draw(st.sampled_from(["single", "list", "list", "universal", "missing"]))
    if kind == "single":
        return draw(st.sampled_from(stored))
    if kind == "list":
        return "\\".join(draw(st.lists(st.sampled_from(stored + [ROOT + "404"]),
                                       min_size=2, max_size=3, unique=True)))
    if kind == "missing":
        return ROOT + "404"
    return ""


@st.composite
def key_value(draw, worklist: list[dict], keyword: str):
    if keyword == "ScheduledProtocolCodeSequence":
        codes = [c for item in worklist for step in item["steps"]
                 for c in step.get(keyword, [])] or [{"CodeValue": "NOPE",
                                                      "CodingSchemeDesignator": "NOPE"}]
        return draw(st.fixed_dictionaries(
            {}, optional={"CodeValue": text_query([c["CodeValue"] for c in codes]),
                          "CodingSchemeDesignator": text_query(
                              [c["CodingSchemeDesignator"] for c in codes])}).filter(bool))
    stored = _stored(worklist, keyword)
    kind = vr(keyword)
    if kind == "UI":
        return draw(uid_query(stored))
    if kind in PRECISIONS:
        return draw(range_query(keyword, stored))
    return draw(text_query(stored))


@st.composite
def date_time_query(draw, worklist: list[dict]) -> tuple[str, str]:
    """A Start Date and a Start Time key for C.2.2.2.5.1: a time range with a date range
    (closed, mostly of several days, or open) or with a single date."""
    dates = sorted(set([d for d in _stored(worklist, DATE_KEY) if d != "NOPE"] + DATES))
    times = sorted(set([t for t in _stored(worklist, TIME_KEY) if t != "NOPE"] + TIMES))
    first, last = sorted(draw(st.lists(st.sampled_from(dates), min_size=2, max_size=2,
                                       unique=True)))
    date = draw(st.sampled_from([f"{first}-{last}", f"{first}-{last}", f"{first}-{first}",
                                 f"{first}-", f"-{last}", first, last]))
    start, end = draw(st.lists(st.sampled_from(times), min_size=2, max_size=2))
    start = start[:draw(st.sampled_from(PRECISIONS["TM"]))]
    end = end[:draw(st.sampled_from(PRECISIONS["TM"]))]
    if "-" not in date or date == f"{first}-{first}":
        # Within one day a range whose start is after its end means nothing.
        start, end = sorted([start, end], key=time_point)
    time = draw(st.sampled_from([f"{start}-{end}", f"{start}-{end}", f"{start}-", f"-{end}"]))
    return date, time


@st.composite
def identifiers(draw, worklist: list[dict]) -> tuple[dict, dict | None]:
    """(top-level keys, keys of the Scheduled Procedure Step item or None when the
    identifier has no such sequence)."""
    # Values drawn from one item match more often than values of the whole worklist.
    source = st.sampled_from([[item] for item in worklist] + [worklist])
    top = {k: draw(key_value(draw(source), k))
           for k in draw(st.lists(st.sampled_from(TOP_KEYS), max_size=3, unique=True))}
    step = {k: draw(key_value(draw(source), k))
            for k in draw(st.lists(st.sampled_from(STEP_KEYS), max_size=3, unique=True))}
    if draw(st.integers(0, 2)) == 0:
        step[DATE_KEY], step[TIME_KEY] = draw(date_time_query(draw(source)))
    if draw(st.integers(0, 3)) == 0:           # a text key whose stored values mean much to SQL
        keyword = draw(st.sampled_from(["AccessionNumber", "ScheduledStationAETitle",
                                        "ScheduledProtocolCodeSequence", "PatientID"]))
        (step if keyword in STEP_KEYS else top)[keyword] = draw(key_value(worklist, keyword))
    # A date range with a single time has no clear combined meaning: make the time universal.
    date_q, time_q = step.get(DATE_KEY), step.get(TIME_KEY)
    if date_q and "-" in date_q and time_q and not universal(time_q) and "-" not in time_q:
        step[TIME_KEY] = ""
    if not step:
        # No step keys: no sequence, an empty item, or an item of return keys only.
        return top, draw(st.sampled_from([None, {}, {"Modality": "", DATE_KEY: ""},
                                          {"ScheduledProtocolCodeSequence": {"CodeValue": ""}}]))
    return top, step


def identifier_dataset(top: dict, step: dict | None) -> Dataset:
    def fill(ds: Dataset, keys: dict) -> Dataset:
        for keyword, value in keys.items():
            if isinstance(value, dict):
                setattr(ds, keyword, [fill(Dataset(), value)])
            else:
                ds.add_new(pydicom.datadict.tag_for_keyword(keyword), vr(keyword),
                           value if value != "" else None)
        return ds

    ds = fill(Dataset(), top)
    if step is not None:
        ds.ScheduledProcedureStepSequence = [fill(Dataset(), step)]
    return ds


def scp_rows(store: WorkflowStore, top: dict, step: dict | None) -> list[int]:
    """The SCP's way: ``plan``'s SQL through ``query_worklist``, then ``matches``."""
    query = plan(identifier_dataset(top, step), MODALITY)
    return [item_id for item_id, attrs in store.query_worklist(query.where, query.params)
            if matches(query, attrs)]


@pytest.fixture
def store():
    """A ``WorkflowStore`` in a temporary file; each example empties and refills it."""
    with tempfile.TemporaryDirectory() as directory:
        store = WorkflowStore(os.path.join(directory, "index.sqlite"))
        yield store
        store.close()


@settings(max_examples=800, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), worklist=worklists)
def test_worklist_matching_agrees_with_reference(store, data, worklist):
    rows = fill_store(store, worklist)
    top, step = data.draw(identifiers(worklist), label="identifier (top, step)")
    found = scp_rows(store, top, step)
    assert len(found) == len(set(found)), f"a row returned twice: {found}"
    expected = reference_rows(worklist, top, step)
    assert sorted(rows[row_id] for row_id in found) == sorted(expected), (top, step)


# --- readings of the standard, one case each -----------------------------------------------------

SMALL = [
    {"PatientName": "DOE^JOHN", "PatientID": "PID1", "AccessionNumber": "A_C",
     "StudyInstanceUID": STUDY_UIDS[0],
     "steps": [{"Modality": "CT", "ScheduledStationAETitle": "AA32\\AA33",
                DATE_KEY: "20240110", TIME_KEY: "163000", "ScheduledProcedureStepID": "SPS1",
                "ScheduledProtocolCodeSequence": [{"CodeValue": "PROTO-CT1",
                                                   "CodingSchemeDesignator": "99LOCAL"}]},
               {"Modality": "MR", "ScheduledStationAETitle": "STN1",
                DATE_KEY: "20240111", TIME_KEY: "0930", "ScheduledProcedureStepID": "SPS2"}]},
    {"PatientName": "SMITH^ANN", "PatientID": "PID2", "AccessionNumber": "AXC",
     "StudyInstanceUID": STUDY_UIDS[1],
     "steps": [{"Modality": "US", DATE_KEY: "20240111", TIME_KEY: "14",
                "ScheduledProcedureStepID": "SPS10"}]},
]

#: (top keys, step keys, expected (item, step) rows).
FIXED_CASES = [
    ({}, None, [(0, 0), (0, 1), (1, 0)]),
    ({"PatientName": "DOE^*"}, None, [(0, 0), (0, 1)]),
    ({"PatientName": "doe^john"}, None, []),                          # case-sensitive
    ({"AccessionNumber": "A_C"}, None, [(0, 0), (0, 1)]),                     # "_" is literal
    ({"AccessionNumber": "A?C"}, None, [(0, 0), (0, 1), (1, 0)]),
    ({"StudyInstanceUID": f"{STUDY_UIDS[1]}\\{ROOT}404"}, None, [(1, 0)]),
    ({}, {"ScheduledStationAETitle": "AA33"}, [(0, 0)]),              # one of its values
    ({}, {"ScheduledStationAETitle": "*"}, [(0, 0), (0, 1), (1, 0)]),
    ({}, {"ScheduledStationAETitle": "A*"}, [(0, 0)]),                # absent: no match
    ({}, {"Modality": "MR"}, [(0, 1)]),                               # its own step only
    ({}, {TIME_KEY: "-1000"}, [(0, 1)]),                              # 0930 is 09:30:00
    ({}, {TIME_KEY: "14-1400"}, [(1, 0)]),
    ({}, {DATE_KEY: "20240110-20240111", TIME_KEY: "1200-1000"}, [(0, 0), (0, 1)]),
    ({}, {DATE_KEY: "20240111", TIME_KEY: "0900-1359"}, [(0, 1)]),
    ({}, {DATE_KEY: "20240111", TIME_KEY: "0900-14"}, [(0, 1), (1, 0)]),
    ({}, {DATE_KEY: "-20240111", TIME_KEY: "-13"}, [(0, 0), (0, 1)]),
    ({}, {DATE_KEY: "20240110-", TIME_KEY: "17-"}, [(0, 1), (1, 0)]),
    ({}, {"ScheduledProtocolCodeSequence": {"CodeValue": "PROTO-*"}}, [(0, 0)]),
    ({}, {"ScheduledProtocolCodeSequence": {"CodeValue": "PROTO-CT1",
                                            "CodingSchemeDesignator": "DCM"}}, []),
    ({}, {"ScheduledProtocolCodeSequence": {"CodeValue": ""}}, [(0, 0), (0, 1), (1, 0)]),
]


@pytest.mark.parametrize("top, step, expected", FIXED_CASES)
def test_fixed_cases(store, top, step, expected):
    rows = fill_store(store, SMALL)
    assert sorted(reference_rows(SMALL, top, step)) == expected
    assert sorted(rows[row_id] for row_id in scp_rows(store, top, step)) == expected


#: (the step of a one-step item, the step keys): rows without a Start Date or a Start
#: Time, and a combined date-time range they must not match.
WITHOUT_DATE_OR_TIME = [
    ({DATE_KEY: "20240111", TIME_KEY: ""}, {DATE_KEY: "20240111", TIME_KEY: "-0800"}),
    ({DATE_KEY: "20240110"}, {DATE_KEY: "-20240111", TIME_KEY: "0800-0800"}),
    ({DATE_KEY: "20240111"}, {DATE_KEY: "20240110-20240111", TIME_KEY: "1000-"}),
    ({TIME_KEY: "0700"}, {DATE_KEY: "-20240111", TIME_KEY: "0600-0800"}),
    ({DATE_KEY: "", TIME_KEY: "0700"}, {DATE_KEY: "20240111-", TIME_KEY: "0600-"}),
    ({}, {DATE_KEY: "-20240111", TIME_KEY: "-0800"}),
]


@pytest.mark.parametrize("step, keys", WITHOUT_DATE_OR_TIME)
def test_combined_range_needs_date_and_time(store, step, keys):
    """C.2.2.2.5.1 with C.2.2.2.3: a Start Date and a Start Time key with values (one a
    range) are one date-time range; a step without a date or without a time (absent or
    zero length) has no date-time in it, so it is not selected, whatever the range. The
    same key values do select the step once it has a date and a time in the range."""
    worklist = [{"PatientID": "PID1",
                 "steps": [{"Modality": "CT", "ScheduledProcedureStepID": "SPS1", **step}]}]
    rows = fill_store(store, worklist)
    assert reference_rows(worklist, {}, keys) == set()
    assert [rows[row_id] for row_id in scp_rows(store, {}, keys)] == []
    inside = [{"PatientID": "PID1", "steps": [{"Modality": "CT", "ScheduledProcedureStepID":
                                                 "SPS1", DATE_KEY: "20240111", TIME_KEY: "0800"}]}]
    rows = fill_store(store, inside)
    assert reference_rows(inside, {}, keys) == {(0, 0)}
    assert [rows[row_id] for row_id in scp_rows(store, {}, keys)] == [(0, 0)]
