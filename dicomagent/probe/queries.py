"""The probe's query checks: C-FIND on each Q/R model and level, and the worklists.

Each query carries a probe identifier: the required and unique keys of its
level (PS3.4 C.6.1.1, C.6.2.1) or of the worklist (K.6.1, seed Tables
49-63), all empty, so any match returns them. A response passes when it
holds every key asked for (C.4.1.1.3.2: "all Keys specified in the request
Identifier"), the unique key has a value, no key was added beyond those the
standard allows, and a response with text beyond ASCII names its Specific
Character Set. A Q/R level below the top is queried for the first match of
the level above; at most ``LIMIT`` matches are read (then C-CANCEL).
"""

from __future__ import annotations

import pydicom

from dicomagent.association import AssociationError
from dicomagent.qrscu import SOP_CLASSES, find
from dicomagent.services.gp import GENERAL_PURPOSE_WORKLIST_FIND
from dicomagent.services.mwl import MODALITY_WORKLIST_FIND

PASS, FAIL, NOT_SUPPORTED, INFO = "pass", "fail", "not supported", "info"
LIMIT = 50

#: PS3.4 C.4.1.1.3.2: keys a response may hold without being asked.
ALLOWED_EXTRA = {0x00080005, 0x00080052, 0x00080054, 0x00080056, 0x00080201, 0x00880130,
                 0x00880140}

#: Required (R) and unique (U) keys by level (PS3.4 Tables C.6-1..C.6-4 / C.6-5..C.6-8).
LEVEL_KEYS = {
    "PATIENT": ("PatientName", "PatientID"),
    "STUDY": ("StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyInstanceUID"),
    "SERIES": ("Modality", "SeriesNumber", "SeriesInstanceUID"),
    "IMAGE": ("InstanceNumber", "SOPInstanceUID"),
}
UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
          "IMAGE": "SOPInstanceUID"}
LEVELS = {"patient": ("PATIENT", "STUDY", "SERIES", "IMAGE"),
          "study": ("STUDY", "SERIES", "IMAGE")}


def level_identifier(model: str, level: str, upper: dict[str, str]) -> pydicom.Dataset:
    """The probe identifier of a level: its keys empty, the unique keys above set."""
    ds = pydicom.Dataset()
    ds.QueryRetrieveLevel = level
    keywords = list(LEVEL_KEYS[level])
    if model == "study" and level == "STUDY":
        keywords += ["PatientName", "PatientID"]        # C.6.1.1.2: patient keys at STUDY
    for keyword in keywords:
        setattr(ds, keyword, "")
    for keyword, value in upper.items():
        setattr(ds, keyword, value)
    return ds


def judge(identifier: pydicom.Dataset, matches: list[pydicom.Dataset],
          unique: str | None) -> list[str]:
    """What is wrong with the responses (empty: nothing)."""
    asked = {int(element.tag) for element in identifier}
    problems = []
    for number, match in enumerate(matches, 1):
        present = {int(element.tag) for element in match}
        missing = sorted(asked - present)
        extra = sorted(present - asked - ALLOWED_EXTRA)
        if missing:
            problems.append(f"response {number} lacks {_names(missing)}")
        if extra:
            problems.append(f"response {number} adds {_names(extra)}")
        if unique and not str(match.get(unique, "") or ""):
            problems.append(f"response {number} has no {unique}")
        if "SpecificCharacterSet" not in match and _has_non_ascii(match):
            problems.append(f"response {number} has non-ASCII text but no Specific "
                            f"Character Set")
    return problems


def _names(tags: list[int]) -> str:
    return ", ".join(pydicom.datadict.keyword_for_tag(tag) or f"({tag >> 16:04X},"
                     f"{tag & 0xFFFF:04X})" for tag in tags[:5]) + \
        (f" and {len(tags) - 5} more" if len(tags) > 5 else "")


def _has_non_ascii(ds: pydicom.Dataset) -> bool:
    for element in ds:
        if element.VR == "SQ":
            if any(_has_non_ascii(item) for item in element.value):
                return True
        elif isinstance(element.value, (str, pydicom.valuerep.PersonName)):
            if not str(element.value).isascii():
                return True
    return False


async def _query(probe, model: str, identifier: pydicom.Dataset):
    return await find(probe.host, probe.port, probe.calling, probe.called, identifier,
                      model, probe.timeout, cancel_after=LIMIT)


async def check_finds(probe) -> None:
    """C-FIND at each level of each accepted Q/R information model."""
    for model in ("patient", "study"):
        sop_class = SOP_CLASSES[("find", model)]
        name = f"C-FIND {model} root"
        if not probe.accepted(sop_class):
            probe.record("services", name, NOT_SUPPORTED, "SOP class not accepted",
                         "PS3.4 C.6")
            continue
        upper: dict[str, str] = {}
        for level in LEVELS[model]:
            check = f"{name}, {level}"
            identifier = level_identifier(model, level, upper)
            try:
                result = await _query(probe, model, identifier)
            except AssociationError as error:
                probe.record("services", check, FAIL, str(error), "PS3.4 C.4.1")
                break
            if result.status not in (0x0000, 0xFE00):
                probe.record("services", check, FAIL,
                             f"status 0x{result.status:04X} {result.comment}".strip(),
                             "PS3.4 C.4.1.1.4, Table C.4-1")
                break
            problems = judge(identifier, result.matches, UNIQUE[level])
            probe.record("services", check, FAIL if problems else PASS,
                         f"{len(result.matches)} matches, final status "
                         f"0x{result.status:04X}" + (f"; {'; '.join(problems[:3])}"
                                                     if problems else ""),
                         "PS3.4 C.4.1.1.3.2, C.6")
            if not result.matches:
                break              # nothing to descend into
            upper[UNIQUE[level]] = str(result.matches[0].get(UNIQUE[level], "") or "")
            if not upper[UNIQUE[level]]:
                break


def worklist_identifier() -> pydicom.Dataset:
    """Modality Worklist: the keys of seed Tables 49-55 that PS3.4 K.6.1.2 requires."""
    ds = pydicom.Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "AccessionNumber", "RequestedProcedureID", "StudyInstanceUID"):
        setattr(ds, keyword, "")
    step = pydicom.Dataset()
    for keyword in ("ScheduledStationAETitle", "ScheduledProcedureStepStartDate",
                    "ScheduledProcedureStepStartTime", "Modality",
                    "ScheduledPerformingPhysicianName", "ScheduledProcedureStepID"):
        setattr(step, keyword, "")
    ds.ScheduledProcedureStepSequence = [step]
    return ds


def general_purpose_identifier() -> pydicom.Dataset:
    """General Purpose Worklist: keys of seed Tables 58-61."""
    ds = pydicom.Dataset()
    for keyword in ("SOPInstanceUID", "GeneralPurposeScheduledProcedureStepStatus",
                    "GeneralPurposeScheduledProcedureStepPriority",
                    "ScheduledProcedureStepStartDateTime", "InputAvailabilityFlag",
                    "PatientName", "PatientID"):
        setattr(ds, keyword, "")
    ds.ScheduledWorkitemCodeSequence = []
    return ds


async def check_worklists(probe) -> None:
    for name, sop_class, model, identifier, reference in (
            ("Modality Worklist C-FIND", MODALITY_WORKLIST_FIND, "mwl",
             worklist_identifier(), "PS3.4 K.4.1.3, K.6.1"),
            ("General Purpose Worklist C-FIND", GENERAL_PURPOSE_WORKLIST_FIND, "gpwl",
             general_purpose_identifier(), "PS3.4 (2003) K.6.2")):
        if not probe.accepted(sop_class):
            probe.record("services", name, NOT_SUPPORTED, "SOP class not accepted", reference)
            continue
        try:
            result = await _query(probe, model, identifier)
        except AssociationError as error:
            probe.record("services", name, FAIL, str(error), reference)
            continue
        if result.status not in (0x0000, 0xFE00):
            probe.record("services", name, FAIL, f"status 0x{result.status:04X}", reference)
            continue
        problems = judge(identifier, result.matches, None)
        if model == "mwl":
            for number, match in enumerate(result.matches, 1):
                steps = match.get("ScheduledProcedureStepSequence")
                if steps is not None and len(steps) != 1:
                    problems.append(f"response {number} has {len(steps)} scheduled "
                                    f"steps (one expected, K.6.1.2.2)")
        probe.record("services", name, FAIL if problems else PASS,
                     f"{len(result.matches)} matches, final status 0x{result.status:04X}"
                     + (f"; {'; '.join(problems[:3])}" if problems else ""), reference)
