"""The query keys of the seed's Tables 41-48, by Query/Retrieve level.

The index keeps, for every patient, study, series and instance, the
attributes these tables name, so that C-FIND can match and return them
without opening a file. One list, read by the index (what to store), the
query SCP (what to match and return) and the conformance statement.

References
----------
Seed conformance statement Tables 41-48; PS3.4 C.6.1.1 (Study Root keys),
C.6.2.1 (Patient Root keys).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, keyword_for_tag


@dataclass(frozen=True, slots=True)
class Key:
    tag: int
    keyword: str
    vr: str

    @property
    def is_sequence(self) -> bool:
        return self.vr == "SQ"


def _keys(*tags: int) -> tuple[Key, ...]:
    return tuple(Key(tag, keyword_for_tag(tag), dictionary_VR(tag)) for tag in tags)


#: Seed Table 41.
PATIENT_KEYS = _keys(0x00100010, 0x00100020, 0x00100030, 0x00100040)

#: Seed Table 42 (the three computed keys are not stored: the index counts them).
STUDY_KEYS = _keys(0x0020000D, 0x00200010, 0x00080020, 0x00080030, 0x00080050, 0x00080090)
STUDY_COMPUTED_KEYS = _keys(0x00080061, 0x00201206, 0x00201208)

#: Seed Table 43 (Number of Series Related Instances is computed).
SERIES_KEYS = _keys(0x0020000E, 0x00200011, 0x00080060, 0x00400275, 0x00400244, 0x00400245)
SERIES_COMPUTED_KEYS = _keys(0x00201209)

#: Seed Tables 44-48: composite object instance, image, presentation state,
#: SR / evidence document and key object selection keys.
INSTANCE_KEYS = _keys(
    0x00080018, 0x00200013, 0x00080016,                            # Table 44
    0x00280010, 0x00280011, 0x00280100, 0x00280008,                # Table 45
    0x00700080, 0x00700081, 0x00700082, 0x00700083, 0x00700084,    # Table 46
    0x00081115,
    0x0040A491, 0x0040A493, 0x00080023, 0x00080033, 0x0040A032,    # Tables 47, 48
    0x0040A073, 0x0040A027, 0x0040A370, 0x0040A043, 0x0040A504,
)

LEVEL_KEYS = {
    "PATIENT": PATIENT_KEYS,
    "STUDY": STUDY_KEYS,
    "SERIES": SERIES_KEYS,
    "IMAGE": INSTANCE_KEYS,
}

#: Every tag the index reads from a stored data set (and Specific Character Set).
INDEXED_TAGS = tuple(sorted({0x00080005} | {key.tag for keys in LEVEL_KEYS.values()
                                             for key in keys}))
