"""PS3.4 Annex C: Query/Retrieve Service Class — C-FIND, C-MOVE and C-GET SCP.

Study Root (the seed's Tables 3-4) and Patient Root information models, over
the archive's index. C-FIND statuses are the seed's Table 40, C-MOVE's its
Table 65; C-GET (beyond the seed) follows PS3.4 C.4.3.

References
----------
PS3.4 C.4.1 (C-FIND SCP), C.4.2 (C-MOVE SCP), C.4.3 (C-GET SCP), C.6 (models);
PS3.7 §9.1.2-9.1.4.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import pydicom

from dicomagent.archive.index import unpack_attrs
from dicomagent.archive.query import (COMPUTED_SQL, JOINED, QueryError, computed_visible,
                                      item_matches, plan_query, vr_of)
from dicomagent.association import AssociationError, associate
from dicomagent.dimse.commands import (C_FIND_RQ, C_FIND_RSP, C_GET_RQ, C_GET_RSP, C_MOVE_RQ,
                                       C_MOVE_RSP, DATA_SET_PRESENT, NO_DATA_SET)
from dicomagent.dimse.status import StatusCategory, category
from dicomagent.archive import keys
from dicomagent.services import Initiation, KeyGroup, ServiceClass, Status
from dicomagent.jsonencode import Unsupported, encode_json
from dicomagent.transcode import decode, encode

log = logging.getLogger("dicomagent.qr")

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"

MODEL = {
    PATIENT_ROOT_FIND: "patient", PATIENT_ROOT_MOVE: "patient", PATIENT_ROOT_GET: "patient",
    STUDY_ROOT_FIND: "study", STUDY_ROOT_MOVE: "study", STUDY_ROOT_GET: "study",
}

SUCCESS, PENDING, PENDING_WARNING, CANCEL = 0x0000, 0xFF00, 0xFF01, 0xFE00
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC001               # C-FIND
MOVE_DESTINATION_UNKNOWN = 0xA801
UNABLE_TO_PERFORM_SUBOPERATIONS = 0xA702
MOVE_UNABLE_TO_PROCESS = 0xC002
SUBOPERATIONS_WITH_FAILURES = 0xB000

BATCH = 100


def _ae_title_of(association) -> str:
    return association.agent.config.agent.ae_title


def build_response(query, row, identifier: pydicom.Dataset, retrieve_ae_title: str
                   ) -> dict | None:
    """The response identifier (DICOM JSON) for one matching row; None if a sequence
    key does not match."""
    joined = len(JOINED[query.level])
    merged: dict = {}
    for blob in row[:joined]:
        merged.update(unpack_attrs(blob))
    for _, tag, item in query.sequence_filters:
        stored = merged.get(f"{tag:08X}")
        if stored is None:
            return None
        items = pydicom.Dataset.from_json({f"{tag:08X}": stored})[tag].value
        if not item_matches(item, list(items)):
            return None
    computed = iter(row[joined:])
    out: dict = {}
    for tag in query.return_tags:
        key = f"{tag:08X}"
        if tag in COMPUTED_SQL and computed_visible(tag, query.level):
            value = next(computed)
            vr = vr_of(tag)
            if tag == 0x00080061:
                out[key] = {"vr": vr, "Value": value.split("\\")} if value else {"vr": vr}
            else:
                out[key] = {"vr": vr, "Value": [int(value)]}
        elif key in merged:
            out[key] = merged[key]
        else:
            element = identifier[tag]
            out[key] = {"vr": element.VR if element.VR not in ("UN", "OB or OW", "US or SS")
                        else vr_of(tag)}
    out["00080052"] = {"vr": "CS", "Value": [query.level]}
    out["00080054"] = {"vr": "AE", "Value": [retrieve_ae_title]}
    if "00080005" in merged:
        out["00080005"] = merged["00080005"]
    return out


def encode_response(response: dict, transfer_syntax: str) -> bytes:
    """Encode a response identifier: directly, or through pydicom for what ``jsonencode``
    leaves to it."""
    try:
        return encode_json(response, transfer_syntax)
    except Unsupported:
        return encode(pydicom.Dataset.from_json(response), transfer_syntax)


async def _rows(association, sql: str, params: list):
    """The query's rows in batches, read on the archive's reader thread, once the index
    holds every object acknowledged before the query (indexing follows filing)."""
    archive = association.agent.archive
    loop = asyncio.get_running_loop()
    pending = archive.caught_up()
    if pending is not None:
        await asyncio.wrap_future(pending)
    cursor = await loop.run_in_executor(archive.reader, archive.execute, sql, params)
    while True:
        rows = await loop.run_in_executor(archive.reader, cursor.fetchmany, BATCH)
        if not rows:
            return
        yield rows


def _read_identifier(received, context):
    return decode(received.data_set or b"", context.transfer_syntax)


def c_find_responder(association, context, request: C_FIND_RQ):
    """``respond(status, identifier=None, comment=None)``: one C-FIND-RSP to ``request``,
    with the response identifier (DICOM JSON) when there is one (PS3.7 §9.3.2.2)."""

    def respond(status: int, data: dict | None = None, comment: str | None = None):
        association.send_message(context.context_id, C_FIND_RSP(
            AffectedSOPClassUID=request.AffectedSOPClassUID,
            MessageIDBeingRespondedTo=request.MessageID,
            CommandDataSetType=DATA_SET_PRESENT if data is not None else NO_DATA_SET,
            Status=status, ErrorComment=comment),
            encode_response(data, context.transfer_syntax) if data is not None else None)

    return respond


async def handle_c_find(association, context, received) -> None:
    """PS3.4 C.4.1.3: match the identifier and return each match as a pending response."""
    request: C_FIND_RQ = received.command
    message_id = request.MessageID
    respond = c_find_responder(association, context, request)

    extended = association.extended.get(context.abstract_syntax, b"")
    try:
        identifier = _read_identifier(received, context)
        query = plan_query(identifier, MODEL[context.abstract_syntax],
                           combine_date_time=extended[1:2] == b"\x01")
    except QueryError as error:
        log.warning("%s C-FIND refused: %s", association.describe(), error.comment)
        respond(error.status, comment=error.comment[:64])
        return
    except Exception as error:  # noqa: BLE001 - an identifier pydicom cannot read
        log.warning("%s C-FIND identifier cannot be read: %s", association.describe(), error)
        respond(IDENTIFIER_DOES_NOT_MATCH, comment="identifier cannot be parsed")
        return
    pending = PENDING_WARNING if query.unsupported else PENDING
    retrieve_ae_title = _ae_title_of(association)
    matches = 0
    try:
        async for rows in _rows(association, query.sql, query.params):
            for row in rows:
                if message_id in association.cancelled:
                    association.cancelled.discard(message_id)
                    log.info("%s C-FIND %s level: cancelled after %d matches",
                             association.describe(), query.level, matches)
                    respond(CANCEL)
                    return
                response = build_response(query, row, identifier, retrieve_ae_title)
                if response is None:
                    continue
                matches += 1
                respond(pending, response)
            await association.ul.drain()
            await asyncio.sleep(0)          # let a C-CANCEL-RQ in
    except Exception as error:  # noqa: BLE001 - a database failure
        log.error("%s C-FIND failed: %s", association.describe(), error)
        respond(UNABLE_TO_PROCESS, comment="unable to process")
        return
    if message_id in association.cancelled:
        association.cancelled.discard(message_id)
        respond(CANCEL)
        return
    log.info("%s C-FIND %s level (%s root): %d matches", association.describe(), query.level,
             query.model, matches)
    respond(SUCCESS)


async def _matching_files(association, identifier, model) -> list:
    """The files of the instances an identifier selects (for C-MOVE and C-GET)."""
    from dicomagent.store import LocalFile
    query = plan_query(identifier, model, select_files=True)
    data_dir = association.agent.archive.data_dir
    files = []
    async for rows in _rows(association, query.sql, query.params):
        for path, sop_class, sop_instance, transfer_syntax in rows:
            files.append(LocalFile(os.path.join(data_dir, path), sop_class, sop_instance,
                                   transfer_syntax, -1))
    return files


#: Seconds between two Pending C-MOVE / C-GET responses. PS3.4 C.4.2.3.1 / C.4.3.3.1: the
#: SCP "may optionally" send them; one per sub-operation costs a PDU per object on the
#: requestor's association, a few a second is progress enough.
PENDING_INTERVAL = 0.2


class _SubOperations:
    """Counts of C-MOVE / C-GET sub-operations (PS3.7 §9.3.3.2, §9.3.4.2)."""

    def __init__(self, total: int):
        self.remaining = total
        self._reported_at = 0.0
        self.completed = self.failed = self.warning = 0
        self.failed_uids: list[str] = []

    def record(self, sop_instance_uid: str, status: int) -> None:
        self.remaining -= 1
        kind = category(status) if status >= 0 else StatusCategory.FAILURE
        if kind is StatusCategory.SUCCESS:
            self.completed += 1
        elif kind is StatusCategory.WARNING:
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(sop_instance_uid)

    def pending_due(self) -> bool:
        """True when a Pending response should go now (sub-operations remain, and the last
        one went ``PENDING_INTERVAL`` ago)."""
        now = time.monotonic()
        if self.remaining and now - self._reported_at >= PENDING_INTERVAL:
            self._reported_at = now
            return True
        return False

    def fields(self, final: bool) -> dict:
        return dict(NumberOfRemainingSuboperations=None if final else self.remaining,
                    NumberOfCompletedSuboperations=self.completed,
                    NumberOfFailedSuboperations=self.failed,
                    NumberOfWarningSuboperations=self.warning)

    def failed_identifier(self, level: str) -> pydicom.Dataset | None:
        """PS3.4 C.4.2.1.4.2: the Failed SOP Instance UID List, with the level."""
        if not self.failed_uids:
            return None
        ds = pydicom.Dataset()
        ds.QueryRetrieveLevel = level
        ds.FailedSOPInstanceUIDList = self.failed_uids
        return ds


async def _retrieve_request(association, context, received, respond, what: str):
    """(level, files) a C-MOVE / C-GET identifier selects; or None once the failure
    (A900 and the like) has been answered."""
    try:
        identifier = _read_identifier(received, context)
        level = str(identifier.get("QueryRetrieveLevel", ""))
        files = await _matching_files(association, identifier, MODEL[context.abstract_syntax])
    except QueryError as error:
        respond(error.status, comment=error.comment[:64])
        return None
    except Exception as error:  # noqa: BLE001 - an identifier pydicom cannot read
        log.warning("%s %s identifier not usable: %s", association.describe(), what, error)
        respond(IDENTIFIER_DOES_NOT_MATCH, comment="identifier cannot be parsed")
        return None
    return level, files


def _retrieve_responder(association, context, request, response_class):
    """``respond(status, counts, final, data, comment)`` for C-MOVE-RSP / C-GET-RSP."""

    def respond(status: int, counts: _SubOperations | None = None, final: bool = True,
                data: pydicom.Dataset | None = None, comment: str | None = None) -> None:
        association.send_message(context.context_id, response_class(
            AffectedSOPClassUID=request.AffectedSOPClassUID,
            MessageIDBeingRespondedTo=request.MessageID,
            CommandDataSetType=DATA_SET_PRESENT if data is not None else NO_DATA_SET,
            Status=status, ErrorComment=comment,
            **(counts.fields(final) if counts else {})),
            encode(data, context.transfer_syntax) if data is not None else None)

    return respond


def _final_status(counts: _SubOperations) -> int:
    if counts.failed or counts.warning:
        return SUBOPERATIONS_WITH_FAILURES
    return SUCCESS


async def handle_c_move(association, context, received) -> None:
    """PS3.4 C.4.2.3: send the matching instances to the Move Destination, a known peer."""
    from dicomagent.store import plan_associations, read_local_file, send_one
    request: C_MOVE_RQ = received.command
    message_id = request.MessageID

    respond = _retrieve_responder(association, context, request, C_MOVE_RSP)

    peer = association.agent.config.peer_by_ae_title(request.MoveDestination or "")
    if peer is None:
        log.warning("%s C-MOVE to unknown destination %r: A801", association.describe(),
                    request.MoveDestination)
        respond(MOVE_DESTINATION_UNKNOWN, comment="Move Destination unknown")
        return
    found = await _retrieve_request(association, context, received, respond, "C-MOVE")
    if found is None:
        return
    level, files = found
    counts = _SubOperations(len(files))
    if not files:
        respond(SUCCESS, counts)
        return
    ae_title = _ae_title_of(association)
    timeouts = association.agent.config.timeouts
    for contexts, members in plan_associations(files):
        try:
            destination = await associate(peer.host, peer.port, ae_title, peer.ae_title, contexts,
                                          artim_timeout=timeouts.artim,
                                          dimse_timeout=timeouts.dimse,
                                          network_timeout=timeouts.network)
        except AssociationError as error:
            log.warning("%s C-MOVE: cannot associate with %s: %s", association.describe(),
                        peer.ae_title, error)
            for local in members:
                counts.record(local.sop_instance_uid, -1)
            if counts.completed == 0 and counts.warning == 0 and counts.remaining == 0:
                respond(UNABLE_TO_PERFORM_SUBOPERATIONS, counts,
                        data=counts.failed_identifier(level),
                        comment="cannot associate with the destination")
                return
            continue
        try:
            for local in members:
                if message_id in association.cancelled:
                    association.cancelled.discard(message_id)
                    respond(CANCEL, counts, final=False)
                    return
                try:
                    status, _ = await send_one(destination, read_local_file(local.path),
                                               (association.calling_ae_title, message_id))
                except (OSError, ValueError) as error:
                    log.warning("%s C-MOVE: %s not sent: %s", association.describe(),
                                local.path, error)
                    status = -1
                counts.record(local.sop_instance_uid, status)
                if counts.pending_due():
                    respond(PENDING, counts, final=False)
        except AssociationError as error:
            log.warning("%s C-MOVE: association with %s failed: %s", association.describe(),
                        peer.ae_title, error)
            for local in members[members.index(local):]:
                counts.record(local.sop_instance_uid, -1)
        finally:
            await destination.release()
    status = _final_status(counts)
    log.info("%s C-MOVE to %s: %d completed, %d failed, %d warning", association.describe(),
             peer.ae_title, counts.completed, counts.failed, counts.warning)
    respond(status, counts, data=counts.failed_identifier(level))


async def handle_c_get(association, context, received) -> None:
    """PS3.4 C.4.3.3: send the matching instances back on this association (C-STORE
    sub-operations on the storage contexts where the requestor took the SCP role)."""
    from dicomagent.store import read_local_file, send_one
    request: C_GET_RQ = received.command
    message_id = request.MessageID

    respond = _retrieve_responder(association, context, request, C_GET_RSP)

    found = await _retrieve_request(association, context, received, respond, "C-GET")
    if found is None:
        return
    level, files = found
    counts = _SubOperations(len(files))
    for local in files:
        if message_id in association.cancelled:
            association.cancelled.discard(message_id)
            respond(CANCEL, counts, final=False)
            return
        try:
            status, _ = await send_one(association, read_local_file(local.path), as_acceptor=True)
        except (OSError, ValueError) as error:
            log.warning("%s C-GET: %s not sent: %s", association.describe(), local.path, error)
            status = -1
        counts.record(local.sop_instance_uid, status)
        if counts.pending_due():
            respond(PENDING, counts, final=False)
    status = _final_status(counts)
    if files and counts.failed == len(files):
        status = UNABLE_TO_PERFORM_SUBOPERATIONS
    log.info("%s C-GET: %d completed, %d failed, %d warning", association.describe(),
             counts.completed, counts.failed, counts.warning)
    respond(status, counts, data=counts.failed_identifier(level))


def find_extended_negotiation(requested: bytes) -> bytes | None:
    """PS3.4 C.5.1.1.2 (Table C.5-1): answer the C-FIND extended negotiation.

    Byte 1 relational-queries: not supported (0). Byte 2 combined date-time
    matching: supported, as requested. Bytes 3-4 (fuzzy semantic matching,
    timezone query adjustment): not supported. The answer has the request's length.
    """
    if not requested:
        return None
    answer = bytearray(len(requested))
    if len(requested) >= 2:
        answer[1] = 1 if requested[1] == 1 else 0
    return bytes(answer)


#: PS3.4 Table C.5-1: the bytes of the C-FIND service-class-application-information.
FIND_EXTENDED_NEGOTIATION_FIELDS = ("relational-queries", "combined date-time matching",
                                    "fuzzy semantic matching of person names",
                                    "timezone query adjustment")

#: Seed Table 40 as the handler answers it (A700 of the seed is never returned).
FIND_STATUSES = (
    Status(SUCCESS, "Matching is complete"),
    Status(PENDING, "Matches are continuing: current match supplied, every optional key "
                    "supported"),
    Status(PENDING_WARNING, "Matches are continuing: an optional key with a value could not "
                            "be matched"),
    Status(CANCEL, "Matching terminated after C-CANCEL-RQ"),
    Status(IDENTIFIER_DOES_NOT_MATCH, "Identifier does not match SOP Class (bad level, unique "
                                      "key missing above the level, unreadable)"),
    Status(UNABLE_TO_PROCESS, "Unable to process (index failure)"),
)

#: Seed Table 65 as the handler answers it (A701 and C002 of the seed are never returned).
MOVE_STATUSES = (
    Status(SUCCESS, "Sub-operations complete, no failures"),
    Status(PENDING, "Sub-operations are continuing"),
    Status(CANCEL, "Sub-operations terminated after C-CANCEL-RQ"),
    Status(SUBOPERATIONS_WITH_FAILURES, "Sub-operations complete, one or more failures or "
                                        "warnings (Failed SOP Instance UID List)"),
    Status(UNABLE_TO_PERFORM_SUBOPERATIONS, "Refused: unable to perform sub-operations (the "
                                            "destination cannot be reached)"),
    Status(MOVE_DESTINATION_UNKNOWN, "Move Destination unknown (not a [peers] entry)"),
    Status(IDENTIFIER_DOES_NOT_MATCH, "Identifier does not match SOP Class"),
)

#: PS3.4 C.4.3.1.4 as the handler answers it.
GET_STATUSES = (
    Status(SUCCESS, "Sub-operations complete, no failures"),
    Status(PENDING, "Sub-operations are continuing"),
    Status(CANCEL, "Sub-operations terminated after C-CANCEL-RQ"),
    Status(SUBOPERATIONS_WITH_FAILURES, "Sub-operations complete, one or more failures or "
                                        "warnings (Failed SOP Instance UID List)"),
    Status(UNABLE_TO_PERFORM_SUBOPERATIONS, "Refused: every sub-operation failed"),
    Status(IDENTIFIER_DOES_NOT_MATCH, "Identifier does not match SOP Class"),
)

#: Seed Tables 41-48, by level, as the index keeps them (``dicomagent.archive.keys``).
QUERY_KEYS = (
    KeyGroup("PATIENT", keys.PATIENT_KEYS, "matched in the index and returned"),
    KeyGroup("STUDY", keys.STUDY_KEYS, "matched in the index and returned"),
    KeyGroup("STUDY (computed)", keys.STUDY_COMPUTED_KEYS,
             "computed by the index and returned; Modalities in Study is also matched"),
    KeyGroup("SERIES", keys.SERIES_KEYS, "matched in the index and returned"),
    KeyGroup("SERIES (computed)", keys.SERIES_COMPUTED_KEYS,
             "computed by the index and returned"),
    KeyGroup("IMAGE", keys.INSTANCE_KEYS, "matched in the index and returned"),
)

FIND = ServiceClass(
    name="Query/Retrieve - FIND",
    reference="PS3.4 C.4.1",
    sop_classes={STUDY_ROOT_FIND: "Study Root Query/Retrieve Information Model - FIND",
                 PATIENT_ROOT_FIND: "Patient Root Query/Retrieve Information Model - FIND"},
    handlers={C_FIND_RQ: handle_c_find},
    extended_negotiation=find_extended_negotiation,
    extended_negotiation_fields=FIND_EXTENDED_NEGOTIATION_FIELDS,
    statuses={C_FIND_RQ: FIND_STATUSES},
    query_keys=QUERY_KEYS,
    initiates=(Initiation("SCU", "find", "query a peer for patients, studies, series or "
                          "instances (C-FIND-RQ); C-CANCEL-RQ with --cancel-after",
                          extended_negotiation="combined date-time matching, with "
                          "--date-time-matching"),),
)

MOVE = ServiceClass(
    name="Query/Retrieve - MOVE",
    reference="PS3.4 C.4.2",
    sop_classes={STUDY_ROOT_MOVE: "Study Root Query/Retrieve Information Model - MOVE",
                 PATIENT_ROOT_MOVE: "Patient Root Query/Retrieve Information Model - MOVE"},
    handlers={C_MOVE_RQ: handle_c_move},
    statuses={C_MOVE_RQ: MOVE_STATUSES},
    initiates=(Initiation("SCU", "move", "have a peer send objects to an AE (C-MOVE-RQ)"),),
)

GET = ServiceClass(
    name="Query/Retrieve - GET",
    reference="PS3.4 C.4.3",
    sop_classes={STUDY_ROOT_GET: "Study Root Query/Retrieve Information Model - GET",
                 PATIENT_ROOT_GET: "Patient Root Query/Retrieve Information Model - GET"},
    handlers={C_GET_RQ: handle_c_get},
    statuses={C_GET_RQ: GET_STATUSES},
    initiates=(Initiation("SCU", "get", "fetch objects from a peer on the same association "
                          "(C-GET-RQ)"),),
)
