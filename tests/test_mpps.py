"""Modality Performed Procedure Step SCP: coercion, worklist removal, durable forwarding.

What is proved here, end to end against running daemons (``dicomagent serve``), with
``dicomagent mpps create/set`` as the modality and a second ``dicomagent serve`` as the
RIS the first one forwards to:

- forwarding through an outage: the RIS is down while the modality sends N-CREATE, an
  N-SET (IN PROGRESS) and an N-SET (COMPLETED); the forwarder keeps them, in order, with
  the last error (``outbox ls --json``); it is stopped and started again on the same data
  dir and port, retries, and once the RIS is up all three arrive, in order (the RIS's log:
  N-CREATE before each N-SET, never a refusal such as 0112), carrying the coerced data set;
  the outbox is empty at the end;
- coercion: patient identification and scheduling information come from the worklist
  item the step names (all of its non-empty references equal), not from the modality,
  and later N-SETs cannot change them; a reference that does not match coerces nothing;
  the worklist item goes once the step is COMPLETED or DISCONTINUED, not before;
- bad input: N-SET of an unknown instance (0112), N-CREATE without status (0120) or with
  another status (0106), duplicate N-CREATE (0111), N-SET with a status not allowed (0106),
  N-SET after COMPLETED (0110), a malformed data set in N-CREATE and N-SET (A900): each
  answered with its status, nothing stored or queued for forwarding, the daemon serving on;
- the SCP chooses the SOP Instance UID when the N-CREATE has none, and returns it;
- a failure status from the RIS marks the message failed, not retried, and the next one
  goes; 0111 for an N-CREATE tried before counts as delivered;
- ``[mpps] lifetime_days``: old instances are removed when the daemon starts;
- the command line's exit codes: 3 when nothing listens, 4 when the association is
  rejected;
- three faults found while writing these tests, each proved by a test that fails on
  3d7cee1: a step that finishes after its worklist item was removed (by another step
  performing it) removes whichever new item got the same SQLite rowid; a coerced Patient's
  Name in another character set than the N-CREATE's Specific Character Set reaches the RIS
  as "?"; a coerced Patient ID keeps the modality's Issuer of Patient ID when the worklist
  item has none;
- DCMTK: DCMTK 3.6.7's command-line tools have no MPPS SCU (its SCUs are echoscu,
  findscu, getscu, movescu, storescu, dcmsend, dcmprscu, termscu), so the interop is with
  what DCMTK does have: a worklist file and an N-CREATE data set written by
  ``dump2dcm``, and ``findscu -W`` seeing the worklist item before the step completes and
  no more after.

Most ``dicomagent`` commands run through ``dicomagent.cli.main`` in the test process (the
same code as the console script, without a second of interpreter start-up per call on a
busy machine); the modality's requests and the checks of the outage test, the exit codes
and the SCP-chosen UID run ``python -m dicomagent`` in a child process.

References
----------
PS3.4 Annex F (F.7.2.1 N-CREATE, F.7.2.2 N-SET), Annex K (Modality Worklist);
PS3.7 §10.1.3, §10.1.5, Annex C; seed 3.1.2.6, 3.1.3.6.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import sqlite3
import struct
import subprocess
import time
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from dicomagent.association import associate
from dicomagent.cli import main as cli_main
from dicomagent.dimse.commands import DATA_SET_PRESENT, N_CREATE_RQ, N_SET_RQ, encode_command
from dicomagent.normalized import n_create
from dicomagent.ul.negotiation import ProposedContext
from nodes import HOST, RunningNode, dicomagent_cmd, free_port, new_uid, run

MPPS = "1.2.840.10008.3.1.2.3.3"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_SOP_INSTANCE = 0x0112
MISSING_ATTRIBUTE = 0x0120
INVALID_ATTRIBUTE_VALUE = 0x0106
FAILED = 0xA900

FORWARDER_AET = "MPPSFWD"
RIS_AET = "RIS"
MODALITY_AET = "MODALITY"

# --- configurations ---------------------------------------------------------------------------

def forwarder_config(ris_port: int, first_retry: float = 0.5, last_retry: float = 2.0,
                     extra: str = "") -> str:
    return (f'[agent]\nae_title = "{FORWARDER_AET}"\n\n'
            f'[mpps]\nforward_to = ["RIS"]\n\n'
            f'[outbox]\nfirst_retry = {first_retry}\nlast_retry = {last_retry}\n\n'
            f'[peers.RIS]\nae_title = "{RIS_AET}"\nhost = "{HOST}"\nport = {ris_port}\n'
            + extra)


#: The RIS checks the Called AE title: the forwarder must call it by its configured name.
RIS_CONFIG = f'[agent]\nae_title = "{RIS_AET}"\ncheck_called_aet = true\n'


# --- data sets --------------------------------------------------------------------------------

def worklist_item(study_uid: str, n: int = 1) -> Dataset:
    """A Modality Worklist item: the patient as the RIS knows them, one scheduled step."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = f"Right^Rita{n}"
    ds.PatientID = f"MWL-{n:04d}"
    ds.IssuerOfPatientID = "HOSPITAL"
    ds.PatientBirthDate = "19700102"
    ds.PatientSex = "F"
    ds.AccessionNumber = f"ACC-{n:04d}"
    ds.RequestedProcedureID = f"RP-{n:04d}"
    ds.RequestedProcedureDescription = f"CT head {n} (from the RIS)"
    ds.StudyInstanceUID = study_uid
    ds.ReferringPhysicianName = "Referrer^Rolf"
    step = Dataset()
    step.Modality = "CT"
    step.ScheduledStationAETitle = MODALITY_AET
    step.ScheduledProcedureStepStartDate = time.strftime("%Y%m%d")
    step.ScheduledProcedureStepStartTime = "080000"
    step.ScheduledProcedureStepID = f"SPS-{n:04d}"
    step.ScheduledProcedureStepDescription = f"CT head plain {n} (from the RIS)"
    ds.ScheduledProcedureStepSequence = [step]
    return ds


def n_create_data_set(study_uid: str, n: int = 1, *, accession: str | None = None,
                      step_id: str | None = None, status: str | None = "IN PROGRESS",
                      patient_name: str = "Wrong^Walter") -> Dataset:
    """What a modality sends: its own (mistyped) patient data, a reference to the step."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    if status is not None:
        ds.PerformedProcedureStepStatus = status
    ds.PatientName = patient_name
    ds.PatientID = "TYPO-1"
    ds.PatientBirthDate = "19991231"
    ds.PatientSex = "M"
    ds.Modality = "CT"
    ds.PerformedStationAETitle = MODALITY_AET
    ds.PerformedProcedureStepID = f"PPS-{n:04d}"
    ds.PerformedProcedureStepStartDate = "20240601"
    ds.PerformedProcedureStepStartTime = "081500"
    ds.PerformedProcedureStepDescription = "CT head as performed"
    item = Dataset()
    item.StudyInstanceUID = study_uid
    item.AccessionNumber = accession if accession is not None else f"ACC-{n:04d}"
    item.RequestedProcedureID = f"RP-{n:04d}"
    item.RequestedProcedureDescription = "typed at the modality"
    item.ScheduledProcedureStepID = step_id if step_id is not None else f"SPS-{n:04d}"
    item.ScheduledProcedureStepDescription = "typed at the modality too"
    ds.ScheduledStepAttributesSequence = [item]
    ds.PerformedSeriesSequence = []
    return ds


def n_set_data_set(status: str | None, **attributes) -> Dataset:
    ds = Dataset()
    if status is not None:
        ds.PerformedProcedureStepStatus = status
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def performed_series(series_uid: str, image_uid: str) -> list[Dataset]:
    image = Dataset()
    image.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    image.ReferencedSOPInstanceUID = image_uid
    series = Dataset()
    series.SeriesInstanceUID = series_uid
    series.SeriesDescription = "axial"
    series.PerformingPhysicianName = ""
    series.OperatorsName = "Operator^Otto"
    series.ProtocolName = "HEAD"
    series.RetrieveAETitle = ""
    series.ReferencedImageSequence = [image]
    return [series]


def write_json(path: Path, ds: Dataset) -> Path:
    path.write_text(json.dumps(ds.to_json_dict()))
    return path


# --- the dicomagent command line --------------------------------------------------------------

def dicomagent(*args: str, real: bool = False, timeout: float = 30.0):
    """A ``dicomagent`` command: in a child process (``real``), else through ``cli.main`` in
    this process (the same code, without a second of interpreter start-up per call on a
    busy machine). Returns a ``CompletedProcess``."""
    if real:
        return run(dicomagent_cmd(*args), timeout)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(list(args))
        except SystemExit as error:          # argparse
            code = error.code
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


_RESULT = re.compile(r"^N-(CREATE|SET) (\S*): status 0x([0-9A-F]{4})(.*)$")


def mpps_send(node: RunningNode, action: str, *args: str,
              real: bool = False) -> tuple[int, str, int, str]:
    """``dicomagent mpps create|set``: (exit code, SOP Instance UID, status, comment)."""
    result = dicomagent("mpps", action, node.host, str(node.port), "-aet", MODALITY_AET,
                        "-aec", node.ae_title, "--timeout", "10", *args, real=real)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, f"exit {result.returncode}\n{result.stdout}{result.stderr}"
    match = _RESULT.match(lines[0])
    assert match and match[1] == action.upper(), lines[0]
    status = int(match[3], 16)
    expected_code = 0 if status == SUCCESS else 1
    assert result.returncode == expected_code, (result.returncode, result.stdout, result.stderr)
    return result.returncode, match[2], status, match[4].strip()


def mpps_create(node: RunningNode, path: Path, uid: str | None = None, real: bool = False):
    return mpps_send(node, "create", *(["--uid", uid] if uid else []), str(path), real=real)


def mpps_set(node: RunningNode, uid: str, path: Path, real: bool = False):
    return mpps_send(node, "set", uid, str(path), real=real)


def mpps_ls(data_dir: Path, real: bool = False) -> dict[str, Dataset]:
    """``dicomagent mpps ls --json``: SOP Instance UID -> data set."""
    result = dicomagent("mpps", "ls", "--data-dir", str(data_dir), "--json", real=real)
    assert result.returncode == 0, result.stdout + result.stderr
    found = {}
    for obj in json.loads(result.stdout):
        ds = Dataset.from_json(obj)
        assert ds.SOPClassUID == MPPS, obj
        assert ds.SOPInstanceUID not in found, f"listed twice: {ds.SOPInstanceUID}"
        found[ds.SOPInstanceUID] = ds
    return found


def outbox_ls(data_dir: Path, real: bool = False) -> list[dict]:
    """``dicomagent outbox ls --json``."""
    result = dicomagent("outbox", "ls", "--data-dir", str(data_dir), "--json", real=real)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def worklist_add(data_dir: Path, *paths: Path) -> None:
    result = dicomagent("worklist", "add", "--data-dir", str(data_dir), *map(str, paths))
    assert result.returncode == 0, result.stdout + result.stderr


def worklist_ls(data_dir: Path) -> list[Dataset]:
    result = dicomagent("worklist", "ls", "--data-dir", str(data_dir), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return [Dataset.from_json(entry["dataset"]) for entry in json.loads(result.stdout)]


# --- waiting on the outbox (polled in the database; the checks use the CLI) ------------------

def outbox_rows(data_dir: Path) -> list[tuple]:
    """(seq, message, sop_instance_uid, state, attempts, last_error), in queue order."""
    db = sqlite3.connect(data_dir / "index.sqlite", timeout=10)
    try:
        return db.execute("SELECT seq, message, sop_instance_uid, state, attempts, last_error "
                          "FROM outbox ORDER BY seq").fetchall()
    except sqlite3.OperationalError:      # not created yet
        return []
    finally:
        db.close()


def wait_until(predicate, timeout: float, what):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what() if callable(what) else what}")
        time.sleep(0.1)


def wait_outbox_empty(node: RunningNode, timeout: float = 15.0) -> None:
    wait_until(lambda: not outbox_rows(node.data_dir), timeout,
               lambda: f"outbox empty; it holds {outbox_rows(node.data_dir)}; "
                       f"log:\n{node.log()}")


def text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, ""))


def assert_no_traceback(*nodes: RunningNode) -> None:
    for node in nodes:
        assert "Traceback" not in node.log(), node.log()


# --- raw requests through the library -------------------------------------------------------

async def _open(node: RunningNode):
    return await associate(node.host, node.port, MODALITY_AET, node.ae_title,
                           [ProposedContext(MPPS, [IMPLICIT_VR_LITTLE_ENDIAN])],
                           artim_timeout=10, dimse_timeout=10, network_timeout=10)


def raw_request(node: RunningNode, message: str, uid: str | None, data: bytes):
    """N-CREATE-RQ or N-SET-RQ with ``data`` as its data set bytes; the response command."""

    async def main():
        association = await _open(node)
        try:
            context = association.context_for(MPPS)
            assert context.transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
            if message == "N-CREATE":
                command = N_CREATE_RQ(AffectedSOPClassUID=MPPS,
                                      MessageID=association.next_message_id(),
                                      CommandDataSetType=DATA_SET_PRESENT,
                                      AffectedSOPInstanceUID=uid)
            else:
                command = N_SET_RQ(RequestedSOPClassUID=MPPS,
                                   MessageID=association.next_message_id(),
                                   CommandDataSetType=DATA_SET_PRESENT,
                                   RequestedSOPInstanceUID=uid)
            response = await association.request(context.context_id, command, data)
            return response.command
        finally:
            await association.release()

    return asyncio.run(main())


def implicit_element(group: int, element: int, value: bytes, length: int | None = None) -> bytes:
    """One element in Implicit VR Little Endian; ``length`` may lie about the value."""
    return struct.pack("<HHI", group, element, len(value) if length is None else length) + value


#: Data sets that cannot be read: a value running past the end, stray bytes after the
#: last element, an item longer than its sequence, and noise.
MALFORMED = {
    "value past the end": implicit_element(0x0040, 0x0252, b"IN PROGRESS ", length=64),
    "stray bytes": implicit_element(0x0040, 0x0252, b"IN PROGRESS ") + b"\x01\x02\x03",
    "item past its sequence": (implicit_element(0x0040, 0x0252, b"IN PROGRESS ")
                               + struct.pack("<HHI", 0x0040, 0x0270, 0xFFFFFFFF)
                               + struct.pack("<HHI", 0xFFFE, 0xE000, 40)
                               + implicit_element(0x0008, 0x0050, b"ACC1")),
    "noise": bytes(range(200, 256)) * 3,
}


# --- 1. forwarding through an outage and a restart --------------------------------------------

def test_forwarding_survives_ris_outage_and_forwarder_restart(agent_factory, tmp_path):
    """RIS down for N-CREATE and two N-SETs; forwarder restarted in between; RIS up: all
    three arrive in order, coerced; the worklist item goes at COMPLETED, not before."""
    ris_port = free_port()
    config = forwarder_config(ris_port)
    forwarder = agent_factory(config)
    study_uid = new_uid()
    worklist_add(forwarder.data_dir, write_json(tmp_path / "item.json", worklist_item(study_uid)))
    assert [text(i, "PatientName") for i in worklist_ls(forwarder.data_dir)] == ["Right^Rita1"]

    # N-CREATE, the RIS down.
    uid = new_uid()
    create = write_json(tmp_path / "create.json", n_create_data_set(study_uid))
    assert mpps_create(forwarder, create, uid, real=True) == (0, uid, SUCCESS, "")

    kept = mpps_ls(forwarder.data_dir)[uid]
    assert text(kept, "PerformedProcedureStepStatus") == "IN PROGRESS"
    assert text(kept, "PatientName") == "Right^Rita1"            # coerced ...
    assert text(kept, "PatientID") == "MWL-0001"
    assert text(kept, "IssuerOfPatientID") == "HOSPITAL"
    assert text(kept, "PatientBirthDate") == "19700102"
    assert text(kept, "PatientSex") == "F"
    assert text(kept, "PerformedProcedureStepID") == "PPS-0001"   # ... the rest as sent
    assert text(kept, "PerformedStationAETitle") == MODALITY_AET
    (item,) = kept.ScheduledStepAttributesSequence
    assert item.StudyInstanceUID == study_uid
    assert item.AccessionNumber == "ACC-0001"
    assert item.RequestedProcedureID == "RP-0001"
    assert item.RequestedProcedureDescription == "CT head 1 (from the RIS)"
    assert item.ScheduledProcedureStepID == "SPS-0001"
    assert item.ScheduledProcedureStepDescription == "CT head plain 1 (from the RIS)"

    # The forwarder tried, failed, keeps the N-CREATE waiting with the error.
    wait_until(lambda: any(row[4] >= 1 for row in outbox_rows(forwarder.data_dir)), 10,
               lambda: f"a failed attempt; outbox {outbox_rows(forwarder.data_dir)}")
    (waiting,) = outbox_ls(forwarder.data_dir, real=True)
    assert waiting["peer"] == "RIS" and waiting["message"] == "N-CREATE"
    assert waiting["sop_instance_uid"] == uid and waiting["sop_class_uid"] == MPPS
    assert waiting["state"] == "waiting" and waiting["attempts"] >= 1
    assert str(ris_port) in waiting["last_error"], waiting
    assert waiting["next_attempt"] > waiting["created_at"], waiting
    assert "forwarding to RIS failed" in forwarder.log()

    # N-SET, still IN PROGRESS: the modality's patient name is not taken; the item stays.
    series_uid, image_uid = new_uid(), new_uid()
    progress = write_json(tmp_path / "progress.json", n_set_data_set(
        "IN PROGRESS", PatientName="Evil^Edit", PatientID="EVIL-1",
        PerformedProcedureStepDescription="CT head, contrast added"))
    assert mpps_set(forwarder, uid, progress, real=True) == (0, uid, SUCCESS, "")
    assert len(worklist_ls(forwarder.data_dir)) == 1, "worklist item removed before the end"

    # N-SET COMPLETED: the worklist item goes.
    completed = write_json(tmp_path / "completed.json", n_set_data_set(
        "COMPLETED", PerformedProcedureStepEndDate="20240601",
        PerformedProcedureStepEndTime="083000", PatientName="Evil^Again",
        PerformedSeriesSequence=performed_series(series_uid, image_uid)))
    assert mpps_set(forwarder, uid, completed, real=True) == (0, uid, SUCCESS, "")
    assert worklist_ls(forwarder.data_dir) == [], "worklist item not removed at COMPLETED"

    kept = mpps_ls(forwarder.data_dir)[uid]
    assert text(kept, "PerformedProcedureStepStatus") == "COMPLETED"
    assert text(kept, "PatientName") == "Right^Rita1"
    assert text(kept, "PatientID") == "MWL-0001"
    assert text(kept, "PerformedProcedureStepDescription") == "CT head, contrast added"

    queued = outbox_ls(forwarder.data_dir)
    assert [(m["message"], m["sop_instance_uid"], m["state"]) for m in queued] == [
        ("N-CREATE", uid, "waiting"), ("N-SET", uid, "waiting"), ("N-SET", uid, "waiting")]
    assert [m["seq"] for m in queued] == sorted(m["seq"] for m in queued)

    # Stop the forwarder with everything queued; nothing is lost on disk.
    assert forwarder.terminate() == 0, forwarder.log()
    assert [(m["seq"], m["message"]) for m in outbox_ls(forwarder.data_dir)] == \
        [(m["seq"], m["message"]) for m in queued]

    # Start it again (same data dir and port), the RIS still down: it tries again.
    restarted = agent_factory(config, data_dir=forwarder.data_dir, port=forwarder.port)
    restarted.wait_for_log("forwarding to RIS failed", timeout=10)
    assert len(outbox_rows(restarted.data_dir)) == 3

    # The RIS comes up: all three arrive.
    ris = agent_factory(RIS_CONFIG, port=ris_port)
    wait_outbox_empty(restarted, timeout=15)
    assert outbox_ls(restarted.data_dir, real=True) == []

    received = mpps_ls(ris.data_dir, real=True)
    assert list(received) == [uid]
    got = received[uid]
    assert text(got, "PerformedProcedureStepStatus") == "COMPLETED"
    assert text(got, "PatientName") == "Right^Rita1", "the RIS got uncoerced patient data"
    assert text(got, "PatientID") == "MWL-0001"
    assert text(got, "IssuerOfPatientID") == "HOSPITAL"
    assert text(got, "PatientBirthDate") == "19700102"
    assert text(got, "PatientSex") == "F"
    (item,) = got.ScheduledStepAttributesSequence
    assert item.RequestedProcedureDescription == "CT head 1 (from the RIS)"
    assert item.ScheduledProcedureStepDescription == "CT head plain 1 (from the RIS)"
    assert item.AccessionNumber == "ACC-0001"
    assert text(got, "PerformedProcedureStepDescription") == "CT head, contrast added"
    assert text(got, "PerformedProcedureStepEndDate") == "20240601"
    assert text(got, "PerformedProcedureStepEndTime") == "083000"
    (series,) = got.PerformedSeriesSequence
    assert series.SeriesInstanceUID == series_uid
    assert series.ReferencedImageSequence[0].ReferencedSOPInstanceUID == image_uid

    # In order on the RIS, from the forwarder, and nothing refused (no 0112 for an N-SET
    # that overtook its N-CREATE).
    ris_log = ris.log()
    positions = [ris_log.find(f"MPPS N-CREATE {uid}: IN PROGRESS"),
                 ris_log.find(f"MPPS N-SET {uid}: IN PROGRESS"),
                 ris_log.find(f"MPPS N-SET {uid}: COMPLETED")]
    assert -1 not in positions and positions == sorted(positions), ris_log
    assert f"{FORWARDER_AET}@" in ris_log, ris_log
    assert "refused" not in ris_log and "(0112)" not in ris_log, ris_log
    assert ris_log.count(f"MPPS N-CREATE {uid}") == 1, ris_log
    forwarded = restarted.log()
    assert forwarded.find(f"forwarded N-CREATE {uid} to RIS") \
        < forwarded.find(f"forwarded N-SET {uid} to RIS"), forwarded
    assert forwarded.count(f"forwarded N-SET {uid} to RIS") == 2, forwarded
    assert_no_traceback(forwarder, restarted, ris)


# --- 2. bad input ----------------------------------------------------------------------------

def test_bad_requests_get_their_status_and_change_nothing(agent_factory, tmp_path):
    """Each refusal has its status; nothing is stored, changed or queued for forwarding by
    a refused request; the daemon serves on."""
    # Forwarding to a peer that is down, retried rarely: the outbox shows what was queued.
    node = agent_factory(forwarder_config(free_port(), first_retry=300, last_retry=300))
    study_uid = new_uid()

    def queued() -> list[tuple[str, str]]:
        return [(m["message"], m["sop_instance_uid"]) for m in outbox_ls(node.data_dir)]

    # N-SET of an instance nobody created.
    unknown = new_uid()
    set_path = write_json(tmp_path / "set.json", n_set_data_set(
        "COMPLETED", PerformedProcedureStepEndDate="20240601"))
    code, uid, status, _ = mpps_set(node, unknown, set_path, real=True)
    assert (code, uid, status) == (1, unknown, NO_SUCH_SOP_INSTANCE)
    assert mpps_ls(node.data_dir) == {} and queued() == []

    # N-CREATE without Performed Procedure Step Status; with a status other than IN PROGRESS.
    for status_value, expected in ((None, MISSING_ATTRIBUTE),
                                   ("COMPLETED", INVALID_ATTRIBUTE_VALUE),
                                   ("DISCONTINUED", INVALID_ATTRIBUTE_VALUE),
                                   ("SCHEDULED", INVALID_ATTRIBUTE_VALUE)):
        refused_uid = new_uid()
        path = write_json(tmp_path / "bad-create.json",
                          n_create_data_set(study_uid, status=status_value))
        code, uid, status, _ = mpps_create(node, path, refused_uid)
        assert (code, uid, status) == (1, refused_uid, expected), status_value
    assert mpps_ls(node.data_dir) == {} and queued() == []

    # A good one.
    good = new_uid()
    create = write_json(tmp_path / "create.json", n_create_data_set(study_uid))
    assert mpps_create(node, create, good) == (0, good, SUCCESS, "")
    assert queued() == [("N-CREATE", good)]

    # The same SOP Instance UID again, other patient: 0111, the first one kept as it was.
    again = write_json(tmp_path / "again.json",
                       n_create_data_set(study_uid, patient_name="Other^Olga"))
    code, uid, status, _ = mpps_create(node, again, good)
    assert (code, uid, status) == (1, good, DUPLICATE_SOP_INSTANCE)
    instances = mpps_ls(node.data_dir)
    assert list(instances) == [good]
    assert text(instances[good], "PatientName") == "Wrong^Walter"    # no worklist here
    assert queued() == [("N-CREATE", good)]

    # N-SET with a status that is not allowed: 0106, nothing changed.
    bad_status = write_json(tmp_path / "bad-status.json", n_set_data_set(
        "FINISHED", PerformedProcedureStepDescription="must not stick"))
    code, uid, status, _ = mpps_set(node, good, bad_status)
    assert (code, status) == (1, INVALID_ATTRIBUTE_VALUE)
    kept = mpps_ls(node.data_dir)[good]
    assert text(kept, "PerformedProcedureStepStatus") == "IN PROGRESS"
    assert text(kept, "PerformedProcedureStepDescription") == "CT head as performed"
    assert queued() == [("N-CREATE", good)]

    # Malformed data sets: A900, nothing stored, nothing changed.
    for name, data in MALFORMED.items():
        refused_uid = new_uid()
        response = raw_request(node, "N-CREATE", refused_uid, data)
        assert response.Status == FAILED, (name, response)
        response = raw_request(node, "N-SET", good, data)
        assert response.Status == FAILED, (name, response)
    instances = mpps_ls(node.data_dir)
    assert list(instances) == [good]
    assert text(instances[good], "PerformedProcedureStepStatus") == "IN PROGRESS"
    assert instances[good].to_json_dict() == kept.to_json_dict()
    assert queued() == [("N-CREATE", good)]

    # COMPLETED; then any N-SET is refused with 0110 and changes nothing.
    assert mpps_set(node, good, set_path) == (0, good, SUCCESS, "")
    final = mpps_ls(node.data_dir)[good]
    assert text(final, "PerformedProcedureStepStatus") == "COMPLETED"
    for status_value in ("DISCONTINUED", "IN PROGRESS", "COMPLETED", None):
        late = write_json(tmp_path / "late.json", n_set_data_set(
            status_value, PerformedProcedureStepDescription="too late"))
        code, uid, status, comment = mpps_set(node, good, late)
        assert (code, status) == (1, PROCESSING_FAILURE), status_value
        assert "may no longer be updated" in comment, comment
    assert mpps_ls(node.data_dir)[good].to_json_dict() == final.to_json_dict()
    assert queued() == [("N-CREATE", good), ("N-SET", good)]

    # Still serving: C-ECHO, and a new step is accepted.
    echo = dicomagent("echo", node.host, str(node.port), "-aec", node.ae_title)
    assert echo.returncode == 0, echo.stdout + echo.stderr
    after = new_uid()
    assert mpps_create(node, create, after) == (0, after, SUCCESS, "")
    assert set(mpps_ls(node.data_dir)) == {good, after}
    assert node.alive()
    log = node.log()
    for code in ("0112", "0120", "0106", "0111", "A900", "0110"):
        assert f"refused ({code})" in log, (code, log)
    assert_no_traceback(node)


# --- 3. the SCP chooses the SOP Instance UID -------------------------------------------------

def test_scp_chooses_the_sop_instance_uid(agent_factory, tmp_path):
    """N-CREATE-RQ without Affected SOP Instance UID: the SCP picks one, keeps the instance
    under it and returns it in the N-CREATE-RSP; an N-SET with it then works."""
    command = encode_command(N_CREATE_RQ(AffectedSOPClassUID=MPPS, MessageID=1,
                                         CommandDataSetType=DATA_SET_PRESENT,
                                         AffectedSOPInstanceUID=None))
    assert b"\x00\x00\x00\x10" not in command      # (0000,1000) really absent

    node = agent_factory()
    create = write_json(tmp_path / "create.json", n_create_data_set(new_uid()))

    # The CLI without --uid sends none.
    code, chosen_by_cli, status, _ = mpps_create(node, create, real=True)
    assert (code, status) == (0, SUCCESS)
    assert pydicom.uid.UID(chosen_by_cli).is_valid, chosen_by_cli

    # The library, with None.
    async def main():
        association = await _open(node)
        try:
            return await n_create(association, MPPS, None, n_create_data_set(new_uid(), 2))
        finally:
            await association.release()

    result = asyncio.run(main())
    assert result.status == SUCCESS, result
    chosen = result.sop_instance_uid
    assert chosen and pydicom.uid.UID(chosen).is_valid, result
    assert chosen != chosen_by_cli

    instances = mpps_ls(node.data_dir)
    assert set(instances) == {chosen_by_cli, chosen}
    assert text(instances[chosen], "PerformedProcedureStepID") == "PPS-0002"

    done = write_json(tmp_path / "done.json", n_set_data_set("DISCONTINUED"))
    assert mpps_set(node, chosen, done) == (0, chosen, SUCCESS, "")
    assert text(mpps_ls(node.data_dir)[chosen], "PerformedProcedureStepStatus") == \
        "DISCONTINUED"
    assert f"MPPS N-CREATE {chosen}: IN PROGRESS" in node.log()
    assert_no_traceback(node)


# --- 4. coercion: what matches, what does not, DISCONTINUED ---------------------------------

def test_coercion_needs_every_reference_to_match(agent_factory, tmp_path):
    """A step naming its worklist item with one wrong reference is not coerced and removes
    nothing; one naming it by Study Instance UID alone is coerced, keeps the coerced data
    against N-SET, and removes its item when DISCONTINUED (only that item)."""
    node = agent_factory()
    study_1, study_2 = new_uid(), new_uid()
    worklist_add(node.data_dir, write_json(tmp_path / "w1.json", worklist_item(study_1, 1)),
                 write_json(tmp_path / "w2.json", worklist_item(study_2, 2)))
    assert len(worklist_ls(node.data_dir)) == 2

    # Item 1's study and step, but another accession number: no coercion.
    mismatch = new_uid()
    path = write_json(tmp_path / "c1.json",
                      n_create_data_set(study_1, 1, accession="ACC-WRONG"))
    assert mpps_create(node, path, mismatch)[2] == SUCCESS
    kept = mpps_ls(node.data_dir)[mismatch]
    assert text(kept, "PatientName") == "Wrong^Walter"
    assert text(kept, "PatientID") == "TYPO-1"
    assert kept.ScheduledStepAttributesSequence[0].RequestedProcedureDescription == \
        "typed at the modality"
    done = write_json(tmp_path / "done.json", n_set_data_set("COMPLETED"))
    assert mpps_set(node, mismatch, done)[2] == SUCCESS
    assert sorted(text(i, "AccessionNumber") for i in worklist_ls(node.data_dir)) == \
        ["ACC-0001", "ACC-0002"], "a worklist item removed by a step that did not perform it"

    # Item 2 named by its Study Instance UID only (the other references empty).
    by_study = new_uid()
    ds = n_create_data_set(study_2, 2)
    item = ds.ScheduledStepAttributesSequence[0]
    item.AccessionNumber = item.RequestedProcedureID = item.ScheduledProcedureStepID = ""
    path = write_json(tmp_path / "c2.json", ds)
    assert mpps_create(node, path, by_study)[2] == SUCCESS
    kept = mpps_ls(node.data_dir)[by_study]
    assert text(kept, "PatientName") == "Right^Rita2"
    assert text(kept, "PatientID") == "MWL-0002"
    (item,) = kept.ScheduledStepAttributesSequence
    assert item.AccessionNumber == "ACC-0002"
    assert item.RequestedProcedureID == "RP-0002"
    assert item.ScheduledProcedureStepID == "SPS-0002"
    assert item.RequestedProcedureDescription == "CT head 2 (from the RIS)"

    # N-SET trying to change the coerced data, IN PROGRESS: ignored, item 2 still there.
    other = Dataset()
    other.StudyInstanceUID = new_uid()
    other.AccessionNumber = "ACC-HACK"
    change = write_json(tmp_path / "change.json", n_set_data_set(
        "IN PROGRESS", PatientName="Evil^Edit", PatientSex="O",
        ScheduledStepAttributesSequence=[other], PerformedProcedureStepDescription="changed"))
    assert mpps_set(node, by_study, change)[2] == SUCCESS
    kept = mpps_ls(node.data_dir)[by_study]
    assert text(kept, "PatientName") == "Right^Rita2"
    assert text(kept, "PatientSex") == "F"
    assert kept.ScheduledStepAttributesSequence[0].AccessionNumber == "ACC-0002"
    assert text(kept, "PerformedProcedureStepDescription") == "changed"
    assert len(worklist_ls(node.data_dir)) == 2

    # DISCONTINUED: item 2 goes, item 1 stays.
    stop = write_json(tmp_path / "stop.json", n_set_data_set("DISCONTINUED"))
    assert mpps_set(node, by_study, stop)[2] == SUCCESS
    assert [text(i, "AccessionNumber") for i in worklist_ls(node.data_dir)] == ["ACC-0001"]
    assert text(mpps_ls(node.data_dir)[by_study], "PerformedProcedureStepStatus") == \
        "DISCONTINUED"
    assert_no_traceback(node)


def test_a_finished_step_removes_only_its_own_worklist_item(agent_factory, tmp_path):
    """Two steps perform worklist item 1; the first to complete removes it; a new item
    (another patient) is added; the second step is then DISCONTINUED: the new item must
    stay. (The worklist ids are SQLite rowids: the new item may get the id the removed one
    had, and a step that remembers only that id removes the wrong patient's item.)"""
    node = agent_factory()
    study_1, study_2 = new_uid(), new_uid()
    worklist_add(node.data_dir, write_json(tmp_path / "w1.json", worklist_item(study_1, 1)))
    create = write_json(tmp_path / "create.json", n_create_data_set(study_1, 1))
    first, second = new_uid(), new_uid()
    for uid in (first, second):
        assert mpps_create(node, create, uid)[2] == SUCCESS
        assert text(mpps_ls(node.data_dir)[uid], "PatientName") == "Right^Rita1"

    done = write_json(tmp_path / "done.json", n_set_data_set("COMPLETED"))
    assert mpps_set(node, first, done)[2] == SUCCESS
    assert worklist_ls(node.data_dir) == []

    worklist_add(node.data_dir, write_json(tmp_path / "w2.json", worklist_item(study_2, 2)))
    assert [text(i, "PatientName") for i in worklist_ls(node.data_dir)] == ["Right^Rita2"]

    stop = write_json(tmp_path / "stop.json", n_set_data_set("DISCONTINUED"))
    assert mpps_set(node, second, stop)[2] == SUCCESS
    assert [text(i, "PatientName") for i in worklist_ls(node.data_dir)] == ["Right^Rita2"], (
        "DISCONTINUED of a step that performed the (already removed) item 1 removed "
        "another patient's worklist item")
    assert_no_traceback(node)


def test_coerced_patient_name_reaches_the_ris_intact(agent_factory, tmp_path):
    """The worklist item is in UTF-8 (ISO_IR 192) with a Greek name; the modality's N-CREATE
    declares ISO_IR 100 (Latin-1). The coerced name must reach the RIS as it is in the
    worklist, not as replacement characters."""
    ris = agent_factory(RIS_CONFIG)
    forwarder = agent_factory(forwarder_config(ris.port))
    study_uid = new_uid()
    item = worklist_item(study_uid, 1)
    item.SpecificCharacterSet = "ISO_IR 192"
    item.PatientName = "Παπαδόπουλος^Γιάννης"
    worklist_add(forwarder.data_dir, write_json(tmp_path / "item.json", item))

    uid = new_uid()
    create = n_create_data_set(study_uid, 1, patient_name="Müller^Jörg")
    create.SpecificCharacterSet = "ISO_IR 100"
    assert mpps_create(forwarder, write_json(tmp_path / "create.json", create), uid)[2] == \
        SUCCESS
    assert str(mpps_ls(forwarder.data_dir)[uid].PatientName) == "Παπαδόπουλος^Γιάννης"
    wait_outbox_empty(forwarder)
    received = mpps_ls(ris.data_dir)[uid]
    assert text(received, "PatientID") == "MWL-0001"
    assert str(received.PatientName) == "Παπαδόπουλος^Γιάννης", (
        f"the RIS got {str(received.PatientName)!r} with Specific Character Set "
        f"{received.get('SpecificCharacterSet')!r}")
    assert_no_traceback(forwarder, ris)


def test_coerced_patient_id_does_not_keep_the_modality_issuer(agent_factory, tmp_path):
    """The worklist item has a Patient ID and no Issuer of Patient ID; the modality sent its
    own Patient ID with an issuer. After coercion the Patient ID is the worklist's; the
    modality's issuer must not stay beside it (the pair would name a patient that does
    not exist)."""
    node = agent_factory()
    study_uid = new_uid()
    item = worklist_item(study_uid, 1)
    del item.IssuerOfPatientID
    worklist_add(node.data_dir, write_json(tmp_path / "item.json", item))
    create = n_create_data_set(study_uid, 1)
    create.IssuerOfPatientID = "MODALITY-LOCAL"
    uid = new_uid()
    assert mpps_create(node, write_json(tmp_path / "create.json", create), uid)[2] == SUCCESS
    kept = mpps_ls(node.data_dir)[uid]
    assert text(kept, "PatientID") == "MWL-0001"
    assert text(kept, "IssuerOfPatientID") != "MODALITY-LOCAL", (
        "Patient ID from the worklist, Issuer of Patient ID from the modality")
    assert_no_traceback(node)


def test_cli_exit_codes_without_an_scp(agent_factory, tmp_path):
    """No listener: exit 3; called AE title refused by the SCP: exit 4; nothing stored."""
    create = write_json(tmp_path / "create.json", n_create_data_set(new_uid()))
    result = dicomagent("mpps", "create", HOST, str(free_port()), "--timeout", "5",
                        str(create), real=True)
    assert result.returncode == 3, result.stdout + result.stderr
    ris = agent_factory(RIS_CONFIG)                  # check_called_aet = true
    result = dicomagent("mpps", "create", ris.host, str(ris.port), "-aec", "NOT-RIS",
                        "--timeout", "5", str(create))
    assert result.returncode == 4, result.stdout + result.stderr
    assert mpps_ls(ris.data_dir) == {}


# --- 5. what the RIS refuses -----------------------------------------------------------------

def test_ris_refusals_failed_or_counted_delivered(agent_factory, tmp_path):
    """0111 from the RIS for an N-CREATE tried before (the RIS was down) counts as
    delivered; 0111 for one sent the first time marks it failed, not retried, and the
    next message still goes."""
    # The RIS already holds instances "lost" and "clash" (made before, on another port).
    lost, clash, fresh = new_uid(), new_uid(), new_uid()
    seed = agent_factory(RIS_CONFIG)
    on_ris = write_json(tmp_path / "on-ris.json",
                        n_create_data_set(new_uid(), 7, patient_name="Ris^Copy"))
    for uid in (lost, clash):
        assert mpps_create(seed, on_ris, uid)[2] == SUCCESS
    assert seed.terminate() == 0, seed.log()

    ris_port = free_port()
    forwarder = agent_factory(forwarder_config(ris_port))
    create = write_json(tmp_path / "create.json", n_create_data_set(new_uid(), 8))

    # "lost": the RIS down at first.
    assert mpps_create(forwarder, create, lost)[2] == SUCCESS
    wait_until(lambda: any(row[4] >= 1 for row in outbox_rows(forwarder.data_dir)), 10,
               lambda: f"a failed attempt; outbox {outbox_rows(forwarder.data_dir)}")
    ris = agent_factory(RIS_CONFIG, data_dir=seed.data_dir, port=ris_port)
    wait_outbox_empty(forwarder)
    forwarder.wait_for_log(f"forwarded N-CREATE {lost} to RIS")
    assert f"MPPS N-CREATE {lost} refused (0111)" in ris.log()

    # "clash": sent the first time, refused: failed, kept, not tried again.
    assert mpps_create(forwarder, create, clash)[2] == SUCCESS
    wait_until(lambda: [row[3] for row in outbox_rows(forwarder.data_dir)] == ["failed"], 10,
               lambda: f"clash failed; outbox {outbox_rows(forwarder.data_dir)}")
    # ... and the next message goes.
    assert mpps_create(forwarder, create, fresh)[2] == SUCCESS
    forwarder.wait_for_log(f"forwarded N-CREATE {fresh} to RIS", timeout=10)
    time.sleep(1.5)     # three first_retry periods: a retry of "clash" would show
    (failed,) = outbox_ls(forwarder.data_dir)
    assert failed["sop_instance_uid"] == clash and failed["message"] == "N-CREATE"
    assert failed["state"] == "failed" and failed["attempts"] == 1, failed
    assert "0111" in failed["last_error"], failed
    assert ris.log().count(f"MPPS N-CREATE {clash}") == 1, ris.log()

    received = mpps_ls(ris.data_dir)
    assert set(received) == {lost, clash, fresh}
    assert text(received[clash], "PatientName") == "Ris^Copy"    # not overwritten
    assert text(received[fresh], "PerformedProcedureStepID") == "PPS-0008"
    assert_no_traceback(forwarder, ris)


# --- 6. lifetime -----------------------------------------------------------------------------

def test_lifetime_days_removes_old_instances_at_start(agent_factory, tmp_path):
    config = '[mpps]\nlifetime_days = 1\n'
    node = agent_factory(config)
    old, recent = new_uid(), new_uid()
    create = write_json(tmp_path / "create.json", n_create_data_set(new_uid()))
    for uid in (old, recent):
        assert mpps_create(node, create, uid)[2] == SUCCESS
    assert node.terminate() == 0, node.log()

    db = sqlite3.connect(node.data_dir / "index.sqlite")
    try:
        with db:
            changed = db.execute("UPDATE mpps SET updated_at = ? WHERE sop_instance_uid = ?",
                                 (time.time() - 2 * 86400, old)).rowcount
    finally:
        db.close()
    assert changed == 1

    restarted = agent_factory(config, data_dir=node.data_dir)
    restarted.wait_for_log("removed 1 MPPS instance(s) older than 1 days", timeout=10)
    assert list(mpps_ls(restarted.data_dir)) == [recent]
    assert_no_traceback(node, restarted)


# --- 7. DCMTK --------------------------------------------------------------------------------

def _dump2dcm(tmp_path: Path, name: str, dump: str) -> Path:
    source = tmp_path / f"{name}.dump"
    source.write_text(dump)
    target = tmp_path / f"{name}.dcm"
    result = run(["dump2dcm", str(source), str(target)])
    assert result.returncode == 0, result.stdout + result.stderr
    return target


def _findscu_worklist(node: RunningNode, out: Path, accession: str) -> list[Dataset]:
    out.mkdir()
    result = run(["findscu", "-W", "-X", "-od", str(out), "-aec", node.ae_title,
                  "-k", f"AccessionNumber={accession}", "-k", "PatientName",
                  "-k", "PatientID", "-k", "ScheduledProcedureStepSequence[0].Modality",
                  "-k", "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID",
                  node.host, str(node.port)])
    assert result.returncode == 0, result.stdout + result.stderr
    return [pydicom.dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]


def test_dcmtk_worklist_file_and_findscu(agent_factory, tmp_path):
    """A worklist file and an N-CREATE data set written by DCMTK's dump2dcm; findscu -W
    sees the item while the step is IN PROGRESS and no more once it is COMPLETED."""
    study_uid = new_uid()
    worklist_file = _dump2dcm(tmp_path, "item", f"""
(0008,0005) CS [ISO_IR 100]
(0008,0050) SH [ACC-DCMTK]
(0010,0010) PN [Dcmtk^Dora]
(0010,0020) LO [DCMTK-77]
(0010,0030) DA [19650304]
(0010,0040) CS [F]
(0020,000d) UI [{study_uid}]
(0032,1060) LO [MR knee from DCMTK]
(0040,0100) SQ (Sequence with undefined length)
  (fffe,e000) na (Item with undefined length)
    (0008,0060) CS [MR]
    (0040,0001) AE [{MODALITY_AET}]
    (0040,0002) DA [{time.strftime('%Y%m%d')}]
    (0040,0003) TM [090000]
    (0040,0007) LO [MR knee plain]
    (0040,0009) SH [SPS-DCMTK]
  (fffe,e00d) na (ItemDelimitationItem)
(fffe,e0dd) na (SequenceDelimitationItem)
(0040,1001) SH [RP-DCMTK]
""")
    create_file = _dump2dcm(tmp_path, "create", f"""
(0008,0005) CS [ISO_IR 100]
(0008,0060) CS [MR]
(0010,0010) PN [Typo^Dora]
(0010,0020) LO [77]
(0040,0241) AE [{MODALITY_AET}]
(0040,0244) DA [20240601]
(0040,0245) TM [091500]
(0040,0252) CS [IN PROGRESS]
(0040,0253) SH [PPS-DCMTK]
(0040,0270) SQ (Sequence with undefined length)
  (fffe,e000) na (Item with undefined length)
    (0008,0050) SH [ACC-DCMTK]
    (0020,000d) UI [{study_uid}]
    (0040,0009) SH [SPS-DCMTK]
  (fffe,e00d) na (ItemDelimitationItem)
(fffe,e0dd) na (SequenceDelimitationItem)
""")
    node = agent_factory()
    worklist_add(node.data_dir, worklist_file)

    before = _findscu_worklist(node, tmp_path / "before", "ACC-DCMTK")
    assert [(str(r.PatientName), r.PatientID) for r in before] == [("Dcmtk^Dora", "DCMTK-77")]
    assert before[0].ScheduledProcedureStepSequence[0].ScheduledProcedureStepID == "SPS-DCMTK"

    uid = new_uid()
    assert mpps_create(node, create_file, uid) == (0, uid, SUCCESS, "")
    kept = mpps_ls(node.data_dir)[uid]
    assert text(kept, "PatientName") == "Dcmtk^Dora" and kept.PatientID == "DCMTK-77"
    assert text(kept, "PatientBirthDate") == "19650304"
    assert kept.ScheduledStepAttributesSequence[0].RequestedProcedureID == "RP-DCMTK"
    assert kept.ScheduledStepAttributesSequence[0].ScheduledProcedureStepDescription == \
        "MR knee plain"
    assert len(_findscu_worklist(node, tmp_path / "during", "ACC-DCMTK")) == 1

    done = write_json(tmp_path / "done.json", n_set_data_set("COMPLETED"))
    assert mpps_set(node, uid, done) == (0, uid, SUCCESS, "")
    assert _findscu_worklist(node, tmp_path / "after", "ACC-DCMTK") == []
    assert_no_traceback(node)
