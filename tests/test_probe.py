"""``dicomagent probe`` (issue #9) against real peers: the conformance matrix of each.

Every test runs ``python -m dicomagent probe HOST PORT ... --json FILE`` against a peer
the test starts, parses the JSON and asserts the matrix expected of that peer:

- DCMTK ``storescp``: accepts storage (CT Image Storage in all three uncompressed
  transfer syntaxes), no Q/R, worklist, MPPS or commitment; with ``--allow-writes`` every
  object the probe stored is a file in storescp's output directory;
- DCMTK ``dcmqrscp`` (its HostTable knowing our AE and ``--listen-port``): Q/R FIND,
  MOVE and GET accepted; the stored objects found again by C-FIND, fetched back by
  C-GET; C-MOVE as dcmqrscp really does it (see ``test_probe_dcmqrscp``);
- DCMTK ``wlmscpfs`` with two worklist items: MWL C-FIND passes with 2 matches, nothing
  else accepted but Verification;
- Orthanc 1.10 (Debian package, its own configuration in a temporary directory): C-ECHO,
  storage, Q/R FIND at every level of both roots; with ``--allow-writes`` the whole
  round trip (C-STORE, C-FIND, C-GET, C-MOVE to us, storage commitment);
- ``dicomagent serve`` itself: with ``--allow-writes --listen-port`` every check passes
  (the project's own conformance gate), also with worklist items to find, and with
  every storage class accepted;
- the Markdown output and the usage errors of ``--checks``.

Nothing here skips: a missing binary fails the test (``nodes.require_binary``).

References
----------
PS3.8 §7.1-7.3, §9.3.3.2, Table 9-18, 9-21; PS3.7 §6.3.1, §9.1.2, D.3.3.2; PS3.5 §10.1;
PS3.4 B.2, C.4.1-C.4.3, C.6, F.7, J.3, K.6.1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from nodes import HOST, RunningNode, dicomagent_cmd, free_port, \
    require_binary, run, start_listening, wait_for_echo

#: The probe's calling AE title: the peers that send to us (C-MOVE, commitment) know it.
PROBE_AET = "PROBESCU"
#: Per-operation timeout given to the probe (connect, association, DIMSE).
TIMEOUT = "5"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"
IMPLICIT, EXPLICIT_LE, EXPLICIT_BE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", \
    "1.2.840.10008.1.2.2"
ALL_THREE = {IMPLICIT, EXPLICIT_LE, EXPLICIT_BE}
STUDY_FIND, PATIENT_FIND = "1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_MOVE, PATIENT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2", "1.2.840.10008.5.1.4.1.2.1.2"
STUDY_GET, PATIENT_GET = "1.2.840.10008.5.1.4.1.2.2.3", "1.2.840.10008.5.1.4.1.2.1.3"
MWL_FIND = "1.2.840.10008.5.1.4.31"
GPWL_FIND = "1.2.840.10008.5.1.4.32.1"
MPPS = "1.2.840.10008.3.1.2.3.3"
COMMITMENT = "1.2.840.10008.1.20.1"

ASSOCIATION_CHECKS = ("accepts our AE", "maximum PDU length", "implementation class UID",
                      "implementation version name", "A-RELEASE", "wrong Called AE Title",
                      "A-ABORT", "unknown abstract syntax")
WRITE_CHECKS = ("C-STORE", "C-FIND of the stored objects", "C-GET of the stored objects",
                "C-MOVE of the stored objects to us", "MPPS N-CREATE / N-SET",
                "storage commitment of the stored objects")
Q_R_LEVEL_CHECKS = ("C-FIND patient root, PATIENT", "C-FIND patient root, STUDY",
                    "C-FIND patient root, SERIES", "C-FIND patient root, IMAGE",
                    "C-FIND study root, STUDY", "C-FIND study root, SERIES",
                    "C-FIND study root, IMAGE")


# --- running the probe ------------------------------------------------------------------------

class Report:
    """The parsed ``--json`` output of one probe run, with its exit code and output."""

    def __init__(self, result: subprocess.CompletedProcess, data: dict):
        self.returncode = result.returncode
        self.output = result.stdout + result.stderr
        self.data = data
        self.checks = data["checks"]
        self.contexts = {c["sop_class_uid"]: c for c in data["contexts"]}

    def check(self, name: str, group: str | None = None) -> dict:
        found = [c for c in self.checks if c["name"] == name
                 and (group is None or c["group"] == group)]
        assert len(found) == 1, f"{len(found)} checks named {name!r}:\n{self.output}"
        return found[0]

    def outcome(self, name: str, group: str | None = None) -> str:
        return self.check(name, group)["outcome"]

    def evidence(self, name: str, group: str | None = None) -> str:
        return self.check(name, group)["evidence"]

    def accepted(self, sop_class: str) -> set[str]:
        return set(self.contexts[sop_class]["accepted"]) if sop_class in self.contexts else set()

    def failed(self) -> list[dict]:
        return [c for c in self.checks if c["outcome"] == "fail"]

    def group(self, group: str) -> list[dict]:
        return [c for c in self.checks if c["group"] == group]

    def __str__(self) -> str:
        return self.output


def probe(node: RunningNode, tmp_path: Path, *args: str, timeout: float = 90.0,
          name: str = "probe") -> Report:
    """``dicomagent probe`` against ``node``; the parsed ``--json`` report."""
    json_path = tmp_path / f"{name}.json"
    cmd = dicomagent_cmd("probe", node.host, str(node.port), "--aec", node.ae_title,
                         "--aet", PROBE_AET, "--timeout", TIMEOUT, "--json", str(json_path),
                         *args)
    result = run(cmd, timeout)
    assert json_path.is_file(), (f"no JSON report: the probe exited {result.returncode}\n"
                                 f"{result.stdout}{result.stderr}\npeer log:\n"
                                 f"{node.log()[-3000:]}")
    data = json.loads(json_path.read_text())
    report = Report(result, data)
    assert "Traceback" not in report.output, report.output
    assert data["failed"] == len(report.failed())
    assert result.returncode == (1 if report.failed() else 0), report.output
    return report


def stored_count(report: Report) -> tuple[int, int]:
    """(stored, tried) from the C-STORE check's evidence."""
    match = re.match(r"(\d+) of (\d+) objects stored", report.evidence("C-STORE"))
    assert match, report.evidence("C-STORE")
    return int(match[1]), int(match[2])


def storage_pairs(report: Report) -> int:
    """How many (storage SOP class, transfer syntax) pairs the peer accepted."""
    from dicomagent.services.storage import all_storage_sop_classes
    storage = all_storage_sop_classes()
    return sum(len(c["accepted"]) for uid, c in report.contexts.items() if uid in storage)


def assert_association_sane(report: Report) -> None:
    assert [c["name"] for c in report.group("association")] == list(ASSOCIATION_CHECKS), \
        report.output
    for name in ("accepts our AE", "implementation class UID", "A-RELEASE", "A-ABORT",
                 "unknown abstract syntax"):
        assert report.outcome(name) == "pass", report.output
    assert report.evidence("unknown abstract syntax") == \
        "context result 3 (abstract-syntax-not-supported)"
    assert report.data["peer"]["implementation_class_uid"]


def stop(node: RunningNode, timeout: float = 20.0) -> None:
    status = node.terminate(timeout)
    # DCMTK tools and Orthanc: SIGTERM ends them (no handler, or a clean exit).
    assert status in (0, -signal.SIGTERM), f"{node.cmd} exited {status}:\n{node.log()}"


def dicom_files(directory: Path) -> list[Path]:
    found = []
    for path in directory.rglob("*"):
        if path.is_file():
            try:
                pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            except Exception:  # noqa: BLE001 - not a DICOM file (index.dat, lockfile)
                continue
            found.append(path)
    return found


# --- worklist items ---------------------------------------------------------------------------

def worklist_dump(number: int) -> str:
    return "\n".join([
        f"(0008,0050) SH [ACC{number}]",
        f"(0010,0010) PN [PROBE^PATIENT{number}]",
        f"(0010,0020) LO [PID{number}]",
        "(0010,0030) DA [19700101]",
        "(0010,0040) CS [O]",
        f"(0020,000d) UI [1.2.826.0.1.3680043.8.498.9901.{number}]",
        f"(0032,1060) LO [Procedure {number}]",
        "(0040,0100) SQ", "(fffe,e000) -",
        "(0008,0060) CS [CT]",
        "(0040,0001) AE [STN1]",
        "(0040,0002) DA [20240110]",
        f"(0040,0003) TM [0{number}0000]",
        "(0040,0006) PN [SMITH^ANNA]",
        f"(0040,0007) LO [Step {number}]",
        f"(0040,0009) SH [SPS{number}]",
        "(0040,0010) SH [STATION]",
        "(0040,0011) SH [ROOM]",
        "(fffe,e00d) -", "(fffe,e0dd) -",
        f"(0040,1001) SH [RP{number}]",
        "(0040,1003) SH [ROUTINE]",
    ]) + "\n"


def make_worklist(directory: Path, count: int = 2) -> list[Path]:
    """``count`` .wl files (one Scheduled Procedure Step each), made by DCMTK dump2dcm."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(1, count + 1):
        dump = directory / f"wl{number}.dump"
        target = directory / f"wl{number}.wl"
        dump.write_text(worklist_dump(number))
        done = run([require_binary("dump2dcm"), "-q", "+te", "-g", str(dump), str(target)])
        assert done.returncode == 0 and target.is_file(), done.stdout + done.stderr
        dump.unlink()
        paths.append(target)
    return paths


# --- usage ------------------------------------------------------------------------------------

def test_probe_unknown_check_group_is_a_usage_error():
    result = run(dicomagent_cmd("probe", HOST, "1", "--checks", "association,bogus"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "unknown check group bogus" in result.stderr


def test_probe_writes_without_allow_writes_is_a_usage_error():
    result = run(dicomagent_cmd("probe", HOST, "1", "--checks", "writes"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--allow-writes" in result.stderr
    # The same command with --allow-writes runs: nothing listens on port 1, so the
    # association group fails (and with it the run).
    result = run(dicomagent_cmd("probe", HOST, "1", "--allow-writes", "--timeout", TIMEOUT))
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"accepts our AE\s+fail", result.stdout), result.stdout


def test_probe_unreachable_peer_fails_without_the_association_group():
    """Skipping the association checks must not turn a dead peer into a clean "nothing
    supported" report."""
    result = run(dicomagent_cmd("probe", HOST, "1", "--checks", "contexts,services",
                                "--timeout", TIMEOUT))
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"accepts our AE\s+fail", result.stdout), result.stdout
    assert "not supported" not in result.stdout, result.stdout


# --- storescp ---------------------------------------------------------------------------------

def test_probe_storescp(storescp, tmp_path):
    """storescp: storage only; every object stored is a file in its output directory."""
    report = probe(storescp, tmp_path, "--allow-writes")
    assert report.returncode == 0 and not report.failed(), report.output
    assert_association_sane(report)
    assert report.outcome("wrong Called AE Title") == "info"       # storescp: any title
    assert report.data["peer"]["maximum_length"] == 16384
    assert report.data["peer"]["implementation_version_name"] == "OFFIS_DCMTK_367"

    assert report.accepted(CT) == ALL_THREE
    assert report.outcome("CT Image Storage", "contexts") == "pass"
    assert report.accepted(VERIFICATION) == ALL_THREE
    for sop_class in (STUDY_FIND, PATIENT_FIND, STUDY_MOVE, PATIENT_MOVE, STUDY_GET,
                      PATIENT_GET, MWL_FIND, GPWL_FIND, MPPS, COMMITMENT):
        assert not report.accepted(sop_class), sop_class

    assert report.outcome("C-ECHO") == "pass"
    for name in ("C-FIND patient root", "C-FIND study root", "Modality Worklist C-FIND",
                 "General Purpose Worklist C-FIND"):
        assert report.outcome(name, "services") == "not supported", name

    stored, tried = stored_count(report)
    assert report.outcome("C-STORE") == "pass"
    assert stored == tried == storage_pairs(report) > 100
    assert len(dicom_files(storescp.data_dir)) == stored
    for name in WRITE_CHECKS[1:]:
        assert report.outcome(name, "writes") == "not supported", name


# --- dcmqrscp ---------------------------------------------------------------------------------

DCMQRSCP_CFG = """\
NetworkTCPPort  = {port}
MaxPDUSize      = 16384
MaxAssociations = 16

HostTable BEGIN
probe           = ({aet}, {host}, {listen_port})
HostTable END

VendorTable BEGIN
VendorTable END

AETable BEGIN
QRSCP           {storage}       RW (2000, 1024mb)   ANY
AETable END
"""


@pytest.fixture
def dcmqrscp(tmp_path):
    """dcmqrscp as QRSCP; its HostTable names PROBESCU at ``node.listen_port``."""
    binary = require_binary("dcmqrscp")
    port, listen_port = free_port(), free_port()
    storage = tmp_path / "qrdb"
    storage.mkdir()
    config = tmp_path / "dcmqrscp.cfg"
    config.write_text(DCMQRSCP_CFG.format(port=port, host=HOST, aet=PROBE_AET,
                                          listen_port=listen_port, storage=storage))
    log_path = tmp_path / "dcmqrscp.log"
    cmd = [binary, "-c", str(config), str(port)]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, cwd=tmp_path, env=DCMTK_ENV)
    node = RunningNode(HOST, port, "QRSCP", process, log_path, storage, config, cmd)
    node.listen_port = listen_port
    try:
        wait_for_echo(node)
        yield node
    finally:
        stop(node, 10.0)


def test_probe_dcmqrscp(dcmqrscp, tmp_path):
    """dcmqrscp: Q/R FIND/MOVE/GET; what the probe stored is found and fetched back.

    C-MOVE: dcmqrscp's sub-association proposes a fixed list of storage SOP classes
    (DCMTK's), fewer than it accepts for storage; the objects of the other classes fail
    ("No presentation context for: ...") and the final status is 0xB000 (PS3.4 C.4.2.3.1:
    sub-operations failed). That is dcmqrscp's real behaviour and the probe's "fail" is
    right: asserted as such.
    """
    report = probe(dcmqrscp, tmp_path, "--allow-writes", "--listen-port",
                   str(dcmqrscp.listen_port))
    assert_association_sane(report)
    # dcmqrscp knows its AE titles (AETable): another one is rejected with reason 7.
    assert report.outcome("wrong Called AE Title") == "pass"
    assert report.evidence("wrong Called AE Title") == \
        "rejected: called-AE-title-not-recognized"
    for sop_class in (STUDY_FIND, PATIENT_FIND, STUDY_MOVE, PATIENT_MOVE, STUDY_GET,
                      PATIENT_GET, CT, VERIFICATION):
        assert report.accepted(sop_class) == ALL_THREE, sop_class
    for sop_class in (MWL_FIND, GPWL_FIND, MPPS, COMMITMENT):
        assert not report.accepted(sop_class), sop_class
    # Empty archive when the services ran: the top levels answer with no match.
    assert report.outcome("C-FIND patient root, PATIENT") == "pass"
    assert report.evidence("C-FIND patient root, PATIENT").startswith("0 matches")
    assert report.outcome("C-FIND study root, STUDY") == "pass"
    assert report.outcome("Modality Worklist C-FIND") == "not supported"

    stored, tried = stored_count(report)
    assert report.outcome("C-STORE") == "pass" and stored == tried == storage_pairs(report)
    assert report.outcome("C-FIND of the stored objects") == "pass"
    assert report.evidence("C-FIND of the stored objects") == \
        f"{stored} of {stored} found at IMAGE level"
    move = report.check("C-MOVE of the stored objects to us")
    received = re.match(r"status 0xB000, (\d+) of (\d+) received", move["evidence"])
    assert move["outcome"] == "fail" and received, move
    assert 0 < int(received[1]) < stored == int(received[2])
    assert "No presentation context for" in dcmqrscp.log()
    assert report.outcome("MPPS N-CREATE / N-SET") == "not supported"
    assert report.outcome("storage commitment of the stored objects") == "not supported"
    # C-GET: dcmqrscp sends every stored object back when the SCU proposes its class
    # (checked by hand: an IMAGE-level C-GET of the objects of the classes beyond the
    # 127th gives status 0x0000, all received). The probe proposes only the first 127
    # storage classes on its one C-GET association, so it cannot receive the others:
    # a probe bug, not dcmqrscp's.
    assert report.outcome("C-GET of the stored objects") == "pass", \
        report.evidence("C-GET of the stored objects")
    assert report.failed() == [move], report.failed()


# --- wlmscpfs ---------------------------------------------------------------------------------

@pytest.fixture
def wlmscpfs(tmp_path):
    """wlmscpfs -dfp DB PORT, two worklist items for AE WLMSCP."""
    binary = require_binary("wlmscpfs")
    database = tmp_path / "wlmdb"
    make_worklist(database / "WLMSCP", 2)
    (database / "WLMSCP" / "lockfile").write_bytes(b"")
    log_path = tmp_path / "wlmscpfs.log"
    cmd, process, port = start_listening(
        lambda p: [binary, "-dfp", str(database), str(p)], None, log_path, tmp_path, DCMTK_ENV)
    node = RunningNode(HOST, port, "WLMSCP", process, log_path, database, None, cmd)
    try:
        yield node
    finally:
        stop(node, 10.0)


def test_probe_wlmscpfs(wlmscpfs, tmp_path):
    """wlmscpfs: Verification and Modality Worklist, 2 matches; no storage, no Q/R."""
    report = probe(wlmscpfs, tmp_path, "--allow-writes")
    assert report.returncode == 0 and not report.failed(), report.output
    assert_association_sane(report)
    assert set(report.contexts) == {VERIFICATION, MWL_FIND}
    assert report.accepted(MWL_FIND) == ALL_THREE
    assert report.outcome("Modality Worklist Information Model - FIND", "contexts") == "pass"
    assert report.outcome("C-ECHO") == "pass"
    assert report.outcome("Modality Worklist C-FIND") == "pass"
    assert report.evidence("Modality Worklist C-FIND") == "2 matches, final status 0x0000"
    assert report.outcome("General Purpose Worklist C-FIND") == "not supported"
    assert report.outcome("C-FIND study root") == "not supported"
    assert report.outcome("C-STORE") == "not supported"
    assert report.evidence("C-STORE") == "no storage SOP class accepted"
    assert report.outcome("MPPS N-CREATE / N-SET") == "not supported"


# --- Orthanc ----------------------------------------------------------------------------------

ORTHANC_AET = "ORTHANC"


def orthanc_rest(node: RunningNode, method: str, path: str, body: bytes | None = None):
    request = urllib.request.Request(f"http://{HOST}:{node.http_port}{path}", data=body,
                                     method=method)
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read()
    return json.loads(text) if text.strip() else None


@pytest.fixture
def orthanc_factory(tmp_path):
    """``orthanc_factory(**config)``: Orthanc 1.10 on 127.0.0.1, its config in tmp_path
    (``config`` added to it); our AE (PROBESCU at ``node.listen_port``) in its
    DicomModalities; it checks the Called AE Title. Stopped at the end of the test."""
    nodes = []
    yield lambda **config: nodes.append(start_orthanc(tmp_path, config)) or nodes[-1]
    for node in nodes:
        stop(node, 20.0)


def start_orthanc(tmp_path: Path, extra: dict) -> RunningNode:
    binary = "/usr/sbin/Orthanc"
    if not os.path.exists(binary):
        binary = require_binary("Orthanc")
    work = tmp_path / "orthanc"
    work.mkdir()
    listen_port = free_port()
    ports = {}

    def make_cmd(dicom_port: int) -> list[str]:
        ports["http"] = free_port()
        config = {
            "Name": "dicomagent-probe-tests",
            "StorageDirectory": str(work / "storage"),
            "IndexDirectory": str(work / "index"),
            "DicomAet": ORTHANC_AET,
            "DicomPort": dicom_port,
            "HttpPort": ports["http"],
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomScuTimeout": 10,
            "SyncStorageArea": False,
            "Plugins": [],
            "DicomModalities": {
                "probe": {"AET": PROBE_AET, "Host": HOST, "Port": listen_port,
                          "AllowStorageCommitment": True},
            },
            **extra,
        }
        (work / "orthanc.json").write_text(json.dumps(config, indent=1))
        return [binary, "--verbose", str(work / "orthanc.json")]

    log_path = work / "orthanc.log"
    cmd, process, dicom_port = start_listening(make_cmd, None, log_path, work)
    node = RunningNode(HOST, dicom_port, ORTHANC_AET, process, log_path, work, None, cmd)
    node.http_port, node.listen_port = ports["http"], listen_port
    deadline = time.monotonic() + 10
    while True:
        try:
            if orthanc_rest(node, "GET", "/system")["DicomAet"] == ORTHANC_AET:
                return node
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop(node, 20.0)
            pytest.fail(f"Orthanc's HTTP server is not up:\n{node.log()}")
        time.sleep(0.1)


def orthanc_upload(node: RunningNode, patient_id: str, study_uid: str, series_uid: str,
                   number: int) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SC
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SC, ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = f"Probe^{patient_id}", patient_id
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240601", "120000", "1", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "OT", 1, number
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = bytes(range(64))
    path = node.data_dir / f"upload{number}.dcm"
    ds.save_as(path, enforce_file_format=True)
    orthanc_rest(node, "POST", "/instances", path.read_bytes())


def test_probe_orthanc_services(orthanc_factory, tmp_path):
    """Orthanc with two patients (one instance each): C-ECHO, storage accepted, Q/R FIND
    at every level of both roots passing; no worklist, no MPPS."""
    orthanc = orthanc_factory()
    for number, patient in enumerate(("PA", "PB"), 1):
        orthanc_upload(orthanc, patient, generate_uid(), generate_uid(), number)
    report = probe(orthanc, tmp_path)
    assert report.returncode == 0 and not report.failed(), report.output
    assert_association_sane(report)
    assert report.outcome("wrong Called AE Title") == "pass"      # DicomCheckCalledAet
    assert report.outcome("C-ECHO") == "pass"
    assert report.accepted(CT) == ALL_THREE
    for sop_class in (STUDY_FIND, PATIENT_FIND, STUDY_MOVE, PATIENT_MOVE, STUDY_GET,
                      PATIENT_GET, COMMITMENT):
        assert report.accepted(sop_class) == ALL_THREE, sop_class
    for sop_class in (MPPS, GPWL_FIND):
        assert not report.accepted(sop_class), sop_class
    for name in Q_R_LEVEL_CHECKS:
        assert report.outcome(name) == "pass", (name, report.evidence(name))
    expected = {"C-FIND patient root, PATIENT": 2, "C-FIND patient root, STUDY": 1,
                "C-FIND patient root, SERIES": 1, "C-FIND patient root, IMAGE": 1,
                "C-FIND study root, STUDY": 2, "C-FIND study root, SERIES": 1,
                "C-FIND study root, IMAGE": 1}
    for name, count in expected.items():
        assert report.evidence(name) == f"{count} matches, final status 0x0000", name
    assert report.outcome("General Purpose Worklist C-FIND") == "not supported"


def test_probe_orthanc_writes(orthanc_factory, tmp_path):
    """Orthanc with --allow-writes: stored, found, fetched by C-GET and C-MOVE, committed.

    Orthanc can send back every class it stored (checked by hand with a C-GET proposing
    the classes beyond the 127th: status 0x0000, all received), and it moves all of them
    to us. The probe, proposing only 127 storage classes on its C-GET, makes Orthanc hit
    its sub-operation failure path, where Orthanc 1.10 puts the Failed SOP Instance UID
    List (0008,0058) with a (0008,0000) group length into the C-GET-RSP *command set*
    (PS3.7 §6.3.1, §9.1.2: command elements are group 0000; PS3.4 C.4.3.1.3.1: the list
    belongs in the Identifier). Our SCU rightly aborts, but then waits for the response
    until the DIMSE timeout (600 s, whatever --timeout says) and crashes on A-RELEASE in
    Sta1: the run below must finish, and report, within the time given.

    Orthanc accepts Implicit VR Little Endian only here (``AcceptedTransferSyntaxes``):
    one object per storage class (186) instead of three keeps the run near 25 s (Orthanc
    indexes every object, and a C-GET of 127 classes takes it ~6 s); still more classes
    than one C-GET association can propose.
    """
    orthanc = orthanc_factory(AcceptedTransferSyntaxes=[IMPLICIT])
    report = probe(orthanc, tmp_path, "--checks", "writes", "--allow-writes",
                   "--listen-port", str(orthanc.listen_port), timeout=45.0)
    from dicomagent.services.storage import all_storage_sop_classes
    storage = [uid for uid in report.contexts if uid in all_storage_sop_classes()]
    assert len(storage) > 127 and all(report.accepted(uid) == {IMPLICIT} for uid in storage)
    stored, tried = stored_count(report)
    assert report.outcome("C-STORE") == "pass" and stored == tried == storage_pairs(report)
    assert report.outcome("C-FIND of the stored objects") == "pass"
    assert report.evidence("C-MOVE of the stored objects to us") == \
        f"status 0x0000, {stored} of {stored} received"
    assert report.outcome("MPPS N-CREATE / N-SET") == "not supported"
    assert report.evidence("storage commitment of the stored objects") == \
        f"N-ACTION 0x0000; {stored} committed, 0 failed, report on the new association"
    assert re.fullmatch(r"status 0x0000(, 0x0000)*, (\d+) of \2 received, 0 failed"
                        r"( \(\d+ C-GETs of at most 127 classes\))?",
                        report.evidence("C-GET of the stored objects")), \
        report.evidence("C-GET of the stored objects")
    assert f" {stored} of {stored} received" in report.evidence("C-GET of the stored objects")
    assert report.returncode == 0 and not report.failed(), report.output


# --- dicomagent serve -------------------------------------------------------------------------

def agent_config(listen_port: int, extra: str = "") -> str:
    return (f'[agent]\nae_title = "DICOMAGENT"\n\n[storage]\nfsync = false\n{extra}\n'
            f'[peers.probe]\nae_title = "{PROBE_AET}"\nhost = "{HOST}"\nport = {listen_port}\n')


def test_probe_dicomagent_self_gate(agent_factory, tmp_path):
    """The conformance gate: ``dicomagent serve`` passes every check of its own statement,
    with --allow-writes; a second run finds what the first stored at every Q/R level; the
    Markdown report has one table row per check."""
    listen_port = free_port()
    agent = agent_factory(agent_config(listen_port))
    md_path = tmp_path / "probe.md"
    report = probe(agent, tmp_path, "--allow-writes", "--listen-port", str(listen_port),
                   "--md", str(md_path))
    assert report.returncode == 0 and report.failed() == [], report.output
    assert_association_sane(report)
    assert report.outcome("wrong Called AE Title") == "info"    # check_called_aet = false
    assert report.data["peer"]["ae_title"] == "DICOMAGENT"
    for sop_class in (VERIFICATION, STUDY_FIND, PATIENT_FIND, STUDY_MOVE, PATIENT_MOVE,
                      STUDY_GET, PATIENT_GET, MWL_FIND, GPWL_FIND, MPPS, COMMITMENT, CT):
        assert report.accepted(sop_class) == ALL_THREE, sop_class
    for check in report.group("contexts"):
        assert check["outcome"] in ("pass", "info"), check
    for name in ("C-ECHO", "Modality Worklist C-FIND", "General Purpose Worklist C-FIND"):
        assert report.outcome(name) == "pass", report.evidence(name)

    stored, tried = stored_count(report)
    assert stored == tried == storage_pairs(report) > 0
    for name in WRITE_CHECKS:
        assert report.outcome(name, "writes") == "pass", (name, report.evidence(name))
    assert re.fullmatch(r"status 0x0000(, 0x0000)*, (\d+) of \2 received, 0 failed"
                        r"( \(\d+ C-GETs of at most 127 classes\))?",
                        report.evidence("C-GET of the stored objects")), \
        report.evidence("C-GET of the stored objects")
    assert f" {stored} of {stored} received" in report.evidence("C-GET of the stored objects")
    assert report.evidence("C-MOVE of the stored objects to us") == \
        f"status 0x0000, {stored} of {stored} received"
    assert report.evidence("MPPS N-CREATE / N-SET") == "N-CREATE 0x0000, N-SET 0x0000"
    assert report.evidence("storage commitment of the stored objects").startswith(
        f"N-ACTION 0x0000; {stored} committed, 0 failed")

    # Markdown: a table per group, one row per check, the totals line.
    markdown = md_path.read_text()
    rows = [line for line in markdown.splitlines()
            if line.startswith("| ") and not line.startswith("| check |")]
    assert len(rows) == len(report.checks)
    for check, row in zip(report.checks, rows):
        assert row.startswith(f"| {check['name']} | {check['outcome']} |"), row
    for group in ("association", "contexts", "services", "writes"):
        assert f"## {group}" in markdown
    assert markdown.rstrip().endswith(f"{len(report.checks)} checks, 0 failed.")

    # What the first run stored is there now: every Q/R level of both roots passes.
    again = probe(agent, tmp_path, "--checks", "services", name="again")
    assert again.returncode == 0 and not again.failed(), again.output
    assert again.group("association") == [] and again.group("contexts") == []
    for name in Q_R_LEVEL_CHECKS:
        assert again.outcome(name) == "pass", (name, again.evidence(name))
    assert again.evidence("C-FIND patient root, PATIENT").startswith("1 matches")
    assert again.evidence("C-FIND study root, STUDY").startswith("1 matches")


def test_probe_dicomagent_worklist_with_items(agent_factory, tmp_path):
    """The daemon with two worklist items: the MWL check passes with 2 matches."""
    agent = agent_factory(agent_config(free_port()))
    items = make_worklist(tmp_path / "items", 2)
    done = run(dicomagent_cmd("worklist", "add", "--data-dir", str(agent.data_dir),
                              *map(str, items)))
    assert done.returncode == 0, done.stdout + done.stderr
    report = probe(agent, tmp_path, "--checks", "services")
    assert report.returncode == 0 and not report.failed(), report.output
    assert report.evidence("Modality Worklist C-FIND") == "2 matches, final status 0x0000"
    assert report.outcome("General Purpose Worklist C-FIND") == "pass"


def test_probe_dicomagent_all_storage_classes(agent_factory, tmp_path):
    """The daemon accepting every storage class (205 of them, more than the 127 a C-GET
    association can propose besides its Q/R context): still every write check passes."""
    listen_port = free_port()
    agent = agent_factory(agent_config(listen_port, "accept_all_storage_classes = true\n"))
    report = probe(agent, tmp_path, "--checks", "writes", "--allow-writes",
                   "--listen-port", str(listen_port))
    stored, tried = stored_count(report)
    assert stored == tried == storage_pairs(report) > 3 * 127
    for name in ("C-STORE", "C-FIND of the stored objects",
                 "C-MOVE of the stored objects to us", "MPPS N-CREATE / N-SET",
                 "storage commitment of the stored objects"):
        assert report.outcome(name) == "pass", (name, report.evidence(name))
    assert re.fullmatch(r"status 0x0000(, 0x0000)*, (\d+) of \2 received, 0 failed"
                        r"( \(\d+ C-GETs of at most 127 classes\))?",
                        report.evidence("C-GET of the stored objects")), \
        report.evidence("C-GET of the stored objects")
    assert f" {stored} of {stored} received" in report.evidence("C-GET of the stored objects")
    assert report.returncode == 0, report.output
