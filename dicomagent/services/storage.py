"""PS3.4 Annex B: Storage Service Class, SCP (the SCU is ``dicomagent.store``).

The SCP accepts the Storage SOP Classes of the seed's Table 2 (or, with
``storage.accept_all_storage_classes``, every Storage SOP Class pydicom
knows) in the three uncompressed transfer syntaxes of Table 12 (and, with
``storage.accept_compressed``, the compressed ones, stored as received).

A C-STORE data set is streamed to a temporary file while it arrives (the
sink below); the archive then checks, flushes and files it, and
only then is the C-STORE-RSP sent, with a status of the seed's Table 67:
0000 success, B007 stored although the data set does not match the command
(``storage.accept_mismatch``), A700 out of resources, A900 data set does not
match the SOP Class, C000 cannot understand.

References
----------
PS3.4 Annex B (B.2.3 statuses); PS3.7 §9.1.1 (C-STORE); seed 3.1.3.4, Table 67.
"""

from __future__ import annotations

import logging

import pydicom.uid
from pydicom._uid_dict import UID_dictionary

from dicomagent.archive import (CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH, OUT_OF_RESOURCES,
                               SUCCESS, WARNING_COERCED_MISMATCH, StoreResult)
from dicomagent.dimse.commands import C_STORE_RQ, C_STORE_RSP
from dicomagent.services import Initiation, ServiceClass, Status
from dicomagent.uids import UNCOMPRESSED_TRANSFER_SYNTAXES

log = logging.getLogger("dicomagent.storage")

#: Seed Table 2: Storage SOP Classes, SCU and SCP.
TABLE_2 = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.20": "Nuclear Medicine Image Storage",
    "1.2.840.10008.5.1.4.1.1.128": "Positron Emission Tomography Image Storage",
    "1.2.840.10008.5.1.4.1.1.481.1": "RT Image Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image Storage",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image Storage",
    "1.2.840.10008.5.1.4.1.1.12.1": "X-Ray Angiographic Image Storage",
    "1.2.840.10008.5.1.4.1.1.12.2": "X-Ray Radiofluoroscopic Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.2": "Digital Mammography X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "Digital Mammography X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.3": "Digital Intra-Oral X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.3.1": "Digital Intra-Oral X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.77.1.1": "VL Endoscopic Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.2": "VL Microscopic Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.3": "VL Slide-Coordinates Microscopic Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "VL Photographic Image Storage",
    "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State Storage",
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.50": "Mammography CAD SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection Document Storage",
}


def all_storage_sop_classes() -> dict[str, str]:
    """Every Storage SOP Class in pydicom's UID registry, with the seed's Table 2."""
    found = {uid: entry[0] for uid, entry in UID_dictionary.items()
             if entry[1] == "SOP Class" and "Storage" in entry[0]
             and "Storage Commitment" not in entry[0]}
    return {**found, **TABLE_2}


#: Transfer syntaxes accepted with ``storage.accept_compressed``: every one pydicom knows.
ALL_TRANSFER_SYNTAXES = tuple(str(uid) for uid in pydicom.uid.AllTransferSyntaxes)


def open_c_store_sink(association, context, command: C_STORE_RQ):
    """The sink for a C-STORE data set: a temporary file in the archive (or a refusal)."""
    return association.agent.archive.open_incoming(
        command.AffectedSOPClassUID or "", command.AffectedSOPInstanceUID or "",
        context.transfer_syntax, association.calling_ae_title)


def handle_c_store(association, context, received) -> None:
    """PS3.4 B.2: file the received data set, then answer with its status.

    Filing is done at once when it is only a header walk and a link (or the
    association is the only one: ``Archive.receive``); otherwise (flushes
    with ``storage.fsync``) the archive's filer thread does it and the
    response goes out from its completion (``when_done``).
    """
    request: C_STORE_RQ = received.command
    agent = association.agent
    outcome = agent.archive.receive(received.data_set, alone=len(agent.associations) == 1)
    if type(outcome) is StoreResult:
        _respond(association, context, request, outcome)
    else:
        association.when_done(outcome,
                              lambda result: _respond(association, context, request, result))
    # The response goes out when this returns; then, while the sender prepares its
    # next request, the event loop makes a file for a later data set.
    association.loop.call_soon(agent.archive.make_spare)


def _respond(association, context, request: C_STORE_RQ, result: StoreResult) -> None:
    """Send the C-STORE-RSP with the archive's status (seed Table 67), and count it.

    A refusal is logged by the archive, one line with its reason; what was
    stored is summed up in the association's closing log line (each object
    at DEBUG level: a line per object would cost a good part of its time).
    """
    association.send_message(context.context_id, C_STORE_RSP(
        AffectedSOPClassUID=request.AffectedSOPClassUID,
        MessageIDBeingRespondedTo=request.MessageID,
        Status=result.status,
        AffectedSOPInstanceUID=request.AffectedSOPInstanceUID,
        ErrorComment=result.comment[:64] if result.status not in (0, ) and result.comment
        else None))
    counts = association.counts
    if result.status == SUCCESS or result.status == WARNING_COERCED_MISMATCH:
        counts["C-STORE stored"] += 1
        if result.status != SUCCESS:
            counts["C-STORE stored with warning"] += 1
        log.debug("%s C-STORE %s: stored %s", association.describe(),
                  request.AffectedSOPInstanceUID, result.path)
    else:
        counts["C-STORE failed"] += 1
        log.debug("%s C-STORE %s: status 0x%04X %s", association.describe(),
                  request.AffectedSOPInstanceUID, result.status, result.comment)


def service(settings) -> ServiceClass:
    """The Storage service class as the configuration shapes it."""
    sop_classes = all_storage_sop_classes() if settings.accept_all_storage_classes else TABLE_2
    return ServiceClass(
        name="Storage",
        reference="PS3.4 Annex B",
        sop_classes=dict(sop_classes),
        scp=True,
        scu=True,           # C-GET sub-operations: the requestor proposes the SCP role
        transfer_syntaxes=ALL_TRANSFER_SYNTAXES if settings.accept_compressed
        else UNCOMPRESSED_TRANSFER_SYNTAXES,
        handlers={C_STORE_RQ: handle_c_store},
        sinks={C_STORE_RQ: open_c_store_sink},
        statuses={C_STORE_RQ: STATUSES},
        initiates=INITIATES,
    )


#: C-STORE-RSP statuses (seed Table 67); the archive decides them (``dicomagent.archive``).
STATUSES = (
    Status(SUCCESS, "Stored: on stable storage (storage.fsync), in the index a moment "
                    "later, before the association is released"),
    Status(WARNING_COERCED_MISMATCH, "Stored, although the data set's SOP Class/Instance UID "
                                     "differ from the command (storage.accept_mismatch)"),
    Status(OUT_OF_RESOURCES, "Out of resources: less free space than storage.min_free_mb, "
                             "or the file could not be written"),
    Status(DATA_SET_DOES_NOT_MATCH, "Data set does not match the SOP Class/Instance of the "
                                    "command"),
    Status(CANNOT_UNDERSTAND, "Cannot understand: the data set cannot be parsed, or lacks "
                              "its SOP, Study or Series UIDs"),
)

INITIATES = (
    Initiation("SCU", "store", "send DICOM files and folders (C-STORE-RQ), each in its own "
               "transfer syntax or converted among the uncompressed ones; proposes the SOP "
               "classes of the files, Storage SOP Classes not accepted by the daemon "
               "included"),
    Initiation("SCU", "", "C-STORE sub-operations of a C-MOVE the daemon serves, on an "
               "association to the Move Destination (a [peers] entry)"),
    Initiation("SCP", "get", "receive the objects of a C-GET on the same association "
               "(SCP/SCU Role Selection: the agent proposes the SCP role)"),
)
