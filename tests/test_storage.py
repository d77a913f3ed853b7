"""Storage end to end: DCMTK and dicomagent as SCU and SCP, and the archive on disk.

What is proved here, against real peers (STYLE.md, "Tests"):

- DCMTK ``storescu`` -> ``dicomagent serve``, several SOP classes of the seed's Table 2 in
  each of the three uncompressed transfer syntaxes: the stored file is the sent data set
  element by element, its File Meta names the transfer syntax as received and the calling
  AE, and the index holds the attributes (non-ASCII Patient Names included);
- ``dicomagent store`` -> DCMTK ``storescp``: folders (a non-DICOM file skipped), and a Big
  Endian file converted for a peer that accepts only Implicit VR Little Endian;
- ``dicomagent store`` -> ``dicomagent serve``: ``--ts`` conversions, and duplicates
  (``storage.on_duplicate`` keep / replace);
- a 300 MiB object streams to disk without the daemon's memory growing with it;
- durability (``dicomagent.archive`` docstring): ``kill -9`` while an object arrives, or in
  the middle of a burst, loses nothing that was acknowledged, and the next start leaves
  ``tmp/`` empty and the index and the files in agreement; objects filed but not yet indexed
  when the daemon died (or when its indexer process died) are indexed at the next start; a
  link that fails leaves no index row; ``dicomagent ls`` on a running daemon's data dir
  leaves the data set being received alone; four senders at once are all filed and indexed;
- the C-STORE statuses of seed Table 67 (A700, A900, B007, C000), each leaving nothing
  behind and the daemon answering;
- ``dicomagent import`` and ``dicomagent ls``.

Data sets are synthetic, built with pydicom in the tests. A missing DCMTK tool fails the
tests, never skips them (``nodes.require_binary``).

References
----------
PS3.4 Annex B (Storage Service Class, B.2.3 statuses); PS3.7 §9.1.1 (C-STORE);
PS3.10 §7.1 (File Meta Information); PS3.5 §7.3 (byte ordering), §6.1 (character sets);
seed conformance statement Table 2, Table 12, Table 67.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from dicomagent.archive.part10 import read_file_meta
from dicomagent.association import associate
from dicomagent.dimse.commands import C_STORE_RQ, encode_command
from dicomagent.transcode import encode
from dicomagent.uids import (EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN,
                             IMPLICIT_VR_LITTLE_ENDIAN)
from dicomagent.ul.negotiation import ProposedContext
from dicomagent.ul.pdu import MCH_LAST
from nodes import (HOST, START_TIMEOUT, RunningNode, dicomagent_cmd, free_port, new_uid,
                   require_binary, run, wait_for_port)

TS = {
    "implicit": IMPLICIT_VR_LITTLE_ENDIAN,
    "explicit": EXPLICIT_VR_LITTLE_ENDIAN,
    "big": EXPLICIT_VR_BIG_ENDIAN,
}
#: storescu: propose Implicit VR LE only / Explicit VR LE first / Explicit VR BE first.
STORESCU_PROPOSE = {"implicit": "-xi", "explicit": "-xe", "big": "-xb"}

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SC = "1.2.840.10008.5.1.4.1.1.7"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"

#: Seed Table 67.
SUCCESS, B007, A700, A900, C000 = 0x0000, 0xB007, 0xA700, 0xA900, 0xC000

#: The large object: 8-bit multi-frame, 300 frames of 1024 x 1024 = 300 MiB of pixel data.
BIG_ROWS = BIG_COLUMNS = 1024
BIG_FRAMES = 300
#: Generous bound on the daemon's peak RSS while it receives the large object.
RSS_BOUND_KB = 150 * 1024

def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


# --- synthetic data sets ----------------------------------------------------------------------

def _patient_study_series(ds: Dataset, modality: str, patient_name: str, patient_id: str,
                          charset: str | None, study_uid: str | None,
                          series_uid: str | None, number: int) -> None:
    if charset:
        ds.SpecificCharacterSet = charset
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid or new_uid()
    ds.StudyDate = "20240315"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC" + patient_id[-6:]
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.StudyID = "1"
    ds.SeriesInstanceUID = series_uid or new_uid()
    ds.SeriesNumber = 3
    ds.Modality = modality
    ds.InstanceNumber = number
    ds.ContentDate = "20240315"
    ds.ContentTime = "101501"


def _image_pixel(ds: Dataset, rows: int, columns: int, bits: int, signed: bool,
                 samples: int = 1, frames: int = 1, photometric: str = "MONOCHROME2") -> np.ndarray:
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[bits, signed]
    count = rows * columns * samples * frames
    info = np.iinfo(dtype)
    values = (np.arange(count, dtype=np.int64) * 37 + 11) % (int(info.max) - int(info.min) + 1)
    return (values + int(info.min)).astype(dtype)


def _set_pixels(ds: Dataset, pixels: np.ndarray, transfer_syntax: str) -> None:
    """Pixel Data in the byte order of ``transfer_syntax`` (OW words are swapped for BE)."""
    order = ">" if transfer_syntax == EXPLICIT_VR_BIG_ENDIAN else "<"
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(order)).tobytes()
    ds["PixelData"].VR = "OW" if pixels.dtype.itemsize > 1 else "OB"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def make_dataset(kind: str, transfer_syntax: str, *, patient_id: str,
                 study_uid: str | None = None, series_uid: str | None = None,
                 sop_uid: str | None = None, number: int = 1,
                 patient_name: str | None = None, private: bool = True) -> Dataset:
    """A synthetic instance of one SOP class, with pixel data where the class has it."""
    ds = Dataset()
    ds.SOPInstanceUID = sop_uid or new_uid()
    if kind == "ct":
        ds.SOPClassUID = CT
        _patient_study_series(ds, "CT", patient_name or "Gómez^José", patient_id, "ISO_IR 100",
                              study_uid, series_uid, number)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = "120"
        ds.SliceThickness = "2.5"
        ds.ImagePositionPatient = [-120.0, -120.0, -12.5]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.WindowCenter = ["40", "400"]
        ds.WindowWidth = ["400", "1500"]
        pixels = _image_pixel(ds, 16, 16, 16, signed=True)
    elif kind == "mr":
        ds.SOPClassUID = MR
        _patient_study_series(ds, "MR", patient_name or "山田^太郎", patient_id, "ISO_IR 192",
                              study_uid, series_uid, number)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = "12"
        ds.RepetitionTime = "500"
        ds.MagneticFieldStrength = "1.5"
        ds.StudyDescription = "頭部 MRI"
        pixels = _image_pixel(ds, 12, 20, 16, signed=False)
        if private:
            block = ds.private_block(0x0029, "DICOMAGENT TEST", create=True)
            block.add_new(0x01, "LO", "private text")
            block.add_new(0x02, "US", 513)
    elif kind == "sc":
        ds.SOPClassUID = SC
        _patient_study_series(ds, "OT", patient_name or "Capture^Sam", patient_id, None,
                              study_uid, series_uid, number)
        ds.ConversionType = "WSD"
        pixels = _image_pixel(ds, 8, 10, 8, signed=False, samples=3, photometric="RGB")
    elif kind == "us":
        ds.SOPClassUID = US_MULTIFRAME
        _patient_study_series(ds, "US", patient_name or "Echo^Ursula", patient_id, None,
                              study_uid, series_uid, number)
        ds.FrameTime = "33.3"
        ds.FrameIncrementPointer = Tag(0x0018, 0x1063)
        pixels = _image_pixel(ds, 16, 16, 8, signed=False, frames=4)
    elif kind == "sr":
        ds.SOPClassUID = BASIC_TEXT_SR
        _patient_study_series(ds, "SR", patient_name or "Report^Renée", patient_id,
                              "ISO_IR 100", study_uid, series_uid, number)
        ds.ValueType = "CONTAINER"
        ds.ConceptNameCodeSequence = Sequence([_code("11528-7", "LN", "Radiology Report")])
        ds.ContinuityOfContent = "SEPARATE"
        ds.CompletionFlag = "COMPLETE"
        ds.VerificationFlag = "UNVERIFIED"
        text = Dataset()
        text.RelationshipType = "CONTAINS"
        text.ValueType = "TEXT"
        text.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
        text.TextValue = "Kein Befund; état normal."
        code = Dataset()
        code.RelationshipType = "CONTAINS"
        code.ValueType = "CODE"
        code.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
        code.ConceptCodeSequence = Sequence([_code("17621005", "SCT", "Normal")])
        section = Dataset()
        section.RelationshipType = "CONTAINS"
        section.ValueType = "CONTAINER"
        section.ContinuityOfContent = "SEPARATE"
        section.ConceptNameCodeSequence = Sequence([_code("121070", "DCM", "Findings")])
        section.ContentSequence = Sequence([code])
        ds.ContentSequence = Sequence([text, section])
        return ds
    elif kind == "gsps":
        ds.SOPClassUID = GSPS
        _patient_study_series(ds, "PR", patient_name or "State^Presentation", patient_id,
                              None, study_uid, series_uid, number)
        ds.ContentLabel = "ANNOTATION"
        ds.ContentDescription = "arrow and text"
        ds.PresentationCreationDate = "20240315"
        ds.PresentationCreationTime = "101502"
        ds.ContentCreatorName = "Reader^Rob"
        ds.PresentationLUTShape = "IDENTITY"
        image = Dataset()
        image.ReferencedSOPClassUID = CT
        image.ReferencedSOPInstanceUID = new_uid()
        series = Dataset()
        series.SeriesInstanceUID = new_uid()
        series.ReferencedImageSequence = Sequence([image])
        ds.ReferencedSeriesSequence = Sequence([series])
        area = Dataset()
        area.DisplayedAreaTopLeftHandCorner = [1, 1]
        area.DisplayedAreaBottomRightHandCorner = [16, 16]
        area.PresentationSizeMode = "SCALE TO FIT"
        area.PresentationPixelSpacing = [0.5, 0.5]
        ds.DisplayedAreaSelectionSequence = Sequence([area])
        graphic = Dataset()
        graphic.GraphicAnnotationUnits = "PIXEL"
        graphic.GraphicDimensions = 2
        graphic.NumberOfGraphicPoints = 3
        graphic.GraphicData = [1.0, 1.0, 5.5, 6.25, 10.0, 2.0]
        graphic.GraphicType = "POLYLINE"
        graphic.GraphicFilled = "N"
        label = Dataset()
        label.UnformattedTextValue = "look here"
        label.AnchorPointAnnotationUnits = "PIXEL"
        label.AnchorPoint = [4.5, 5.25]
        label.AnchorPointVisibility = "Y"
        annotation = Dataset()
        annotation.GraphicLayer = "LAYER1"
        annotation.GraphicObjectSequence = Sequence([graphic])
        annotation.TextObjectSequence = Sequence([label])
        ds.GraphicAnnotationSequence = Sequence([annotation])
        layer = Dataset()
        layer.GraphicLayer = "LAYER1"
        layer.GraphicLayerOrder = 1
        ds.GraphicLayerSequence = Sequence([layer])
        voi = Dataset()
        voi.WindowCenter = "40"
        voi.WindowWidth = "400"
        ds.SoftcopyVOILUTSequence = Sequence([voi])
        return ds
    else:
        raise ValueError(kind)
    _set_pixels(ds, pixels, transfer_syntax)
    return ds


def write_part10(ds: Dataset, path: Path, transfer_syntax: str) -> Path:
    """``ds`` as a Part 10 file in ``transfer_syntax`` (the data set must already be in its
    byte order, see ``_set_pixels``)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_file(directory: Path, kind: str, ts_name: str, *, name: str | None = None,
              **kwargs) -> Path:
    ts = TS[ts_name]
    ds = make_dataset(kind, ts, **kwargs)
    return write_part10(ds, directory / (name or f"{kind}-{ts_name}.dcm"), ts)


ALL_KINDS = ("ct", "mr", "sc", "us", "sr", "gsps")


def make_files(directory: Path, ts_name: str, tag: str) -> list[Path]:
    """One file of each kind, each its own patient (``tag`` keeps tests apart)."""
    return [make_file(directory, kind, ts_name, patient_id=f"{tag}-{kind}")
            for kind in ALL_KINDS]


# --- comparing data sets ----------------------------------------------------------------------

#: VRs whose value pydicom keeps as raw bytes (in the byte order of the file).
_WORDS = {"OW": "u2", "OF": "f4", "OL": "u4", "OD": "f8", "OV": "u8"}


def _comparable(element, little: bool):
    """A value that compares equal across byte orders (raw words decoded to numbers)."""
    value = element.value
    if element.VR in _WORDS and isinstance(value, bytes):
        return np.frombuffer(value, ("<" if little else ">") + _WORDS[element.VR]).tolist()
    return value


def dataset_differences(sent: Dataset, stored: Dataset, *, same_syntax: bool = True,
                        sent_little: bool = True, stored_little: bool = True,
                        where: str = "") -> list[str]:
    """Element-by-element differences, group 0002 ignored.

    ``same_syntax``: the two were read in the same transfer syntax, so VRs and raw values
    must be identical. Otherwise (a conversion) VRs may differ where the dictionary is
    ambiguous, raw word values are compared as numbers, UN (private data in Implicit VR)
    is skipped, and Pixel Data is left to ``pixel_array``.
    """
    problems = []
    tags = sorted(set(sent.keys()) | set(stored.keys()))
    for tag in tags:
        if tag.group == 0x0002:
            continue
        name = f"{where}{tag} {pydicom.datadict.keyword_for_tag(tag) or 'private'}"
        a, b = sent.get(tag), stored.get(tag)
        if a is None or b is None:
            problems.append(f"{name}: only in the {'stored' if a is None else 'sent'} file")
            continue
        if same_syntax and a.VR != b.VR:
            problems.append(f"{name}: VR {a.VR} sent, {b.VR} stored")
            continue
        if a.VR == "SQ" or b.VR == "SQ":
            if len(a.value) != len(b.value):
                problems.append(f"{name}: {len(a.value)} items sent, {len(b.value)} stored")
                continue
            for i, (x, y) in enumerate(zip(a.value, b.value)):
                problems += dataset_differences(x, y, same_syntax=same_syntax,
                                                sent_little=sent_little,
                                                stored_little=stored_little,
                                                where=f"{name}[{i}] > ")
            continue
        if same_syntax:
            if a.value != b.value:
                problems.append(f"{name}: sent {a.value!r:.80}, stored {b.value!r:.80}")
            continue
        if tag == 0x7FE00010 or "UN" in (a.VR, b.VR):
            continue
        if _comparable(a, sent_little) != _comparable(b, stored_little):
            problems.append(f"{name}: sent {a.value!r:.80}, stored {b.value!r:.80}")
    return problems


def assert_same_data_set(sent_path: Path, stored_path: Path) -> None:
    sent = pydicom.dcmread(sent_path)
    stored = pydicom.dcmread(stored_path)
    problems = dataset_differences(sent, stored)
    assert not problems, f"{stored_path.name} differs from {sent_path.name}:\n" + \
        "\n".join(problems)


def assert_converted(sent_path: Path, stored_path: Path, stored_ts: str) -> None:
    """The stored file is the sent data set re-encoded in ``stored_ts``: same values, same
    pixels."""
    sent = pydicom.dcmread(sent_path)
    stored = pydicom.dcmread(stored_path)
    assert stored.file_meta.TransferSyntaxUID == stored_ts, stored_path
    problems = dataset_differences(
        sent, stored, same_syntax=False,
        sent_little=sent.file_meta.TransferSyntaxUID != EXPLICIT_VR_BIG_ENDIAN,
        stored_little=stored_ts != EXPLICIT_VR_BIG_ENDIAN)
    assert not problems, f"{stored_path.name} differs from {sent_path.name}:\n" + \
        "\n".join(problems)
    if "PixelData" in sent:
        assert np.array_equal(sent.pixel_array, stored.pixel_array), \
            f"pixel values of {stored_path} differ from {sent_path}"


# --- the archive on disk ----------------------------------------------------------------------

def index_rows(data_dir: Path, settle: float = 10.0) -> dict[str, dict]:
    """Every instance of the index with its patient, study and series attributes.

    The daemon indexes an object just after acknowledging it (the archive's
    two stages): wait, up to ``settle`` seconds, until every file under
    archive/ has its row.
    """
    deadline = time.monotonic() + settle
    while True:
        rows = _read_index_rows(data_dir)
        if (not archive_files(data_dir) - {row["path"] for row in rows.values()}
                or time.monotonic() > deadline):
            return rows
        time.sleep(0.02)


def _read_index_rows(data_dir: Path) -> dict[str, dict]:
    db = sqlite3.connect(f"file:{data_dir / 'index.sqlite'}?mode=ro", uri=True)
    try:
        cursor = db.execute(
            "SELECT i.SOPInstanceUID, i.SOPClassUID, i.InstanceNumber, i.transfer_syntax, "
            "i.calling_ae_title, i.path, i.size, i.crc32, x.SeriesInstanceUID, x.Modality, "
            "s.StudyInstanceUID, s.StudyDate, p.PatientName, p.PatientID "
            "FROM instances i LEFT JOIN series x USING (SeriesInstanceUID) "
            "LEFT JOIN studies s ON s.StudyInstanceUID = i.StudyInstanceUID "
            "LEFT JOIN patients p USING (patient_key)")
        names = [d[0] for d in cursor.description]
        return {row[0]: dict(zip(names, row)) for row in cursor}
    finally:
        db.close()


def archive_files(data_dir: Path) -> set[str]:
    """Paths (relative to the data dir) of every file under archive/."""
    root = data_dir / "archive"
    return {str(p.relative_to(data_dir)) for p in root.rglob("*") if p.is_file()}


def tmp_files(data_dir: Path) -> list[str]:
    # Empty *.spare files are temporary files the archive created ahead, not data.
    return sorted(name for name in os.listdir(data_dir / "tmp")
                  if not (name.endswith(".spare") and (data_dir / "tmp" / name).stat().st_size == 0))


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def assert_archive_consistent(data_dir: Path) -> dict[str, dict]:
    """No index row names a missing file, no file lacks a row, sizes and CRCs agree."""
    rows = index_rows(data_dir)
    files = archive_files(data_dir)
    indexed = {row["path"] for row in rows.values()}
    assert not indexed - files, f"index rows without a file: {sorted(indexed - files)}"
    assert not files - indexed, f"files without an index row: {sorted(files - indexed)}"
    for row in rows.values():
        path = data_dir / row["path"]
        assert path.stat().st_size == row["size"], (row["path"], "size")
        assert file_crc32(path) == row["crc32"], (row["path"], "crc32")
    return rows


def archive_path(data_dir: Path, ds: Dataset) -> Path:
    return (data_dir / "archive" / ds.StudyInstanceUID / ds.SeriesInstanceUID
            / f"{ds.SOPInstanceUID}.dcm")


def snapshot(data_dir: Path) -> tuple[set[str], dict[str, dict]]:
    return archive_files(data_dir), index_rows(data_dir)


# --- running the peers ------------------------------------------------------------------------

def storescu(node, paths, *args: str, aet: str = "MODALITY1",
             timeout: float = 60.0) -> subprocess.CompletedProcess:
    """DCMTK ``storescu -R ARGS -aet AET -aec AEC HOST PORT FILES`` (only the contexts the
    files need)."""
    return run(["storescu", "-R", *args, "-aet", aet, "-aec", node.ae_title, node.host,
                str(node.port), *map(str, paths)], timeout)


def dicomagent(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return run(dicomagent_cmd(*args), timeout)


def store(node, *args: str, aec: str | None = None, timeout: float = 60.0):
    """``dicomagent store HOST PORT ARGS... --aec AEC``."""
    return dicomagent("store", node.host, str(node.port), "--aec", aec or node.ae_title,
                      "--timeout", "20", *map(str, args), timeout=timeout)


def assert_echo(node) -> None:
    """The daemon still answers ``dicomagent echo``."""
    result = dicomagent("echo", node.host, str(node.port), "--aec", node.ae_title,
                        "--timeout", "5", timeout=20)
    assert result.returncode == 0, output(result) + node.log()[-3000:]


def start_storescp(workdir: Path, *options: str) -> RunningNode:
    """DCMTK ``storescp OPTIONS -aet STORESCP -od DIR PORT`` (for options the conftest
    fixture does not take)."""
    port = free_port()
    out_dir = workdir / "storescp-out"
    out_dir.mkdir(parents=True)
    log_path = workdir / "storescp.log"
    cmd = [require_binary("storescp"), *options, "-aet", "STORESCP", "-od", str(out_dir),
           str(port)]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, cwd=workdir,
                                   env={**os.environ, "TCP_NODELAY": "1"})
    node = RunningNode(HOST, port, "STORESCP", process, log_path, out_dir, None, cmd)
    wait_for_port(port, process, node.log, START_TIMEOUT)
    return node


def received_by_storescp(node: RunningNode) -> dict[str, Path]:
    """storescp's files, by SOP Instance UID."""
    found = {}
    for path in node.data_dir.rglob("*"):
        if path.is_file():
            found[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
    return found


def raw_c_store(node, sop_class: str, sop_instance: str, data: bytes, transfer_syntax: str,
                calling_ae_title: str = "RAWSCU"):
    """Send one C-STORE-RQ with ``data`` as its data set, as is; return the C-STORE-RSP."""

    async def main():
        association = await associate(node.host, node.port, calling_ae_title, node.ae_title,
                                      [ProposedContext(sop_class, (transfer_syntax,))],
                                      artim_timeout=10, dimse_timeout=30, network_timeout=10)
        try:
            context = association.context_for(sop_class)
            command = C_STORE_RQ(AffectedSOPClassUID=sop_class,
                                 MessageID=association.next_message_id(),
                                 AffectedSOPInstanceUID=sop_instance)
            association.send_message(context.context_id, command, data)
            response = await association.wait_response(command.MessageID)
            association.done_with(command.MessageID)
        finally:
            await association.release()
        return response.command

    return asyncio.run(main())


def c_store_in_two_halves(node, sop_class: str, sop_instance: str, data: bytes,
                          transfer_syntax: str, between):
    """A C-STORE whose data set stops half way until ``between()`` (run in a thread) returns;
    the rest follows, and the C-STORE-RSP is returned."""

    async def main():
        association = await associate(node.host, node.port, "HALVES", node.ae_title,
                                      [ProposedContext(sop_class, (transfer_syntax,))],
                                      artim_timeout=10, dimse_timeout=30, network_timeout=30)
        try:
            context_id = association.context_for(sop_class).context_id
            command = C_STORE_RQ(AffectedSOPClassUID=sop_class,
                                 MessageID=association.next_message_id(),
                                 AffectedSOPInstanceUID=sop_instance)
            connection = association.connection
            connection.send_message_part(context_id, True, encode_command(command))
            view, step, half = memoryview(data), connection.max_fragment_length, len(data) // 2
            for start in range(0, half, step):
                connection.send_pdv(context_id, 0, view[start:min(start + step, half)])
            association.ul.run()
            await association.ul.drain()
            await asyncio.to_thread(between)
            for start in range(half, len(data), step):
                end = min(start + step, len(data))
                connection.send_pdv(context_id, MCH_LAST if end == len(data) else 0,
                                    view[start:end])
            association.ul.run()
            response = await association.wait_response(command.MessageID)
            association.done_with(command.MessageID)
        finally:
            await association.release()
        return response.command

    return asyncio.run(main())


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def agent(module_agent_factory):
    """A daemon on its embedded defaults, shared by the tests that need nothing else."""
    return module_agent_factory()


@pytest.fixture(scope="module")
def replace_agent(module_agent_factory):
    """A daemon with on_duplicate = "replace"."""
    return module_agent_factory('[storage]\non_duplicate = "replace"\n')


@pytest.fixture(scope="module")
def mismatch_agent(module_agent_factory):
    """A daemon with accept_mismatch = true."""
    return module_agent_factory("[storage]\naccept_mismatch = true\n")


class BigFile:
    """The large object: its path, its data set (header only), and the offset, size and
    CRC-32 of its data set in the file."""

    def __init__(self, path: Path, ds: Dataset, data_offset: int, data_size: int,
                 data_crc32: int):
        self.path, self.ds = path, ds
        self.data_offset, self.data_size, self.data_crc32 = data_offset, data_size, data_crc32


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """A 300 MiB US multi-frame object (Explicit VR LE), written without holding it in memory:
    pydicom writes the header, the Pixel Data element is appended one 1 MiB frame at a time."""
    path = tmp_path_factory.mktemp("big") / "big.dcm"
    ds = make_dataset("us", EXPLICIT_VR_LITTLE_ENDIAN, patient_id="BIG-1",
                      patient_name="Large^Object")
    del ds.PixelData
    ds.Rows, ds.Columns, ds.NumberOfFrames = BIG_ROWS, BIG_COLUMNS, BIG_FRAMES
    write_part10(ds, path, EXPLICIT_VR_LITTLE_ENDIAN)
    with open(path, "rb") as handle:
        _, data_offset = read_file_meta(handle)
        crc = zlib.crc32(handle.read())
    frame = (np.arange(BIG_ROWS * BIG_COLUMNS, dtype=np.uint32) * 7 % 251).astype(np.uint8)
    length = BIG_ROWS * BIG_COLUMNS * BIG_FRAMES
    with open(path, "ab") as handle:
        header = struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OB", length)
        handle.write(header)
        crc = zlib.crc32(header, crc)
        for number in range(BIG_FRAMES):
            pixels = np.bitwise_xor(frame, number & 0xFF)
            handle.write(pixels.data)
            crc = zlib.crc32(pixels.data, crc)
    yield BigFile(path, ds, data_offset, path.stat().st_size - data_offset, crc)
    path.unlink()


def crc32_of_file_and_data_set(path: Path) -> tuple[int, int, int]:
    """One pass over a Part 10 file: CRC-32 of the whole file, size and CRC-32 of its data
    set."""
    with open(path, "rb") as handle:
        _, offset = read_file_meta(handle)
        handle.seek(0)
        whole = zlib.crc32(handle.read(offset))
        data = 0
        while chunk := handle.read(1 << 22):
            whole = zlib.crc32(chunk, whole)
            data = zlib.crc32(chunk, data)
    return whole, path.stat().st_size - offset, data


def vm_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def start_storescu(node, path: Path) -> subprocess.Popen:
    return subprocess.Popen([require_binary("storescu"), "-R", "-xe", "-aec", node.ae_title,
                             node.host, str(node.port), str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def receiving_sizes(node) -> list[int]:
    """Sizes of the files the daemon has open in tmp/: the data sets it is receiving (and
    empty spares). Unnamed files (O_TMPFILE) show only in /proc/PID/fd, as
    ".../tmp/#INODE (deleted)"; named ones end in .spare (fsync on) or .part."""
    fd_dir = f"/proc/{node.pid}/fd"
    tmp = str(node.data_dir / "tmp") + "/"
    sizes = []
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{fd}").startswith(tmp):
                sizes.append(os.stat(f"{fd_dir}/{fd}").st_size)
        except OSError:
            continue            # closed meanwhile
    return sizes


def wait_for_growing_data_set(node, sender: subprocess.Popen, timeout: float = 20.0) -> int:
    """The size of the data set being received once it is seen growing past 1 MiB."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sender.poll() is not None:
            raise AssertionError(f"the sender ended ({sender.returncode}) before a data set "
                                 f"was seen arriving:\n{sender.stdout.read()}")
        growing = [size for size in receiving_sizes(node) if size > 1 << 20]
        if growing:
            return max(growing)
        time.sleep(0.005)
    raise AssertionError(f"no data set seen arriving in {node.data_dir / 'tmp'} "
                         f"within {timeout:g} s")


def kill_9_while_sending(node, sender: subprocess.Popen, until):
    """``kill -9`` the daemon as soon as ``until()`` returns (while ``sender`` sends), let
    the sender end; returns what ``until()`` returned."""
    try:
        seen = until()
        os.kill(node.pid, signal.SIGKILL)
        node.process.wait(10)
        sender.communicate(timeout=30)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    return seen


# === 1. DCMTK storescu -> dicomagent serve ====================================================

@pytest.mark.parametrize("ts_name", ["implicit", "explicit", "big"])
def test_storescu_to_agent_each_transfer_syntax(agent, tmp_path, ts_name):
    """Six SOP classes of seed Table 2, made in one transfer syntax and proposed in it:
    stored as received, element by element, and indexed."""
    files = make_files(tmp_path, ts_name, f"S1-{ts_name}")
    result = storescu(agent, files, STORESCU_PROPOSE[ts_name], "-v", aet="MODALITY1")
    assert result.returncode == 0, output(result)
    assert output(result).count("Received Store Response (Success)") == len(files), \
        output(result)

    data_dir = agent.data_dir
    rows = index_rows(data_dir)
    problems = []
    for path in files:
        sent = pydicom.dcmread(path)
        stored_path = archive_path(data_dir, sent)
        if not stored_path.is_file():
            problems.append(f"{path.name}: not stored at {stored_path}")
            continue
        stored = pydicom.dcmread(stored_path)
        meta = stored.file_meta
        if meta.TransferSyntaxUID != TS[ts_name]:
            problems.append(f"{path.name}: stored with transfer syntax {meta.TransferSyntaxUID}")
        if meta.get("SourceApplicationEntityTitle", "").strip() != "MODALITY1":
            problems.append(f"{path.name}: Source AE Title "
                            f"{meta.get('SourceApplicationEntityTitle')!r}")
        if (meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID) != \
                (sent.SOPClassUID, sent.SOPInstanceUID):
            problems.append(f"{path.name}: File Meta names {meta.MediaStorageSOPClassUID} / "
                            f"{meta.MediaStorageSOPInstanceUID}")
        problems += [f"{path.name}: {p}" for p in dataset_differences(sent, stored)]
        row = rows.get(sent.SOPInstanceUID)
        if row is None:
            problems.append(f"{path.name}: no index row")
            continue
        expected = {
            "PatientName": str(sent.PatientName), "PatientID": sent.PatientID,
            "StudyDate": sent.StudyDate, "Modality": sent.Modality,
            "SOPClassUID": sent.SOPClassUID, "InstanceNumber": str(sent.InstanceNumber),
            "StudyInstanceUID": sent.StudyInstanceUID,
            "SeriesInstanceUID": sent.SeriesInstanceUID,
            "transfer_syntax": TS[ts_name], "calling_ae_title": "MODALITY1",
            "path": str(stored_path.relative_to(data_dir)),
            "size": stored_path.stat().st_size, "crc32": file_crc32(stored_path),
        }
        for key, value in expected.items():
            if row[key] != value:
                problems.append(f"{path.name}: index {key} = {row[key]!r}, expected {value!r}")
    assert not problems, "\n".join(problems)
    assert tmp_files(data_dir) == []


def test_storescu_non_ascii_names_in_index_and_ls(agent, tmp_path):
    """ISO_IR 100 and ISO_IR 192 Patient Names come out of the index (and ``ls --json``)
    as the text that was sent."""
    names = {"ct": ("Gómez^José", "ISO_IR 100"), "mr": ("山田^太郎=やまだ^たろう", "ISO_IR 192")}
    files = [make_file(tmp_path, kind, "explicit", patient_id=f"NAMES-{kind}",
                       patient_name=name) for kind, (name, _) in names.items()]
    for path, (name, charset) in zip(files, names.values()):
        ds = pydicom.dcmread(path)
        assert ds.SpecificCharacterSet == charset and str(ds.PatientName) == name
    result = storescu(agent, files, "-xe")
    assert result.returncode == 0, output(result)
    rows = {row["PatientID"]: row for row in index_rows(agent.data_dir).values()}
    for kind, (name, _) in names.items():
        assert rows[f"NAMES-{kind}"]["PatientName"] == name
    listed = dicomagent("ls", "--data-dir", str(agent.data_dir), "--json")
    assert listed.returncode == 0, output(listed)
    studies = {s["PatientID"]: s for s in json.loads(listed.stdout)}
    for kind, (name, _) in names.items():
        assert studies[f"NAMES-{kind}"]["PatientName"] == name
        assert studies[f"NAMES-{kind}"]["NumberOfStudyRelatedInstances"] == 1


# === 2. dicomagent store -> DCMTK storescp ====================================================

def test_store_folder_to_storescp(storescp, tmp_path):
    """A folder, recursively: each file goes in its own transfer syntax and arrives equal;
    a non-DICOM file is reported and skipped."""
    folder = tmp_path / "send"
    files = [
        make_file(folder, "ct", "explicit", patient_id="F-1"),
        make_file(folder / "a", "mr", "implicit", patient_id="F-2"),
        make_file(folder / "a" / "b", "sr", "big", patient_id="F-3"),
        make_file(folder / "a" / "b", "us", "big", patient_id="F-4"),
        make_file(folder / "c", "gsps", "implicit", patient_id="F-5"),
    ]
    notes = folder / "a" / "notes.txt"
    notes.write_text("not a DICOM file\n" * 20)
    result = store(storescp, folder, "--aet", "AGENTSCU", aec="STORESCP")
    assert result.returncode == 0, output(result) + storescp.log()
    assert result.stdout.strip() == \
        f"sent {len(files)}, warnings 0, failed 0, skipped 1 non-DICOM", output(result)
    assert f"skipped {notes}: not a DICOM Part 10 file" in result.stderr, result.stderr
    received = received_by_storescp(storescp)
    assert len(received) == len(files), (sorted(received), storescp.log())
    for path in files:
        sent = pydicom.dcmread(path)
        got = received[sent.SOPInstanceUID]
        assert pydicom.dcmread(got).file_meta.TransferSyntaxUID == \
            sent.file_meta.TransferSyntaxUID, path.name
        assert_same_data_set(path, got)


def test_store_big_endian_to_storescp_accepting_implicit_only(tmp_path):
    """``storescp +xi`` accepts Implicit VR Little Endian only: Big Endian files are
    converted on the way, pixel values unchanged (16-bit words swapped, 8-bit not)."""
    node = start_storescp(tmp_path / "scp", "+xi")
    try:
        files = [make_file(tmp_path / "send", "ct", "big", patient_id="BE-1"),
                 make_file(tmp_path / "send", "us", "big", patient_id="BE-2"),
                 make_file(tmp_path / "send", "mr", "big", patient_id="BE-3", private=False)]
        result = store(node, *files, aec="STORESCP")
        assert result.returncode == 0, output(result) + node.log()
        assert result.stdout.strip() == "sent 3, warnings 0, failed 0", output(result)
        received = received_by_storescp(node)
        for path in files:
            sent = pydicom.dcmread(path)
            assert_converted(path, received[sent.SOPInstanceUID], IMPLICIT_VR_LITTLE_ENDIAN)
    finally:
        status = node.terminate(10.0)
    assert status in (0, -signal.SIGTERM), node.log()


# === 3. dicomagent store -> dicomagent serve: conversion, duplicates ==========================

@pytest.mark.parametrize("target, sources", [
    ("implicit", ("big", "explicit")),
    ("big", ("implicit", "explicit")),
], ids=["to-implicit", "to-big"])
def test_store_with_ts_conversion_to_agent(agent, tmp_path, target, sources):
    """``--ts`` proposes one transfer syntax: every file is re-encoded in it, values and
    pixels unchanged, and stored in it."""
    files = []
    for ts_name in sources:
        for kind in ("ct", "us", "sc", "sr", "gsps"):
            files.append(make_file(tmp_path, kind, ts_name,
                                   patient_id=f"CONV-{target}-{ts_name}-{kind}"))
    files.append(make_file(tmp_path, "mr", sources[0], patient_id=f"CONV-{target}-mr",
                           private=False))
    result = store(agent, *files, "--ts", target, "--aet", "CONVERTER")
    assert result.returncode == 0, output(result)
    assert result.stdout.strip() == f"sent {len(files)}, warnings 0, failed 0"
    rows = index_rows(agent.data_dir)
    for path in files:
        sent = pydicom.dcmread(path, stop_before_pixels=True)
        stored = archive_path(agent.data_dir, sent)
        assert_converted(path, stored, TS[target])
        assert pydicom.dcmread(stored, stop_before_pixels=True).file_meta \
            .SourceApplicationEntityTitle.strip() == "CONVERTER"
        assert rows[sent.SOPInstanceUID]["transfer_syntax"] == TS[target]


def _two_versions(tmp_path: Path, tag: str, other_series: bool = False):
    """Two files with one SOP Instance UID: different Patient Name and pixels (and, with
    ``other_series``, another series of the same study)."""
    study, series, sop = new_uid(), new_uid(), new_uid()
    first = make_file(tmp_path / "v1", "ct", "explicit", patient_id=tag, study_uid=study,
                      series_uid=series, sop_uid=sop, patient_name="First^Version")
    ds = pydicom.dcmread(first)
    ds.PatientName = "Second^Version"
    ds.PixelData = (ds.pixel_array + 1).astype("<i2").tobytes()
    if other_series:
        ds.SeriesInstanceUID = new_uid()
        ds.SeriesNumber = 4
    second = tmp_path / "v2" / "ct.dcm"
    second.parent.mkdir()
    ds.save_as(second, enforce_file_format=True)
    return first, second


@pytest.mark.parametrize("fsync", ["true", "false"])
def test_duplicate_kept(agent_factory, tmp_path, fsync):
    """on_duplicate = "keep" (default): the second copy is answered with success but not
    stored; one index row, the first copy untouched (with fsync on the received file is
    a named one in tmp/, with fsync off an unnamed one: both are refused their link)."""
    agent = agent_factory(f"[storage]\nfsync = {fsync}\n")
    first, second = _two_versions(tmp_path, "DUP-KEEP")
    files_before = archive_files(agent.data_dir)
    result = store(agent, first, second)         # in this order, on one association
    assert result.returncode == 0, output(result)
    assert result.stdout.strip() == "sent 2, warnings 0, failed 0"
    ds = pydicom.dcmread(first)
    stored = archive_path(agent.data_dir, ds)
    assert_same_data_set(first, stored)
    assert archive_files(agent.data_dir) - files_before == \
        {str(stored.relative_to(agent.data_dir))}
    assert tmp_files(agent.data_dir) == []
    rows = [r for r in index_rows(agent.data_dir).values() if r["PatientID"] == "DUP-KEEP"]
    assert len(rows) == 1 and rows[0]["PatientName"] == "First^Version"
    assert rows[0]["crc32"] == file_crc32(stored)


def test_duplicate_replaced(replace_agent, tmp_path):
    """on_duplicate = "replace": the second copy takes the first one's place and row."""
    node = replace_agent
    first, second = _two_versions(tmp_path, "DUP-REPLACE")
    result = store(node, first, second)
    assert result.returncode == 0, output(result)
    assert result.stdout.strip() == "sent 2, warnings 0, failed 0"
    ds = pydicom.dcmread(second)
    assert_same_data_set(second, archive_path(node.data_dir, ds))
    rows = assert_archive_consistent(node.data_dir)
    assert [r["PatientName"] for r in rows.values() if r["PatientID"] == "DUP-REPLACE"] == \
        ["Second^Version"]
    assert tmp_files(node.data_dir) == []


def test_duplicate_replaced_in_another_series_leaves_no_empty_series(replace_agent, tmp_path):
    """The replacing copy belongs to another series: the old file goes, and the index keeps
    no series without instances (as if only the second copy had been stored)."""
    node = replace_agent
    first, second = _two_versions(tmp_path, "DUP-MOVE", other_series=True)
    result = store(node, first, second)
    assert result.returncode == 0, output(result)
    old = archive_path(node.data_dir, pydicom.dcmread(first))
    new = archive_path(node.data_dir, pydicom.dcmread(second))
    assert new.is_file() and not old.exists()
    assert_archive_consistent(node.data_dir)
    db = sqlite3.connect(f"file:{node.data_dir / 'index.sqlite'}?mode=ro", uri=True)
    try:
        empty = db.execute("SELECT SeriesInstanceUID FROM series x WHERE NOT EXISTS (SELECT 1 "
                           "FROM instances i WHERE i.SeriesInstanceUID = x.SeriesInstanceUID)"
                           ).fetchall()
    finally:
        db.close()
    assert empty == [], f"series left without instances: {empty}"


# === 4. a 300 MiB object ======================================================================

def test_large_object_streams_to_disk(agent_factory, big_file):
    """storescu sends 300 MiB of pixel data: the daemon's peak RSS stays bounded, and the
    stored file is the sent data set, with the size and CRC-32 the index says."""
    node = agent_factory()
    at_start = vm_kb(node.pid, "VmHWM")
    result = storescu(node, [big_file.path], "-xe", timeout=120)
    assert result.returncode == 0, output(result) + node.log()[-3000:]
    peak = vm_kb(node.pid, "VmHWM")
    stored = archive_path(node.data_dir, big_file.ds)
    try:
        assert peak < RSS_BOUND_KB, f"peak RSS {peak} kB (at start {at_start} kB)"
        row = index_rows(node.data_dir)[big_file.ds.SOPInstanceUID]
        whole_crc, data_size, data_crc = crc32_of_file_and_data_set(stored)
        assert (row["size"], row["crc32"]) == (stored.stat().st_size, whole_crc)
        assert (data_size, data_crc) == (big_file.data_size, big_file.data_crc32)
        assert tmp_files(node.data_dir) == []
    finally:
        stored.unlink(missing_ok=True)


def test_four_senders_at_once(agent, tmp_path):
    """Four storescu processes at once, 60 objects each (fsync on, the default): with more
    than one association open the flushes go to the filer threads. Every object is
    acknowledged, filed and indexed once each sender's association is released."""
    senders = []
    expected = set()
    for sender in range(4):
        folder = tmp_path / f"sender{sender}"
        folder.mkdir()
        ds = make_dataset("sc", EXPLICIT_VR_LITTLE_ENDIAN, patient_id=f"AT-ONCE-{sender}")
        for number in range(60):
            ds.SOPInstanceUID = new_uid()
            ds.InstanceNumber = number + 1
            write_part10(ds, folder / f"{number:02d}.dcm", EXPLICIT_VR_LITTLE_ENDIAN)
            expected.add(ds.SOPInstanceUID)
        senders.append(subprocess.Popen(
            ["storescu", "-R", "-xe", "+sd", "-aet", f"SENDER{sender}", "-aec",
             agent.ae_title, agent.host, str(agent.port), str(folder)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for sender in senders:
        out, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0, out
    rows = _read_index_rows(agent.data_dir)       # no waiting: released means indexed
    assert expected <= set(rows)
    assert_archive_consistent(agent.data_dir)


# === 5. durability: kill -9, restart, recovery ================================================

def test_kill_9_while_receiving_then_restart(agent_factory, tmp_path, big_file):
    """Acknowledged objects survive ``kill -9`` in the middle of a large C-STORE; the restart
    empties tmp/ and leaves index and files in agreement."""
    node = agent_factory()
    small = [make_file(tmp_path, kind, "explicit", patient_id=f"KILL-{kind}")
             for kind in ("ct", "mr", "sr")]
    result = storescu(node, small, "-xe")
    assert result.returncode == 0, output(result)
    assert tmp_files(node.data_dir) == []

    sender = start_storescu(node, big_file.path)
    seen = kill_9_while_sending(node, sender, lambda: wait_for_growing_data_set(node, sender))
    assert sender.returncode != 0
    # The daemon died in the middle of the data set, not after it.
    assert seen < big_file.path.stat().st_size

    restarted = agent_factory(data_dir=node.data_dir)
    assert tmp_files(node.data_dir) == []
    rows = assert_archive_consistent(node.data_dir)
    assert len(rows) == len(small)
    for path in small:
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID in rows, path.name
        assert_same_data_set(path, archive_path(node.data_dir, ds))
    assert not archive_path(node.data_dir, big_file.ds).exists()
    # And it goes on storing.
    another = make_file(tmp_path, "sc", "explicit", patient_id="KILL-after")
    result = storescu(restarted, [another], "-xe")
    assert result.returncode == 0, output(result)
    assert_same_data_set(another, archive_path(node.data_dir, pydicom.dcmread(another)))
    assert_archive_consistent(node.data_dir)


def test_restart_indexes_what_a_crash_left_unindexed(agent_factory, tmp_path):
    """A crash between filing and indexing (the archive's two stages) leaves acknowledged
    files with no index row, and ``index.pending`` behind: the next start indexes them.
    A clean stop removes ``index.pending``, so a start after it reads nothing."""
    node = agent_factory()
    assert (node.data_dir / "index.pending").exists(), "a running daemon keeps the marker"
    files = [make_file(tmp_path, kind, "explicit", patient_id=f"CRASH-INDEX-{kind}")
             for kind in ("ct", "mr", "sr")]
    assert storescu(node, files, "-xe").returncode == 0
    before = assert_archive_consistent(node.data_dir)
    assert node.terminate() == 0
    assert not (node.data_dir / "index.pending").exists(), "a clean stop removes the marker"
    # The state a crash right after the C-STORE-RSPs leaves: files filed, rows not written.
    db = sqlite3.connect(node.data_dir / "index.sqlite")
    db.execute("DELETE FROM instances")
    db.commit()
    db.close()
    (node.data_dir / "index.pending").touch()
    restarted = agent_factory(data_dir=node.data_dir)
    rows = assert_archive_consistent(node.data_dir)
    assert set(rows) == set(before)
    for uid, row in before.items():
        assert rows[uid] == row, uid
    assert "indexed 3 object(s) filed before the last stop" in restarted.log()
    assert restarted.terminate() == 0


def test_kill_9_in_the_middle_of_a_burst_loses_nothing_acknowledged(agent_factory, tmp_path):
    """``kill -9`` while a sender streams small objects, when half of them are filed: the
    index trails the files it has not read yet; the next start indexes them. Every filed
    object (and so every acknowledged one) ends up in the index; files and index agree."""
    node = agent_factory()
    folder = tmp_path / "burst"
    folder.mkdir()
    ds = make_dataset("sc", EXPLICIT_VR_LITTLE_ENDIAN, patient_id="BURST")
    for number in range(600):
        ds.SOPInstanceUID = new_uid()
        ds.InstanceNumber = number + 1
        write_part10(ds, folder / f"{number:03d}.dcm", EXPLICIT_VR_LITTLE_ENDIAN)
    sender = subprocess.Popen(["storescu", "-R", "-xe", "+sd", "-aet", "BURST", "-aec",
                               node.ae_title, node.host, str(node.port), str(folder)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def half_filed():
        deadline = time.monotonic() + 60
        while len(archive_files(node.data_dir)) < 300:
            assert sender.poll() is None, "the sender ended before half was filed"
            assert time.monotonic() < deadline, "half of the burst never arrived"
            time.sleep(0.002)

    kill_9_while_sending(node, sender, half_filed)
    filed = archive_files(node.data_dir)
    assert 300 <= len(filed) < 600
    agent_factory(data_dir=node.data_dir)
    rows = assert_archive_consistent(node.data_dir)
    assert {row["path"] for row in rows.values()} == filed
    assert tmp_files(node.data_dir) == []


def _children(pid: int) -> list[int]:
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            children += [int(child) for child in handle.read().split()]
    return children


def test_indexer_killed_storage_goes_on_and_a_restart_catches_up(agent_factory, tmp_path):
    """The indexer process dies (here: SIGKILL): the daemon says so once, goes on storing
    and answering (a C-FIND must not wait for the dead indexer), keeps ``index.pending``
    at its stop, and the next start indexes what was stored meanwhile."""
    node = agent_factory()
    before = [make_file(tmp_path / "a", kind, "explicit", patient_id=f"IDX-DIES-{kind}")
              for kind in ("ct", "mr")]
    assert storescu(node, before, "-xe").returncode == 0
    assert len(index_rows(node.data_dir)) == 2
    indexers = _children(node.pid)
    assert indexers, "no indexer process"
    for child in indexers:
        os.kill(child, signal.SIGKILL)
    after = [make_file(tmp_path / "b", kind, "explicit", patient_id=f"IDX-DIES-{kind}")
             for kind in ("sr", "sc", "us")]
    result = storescu(node, after, "-xe")
    assert result.returncode == 0, output(result)
    found = run(["findscu", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
                 "-aec", node.ae_title, node.host, str(node.port)], 30)
    assert found.returncode == 0, output(found)
    assert "the indexer process stopped" in node.log()
    assert node.terminate() == 0
    assert (node.data_dir / "index.pending").exists()
    restarted = agent_factory(data_dir=node.data_dir)
    rows = assert_archive_consistent(node.data_dir)
    assert len(rows) == 5
    assert "indexed 3 object(s) filed before the last stop" in restarted.log()


def test_release_waits_until_what_was_stored_is_indexed(agent, tmp_path):
    """The A-RELEASE-RP of an association that stored objects waits until the index lists
    them: the moment storescu has exited, a reader of the index finds every one (no
    settling time), for a burst and for a single object."""
    for count in (40, 1):
        files = [make_file(tmp_path / f"burst{count}", "ct", "explicit", name=f"{n}.dcm",
                           patient_id=f"RELEASED-{count}", number=n) for n in range(count)]
        sop_uids = {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
                    for path in files}
        result = storescu(agent, files, "-xe")
        assert result.returncode == 0, output(result)
        listed = set(_read_index_rows(agent.data_dir))
        assert sop_uids <= listed, f"{len(sop_uids - listed)} of {count} not yet indexed"


def test_far_behind_index_answers_for_each_object(tmp_path, monkeypatch):
    """Back-pressure: an object filed more than ``MAX_BACKLOG`` objects ahead of the index
    gets its result from the indexer process once indexed (here MAX_BACKLOG is 0: every
    object), with what the index did: a second copy in another series, ``keep``, is
    reported as the duplicate it is, under the first copy's path, and its file removed."""
    import concurrent.futures

    import dicomagent.archive as archive_module
    monkeypatch.setattr(archive_module, "MAX_BACKLOG", 0)
    archive = archive_module.Archive(
        tmp_path / "data", archive_module.StorageSettings(fsync=False, min_free_mb=1),
        index_in_process=True)
    try:
        first, data = _encoded("ct", "explicit", patient_id="BACKLOG")
        second, again = _encoded("ct", "explicit", patient_id="BACKLOG",
                                 sop_uid=first.SOPInstanceUID)
        outcomes = []
        for ds, encoded in ((first, data), (second, again)):
            incoming = archive.open_incoming(CT, ds.SOPInstanceUID, EXPLICIT_VR_LITTLE_ENDIAN,
                                             "BACKLOG")
            incoming.write(encoded)
            outcome = archive.receive(incoming.finish())
            assert isinstance(outcome, concurrent.futures.Future), outcome
            outcomes.append(outcome.result(timeout=60))
        first_path = archive_path(tmp_path / "data", first).relative_to(tmp_path / "data")
        assert outcomes[0].status == SUCCESS and not outcomes[0].duplicate, outcomes[0]
        assert outcomes[0].path == str(first_path)
        assert outcomes[1].status == SUCCESS and outcomes[1].duplicate, outcomes[1]
        assert outcomes[1].path == str(first_path)
        assert "first copy kept" in outcomes[1].comment
        assert not archive_path(tmp_path / "data", second).exists()
    finally:
        archive.close()
    assert list(index_rows(tmp_path / "data")) == [first.SOPInstanceUID]


def _store_in_process(archive, datasets: list[tuple[Dataset, bytes]]) -> list:
    """C-STORE data sets straight into an in-process ``Archive`` (this thread is the
    event loop); their results."""
    import concurrent.futures

    results = []
    for ds, encoded in datasets:
        incoming = archive.open_incoming(ds.SOPClassUID, ds.SOPInstanceUID,
                                         EXPLICIT_VR_LITTLE_ENDIAN, "INPROCESS")
        incoming.write(encoded)
        outcome = archive.receive(incoming.finish(), alone=True)
        if isinstance(outcome, concurrent.futures.Future):
            outcome = outcome.result(timeout=60)
        results.append(outcome)
    return results


def _wait_for_spares(archive, count: int) -> None:
    """Until the archive's worker has made ``count`` temporary files ahead."""
    deadline = time.monotonic() + 10
    while len(archive._spares) < count:
        assert time.monotonic() < deadline, "the worker made no spare files"
        time.sleep(0.01)


def _one_series(count: int, patient_id: str) -> list[tuple[Dataset, bytes]]:
    study, series = new_uid(), new_uid()
    return [_encoded("ct", "explicit", patient_id=patient_id, study_uid=study,
                     series_uid=series, number=n) for n in range(1, count + 1)]


def test_fsync_off_index_rows_keep_each_files_size_and_crc32(tmp_path):
    """With fsync off no file is sealed, so the indexer process reads each filed object
    whole for its size and CRC-32 (``indexer.file_facts``): a data set shorter than the
    head it reads first, and one of 2 MiB, read on in chunks. Each row must agree with its
    file, byte for byte."""
    import dicomagent.archive as archive_module

    small = _encoded("ct", "explicit", patient_id="FACTS", number=1)
    large_ds = make_dataset("ct", EXPLICIT_VR_LITTLE_ENDIAN, patient_id="FACTS",
                            study_uid=small[0].StudyInstanceUID,
                            series_uid=small[0].SeriesInstanceUID, number=2)
    large_ds.Rows = large_ds.Columns = 1024
    large_ds.PixelData = np.arange(1024 * 1024, dtype="<u2").tobytes()
    large = (large_ds, encode(large_ds, EXPLICIT_VR_LITTLE_ENDIAN))
    assert len(small[1]) < 64 * 1024 < (1 << 21) < len(large[1])
    archive = archive_module.Archive(
        tmp_path / "data", archive_module.StorageSettings(fsync=False, min_free_mb=1))
    try:
        assert [r.status for r in _store_in_process(archive, [small, large])] == [SUCCESS] * 2
    finally:
        archive.close()
    rows = assert_archive_consistent(tmp_path / "data")
    assert sorted(row["size"] for row in rows.values()) == sorted(
        archive_path(tmp_path / "data", ds).stat().st_size for ds, _ in (small, large))


def test_fsync_on_flushes_each_object_once_and_its_directories_in_batches(tmp_path,
                                                                         monkeypatch):
    """With fsync on, the response waits for one flush per object: the data set, its
    size and its seal (size and CRC-32) together, written into a file whose name in
    tmp/ was flushed before it was handed out. The archive directories are flushed by
    the worker, for many objects at once, before those names in tmp/ are dropped."""
    import stat
    import threading

    import dicomagent.archive as archive_module
    from dicomagent.archive.incoming import SEAL, can_seal, is_sealed_intact

    flushes: list[tuple[str, str, str]] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def recording(call, real):
        def flush(fd):
            kind = "directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
            flushes.append((threading.current_thread().name, call, kind))
            return real(fd)
        return flush

    monkeypatch.setattr(os, "fsync", recording("fsync", real_fsync))
    monkeypatch.setattr(os, "fdatasync", recording("fdatasync", real_fdatasync))
    data_dir = tmp_path / "data"
    # The seal is an extended attribute: ext4 (this project's CI) takes them.
    assert can_seal(str(tmp_path)), "this file system takes no extended attributes"
    archive = archive_module.Archive(
        data_dir, archive_module.StorageSettings(fsync=True, min_free_mb=1), spares=64)
    datasets = _one_series(12, "ONE-FLUSH")
    try:
        _wait_for_spares(archive, 64)
        receiving = threading.current_thread().name
        del flushes[:]
        results = _store_in_process(archive, datasets)
        on_the_way = [entry for entry in flushes if entry[0] == receiving]
        assert [r.status for r in results] == [SUCCESS] * 12
        assert on_the_way == [(receiving, "fsync", "file")] * 12, on_the_way
        for ds, _ in datasets:
            path = archive_path(data_dir, ds)
            assert is_sealed_intact(str(path)), path
            assert struct.unpack("<QI", os.getxattr(path, SEAL)) == (
                path.stat().st_size, file_crc32(path))
        archive.caught_up().result(timeout=60)
        by_worker = [entry for entry in flushes if entry[0] == "archive"]
        assert by_worker and all(kind == "directory" for _, _, kind in by_worker), by_worker
        assert len(by_worker) < 12, "directories flushed once per object, not per batch"
        assert tmp_files(data_dir) == [], "names in tmp/ kept after their directory's flush"
    finally:
        archive.close()
    rows = assert_archive_consistent(data_dir)
    assert set(rows) == {ds.SOPInstanceUID for ds, _ in datasets}


def test_restart_files_a_sealed_object_whose_archive_name_was_lost(tmp_path, monkeypatch,
                                                                    caplog):
    """A power cut after the response and before the worker flushed the archive
    directory can lose an object's name in the archive, not the object: its sealed
    file is still named in tmp/, and the next start links it back and indexes it. A
    file in tmp/ whose bytes do not match its seal (torn by the cut) and an unsealed
    one (never acknowledged) are removed, not filed."""
    import shutil

    import dicomagent.archive as archive_module

    data_dir = tmp_path / "data"
    settings = archive_module.StorageSettings(fsync=True, min_free_mb=1)
    with monkeypatch.context() as patch:
        # The worker never gets to settle: every name stays in tmp/.
        patch.setattr(archive_module.Archive, "_settle_filed",
                      lambda self, flush_tmp=False: None)
        archive = archive_module.Archive(data_dir, settings, spares=8)
        _wait_for_spares(archive, 8)
        datasets = _one_series(3, "SEALED")
        assert [r.status for r in _store_in_process(archive, datasets)] == [SUCCESS] * 3
        archive.close()
    sealed = sorted(tmp_files(data_dir))
    assert len(sealed) == 3, sealed
    (lost, _), (torn, _), (kept, _) = datasets
    # What the cut left: the first object's archive name gone, the second object's
    # name gone and its file in tmp/ torn, a partial unsealed data set.
    os.unlink(archive_path(data_dir, lost))
    os.unlink(archive_path(data_dir, torn))
    lost_bytes = None
    for name in sealed:
        path = data_dir / "tmp" / name
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        if uid == lost.SOPInstanceUID:
            lost_bytes = path.read_bytes()
        elif uid == torn.SOPInstanceUID:
            content = bytearray(path.read_bytes())
            content[-10] ^= 0xFF
            with open(path, "r+b") as handle:     # the same file, its seal kept
                handle.write(content)
    shutil.copyfile(data_dir / "tmp" / sealed[0], data_dir / "tmp" / "partial.spare")
    db = sqlite3.connect(data_dir / "index.sqlite")
    # Neither was indexed yet (a torn file was never answered, so never indexed either).
    db.executemany("DELETE FROM instances WHERE SOPInstanceUID = ?",
                   [(lost.SOPInstanceUID,), (torn.SOPInstanceUID,)])
    db.commit()
    db.close()
    (data_dir / "index.pending").touch()
    caplog.set_level("INFO", logger="dicomagent.archive")
    archive = archive_module.Archive(data_dir, settings)
    archive.close()
    assert archive_path(data_dir, lost).read_bytes() == lost_bytes
    assert not archive_path(data_dir, torn).exists(), "a torn file was filed"
    assert archive_path(data_dir, kept).is_file()
    assert tmp_files(data_dir) == []
    rows = assert_archive_consistent(data_dir)
    assert set(rows) == {lost.SOPInstanceUID, kept.SOPInstanceUID}
    assert "flushed before the last stop, its name in the archive was not" in caplog.text
    assert "partial.spare (incomplete when the agent stopped)" in caplog.text


def test_deleted_object_does_not_come_back_from_tmp(tmp_path):
    """An object deleted (retention) just after it was stored must stay deleted after a
    crash: its name in tmp/ (one-flush filing keeps it until the archive directory is
    flushed) is dropped, and that drop flushed, before the deletion runs."""
    import dicomagent.archive as archive_module

    data_dir = tmp_path / "data"
    settings = archive_module.StorageSettings(fsync=True, min_free_mb=1)
    archive = archive_module.Archive(data_dir, settings, spares=8)
    _wait_for_spares(archive, 8)
    (ds, encoded), (kept, kept_encoded) = _one_series(2, "DELETED")
    assert [r.status for r in _store_in_process(archive, [(ds, encoded)])] == [SUCCESS]
    assert archive.call(lambda a: a.delete(ds.SOPInstanceUID)).result(timeout=60)
    assert [r.status for r in _store_in_process(archive, [(kept, kept_encoded)])] == [SUCCESS]
    # A crash now: the worker stops without settling what was filed last.
    archive._settle_filed = lambda flush_tmp=False: None
    archive.close()
    (data_dir / "index.pending").touch()
    archive = archive_module.Archive(data_dir, settings)
    archive.close()
    assert not archive_path(data_dir, ds).exists(), "a deleted object came back from tmp/"
    assert archive_path(data_dir, kept).is_file()
    assert set(assert_archive_consistent(data_dir)) == {kept.SOPInstanceUID}


def test_spare_files_are_kept_for_the_next_start(tmp_path):
    """With fsync on, the empty temporary files made ahead (named, in tmp/) and not used
    stay there at a stop and are the next start's spares (ext4 without a journal makes
    creating files slow for minutes after many were freed); a data set is received
    into one of them."""
    import dicomagent.archive as archive_module

    data_dir = tmp_path / "data"
    settings = archive_module.StorageSettings(fsync=True, min_free_mb=1)

    def spares() -> dict[str, int]:
        return {entry.name: entry.inode() for entry in os.scandir(data_dir / "tmp")
                if entry.name.endswith(".spare") and entry.stat().st_size == 0}

    archive = archive_module.Archive(data_dir, settings, spares=8)
    _wait_for_spares(archive, 8)
    archive.close()
    made = spares()
    assert len(made) == 8, made
    archive = archive_module.Archive(data_dir, settings, spares=8)
    try:
        _wait_for_spares(archive, 8)
        assert spares() == made, "the spares left by the last stop were not taken"
        (ds, encoded), = _one_series(1, "KEPT-SPARES")
        assert [r.status for r in _store_in_process(archive, [(ds, encoded)])] == [SUCCESS]
        assert archive_path(data_dir, ds).stat().st_ino in made.values()
    finally:
        archive.close()
    assert_archive_consistent(data_dir)


def test_spares_taken_are_replaced_by_the_receiving_side(tmp_path, monkeypatch):
    """With fsync off, each spare file taken is replaced by ``make_spare`` (which the
    C-STORE handler calls on the event loop after its response): unnamed, at most two
    at a time, never beyond the number wanted. With fsync on, spares are named in tmp/
    and the worker replaces them, flushing tmp/ before it hands them out."""
    import stat
    import threading

    import dicomagent.archive as archive_module

    archive = archive_module.Archive(
        tmp_path / "off", archive_module.StorageSettings(fsync=False, min_free_mb=1), spares=4)
    try:
        _wait_for_spares(archive, 4)
        assert [r.status for r in _store_in_process(archive, _one_series(3, "SPARE-OFF"))] \
            == [SUCCESS] * 3
        assert len(archive._spares) == 1
        archive.make_spare()
        assert len(archive._spares) == 3
        archive.make_spare()
        archive.make_spare()
        assert len(archive._spares) == 4
        assert [named for _, _, named in archive._spares] == [False] * 4
    finally:
        archive.close()

    flushed_tmp: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode) and os.path.samefile(
                f"/proc/self/fd/{fd}", tmp_path / "on" / "tmp"):
            flushed_tmp.append(threading.current_thread().name)
        return real_fsync(fd)

    archive = archive_module.Archive(
        tmp_path / "on", archive_module.StorageSettings(fsync=True, min_free_mb=1), spares=4)
    try:
        _wait_for_spares(archive, 4)
        before = {path for path, _, _ in archive._spares}
        monkeypatch.setattr(os, "fsync", fsync)
        made_by: list[str] = []
        real_create = archive_module.create_temporary

        def create(*args, **kwargs):
            made_by.append(threading.current_thread().name)
            return real_create(*args, **kwargs)

        monkeypatch.setattr(archive_module, "create_temporary", create)
        assert [r.status for r in _store_in_process(archive, _one_series(2, "SPARE-ON"))] \
            == [SUCCESS] * 2
        archive.make_spare()            # not the event loop's to make
        archive.caught_up().result(timeout=60)
        _wait_for_spares(archive, 4)
        new = [(path, named) for path, _, named in archive._spares if path not in before]
        assert len(new) == 2 and all(named and os.path.dirname(path) == str(
            tmp_path / "on" / "tmp") for path, named in new), new
        assert "archive" in flushed_tmp, "named spares handed out without a flush of tmp/"
        assert set(made_by) == {"archive"}, made_by
    finally:
        archive.close()


@pytest.mark.parametrize("fsync", [False, True], ids=["fsync-off", "fsync-on"])
def test_indexer_process_makes_the_spares_the_event_loop_takes(tmp_path, fsync):
    """In the daemon (index in a process), the indexer process replaces the spares
    taken, after each index batch: files open for writing (and not inherited by
    programs the daemon runs), sent to the daemon — unnamed with fsync off, named in
    tmp/ with fsync on (one-flush filing); the event loop's ``make_spare`` then makes
    none, and objects written into the process's files are filed whole."""
    import stat

    import dicomagent.archive as archive_module

    data_dir = tmp_path / "data"
    archive = archive_module.Archive(
        data_dir, archive_module.StorageSettings(fsync=fsync, min_free_mb=1),
        index_in_process=True, spares=8)
    try:
        _wait_for_spares(archive, 8)
        first = _one_series(6, "SPARE-PROCESS")
        assert [r.status for r in _store_in_process(archive, first)] == [SUCCESS] * 6
        assert len(archive._spares) == 2
        left = {os.fstat(fd).st_ino for _, fd, _ in archive._spares}
        archive.caught_up().result(timeout=60)     # an index batch, then the request
        _wait_for_spares(archive, 8)
        from_process = [(path, fd, named) for path, fd, named in archive._spares
                        if os.fstat(fd).st_ino not in left]
        assert len(from_process) == 6
        assert archive._indexer.makes_spares
        taken = archive._spares.pop()           # as open_incoming would
        archive.make_spare()
        assert len(archive._spares) == 7, "the event loop made a spare"
        os.close(taken[1])
        from_process.remove(taken)
        for path, fd, named in from_process:
            status = os.fstat(fd)
            if fsync:
                assert named and os.path.dirname(path) == str(data_dir / "tmp")
                assert os.stat(path).st_ino == status.st_ino and status.st_nlink == 1
            else:
                assert not named and path == f"/proc/self/fd/{fd}" and status.st_nlink == 0
            assert stat.S_ISREG(status.st_mode) and status.st_size == 0
            assert os.stat(data_dir / "tmp").st_dev == status.st_dev
            assert not os.get_inheritable(fd)
        second = _one_series(7, "SPARE-PROCESS")
        assert [r.status for r in _store_in_process(archive, second)] == [SUCCESS] * 7
    finally:
        archive.close()
    for ds, encoded in first + second:
        stored = archive_path(data_dir, ds).read_bytes()
        assert stored.endswith(encoded) and pydicom.dcmread(
            archive_path(data_dir, ds)).SOPInstanceUID == ds.SOPInstanceUID
    assert sorted(index_rows(data_dir)) == sorted(ds.SOPInstanceUID for ds, _ in first + second)
    assert tmp_files(data_dir) == []


@pytest.fixture
def spares_socket():
    """The two ends of a spares socket: the daemon's, the indexer process's."""
    import socket

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield ours, theirs
    ours.close()
    theirs.close()


@pytest.mark.parametrize("count, parts", [(3, 1), (64, 1), (65, 2), (130, 3)])
def test_indexer_process_sends_spares_in_parts(tmp_path, spares_socket, count, parts):
    """``_send_spares``: at most ``SPARES_PER_MESSAGE`` files to a message, each part but
    the last saying more follow; what ``_receive_spares`` gets is ``count`` distinct
    empty unnamed files, not inherited by programs the daemon runs."""
    from dicomagent.archive.indexer import (LAST_SPARES, MORE_SPARES, _receive_spares,
                                            _send_spares)

    ours, theirs = spares_socket
    received, tags = [], []
    try:
        _send_spares(theirs, str(tmp_path), count)
        while not tags or tags[-1] != LAST_SPARES:
            tag, fds, names = _receive_spares(ours)
            assert names == [""] * len(fds)
            tags.append(tag)
            received += fds
        assert tags == [MORE_SPARES] * (parts - 1) + [LAST_SPARES]
        assert len(received) == count
        assert len({os.fstat(fd).st_ino for fd in received}) == count
        assert all(os.fstat(fd).st_nlink == 0 for fd in received)
        assert not any(os.get_inheritable(fd) for fd in received)
        assert list(tmp_path.iterdir()) == []
    finally:
        for fd in received:
            os.close(fd)


def test_indexer_process_flushes_named_spares_before_sending_them(tmp_path, monkeypatch,
                                                                 spares_socket):
    """One-flush filing (fsync on) wants named spares whose names are on stable storage
    before a data set goes in: ``_send_spares`` flushes ``tmp/`` once, then sends each
    file open with its name."""
    import socket
    import stat

    from dicomagent.archive.indexer import LAST_SPARES, _receive_spares, _send_spares

    events: list[str] = []
    real_fsync, real_send_fds = os.fsync, socket.send_fds

    def fsync(fd):
        events.append("flush tmp/" if os.path.samefile(f"/proc/self/fd/{fd}", tmp_path)
                      and stat.S_ISDIR(os.fstat(fd).st_mode) else "flush a file")
        return real_fsync(fd)

    def send_fds(*args, **kwargs):
        events.append("send")
        return real_send_fds(*args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(socket, "send_fds", send_fds)
    ours, theirs = spares_socket
    fds: list[int] = []
    try:
        _send_spares(theirs, str(tmp_path), 3, named=True)
        tag, fds, names = _receive_spares(ours)
        assert tag == LAST_SPARES and len(fds) == 3
        assert events == ["flush tmp/", "send"]
        assert sorted(names) == sorted(path.name for path in tmp_path.iterdir())
        for fd, name in zip(fds, names):
            assert name.endswith(".spare")
            assert os.fstat(fd).st_ino == (tmp_path / name).stat().st_ino
            assert (tmp_path / name).stat().st_size == 0
    finally:
        for fd in fds:
            os.close(fd)


def test_indexer_process_that_cannot_make_spares_says_so(tmp_path, caplog, spares_socket):
    """No such directory: the answer comes, complete and empty, with one log line (the
    daemon asks again after its next batch; the event loop takes a spare made earlier,
    or makes a file for the data set itself)."""
    from dicomagent.archive.indexer import LAST_SPARES, _receive_spares, _send_spares

    ours, theirs = spares_socket
    _send_spares(theirs, str(tmp_path / "missing"), 5)
    assert _receive_spares(ours) == (LAST_SPARES, [], [])
    assert [r.message for r in caplog.records] == [
        "cannot create temporary files ahead: No such file or directory"]


def test_failed_rename_leaves_no_index_row(agent_factory):
    """When filing fails after the index commit (here: a directory squats the final path),
    the C-STORE fails and the index must not keep a row for a file that is not there;
    once the obstacle is gone, the same object can be stored."""
    agent = agent_factory()
    ds, data = _encoded("ct", "explicit", patient_id="RENAME-FAILS")
    final = archive_path(agent.data_dir, ds)
    final.mkdir(parents=True)
    try:
        rsp = raw_c_store(agent, CT, ds.SOPInstanceUID, data, EXPLICIT_VR_LITTLE_ENDIAN)
        assert rsp.Status == A700, rsp
        assert tmp_files(agent.data_dir) == []
        assert ds.SOPInstanceUID not in index_rows(agent.data_dir), \
            "the index names a file that was never put in place"
    finally:
        final.rmdir()
    rsp = raw_c_store(agent, CT, ds.SOPInstanceUID, data, EXPLICIT_VR_LITTLE_ENDIAN)
    assert rsp.Status == SUCCESS, rsp
    assert final.is_file()
    assert_archive_consistent(agent.data_dir)


def test_ls_while_a_data_set_arrives_does_not_disturb_it(agent_factory):
    """``dicomagent ls`` on the data dir of a running daemon (what an operator does) must not
    touch the data set being received in tmp/: the store still succeeds and is filed."""
    agent = agent_factory()
    ds = make_dataset("ct", EXPLICIT_VR_LITTLE_ENDIAN, patient_id="LS-DURING")
    ds.Rows = ds.Columns = 512
    ds.PixelData = bytes(512 * 512 * 2)                 # 512 KiB
    data = encode(ds, EXPLICIT_VR_LITTLE_ENDIAN)
    listed = []

    def between():
        deadline = time.monotonic() + 10
        while not any(size > len(data) // 2 for size in receiving_sizes(agent)):
            assert time.monotonic() < deadline, "the first half never reached tmp/"
            time.sleep(0.01)
        listed.append(dicomagent("ls", "--data-dir", str(agent.data_dir), "--json"))

    rsp = c_store_in_two_halves(agent, CT, ds.SOPInstanceUID, data, EXPLICIT_VR_LITTLE_ENDIAN,
                                between)
    assert listed[0].returncode == 0, output(listed[0])
    assert rsp.Status == SUCCESS, rsp
    assert archive_path(agent.data_dir, ds).is_file()
    assert tmp_files(agent.data_dir) == []
    assert_archive_consistent(agent.data_dir)


# === 6. statuses: A700, A900, B007, C000 ======================================================

def _encoded(kind: str, ts_name: str, **kwargs) -> tuple[Dataset, bytes]:
    ds = make_dataset(kind, TS[ts_name], **kwargs)
    return ds, encode(ds, TS[ts_name])


def _assert_left_nothing(node, before, echo: bool = True) -> None:
    assert tmp_files(node.data_dir) == []
    assert snapshot(node.data_dir) == before
    if echo:
        assert_echo(node)


def test_out_of_resources_a700(agent_factory, tmp_path):
    """min_free_mb above the free space: A700 before anything is written."""
    node = agent_factory("[storage]\nmin_free_mb = 100000000\n")
    before = snapshot(node.data_dir)
    assert before == (set(), {})
    ds, data = _encoded("ct", "explicit", patient_id="A700")
    rsp = raw_c_store(node, CT, ds.SOPInstanceUID, data, EXPLICIT_VR_LITTLE_ENDIAN)
    assert rsp.Status == A700, rsp
    _assert_left_nothing(node, before, echo=False)
    path = write_part10(ds, tmp_path / "a700.dcm", EXPLICIT_VR_LITTLE_ENDIAN)
    result = store(node, path)
    assert result.returncode == 1, output(result)
    assert "status 0xA700" in result.stderr
    assert result.stdout.strip() == "sent 0, warnings 0, failed 1"
    _assert_left_nothing(node, before)


@pytest.mark.parametrize("mismatch", ["instance", "class"])
def test_data_set_does_not_match_a900(agent, mismatch):
    """The data set names another SOP Instance (or Class) than the C-STORE-RQ: A900,
    nothing stored."""
    before = snapshot(agent.data_dir)
    ds, data = _encoded("mr" if mismatch == "class" else "ct", "explicit",
                        patient_id=f"A900-{mismatch}")
    command_uid = new_uid() if mismatch == "instance" else ds.SOPInstanceUID
    rsp = raw_c_store(agent, CT, command_uid, data, EXPLICIT_VR_LITTLE_ENDIAN)
    assert rsp.Status == A900, rsp
    _assert_left_nothing(agent, before)


@pytest.mark.parametrize("mismatch", ["instance", "class"])
def test_mismatch_accepted_b007(mismatch_agent, mismatch):
    """accept_mismatch = true: stored with B007 under the data set's own UIDs; the File Meta
    and the index name the data set's UIDs, not the command's."""
    node = mismatch_agent
    ds, data = _encoded("mr" if mismatch == "class" else "ct", "explicit",
                        patient_id=f"B007-{mismatch}", private=False)
    command_uid = new_uid() if mismatch == "instance" else ds.SOPInstanceUID
    rsp = raw_c_store(node, CT, command_uid, data, EXPLICIT_VR_LITTLE_ENDIAN)
    assert rsp.Status == B007, rsp
    assert tmp_files(node.data_dir) == []
    rows = assert_archive_consistent(node.data_dir)
    assert ds.SOPInstanceUID in rows
    if command_uid != ds.SOPInstanceUID:
        assert command_uid not in rows
    assert rows[ds.SOPInstanceUID]["SOPClassUID"] == ds.SOPClassUID
    stored = pydicom.dcmread(archive_path(node.data_dir, ds))
    assert stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert stored.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    problems = dataset_differences(ds, stored, same_syntax=False)
    assert not problems, problems
    assert_echo(node)


def _lying_length(data: bytes) -> bytes:
    """Explicit VR LE: the Patient Name's 2-byte length made larger than what follows."""
    at = data.index(struct.pack("<HH", 0x0010, 0x0010) + b"PN")
    return data[:at + 6] + struct.pack("<H", 0xFFF0) + data[at + 8:]


def _c000_cases():
    _, small = _encoded("ct", "explicit", patient_id="C000")
    big_ds = make_dataset("us", IMPLICIT_VR_LITTLE_ENDIAN, patient_id="C000-big")
    big_ds.NumberOfFrames = 800          # 200 KiB of pixels: more than the in-memory head
    big_ds.PixelData = bytes(range(256)) * (16 * 16 * 800 // 256)
    big = encode(big_ds, IMPLICIT_VR_LITTLE_ENDIAN)
    _, be = _encoded("ct", "big", patient_id="C000-be")
    rng = np.random.default_rng(67)
    return {
        "truncated-in-pixel-data": (CT, small[:-100], EXPLICIT_VR_LITTLE_ENDIAN),
        "truncated-in-a-header": (CT, small[:small.index(b"\xe0\x7f\x10\x00") + 5],
                                  EXPLICIT_VR_LITTLE_ENDIAN),
        "truncated-large-implicit": (US_MULTIFRAME, big[:-4097], IMPLICIT_VR_LITTLE_ENDIAN),
        "truncated-big-endian": (CT, be[:-1], EXPLICIT_VR_BIG_ENDIAN),
        "lying-length": (CT, _lying_length(small), EXPLICIT_VR_LITTLE_ENDIAN),
        "garbage-random": (CT, rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
                           EXPLICIT_VR_LITTLE_ENDIAN),
        "garbage-text": (CT, b"this is not a DICOM data set at all\n" * 40,
                         IMPLICIT_VR_LITTLE_ENDIAN),
        "empty": (CT, b"", EXPLICIT_VR_LITTLE_ENDIAN),
    }


C000_CASES = _c000_cases()


@pytest.mark.parametrize("case", sorted(C000_CASES))
def test_cannot_understand_c000(agent, case):
    """Truncated data sets, lying lengths and garbage: C000, nothing kept."""
    sop_class, data, ts = C000_CASES[case]
    before = snapshot(agent.data_dir)
    rsp = raw_c_store(agent, sop_class, new_uid(), data, ts)
    assert rsp.Status == C000, rsp
    _assert_left_nothing(agent, before)


# === 7. dicomagent import and ls ==============================================================

def test_import_folder_then_ls(tmp_path):
    """``import`` files a folder (recursively) through the same checks as a C-STORE; ``ls``
    shows the studies; a non-DICOM file is reported, and a broken one fails."""
    data_dir = tmp_path / "data"
    folder = tmp_path / "in"
    study_a, study_b = new_uid(), new_uid()
    files = [
        make_file(folder, "ct", "explicit", patient_id="IMP-A", study_uid=study_a, number=1),
        make_file(folder / "x", "ct", "implicit", name="ct2.dcm", patient_id="IMP-A",
                  study_uid=study_a, number=2),
        make_file(folder / "x" / "y", "mr", "big", patient_id="IMP-B", study_uid=study_b),
        make_file(folder / "x" / "y", "sr", "explicit", patient_id="IMP-B", study_uid=study_b),
    ]
    junk = folder / "x" / "README"
    junk.write_text("no DICOM here")
    result = dicomagent("import", "--data-dir", str(data_dir), str(folder))
    assert result.returncode == 0, output(result)
    assert result.stdout.strip() == "imported 4, failed 0, skipped 1", output(result)
    assert f"skipped {junk}: not a DICOM Part 10 file" in result.stderr

    listed = dicomagent("ls", "--data-dir", str(data_dir), "--json")
    assert listed.returncode == 0, output(listed)
    studies = {s["StudyInstanceUID"]: s for s in json.loads(listed.stdout)}
    assert set(studies) == {study_a, study_b}
    assert studies[study_a]["PatientID"] == "IMP-A"
    assert studies[study_a]["PatientName"] == "Gómez^José"
    assert studies[study_a]["NumberOfStudyRelatedInstances"] == 2
    assert studies[study_b]["NumberOfStudyRelatedInstances"] == 2
    assert set(studies[study_b]["ModalitiesInStudy"].split(",")) == {"MR", "SR"}

    rows = assert_archive_consistent(data_dir)
    assert len(rows) == len(files)
    for path in files:
        ds = pydicom.dcmread(path)
        assert rows[ds.SOPInstanceUID]["transfer_syntax"] == ds.file_meta.TransferSyntaxUID
        assert_same_data_set(path, archive_path(data_dir, ds))
    assert tmp_files(data_dir) == []

    # A Part 10 file whose data set is cut short fails (C000), a non-DICOM file is
    # reported; nothing is kept.
    broken = tmp_path / "broken.dcm"
    whole = make_file(tmp_path, "ct", "explicit", patient_id="IMP-BROKEN").read_bytes()
    broken.write_bytes(whole[:-50])
    before = snapshot(data_dir)
    result = dicomagent("import", "--data-dir", str(data_dir), str(broken), str(junk))
    assert result.returncode == 1, output(result)
    assert f"{broken}: status 0xC000" in result.stderr
    assert f"skipped {junk}: not a DICOM Part 10 file" in result.stderr
    assert result.stdout.strip() == "imported 0, failed 1, skipped 1"
    assert snapshot(data_dir) == before
    assert tmp_files(data_dir) == []
