"""PS3.7: DICOM Message Service Element.

``commands`` is the command set codec, ``status`` the status classes,
``messages`` the assembly of P-DATA fragments into messages (and back).
Nothing here knows a socket: P-DATA indications in, messages out.
"""
