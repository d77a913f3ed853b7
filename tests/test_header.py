"""The archive's own header reader (dicomagent.archive.header) gives the index the
same record as pydicom does, or steps aside (None) so that pydicom reads it.

pydicom is the reference: for pydicom's own test files and for synthetic data sets
in each uncompressed syntax and character set, ``record_from_head`` either returns
exactly ``record_from_dataset``'s record or None.
"""

import io

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.dataset import FileMetaDataset

from dicomagent.archive.indexer import record_from_dataset
from dicomagent.archive.header import record_from_head
from dicomagent.archive.keys import INDEXED_TAGS
from dicomagent.archive.part10 import read_file_meta

SYNTAXES = {"1.2.840.10008.1.2": (True, True), "1.2.840.10008.1.2.1": (False, True),
            "1.2.840.10008.1.2.2": (False, False)}


def _record_fields(record):
    return (record.patient, record.study, record.series, record.instance, record.patient_attrs,
            record.study_attrs, record.series_attrs, record.instance_attrs,
            record.specific_character_set)


def _compare(data: bytes, transfer_syntax: str, reference: pydicom.Dataset) -> bool:
    """True when the fast reader answered (and matched); False when it stepped aside."""
    fast = record_from_head(data[:65536], transfer_syntax, complete=len(data) <= 65536)
    if fast is None:
        return False
    assert _record_fields(fast) == _record_fields(record_from_dataset(reference))
    return True


def _synthetic(charset: str | None, name: str, syntax: str) -> bytes:
    ds = pydicom.Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4.5.6.7"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.5"
    ds.PatientName = name
    ds.PatientID = "ID 7"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = ""
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240102", "101112.5", "A1"
    ds.ReferringPhysicianName = "Who^Doctor"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", "3", "12"
    ds.Rows, ds.Columns, ds.BitsAllocated = 4, 4, 16
    ds.NumberOfFrames = "1"
    ds.ContentDate, ds.ContentTime = "20240102", "1011"
    ds.SliceThickness = "1.25"
    ds.PixelData = np.zeros(16, dtype=np.uint16).tobytes()
    implicit, little = SYNTAXES[syntax]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=implicit, little_endian=little)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", sorted(SYNTAXES))
@pytest.mark.parametrize("charset,name", [(None, "Doe^John"), ("ISO_IR 100", "Müller^Jürgen"),
                                          ("ISO_IR 192", "山田^太郎=やまだ^たろう")])
def test_synthetic_matches_pydicom(syntax, charset, name):
    part10 = _synthetic(charset, name, syntax)
    handle = io.BytesIO(part10)
    meta, offset = read_file_meta(handle)
    reference = pydicom.dcmread(io.BytesIO(part10), stop_before_pixels=True,
                                specific_tags=list(INDEXED_TAGS))
    assert _compare(part10[offset:], meta["transfer_syntax"], reference)


def test_pydicom_test_files_match_or_step_aside():
    answered = 0
    for path in get_testdata_files("*.dcm"):
        try:
            with open(path, "rb") as handle:
                meta, offset = read_file_meta(handle)
                handle.seek(offset)
                data = handle.read()
            reference = pydicom.dcmread(path, stop_before_pixels=True,
                                        specific_tags=list(INDEXED_TAGS))
            reference_record = record_from_dataset(reference)
        except Exception:   # noqa: BLE001 - files pydicom itself cannot read are not the point
            continue
        if not reference_record.instance.get("SOPInstanceUID"):
            continue
        answered += _compare(data, meta["transfer_syntax"], reference)
    assert answered >= 40
