"""The direct DICOM JSON encoder (dicomagent.jsonencode) writes the same bytes as pydicom.

C-FIND responses are encoded from the index's DICOM JSON without pydicom; pydicom is
the reference here, in each uncompressed transfer syntax, and what the encoder does
not handle must be refused (so the caller falls back), never written differently.
"""

import pydicom
import pytest

from dicomagent.jsonencode import Unsupported, encode_json
from dicomagent.transcode import encode

SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")


def _code(value, scheme="DCM", meaning="Meaning"):
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _datasets():
    latin = pydicom.Dataset()
    latin.SpecificCharacterSet = "ISO_IR 100"
    latin.PatientName = "Müller^Hans"
    latin.PatientID = "P1"
    latin.StudyDate = "20240101"
    latin.StudyTime = "101112.5"
    latin.Rows = 512
    latin.SliceThickness = "1.5"
    latin.ModalitiesInStudy = ["CT", "MR"]
    latin.NumberOfStudyRelatedInstances = 3
    latin.ConceptNameCodeSequence = [_code("121", meaning="Été"), _code("122")]
    latin.StudyInstanceUID = "1.2.3"
    latin.RetrieveAETitle = "DICOMAGENT"
    utf8 = pydicom.Dataset()
    utf8.SpecificCharacterSet = "ISO_IR 192"
    utf8.PatientName = "山田^太郎=やまだ^たろう"
    utf8.ReferencedSeriesSequence = []
    utf8.QueryRetrieveLevel = "STUDY"
    plain = pydicom.Dataset()
    plain.PatientName = ""
    plain.AccessionNumber = None
    plain.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    plain.WindowCenter = ["40", "400"]
    nested = pydicom.Dataset()
    request = pydicom.Dataset()
    request.RequestedProcedureID = "RP1"
    request.RequestedProcedureCodeSequence = [_code("X1", "L")]
    nested.ReferencedRequestSequence = [request]
    nested.BitsAllocated = 16
    return [latin, utf8, plain, nested]


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("index", range(4))
def test_same_bytes_as_pydicom(syntax, index):
    ds = _datasets()[index]
    document = ds.to_json_dict()
    assert encode_json(document, syntax) == encode(pydicom.Dataset.from_json(document), syntax)


def test_refuses_what_it_does_not_encode():
    binary = pydicom.Dataset()
    binary.PixelData = b"\x00\x01"
    binary.BitsAllocated = 8
    with pytest.raises(Unsupported):
        encode_json(binary.to_json_dict(), SYNTAXES[0])
    iso2022 = {"00080005": {"vr": "CS", "Value": ["ISO 2022 IR 6", "ISO 2022 IR 87"]},
               "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Yamada"}]}}
    with pytest.raises(Unsupported):
        encode_json(iso2022, SYNTAXES[1])
    not_ascii = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller"}]}}
    with pytest.raises(Unsupported):
        encode_json(not_ascii, SYNTAXES[1])
