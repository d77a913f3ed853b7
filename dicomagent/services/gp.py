"""General Purpose Worklist, Scheduled and Performed Procedure Step, SCP.

The SOP classes of PS3.4 (editions up to 2010; later retired in favour of
Unified Procedure Step), as the seed describes them:

- General Purpose Worklist Information Model - FIND: C-FIND over the General
  Purpose Scheduled Procedure Steps still on the worklist (seed Tables
  58-63), matched like the Modality Worklist (``dicomagent.archive.worklist``);
- General Purpose Scheduled Procedure Step (GP-SPS): N-ACTION "Request GP-SPS
  Status Modification" moves a step SCHEDULED -> IN PROGRESS (which names a
  Transaction UID), IN PROGRESS -> SUSPENDED / COMPLETED / DISCONTINUED and
  SUSPENDED -> IN PROGRESS / DISCONTINUED; every change after the claim must
  repeat the Transaction UID. Nothing but the status and the Actual Human
  Performers is updated once the step left SCHEDULED, and a discontinued step
  is never changed again (seed 3.1.3.7.3);
- General Purpose Performed Procedure Step (GP-PPS): N-CREATE (status IN
  PROGRESS) referencing the GP-SPS it performs with that step's Transaction
  UID, then N-SET until COMPLETED or DISCONTINUED. The GP-SPS records it in
  its Resulting GP-PPS Sequence and leaves the worklist (seed 3.1.3.8.3);
  patient identification is coerced from the GP-SPS;
- the General Purpose Worklist Management Meta SOP Class, negotiated as one
  context that carries all three.

Statuses: seed Tables 74, 76, 77 (A501-A506) and, where the seed is silent,
PS3.7 C.5: 0123 No Such Action Type, 0112 No Such SOP Instance, 0111 Duplicate
SOP Instance, 0120 Missing Attribute, 0106 Invalid Attribute Value (a
transition the state diagram does not have, or a GP-PPS referencing an
unknown GP-SPS), A900 an unreadable data set.

References
----------
PS3.4 (2003) K.6.2 (General Purpose Worklist), the GP-SPS and GP-PPS SOP
classes of PS3.4 (2003) Annex F; seed 2.1.7-2.1.9, 3.1.3.2.7, 3.1.3.7, 3.1.3.8.
"""

from __future__ import annotations

import logging
import time

from pydicom.uid import generate_uid

from dicomagent.archive import worklist
from dicomagent.archive.workflow import DuplicateInstance, UnknownInstance
from dicomagent.dimse.commands import C_FIND_RQ, N_ACTION_RQ, N_CREATE_RQ, N_SET_RQ
from dicomagent.dimse.status import (DUPLICATE_SOP_INSTANCE, INVALID_ATTRIBUTE_VALUE,
                                     MISSING_ATTRIBUTE, NO_SUCH_ACTION_TYPE, NO_SUCH_SOP_CLASS,
                                     NO_SUCH_SOP_INSTANCE)
from dicomagent.services import Initiation, KeyGroup, ServiceClass, Status
from dicomagent.services.mwl import FIND_STATUSES, c_find_handler
from dicomagent.services.procedure import (FAILED, PATIENT_KEYS, SUCCESS, Refused, answer,
                                           coerce_patient, data_set_json, text_of)

log = logging.getLogger("dicomagent.gp")

GENERAL_PURPOSE_WORKLIST_META = "1.2.840.10008.5.1.4.32"
GENERAL_PURPOSE_WORKLIST_FIND = "1.2.840.10008.5.1.4.32.1"
GENERAL_PURPOSE_SCHEDULED_PROCEDURE_STEP = "1.2.840.10008.5.1.4.32.2"
GENERAL_PURPOSE_PERFORMED_PROCEDURE_STEP = "1.2.840.10008.5.1.4.32.3"

REQUEST_STATUS_MODIFICATION = 1       # N-ACTION Action Type ID of the GP-SPS

MAY_NO_LONGER_BE_UPDATED = 0xA501
WRONG_TRANSACTION_UID = 0xA502
ALREADY_IN_PROGRESS = 0xA503
SPS_NOT_IN_PROGRESS = 0xA504
TRANSACTION_UID_MISMATCH = 0xA505
PPS_NOT_IN_PROGRESS = 0xA506

SCHEDULED, IN_PROGRESS, SUSPENDED = "SCHEDULED", "IN PROGRESS", "SUSPENDED"
COMPLETED, DISCONTINUED = "COMPLETED", "DISCONTINUED"
FINAL = (COMPLETED, DISCONTINUED)

#: The GP-SPS state diagram: status -> the statuses an N-ACTION may move it to.
TRANSITIONS = {
    SCHEDULED: (IN_PROGRESS,),
    IN_PROGRESS: (SUSPENDED, COMPLETED, DISCONTINUED),
    SUSPENDED: (IN_PROGRESS, DISCONTINUED),
}

SPS_STATUS_KEY = "00404001"            # General Purpose Scheduled Procedure Step Status
PPS_STATUS_KEY = "00404002"            # General Purpose Performed Procedure Step Status
TRANSACTION_UID_KEY = "00081195"
ACTUAL_HUMAN_PERFORMERS_KEY = "00404035"
RESULTING_PPS_KEY = "00404015"         # Resulting General Purpose Performed Procedure Step Seq.
REFERENCED_SPS_KEY = "00404016"        # Referenced General Purpose Scheduled Procedure Step Seq.
REFERENCED_SPS_TRANSACTION_KEY = "00404023"
REFERENCED_SOP_CLASS_KEY, REFERENCED_SOP_INSTANCE_KEY = "00081150", "00081155"


def _uid_value(uid: str) -> dict:
    return {"vr": "UI", "Value": [uid]}


def new_step(ds_json: dict, uid: str) -> tuple[dict, dict]:
    """A GP-SPS to schedule: (columns, DICOM JSON) with status SCHEDULED (seed 3.1.3.7.3)."""
    attrs = {key: value for key, value in ds_json.items() if not key.startswith("0002")}
    attrs["00080016"] = _uid_value(GENERAL_PURPOSE_SCHEDULED_PROCEDURE_STEP)
    attrs["00080018"] = _uid_value(uid)
    attrs[SPS_STATUS_KEY] = {"vr": "CS", "Value": [SCHEDULED]}
    columns = {column.keyword: text_of(attrs, f"{column.tag:08X}")
               for column in worklist.GP_MATCHING_KEYS}
    return columns, dict(sorted(attrs.items()))


# --- GP-SPS: N-ACTION ----------------------------------------------------------------------

def modify_status(store, uid: str, request: dict) -> str:
    """On the workflow thread: "Request GP-SPS Status Modification"; the new status."""
    try:
        step = store.get_gpsps(uid)
    except UnknownInstance:
        raise Refused(NO_SUCH_SOP_INSTANCE, "no such General Purpose Scheduled Procedure Step")
    wanted = text_of(request, SPS_STATUS_KEY)
    if not wanted:
        raise Refused(MISSING_ATTRIBUTE, "GP-SPS Status (0040,4001) missing")
    transaction_uid = text_of(request, TRANSACTION_UID_KEY)
    status = step["status"]
    if status in FINAL:
        raise Refused(MAY_NO_LONGER_BE_UPDATED, f"the step is {status}")
    if wanted == IN_PROGRESS and status == IN_PROGRESS:
        raise Refused(ALREADY_IN_PROGRESS, "the step is already IN PROGRESS")
    if wanted not in TRANSITIONS.get(status, ()):
        raise Refused(INVALID_ATTRIBUTE_VALUE, f"no transition {status} -> {wanted}")
    if status == SCHEDULED:
        if not transaction_uid:
            raise Refused(MISSING_ATTRIBUTE, "Transaction UID (0008,1195) missing")
        step["transaction_uid"] = transaction_uid
    elif transaction_uid != step["transaction_uid"]:
        raise Refused(WRONG_TRANSACTION_UID, "not the Transaction UID of the claim")
    attrs = step["attrs"]
    attrs[SPS_STATUS_KEY] = {"vr": "CS", "Value": [wanted]}
    if ACTUAL_HUMAN_PERFORMERS_KEY in request:
        attrs[ACTUAL_HUMAN_PERFORMERS_KEY] = request[ACTUAL_HUMAN_PERFORMERS_KEY]
    step["status"] = wanted
    if wanted in FINAL:
        step["listed"] = False
    store.put_gpsps(uid, step)
    return wanted


async def handle_n_action(association, context, received) -> None:
    """"Request GP-SPS Status Modification" (seed 3.1.3.7.3)."""
    request: N_ACTION_RQ = received.command
    uid = request.RequestedSOPInstanceUID or ""

    async def work():
        if request.ActionTypeID != REQUEST_STATUS_MODIFICATION:
            raise Refused(NO_SUCH_ACTION_TYPE, f"Action Type ID {request.ActionTypeID}")
        return await association.agent.in_workflow(modify_status, uid,
                                                    data_set_json(received, context))

    status = await answer(association, context, received,
                          GENERAL_PURPOSE_SCHEDULED_PROCEDURE_STEP, uid, "GP-SPS N-ACTION", work)
    if status is not None:
        log.info("%s GP-SPS %s: %s", association.describe(), uid, status)


# --- GP-PPS: N-CREATE and N-SET ------------------------------------------------------------

def create_performed(store, uid: str, attrs: dict) -> list[str]:
    """On the workflow thread: a new GP-PPS; the GP-SPS it performs leave the worklist."""
    steps: dict[str, dict] = {}
    for item in (attrs.get(REFERENCED_SPS_KEY) or {}).get("Value") or []:
        step_uid = text_of(item, REFERENCED_SOP_INSTANCE_KEY)
        try:
            step = store.get_gpsps(step_uid)
        except UnknownInstance:
            raise Refused(INVALID_ATTRIBUTE_VALUE,
                          f"no General Purpose Scheduled Procedure Step {step_uid}"[:64])
        if step["status"] != IN_PROGRESS:
            raise Refused(SPS_NOT_IN_PROGRESS, f"the scheduled step is {step['status']}")
        if text_of(item, REFERENCED_SPS_TRANSACTION_KEY) != step["transaction_uid"]:
            raise Refused(TRANSACTION_UID_MISMATCH,
                          "not the Transaction UID of the scheduled step's claim")
        scheduled = step["attrs"]
        coerce_patient(attrs, scheduled)              # seed 3.1.3.8.3
        resulting = scheduled.setdefault(RESULTING_PPS_KEY, {"vr": "SQ", "Value": []})
        resulting.setdefault("Value", []).append({
            REFERENCED_SOP_CLASS_KEY: _uid_value(GENERAL_PURPOSE_PERFORMED_PROCEDURE_STEP),
            REFERENCED_SOP_INSTANCE_KEY: _uid_value(uid)})
        step["listed"] = False
        steps[step_uid] = step
    try:
        store.create_gppps(uid, IN_PROGRESS, attrs, steps)
    except DuplicateInstance:
        raise Refused(DUPLICATE_SOP_INSTANCE, "an instance with this SOP Instance UID exists")
    return list(steps)


def set_performed(store, uid: str, modification: dict) -> str:
    """On the workflow thread: N-SET of a GP-PPS that is IN PROGRESS; the new status."""
    try:
        status, attrs = store.get_gppps(uid)
    except UnknownInstance:
        raise Refused(NO_SUCH_SOP_INSTANCE, "no such General Purpose Performed Procedure Step")
    if status != IN_PROGRESS:
        raise Refused(PPS_NOT_IN_PROGRESS, f"the performed step is {status}")
    for key in PATIENT_KEYS + (REFERENCED_SPS_KEY,):
        modification.pop(key, None)                   # set at N-CREATE only
    new_status = text_of(modification, PPS_STATUS_KEY) if PPS_STATUS_KEY in modification \
        else status
    if new_status not in (IN_PROGRESS, COMPLETED, DISCONTINUED):
        raise Refused(INVALID_ATTRIBUTE_VALUE, f"GP-PPS Status {new_status!r} is not allowed")
    attrs.update(modification)
    store.set_gppps(uid, new_status, attrs)
    return new_status


async def handle_n_create(association, context, received) -> None:
    """A new GP-PPS, IN PROGRESS, performing the GP-SPS it references."""
    request: N_CREATE_RQ = received.command
    uid = request.AffectedSOPInstanceUID or generate_uid()

    async def work():
        attrs = data_set_json(received, context)
        if PPS_STATUS_KEY not in attrs:
            raise Refused(MISSING_ATTRIBUTE, "GP-PPS Status (0040,4002) missing")
        if text_of(attrs, PPS_STATUS_KEY) != IN_PROGRESS:
            raise Refused(INVALID_ATTRIBUTE_VALUE, "GP-PPS Status must be IN PROGRESS")
        return await association.agent.in_workflow(create_performed, uid, attrs)

    steps = await answer(association, context, received,
                         GENERAL_PURPOSE_PERFORMED_PROCEDURE_STEP, uid, "GP-PPS N-CREATE", work)
    if steps is not None:
        log.info("%s GP-PPS N-CREATE %s: IN PROGRESS%s", association.describe(), uid,
                 f" (performs {', '.join(steps)})" if steps else "")


async def handle_n_set(association, context, received) -> None:
    """N-SET of a GP-PPS that is still IN PROGRESS."""
    request: N_SET_RQ = received.command
    uid = request.RequestedSOPInstanceUID or ""

    async def work():
        return await association.agent.in_workflow(set_performed, uid,
                                                    data_set_json(received, context))

    status = await answer(association, context, received,
                          GENERAL_PURPOSE_PERFORMED_PROCEDURE_STEP, uid, "GP-PPS N-SET", work)
    if status is not None:
        log.info("%s GP-PPS N-SET %s: %s", association.describe(), uid, status)


def expire(store, lifetime_days: float, now: float | None = None) -> int:
    """Seed 3.1.3.7.3 / 3.1.3.8.3: GP-SPS (once final) and GP-PPS instance lifetime."""
    now = time.time() if now is None else now
    return store.expire_gp(now - lifetime_days * 86400.0)


_find = c_find_handler(worklist.GENERAL_PURPOSE)

ACTION_STATUSES = (
    Status(SUCCESS, "Status modified"),
    Status(MAY_NO_LONGER_BE_UPDATED, "Step may no longer be updated (COMPLETED or "
                                     "DISCONTINUED)"),
    Status(WRONG_TRANSACTION_UID, "Wrong Transaction UID (not the one of the claim)"),
    Status(ALREADY_IN_PROGRESS, "Step is already IN PROGRESS"),
    Status(NO_SUCH_ACTION_TYPE, "Action Type ID is not 1 (Request GP-SPS Status Modification)"),
    Status(NO_SUCH_SOP_INSTANCE, "No such General Purpose Scheduled Procedure Step"),
    Status(MISSING_ATTRIBUTE, "GP-SPS Status, or the claim's Transaction UID, missing"),
    Status(INVALID_ATTRIBUTE_VALUE, "A transition the state diagram does not have"),
    Status(FAILED, "Data set cannot be read, or the step cannot be updated"),
    Status(NO_SUCH_SOP_CLASS, "The request names another SOP class"),
)
CREATE_STATUSES = (
    Status(SUCCESS, "Created, IN PROGRESS; the GP-SPS it performs leaves the worklist"),
    Status(SPS_NOT_IN_PROGRESS, "The referenced GP-SPS is not IN PROGRESS"),
    Status(TRANSACTION_UID_MISMATCH, "Referenced GP-SPS Transaction UID is not the one of "
                                     "the claim"),
    Status(DUPLICATE_SOP_INSTANCE, "An instance with this SOP Instance UID exists"),
    Status(MISSING_ATTRIBUTE, "GP-PPS Status missing"),
    Status(INVALID_ATTRIBUTE_VALUE, "GP-PPS Status is not IN PROGRESS, or an unknown GP-SPS "
                                    "is referenced"),
    Status(FAILED, "Data set cannot be read, or the step cannot be kept"),
    Status(NO_SUCH_SOP_CLASS, "The request names another SOP class"),
)
SET_STATUSES = (
    Status(SUCCESS, "Updated"),
    Status(PPS_NOT_IN_PROGRESS, "The GP-PPS is not IN PROGRESS"),
    Status(NO_SUCH_SOP_INSTANCE, "No such General Purpose Performed Procedure Step"),
    Status(INVALID_ATTRIBUTE_VALUE, "A GP-PPS Status not allowed"),
    Status(FAILED, "Data set cannot be read, or the step cannot be updated"),
    Status(NO_SUCH_SOP_CLASS, "The request names another SOP class"),
)

WORKLIST = ServiceClass(
    name="General Purpose Worklist", reference="PS3.4 (2003) K.6.2",
    sop_classes={GENERAL_PURPOSE_WORKLIST_FIND: "General Purpose Worklist Information Model - FIND"},
    handlers={C_FIND_RQ: _find},
    statuses={C_FIND_RQ: FIND_STATUSES},
    query_keys=(KeyGroup("General Purpose Scheduled Procedure Step", worklist.GP_MATCHING_KEYS,
                         "matched in the workflow store; any other key with a value is "
                         "matched on the candidate steps; every key asked for is returned"),),
    initiates=(Initiation("SCU", "gpwl", "query a General Purpose Worklist (C-FIND-RQ)"),))
SCHEDULED_STEP = ServiceClass(
    name="General Purpose Scheduled Procedure Step", reference="PS3.4 (2003) Annex F",
    sop_classes={GENERAL_PURPOSE_SCHEDULED_PROCEDURE_STEP:
                 "General Purpose Scheduled Procedure Step"},
    handlers={N_ACTION_RQ: handle_n_action},
    statuses={N_ACTION_RQ: ACTION_STATUSES},
    initiates=(Initiation("SCU", "gpsps", "claim, suspend, complete or discontinue a step "
                          "(N-ACTION-RQ, gpsps action)"),))
PERFORMED_STEP = ServiceClass(
    name="General Purpose Performed Procedure Step", reference="PS3.4 (2003) Annex F",
    sop_classes={GENERAL_PURPOSE_PERFORMED_PROCEDURE_STEP:
                 "General Purpose Performed Procedure Step"},
    handlers={N_CREATE_RQ: handle_n_create, N_SET_RQ: handle_n_set},
    statuses={N_CREATE_RQ: CREATE_STATUSES, N_SET_RQ: SET_STATUSES},
    initiates=(Initiation("SCU", "gppps", "record the work on a step (N-CREATE-RQ, N-SET-RQ: "
                          "gppps create, gppps set)"),))
#: The meta SOP class: one context for the three (seed Tables 8-10).
META = ServiceClass(
    name="General Purpose Worklist Management Meta", reference="PS3.4 (2003) Annex K",
    sop_classes={GENERAL_PURPOSE_WORKLIST_META: "General Purpose Worklist Management Meta"},
    handlers={C_FIND_RQ: _find, N_ACTION_RQ: handle_n_action, N_CREATE_RQ: handle_n_create,
              N_SET_RQ: handle_n_set},
    statuses={**WORKLIST.statuses, **SCHEDULED_STEP.statuses, **PERFORMED_STEP.statuses},
    initiates=(Initiation("SCU", "gpsps", "gpsps action --meta"),
               Initiation("SCU", "gppps", "gppps create --meta, gppps set --meta")))
