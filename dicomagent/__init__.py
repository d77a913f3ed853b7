"""dicomagent: a DICOM network node written on asyncio + uvloop.

The protocol is implemented here: ``ul`` is the PS3.8 Upper Layer, ``dimse``
the PS3.7 message exchange, ``services`` the PS3.4 service classes.
"""

__version__ = "0.1.0"
