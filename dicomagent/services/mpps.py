"""PS3.4 Annex F: Modality Performed Procedure Step, SCP (and what it forwards).

A modality says with N-CREATE that it has started a procedure step (status
IN PROGRESS) and with N-SET how it goes on, until COMPLETED or DISCONTINUED,
after which the step is final. The agent:

- keeps each instance in the workflow store (``dicomagent.archive.workflow``);
- coerces patient identification and scheduling information from the
  worklist item the step performs (named by its Scheduled Step Attributes
  Sequence: Study Instance UID, Accession Number, Requested Procedure ID,
  Scheduled Procedure Step ID), so a RIS receives corrected data;
- removes that worklist item once the step is COMPLETED or DISCONTINUED;
- queues every accepted N-CREATE / N-SET, as coerced, for each peer of
  ``[mpps] forward_to`` in the same transaction that records it; the
  ``Forwarder`` (``dicomagent.forward``) delivers them in order.

Statuses: the seed's Tables 71-72 (0000; A900 when the data set cannot be
read or kept) and, where the seed is silent, PS3.4 F.7.2 / PS3.7 C.5:
0111 Duplicate SOP Instance, 0120 Missing Attribute (no Performed Procedure
Step Status in N-CREATE), 0106 Invalid Attribute Value (a status that is not
allowed), 0112 No Such SOP Instance (N-SET of an unknown instance), 0110
Processing Failure "Performed Procedure Step Object may no longer be
updated" (N-SET after COMPLETED or DISCONTINUED).

References
----------
PS3.4 F.7.2.1 (N-CREATE), F.7.2.2 (N-SET), F.7.1 (attributes); PS3.7 §10.1.3,
§10.1.5; seed 3.1.2.6, 3.1.3.6, Tables 7, 32, 70-72.
"""

from __future__ import annotations

import logging
import time

from pydicom.uid import generate_uid

from dicomagent.archive.workflow import DuplicateInstance, Outgoing, UnknownInstance
from dicomagent.dimse.commands import N_CREATE_RQ, N_SET_RQ
from dicomagent.dimse.status import (DUPLICATE_SOP_INSTANCE, INVALID_ATTRIBUTE_VALUE,
                                     MISSING_ATTRIBUTE, NO_SUCH_SOP_CLASS, NO_SUCH_SOP_INSTANCE,
                                     PROCESSING_FAILURE)
from dicomagent.services import Initiation, ServiceClass, Status
from dicomagent.services.procedure import (FAILED, PATIENT_KEYS, SUCCESS, Refused, answer,
                                           coerce_patient, data_set_json, text_of)

log = logging.getLogger("dicomagent.mpps")

MODALITY_PERFORMED_PROCEDURE_STEP = "1.2.840.10008.3.1.2.3.3"

IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
FINAL = (COMPLETED, DISCONTINUED)

STATUS_KEY = "00400252"                    # Performed Procedure Step Status
SCHEDULED_STEP_ATTRIBUTES_KEY = "00400270"  # Scheduled Step Attributes Sequence

#: Scheduling information of a Scheduled Step Attributes Sequence item taken from the
#: worklist item: top-level keys of the item, or keys of its scheduled step.
SCHEDULING_KEYS = ("0020000D",   # Study Instance UID
                   "00080050",   # Accession Number
                   "00401001",   # Requested Procedure ID
                   "00321060",   # Requested Procedure Description
                   "00081110")   # Referenced Study Sequence
STEP_KEYS = ("00400009",         # Scheduled Procedure Step ID
             "00400007",         # Scheduled Procedure Step Description
             "00400008")         # Scheduled Protocol Code Sequence (Scheduled Action Item)

#: worklist column -> key in a Scheduled Step Attributes Sequence item.
REFERENCE_COLUMNS = {"StudyInstanceUID": "0020000D", "AccessionNumber": "00080050",
                     "RequestedProcedureID": "00401001", "ScheduledProcedureStepID": "00400009"}


def coerce(attrs: dict, find_scheduled) -> list[int]:
    """Replace patient and scheduling information by the worklist's (in place).

    ``find_scheduled(reference)`` returns the (id, attrs) worklist rows that a
    Scheduled Step Attributes Sequence item names. Returns the ids of the
    worklist rows the step performs.
    """
    items = (attrs.get(SCHEDULED_STEP_ATTRIBUTES_KEY) or {}).get("Value") or []
    performed: list[int] = []
    for item in items:
        reference = {column: text_of(item, key) for column, key in REFERENCE_COLUMNS.items()}
        if not reference["StudyInstanceUID"] and not reference["ScheduledProcedureStepID"]:
            continue
        rows = find_scheduled(reference)
        if not rows:
            continue
        item_id, scheduled = rows[0]
        performed.append(item_id)
        coerce_patient(attrs, scheduled)
        for key in SCHEDULING_KEYS:
            if key in scheduled:
                item[key] = scheduled[key]
        step = ((scheduled.get("00400100") or {}).get("Value") or [{}])[0]
        for key in STEP_KEYS:
            if key in step:
                item[key] = step[key]
    return performed


def create(store, forward_to: list[str], sop_instance_uid: str, attrs: dict,
           calling_ae_title: str) -> list[int]:
    """On the workflow thread: coerce, keep, queue for forwarding; the worklist rows."""
    performed = coerce(attrs, store.find_scheduled)
    try:
        store.create_mpps(sop_instance_uid, text_of(attrs, STATUS_KEY), attrs, performed,
                          calling_ae_title,
                          [Outgoing(peer, "N-CREATE", MODALITY_PERFORMED_PROCEDURE_STEP,
                                    sop_instance_uid, attrs) for peer in forward_to])
    except DuplicateInstance:
        raise Refused(DUPLICATE_SOP_INSTANCE, "an instance with this SOP Instance UID exists")
    return performed


def update(store, forward_to: list[str], sop_instance_uid: str, modification: dict) -> str:
    """On the workflow thread: apply an N-SET's Modification List; the new status."""
    try:
        status, attrs, performed = store.get_mpps(sop_instance_uid)
    except UnknownInstance:
        raise Refused(NO_SUCH_SOP_INSTANCE, "no such Performed Procedure Step") from None
    if status in FINAL:
        raise Refused(PROCESSING_FAILURE,
                      "Performed Procedure Step Object may no longer be updated")
    if performed:
        # Coerced from the worklist: the modality does not overwrite it.
        for key in PATIENT_KEYS + (SCHEDULED_STEP_ATTRIBUTES_KEY,):
            modification.pop(key, None)
    new_status = text_of(modification, STATUS_KEY) if STATUS_KEY in modification else status
    if new_status not in (IN_PROGRESS, COMPLETED, DISCONTINUED):
        raise Refused(INVALID_ATTRIBUTE_VALUE,
                      f"Performed Procedure Step Status {new_status!r} is not allowed")
    attrs.update(modification)
    store.set_mpps(sop_instance_uid, new_status, attrs,
                   performed if new_status in FINAL else [],
                   [Outgoing(peer, "N-SET", MODALITY_PERFORMED_PROCEDURE_STEP,
                             sop_instance_uid, modification) for peer in forward_to])
    return new_status


async def handle_n_create(association, context, received) -> None:
    """PS3.4 F.7.2.1: a new performed procedure step, IN PROGRESS."""
    request: N_CREATE_RQ = received.command
    agent = association.agent
    sop_instance_uid = request.AffectedSOPInstanceUID or generate_uid()

    async def work():
        attrs = data_set_json(received, context)
        if STATUS_KEY not in attrs:
            raise Refused(MISSING_ATTRIBUTE, "Performed Procedure Step Status missing")
        if text_of(attrs, STATUS_KEY) != IN_PROGRESS:
            raise Refused(INVALID_ATTRIBUTE_VALUE,
                          "Performed Procedure Step Status must be IN PROGRESS")
        return await agent.in_workflow(create, agent.config.mpps.forward_to, sop_instance_uid,
                                       attrs, association.calling_ae_title)

    performed = await answer(association, context, received, MODALITY_PERFORMED_PROCEDURE_STEP,
                             sop_instance_uid, "MPPS N-CREATE", work)
    if performed is None:
        return
    log.info("%s MPPS N-CREATE %s: IN PROGRESS%s", association.describe(), sop_instance_uid,
             f" (worklist item {', '.join(map(str, performed))})" if performed else "")
    agent.forwarder.wake()


async def handle_n_set(association, context, received) -> None:
    """PS3.4 F.7.2.2: update a performed procedure step that is still IN PROGRESS."""
    request: N_SET_RQ = received.command
    agent = association.agent
    sop_instance_uid = request.RequestedSOPInstanceUID or ""

    async def work():
        return await agent.in_workflow(update, agent.config.mpps.forward_to, sop_instance_uid,
                                       data_set_json(received, context))

    status = await answer(association, context, received, MODALITY_PERFORMED_PROCEDURE_STEP,
                          sop_instance_uid, "MPPS N-SET", work)
    if status is None:
        return
    log.info("%s MPPS N-SET %s: %s", association.describe(), sop_instance_uid, status)
    agent.forwarder.wake()


def expire(store, lifetime_days: float, now: float | None = None) -> int:
    """Delete instances not updated for ``lifetime_days`` (seed 3.1.3.6.3)."""
    now = time.time() if now is None else now
    return store.expire_mpps(now - lifetime_days * 86400.0)


SERVICE = ServiceClass(
    name="Modality Performed Procedure Step",
    reference="PS3.4 Annex F",
    sop_classes={MODALITY_PERFORMED_PROCEDURE_STEP: "Modality Performed Procedure Step"},
    handlers={N_CREATE_RQ: handle_n_create, N_SET_RQ: handle_n_set},
    statuses={
        N_CREATE_RQ: (
            Status(SUCCESS, "Created, IN PROGRESS (coerced from the worklist item)"),
            Status(DUPLICATE_SOP_INSTANCE, "An instance with this SOP Instance UID exists"),
            Status(MISSING_ATTRIBUTE, "Performed Procedure Step Status missing"),
            Status(INVALID_ATTRIBUTE_VALUE, "Performed Procedure Step Status is not IN PROGRESS"),
            Status(FAILED, "Data set cannot be read, or the step cannot be kept"),
            Status(NO_SUCH_SOP_CLASS, "The request names another SOP class"),
        ),
        N_SET_RQ: (
            Status(SUCCESS, "Updated"),
            Status(NO_SUCH_SOP_INSTANCE, "No such Performed Procedure Step"),
            Status(PROCESSING_FAILURE, "Performed Procedure Step Object may no longer be "
                                       "updated (COMPLETED or DISCONTINUED)"),
            Status(INVALID_ATTRIBUTE_VALUE, "A Performed Procedure Step Status not allowed"),
            Status(FAILED, "Data set cannot be read, or the step cannot be updated"),
            Status(NO_SUCH_SOP_CLASS, "The request names another SOP class"),
        ),
    },
    initiates=(
        Initiation("SCU", "mpps", "a modality's N-CREATE-RQ / N-SET-RQ (mpps create, mpps set)"),
        Initiation("SCU", "", "forward every accepted N-CREATE / N-SET, as coerced, to each "
                   "peer of [mpps] forward_to, in order, from a durable outbox"),
    ),
)
