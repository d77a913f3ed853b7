"""DIMSE-N requests as an SCU: N-CREATE, N-SET and N-ACTION on an open association.

The SCU side of the procedure steps (``dicomagent mpps``, ``gpsps action``,
``gppps``) and of MPPS forwarding (``dicomagent.forward``): send the request
with its data set, wait for the response, return its status.

``sop_class_uid`` is the SOP class of the request; ``abstract_syntax`` the
presentation context to send it on, when that is a meta SOP class (e.g. the
General Purpose Worklist Management Meta SOP Class) rather than the class itself.

References
----------
PS3.7 §10.1.5 (N-CREATE), §10.1.3 (N-SET), Annex C (status classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import pydicom

from dicomagent.association import RequestorAssociation
from dicomagent.dimse.commands import DATA_SET_PRESENT, N_ACTION_RQ, N_CREATE_RQ, N_SET_RQ
from dicomagent.transcode import encode


@dataclass
class NResult:
    """What the SCP answered."""

    status: int
    sop_instance_uid: str
    error_comment: str = ""


async def n_create(association: RequestorAssociation, sop_class_uid: str,
                   sop_instance_uid: str | None, ds: pydicom.Dataset,
                   abstract_syntax: str | None = None) -> NResult:
    """N-CREATE-RQ (PS3.7 §10.1.5.1); ``sop_instance_uid`` None lets the SCP choose."""
    context = association.context_for(abstract_syntax or sop_class_uid)
    response = await association.request(context.context_id, N_CREATE_RQ(
        AffectedSOPClassUID=sop_class_uid, MessageID=association.next_message_id(),
        CommandDataSetType=DATA_SET_PRESENT, AffectedSOPInstanceUID=sop_instance_uid),
        encode(ds, context.transfer_syntax))
    command = response.command
    return NResult(command.Status, command.AffectedSOPInstanceUID or sop_instance_uid or "",
                   command.ErrorComment or "")


async def n_set(association: RequestorAssociation, sop_class_uid: str, sop_instance_uid: str,
                ds: pydicom.Dataset, abstract_syntax: str | None = None) -> NResult:
    """N-SET-RQ (PS3.7 §10.1.3.1): the Modification List in ``ds``."""
    context = association.context_for(abstract_syntax or sop_class_uid)
    response = await association.request(context.context_id, N_SET_RQ(
        RequestedSOPClassUID=sop_class_uid, MessageID=association.next_message_id(),
        CommandDataSetType=DATA_SET_PRESENT, RequestedSOPInstanceUID=sop_instance_uid),
        encode(ds, context.transfer_syntax))
    command = response.command
    return NResult(command.Status, sop_instance_uid, command.ErrorComment or "")


async def n_action(association: RequestorAssociation, sop_class_uid: str, sop_instance_uid: str,
                   action_type_id: int, ds: pydicom.Dataset,
                   abstract_syntax: str | None = None) -> NResult:
    """N-ACTION-RQ (PS3.7 §10.1.4.1): the Action Information in ``ds``."""
    context = association.context_for(abstract_syntax or sop_class_uid)
    response = await association.request(context.context_id, N_ACTION_RQ(
        RequestedSOPClassUID=sop_class_uid, MessageID=association.next_message_id(),
        CommandDataSetType=DATA_SET_PRESENT, RequestedSOPInstanceUID=sop_instance_uid,
        ActionTypeID=action_type_id), encode(ds, context.transfer_syntax))
    command = response.command
    return NResult(command.Status, sop_instance_uid, command.ErrorComment or "")
