"""PS3.3 C.12.1.1.2: Specific Character Set Defined Terms and their Python codecs.

pydicom decodes (and encodes) the text of data sets through its own table of
Defined Terms, and pydicom 3.0 lacks one of PS3.3 Table C.12-2: ``ISO_IR 203``
(Latin alphabet No. 9, ISO 8859-15: € Š š Ž ž Œ œ Ÿ where Latin-1 has other
signs); it reads such a value as Latin-1, with a warning. Importing this module
adds the terms of ``CODECS`` that pydicom's table lacks, so that a data set reads
the same whether pydicom or one of this project's own readers (``jsonencode``,
``archive.header``) reads it. ``transcode``, which turns every data set of a
DIMSE message into pydicom's and back, imports it.
"""

from __future__ import annotations

import pydicom.charset

#: Specific Character Set values with a single Python codec (no code extensions).
CODECS = {
    "": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin_1", "ISO_IR 101": "iso8859_2",
    "ISO_IR 109": "iso8859_3", "ISO_IR 110": "iso8859_4", "ISO_IR 144": "iso8859_5",
    "ISO_IR 127": "iso8859_6", "ISO_IR 126": "iso8859_7", "ISO_IR 138": "iso8859_8",
    "ISO_IR 148": "iso8859_9", "ISO_IR 203": "iso8859_15", "ISO_IR 166": "tis_620",
    "ISO_IR 192": "utf_8", "GB18030": "gb18030", "GBK": "gbk",
}

for _term, _codec in CODECS.items():
    if _term:
        pydicom.charset.python_encoding.setdefault(_term, _codec)
