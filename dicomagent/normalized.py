"""DIMSE-N requests as an SCU: N-CREATE and N-SET on an open association.

The SCU side of the Modality Performed Procedure Step (``dicomagent mpps
create`` / ``set``) and of its forwarding (``dicomagent.forward``): send the
request with its data set, wait for the response, return its status.

References
----------
PS3.7 §10.1.5 (N-CREATE), §10.1.3 (N-SET), Annex C (status classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import pydicom

from dicomagent.association import RequestorAssociation
from dicomagent.dimse.commands import DATA_SET_PRESENT, N_CREATE_RQ, N_SET_RQ
from dicomagent.transcode import encode


@dataclass
class NResult:
    """What the SCP answered."""

    status: int
    sop_instance_uid: str
    error_comment: str = ""


async def n_create(association: RequestorAssociation, sop_class_uid: str,
                   sop_instance_uid: str | None, ds: pydicom.Dataset) -> NResult:
    """N-CREATE-RQ (PS3.7 §10.1.5.1); ``sop_instance_uid`` None lets the SCP choose."""
    context = association.context_for(sop_class_uid)
    response = await association.request(context.context_id, N_CREATE_RQ(
        AffectedSOPClassUID=sop_class_uid, MessageID=association.next_message_id(),
        CommandDataSetType=DATA_SET_PRESENT, AffectedSOPInstanceUID=sop_instance_uid),
        encode(ds, context.transfer_syntax))
    command = response.command
    return NResult(command.Status, command.AffectedSOPInstanceUID or sop_instance_uid or "",
                   command.ErrorComment or "")


async def n_set(association: RequestorAssociation, sop_class_uid: str, sop_instance_uid: str,
                ds: pydicom.Dataset) -> NResult:
    """N-SET-RQ (PS3.7 §10.1.3.1): the Modification List in ``ds``."""
    context = association.context_for(sop_class_uid)
    response = await association.request(context.context_id, N_SET_RQ(
        RequestedSOPClassUID=sop_class_uid, MessageID=association.next_message_id(),
        CommandDataSetType=DATA_SET_PRESENT, RequestedSOPInstanceUID=sop_instance_uid),
        encode(ds, context.transfer_syntax))
    command = response.command
    return NResult(command.Status, sop_instance_uid, command.ErrorComment or "")
