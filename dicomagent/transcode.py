"""Re-encoding a data set among the three uncompressed transfer syntaxes.

pydicom re-encodes numbers, strings and tags for the target byte order, but
the values of the "other" VRs (OW, OF, OL, OD, OV) are raw bytes in the byte
order they were read in; between Little and Big Endian their words must be
swapped, which is done here (at every nesting depth, Pixel Data included).

References
----------
PS3.5 §7.3 (byte ordering), §8.1.1 (Pixel Data encoding, OB vs OW), Annex A.
"""

from __future__ import annotations

import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from dicomagent import charsets  # noqa: F401 - pydicom learns the Defined Terms it lacks
from dicomagent.uids import (EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN,
                             IMPLICIT_VR_LITTLE_ENDIAN)

#: The word size of each VR whose value pydicom keeps as raw bytes.
_WORD_SIZE = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}

UNCOMPRESSED = {
    IMPLICIT_VR_LITTLE_ENDIAN: (True, True),     # (implicit VR, little endian)
    EXPLICIT_VR_LITTLE_ENDIAN: (False, True),
    EXPLICIT_VR_BIG_ENDIAN: (False, False),
}


def can_convert(source: str, target: str) -> bool:
    return source in UNCOMPRESSED and target in UNCOMPRESSED


def _swap(value: bytes, size: int) -> bytes:
    import numpy
    dtype = {2: "u2", 4: "u4", 8: "u8"}[size]
    usable = len(value) - len(value) % size
    swapped = numpy.frombuffer(value, dtype=dtype, count=usable // size).byteswap().tobytes()
    return swapped + value[usable:]


def _swap_words(ds: pydicom.Dataset) -> None:
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                _swap_words(item)
            continue
        vr = element.VR
        if vr == "OB or OW":
            vr = "OW" if ds.get("BitsAllocated", 16) > 8 else "OB"
        size = _WORD_SIZE.get(vr)
        if size and element.value:
            element.value = _swap(element.value, size)


def encode_data_set(ds: pydicom.Dataset, source: str, target: str) -> bytes:
    """The data set ``ds`` (read in ``source``) encoded in ``target``, without a header."""
    implicit, little = UNCOMPRESSED[target]
    if UNCOMPRESSED[source][1] != little:
        _swap_words(ds)
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = implicit
    buffer.is_little_endian = little
    write_dataset(buffer, ds)
    return buffer.getvalue()


def encode(ds: pydicom.Dataset, transfer_syntax: str) -> bytes:
    """A data set built in memory (an identifier), encoded in an uncompressed syntax."""
    implicit, little = UNCOMPRESSED.get(transfer_syntax, (False, True))
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = implicit
    buffer.is_little_endian = little
    write_dataset(buffer, ds)
    return buffer.getvalue()


def decode(data: bytes, transfer_syntax: str) -> pydicom.Dataset:
    """A small data set (an identifier, an N-SET modification list) read from bytes."""
    from pydicom.filereader import read_dataset

    from dicomagent.archive.structure import check_structure
    check_structure(data, len(data), transfer_syntax)      # pydicom reads a cut value silently
    implicit, little = UNCOMPRESSED.get(transfer_syntax, (False, True))
    buffer = DicomBytesIO(data)
    ds = read_dataset(buffer, implicit, little)
    if buffer.tell() != len(data):
        raise ValueError(f"data set has {len(data) - buffer.tell()} bytes after its end")
    return ds
