"""Storage Commitment Push Model and retention, end to end, against real peers.

What is proved here (STYLE.md, "Tests": interop is the proof, never skipped):

- Orthanc -> ``dicomagent serve``: Orthanc's REST API has Orthanc request storage
  commitment (N-ACTION) from the daemon for instances both of them hold, one only Orthanc
  holds and one named with the wrong SOP class; the report reaches Orthanc on the new
  association the daemon opens to its ``[peers]`` entry, with the right successes and
  Failure Reasons;
- ``dicomagent commit`` -> Orthanc: committed for what Orthanc holds, 0112 for what it
  lacks, the report taken on our ``--listen-port``;
- ``dicomagent commit`` -> ``dicomagent serve``: the report on the same association; on a
  new association (``--listen-port``, the daemon proposing the Push Model with SCP/SCU Role
  Selection); to a requester that is down when the report is ready and up later (the
  Reporter's retry, ``FIRST_RETRY`` = 10 s); and across a restart of the daemon (SIGTERM)
  between the N-ACTION and the report: the pending request is in the index;
- ``dicomagent commit`` against an SCP in the test that reports at the edges PS3.8 allows:
  during the CLI's release (the CLI, in Sta7, may not answer; it must not fail), and on a
  report association the SCP releases a moment after the N-EVENT-REPORT-RSP (the CLI must
  let it release, not abort it by exiting);
- the Failure Reasons of one request: 0112 (not in the archive), 0110 (file changed on
  disk, or gone), 0119 (SOP class differs);
- retention: instances of controlled ages (``received_at`` set in ``index.sqlite`` while
  the daemon is stopped); ``dicomagent retention --dry-run`` lists exactly the old ones,
  ``retention`` deletes exactly them, file and index rows together, with the
  ``calling_ae_titles`` and ``only_committed`` filters; the daemon applies the rule at start.

Every daemon log is checked for a handler failure (a traceback) at the end of the test
that made it: a report that went out through the Reporter after the handler crashed is
not a pass.

References
----------
PS3.4 Annex J (J.3.2 N-ACTION, J.3.3 N-EVENT-REPORT, J.3.3.1 Failure Reasons);
PS3.7 D.3.3.4 (SCP/SCU Role Selection); seed 3.1.2.5, 3.1.3.5, 3.1.3.5.3 (retention),
Tables 31, 68, 69.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomagent.association import AcceptorAssociation, associate
from dicomagent.commit import request_data_set
from dicomagent.listener import Listener
from dicomagent.config import Config
from dicomagent.dimse.commands import (DATA_SET_PRESENT, N_ACTION_RQ, N_ACTION_RSP,
                                       N_EVENT_REPORT_RQ, N_EVENT_REPORT_RSP)
from dicomagent.services.commitment import (ALL_COMMITTED, REQUEST_STORAGE_COMMITMENT,
                                            STORAGE_COMMITMENT_INSTANCE,
                                            STORAGE_COMMITMENT_PUSH_MODEL, parse_request,
                                            report_data_set, send_report)
from dicomagent.transcode import decode, encode
from dicomagent.uids import UNCOMPRESSED_TRANSFER_SYNTAXES
from dicomagent.ul.negotiation import (AbstractSyntaxSupport, AcceptorPolicy, ProposedContext,
                                       accepted_contexts, negotiate)
from nodes import HOST, RunningNode, dicomagent_cmd, free_port, new_uid, require_binary, run, \
    start_listening

SC = "1.2.840.10008.5.1.4.1.1.7"          # Secondary Capture Image Storage
CT = "1.2.840.10008.5.1.4.1.1.2"          # CT Image Storage

#: PS3.4 J.3.3.1 Failure Reasons.
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119

#: commitment.FIRST_RETRY is 10 s; a report retried once arrives within this.
RETRY_WAIT = 25.0

ORTHANC_AET = "ORTHANC"
AGENT_AET = "DICOMAGENT"
#: Our AE title in Orthanc's DicomModalities, for ``dicomagent commit --listen-port``.
COMMIT_SCU_AET = "COMMITSCU"

# --- synthetic instances ----------------------------------------------------------------------

@dataclass(frozen=True)
class Instance:
    path: Path
    sop_class: str
    uid: str


def write_instance(directory: Path, name: str, sop_class: str = SC, uid: str | None = None,
                   patient_id: str = "CMT001", study_uid: str | None = None) -> Instance:
    """A small 8-bit image as a Part 10 file (Explicit VR Little Endian)."""
    uid = uid or new_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.PatientName, ds.PatientID = "Commit^Test", patient_id
    ds.StudyInstanceUID = study_uid or new_uid()
    ds.SeriesInstanceUID = new_uid()
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20240601", "120000", "1"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "OT", 1, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = bytes(range(64))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return Instance(path, sop_class, uid)


# --- the dicomagent command line --------------------------------------------------------------

def dicomagent(*args: str, timeout: float = 60.0):
    return run(dicomagent_cmd(*args), timeout)


def store_into(node: RunningNode, instances: list[Instance], aet: str = "STORESCU") -> None:
    result = dicomagent("store", node.host, str(node.port), "--aet", aet, "--aec",
                        node.ae_title, "--no-progress", *[str(i.path) for i in instances])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"sent {len(instances)}, warnings 0, failed 0" in result.stdout, result.stdout


_COMMITTED = re.compile(r"^committed\s+(\S+)$")
_FAILED = re.compile(r"^failed\s+(\S+) \(Failure Reason 0x([0-9A-F]{4})\)$")


def commit_outcome(stdout: str) -> tuple[set[str], dict[str, int]]:
    """``dicomagent commit`` stdout -> (committed UIDs, failed UID -> Failure Reason)."""
    committed, failed = set(), {}
    for line in stdout.splitlines():
        if match := _COMMITTED.match(line):
            committed.add(match[1])
        elif match := _FAILED.match(line):
            failed[match[1]] = int(match[2], 16)
        else:
            raise AssertionError(f"unexpected line from dicomagent commit: {line!r}")
    return committed, failed


def agent_config(peers: dict[str, tuple[str, int]] | None = None, extra: str = "") -> str:
    """TOML for ``dicomagent serve``: ``[peers.NAME]`` per (AE title, port) on 127.0.0.1."""
    text = f'[agent]\nae_title = "{AGENT_AET}"\n'
    for name, (ae_title, port) in (peers or {}).items():
        text += f'\n[peers.{name}]\nae_title = "{ae_title}"\nhost = "{HOST}"\nport = {port}\n'
    return text + extra


def assert_no_handler_failure(node: RunningNode) -> None:
    """The daemon's log shows no failed handler (and so no traceback)."""
    log = node.log()
    assert "handler failed" not in log and "Traceback" not in log, (
        f"the daemon's storage commitment handler failed; its log:\n{log}")


# --- the index --------------------------------------------------------------------------------

def query(data_dir: Path, sql: str, params: tuple = ()) -> list[tuple]:
    db = sqlite3.connect(data_dir / "index.sqlite")
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def commitment_row(data_dir: Path, transaction_uid: str) -> dict | None:
    rows = query(data_dir, "SELECT calling_ae_title, state, attempts, last_error FROM "
                           "commitments WHERE transaction_uid = ?", (transaction_uid,))
    if not rows:
        return None
    return dict(zip(("calling_ae_title", "state", "attempts", "last_error"), rows[0]))


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


def wait_reported(node: RunningNode, transaction_uid: str, timeout: float = 10.0) -> dict:
    return wait_until(lambda: (row := commitment_row(node.data_dir, transaction_uid))
                      and row["state"] == "reported" and row,
                      timeout, f"commitment {transaction_uid} reported; daemon log:\n"
                               f"{node.log()}")


def committed_uids(data_dir: Path) -> set[str]:
    return {uid for (uid,) in query(data_dir, "SELECT SOPInstanceUID FROM instances "
                                              "WHERE committed_at IS NOT NULL")}


def stored_path(data_dir: Path, uid: str) -> Path:
    (relative,) = query(data_dir, "SELECT path FROM instances WHERE SOPInstanceUID = ?",
                        (uid,))[0]
    return data_dir / relative


# --- a requester that is not there for the report ---------------------------------------------

def request_and_leave(node: RunningNode, calling_ae_title: str,
                      references: list[tuple[str, str]]) -> str:
    """N-ACTION-RQ "Request Storage Commitment", then release at once (no report wanted
    on this association; nothing of ours listens). Returns the Transaction UID."""
    transaction_uid = new_uid()

    async def main():
        association = await associate(node.host, node.port, calling_ae_title, node.ae_title,
                                      [ProposedContext(STORAGE_COMMITMENT_PUSH_MODEL,
                                                       UNCOMPRESSED_TRANSFER_SYNTAXES)],
                                      artim_timeout=10, dimse_timeout=10, network_timeout=10)
        # A report the daemon sends here before our release gets no answer: not wanted.
        association.handlers[(N_EVENT_REPORT_RQ, STORAGE_COMMITMENT_PUSH_MODEL)] = \
            lambda *_: None
        try:
            context = association.context_for(STORAGE_COMMITMENT_PUSH_MODEL)
            response = await association.request(context.context_id, N_ACTION_RQ(
                RequestedSOPClassUID=STORAGE_COMMITMENT_PUSH_MODEL,
                MessageID=association.next_message_id(), CommandDataSetType=DATA_SET_PRESENT,
                RequestedSOPInstanceUID=STORAGE_COMMITMENT_INSTANCE,
                ActionTypeID=REQUEST_STORAGE_COMMITMENT),
                encode(request_data_set(transaction_uid, references), context.transfer_syntax))
            assert response.command.Status == 0x0000, response.command
        finally:
            await association.release()

    asyncio.run(main())
    return transaction_uid


@dataclass
class CaughtReport:
    calling_ae_title: str
    event_type: int
    data_set: Dataset

    @property
    def committed(self) -> set[str]:
        return {str(i.ReferencedSOPInstanceUID)
                for i in self.data_set.get("ReferencedSOPSequence", [])}

    @property
    def failed(self) -> dict[str, int]:
        return {str(i.ReferencedSOPInstanceUID): int(i.FailureReason)
                for i in self.data_set.get("FailedSOPSequence", [])}


def catch_report(ae_title: str, port: int, timeout: float) -> CaughtReport:
    """Come up on ``port`` as ``ae_title`` (dicomagent.commit's report listener: the Push
    Model in the SCU role only) and wait for one N-EVENT-REPORT; answer it with success."""

    async def main():
        loop = asyncio.get_running_loop()
        caught: asyncio.Future = loop.create_future()

        def on_report(association, context, received):
            request = received.command
            association.send_message(context.context_id, N_EVENT_REPORT_RSP(
                AffectedSOPClassUID=STORAGE_COMMITMENT_PUSH_MODEL,
                MessageIDBeingRespondedTo=request.MessageID, Status=0x0000,
                AffectedSOPInstanceUID=STORAGE_COMMITMENT_INSTANCE,
                EventTypeID=request.EventTypeID))
            if not caught.done():
                caught.set_result((association, CaughtReport(
                    association.calling_ae_title, request.EventTypeID,
                    decode(received.data_set or b"", context.transfer_syntax))))

        listener = Listener(ae_title, {STORAGE_COMMITMENT_PUSH_MODEL: AbstractSyntaxSupport(
            scp=False, scu=True)}, {(N_EVENT_REPORT_RQ, STORAGE_COMMITMENT_PUSH_MODEL): on_report})
        await listener.start(HOST, port)
        try:
            try:
                association, report = await asyncio.wait_for(caught, timeout)
            except asyncio.TimeoutError:
                raise AssertionError(f"no N-EVENT-REPORT on port {port} within "
                                     f"{timeout:g} s") from None
            # Let the daemon release its association before we go.
            await asyncio.wait_for(asyncio.shield(association.ul.closed), 10)
            return report
        finally:
            listener.close()

    return asyncio.run(main())


# --- Orthanc ----------------------------------------------------------------------------------

@dataclass
class Orthanc:
    node: RunningNode
    http_port: int
    #: Where ``dicomagent commit --listen-port`` takes Orthanc's reports (in DicomModalities).
    scu_listen_port: int
    scu_ae_title: str = COMMIT_SCU_AET

    def rest(self, method: str, path: str, body=None):
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(f"http://{HOST}:{self.http_port}{path}", data=data,
                                         method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                text = response.read()
        except urllib.error.HTTPError as error:
            raise AssertionError(f"Orthanc {method} {path}: HTTP {error.code}: "
                                 f"{error.read().decode(errors='replace')}") from None
        return json.loads(text) if text.strip() else None

    def upload(self, instance: Instance) -> str:
        """POST /instances; returns Orthanc's ID of the instance."""
        return self.rest("POST", "/instances", instance.path.read_bytes())["ID"]

    def add_modality(self, name: str, ae_title: str, port: int) -> None:
        self.rest("PUT", f"/modalities/{name}", {
            "AET": ae_title, "Host": HOST, "Port": port, "AllowStorageCommitment": True})


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """Orthanc 1.10 on 127.0.0.1: its own config, storage and index in a temporary dir."""
    binary = "/usr/sbin/Orthanc"
    if not os.path.exists(binary):
        binary = require_binary("Orthanc")
    workdir = tmp_path_factory.mktemp("orthanc")
    scu_listen_port = free_port()
    ports = {}

    def make_cmd(dicom_port: int) -> list[str]:
        ports["http"] = free_port()
        config = {
            "Name": "dicomagent-tests",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "DicomAet": ORTHANC_AET,
            "DicomPort": dicom_port,
            "HttpPort": ports["http"],
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomScuTimeout": 10,
            "Plugins": [],
            # The daemons of the tests get their entry at run time (PUT /modalities/...):
            # their ports are only known once they listen.
            "DicomModalities": {
                "commitscu": {"AET": COMMIT_SCU_AET, "Host": HOST, "Port": scu_listen_port,
                              "AllowStorageCommitment": True},
            },
        }
        (workdir / "orthanc.json").write_text(json.dumps(config, indent=1))
        return [binary, "--verbose", str(workdir / "orthanc.json")]

    log_path = workdir / "orthanc.log"
    cmd, process, dicom_port = start_listening(make_cmd, None, log_path, workdir)
    node = RunningNode(HOST, dicom_port, ORTHANC_AET, process, log_path, None, None, cmd)
    server = Orthanc(node, ports["http"], scu_listen_port)
    try:
        wait_until(lambda: _http_up(server), 10.0, f"Orthanc's HTTP server on port "
                                                   f"{server.http_port}; its log:\n{node.log()}")
        yield server
    finally:
        status = node.terminate(20.0)
        assert status in (0, -signal.SIGTERM), f"Orthanc exited {status}:\n{node.log()}"


def _http_up(server: Orthanc) -> bool:
    try:
        return server.rest("GET", "/system")["DicomAet"] == ORTHANC_AET
    except (OSError, AssertionError):
        return False


def orthanc_report(orthanc: Orthanc, transaction_uid: str, timeout: float = 15.0) -> dict:
    """GET /storage-commitment/{id} until it is no longer Pending."""
    def done():
        report = orthanc.rest("GET", f"/storage-commitment/{transaction_uid}")
        return report if report["Status"] != "Pending" else None
    return wait_until(done, timeout, f"Orthanc got the report of {transaction_uid}; "
                                     f"Orthanc's log:\n{orthanc.node.log()[-4000:]}")


# --- 1. Orthanc -> dicomagent -----------------------------------------------------------------

def test_orthanc_requests_commitment_from_dicomagent(orthanc, agent_factory, tmp_path):
    """Orthanc (SCU, REST-driven) -> daemon (SCP): the report reaches Orthanc on a new
    association to the daemon's ``[peers]`` entry for Orthanc (Orthanc releases its own
    association after the N-ACTION-RSP)."""
    agent = agent_factory(agent_config({"orthanc": (ORTHANC_AET, orthanc.node.port)}))
    orthanc.add_modality("dicomagent", AGENT_AET, agent.port)
    study = new_uid()
    both = [write_instance(tmp_path, f"both{n}", study_uid=study) for n in range(3)]
    only_orthanc = write_instance(tmp_path, "only-orthanc", study_uid=study)
    store_into(agent, both)
    orthanc_ids = {i.uid: orthanc.upload(i) for i in [*both, only_orthanc]}

    answer = orthanc.rest("POST", "/modalities/dicomagent/storage-commitment", {
        # Orthanc's own IDs of what both hold, and of what only Orthanc holds ...
        "Resources": [orthanc_ids[i.uid] for i in [both[0], both[1], only_orthanc]],
        # ... and an instance the daemon holds as Secondary Capture, asked for as CT.
        "DicomInstances": [{"SOPClassUID": CT, "SOPInstanceUID": both[2].uid}],
        "Timeout": 10,
    })
    transaction_uid = answer["ID"]
    report = orthanc_report(orthanc, transaction_uid)

    assert report["RemoteAET"] == AGENT_AET
    assert report["Status"] == "Failure", report
    assert {(s["SOPClassUID"], s["SOPInstanceUID"]) for s in report["Success"]} == \
        {(SC, both[0].uid), (SC, both[1].uid)}, report
    assert {(f["SOPClassUID"], f["SOPInstanceUID"], f["FailureReason"])
            for f in report["Failures"]} == {
        (SC, only_orthanc.uid, NO_SUCH_OBJECT_INSTANCE),
        (CT, both[2].uid, CLASS_INSTANCE_CONFLICT)}, report

    row = wait_reported(agent, transaction_uid)
    assert row["calling_ae_title"] == ORTHANC_AET
    assert committed_uids(agent.data_dir) == {both[0].uid, both[1].uid}
    # Orthanc released its association after the N-ACTION-RSP: the daemon opened one to it.
    assert (f"{AGENT_AET}@{HOST}:{orthanc.node.port} storage commitment {transaction_uid} "
            f"reported: 2 committed, 2 failed") in agent.log(), agent.log()
    assert_no_handler_failure(agent)


def test_orthanc_commitment_all_present_is_success(orthanc, agent_factory, tmp_path):
    """Every instance present: Orthanc records the transaction as a Success."""
    agent = agent_factory(agent_config({"orthanc": (ORTHANC_AET, orthanc.node.port)}))
    orthanc.add_modality("dicomagent", AGENT_AET, agent.port)
    instances = [write_instance(tmp_path, f"ok{n}") for n in range(2)]
    store_into(agent, instances)
    for instance in instances:
        orthanc.upload(instance)
    answer = orthanc.rest("POST", "/modalities/dicomagent/storage-commitment", {
        "DicomInstances": [[i.sop_class, i.uid] for i in instances], "Timeout": 10})
    report = orthanc_report(orthanc, answer["ID"])
    assert report["Status"] == "Success", report
    assert {s["SOPInstanceUID"] for s in report["Success"]} == {i.uid for i in instances}
    assert report["Failures"] == []
    wait_reported(agent, answer["ID"])
    assert_no_handler_failure(agent)


# --- 2. dicomagent -> Orthanc -----------------------------------------------------------------

def test_dicomagent_commit_to_orthanc(orthanc, tmp_path):
    """``dicomagent commit`` (SCU) -> Orthanc (SCP): Orthanc answers the N-ACTION, then
    opens an association to our ``--listen-port`` (its DicomModalities entry) to report."""
    held = [write_instance(tmp_path, f"held{n}") for n in range(2)]
    lacking = write_instance(tmp_path, "lacking")
    for instance in held:
        orthanc.upload(instance)

    result = dicomagent("commit", HOST, str(orthanc.node.port), "--aet", orthanc.scu_ae_title,
                        "--aec", ORTHANC_AET, "--listen-port", str(orthanc.scu_listen_port),
                        "--timeout", "20", *[str(i.path) for i in [*held, lacking]])
    committed, failed = commit_outcome(result.stdout)
    assert result.returncode == 1, result.stdout + result.stderr
    assert committed == {i.uid for i in held}, result.stdout
    assert failed == {lacking.uid: NO_SUCH_OBJECT_INSTANCE}, result.stdout
    assert "2 committed, 1 failed (report on the new association)" in result.stderr, \
        result.stderr


def test_dicomagent_commit_to_orthanc_all_committed(orthanc, tmp_path):
    instance = write_instance(tmp_path, "single")
    orthanc.upload(instance)
    result = dicomagent("commit", HOST, str(orthanc.node.port), "--aet", orthanc.scu_ae_title,
                        "--aec", ORTHANC_AET, "--listen-port", str(orthanc.scu_listen_port),
                        "--timeout", "20", str(instance.path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert commit_outcome(result.stdout) == ({instance.uid}, {})


# --- 3. dicomagent -> dicomagent --------------------------------------------------------------

def test_report_on_the_same_association(agent_factory, tmp_path):
    """No ``--listen-port``: the requester keeps its association open; the report comes on
    it. Instances named by UID are looked up in the (daemon's) archive given by --data-dir."""
    agent = agent_factory()
    stored = [write_instance(tmp_path, f"s{n}") for n in range(2)]
    store_into(agent, stored)
    missing = write_instance(tmp_path, "never-sent")

    result = dicomagent("commit", HOST, str(agent.port), "--aet", "SAMEASSOC", "--aec",
                        AGENT_AET, "--data-dir", str(agent.data_dir), "--timeout", "20",
                        stored[0].uid, str(stored[1].path), str(missing.path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert commit_outcome(result.stdout) == ({i.uid for i in stored},
                                             {missing.uid: NO_SUCH_OBJECT_INSTANCE})
    assert "(report on the same association)" in result.stderr, result.stderr
    transaction_uid = re.search(r"transaction (\S+):", result.stderr)[1]
    row = wait_reported(agent, transaction_uid)
    assert row["calling_ae_title"] == "SAMEASSOC" and row["attempts"] == 0
    assert committed_uids(agent.data_dir) == {i.uid for i in stored}
    assert_no_handler_failure(agent)


def test_report_on_a_new_association(agent_factory, tmp_path):
    """``--listen-port``: the requester releases after the N-ACTION-RSP; the daemon opens an
    association to the requester's ``[peers]`` entry and reports there."""
    listen_port = free_port()
    agent = agent_factory(agent_config({"requester": ("NEWASSOC", listen_port)}))
    stored = [write_instance(tmp_path, f"n{n}") for n in range(3)]
    store_into(agent, stored)

    result = dicomagent("commit", HOST, str(agent.port), "--aet", "NEWASSOC", "--aec",
                        AGENT_AET, "--listen-port", str(listen_port), "--timeout", "20",
                        *[str(i.path) for i in stored])
    assert result.returncode == 0, result.stdout + result.stderr
    assert commit_outcome(result.stdout) == ({i.uid for i in stored}, {})
    assert "(report on the new association)" in result.stderr, result.stderr
    transaction_uid = re.search(r"transaction (\S+):", result.stderr)[1]
    wait_reported(agent, transaction_uid)
    assert (f"{AGENT_AET}@{HOST}:{listen_port} storage commitment {transaction_uid} "
            f"reported: 3 committed, 0 failed") in agent.log(), agent.log()
    assert committed_uids(agent.data_dir) == {i.uid for i in stored}
    assert_no_handler_failure(agent)


def test_requester_down_at_report_time_gets_it_later(agent_factory, tmp_path):
    """Nothing listens at the requester's address when the report is ready: the daemon
    keeps it (pending, one failed attempt) and delivers it once the requester is up."""
    listen_port = free_port()
    agent = agent_factory(agent_config({"late": ("LATESCU", listen_port)}))
    stored = [write_instance(tmp_path, f"l{n}") for n in range(2)]
    store_into(agent, stored)
    missing_uid = new_uid()

    mark = agent.log_mark()
    transaction_uid = request_and_leave(
        agent, "LATESCU", [(SC, stored[0].uid), (SC, stored[1].uid), (SC, missing_uid)])
    agent.wait_for_log(f"storage commitment {transaction_uid}: report to LATESCU failed",
                       mark, timeout=10)
    row = commitment_row(agent.data_dir, transaction_uid)
    assert row["state"] == "pending" and row["attempts"] >= 1 and row["last_error"], row

    report = catch_report("LATESCU", listen_port, RETRY_WAIT)
    assert report.calling_ae_title == AGENT_AET
    assert report.data_set.TransactionUID == transaction_uid
    assert report.event_type == 2          # failures exist
    assert report.committed == {stored[0].uid, stored[1].uid}
    assert report.failed == {missing_uid: NO_SUCH_OBJECT_INSTANCE}
    wait_reported(agent, transaction_uid)
    assert_no_handler_failure(agent)


def test_report_survives_a_daemon_restart(agent_factory, tmp_path):
    """N-ACTION answered, requester unreachable, daemon stopped (SIGTERM) and started again
    on the same data dir, requester comes up: the report still arrives (the request and its
    retry time are in the index)."""
    listen_port = free_port()
    config = agent_config({"late": ("RESTARTSCU", listen_port)})
    agent = agent_factory(config)
    stored = write_instance(tmp_path, "r")
    store_into(agent, [stored])

    mark = agent.log_mark()
    transaction_uid = request_and_leave(agent, "RESTARTSCU", [(SC, stored.uid)])
    agent.wait_for_log(f"storage commitment {transaction_uid}: report to RESTARTSCU failed",
                       mark, timeout=10)
    assert agent.terminate() == 0, agent.log()
    row = commitment_row(agent.data_dir, transaction_uid)
    assert row["state"] == "pending", row

    restarted = agent_factory(config, data_dir=agent.data_dir)
    report = catch_report("RESTARTSCU", listen_port, RETRY_WAIT)
    assert report.data_set.TransactionUID == transaction_uid
    assert report.event_type == 1          # all committed
    assert report.committed == {stored.uid} and report.failed == {}
    wait_reported(restarted, transaction_uid)
    assert_no_handler_failure(agent)
    assert_no_handler_failure(restarted)


# --- 3'. dicomagent commit against an SCP that reports at the edges ---------------------------

class EdgeSCP:
    """A Storage Commitment SCP in the test's event loop (what ``AcceptorAssociation`` needs
    of an agent). It answers the N-ACTION; with ``report_during_release`` it sends the
    N-EVENT-REPORT-RQ when the requester's A-RELEASE-RQ arrives, before its A-RELEASE-RP
    (PS3.8 Table 9-10: P-DATA request in Sta8 is AR-7, allowed; the requester, in Sta7,
    gets a P-DATA indication, AR-6, and may not answer). Then it reports on a new
    association to the requester's listen port, and releases that association
    ``release_delay`` s after the N-EVENT-REPORT-RSP, as an SCP may."""

    def __init__(self, ae_title: str, listen_port: int, report_during_release: bool,
                 release_delay: float):
        self.config = Config()
        self.config.agent.ae_title = ae_title
        self.policy = AcceptorPolicy(ae_title=ae_title, abstract_syntaxes={
            STORAGE_COMMITMENT_PUSH_MODEL: AbstractSyntaxSupport(scp=True)})
        self.handlers = {(N_ACTION_RQ, STORAGE_COMMITMENT_PUSH_MODEL): self.on_n_action}
        self.sinks: dict = {}
        self.send_cap = 1 << 20
        self.log_contexts = False
        self.listen_port = listen_port
        self.report_during_release = report_during_release
        self.release_delay = release_delay
        #: How the report association ended ("released", or an abort's text).
        self.report_association_end: asyncio.Future = \
            asyncio.get_running_loop().create_future()

    def negotiate(self, rq):
        response = negotiate(rq, self.policy)
        return response, accepted_contexts(rq, response.ac) if response.ac is not None else {}

    def provider_check(self, rq):
        return None

    def on_n_action(self, association, context, received) -> None:
        request = received.command
        transaction_uid, references = parse_request(
            decode(received.data_set or b"", context.transfer_syntax))
        association.send_message(context.context_id, N_ACTION_RSP(
            AffectedSOPClassUID=STORAGE_COMMITMENT_PUSH_MODEL,
            MessageIDBeingRespondedTo=request.MessageID, Status=0x0000,
            AffectedSOPInstanceUID=STORAGE_COMMITMENT_INSTANCE,
            ActionTypeID=request.ActionTypeID))
        association.pending_report = (context, transaction_uid, references)

    async def report_again(self, requester_ae_title: str, transaction_uid: str,
                           references: list) -> None:
        try:
            association = await associate(
                HOST, self.listen_port, self.config.agent.ae_title, requester_ae_title,
                [ProposedContext(STORAGE_COMMITMENT_PUSH_MODEL, UNCOMPRESSED_TRANSFER_SYNTAXES,
                                 scu_role=False, scp_role=True)],
                artim_timeout=5, dimse_timeout=5, network_timeout=5)
            context = association.context_for(STORAGE_COMMITMENT_PUSH_MODEL)
            await send_report(association, context.context_id, transaction_uid,
                              [list(r) for r in references], [])
            await asyncio.sleep(self.release_delay)
            await association.release()
            self.report_association_end.set_result(association.end_reason)
        except Exception as error:  # noqa: BLE001 - the test reports it
            self.report_association_end.set_result(f"failed: {error!r}")


class EdgeSCPAssociation(AcceptorAssociation):
    pending_report = None

    def on_release_indication(self, indication) -> None:
        scp: EdgeSCP = self.agent
        if self.pending_report is not None:
            context, transaction_uid, references = self.pending_report
            if scp.report_during_release:
                self.send_message(context.context_id, N_EVENT_REPORT_RQ(
                    AffectedSOPClassUID=STORAGE_COMMITMENT_PUSH_MODEL,
                    MessageID=self.next_message_id(), CommandDataSetType=DATA_SET_PRESENT,
                    AffectedSOPInstanceUID=STORAGE_COMMITMENT_INSTANCE,
                    EventTypeID=ALL_COMMITTED),
                    encode(report_data_set(transaction_uid, [list(r) for r in references], []),
                           context.transfer_syntax))
            asyncio.get_running_loop().create_task(
                scp.report_again(self.calling_ae_title, transaction_uid, references))
        super().on_release_indication(indication)


def commit_against_edge_scp(instance: Instance, report_during_release: bool,
                            release_delay: float):
    """Run ``dicomagent commit --listen-port`` against an ``EdgeSCP``; returns the CLI's
    (exit status, stdout, stderr) and how the SCP's report association ended."""

    async def main():
        listen_port = free_port()
        scp = EdgeSCP("EDGESCP", listen_port, report_during_release, release_delay)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: EdgeSCPAssociation(scp).ul, HOST, 0)
        try:
            port = server.sockets[0].getsockname()[1]
            process = await asyncio.create_subprocess_exec(
                *dicomagent_cmd("commit", HOST, str(port), "--aet", "EDGESCU", "--aec",
                                "EDGESCP", "--listen-port", str(listen_port), "--timeout", "10",
                                str(instance.path)),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(process.communicate(), 30)
            end = await asyncio.wait_for(scp.report_association_end, 10)
        finally:
            server.close()
        return process.returncode, out.decode(), err.decode(), end

    return asyncio.run(main())


def test_commit_cli_given_a_report_during_its_release(tmp_path):
    """The SCP sends the report after the CLI's A-RELEASE-RQ (the race our own daemon runs
    too: it reports on the requester's association while it is open). The CLI, in Sta7,
    cannot answer it; it must not fail, and takes the report that follows on the new
    association."""
    instance = write_instance(tmp_path, "edge")
    status, out, err, _ = commit_against_edge_scp(instance, report_during_release=True,
                                                  release_delay=0.0)
    assert "Traceback" not in err and "Fatal error" not in err, err
    assert status == 0, out + err
    assert commit_outcome(out) == ({instance.uid}, {})


def test_commit_cli_waits_for_the_scp_to_release_the_report_association(tmp_path):
    """The SCP, association-requestor of the report association, releases it a moment after
    the N-EVENT-REPORT-RSP (PS3.8 §7.2: release is the requestor's); the CLI must let it,
    not drop the connection (an A-P-ABORT at the SCP) by exiting first."""
    instance = write_instance(tmp_path, "edge")
    status, out, err, end = commit_against_edge_scp(instance, report_during_release=False,
                                                    release_delay=0.3)
    assert status == 0, out + err
    assert commit_outcome(out) == ({instance.uid}, {})
    assert end == "released", f"the SCP's report association ended: {end}"


# --- 4. Failure Reasons -----------------------------------------------------------------------

def test_failure_reasons_in_one_request(agent_factory, tmp_path):
    """One N-ACTION naming a good instance, one never stored (0112), one whose file was
    changed on disk (0110, CRC-32 mismatch, same size), one whose file is gone (0110) and one
    asked for with another SOP class (0119)."""
    agent = agent_factory()
    good = write_instance(tmp_path / "sent", "good")
    corrupted = write_instance(tmp_path / "sent", "corrupted")
    gone = write_instance(tmp_path / "sent", "gone")
    other_class = write_instance(tmp_path / "sent", "other-class")
    store_into(agent, [good, corrupted, gone, other_class])
    never_stored = write_instance(tmp_path / "unsent", "never-stored")
    as_ct = write_instance(tmp_path / "unsent", "as-ct", sop_class=CT, uid=other_class.uid)

    path = stored_path(agent.data_dir, corrupted.uid)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF                       # last pixel byte: same size, different CRC-32
    path.write_bytes(data)
    stored_path(agent.data_dir, gone.uid).unlink()

    result = dicomagent("commit", HOST, str(agent.port), "--aet", "REASONS", "--aec",
                        AGENT_AET, "--timeout", "20",
                        *[str(i.path) for i in [good, never_stored, corrupted, gone, as_ct]])
    assert result.returncode == 1, result.stdout + result.stderr
    assert commit_outcome(result.stdout) == ({good.uid}, {
        never_stored.uid: NO_SUCH_OBJECT_INSTANCE,
        corrupted.uid: PROCESSING_FAILURE,
        gone.uid: PROCESSING_FAILURE,
        other_class.uid: CLASS_INSTANCE_CONFLICT,
    })
    assert committed_uids(agent.data_dir) == {good.uid}
    assert_no_handler_failure(agent)


# --- 5. Retention -----------------------------------------------------------------------------

DAY = 86400.0

#: name -> (calling AE title, age in days, committed)
RETENTION_SET = {
    "a-old-committed": ("MODA", 40, True),
    "a-old": ("MODA", 40, False),
    "b-old-committed": ("MODB", 35, True),
    "b-old": ("MODB", 35, False),
    "a-day-committed": ("MODA", 1, True),
    "b-fresh": ("MODB", 0, False),
}


def archive_files(data_dir: Path) -> set[str]:
    root = data_dir / "archive"
    return {str(p.relative_to(data_dir)) for p in root.rglob("*") if p.is_file()}


def assert_archive_consistent(data_dir: Path) -> None:
    """Every index row has its file and every file its row; no empty levels; tmp/ empty."""
    rows = {path for (path,) in query(data_dir, "SELECT path FROM instances")}
    assert rows == archive_files(data_dir)
    assert query(data_dir, "SELECT COUNT(*) FROM series s WHERE NOT EXISTS (SELECT 1 FROM "
                           "instances i WHERE i.SeriesInstanceUID = s.SeriesInstanceUID)") == [(0,)]
    assert query(data_dir, "SELECT COUNT(*) FROM studies s WHERE NOT EXISTS (SELECT 1 FROM "
                           "series x WHERE x.StudyInstanceUID = s.StudyInstanceUID)") == [(0,)]
    assert query(data_dir, "SELECT COUNT(*) FROM patients p WHERE NOT EXISTS (SELECT 1 FROM "
                           "studies s WHERE s.patient_key = p.patient_key)") == [(0,)]
    assert [name for name in os.listdir(data_dir / "tmp")
            if not (name.endswith(".spare") and (data_dir / "tmp" / name).stat().st_size == 0)] == []


def retention(data_dir: Path, config: Path, *extra: str) -> list[str]:
    result = dicomagent("retention", "-c", str(config), "--data-dir", str(data_dir), *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split()


def test_retention(agent_factory, tmp_path):
    """Ages set in the index while the daemon is stopped; then ``dicomagent retention``
    (dry run and for real) under each filter, and the daemon's own periodic rule."""
    agent = agent_factory()
    instances = {name: write_instance(tmp_path / "files", name, patient_id=f"RET{n}")
                 for n, name in enumerate(RETENTION_SET)}
    uid = {name: i.uid for name, i in instances.items()}
    for ae_title in ("MODA", "MODB"):
        store_into(agent, [instances[name] for name, (ae, _, _) in RETENTION_SET.items()
                           if ae == ae_title], aet=ae_title)
    to_commit = [instances[name] for name, (_, _, c) in RETENTION_SET.items() if c]
    result = dicomagent("commit", HOST, str(agent.port), "--aet", "RETSCU", "--aec",
                        AGENT_AET, "--timeout", "20", *[str(i.path) for i in to_commit])
    assert result.returncode == 0, result.stdout + result.stderr
    assert committed_uids(agent.data_dir) == {i.uid for i in to_commit}
    assert agent.terminate() == 0, agent.log()
    assert_no_handler_failure(agent)

    data_dir = agent.data_dir
    now = time.time()
    db = sqlite3.connect(data_dir / "index.sqlite")
    with db:
        for name, (_, age, _) in RETENTION_SET.items():
            db.execute("UPDATE instances SET received_at = ? WHERE SOPInstanceUID = ?",
                       (now - age * DAY - 60, uid[name]))
    db.close()
    assert {ae for (ae,) in query(data_dir, "SELECT calling_ae_title FROM instances")} == \
        {"MODA", "MODB"}

    def config(text: str) -> Path:
        path = tmp_path / f"retention-{len(list(tmp_path.glob('retention-*')))}.toml"
        path.write_text("[retention]\n" + text)
        return path

    every = config("max_age_days = 30\n")
    moda = config('max_age_days = 30\ncalling_ae_titles = ["MODA"]\n')
    committed = config("max_age_days = 30\nonly_committed = true\n")
    moda_committed = config('max_age_days = 30\ncalling_ae_titles = ["MODA"]\n'
                            "only_committed = true\n")
    names = lambda uids: {n for n, u in uid.items() if u in uids}  # noqa: E731

    before = archive_files(data_dir)
    assert names(retention(data_dir, every, "--dry-run")) == \
        {"a-old-committed", "a-old", "b-old-committed", "b-old"}
    assert names(retention(data_dir, moda, "--dry-run")) == {"a-old-committed", "a-old"}
    assert names(retention(data_dir, committed, "--dry-run")) == \
        {"a-old-committed", "b-old-committed"}
    assert names(retention(data_dir, moda_committed, "--dry-run")) == {"a-old-committed"}
    assert names(retention(data_dir, every, "--dry-run", "--max-age-days", "0.5")) == \
        {"a-old-committed", "a-old", "b-old-committed", "b-old", "a-day-committed"}
    assert archive_files(data_dir) == before, "a dry run deleted something"
    assert len(query(data_dir, "SELECT 1 FROM instances")) == len(RETENTION_SET)

    remaining = set(RETENTION_SET)
    for rule, expected in ((moda_committed, {"a-old-committed"}),
                           (committed, {"b-old-committed"}),
                           (moda, {"a-old"}),
                           (every, {"b-old"})):
        deleted = retention(data_dir, rule)
        assert len(deleted) == len(set(deleted))
        assert names(deleted) == expected
        remaining -= expected
        left = {u for (u,) in query(data_dir, "SELECT SOPInstanceUID FROM instances")}
        assert names(left) == remaining
        assert_archive_consistent(data_dir)
    assert remaining == {"a-day-committed", "b-fresh"}

    # The daemon applies [retention] itself, at start and then every interval_hours.
    daemon = agent_factory(agent_config(extra="\n[retention]\nmax_age_days = 0.5\n"),
                           data_dir=data_dir)
    daemon.wait_for_log("retention: deleted 1 instances", timeout=10)
    left = {u for (u,) in query(data_dir, "SELECT SOPInstanceUID FROM instances")}
    assert names(left) == {"b-fresh"}
    assert_archive_consistent(data_dir)
