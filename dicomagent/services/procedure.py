"""What the procedure step SCPs share: reading a request, refusing it, answering it.

MPPS (``mpps``), GP-SPS and GP-PPS (``gp``) answer N-CREATE, N-SET and
N-ACTION the same way: the request's data set is read as DICOM JSON; the
work runs on the workflow thread and either succeeds (0000) or raises
``Refused`` with the status the standard gives for that case; anything else
that fails (the store) is answered with A900 and nothing is kept.

References
----------
PS3.7 §10.1.3 (N-SET), §10.1.4 (N-ACTION), §10.1.5 (N-CREATE), Annex C.
"""

from __future__ import annotations

import logging

from dicomagent.dimse.commands import MESSAGES, N_ACTION_RQ
from dicomagent.dimse.status import NO_SUCH_SOP_CLASS
from dicomagent.transcode import decode

log = logging.getLogger("dicomagent.procedure")

SUCCESS = 0x0000
FAILED = 0xA900                  # seed Tables 71-72: "Operation failed"


#: Patient identification a performed step takes from the step it performs (seed 3.1.3.6.3,
#: 3.1.3.8.3: "Coercion of attributes is permitted for the patient identification").
PATIENT_KEYS = ("00100010",   # Patient's Name
                "00100020",   # Patient ID
                "00100021",   # Issuer of Patient ID
                "00100030",   # Patient's Birth Date
                "00100040")   # Patient's Sex

#: Specific Character Set of a coerced data set: its values may come from two data sets
#: with different character sets; UTF-8 holds them all.
UTF8 = {"vr": "CS", "Value": ["ISO_IR 192"]}


def coerce_patient(attrs: dict, scheduled: dict) -> None:
    """Take the patient's identity from the scheduled step, wholesale (in place): a key the
    scheduled step lacks is emptied, so no identifier of the modality's stays beside the
    worklist's (an Issuer of Patient ID with another Patient ID)."""
    for key in PATIENT_KEYS:
        if key in scheduled:
            attrs[key] = scheduled[key]
        elif key in attrs:
            attrs[key] = {"vr": attrs[key].get("vr", "UN")}
    attrs["00080005"] = UTF8


class Refused(Exception):
    """A request answered with a failure status (and nothing changed)."""

    def __init__(self, status: int, comment: str):
        super().__init__(comment)
        self.status = status
        self.comment = comment


def text_of(attrs: dict, key: str) -> str:
    """The first value of a DICOM JSON attribute as text ("" when it has none)."""
    value = (attrs.get(key) or {}).get("Value") or [""]
    first = value[0]
    if isinstance(first, dict):                 # PN in DICOM JSON
        return first.get("Alphabetic", "")
    return str(first)


def data_set_json(received, context) -> dict:
    """The request's data set as DICOM JSON; ``Refused`` (A900) if it cannot be read."""
    try:
        return decode(received.data_set or b"", context.transfer_syntax).to_json_dict()
    except Exception as error:  # noqa: BLE001 - pydicom's many ways to fail on bad input
        raise Refused(FAILED, f"data set cannot be read: {error}"[:64]) from None


async def answer(association, context, received, sop_class_uid: str, sop_instance_uid: str,
                 what: str, work):
    """Await ``work()`` and answer the request with its outcome; the result of ``work``,
    or None when the request was refused or failed (and has been answered so).

    ``sop_class_uid`` is the class the operation belongs to: a request naming another
    (on a meta SOP class context, or a peer's mistake) is refused with 0118 and not done.
    """
    request = received.command
    response_class = MESSAGES[request.COMMAND_FIELD | 0x8000]
    named = getattr(request, "AffectedSOPClassUID", None) or \
        getattr(request, "RequestedSOPClassUID", None)

    def respond(status: int, comment: str | None = None) -> None:
        extra = {}
        if type(request) is N_ACTION_RQ and status == SUCCESS:
            extra["ActionTypeID"] = request.ActionTypeID
        association.send_message(context.context_id, response_class(
            AffectedSOPClassUID=sop_class_uid, MessageIDBeingRespondedTo=request.MessageID,
            Status=status, AffectedSOPInstanceUID=sop_instance_uid, ErrorComment=comment,
            **extra))

    try:
        if named != sop_class_uid:
            raise Refused(NO_SUCH_SOP_CLASS, f"{what} is not an operation of {named}"[:64])
        result = await work()
    except Refused as refused:
        log.warning("%s %s %s refused (%04X): %s", association.describe(), what,
                    sop_instance_uid, refused.status, refused.comment)
        respond(refused.status, refused.comment)
        return None
    except Exception as error:  # noqa: BLE001 - the store failed: nothing was kept
        log.error("%s %s %s failed: %s", association.describe(), what, sop_instance_uid, error)
        respond(FAILED, "the request could not be carried out")
        return None
    respond(SUCCESS)
    return result
