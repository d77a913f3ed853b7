"""General Purpose Worklist, GP-SPS and GP-PPS: ``dicomagent`` as SCU against ``dicomagent
serve`` as SCP.

- the whole workflow through the command line (schedule, query, claim, GP-PPS, complete,
  gone from the worklist);
- every failure status of the seed's Tables 74, 76, 77 (A501-A506) and the PS3.7 C.5
  statuses of bad requests (0112, 0123, 0120, 0106, 0111, A900), each followed by a look
  at the store to prove that the refused request changed nothing;
- concurrent claims of one step: exactly one SCU wins, the other gets A503;
- the state across a restart of the daemon;
- General Purpose Worklist matching on each key (single values, wild cards, UID lists,
  DT ranges, sequence matching of code sequences and human performers);
- the General Purpose Worklist Management Meta SOP Class for all three services.

The command line is what an operator uses, so the workflow, the concurrency and the meta
SOP class go through it; the many matching and bad-input cases use the same library
functions in-process (``dicomagent.association``, ``dicomagent.normalized``,
``dicomagent.qrscu``), which keeps the module well under a minute.

References
----------
PS3.4 (2003) Annex F (GP-SPS, GP-PPS) and K.6.2 (General Purpose Worklist); PS3.4
C.2.2.2 (matching); PS3.7 C.5 (statuses); seed 3.1.3.7, 3.1.3.8, Tables 58-63, 74-77.
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from dicomagent.archive.workflow import WorkflowStore
from dicomagent.association import associate
from dicomagent.dimse.commands import (C_FIND_RQ, DATA_SET_PRESENT, N_ACTION_RQ, N_CREATE_RQ,
                                       N_SET_RQ)
from dicomagent.dimse.status import StatusCategory, category
from dicomagent.normalized import n_action, n_create, n_set
from dicomagent.qrscu import find, parse_keys
from dicomagent.transcode import decode, encode
from dicomagent.uids import IMPLICIT_VR_LITTLE_ENDIAN
from dicomagent.ul.negotiation import ProposedContext
from nodes import RunningNode, dicomagent_cmd, run

META = "1.2.840.10008.5.1.4.32"
GPWL_FIND = "1.2.840.10008.5.1.4.32.1"
GPSPS = "1.2.840.10008.5.1.4.32.2"
GPPPS = "1.2.840.10008.5.1.4.32.3"

UID_ROOT = "1.2.826.0.1.3680043.8.498.7731."
SCU_AET = "GPSCU"

SUCCESS = 0x0000
MAY_NO_LONGER_BE_UPDATED = 0xA501
WRONG_TRANSACTION_UID = 0xA502
ALREADY_IN_PROGRESS = 0xA503
SPS_NOT_IN_PROGRESS = 0xA504
TRANSACTION_UID_MISMATCH = 0xA505
PPS_NOT_IN_PROGRESS = 0xA506
FAILED = 0xA900
NO_SUCH_ACTION_TYPE = 0x0123
NO_SUCH_SOP_INSTANCE = 0x0112
DUPLICATE_SOP_INSTANCE = 0x0111
MISSING_ATTRIBUTE = 0x0120
INVALID_ATTRIBUTE_VALUE = 0x0106

_uids = iter(range(1, 1_000_000))


def new_uid(tag: str = "") -> str:
    return f"{UID_ROOT}{next(_uids)}{tag}"


# --- data sets ----------------------------------------------------------------------------


def code(value: str, scheme: str = "99GP", meaning: str | None = None) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning or f"Code {value}"
    return item


def performer(name: str, code_value: str | None = None) -> Dataset:
    item = Dataset()
    item.HumanPerformerName = name
    if code_value:
        item.HumanPerformerCodeSequence = [code(code_value, "99PERF")]
    return item


def gpsps(sps_id: str, *, uid: str | None = None, patient_name: str = "DOE^JOHN",
          patient_id: str = "P1", study_uid: str | None = None, priority: str = "MEDIUM",
          start: str = "20240110080000", expected: str = "20240110120000",
          availability: str = "COMPLETE", workitem: str = "CAD", station: str = "STN-A",
          station_class: str = "CLS-X", location: str = "ROOM1",
          performers: tuple[Dataset, ...] = ()) -> Dataset:
    """A General Purpose Scheduled Procedure Step as the scheduler writes it."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    if uid:
        ds.SOPInstanceUID = uid
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid or new_uid()
    ds.ScheduledProcedureStepID = sps_id
    # The status in the file is ignored: ``gpsps add`` schedules (SCHEDULED).
    ds.GeneralPurposeScheduledProcedureStepStatus = "COMPLETED"
    ds.GeneralPurposeScheduledProcedureStepPriority = priority
    ds.ScheduledProcedureStepStartDateTime = start
    ds.ExpectedCompletionDateTime = expected
    ds.InputAvailabilityFlag = availability
    ds.ScheduledWorkitemCodeSequence = [code(workitem)]
    ds.ScheduledStationNameCodeSequence = [code(station, "99STN")]
    ds.ScheduledStationClassCodeSequence = [code(station_class, "99CLS")]
    ds.ScheduledStationGeographicLocationCodeSequence = [code(location, "99LOC")]
    if performers:
        ds.ScheduledHumanPerformersSequence = list(performers)
    ds.ScheduledProcedureStepDescription = f"Step {sps_id}"
    return ds


def gppps_create(*references: tuple[str, str], status: str | None = "IN PROGRESS",
                 patient_name: str = "WRONG^NAME", patient_id: str = "WRONG") -> Dataset:
    """A GP-PPS N-CREATE data set performing the (GP-SPS UID, Transaction UID) given."""
    ds = Dataset()
    if status is not None:
        ds.GeneralPurposePerformedProcedureStepStatus = status
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedProcedureStepStartDate = "20240110"
    ds.PerformedProcedureStepStartTime = "081500"
    items = []
    for step_uid, transaction_uid in references:
        item = Dataset()
        item.ReferencedSOPClassUID = GPSPS
        item.ReferencedSOPInstanceUID = step_uid
        item.ReferencedGeneralPurposeScheduledProcedureStepTransactionUID = transaction_uid
        items.append(item)
    ds.ReferencedGeneralPurposeScheduledProcedureStepSequence = items
    return ds


def gppps_set(status: str | None, description: str = "done") -> Dataset:
    ds = Dataset()
    if status is not None:
        ds.GeneralPurposePerformedProcedureStepStatus = status
    ds.PerformedProcedureStepDescription = description
    return ds


def action_data(status: str | None, transaction_uid: str | None = None,
                performers: tuple[str, ...] = ()) -> Dataset:
    ds = Dataset()
    if status is not None:
        ds.GeneralPurposeScheduledProcedureStepStatus = status
    if transaction_uid:
        ds.TransactionUID = transaction_uid
    if performers:
        ds.ActualHumanPerformersSequence = [performer(name) for name in performers]
    return ds


def write_json(path: Path, datasets: list[Dataset]) -> Path:
    path.write_text(json.dumps([ds.to_json_dict() for ds in datasets]))
    return path


# --- the command line --------------------------------------------------------------------


def cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return run(dicomagent_cmd(*args), timeout)


def scu_args(node: RunningNode) -> list[str]:
    return [node.host, str(node.port), "-aet", SCU_AET, "-aec", node.ae_title,
            "--timeout", "15"]


def schedule(node: RunningNode, tmp_path: Path, datasets: list[Dataset]) -> list[str]:
    """``gpsps add`` into the running daemon's data dir; the UIDs it printed."""
    path = write_json(tmp_path / f"sps{next(_uids)}.json", datasets)
    done = cli("gpsps", "add", "--data-dir", str(node.data_dir), str(path))
    assert done.returncode == 0, (done.stdout, done.stderr)
    uids = done.stdout.split()
    assert len(uids) == len(datasets), done.stdout
    return uids


def steps_cli(node: RunningNode) -> dict[str, dict]:
    """``gpsps ls --json``, by SOP Instance UID."""
    done = cli("gpsps", "ls", "--json", "--data-dir", str(node.data_dir))
    assert done.returncode == 0, done.stderr
    return {row["sop_instance_uid"]: row for row in json.loads(done.stdout)}


def performed_cli(node: RunningNode) -> dict[str, Dataset]:
    """``gppps ls --json``, by SOP Instance UID."""
    done = cli("gppps", "ls", "--json", "--data-dir", str(node.data_dir))
    assert done.returncode == 0, done.stderr
    objects = [Dataset.from_json(obj) for obj in json.loads(done.stdout)]
    return {ds.SOPInstanceUID: ds for ds in objects}


def _store(node: RunningNode) -> WorkflowStore:
    return WorkflowStore(str(node.data_dir / "index.sqlite"))


def steps(node: RunningNode) -> dict[str, dict]:
    """What ``gpsps ls --json`` prints, read from the data dir in-process (faster)."""
    store = _store(node)
    try:
        return {s["sop_instance_uid"]: {"sop_instance_uid": s["sop_instance_uid"],
                                        "status": s["status"],
                                        "transaction_uid": s["transaction_uid"],
                                        "on_worklist": s["listed"], "dataset": s["attrs"]}
                for s in store.gpsps_steps()}
    finally:
        store.close()


def performed(node: RunningNode) -> dict[str, Dataset]:
    """The GP-PPS instances of the data dir (as ``gppps ls --json``), in-process."""
    store = _store(node)
    try:
        return {i["sop_instance_uid"]: Dataset.from_json(i["attrs"])
                for i in store.gppps_instances()}
    finally:
        store.close()


def cli_action(node: RunningNode, uid: str, status: str, transaction_uid: str | None = None,
               *extra: str) -> tuple[int, int]:
    """``gpsps action``: (exit code, DIMSE status it printed)."""
    args = ["gpsps", "action", *scu_args(node), uid, "--status", status]
    if transaction_uid:
        args += ["--transaction-uid", transaction_uid]
    done = cli(*args, *extra)
    return done.returncode, printed_status(done, "N-ACTION", uid)


def printed_status(done: subprocess.CompletedProcess, operation: str, uid: str) -> int:
    match = re.search(rf"^{operation} (\S+): status 0x([0-9A-F]{{4}})", done.stdout, re.M)
    assert match, (done.returncode, done.stdout, done.stderr)
    assert match.group(1) == uid, done.stdout
    status = int(match.group(2), 16)
    # The exit code follows the status: 0 for success, 1 for a failure status.
    assert done.returncode == (0 if status == SUCCESS else 1), (done.stdout, done.stderr)
    return status


def cli_gpwl(node: RunningNode, *keys: str) -> list[Dataset]:
    args = ["gpwl", *scu_args(node), "--json"]
    for key in keys:
        args += ["-k", key]
    done = cli(*args)
    assert done.returncode == 0, (done.stdout, done.stderr)
    matches = [Dataset.from_json(obj) for obj in json.loads(done.stdout)]
    assert f"{len(matches)} matches, status 0x0000" in done.stderr, done.stderr
    return matches


# --- the same requests in-process ----------------------------------------------------------


def in_process(node: RunningNode, work, abstract_syntaxes=(GPSPS, GPPPS, GPWL_FIND)):
    """Run ``await work(association)`` on one association with the given contexts."""

    async def main():
        association = await associate(
            node.host, node.port, SCU_AET, node.ae_title,
            [ProposedContext(syntax, (IMPLICIT_VR_LITTLE_ENDIAN,))
             for syntax in abstract_syntaxes],
            artim_timeout=10, dimse_timeout=10, network_timeout=10)
        try:
            return await work(association)
        finally:
            await association.release()

    return asyncio.run(main())


def action(node: RunningNode, uid: str, ds: Dataset, action_type: int = 1,
           abstract_syntax: str = GPSPS) -> int:
    """N-ACTION "Request GP-SPS Status Modification" (``normalized.n_action``); its status."""
    async def work(association):
        return (await n_action(association, GPSPS, uid, action_type, ds,
                               abstract_syntax)).status
    return in_process(node, work, (abstract_syntax,))


def create_pps(node: RunningNode, uid: str | None, ds: Dataset,
               abstract_syntax: str = GPPPS) -> int:
    """GP-PPS N-CREATE (``normalized.n_create``); its status."""
    async def work(association):
        result = await n_create(association, GPPPS, uid, ds, abstract_syntax)
        assert result.sop_instance_uid == (uid or result.sop_instance_uid)
        return result.status
    return in_process(node, work, (abstract_syntax,))


def set_pps(node: RunningNode, uid: str, ds: Dataset, abstract_syntax: str = GPPPS) -> int:
    """GP-PPS N-SET (``normalized.n_set``); its status."""
    async def work(association):
        return (await n_set(association, GPPPS, uid, ds, abstract_syntax)).status
    return in_process(node, work, (abstract_syntax,))


def raw_request(node: RunningNode, command_of, data: bytes, abstract_syntax: str):
    """A request with ``data`` as its data set bytes, as is; the response command."""

    async def work(association):
        context = association.context_for(abstract_syntax)
        assert context.transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
        response = await association.request(
            context.context_id, command_of(association.next_message_id()), data)
        return response.command

    return in_process(node, work, (abstract_syntax,))


def gp_find(node: RunningNode, keys: list[str]) -> list[Dataset]:
    """C-FIND on the General Purpose Worklist (``dicomagent.qrscu.find``, model gpwl)."""
    result = asyncio.run(find(node.host, node.port, SCU_AET, node.ae_title,
                              parse_keys(keys, require_level=False), "gpwl", 10.0))
    assert result.status == SUCCESS, hex(result.status)
    return result.matches


def on_worklist(node: RunningNode, uid: str) -> list[Dataset]:
    return gp_find(node, [f"SOPInstanceUID={uid}", "GeneralPurposeScheduledProcedureStepStatus"])


def implicit_element(group: int, element: int, value: bytes, length: int | None = None) -> bytes:
    """One element in Implicit VR Little Endian; ``length`` may lie about the value."""
    return struct.pack("<HHI", group, element, len(value) if length is None else length) + value


#: A data set that cannot be parsed: GP-SPS Status "IN PROGRESS" (valid), then an element
#: whose length runs 200 bytes past the end of the data set.
MALFORMED = (implicit_element(0x0040, 0x4001, b"IN PROGRESS ")
             + implicit_element(0x0040, 0x4002, b"IN PROGRESS ")
             + implicit_element(0x0040, 0x4011, b"2024", length=204))


def assert_no_traceback(node: RunningNode) -> None:
    assert "Traceback" not in node.log(), node.log()


# === 1. the workflow end to end, through the command line ===================================


def test_workflow_end_to_end(agent_factory, tmp_path):
    """Schedule, query, claim (still listed, IN PROGRESS), GP-PPS (coerced, the step leaves
    the worklist and records it), N-SET COMPLETED, step COMPLETED; then nothing moves."""
    agent = agent_factory()
    step_file = write_json(tmp_path / "step.json", [gpsps(
        "GPE2E", patient_name="E2E^PATIENT", patient_id="PE2E",
        performers=(performer("SMITH^ANNA", "P-SMITH"),))])
    done = cli("gpsps", "add", "--data-dir", str(agent.data_dir), str(step_file))
    assert done.returncode == 0, done.stderr
    (uid,) = done.stdout.split()
    assert pydicom.uid.UID(uid).is_valid

    # Query: on the worklist, SCHEDULED, with the values asked for.
    (match,) = cli_gpwl(agent, "PatientID=PE2E", "SOPInstanceUID", "PatientName",
                        "GeneralPurposeScheduledProcedureStepStatus",
                        "ScheduledWorkitemCodeSequence[0].CodeValue")
    assert match.SOPInstanceUID == uid
    assert str(match.PatientName) == "E2E^PATIENT"
    assert match.GeneralPurposeScheduledProcedureStepStatus == "SCHEDULED"
    assert [item.CodeValue for item in match.ScheduledWorkitemCodeSequence] == ["CAD"]

    # Claim: IN PROGRESS; the step is still on the worklist, now IN PROGRESS.
    transaction_uid = new_uid()
    assert cli_action(agent, uid, "IN PROGRESS", transaction_uid,
                      "--performer", "PERFORMER^ONE") == (0, SUCCESS)
    (match,) = cli_gpwl(agent, "PatientID=PE2E", "SOPInstanceUID",
                        "GeneralPurposeScheduledProcedureStepStatus")
    assert match.GeneralPurposeScheduledProcedureStepStatus == "IN PROGRESS"
    row = steps(agent)[uid]
    assert (row["status"], row["transaction_uid"], row["on_worklist"]) == \
        ("IN PROGRESS", transaction_uid, True)
    stored = Dataset.from_json(row["dataset"])
    assert [str(p.HumanPerformerName) for p in stored.ActualHumanPerformersSequence] == \
        ["PERFORMER^ONE"]

    # GP-PPS N-CREATE: patient identification coerced from the GP-SPS.
    pps_uid = new_uid()
    pps_file = tmp_path / "pps.json"
    pps_file.write_text(json.dumps(gppps_create((uid, transaction_uid)).to_json_dict()))
    done = cli("gppps", "create", *scu_args(agent), str(pps_file), "--uid", pps_uid)
    assert printed_status(done, "N-CREATE", pps_uid) == SUCCESS

    assert cli_gpwl(agent, "PatientID=PE2E", "SOPInstanceUID") == []
    assert on_worklist(agent, uid) == []
    row = steps_cli(agent)[uid]
    assert (row["status"], row["on_worklist"]) == ("IN PROGRESS", False)
    stored = Dataset.from_json(row["dataset"])
    (resulting,) = stored.ResultingGeneralPurposePerformedProcedureStepsSequence
    assert resulting.ReferencedSOPClassUID == GPPPS
    assert resulting.ReferencedSOPInstanceUID == pps_uid
    pps = performed(agent)[pps_uid]
    assert pps.GeneralPurposePerformedProcedureStepStatus == "IN PROGRESS"
    assert str(pps.PatientName) == "E2E^PATIENT"
    assert pps.PatientID == "PE2E"
    assert pps.PatientBirthDate == "19700101" and pps.PatientSex == "O"

    # GP-PPS N-SET COMPLETED, then the GP-SPS COMPLETED with the claim's Transaction UID.
    set_file = tmp_path / "set.json"
    set_file.write_text(json.dumps(gppps_set("COMPLETED", "all done").to_json_dict()))
    done = cli("gppps", "set", *scu_args(agent), pps_uid, str(set_file))
    assert printed_status(done, "N-SET", pps_uid) == SUCCESS
    assert cli_action(agent, uid, "COMPLETED", transaction_uid) == (0, SUCCESS)

    pps = performed_cli(agent)[pps_uid]
    assert pps.SOPClassUID == GPPPS
    assert pps.GeneralPurposePerformedProcedureStepStatus == "COMPLETED"
    assert pps.PerformedProcedureStepDescription == "all done"
    assert str(pps.PatientName) == "E2E^PATIENT"
    assert steps(agent)[uid]["status"] == "COMPLETED"
    assert gp_find(agent, ["PatientID=PE2E"]) == []

    # Final: the step and the performed step may no longer be changed.
    assert cli_action(agent, uid, "IN PROGRESS", transaction_uid) == \
        (1, MAY_NO_LONGER_BE_UPDATED)
    assert set_pps(agent, pps_uid, gppps_set("COMPLETED")) == PPS_NOT_IN_PROGRESS
    assert steps(agent)[uid]["status"] == "COMPLETED"
    assert_no_traceback(agent)


# === 2. the failure statuses A501-A506 =======================================================


def test_status_transitions_and_failures_a501_a503(agent_factory, tmp_path):
    """The GP-SPS state diagram: allowed moves succeed; A501 (final), A502 (not the claim's
    Transaction UID), A503 (already IN PROGRESS), 0120 (claim without Transaction UID) and
    0106 (no such transition); each refusal leaves the step as it was."""
    agent = agent_factory()
    a, b, c = schedule(agent, tmp_path, [gpsps("GPA"), gpsps("GPB"), gpsps("GPC")])
    t_a, t_b, t_c = new_uid(), new_uid(), new_uid()

    # SCHEDULED -> COMPLETED / SUSPENDED: no such transition; no Transaction UID: 0120.
    assert action(agent, a, action_data("COMPLETED", t_a)) == INVALID_ATTRIBUTE_VALUE
    assert action(agent, a, action_data("SUSPENDED", t_a)) == INVALID_ATTRIBUTE_VALUE
    assert action(agent, a, action_data("IN PROGRESS")) == MISSING_ATTRIBUTE
    assert action(agent, a, action_data(None, t_a)) == MISSING_ATTRIBUTE
    row = steps(agent)[a]
    assert (row["status"], row["transaction_uid"], row["on_worklist"]) == ("SCHEDULED", "", True)

    assert action(agent, a, action_data("IN PROGRESS", t_a, ("FIRST^PERFORMER",))) == SUCCESS
    # A503: IN PROGRESS again, whatever the Transaction UID.
    assert action(agent, a, action_data("IN PROGRESS", new_uid())) == ALREADY_IN_PROGRESS
    assert action(agent, a, action_data("IN PROGRESS", t_a)) == ALREADY_IN_PROGRESS
    # A502: not the claim's Transaction UID (or none at all).
    assert action(agent, a, action_data("SUSPENDED", new_uid())) == WRONG_TRANSACTION_UID
    assert action(agent, a, action_data("COMPLETED")) == WRONG_TRANSACTION_UID
    assert action(agent, a, action_data("DISCONTINUED", t_b)) == WRONG_TRANSACTION_UID
    row = steps(agent)[a]
    assert (row["status"], row["transaction_uid"]) == ("IN PROGRESS", t_a)
    assert [str(p.HumanPerformerName) for p in
            Dataset.from_json(row["dataset"]).ActualHumanPerformersSequence] == \
        ["FIRST^PERFORMER"]

    # IN PROGRESS -> SUSPENDED -> IN PROGRESS (same claim) -> SUSPENDED -> DISCONTINUED.
    assert action(agent, a, action_data("SUSPENDED", t_a)) == SUCCESS
    assert gp_find(agent, [f"SOPInstanceUID={a}", "GeneralPurposeScheduledProcedureStepStatus"]
                   )[0].GeneralPurposeScheduledProcedureStepStatus == "SUSPENDED"
    assert action(agent, a, action_data("COMPLETED", t_a)) == INVALID_ATTRIBUTE_VALUE
    assert action(agent, a, action_data("SUSPENDED", t_a)) == INVALID_ATTRIBUTE_VALUE
    assert action(agent, a, action_data("IN PROGRESS", new_uid())) == WRONG_TRANSACTION_UID
    assert steps(agent)[a]["status"] == "SUSPENDED"
    assert action(agent, a, action_data("IN PROGRESS", t_a, ("SECOND^PERFORMER",))) == SUCCESS
    row = steps(agent)[a]
    assert (row["status"], row["transaction_uid"]) == ("IN PROGRESS", t_a)
    assert [str(p.HumanPerformerName) for p in
            Dataset.from_json(row["dataset"]).ActualHumanPerformersSequence] == \
        ["SECOND^PERFORMER"]
    assert action(agent, a, action_data("SUSPENDED", t_a)) == SUCCESS
    assert action(agent, a, action_data("DISCONTINUED", t_a)) == SUCCESS
    assert on_worklist(agent, a) == []

    # A501: a DISCONTINUED step is never changed again, with or without its Transaction UID.
    for status in ("IN PROGRESS", "SUSPENDED", "COMPLETED", "DISCONTINUED"):
        assert action(agent, a, action_data(status, t_a)) == MAY_NO_LONGER_BE_UPDATED, status
    assert action(agent, a, action_data("IN PROGRESS", new_uid())) == MAY_NO_LONGER_BE_UPDATED

    # IN PROGRESS -> DISCONTINUED directly; IN PROGRESS -> COMPLETED; A501 for both after.
    assert action(agent, b, action_data("IN PROGRESS", t_b)) == SUCCESS
    assert action(agent, b, action_data("DISCONTINUED", t_b)) == SUCCESS
    assert action(agent, c, action_data("IN PROGRESS", t_c)) == SUCCESS
    assert action(agent, c, action_data("COMPLETED", t_c)) == SUCCESS
    assert action(agent, c, action_data("SUSPENDED", t_c)) == MAY_NO_LONGER_BE_UPDATED
    assert action(agent, b, action_data("IN PROGRESS", t_b)) == MAY_NO_LONGER_BE_UPDATED

    final = steps(agent)
    assert {uid: (final[uid]["status"], final[uid]["on_worklist"]) for uid in (a, b, c)} == {
        a: ("DISCONTINUED", False), b: ("DISCONTINUED", False), c: ("COMPLETED", False)}
    assert gp_find(agent, ["SOPInstanceUID"]) == []
    assert_no_traceback(agent)


def test_gppps_failures_a504_a505_a506(agent_factory, tmp_path):
    """GP-PPS N-CREATE: A504 (step not IN PROGRESS: SCHEDULED, SUSPENDED, COMPLETED), A505
    (not the claim's Transaction UID), 0106 (unknown step; status not IN PROGRESS), 0120
    (no status), 0111 (duplicate); a refused N-CREATE with one good and one bad reference
    changes neither step. N-SET: A506 once COMPLETED/DISCONTINUED, 0112, 0106."""
    agent = agent_factory()
    a, b, c, d = schedule(agent, tmp_path, [gpsps(f"GP{n}") for n in "ABCD"])
    t_a, t_b, t_d = new_uid(), new_uid(), new_uid()

    # A504: the referenced step is SCHEDULED.
    assert create_pps(agent, new_uid(), gppps_create((a, t_a))) == SPS_NOT_IN_PROGRESS
    assert action(agent, a, action_data("IN PROGRESS", t_a)) == SUCCESS
    # A505: the step is IN PROGRESS, but under another Transaction UID.
    assert create_pps(agent, new_uid(), gppps_create((a, new_uid()))) == \
        TRANSACTION_UID_MISMATCH
    # 0106: an unknown step; 0120 / 0106: the GP-PPS status.
    assert create_pps(agent, new_uid(), gppps_create((new_uid(), t_a))) == \
        INVALID_ATTRIBUTE_VALUE
    assert create_pps(agent, new_uid(), gppps_create((a, t_a), status=None)) == \
        MISSING_ATTRIBUTE
    assert create_pps(agent, new_uid(), gppps_create((a, t_a), status="COMPLETED")) == \
        INVALID_ATTRIBUTE_VALUE
    # One good reference (a) and one bad (b SCHEDULED; then b with the wrong UID): refused
    # as a whole, and a is still on the worklist without a Resulting GP-PPS.
    assert create_pps(agent, new_uid(), gppps_create((a, t_a), (b, t_b))) == \
        SPS_NOT_IN_PROGRESS
    assert action(agent, b, action_data("IN PROGRESS", t_b)) == SUCCESS
    assert create_pps(agent, new_uid(), gppps_create((a, t_a), (b, t_a))) == \
        TRANSACTION_UID_MISMATCH
    assert performed(agent) == {}
    rows = steps(agent)
    for uid in (a, b):
        assert (rows[uid]["status"], rows[uid]["on_worklist"]) == ("IN PROGRESS", True)
        assert "00404015" not in rows[uid]["dataset"], rows[uid]["dataset"]
    assert len(on_worklist(agent, a)) == 1 and len(on_worklist(agent, b)) == 1

    # Both at once: accepted; both leave the worklist and both reference it.
    pps = new_uid()
    assert create_pps(agent, pps, gppps_create((a, t_a), (b, t_b))) == SUCCESS
    assert on_worklist(agent, a) == [] and on_worklist(agent, b) == []
    rows = steps(agent)
    for uid in (a, b):
        resulting = Dataset.from_json(rows[uid]["dataset"]) \
            .ResultingGeneralPurposePerformedProcedureStepsSequence
        assert [item.ReferencedSOPInstanceUID for item in resulting] == [pps]
    # 0111: the same SOP Instance UID again (the steps are still IN PROGRESS).
    assert create_pps(agent, pps, gppps_create((a, t_a))) == DUPLICATE_SOP_INSTANCE
    assert len(Dataset.from_json(steps(agent)[a]["dataset"])
               .ResultingGeneralPurposePerformedProcedureStepsSequence) == 1

    # A504: a SUSPENDED step, and a COMPLETED one.
    assert action(agent, d, action_data("IN PROGRESS", t_d)) == SUCCESS
    assert action(agent, d, action_data("SUSPENDED", t_d)) == SUCCESS
    assert create_pps(agent, new_uid(), gppps_create((d, t_d))) == SPS_NOT_IN_PROGRESS
    assert action(agent, c, action_data("IN PROGRESS", t_a)) == SUCCESS
    assert action(agent, c, action_data("COMPLETED", t_a)) == SUCCESS
    assert create_pps(agent, new_uid(), gppps_create((c, t_a))) == SPS_NOT_IN_PROGRESS
    assert steps(agent)[d]["on_worklist"] is True
    assert set(performed(agent)) == {pps}

    # N-SET: 0112 unknown; 0106 a status that is not allowed; IN PROGRESS stays open.
    assert set_pps(agent, new_uid(), gppps_set("COMPLETED")) == NO_SUCH_SOP_INSTANCE
    assert set_pps(agent, pps, gppps_set("SCHEDULED")) == INVALID_ATTRIBUTE_VALUE
    assert set_pps(agent, pps, gppps_set("BOGUS")) == INVALID_ATTRIBUTE_VALUE
    modification = gppps_set(None, "still going")
    modification.PatientName = "OTHER^NAME"
    modification.PatientID = "OTHER"
    modification.ReferencedGeneralPurposeScheduledProcedureStepSequence = []
    assert set_pps(agent, pps, modification) == SUCCESS
    kept = performed(agent)[pps]
    assert (str(kept.PatientName), kept.PatientID) == ("DOE^JOHN", "P1")      # from the GP-SPS
    assert [item.ReferencedSOPInstanceUID for item in
            kept.ReferencedGeneralPurposeScheduledProcedureStepSequence] == [a, b]
    assert set_pps(agent, pps, gppps_set("IN PROGRESS", "going on")) == SUCCESS
    assert performed(agent)[pps].PerformedProcedureStepDescription == "going on"
    assert set_pps(agent, pps, gppps_set("DISCONTINUED", "stopped")) == SUCCESS
    # A506: no longer IN PROGRESS.
    assert set_pps(agent, pps, gppps_set("IN PROGRESS", "again")) == PPS_NOT_IN_PROGRESS
    assert set_pps(agent, pps, gppps_set(None, "again")) == PPS_NOT_IN_PROGRESS
    kept = performed(agent)[pps]
    assert kept.GeneralPurposePerformedProcedureStepStatus == "DISCONTINUED"
    assert kept.PerformedProcedureStepDescription == "stopped"

    # A506 after COMPLETED too (another GP-PPS, unscheduled: no references).
    before = set(performed(agent))
    assert create_pps(agent, None, gppps_create()) == SUCCESS     # the SCP chooses the UID
    (other,) = set(performed(agent)) - before
    assert pydicom.uid.UID(other).is_valid
    assert set_pps(agent, other, gppps_set("COMPLETED")) == SUCCESS
    assert set_pps(agent, other, gppps_set("DISCONTINUED")) == PPS_NOT_IN_PROGRESS
    assert performed(agent)[other].GeneralPurposePerformedProcedureStepStatus == "COMPLETED"
    assert_no_traceback(agent)


def test_failure_statuses_through_the_cli(agent_factory, tmp_path):
    """A502, A504, A505 and A506 as the command line prints them (exit code 1); A503 is the
    concurrency test's, A501 the end-to-end test's."""
    agent = agent_factory()
    (uid,) = schedule(agent, tmp_path, [gpsps("GPCLI")])
    transaction_uid = new_uid()
    pps_file = tmp_path / "pps.json"

    def create(pps_uid: str, reference_transaction: str) -> int:
        pps_file.write_text(json.dumps(gppps_create((uid, reference_transaction)).to_json_dict()))
        done = cli("gppps", "create", *scu_args(agent), str(pps_file), "--uid", pps_uid)
        return printed_status(done, "N-CREATE", pps_uid)

    assert create(new_uid(), transaction_uid) == SPS_NOT_IN_PROGRESS
    assert action(agent, uid, action_data("IN PROGRESS", transaction_uid)) == SUCCESS
    assert cli_action(agent, uid, "SUSPENDED", new_uid()) == (1, WRONG_TRANSACTION_UID)
    assert create(new_uid(), new_uid()) == TRANSACTION_UID_MISMATCH
    pps_uid = new_uid()
    assert create_pps(agent, pps_uid, gppps_create((uid, transaction_uid))) == SUCCESS
    assert set_pps(agent, pps_uid, gppps_set("COMPLETED")) == SUCCESS
    set_file = tmp_path / "set.json"
    set_file.write_text(json.dumps(gppps_set("DISCONTINUED").to_json_dict()))
    done = cli("gppps", "set", *scu_args(agent), pps_uid, str(set_file))
    assert printed_status(done, "N-SET", pps_uid) == PPS_NOT_IN_PROGRESS
    row = steps(agent)[uid]
    assert (row["status"], row["transaction_uid"]) == ("IN PROGRESS", transaction_uid)
    assert performed(agent)[pps_uid].GeneralPurposePerformedProcedureStepStatus == "COMPLETED"
    assert_no_traceback(agent)


# === 3. bad input ===========================================================================


def test_bad_requests_change_nothing(agent_factory, tmp_path):
    """Unknown instance (0112), wrong Action Type (0123), a data set that cannot be parsed
    (A900, on N-ACTION, N-CREATE and N-SET), attributes other than the status and the Actual
    Human Performers in an N-ACTION (ignored): the store is as before each of them."""
    agent = agent_factory()
    (uid,) = schedule(agent, tmp_path, [gpsps("GPBAD", patient_name="BAD^INPUT")])
    before = steps(agent)
    transaction_uid = new_uid()

    assert action(agent, new_uid(), action_data("IN PROGRESS", transaction_uid)) == \
        NO_SUCH_SOP_INSTANCE
    for action_type in (0, 2, 3, 0xFFFF):
        assert action(agent, uid, action_data("IN PROGRESS", transaction_uid),
                      action_type) == NO_SUCH_ACTION_TYPE, action_type

    def raw_action(message_id: int) -> N_ACTION_RQ:
        return N_ACTION_RQ(RequestedSOPClassUID=GPSPS, MessageID=message_id,
                           CommandDataSetType=DATA_SET_PRESENT, RequestedSOPInstanceUID=uid,
                           ActionTypeID=1)

    # The bytes are really unreadable (the same decoder the SCP uses).
    with pytest.raises(Exception):
        decode(MALFORMED, IMPLICIT_VR_LITTLE_ENDIAN).to_json_dict()
    response = raw_request(agent, raw_action, MALFORMED, GPSPS)
    assert response.Status == FAILED, hex(response.Status)
    assert response.MessageIDBeingRespondedTo == 1
    assert steps(agent) == before
    assert len(on_worklist(agent, uid)) == 1

    # N-ACTION with more than the status: only the status and the performers change.
    request = action_data("IN PROGRESS", transaction_uid, ("ACTUAL^ONE",))
    request.PatientName = "CHANGED^NAME"
    request.ScheduledProcedureStepID = "CHANGED"
    request.ScheduledWorkitemCodeSequence = [code("CHANGED")]
    assert action(agent, uid, request) == SUCCESS
    after = steps(agent)[uid]
    stored = Dataset.from_json(after["dataset"])
    assert str(stored.PatientName) == "BAD^INPUT"
    assert stored.ScheduledProcedureStepID == "GPBAD"
    assert [item.CodeValue for item in stored.ScheduledWorkitemCodeSequence] == ["CAD"]
    assert stored.GeneralPurposeScheduledProcedureStepStatus == "IN PROGRESS"
    assert [str(p.HumanPerformerName) for p in stored.ActualHumanPerformersSequence] == \
        ["ACTUAL^ONE"]
    changed = {key for key in set(after["dataset"]) | set(before[uid]["dataset"])
               if after["dataset"].get(key) != before[uid]["dataset"].get(key)}
    assert changed == {"00404001", "00404035"}, changed
    (match,) = gp_find(agent, [f"SOPInstanceUID={uid}", "PatientName",
                               "ScheduledProcedureStepID"])
    assert str(match.PatientName) == "BAD^INPUT" and match.ScheduledProcedureStepID == "GPBAD"

    # GP-PPS N-CREATE and N-SET with unreadable data sets: A900, nothing kept or changed.
    pps_uid = new_uid()
    response = raw_request(agent, lambda message_id: N_CREATE_RQ(
        AffectedSOPClassUID=GPPPS, MessageID=message_id, CommandDataSetType=DATA_SET_PRESENT,
        AffectedSOPInstanceUID=pps_uid), MALFORMED, GPPPS)
    assert response.Status == FAILED, hex(response.Status)
    assert performed(agent) == {}
    assert create_pps(agent, pps_uid, gppps_create((uid, transaction_uid))) == SUCCESS
    snapshot = performed(agent)[pps_uid].to_json_dict()
    response = raw_request(agent, lambda message_id: N_SET_RQ(
        RequestedSOPClassUID=GPPPS, MessageID=message_id, CommandDataSetType=DATA_SET_PRESENT,
        RequestedSOPInstanceUID=pps_uid), MALFORMED, GPPPS)
    assert response.Status == FAILED, hex(response.Status)
    assert performed(agent)[pps_uid].to_json_dict() == snapshot
    # ... and the performed step is still IN PROGRESS: a readable N-SET is accepted.
    assert set_pps(agent, pps_uid, gppps_set("COMPLETED")) == SUCCESS
    assert_no_traceback(agent)


def test_request_for_another_sop_class_is_refused(agent_factory, tmp_path):
    """A request whose SOP Class UID is not the one the operation belongs to: an N-CREATE
    "of a GP-SPS" (which has no N-CREATE) or of an MPPS on the meta / GP-PPS context, an
    N-ACTION naming the GP-PPS class: refused with 0118 No Such SOP Class (PS3.7 10.1.5.1.6,
    10.1.4.1.10), nothing created or changed."""
    agent = agent_factory()
    (uid,) = schedule(agent, tmp_path, [gpsps("GPCLASS")])
    transaction_uid = new_uid()
    mpps = "1.2.840.10008.3.1.2.3.3"
    data = encode(gppps_create(), IMPLICIT_VR_LITTLE_ENDIAN)
    outcomes = {}
    for name, sop_class, context in (("gpsps-on-meta", GPSPS, META),
                                     ("mpps-on-gppps", mpps, GPPPS)):
        pps_uid = new_uid()
        response = raw_request(agent, lambda message_id: N_CREATE_RQ(
            AffectedSOPClassUID=sop_class, MessageID=message_id,
            CommandDataSetType=DATA_SET_PRESENT, AffectedSOPInstanceUID=pps_uid), data, context)
        outcomes[f"N-CREATE {name}"] = (response.Status, pps_uid in performed(agent))
    data = encode(action_data("IN PROGRESS", transaction_uid), IMPLICIT_VR_LITTLE_ENDIAN)
    response = raw_request(agent, lambda message_id: N_ACTION_RQ(
        RequestedSOPClassUID=GPPPS, MessageID=message_id, CommandDataSetType=DATA_SET_PRESENT,
        RequestedSOPInstanceUID=uid, ActionTypeID=1), data, META)
    outcomes["N-ACTION gppps-on-meta"] = (response.Status,
                                          steps(agent)[uid]["status"] != "SCHEDULED")
    # 0118 No Such SOP Class; 0122 (SOP Class not supported) or 0211 (Unrecognized
    # Operation) would do as well: a failure, and nothing done.
    shown = {name: (f"0x{status:04X}", changed) for name, (status, changed) in outcomes.items()}
    for name, (status, changed) in outcomes.items():
        assert status in (0x0118, 0x0122, 0x0211) and not changed, shown


def test_gpsps_add_is_all_or_nothing(tmp_path):
    """``gpsps add``: an unreadable file or a UID scheduled already: exit 1, nothing added;
    the status in a file is replaced by SCHEDULED; a file without a UID gets a new one."""
    data_dir = tmp_path / "data"
    fixed = new_uid()
    good = write_json(tmp_path / "good.json", [gpsps("GPADD1", uid=fixed), gpsps("GPADD2")])
    broken = tmp_path / "broken.json"
    broken.write_text('{"00100010": {"vr": "PN", "Value": [')
    done = cli("gpsps", "add", "--data-dir", str(data_dir), str(good), str(broken))
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "broken.json" in done.stderr and "nothing added" in done.stderr, done.stderr
    assert done.stdout == ""
    store = WorkflowStore(str(data_dir / "index.sqlite"))
    try:
        assert store.gpsps_steps() == []
    finally:
        store.close()

    # A DICOM file (Part 10) as well as DICOM JSON.
    part10_uid = new_uid()
    part10 = gpsps("GPADD4", uid=part10_uid)
    part10.SOPClassUID = GPSPS
    part10.file_meta = pydicom.dataset.FileMetaDataset()
    part10.file_meta.MediaStorageSOPClassUID = GPSPS
    part10.file_meta.MediaStorageSOPInstanceUID = part10_uid
    part10.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    pydicom.dcmwrite(tmp_path / "step.dcm", part10, enforce_file_format=True)
    done = cli("gpsps", "add", "--data-dir", str(data_dir), str(good), str(tmp_path / "step.dcm"))
    assert done.returncode == 0, done.stderr
    uids = done.stdout.split()
    assert len(uids) == 3 and uids[0] == fixed and uids[2] == part10_uid, uids
    assert uids[1] not in (fixed, part10_uid) and pydicom.uid.UID(uids[1]).is_valid

    # Again the same file (duplicate UID) with a new step: exit 1, the new step not added.
    new = write_json(tmp_path / "new.json", [gpsps("GPADD3")])
    done = cli("gpsps", "add", "--data-dir", str(data_dir), str(new), str(good))
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert fixed in done.stderr, done.stderr
    rows = json.loads(cli("gpsps", "ls", "--json", "--data-dir", str(data_dir)).stdout)
    assert sorted(row["sop_instance_uid"] for row in rows) == sorted(uids)
    assert len(rows) == 3
    assert Dataset.from_json(rows[2]["dataset"]).ScheduledProcedureStepID == "GPADD4"
    assert not any(key.startswith("0002") for row in rows for key in row["dataset"])
    for row in rows:
        assert (row["status"], row["on_worklist"], row["transaction_uid"]) == \
            ("SCHEDULED", True, "")
        ds = Dataset.from_json(row["dataset"])
        assert ds.GeneralPurposeScheduledProcedureStepStatus == "SCHEDULED"
        assert ds.SOPClassUID == GPSPS and ds.SOPInstanceUID == row["sop_instance_uid"]


# === 4. concurrent claims ===================================================================


def test_concurrent_claims_exactly_one_wins(agent_factory, tmp_path):
    """Two ``gpsps action --status "IN PROGRESS"`` processes at once, each with its own
    Transaction UID, for several steps: one 0000 and one A503 each time, and the step keeps
    the winner's Transaction UID (the loser cannot complete it: A502)."""
    agent = agent_factory()
    uids = schedule(agent, tmp_path, [gpsps(f"GPRACE{n}") for n in range(3)])
    launched = []
    for uid in uids:
        for who in ("A", "B"):
            transaction_uid = new_uid()
            args = dicomagent_cmd("gpsps", "action", *scu_args(agent), uid, "--status",
                                  "IN PROGRESS", "--transaction-uid", transaction_uid,
                                  "--performer", f"SCU^{who}")
            launched.append((uid, transaction_uid, subprocess.Popen(
                args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    results: dict[str, list[tuple[int, str]]] = {uid: [] for uid in uids}
    for uid, transaction_uid, process in launched:
        out, err = process.communicate(timeout=60)
        done = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        results[uid].append((printed_status(done, "N-ACTION", uid), transaction_uid))

    rows = steps(agent)
    for uid in uids:
        statuses = sorted(status for status, _ in results[uid])
        assert statuses == [SUCCESS, ALREADY_IN_PROGRESS], (uid, results[uid])
        winner = next(t for status, t in results[uid] if status == SUCCESS)
        loser = next(t for status, t in results[uid] if status != SUCCESS)
        assert (rows[uid]["status"], rows[uid]["transaction_uid"]) == ("IN PROGRESS", winner)
        assert action(agent, uid, action_data("COMPLETED", loser)) == WRONG_TRANSACTION_UID
        assert action(agent, uid, action_data("COMPLETED", winner)) == SUCCESS


def test_concurrent_claims_many_associations(agent_factory, tmp_path):
    """The same race in-process, tighter: for each of 10 steps, three associations send
    their N-ACTION together; per step exactly one 0000, the others A503."""
    agent = agent_factory()
    uids = schedule(agent, tmp_path, [gpsps(f"GPMANY{n}") for n in range(10)])

    async def claim(uid: str, transaction_uid: str) -> tuple[int, str]:
        association = await associate(agent.host, agent.port, SCU_AET, agent.ae_title,
                                      [ProposedContext(GPSPS, (IMPLICIT_VR_LITTLE_ENDIAN,))],
                                      artim_timeout=10, dimse_timeout=10, network_timeout=10)
        try:
            result = await n_action(association, GPSPS, uid, 1,
                                    action_data("IN PROGRESS", transaction_uid))
            return result.status, transaction_uid
        finally:
            await association.release()

    async def main():
        return await asyncio.gather(*(claim(uid, new_uid()) for uid in uids
                                      for n in range(3)))

    outcomes = asyncio.run(main())
    rows = steps(agent)
    for index, uid in enumerate(uids):
        mine = outcomes[index * 3:index * 3 + 3]
        assert sorted(status for status, _ in mine) == \
            [SUCCESS, ALREADY_IN_PROGRESS, ALREADY_IN_PROGRESS], (uid, mine)
        winner = next(t for status, t in mine if status == SUCCESS)
        assert rows[uid]["transaction_uid"] == winner


# === 5. restart =============================================================================


def test_state_survives_a_restart(agent_factory, tmp_path):
    """Steps SCHEDULED, claimed, performed, completed and a GP-PPS IN PROGRESS: after SIGTERM
    and a new daemon on the same data dir, the worklist, the claims and the performed step
    are as they were, and the rules still hold on them."""
    agent = agent_factory()
    waiting, claimed, performing, done_uid = schedule(
        agent, tmp_path, [gpsps(f"GPR{n}", patient_id="PRESTART") for n in range(4)])
    t_claimed, t_performing, t_done = new_uid(), new_uid(), new_uid()
    assert action(agent, claimed, action_data("IN PROGRESS", t_claimed)) == SUCCESS
    assert action(agent, performing, action_data("IN PROGRESS", t_performing)) == SUCCESS
    pps = new_uid()
    assert create_pps(agent, pps, gppps_create((performing, t_performing))) == SUCCESS
    assert action(agent, done_uid, action_data("IN PROGRESS", t_done)) == SUCCESS
    assert action(agent, done_uid, action_data("COMPLETED", t_done)) == SUCCESS
    before = steps(agent)
    assert agent.terminate() == 0, agent.log()

    restarted = agent_factory(data_dir=agent.data_dir)
    assert steps(restarted) == before
    listed = {ds.SOPInstanceUID: ds.GeneralPurposeScheduledProcedureStepStatus
              for ds in gp_find(restarted, ["PatientID=PRESTART", "SOPInstanceUID",
                                            "GeneralPurposeScheduledProcedureStepStatus"])}
    assert listed == {waiting: "SCHEDULED", claimed: "IN PROGRESS"}
    assert cli_action(restarted, claimed, "IN PROGRESS", new_uid()) == (1, ALREADY_IN_PROGRESS)
    assert action(restarted, claimed, action_data("SUSPENDED", t_performing)) == \
        WRONG_TRANSACTION_UID
    assert action(restarted, done_uid, action_data("IN PROGRESS", t_done)) == \
        MAY_NO_LONGER_BE_UPDATED
    assert create_pps(restarted, pps, gppps_create((claimed, t_claimed))) == \
        DUPLICATE_SOP_INSTANCE
    assert create_pps(restarted, new_uid(), gppps_create((claimed, new_uid()))) == \
        TRANSACTION_UID_MISMATCH
    assert set_pps(restarted, pps, gppps_set("COMPLETED")) == SUCCESS
    assert action(restarted, performing, action_data("COMPLETED", t_performing)) == SUCCESS
    assert action(restarted, claimed, action_data("SUSPENDED", t_claimed)) == SUCCESS
    assert action(restarted, waiting, action_data("IN PROGRESS", new_uid())) == SUCCESS
    rows = steps(restarted)
    assert {uid: rows[uid]["status"] for uid in rows} == {
        waiting: "IN PROGRESS", claimed: "SUSPENDED", performing: "COMPLETED",
        done_uid: "COMPLETED"}
    assert performed(restarted)[pps].GeneralPurposePerformedProcedureStepStatus == "COMPLETED"
    assert_no_traceback(agent)
    assert_no_traceback(restarted)


# === 6. the meta SOP class ==================================================================


def meta_find(node: RunningNode, keys: list[str]) -> tuple[int, list[Dataset]]:
    """C-FIND on a General Purpose Worklist Management Meta SOP Class context."""

    async def work(association):
        context = association.context_for(META)
        message_id = association.next_message_id()
        association.send_message(context.context_id, C_FIND_RQ(
            AffectedSOPClassUID=GPWL_FIND, MessageID=message_id),
            encode(parse_keys(keys, require_level=False), context.transfer_syntax))
        matches = []
        while True:
            received = await association.wait_response(message_id)
            if category(received.command.Status) is StatusCategory.PENDING:
                matches.append(decode(received.data_set, context.transfer_syntax))
                continue
            association.done_with(message_id)
            return received.command.Status, matches

    return in_process(node, work, (META,))


def test_meta_sop_class(agent_factory, tmp_path):
    """``--meta`` (only the meta SOP class proposed) for N-ACTION, N-CREATE and N-SET, and a
    C-FIND on the meta context: the whole workflow on one abstract syntax."""
    agent = agent_factory()
    (uid,) = schedule(agent, tmp_path, [gpsps("GPMETA", patient_id="PMETA")])
    status, matches = meta_find(agent, ["PatientID=PMETA", "SOPInstanceUID",
                                        "GeneralPurposeScheduledProcedureStepStatus"])
    assert status == SUCCESS
    assert [(ds.SOPInstanceUID, ds.GeneralPurposeScheduledProcedureStepStatus)
            for ds in matches] == [(uid, "SCHEDULED")]

    transaction_uid = new_uid()
    mark = agent.log_mark()
    assert cli_action(agent, uid, "IN PROGRESS", transaction_uid, "--meta") == (0, SUCCESS)
    # The association carried the meta SOP class alone.
    accepted = agent.wait_for_log("association accepted", mark)
    line = next(line for line in accepted.splitlines() if "association accepted" in line)
    assert f"{META} (" in line and GPSPS not in line, line
    assert action(agent, uid, action_data("IN PROGRESS", new_uid()), 1, META) == \
        ALREADY_IN_PROGRESS
    status, matches = meta_find(agent, [f"SOPInstanceUID={uid}",
                                        "GeneralPurposeScheduledProcedureStepStatus"])
    assert [ds.GeneralPurposeScheduledProcedureStepStatus for ds in matches] == ["IN PROGRESS"]

    pps_uid = new_uid()
    pps_file = tmp_path / "pps.json"
    pps_file.write_text(json.dumps(gppps_create((uid, transaction_uid)).to_json_dict()))
    done = cli("gppps", "create", *scu_args(agent), str(pps_file), "--uid", pps_uid, "--meta")
    assert printed_status(done, "N-CREATE", pps_uid) == SUCCESS
    assert meta_find(agent, [f"SOPInstanceUID={uid}"]) == (SUCCESS, [])
    set_file = tmp_path / "set.json"
    set_file.write_text(json.dumps(gppps_set("COMPLETED").to_json_dict()))
    done = cli("gppps", "set", *scu_args(agent), pps_uid, str(set_file), "--meta")
    assert printed_status(done, "N-SET", pps_uid) == SUCCESS
    assert cli_action(agent, uid, "COMPLETED", transaction_uid, "--meta") == (0, SUCCESS)
    assert steps(agent)[uid]["status"] == "COMPLETED"
    pps = performed(agent)[pps_uid]
    assert pps.GeneralPurposePerformedProcedureStepStatus == "COMPLETED"
    assert pps.PatientID == "PMETA"
    # Failure statuses on the meta context as well.
    assert set_pps(agent, pps_uid, gppps_set("COMPLETED"), META) == PPS_NOT_IN_PROGRESS
    assert create_pps(agent, pps_uid, gppps_create(), META) == DUPLICATE_SOP_INSTANCE
    assert action(agent, uid, action_data("IN PROGRESS", transaction_uid), 1, META) == \
        MAY_NO_LONGER_BE_UPDATED
    assert_no_traceback(agent)


# === 7. General Purpose Worklist matching ===================================================

STUDY = {n: f"{UID_ROOT}900.{n}" for n in range(1, 6)}
SOP = {n: f"{UID_ROOT}901.{n}" for n in range(1, 6)}

#: Five steps; GP4 is claimed (IN PROGRESS) by the fixture, the others stay SCHEDULED.
MATCH_STEPS = [
    gpsps("GP1", uid=SOP[1], patient_name="DOE^JOHN", patient_id="P1", study_uid=STUDY[1],
          priority="HIGH", start="20240110080000", expected="20240110120000",
          availability="COMPLETE", workitem="CAD", station="STN-A", station_class="CLS-X",
          location="ROOM1", performers=(performer("SMITH^ANNA", "P-SMITH"),)),
    gpsps("GP2", uid=SOP[2], patient_name="DOE^JANE", patient_id="P2", study_uid=STUDY[2],
          priority="MEDIUM", start="20240110143000", expected="20240110180000",
          availability="PARTIAL", workitem="3DREC", station="STN-B", station_class="CLS-X",
          location="ROOM2", performers=(performer("JONES^BOB", "P-JONES"),)),
    gpsps("GP3", uid=SOP[3], patient_name="MILLER^MAX", patient_id="P3", study_uid=STUDY[3],
          priority="LOW", start="20240111091500", expected="20240111100000",
          availability="COMPLETE", workitem="CAD", station="STN-A", station_class="CLS-Y",
          location="ROOM1", performers=(performer("SMITH^ANNA", "P-SMITH"),
                                        performer("BROWN^CARL", "P-BROWN"))),
    gpsps("GP4", uid=SOP[4], patient_name="ROE^RICHARD", patient_id="P4", study_uid=STUDY[4],
          priority="HIGH", start="20240112100000", expected="20240113100000",
          availability="PARTIAL", workitem="REPORT", station="STN-C", station_class="CLS-Z",
          location="ROOM3"),
    gpsps("GP5", uid=SOP[5], patient_name="DOE^JOHN", patient_id="P1", study_uid=STUDY[5],
          priority="MEDIUM", start="20240111235959", expected="20240112060000",
          availability="COMPLETE", workitem="3DREC", station="STN-B", station_class="CLS-Y",
          location="ROOM2", performers=(performer("WHITE^DAN"),)),
]
ALL = {"GP1", "GP2", "GP3", "GP4", "GP5"}
WORKITEM = "ScheduledWorkitemCodeSequence[0]"
PERFORMERS = "ScheduledHumanPerformersSequence[0]"

#: (case id, matching keys, the Scheduled Procedure Step IDs that match)
MATCH_CASES = [
    ("universal", [], ALL),
    ("patient-name", ["PatientName=DOE^JOHN"], {"GP1", "GP5"}),
    ("patient-name-wildcard", ["PatientName=DOE^*"], {"GP1", "GP2", "GP5"}),
    ("patient-name-question", ["PatientName=DOE^JA?E"], {"GP2"}),
    ("patient-name-none", ["PatientName=NOBODY*"], set()),
    ("patient-id", ["PatientID=P3"], {"GP3"}),
    ("study-uid", [f"StudyInstanceUID={STUDY[2]}"], {"GP2"}),
    ("study-uid-list", [f"StudyInstanceUID={STUDY[1]}\\{STUDY[4]}"], {"GP1", "GP4"}),
    ("sop-instance-uid", [f"SOPInstanceUID={SOP[3]}"], {"GP3"}),
    ("sop-instance-uid-list", [f"SOPInstanceUID={SOP[5]}\\{SOP[2]}"], {"GP2", "GP5"}),
    ("sps-id", ["ScheduledProcedureStepID=GP4"], {"GP4"}),
    ("sps-id-wildcard", ["ScheduledProcedureStepID=GP*"], ALL),
    ("status-scheduled", ["GeneralPurposeScheduledProcedureStepStatus=SCHEDULED"],
     {"GP1", "GP2", "GP3", "GP5"}),
    ("status-in-progress", ["GeneralPurposeScheduledProcedureStepStatus=IN PROGRESS"],
     {"GP4"}),
    ("priority", ["GeneralPurposeScheduledProcedureStepPriority=HIGH"], {"GP1", "GP4"}),
    ("priority-low", ["GeneralPurposeScheduledProcedureStepPriority=LOW"], {"GP3"}),
    ("start-single", ["ScheduledProcedureStepStartDateTime=20240110080000"], {"GP1"}),
    ("start-range-days", ["ScheduledProcedureStepStartDateTime=20240110-20240111"],
     {"GP1", "GP2", "GP3", "GP5"}),
    ("start-range-times", ["ScheduledProcedureStepStartDateTime=20240110120000-20240111100000"],
     {"GP2", "GP3"}),
    ("start-from", ["ScheduledProcedureStepStartDateTime=20240111120000-"], {"GP4", "GP5"}),
    ("start-until", ["ScheduledProcedureStepStartDateTime=-20240110"], {"GP1", "GP2"}),
    ("expected-range", ["ExpectedCompletionDateTime=20240112-"], {"GP4", "GP5"}),
    ("expected-until", ["ExpectedCompletionDateTime=-20240110150000"], {"GP1"}),
    ("input-availability", ["InputAvailabilityFlag=PARTIAL"], {"GP2", "GP4"}),
    ("workitem-code", [f"{WORKITEM}.CodeValue=CAD"], {"GP1", "GP3"}),
    ("workitem-code-and-scheme", [f"{WORKITEM}.CodeValue=3DREC",
                                  f"{WORKITEM}.CodingSchemeDesignator=99GP"], {"GP2", "GP5"}),
    ("workitem-code-wrong-scheme", [f"{WORKITEM}.CodeValue=CAD",
                                    f"{WORKITEM}.CodingSchemeDesignator=OTHER"], set()),
    ("workitem-code-return-only", [f"{WORKITEM}.CodeValue", f"{WORKITEM}.CodeMeaning"], ALL),
    ("station-name-code", ["ScheduledStationNameCodeSequence[0].CodeValue=STN-A"],
     {"GP1", "GP3"}),
    ("station-class-code", ["ScheduledStationClassCodeSequence[0].CodeValue=CLS-X"],
     {"GP1", "GP2"}),
    ("station-location-code",
     ["ScheduledStationGeographicLocationCodeSequence[0].CodeValue=ROOM2"], {"GP2", "GP5"}),
    ("performer-name", [f"{PERFORMERS}.HumanPerformerName=SMITH^ANNA"], {"GP1", "GP3"}),
    # The second item of GP3's performers matches.
    ("performer-name-wildcard", [f"{PERFORMERS}.HumanPerformerName=BROWN*"], {"GP3"}),
    ("performer-code", [f"{PERFORMERS}.HumanPerformerCodeSequence[0].CodeValue=P-JONES"],
     {"GP2"}),
    # Name and code must match in one item: GP3 has SMITH^ANNA and P-BROWN, not together.
    ("performer-name-and-code", [f"{PERFORMERS}.HumanPerformerName=SMITH^ANNA",
                                 f"{PERFORMERS}.HumanPerformerCodeSequence[0].CodeValue=P-BROWN"],
     set()),
    ("performer-name-and-own-code",
     [f"{PERFORMERS}.HumanPerformerName=BROWN^CARL",
      f"{PERFORMERS}.HumanPerformerCodeSequence[0].CodeValue=P-BROWN"], {"GP3"}),
    ("and", ["PatientID=P1", f"{WORKITEM}.CodeValue=3DREC"], {"GP5"}),
    ("and-none", ["PatientName=DOE^*", "InputAvailabilityFlag=PARTIAL",
                  "GeneralPurposeScheduledProcedureStepPriority=HIGH"], set()),
    ("and-range-and-sequence", ["ScheduledProcedureStepStartDateTime=20240110-20240111",
                                "ScheduledStationClassCodeSequence[0].CodeValue=CLS-Y"],
     {"GP3", "GP5"}),
]


@pytest.fixture(scope="module")
def gp_worklist(module_agent_factory, tmp_path_factory):
    agent = module_agent_factory()
    work = tmp_path_factory.mktemp("gpwl")
    assert schedule(agent, work, MATCH_STEPS) == [SOP[n] for n in range(1, 6)]
    assert action(agent, SOP[4], action_data("IN PROGRESS", new_uid())) == SUCCESS
    return agent


@pytest.mark.parametrize("keys, expected", [(case[1], case[2]) for case in MATCH_CASES],
                         ids=[case[0] for case in MATCH_CASES])
def test_gpwl_matching(gp_worklist, keys, expected):
    matches = gp_find(gp_worklist, ["ScheduledProcedureStepID", *keys])
    found = [ds.ScheduledProcedureStepID for ds in matches]
    assert sorted(found) == sorted(expected), found


def test_gpwl_response_values(gp_worklist):
    """The values returned for every key asked for: sequences with only the sub-keys asked,
    the claimed step with its new status, empty values for keys the step does not have."""
    keys = ["ScheduledProcedureStepID", "SOPInstanceUID", "SOPClassUID", "PatientName",
            "PatientID", "PatientBirthDate", "StudyInstanceUID",
            "GeneralPurposeScheduledProcedureStepStatus",
            "GeneralPurposeScheduledProcedureStepPriority",
            "ScheduledProcedureStepStartDateTime", "ExpectedCompletionDateTime",
            "InputAvailabilityFlag", f"{WORKITEM}.CodeValue",
            "ScheduledStationNameCodeSequence[0].CodeValue",
            f"{PERFORMERS}.HumanPerformerName", "ScheduledProcedureStepDescription",
            "AccessionNumber"]
    matches = {ds.ScheduledProcedureStepID: ds for ds in gp_find(gp_worklist, keys)}
    assert set(matches) == ALL
    for index, source in enumerate(MATCH_STEPS, 1):
        ds = matches[source.ScheduledProcedureStepID]
        assert ds.SOPInstanceUID == SOP[index]
        assert ds.SOPClassUID == GPSPS
        assert str(ds.PatientName) == str(source.PatientName)
        assert ds.PatientID == source.PatientID
        assert ds.StudyInstanceUID == STUDY[index]
        assert ds.GeneralPurposeScheduledProcedureStepStatus == \
            ("IN PROGRESS" if index == 4 else "SCHEDULED")
        assert ds.GeneralPurposeScheduledProcedureStepPriority == \
            source.GeneralPurposeScheduledProcedureStepPriority
        assert ds.ScheduledProcedureStepStartDateTime == \
            source.ScheduledProcedureStepStartDateTime
        assert ds.ExpectedCompletionDateTime == source.ExpectedCompletionDateTime
        assert ds.InputAvailabilityFlag == source.InputAvailabilityFlag
        assert [item.CodeValue for item in ds.ScheduledWorkitemCodeSequence] == \
            [source.ScheduledWorkitemCodeSequence[0].CodeValue]
        assert set(ds.ScheduledWorkitemCodeSequence[0].keys()) == {0x00080100}
        assert [item.CodeValue for item in ds.ScheduledStationNameCodeSequence] == \
            [source.ScheduledStationNameCodeSequence[0].CodeValue]
        assert [str(item.HumanPerformerName) for item in
                ds.get("ScheduledHumanPerformersSequence", [])] == \
            [str(item.HumanPerformerName) for item in
             source.get("ScheduledHumanPerformersSequence", [])]
        assert ds.ScheduledProcedureStepDescription == source.ScheduledProcedureStepDescription
        assert "AccessionNumber" in ds and ds.AccessionNumber in ("", None)


def test_gpwl_cli_json(gp_worklist):
    """``dicomagent gpwl --json`` (``find --model gpwl``): the same matching from the CLI."""
    found = cli_gpwl(gp_worklist, "ScheduledProcedureStepID",
                     "ScheduledProcedureStepStartDateTime=20240110120000-20240112",
                     f"{PERFORMERS}.HumanPerformerName=*ANNA")
    assert [ds.ScheduledProcedureStepID for ds in found] == ["GP3"]
