"""Query/Retrieve interop: DCMTK findscu/movescu/getscu against ``dicomagent serve``, and
``dicomagent find/move/get`` against DCMTK dcmqrscp and against ``dicomagent serve``.

One archive of synthetic objects (``ARCHIVE`` below) is imported into a data dir before a
daemon starts on it; every test reads it, and only ``test_movescu_missing_file_b000``
changes it (it deletes one file of its own series). The matching cases are the kinds
of PS3.4 C.2.2.2 (single value, universal, wild card, UID list, range, sequence) at
every level of both information models, each with the set of entities it must
select. Values are checked in the responses DCMTK itself wrote (``findscu -X``),
statuses in the DIMSE dump (``-d``).

These tests never skip: a missing DCMTK binary fails them (``nodes.require_binary``).

References
----------
PS3.4 C.2.2.2 (matching), C.4.1 (C-FIND), C.4.2 (C-MOVE), C.4.3 (C-GET), C.6.1 / C.6.2
(Study and Patient Root); seed Tables 39-48 (keys), Table 40 (C-FIND statuses).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from nodes import HOST, START_TIMEOUT, RunningNode, dicomagent_cmd, free_port, require_binary, \
    run, wait_for_echo, wait_for_port

ROOT = "1.2.826.0.1.3680043.8.498.7713."
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
SOP_CLASS = {"CT": CT, "MR": MR, "SR": BASIC_TEXT_SR, "PR": GSPS}

# --- the archive ---------------------------------------------------------------------------

#: Patient ID -> (name, Specific Character Set, birth date, sex)
PATIENTS = {
    "QR001": ("Doe^John", None, "19700101", "M"),
    "QR002": ("Müller^Jürgen", "ISO_IR 100", "19800202", "M"),
    "QR003": ("山田^太郎", "ISO_IR 192", "19900303", "M"),
    "QR004": ("Doe^Jane", None, "19750505", "F"),
    "QR005": ("Bulk^Cancel", None, "20000101", "O"),
    "QR006": ("Broken^Files", None, "20010101", "O"),
}

#: Study -> (Patient ID, date, time, accession, Study ID, referring physician)
STUDIES = {
    "S1": ("QR001", "20230115", "083000", "ACC001", "1", "Ref^Alpha"),
    "S2": ("QR001", "20230220", "141500", "ACC002", "2", "Ref^Beta"),
    "S3": ("QR002", "20221231", "235959", "ACC003", "3", "Ref^Alpha"),
    "S4": ("QR003", "20240301", "120000", "ACC004", "4", "Ref^Delta"),
    "S5": ("QR004", "20230115", "170000", "ACC005", "5", "Ref^Gamma"),
    "SB": ("QR005", "20200101", "090000", "ACC900", "900", "Ref^Bulk"),
    "SX": ("QR006", "20190101", "090000", "ACC901", "901", "Ref^Broken"),
}

BULK = 250

#: Series -> (study, modality, series number, instances, extra series attributes)
SERIES = {
    "X1": ("S1", "CT", 1, 3, {}),
    "X2": ("S1", "MR", 2, 2, {"PerformedProcedureStepStartDate": "20230115",
                              "PerformedProcedureStepStartTime": "084500"}),
    "X3": ("S1", "PR", 3, 1, {}),
    "X4": ("S2", "SR", 1, 2, {}),
    "X5": ("S3", "MR", 1, 2, {"RequestAttributesSequence": [
        {"RequestedProcedureID": "RP42", "ScheduledProcedureStepID": "SPS42"}]}),
    "X6": ("S3", "CT", 2, 1, {"RequestAttributesSequence": [
        {"RequestedProcedureID": "RP43", "ScheduledProcedureStepID": "SPS43"}]}),
    "X7": ("S4", "CT", 1, 2, {}),
    "X8": ("S5", "MR", 1, 1, {}),
    "XB": ("SB", "CT", 1, BULK, {}),
    "XX": ("SX", "CT", 1, 3, {}),
}


def study_uid(name: str) -> str:
    return f"{ROOT}1.{list(STUDIES).index(name) + 1}"


def series_uid(name: str) -> str:
    return f"{ROOT}2.{list(SERIES).index(name) + 1}"


def instance_uid(series: str, number: int) -> str:
    return f"{series_uid(series)}.{number}"


def instance_names(series: str) -> list[str]:
    return [f"{series}.{n}" for n in range(1, SERIES[series][3] + 1)]


def uid_of(name: str) -> str:
    """The UID of an entity named in the tables above (``S1``, ``X2``, ``X2.1``)."""
    if name in STUDIES:
        return study_uid(name)
    if name in SERIES:
        return series_uid(name)
    series, _, number = name.partition(".")
    return instance_uid(series, int(number))


def _items(entries: list[dict]) -> list[Dataset]:
    items = []
    for entry in entries:
        item = Dataset()
        for keyword, value in entry.items():
            setattr(item, keyword, _items(value) if isinstance(value, list) else value)
        items.append(item)
    return items


#: Instance-level extras: the SRs and the presentation state.
INSTANCE_EXTRAS = {
    "X4.1": {
        "CompletionFlag": "COMPLETE", "VerificationFlag": "UNVERIFIED",
        "ContentDate": "20230221", "ContentTime": "101500", "ValueType": "CONTAINER",
        "ConceptNameCodeSequence": [{"CodeValue": "18748-4", "CodingSchemeDesignator": "LN",
                                     "CodeMeaning": "Diagnostic Imaging Report"}],
        "ReferencedRequestSequence": [{"StudyInstanceUID": study_uid("S2"),
                                       "AccessionNumber": "ACC002",
                                       "RequestedProcedureID": "RP2"}],
    },
    "X4.2": {
        "CompletionFlag": "PARTIAL", "VerificationFlag": "UNVERIFIED",
        "ContentDate": "20230301", "ContentTime": "090000", "ValueType": "CONTAINER",
        "ConceptNameCodeSequence": [{"CodeValue": "11528-7", "CodingSchemeDesignator": "LN",
                                     "CodeMeaning": "Radiology Report"}],
        "ReferencedRequestSequence": [{"StudyInstanceUID": study_uid("S2"),
                                       "AccessionNumber": "ACC002",
                                       "RequestedProcedureID": "RP2B"}],
    },
    "X3.1": {
        "ContentLabel": "ANNOTATION", "ContentDescription": "arrows",
        "PresentationCreationDate": "20230116", "PresentationCreationTime": "101010",
        "ContentCreatorName": "Reader^One",
        "ReferencedSeriesSequence": [{
            "SeriesInstanceUID": series_uid("X1"),
            "ReferencedImageSequence": [{"ReferencedSOPClassUID": CT,
                                         "ReferencedSOPInstanceUID": instance_uid("X1", 1)}]}],
    },
}


def make_dataset(series: str, number: int) -> Dataset:
    study, modality, series_number, _, series_extra = SERIES[series]
    patient_id, date, time_, accession, study_id, referring = STUDIES[study]
    name, charset, birth, sex = PATIENTS[patient_id]
    sop_class, sop_instance = SOP_CLASS[modality], instance_uid(series, number)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_instance
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = date, time_, accession
    ds.Modality, ds.ReferringPhysicianName = modality, referring
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = name, patient_id, birth, sex
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid(study), series_uid(series)
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = study_id, series_number, number
    for keyword, value in series_extra.items():
        setattr(ds, keyword, _items(value) if isinstance(value, list) else value)
    for keyword, value in INSTANCE_EXTRAS.get(f"{series}.{number}", {}).items():
        setattr(ds, keyword, _items(value) if isinstance(value, list) else value)
    if modality in ("CT", "MR"):
        size = 4 if modality == "CT" else 8
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = bytes(range(2 * size * size))
    return ds


def write_archive_files(directory: Path, series_names=None) -> dict[str, Path]:
    """Every instance of ``ARCHIVE`` (or of ``series_names``) as a Part 10 file."""
    paths = {}
    for series in series_names or SERIES:
        for number in range(1, SERIES[series][3] + 1):
            path = directory / f"{series}.{number}.dcm"
            make_dataset(series, number).save_as(path, enforce_file_format=True)
            paths[f"{series}.{number}"] = path
    return paths


# --- nodes -----------------------------------------------------------------------------------

def start_storescp(workdir: Path, ae_title: str, port: int, *extra: str) -> RunningNode:
    """DCMTK storescp in the background, writing into ``workdir/out``."""
    binary = require_binary("storescp")
    out_dir = workdir / "out"
    out_dir.mkdir(parents=True)
    log_path = workdir / "storescp.log"
    cmd = [binary, "-aet", ae_title, "-od", str(out_dir), *extra, str(port)]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, cwd=workdir,
                                   env={**os.environ, "TCP_NODELAY": "1"})
    node = RunningNode(HOST, port, ae_title, process, log_path, out_dir, None, cmd)
    wait_for_port(port, process, node.log, START_TIMEOUT)
    return node


def stop_dcmtk(node: RunningNode) -> None:
    status = node.terminate(10.0)
    # storescp and dcmqrscp install no SIGTERM handler: the signal ends them.
    assert status in (0, -signal.SIGTERM), f"{node.cmd} exited {status}:\n{node.log()}"


def received_uids(directory: Path) -> set[str]:
    """SOP Instance UIDs of the DICOM files under ``directory``."""
    found = set()
    for path in directory.rglob("*"):
        if path.is_file():
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True,
                                     specific_tags=["SOPInstanceUID"])
            except Exception:  # noqa: BLE001 - not a DICOM file (dcmqrscp's index.dat)
                continue
            if "SOPInstanceUID" in ds:
                found.add(str(ds.SOPInstanceUID))
    return found


#: storescp association configuration accepting CT Image Storage only (``-xf``).
CT_ONLY_CFG = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = OppositeEndianExplicit
TransferSyntax3 = LittleEndianImplicit

[[PresentationContexts]]
[CTOnly]
PresentationContext1 = CTImageStorage\\Uncompressed

[[Profiles]]
[Default]
PresentationContexts = CTOnly
"""


@dataclass
class QR:
    agent: RunningNode
    store: RunningNode          # storescp STORESCP: a Move Destination
    ct_only: RunningNode        # storescp CTONLY: accepts CT Image Storage only
    workdir: Path

    def tmpdir(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.workdir))


@pytest.fixture(scope="module")
def qr(module_agent_factory, tmp_path_factory) -> QR:
    """The archive imported into a data dir, a daemon on it, and two storescp peers (and a
    third peer, DEAD, that nothing listens for)."""
    workdir = tmp_path_factory.mktemp("qr")
    source = workdir / "source"
    source.mkdir()
    write_archive_files(source)
    store_port, ct_only_port, dead_port = free_port(), free_port(), free_port()
    while len({store_port, ct_only_port, dead_port}) < 3:
        ct_only_port, dead_port = free_port(), free_port()
    config = f"""
[storage]
fsync = false

[peers.store]
ae_title = "STORESCP"
host = "{HOST}"
port = {store_port}

[peers.ctonly]
ae_title = "CTONLY"
host = "{HOST}"
port = {ct_only_port}

[peers.dead]
ae_title = "DEAD"
host = "{HOST}"
port = {dead_port}
"""
    config_path = workdir / "dicomagent.toml"
    config_path.write_text(config)
    data_dir = workdir / "data"
    result = run(dicomagent_cmd("import", "-c", str(config_path), "--data-dir", str(data_dir),
                                str(source)), timeout=60)
    total = sum(series[3] for series in SERIES.values())
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"imported {total}, failed 0" in result.stdout, result.stdout + result.stderr
    (workdir / "ctonly.cfg").write_text(CT_ONLY_CFG)
    store = start_storescp(workdir / "store", "STORESCP", store_port)
    ct_only = start_storescp(workdir / "ctonly", "CTONLY", ct_only_port,
                             "-xf", str(workdir / "ctonly.cfg"), "Default")
    try:
        agent = module_agent_factory(config, data_dir=data_dir)
        yield QR(agent, store, ct_only, workdir)
    finally:
        stop_dcmtk(store)
        stop_dcmtk(ct_only)


# --- findscu -------------------------------------------------------------------------------

_STATUS = re.compile(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})")


@dataclass
class Find:
    statuses: list[int]          # every C-FIND-RSP status, in order
    responses: list[Dataset]     # the identifiers findscu wrote (-X)
    text: str

    @property
    def final(self) -> int:
        return self.statuses[-1]


UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
          "IMAGE": "SOPInstanceUID"}


def findscu(qr: QR, model: str, level: str | None, *keys, extra=()) -> Find:
    """DCMTK ``findscu -S|-P -d -X`` with ``-k`` keys (str, or bytes for raw values).

    The level's unique key is added as a return key when not given.
    """
    out = qr.tmpdir()
    args: list = ["findscu", "-d", "-X", "-od", str(out), "-aec", qr.agent.ae_title,
                  {"study": "-S", "patient": "-P"}[model], *extra]
    if level:
        args += ["-k", f"QueryRetrieveLevel={level}"]
        named = [k.split(b"=")[0].decode() if isinstance(k, bytes) else k.split("=")[0]
                 for k in keys]
        if UNIQUE[level] not in named:
            args += ["-k", UNIQUE[level]]
    for key in keys:
        args += ["-k", key]
    result = run([*args, qr.agent.host, str(qr.agent.port)], 30, errors="replace")
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    responses = [pydicom.dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]
    statuses = [int(s, 16) for s in _STATUS.findall(text)]
    assert statuses, text
    return Find(statuses, responses, text)


def names_of(find: Find, level: str) -> set[str]:
    """The matched entities as names of the tables above."""
    by_uid = {uid_of(name): name for name in [*STUDIES, *SERIES]
              + [i for s in SERIES for i in instance_names(s)]}
    found = []
    for response in find.responses:
        value = str(response.get(UNIQUE[level], ""))
        found.append(value if level == "PATIENT" else by_uid.get(value, value))
    assert len(found) == len(set(found)), f"duplicate matches: {found}"
    return set(found)


# Each case: (id, model, level, keys, expected entities). Study and series names are the
# tables' keys, instances "X1.2"; at PATIENT level the Patient IDs.
S, X = study_uid, series_uid
CASES = [
    # single value
    ("sv-patient-id", "study", "STUDY", ["PatientID=QR001"], {"S1", "S2"}),
    ("sv-study-date", "study", "STUDY", ["StudyDate=20230115"], {"S1", "S5"}),
    ("sv-accession", "study", "STUDY", ["AccessionNumber=ACC003"], {"S3"}),
    ("sv-study-id", "study", "STUDY", ["StudyID=4"], {"S4"}),
    ("sv-name", "study", "STUDY", ["PatientName=Doe^Jane"], {"S5"}),
    ("sv-no-match", "study", "STUDY", ["PatientName=Doe"], set()),
    ("sv-study-uid", "study", "STUDY", [f"StudyInstanceUID={S('S2')}"], {"S2"}),
    # universal
    ("universal", "study", "STUDY", ["PatientName", "StudyDate", "AccessionNumber"],
     set(STUDIES)),
    ("universal-star", "study", "STUDY", ["PatientName=*"], set(STUDIES)),
    # wild card
    ("wc-star", "study", "STUDY", ["PatientName=Doe^*"], {"S1", "S2", "S5"}),
    ("wc-question", "study", "STUDY", ["PatientName=Doe^J?ne"], {"S5"}),
    ("wc-questions", "study", "STUDY", ["PatientName=Doe^J??n"], {"S1", "S2"}),
    ("wc-both", "study", "STUDY", ["ReferringPhysicianName=R?f^*ta"], {"S2", "S4"}),
    ("wc-accession", "study", "STUDY", ["AccessionNumber=ACC00?"],
     {"S1", "S2", "S3", "S4", "S5"}),
    ("wc-inner", "study", "STUDY", ["AccessionNumber=*9*"], {"SB", "SX"}),
    # list of UIDs
    ("uid-list", "study", "STUDY", [f"StudyInstanceUID={S('S1')}\\{S('S3')}"], {"S1", "S3"}),
    ("uid-list-series", "study", "SERIES",
     [f"StudyInstanceUID={S('S1')}", f"SeriesInstanceUID={X('X1')}\\{X('X3')}\\{X('X5')}"],
     {"X1", "X3"}),
    # date ranges
    ("date-closed", "study", "STUDY", ["StudyDate=20230101-20231231"], {"S1", "S2", "S5"}),
    ("date-closed-same-day", "study", "STUDY", ["StudyDate=20230220-20230220"], {"S2"}),
    ("date-open-end", "study", "STUDY", ["StudyDate=20230201-"], {"S2", "S4"}),
    ("date-open-start", "study", "STUDY", ["StudyDate=-20221231"], {"S3", "SB", "SX"}),
    ("birth-date-range", "patient", "PATIENT", ["PatientBirthDate=19700101-19791231"],
     {"QR001", "QR004"}),
    # time range
    ("time-range", "study", "STUDY", ["StudyTime=0800-1200"], {"S1", "S4", "SB", "SX"}),
    ("time-open-start", "study", "STUDY", ["StudyTime=-0900"], {"S1", "SB", "SX"}),
    ("time-open-end", "study", "STUDY", ["StudyTime=1700-"], {"S3", "S5"}),
    # Date and Time each on its own: findscu does not negotiate combined date-time
    # matching (PS3.4 C.5.1.1.2), so C.2.2.2.5.1 does not apply (see the test below)
    ("date-time-apart", "study", "STUDY",
     ["StudyDate=20230115-20230220", "StudyTime=1000-1500"], {"S2"}),
    ("date-time-one-day", "study", "STUDY", ["StudyDate=20230115", "StudyTime=1200-"], {"S5"}),
    ("pps-date-range", "study", "SERIES",
     [f"StudyInstanceUID={S('S1')}", "PerformedProcedureStepStartDate=20230101-"], {"X2"}),
    # sequence matching
    ("seq-request-attributes", "study", "SERIES",
     [f"StudyInstanceUID={S('S3')}", "RequestAttributesSequence[0].RequestedProcedureID=RP42"],
     {"X5"}),
    ("seq-request-attributes-sps", "study", "SERIES",
     [f"StudyInstanceUID={S('S3')}",
      "RequestAttributesSequence[0].ScheduledProcedureStepID=SPS4*"], {"X5", "X6"}),
    ("seq-concept-name", "study", "IMAGE",
     [f"StudyInstanceUID={S('S2')}", f"SeriesInstanceUID={X('X4')}",
      "ConceptNameCodeSequence[0].CodeValue=18748-4"], {"X4.1"}),
    ("seq-referenced-request", "study", "IMAGE",
     [f"StudyInstanceUID={S('S2')}", f"SeriesInstanceUID={X('X4')}",
      "ReferencedRequestSequence[0].RequestedProcedureID=RP2B"], {"X4.2"}),
    ("seq-referenced-series", "study", "IMAGE",
     [f"StudyInstanceUID={S('S1')}", f"SeriesInstanceUID={X('X3')}",
      f"ReferencedSeriesSequence[0].SeriesInstanceUID={X('X1')}"], {"X3.1"}),
    # A sequence whose item holds only zero-length keys is a return key: universal
    # matching (PS3.4 C.2.2.2.3, C.2.2.2.6), also for entities without that sequence.
    ("seq-return-key-only", "study", "IMAGE",
     [f"StudyInstanceUID={S('S1')}", f"SeriesInstanceUID={X('X1')}",
      "ConceptNameCodeSequence[0].CodeValue"], set(instance_names("X1"))),
    ("seq-return-key-only-series", "study", "SERIES",
     [f"StudyInstanceUID={S('S1')}", "RequestAttributesSequence[0].RequestedProcedureID"],
     {"X1", "X2", "X3"}),
    ("seq-referenced-series-none", "study", "IMAGE",
     [f"StudyInstanceUID={S('S1')}", f"SeriesInstanceUID={X('X3')}",
      f"ReferencedSeriesSequence[0].SeriesInstanceUID={X('X2')}"], set()),
    # SERIES and IMAGE levels
    ("series-all", "study", "SERIES", [f"StudyInstanceUID={S('S1')}", "Modality"],
     {"X1", "X2", "X3"}),
    ("series-modality", "study", "SERIES", [f"StudyInstanceUID={S('S1')}", "Modality=CT"],
     {"X1"}),
    ("series-number", "study", "SERIES", [f"StudyInstanceUID={S('S1')}", "SeriesNumber=2"],
     {"X2"}),
    ("image-all", "study", "IMAGE",
     [f"StudyInstanceUID={S('S1')}", f"SeriesInstanceUID={X('X1')}"], set(instance_names("X1"))),
    ("image-number", "study", "IMAGE",
     [f"StudyInstanceUID={S('S1')}", f"SeriesInstanceUID={X('X1')}", "InstanceNumber=2"],
     {"X1.2"}),
    ("image-sop-uid", "study", "IMAGE",
     [f"StudyInstanceUID={S('S1')}", f"SeriesInstanceUID={X('X1')}",
      f"SOPInstanceUID={uid_of('X1.3')}"], {"X1.3"}),
    ("image-sop-class", "study", "IMAGE",
     [f"StudyInstanceUID={S('S1')}", f"SeriesInstanceUID={X('X2')}", f"SOPClassUID={MR}"],
     {"X2.1", "X2.2"}),
    ("image-rows", "study", "IMAGE",
     [f"StudyInstanceUID={S('S1')}", f"SeriesInstanceUID={X('X2')}", "Rows=8"],
     {"X2.1", "X2.2"}),
    ("image-completion-flag", "study", "IMAGE",
     [f"StudyInstanceUID={S('S2')}", f"SeriesInstanceUID={X('X4')}", "CompletionFlag=COMPLETE"],
     {"X4.1"}),
    ("image-content-date", "study", "IMAGE",
     [f"StudyInstanceUID={S('S2')}", f"SeriesInstanceUID={X('X4')}", "ContentDate=20230225-"],
     {"X4.2"}),
    ("image-presentation-label", "study", "IMAGE",
     [f"StudyInstanceUID={S('S1')}", f"SeriesInstanceUID={X('X3')}", "ContentLabel=ANNOT*"],
     {"X3.1"}),
    # computed key as a matching key
    ("modalities-in-study", "study", "STUDY", ["ModalitiesInStudy=MR"], {"S1", "S3", "S5"}),
    ("modalities-in-study-list", "study", "STUDY", ["ModalitiesInStudy=PR\\SR"], {"S1", "S2"}),
    # Patient Root
    ("patient-universal", "patient", "PATIENT", ["PatientName"], set(PATIENTS)),
    ("patient-wildcard", "patient", "PATIENT", ["PatientName=Doe*"], {"QR001", "QR004"}),
    ("patient-sex", "patient", "PATIENT", ["PatientSex=F"], {"QR004"}),
    ("patient-study", "patient", "STUDY", ["PatientID=QR001"], {"S1", "S2"}),
    ("patient-study-date", "patient", "STUDY", ["PatientID=QR001", "StudyDate=20230201-"],
     {"S2"}),
    ("patient-series", "patient", "SERIES",
     ["PatientID=QR002", f"StudyInstanceUID={S('S3')}", "Modality=MR"], {"X5"}),
    ("patient-image", "patient", "IMAGE",
     ["PatientID=QR001", f"StudyInstanceUID={S('S1')}", f"SeriesInstanceUID={X('X2')}"],
     {"X2.1", "X2.2"}),
]


@pytest.mark.parametrize("model, level, keys, expected", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_findscu_matching(qr, model, level, keys, expected):
    find = findscu(qr, model, level, *keys)
    assert find.final == 0x0000, find.text[-3000:]
    assert set(find.statuses[:-1]) <= {0xFF00}, find.statuses
    assert names_of(find, level) == expected
    for response in find.responses:
        assert response.QueryRetrieveLevel == level
        assert response.RetrieveAETitle == qr.agent.ae_title


def test_findscu_returns_the_requested_values(qr):
    find = findscu(qr, "study", "STUDY", f"StudyInstanceUID={S('S1')}", "PatientName",
                   "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                   "AccessionNumber", "StudyID", "ReferringPhysicianName")
    (response,) = find.responses
    assert response.PatientName == "Doe^John" and response.PatientID == "QR001"
    assert response.PatientBirthDate == "19700101" and response.PatientSex == "M"
    assert (response.StudyDate, response.StudyTime) == ("20230115", "083000")
    assert (response.AccessionNumber, response.StudyID) == ("ACC001", "1")
    assert response.ReferringPhysicianName == "Ref^Alpha"
    # Only the requested keys come back (and the level and Retrieve AE Title).
    assert "StudyDescription" not in response and "Modality" not in response


def test_findscu_computed_keys(qr):
    find = findscu(qr, "study", "STUDY", f"StudyInstanceUID={S('S1')}\\{S('SB')}",
                   "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                   "NumberOfStudyRelatedInstances")
    by_uid = {r.StudyInstanceUID: r for r in find.responses}
    s1, bulk = by_uid[S("S1")], by_uid[S("SB")]
    assert list(s1.ModalitiesInStudy) == ["CT", "MR", "PR"]
    assert (s1.NumberOfStudyRelatedSeries, s1.NumberOfStudyRelatedInstances) == (3, 6)
    assert bulk.ModalitiesInStudy == "CT"
    assert (bulk.NumberOfStudyRelatedSeries, bulk.NumberOfStudyRelatedInstances) == (1, BULK)
    find = findscu(qr, "study", "SERIES", f"StudyInstanceUID={S('S1')}",
                   "NumberOfSeriesRelatedInstances", "Modality")
    counts = {r.Modality: r.NumberOfSeriesRelatedInstances for r in find.responses}
    assert counts == {"CT": 3, "MR": 2, "PR": 1}


def test_findscu_sequences_are_returned(qr):
    find = findscu(qr, "study", "IMAGE", f"StudyInstanceUID={S('S2')}",
                   f"SeriesInstanceUID={X('X4')}", "ConceptNameCodeSequence[0].CodeValue=11528-7",
                   "ReferencedRequestSequence")
    (response,) = find.responses
    assert response.ConceptNameCodeSequence[0].CodeValue == "11528-7"
    assert response.ReferencedRequestSequence[0].AccessionNumber == "ACC002"
    find = findscu(qr, "study", "SERIES", f"StudyInstanceUID={S('S3')}",
                   "RequestAttributesSequence[0].RequestedProcedureID=RP43")
    (response,) = find.responses
    assert response.RequestAttributesSequence[0].ScheduledProcedureStepID == "SPS43"


# --- Specific Character Set --------------------------------------------------------------------

def test_findscu_iso_ir_100_name_returned(qr):
    """A name stored in ISO_IR 100, matched by a UTF-8 (ISO_IR 192) query, comes back in
    the stored character set and decodes to the same text."""
    find = findscu(qr, "study", "STUDY", "SpecificCharacterSet=ISO_IR 192",
                   "PatientName=Müller*")
    assert find.final == 0, find.text[-2000:]
    (response,) = find.responses
    assert response.StudyInstanceUID == S("S3")
    assert response.PatientName == "Müller^Jürgen"
    assert response.SpecificCharacterSet == "ISO_IR 100"


def test_findscu_iso_ir_100_query_bytes(qr):
    """The query itself in ISO_IR 100 (Latin-1 bytes on findscu's command line)."""
    find = findscu(qr, "study", "STUDY", "SpecificCharacterSet=ISO_IR 100",
                   "PatientName=M\u00fcller^J\u00fcrgen".encode("latin-1"))
    assert find.final == 0, find.text[-2000:]
    assert names_of(find, "STUDY") == {"S3"}
    assert find.responses[0].PatientName == "Müller^Jürgen"


def test_findscu_iso_ir_192_name(qr):
    find = findscu(qr, "patient", "PATIENT", "SpecificCharacterSet=ISO_IR 192",
                   "PatientName=山田*", "PatientBirthDate")
    assert find.final == 0, find.text[-2000:]
    (response,) = find.responses
    assert response.PatientID == "QR003"
    assert response.PatientName == "山田^太郎"
    assert response.SpecificCharacterSet == "ISO_IR 192"
    assert response.PatientBirthDate == "19900303"


def test_findscu_non_ascii_names_in_universal_query(qr):
    find = findscu(qr, "patient", "PATIENT", "PatientName")
    names = {r.PatientID: str(r.PatientName) for r in find.responses}
    assert names == {pid: entry[0] for pid, entry in PATIENTS.items()}


def agent_find(qr: QR, *args: str, node: RunningNode | None = None):
    """``dicomagent find HOST PORT ARGS... --json``: (exit code, matches as DICOM JSON, stderr)."""
    node = node or qr.agent
    result = run(dicomagent_cmd("find", node.host, str(node.port), "--aec", node.ae_title,
                                "--timeout", "10", *args), 30)
    matches = json.loads(result.stdout) if "--json" in args and result.stdout.strip() else []
    return result.returncode, matches, result.stderr


def test_agent_find_combined_date_time_when_negotiated(qr):
    """With combined date-time matching negotiated (``--date-time-matching``), the Date
    and Time ranges are one range from 20230115 10:00 to 20230220 15:00 (C.2.2.2.5.1)."""
    keys = ["-L", "STUDY", "-k", "StudyDate=20230115-20230220", "-k", "StudyTime=1000-1500",
            "-k", "StudyInstanceUID", "--json"]
    code, matches, stderr = agent_find(qr, *keys, "--date-time-matching")
    assert code == 0, stderr
    assert {m["0020000D"]["Value"][0] for m in matches} == {S("S5"), S("S2")}
    code, matches, stderr = agent_find(qr, *keys)
    assert code == 0, stderr
    assert {m["0020000D"]["Value"][0] for m in matches} == {S("S2")}


def test_agent_find_json_non_ascii(qr):
    code, matches, stderr = agent_find(qr, "-L", "STUDY", "-k", "PatientName=山田^太郎",
                                       "-k", "StudyInstanceUID", "-k", "PatientID", "--json")
    assert code == 0, stderr
    assert "1 matches, status 0x0000" in stderr
    (match,) = matches
    assert match["00100010"]["Value"] == [{"Alphabetic": "山田^太郎"}]
    assert match["00080005"]["Value"] == ["ISO_IR 192"]
    assert match["0020000D"]["Value"] == [S("S4")]

    code, matches, stderr = agent_find(qr, "-L", "STUDY", "-k", "PatientName=*ller^J*rgen",
                                       "-k", "StudyDate", "--json")
    assert code == 0, stderr
    (match,) = matches
    assert match["00100010"]["Value"] == [{"Alphabetic": "Müller^Jürgen"}]
    assert match["00080020"]["Value"] == ["20221231"]


# --- statuses: A900, FF01, FE00 ----------------------------------------------------------------

@pytest.mark.parametrize("model, keys", [
    ("study", ["QueryRetrieveLevel=PATIENT", "PatientID"]),           # no PATIENT in Study Root
    ("study", ["QueryRetrieveLevel=WARD", "PatientID"]),
    ("study", ["PatientID"]),                                         # no level at all
    ("study", ["QueryRetrieveLevel=SERIES", "Modality"]),             # no Study Instance UID
    ("study", ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={S('S1')}"]),
    ("study", ["QueryRetrieveLevel=SERIES", "StudyInstanceUID=1.2.*"]),
    ("patient", ["QueryRetrieveLevel=STUDY", "StudyDate"]),           # no Patient ID
    ("patient", ["QueryRetrieveLevel=SERIES", "PatientID=QR001"]),
], ids=["patient-in-study-root", "bad-level", "no-level", "series-no-study-uid",
        "image-no-series-uid", "wildcard-unique-key", "patient-root-no-patient-id",
        "patient-root-series-no-study-uid"])
def test_findscu_a900(qr, model, keys):
    find = findscu(qr, model, None, *keys)
    assert find.statuses == [0xA900], find.text[-2000:]
    assert find.responses == []


def test_findscu_ff01_unsupported_optional_key(qr):
    find = findscu(qr, "study", "STUDY", "PatientID=QR001", "PatientComments=x")
    assert find.statuses == [0xFF01, 0xFF01, 0x0000], find.text[-2000:]
    # Without a value the same key is only a return key: FF00, and returned empty.
    find = findscu(qr, "study", "STUDY", "PatientID=QR001", "PatientComments")
    assert find.statuses == [0xFF00, 0xFF00, 0x0000], find.text[-2000:]
    assert all(r.PatientComments in ("", None) for r in find.responses)


def test_agent_find_cancel(qr):
    """C-CANCEL after the first of 250 matches: the final status is Cancel (FE00)."""
    code, _, stderr = agent_find(qr, "-L", "IMAGE", "-k", f"StudyInstanceUID={S('SB')}",
                                 "-k", f"SeriesInstanceUID={X('XB')}", "-k", "SOPInstanceUID",
                                 "--cancel-after", "1")
    assert code == 0, stderr
    found = re.search(r"(\d+) matches, status 0x([0-9A-F]{4})", stderr)
    assert found, stderr
    assert found.group(2) == "FE00", stderr
    assert 1 <= int(found.group(1)) < BULK, stderr
    # The association is still good for the next query.
    assert findscu(qr, "study", "STUDY", "PatientID=QR005").final == 0


def test_findscu_cancel(qr):
    """findscu ``--cancel 1 --repeat 2``: two C-FIND requests on one association; findscu
    cancels the first after its first match (FE00) and lets the second run: that one
    returns every match and Success, untouched by the earlier cancellation."""
    find = findscu(qr, "study", "IMAGE", f"StudyInstanceUID={S('SB')}",
                   f"SeriesInstanceUID={X('XB')}", extra=("--cancel", "1", "--repeat", "2"))
    assert find.text.count("Requesting Association") == 1
    assert "Sending Cancel Request (MsgID 1" in find.text
    finals = [i for i, s in enumerate(find.statuses) if s not in (0xFF00, 0xFF01)]
    assert [find.statuses[i] for i in finals] == [0xFE00, 0x0000], find.text[-2000:]
    first, second = finals
    assert 1 <= first < BULK
    assert second - first - 1 == BULK


# --- C-MOVE: DCMTK movescu, storescp as the destination ------------------------------------------

def movescu(qr: QR, destination: str, *keys: str, model: str = "-S"):
    args = ["movescu", "-d", model, "-aec", qr.agent.ae_title, "-aem", destination]
    for key in keys:
        args += ["-k", key]
    result = run([*args, qr.agent.host, str(qr.agent.port)], 60, errors="replace")
    text = result.stdout + result.stderr
    return result, text, [int(s, 16) for s in _STATUS.findall(text)]


def test_movescu_series_to_storescp(qr):
    before = received_uids(qr.store.data_dir)
    result, text, statuses = movescu(qr, "STORESCP", "QueryRetrieveLevel=SERIES",
                                     f"StudyInstanceUID={S('S1')}", f"SeriesInstanceUID={X('X1')}")
    assert result.returncode == 0, text[-3000:]
    assert statuses[-1] == 0x0000, text[-3000:]
    assert re.search(r"Completed Suboperations\s*:\s*3", text), text[-3000:]
    assert received_uids(qr.store.data_dir) - before == {uid_of(n) for n in instance_names("X1")}


def test_movescu_patient_root_study(qr):
    before = received_uids(qr.store.data_dir)
    result, text, statuses = movescu(qr, "STORESCP", "QueryRetrieveLevel=STUDY",
                                     "PatientID=QR002", f"StudyInstanceUID={S('S3')}",
                                     model="-P")
    assert statuses[-1] == 0x0000, text[-3000:]
    expected = {uid_of(n) for n in instance_names("X5") + instance_names("X6")}
    assert expected <= received_uids(qr.store.data_dir)
    assert received_uids(qr.store.data_dir) - before <= expected


def test_movescu_cancel(qr):
    """C-CANCEL during a C-MOVE of 250 instances: the final response is Cancel (FE00),
    sent before all sub-operations ran, and the objects sent so far arrived."""
    before = received_uids(qr.store.data_dir)
    args = ["movescu", "-d", "-S", "-aec", qr.agent.ae_title, "-aem", "STORESCP",
            "--cancel", "1", "-k", "QueryRetrieveLevel=SERIES",
            "-k", f"StudyInstanceUID={S('SB')}", "-k", f"SeriesInstanceUID={X('XB')}"]
    result = run([*args, qr.agent.host, str(qr.agent.port)], 60, errors="replace")
    text = result.stdout + result.stderr
    statuses = [int(s, 16) for s in _STATUS.findall(text)]
    assert statuses[-1] == 0xFE00, text[-3000:]
    assert "Sending Cancel Request" in text
    completed = [int(n) for n in re.findall(r"Completed Suboperations\s*:\s*(\d+)", text)]
    assert 1 <= completed[-1] < BULK, text[-3000:]
    arrived = received_uids(qr.store.data_dir) - before
    assert arrived <= {uid_of(n) for n in instance_names("XB")}
    assert len(arrived) == completed[-1]


def test_movescu_unknown_destination_a801(qr):
    result, text, statuses = movescu(qr, "NOBODY", "QueryRetrieveLevel=STUDY",
                                     f"StudyInstanceUID={S('S1')}")
    assert statuses == [0xA801], text[-3000:]


def _failed_uids_in_dump(text: str) -> set[str]:
    found = re.search(r"\(0008,0058\) UI \[([^\]]*)\]", text)
    return set(found.group(1).split("\\")) if found else set()


def test_movescu_destination_refuses_some_classes_b000(qr):
    """CTONLY accepts CT Image Storage only: the MR and PR sub-operations fail, B000, and
    the final response lists them (Failed SOP Instance UID List)."""
    result, text, statuses = movescu(qr, "CTONLY", "QueryRetrieveLevel=STUDY",
                                     f"StudyInstanceUID={S('S1')}")
    assert statuses[-1] == 0xB000, text[-3000:]
    assert re.search(r"Completed Suboperations\s*:\s*3", text), text[-3000:]
    assert re.search(r"Failed Suboperations\s*:\s*3", text), text[-3000:]
    failed = {uid_of(n) for n in instance_names("X2") + instance_names("X3")}
    assert _failed_uids_in_dump(text) == failed, text[-3000:]
    assert received_uids(qr.ct_only.data_dir) >= {uid_of(n) for n in instance_names("X1")}
    assert not received_uids(qr.ct_only.data_dir) & failed


def test_movescu_destination_down_a702(qr):
    """No association with the Move Destination: every sub-operation fails, A702, and the
    final response lists them all."""
    result, text, statuses = movescu(qr, "DEAD", "QueryRetrieveLevel=STUDY",
                                     f"StudyInstanceUID={S('S1')}")
    assert statuses[-1] == 0xA702, text[-3000:]
    assert re.search(r"Failed Suboperations\s*:\s*6", text), text[-3000:]
    assert _failed_uids_in_dump(text) == \
        {uid_of(n) for s in ("X1", "X2", "X3") for n in instance_names(s)}, text[-3000:]


def test_movescu_missing_file_b000(qr):
    """An archived file gone from disk: its sub-operation fails, the others complete."""
    victim = uid_of("XX.2")
    files = list((qr.agent.data_dir / "archive").rglob(f"{victim}.dcm"))
    assert len(files) == 1, files
    files[0].unlink()
    before = received_uids(qr.store.data_dir)
    result, text, statuses = movescu(qr, "STORESCP", "QueryRetrieveLevel=SERIES",
                                     f"StudyInstanceUID={S('SX')}", f"SeriesInstanceUID={X('XX')}")
    assert statuses[-1] == 0xB000, text[-3000:]
    assert re.search(r"Completed Suboperations\s*:\s*2", text), text[-3000:]
    assert re.search(r"Failed Suboperations\s*:\s*1", text), text[-3000:]
    assert _failed_uids_in_dump(text) == {victim}, text[-3000:]
    assert received_uids(qr.store.data_dir) - before == {uid_of("XX.1"), uid_of("XX.3")}
    # Our own SCU reports the same, and exits 1 on B000.
    result = run(dicomagent_cmd("move", qr.agent.host, str(qr.agent.port), "--aec",
                                qr.agent.ae_title, "--dest", "STORESCP", "-L", "SERIES",
                                "-k", f"StudyInstanceUID={S('SX')}",
                                "-k", f"SeriesInstanceUID={X('XX')}"), 60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "status 0xB000" in result.stdout and "completed 2, failed 1" in result.stdout
    assert f"failed: {victim}" in result.stderr


# --- C-GET: DCMTK getscu, and our get -----------------------------------------------------------

def test_getscu_series(qr):
    out = qr.tmpdir()
    result = run(["getscu", "-d", "-S", "-aec", qr.agent.ae_title, "-od", str(out),
                  "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={S('S1')}",
                  "-k", f"SeriesInstanceUID={X('X2')}", qr.agent.host, str(qr.agent.port)],
                 60, errors="replace")
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    assert [int(s, 16) for s in _STATUS.findall(text)][-1] == 0, text[-3000:]
    assert received_uids(out) == {uid_of(n) for n in instance_names("X2")}


def test_getscu_sr_and_presentation_state(qr):
    out = qr.tmpdir()
    result = run(["getscu", "-S", "-aec", qr.agent.ae_title, "-od", str(out),
                  "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={S('S1')}",
                  "-k", f"SeriesInstanceUID={X('X3')}", "-k", f"SOPInstanceUID={uid_of('X3.1')}",
                  qr.agent.host, str(qr.agent.port)], 60, errors="replace")
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = [p for p in out.iterdir() if p.is_file()]
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == GSPS
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == X("X1")


def test_agent_get_and_move_against_agent(qr):
    out = qr.tmpdir()
    result = run(dicomagent_cmd("get", qr.agent.host, str(qr.agent.port), "--aec",
                                qr.agent.ae_title, "--out", str(out), "-L", "SERIES",
                                "-k", f"StudyInstanceUID={S('S2')}",
                                "-k", f"SeriesInstanceUID={X('X4')}"), 60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "completed 2, failed 0" in result.stdout
    assert received_uids(out) == {uid_of(n) for n in instance_names("X4")}
    received = pydicom.dcmread(next(out.glob(f"{uid_of('X4.1')}*")))
    assert received.ConceptNameCodeSequence[0].CodeValue == "18748-4"

    before = received_uids(qr.store.data_dir)
    result = run(dicomagent_cmd("move", qr.agent.host, str(qr.agent.port), "--aec",
                                qr.agent.ae_title, "--dest", "STORESCP", "--model", "patient",
                                "-L", "PATIENT", "-k", "PatientID=QR003"), 60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "status 0x0000" in result.stdout and "completed 2, failed 0" in result.stdout
    assert {uid_of(n) for n in instance_names("X7")} <= received_uids(qr.store.data_dir)
    assert received_uids(qr.store.data_dir) - before <= {uid_of(n) for n in instance_names("X7")}

    result = run(dicomagent_cmd("move", qr.agent.host, str(qr.agent.port), "--aec",
                                qr.agent.ae_title, "--dest", "NOBODY", "-L", "STUDY",
                                "-k", f"StudyInstanceUID={S('S1')}"), 60)
    assert result.returncode == 1 and "status 0xA801" in result.stdout, \
        result.stdout + result.stderr


# --- our SCU against DCMTK dcmqrscp ------------------------------------------------------------

DCMQRSCP_CFG = """\
NetworkTCPPort  = {port}
MaxPDUSize      = 16384
MaxAssociations = 16

HostTable BEGIN
agent           = (DICOMAGENT, {host}, {agent_port})
scu             = (DICOMAGENT, {host}, {agent_port})
HostTable END

VendorTable BEGIN
VendorTable END

AETable BEGIN
QRSCP           {storage}       RW (200, 1024mb)   ANY
AETable END
"""


@pytest.fixture
def dcmqrscp(tmp_path):
    """DCMTK dcmqrscp as QRSCP, with a Move Destination DICOMAGENT on a port chosen here;
    filled with studies S1 and S3 by storescu.

    dcmqrscp forks a child per association: 3.6.7 in single-process mode (``-s``) dies of
    SIGSEGV after its first association is released.
    """
    binary = require_binary("dcmqrscp")
    port, agent_port = free_port(), free_port()
    storage = tmp_path / "db"
    storage.mkdir()
    config = tmp_path / "dcmqrscp.cfg"
    config.write_text(DCMQRSCP_CFG.format(port=port, host=HOST, agent_port=agent_port,
                                          storage=storage))
    log_path = tmp_path / "dcmqrscp.log"
    cmd = [binary, "-c", str(config), str(port)]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, cwd=tmp_path)
    node = RunningNode(HOST, port, "QRSCP", process, log_path, storage, config, cmd)
    try:
        wait_for_echo(node)
        source = tmp_path / "source"
        source.mkdir()
        write_archive_files(source, ["X1", "X2", "X5", "X6"])
        result = run(["storescu", "-aec", "QRSCP", HOST, str(port),
                      *sorted(str(p) for p in source.iterdir())], 60)
        assert result.returncode == 0, result.stdout + result.stderr + node.log()
        node.agent_port = agent_port
        yield node
    finally:
        stop_dcmtk(node)


def test_agent_find_against_dcmqrscp(qr, dcmqrscp):
    code, matches, stderr = agent_find(qr, "-L", "STUDY", "-k", "PatientName=Doe*",
                                       "-k", "StudyInstanceUID", "-k", "StudyDate", "--json",
                                       node=dcmqrscp)
    assert code == 0, stderr + dcmqrscp.log()
    assert [m["0020000D"]["Value"] for m in matches] == [[S("S1")]]
    assert "status 0x0000" in stderr

    code, matches, stderr = agent_find(qr, "--model", "patient", "-L", "PATIENT",
                                       "-k", "PatientID", "-k", "PatientName", "--json",
                                       node=dcmqrscp)
    assert code == 0, stderr
    assert sorted(m["00100020"]["Value"][0] for m in matches) == ["QR001", "QR002"]

    code, matches, stderr = agent_find(qr, "-L", "SERIES", "-k", f"StudyInstanceUID={S('S1')}",
                                       "-k", "SeriesInstanceUID", "-k", "Modality", "--json",
                                       node=dcmqrscp)
    assert code == 0, stderr
    assert sorted(m["00080060"]["Value"][0] for m in matches) == ["CT", "MR"]

    code, matches, stderr = agent_find(qr, "-L", "IMAGE", "-k", f"StudyInstanceUID={S('S3')}",
                                       "-k", f"SeriesInstanceUID={X('X5')}",
                                       "-k", "SOPInstanceUID", "--json", node=dcmqrscp)
    assert code == 0, stderr
    assert {m["00080018"]["Value"][0] for m in matches} == \
        {uid_of(n) for n in instance_names("X5")}

    code, _, stderr = agent_find(qr, "--cancel-after", "1", "-L", "IMAGE",
                                 "-k", f"StudyInstanceUID={S('S1')}",
                                 "-k", f"SeriesInstanceUID={X('X1')}", node=dcmqrscp)
    assert code == 0, stderr
    assert re.search(r"status 0x(FE00|0000)", stderr), stderr


def test_agent_get_and_move_against_dcmqrscp(dcmqrscp, agent_factory, tmp_path):
    out = tmp_path / "got"
    result = run(dicomagent_cmd("get", HOST, str(dcmqrscp.port), "--aec", "QRSCP",
                                "--out", str(out), "-L", "SERIES",
                                "-k", f"StudyInstanceUID={S('S1')}",
                                "-k", f"SeriesInstanceUID={X('X1')}"), 60)
    assert result.returncode == 0, result.stdout + result.stderr + dcmqrscp.log()
    assert "completed 3, failed 0" in result.stdout
    assert received_uids(out) == {uid_of(n) for n in instance_names("X1")}

    # dcmqrscp moves to DICOMAGENT: our daemon, on the port its HostTable names.
    destination = agent_factory("[storage]\nfsync = false\n", port=dcmqrscp.agent_port)
    result = run(dicomagent_cmd("move", HOST, str(dcmqrscp.port), "--aec", "QRSCP",
                                "--dest", "DICOMAGENT", "-L", "STUDY",
                                "-k", f"StudyInstanceUID={S('S3')}"), 60)
    assert result.returncode == 0, result.stdout + result.stderr + dcmqrscp.log()
    assert "completed 3, failed 0" in result.stdout
    assert received_uids(destination.data_dir / "archive") == \
        {uid_of(n) for n in instance_names("X5") + instance_names("X6")}

    # What dcmqrscp sent can be found in our daemon.
    code, matches, stderr = agent_find(
        None, "-L", "SERIES", "-k", f"StudyInstanceUID={S('S3')}", "-k", "SeriesInstanceUID",
        "-k", "RequestAttributesSequence[0].RequestedProcedureID=RP42", "--json",
        node=destination)
    assert code == 0, stderr
    assert [m["0020000E"]["Value"] for m in matches] == [[X("X5")]]
