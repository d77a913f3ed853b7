"""Fuzz the archive's own reading of received data sets (atheris): the element-length
walk that decides a C-STORE's status, and the header reader that fills the index.

Both read bytes a peer sent. The input is a data set (the first byte picks one of the
three uncompressed transfer syntaxes, the rest is the data set), and for any input:

1. ``check_structure`` accepts it or raises ``StructureError``, nothing else, and says
   the same with the whole data set in memory or only its first bytes (the rest read
   from the file, as for a large object);
2. ``record_from_head`` returns a record or None (pydicom must read it), and raises
   nothing: an exception there would cost the object its indexed attributes;
3. for a data set the walk accepted, a record from ``record_from_head`` is the record
   pydicom gives (``record_from_dataset`` of the Part 10 file the archive would write),
   unless pydicom cannot read the data set at all;
4. a data set the walk accepted with its four UIDs, filed as the archive files it, is
   indexed by ``index_jobs`` (what the indexer runs) without an error, and the index then
   has its row: an error there would fail the transaction of every object indexed with
   it, and leave them all out of the index until the next start.

Run::

    python fuzz/header.py -max_total_time=20 [CORPUS_DIR ...] [libFuzzer flags]

With no corpus directory, a seed corpus is written (from code, not committed) to
``fuzz/corpus-header/`` and used.

References
----------
PS3.5 §7.1 (data elements), §7.5 (nesting), §6.1.2.3 (character sets); PS3.10 §7.1.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import tempfile
import warnings

import atheris
from _corpus import corpus_args

with atheris.instrument_imports():
    import pydicom
    from dicomagent.archive.header import record_from_head
    from dicomagent.archive.index import SQLiteIndex
    from dicomagent.archive.indexer import IndexJob, index_jobs, record_from_dataset
    from dicomagent.archive.keys import INDEXED_TAGS
    from dicomagent.archive.part10 import file_meta_information
    from dicomagent.archive.structure import StructureError, check_structure
    from dicomagent.uids import (EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN,
                                 IMPLICIT_VR_LITTLE_ENDIAN)

SYNTAXES = (IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN)
FILING_TAGS = frozenset((0x00080016, 0x00080018, 0x0020000D, 0x0020000E))
#: The part of a data set that ``check_structure`` is given in memory in the second try.
HEAD = 40

_scratch = tempfile.mkdtemp(prefix="fuzz-header-")
_file = os.path.join(_scratch, "data.bin")
os.mkdir(os.path.join(_scratch, "archive"))
_index = SQLiteIndex(os.path.join(_scratch, "index.sqlite"), durable=False)
_filed = 0


def walk(data: bytes, syntax: str, in_memory: int):
    """What the walk says: the raw values of the four filing UIDs, or "refused"."""
    try:
        found = check_structure(data[:in_memory], len(data), syntax,
                                _file if in_memory < len(data) else None, 0, FILING_TAGS)
    except StructureError:
        return "refused"
    return {tag: bytes(value) for tag, value in found.items()}


def part10(data: bytes, syntax: str) -> bytes:
    """The file the archive would write for this data set."""
    return file_meta_information("1.2.840.10008.5.1.4.1.1.7", "1.2.3", syntax, "FUZZ") + data


def TestOneInput(raw: bytes) -> None:
    global _filed
    if not raw:
        return
    syntax, data = SYNTAXES[raw[0] % 3], raw[1:]
    with open(_file, "wb") as handle:
        handle.write(data)
    whole = walk(data, syntax, len(data))
    if len(data) > HEAD and walk(data, syntax, HEAD) != whole:
        raise AssertionError("the walk says another thing with the data set in the file")

    fast = record_from_head(data, syntax, complete=True)        # (2): raises nothing
    if whole == "refused":
        return
    if fast is not None:
        try:
            reference = pydicom.dcmread(io.BytesIO(part10(data, syntax)),
                                        stop_before_pixels=True, specific_tags=list(INDEXED_TAGS))
            expected = record_from_dataset(reference)
        except Exception:  # noqa: BLE001 - what pydicom cannot read at all is not compared
            expected = None
        if expected is not None and fast != expected:     # neither filed yet: equal records
            raise AssertionError(f"the header reader and pydicom disagree:\n"
                                 f"{fast!r}\n{expected!r}")

    # (4) As the archive files it: the four UIDs as the walk read them, all present.
    uids = [bytes(whole.get(tag, b"")).rstrip(b"\x00 ").decode("ascii", "replace")
            for tag in (0x00080016, 0x00080018, 0x0020000D, 0x0020000E)]
    if not all(uids):
        return
    _filed += 1
    relative = f"archive/{_filed}.dcm"
    meta = part10(b"", syntax)
    with open(os.path.join(_scratch, relative), "wb") as handle:
        handle.write(meta + data)
    job = IndexJob(_filed, relative, *uids, len(meta), syntax, 0.0, "FUZZ", 0, "")
    index_jobs(_index, _scratch, "replace", [job])
    if _index.lookup(uids[1]) is None:
        raise AssertionError(f"indexed without an error, but not in the index: {uids[1]}")
    os.unlink(os.path.join(_scratch, relative))


def seeds() -> list[bytes]:
    """Data sets the header reader answers for, in each syntax and a few character sets."""
    out = []
    for charset, name in ((None, "Doe^John"), ("ISO_IR 100", "Müller^Jürgen"),
                          ("ISO_IR 192", "Wang^XiaoDong=王^小東")):
        ds = pydicom.Dataset()
        if charset:
            ds.SpecificCharacterSet = charset
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.SOPInstanceUID = "1.2.3.4.5.6.7"
        ds.StudyInstanceUID = "1.2.3.4"
        ds.SeriesInstanceUID = "1.2.3.4.5"
        ds.PatientName = name
        ds.PatientID = "ID 7"
        ds.PatientBirthDate = "19700101"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240102", "101112.5", "A1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "OT", "3", "12"
        ds.Rows, ds.Columns, ds.BitsAllocated = 2, 2, 8
        ds.SliceThickness = "1.25"
        ds.PixelData = b"\0\1\2\3"
        for n, syntax in enumerate(SYNTAXES):
            implicit, little = syntax == IMPLICIT_VR_LITTLE_ENDIAN, syntax != EXPLICIT_VR_BIG_ENDIAN
            if charset == "ISO_IR 192" and not little:
                continue
            buffer = io.BytesIO()
            ds.save_as(buffer, implicit_vr=implicit, little_endian=little)
            out.append(bytes((n,)) + buffer.getvalue())
    return out


if __name__ == "__main__":
    logging.disable(logging.WARNING)    # pydicom's warnings about odd values, once per input
    warnings.simplefilter("ignore")
    for seed in seeds():                # the seeds themselves must pass, and be answered
        TestOneInput(seed)
        if record_from_head(seed[1:], SYNTAXES[seed[0] % 3], complete=True) is None:
            raise AssertionError("a seed the header reader does not answer for")
    atheris.Setup(corpus_args(sys.argv, "header", seeds()), TestOneInput)
    atheris.Fuzz()
