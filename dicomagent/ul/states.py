"""PS3.8 §9.2.1: the states (Table 9-1) and events (Table 9-2) of the Upper Layer
state machine.

References
----------
PS3.8 §9.2.1, Tables 9-1 and 9-2.
"""

from enum import Enum


class State(Enum):
    """PS3.8 Table 9-1: DICOM Upper Layer states."""

    Sta1 = "Idle"
    Sta2 = "Transport connection open (Awaiting A-ASSOCIATE-RQ PDU)"
    Sta3 = "Awaiting local A-ASSOCIATE response primitive (from local user)"
    Sta4 = "Awaiting transport connection opening to complete (from local transport service)"
    Sta5 = "Awaiting A-ASSOCIATE-AC or A-ASSOCIATE-RJ PDU"
    Sta6 = "Association established and ready for data transfer"
    Sta7 = "Awaiting A-RELEASE-RP PDU"
    Sta8 = "Awaiting local A-RELEASE response primitive (from local user)"
    Sta9 = "Release collision requestor side; awaiting A-RELEASE response (from local user)"
    Sta10 = "Release collision acceptor side; awaiting A-RELEASE-RP PDU"
    Sta11 = "Release collision requestor side; awaiting A-RELEASE-RP PDU"
    Sta12 = "Release collision acceptor side; awaiting A-RELEASE response primitive " \
            "(from local user)"
    Sta13 = "Awaiting Transport Connection Close Indication (Association no longer exists)"


class Event(Enum):
    """PS3.8 Table 9-2: DICOM Upper Layer events."""

    Evt1 = "A-ASSOCIATE request (local user)"
    Evt2 = "Transport connect confirmation (local transport service)"
    Evt3 = "A-ASSOCIATE-AC PDU (received on transport connection)"
    Evt4 = "A-ASSOCIATE-RJ PDU (received on transport connection)"
    Evt5 = "Transport connection indication (local transport service)"
    Evt6 = "A-ASSOCIATE-RQ PDU (received on transport connection)"
    Evt7 = "A-ASSOCIATE response primitive (accept)"
    Evt8 = "A-ASSOCIATE response primitive (reject)"
    Evt9 = "P-DATA request primitive"
    Evt10 = "P-DATA-TF PDU (received on transport connection)"
    Evt11 = "A-RELEASE request primitive"
    Evt12 = "A-RELEASE-RQ PDU (received on transport connection)"
    Evt13 = "A-RELEASE-RP PDU (received on transport connection)"
    Evt14 = "A-RELEASE response primitive"
    Evt15 = "A-ABORT request primitive"
    Evt16 = "A-ABORT PDU (received on transport connection)"
    Evt17 = "Transport connection closed indication (local transport service)"
    Evt18 = "ARTIM timer expired (Association reject/release timer)"
    Evt19 = "Unrecognized or invalid PDU received"


# Members are singletons compared by identity, so identity hashing is exact; it
# replaces Enum.__hash__ (a Python-level function) on the table look-up path.
State.__hash__ = object.__hash__
Event.__hash__ = object.__hash__
