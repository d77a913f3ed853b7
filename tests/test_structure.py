"""The element-length walk every received data set goes through (``archive.structure``).

``check_structure`` reads element headers from the in-memory head of a data set and,
past it, from the file. These properties hold for any input:

1. valid data sets (pydicom-encoded, with nested sequences, in the three uncompressed
   transfer syntaxes) pass, and the UIDs it picks up are pydicom's;
2. a data set cut short inside an element, or with a length made to lie, is refused;
3. the outcome (refused, or the values found) is the same whether the whole data set is
   in memory or only its first bytes are (the rest read from a file), for valid,
   mutated and random bytes; and nothing but ``StructureError`` is ever raised.

References
----------
PS3.5 §7.1 (data elements), §7.5 (nesting), Table 7.1-1/7.1-2 (explicit VR headers).
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomagent.archive.structure import StructureError, check_structure
from dicomagent.transcode import encode
from dicomagent.uids import (EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN,
                             IMPLICIT_VR_LITTLE_ENDIAN)
from strategies import mutated

SYNTAXES = [IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN]
UIDS = frozenset((0x00080016, 0x00080018, 0x0020000D, 0x0020000E))
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

texts = st.text(alphabet="ABCDEFGHIJ^ 0123456789", max_size=16)
uids = st.from_regex(r"1\.2\.[1-9][0-9]{0,20}(\.[1-9][0-9]{0,10}){0,3}", fullmatch=True)


@st.composite
def items(draw, depth: int) -> Dataset:
    item = Dataset()
    item.CodeValue = draw(texts)
    item.CodeMeaning = draw(texts)
    if depth < 3 and draw(st.booleans()):
        item.ConceptCodeSequence = Sequence(draw(st.lists(items(depth + 1), max_size=2)))
    return item


@st.composite
def data_sets(draw) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = draw(uids)
    ds.StudyInstanceUID = draw(uids)
    ds.SeriesInstanceUID = draw(uids)
    ds.PatientName = draw(texts)
    ds.PatientID = draw(texts)
    if draw(st.booleans()):
        ds.ProcedureCodeSequence = Sequence(draw(st.lists(items(0), max_size=3)))
    if draw(st.booleans()):
        ds.ImageComments = draw(st.text(max_size=300))
    if draw(st.booleans()):
        ds.Rows = ds.Columns = 4
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = draw(st.binary(min_size=16, max_size=16))
    return ds


def outcome(data: bytes, syntax: str, in_memory: int, tmp_path) -> object:
    """What check_structure says with the first ``in_memory`` bytes in memory and the
    whole data set in a file behind a 132-byte stand-in header: the values found, or
    the refusal."""
    path = tmp_path / "data.bin"
    path.write_bytes(b"\0" * 132 + data)
    try:
        found = check_structure(data[:in_memory], len(data), syntax, str(path), 132, UIDS)
    except StructureError:
        return "refused"
    return {tag: bytes(value) for tag, value in found.items()}


@SETTINGS
@given(ds=data_sets(), syntax=st.sampled_from(SYNTAXES), cut=st.integers(0, 400))
def test_valid_data_sets_pass_with_their_uids_however_much_is_in_memory(ds, syntax, cut,
                                                                       tmp_path):
    data = encode(ds, syntax)
    whole = outcome(data, syntax, len(data), tmp_path)
    assert whole != "refused"
    assert {tag: value.rstrip(b"\0").decode() for tag, value in whole.items()} == {
        0x00080016: ds.SOPClassUID, 0x00080018: ds.SOPInstanceUID,
        0x0020000D: ds.StudyInstanceUID, 0x0020000E: ds.SeriesInstanceUID}
    assert outcome(data, syntax, min(cut, len(data)), tmp_path) == whole


@SETTINGS
@given(ds=data_sets(), syntax=st.sampled_from(SYNTAXES), data=st.data())
def test_cut_inside_an_element_is_refused(ds, syntax, data, tmp_path):
    encoded = encode(ds, syntax)
    boundaries = _top_level_boundaries(ds, syntax)
    cut = data.draw(st.integers(1, len(encoded) - 1).filter(lambda n: n not in boundaries))
    short = encoded[:cut]
    assert outcome(short, syntax, len(short), tmp_path) == "refused"
    assert outcome(short, syntax, data.draw(st.integers(0, cut)), tmp_path) == "refused"


@SETTINGS
@given(ds=data_sets(), data=st.data())
def test_a_lying_length_is_refused(ds, data, tmp_path):
    """Explicit VR LE: the Patient ID's 2-byte length made larger than what is left."""
    encoded = encode(ds, EXPLICIT_VR_LITTLE_ENDIAN)
    at = encoded.index(struct.pack("<HH", 0x0010, 0x0020) + b"LO")
    left = len(encoded) - at - 8
    lie = data.draw(st.integers(left + 1, 0xFFFF)) if left < 0xFFFF else None
    if lie is None:
        return
    lying = encoded[:at + 6] + struct.pack("<H", lie) + encoded[at + 8:]
    assert outcome(lying, EXPLICIT_VR_LITTLE_ENDIAN, len(lying), tmp_path) == "refused"


@SETTINGS
@given(ds=data_sets(), syntax=st.sampled_from(SYNTAXES), data=st.data())
def test_mutated_data_sets_same_outcome_from_memory_or_file(ds, syntax, data, tmp_path):
    encoded = encode(ds, syntax)
    changed = data.draw(mutated(encoded))
    whole = outcome(changed, syntax, len(changed), tmp_path)
    assert outcome(changed, syntax, data.draw(st.integers(0, len(changed))), tmp_path) == whole


@SETTINGS
@given(raw=st.binary(max_size=600), syntax=st.sampled_from(SYNTAXES), data=st.data())
def test_random_bytes_same_outcome_from_memory_or_file(raw, syntax, data, tmp_path):
    whole = outcome(raw, syntax, len(raw), tmp_path)
    assert outcome(raw, syntax, data.draw(st.integers(0, len(raw))), tmp_path) == whole


def _top_level_boundaries(ds: Dataset, syntax: str) -> set[int]:
    """Offsets where a top-level element starts or the data set ends (cutting there
    leaves a shorter data set that is still well formed): the lengths of the data set
    encoded with its first k elements, for every k."""
    boundaries = {0}
    prefix = Dataset()
    for element in ds:
        prefix.add(element)
        boundaries.add(len(encode(prefix, syntax)))
    return boundaries
