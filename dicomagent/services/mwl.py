"""PS3.4 Annex K: Modality Worklist Information Model - FIND, SCP.

The worklist lives in the workflow store (``dicomagent.archive.workflow``),
filled by ``dicomagent worklist add`` and emptied as performed procedure steps
complete (``dicomagent.services.mpps``). A C-FIND-RQ's identifier is matched
as ``dicomagent.archive.worklist`` describes; each matching item goes back as
a pending response with the keys asked for, then the final status: the
seed's Table 40 (0000, FF00, A900, C001, FE00 after C-CANCEL).

References
----------
PS3.4 K.4.1.3 (C-FIND SCP behaviour), K.6.1 (information model);
PS3.7 §9.1.2; seed 3.1.3.2.6, Tables 6, 40, 49-57.
"""

from __future__ import annotations

import asyncio
import logging

from dicomagent.archive import worklist
from dicomagent.dimse.commands import C_FIND_RQ
from dicomagent.services import Initiation, KeyGroup, ServiceClass, Status
from dicomagent.services.qr import c_find_responder
from dicomagent.transcode import decode

log = logging.getLogger("dicomagent.mwl")

MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"

SUCCESS, PENDING, CANCEL = 0x0000, 0xFF00, 0xFE00
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC001

#: Responses sent between two looks for a C-CANCEL-RQ.
BATCH = 50


def _find(store, query: worklist.WorklistQuery, model: worklist.Model) -> list[dict]:
    """On the workflow thread: the response identifiers of the matching items."""
    return [worklist.response(query.identifier, attrs)
            for _, attrs in store.query_worklist(query.where, query.params, model)
            if worklist.matches(query, attrs)]


def c_find_handler(model: worklist.Model):
    """The C-FIND handler of a worklist (the General Purpose Worklist uses it too)."""

    async def handle(association, context, received) -> None:
        await find(model, association, context, received)

    return handle


async def find(model: worklist.Model, association, context, received) -> None:
    """PS3.4 K.4.1.3: a pending response per matching worklist item, then success."""
    request: C_FIND_RQ = received.command
    message_id = request.MessageID
    respond = c_find_responder(association, context, request)

    try:
        query = worklist.plan(decode(received.data_set or b"", context.transfer_syntax), model)
    except Exception as error:  # noqa: BLE001 - an identifier pydicom cannot read
        log.warning("%s worklist C-FIND identifier cannot be read: %s",
                    association.describe(), error)
        respond(IDENTIFIER_DOES_NOT_MATCH, comment="identifier cannot be parsed")
        return
    agent = association.agent
    try:
        responses = await agent.in_workflow(_find, query, model)
    except Exception as error:  # noqa: BLE001 - a database failure
        log.error("%s worklist C-FIND failed: %s", association.describe(), error)
        respond(UNABLE_TO_PROCESS, comment="unable to process")
        return
    for start in range(0, len(responses), BATCH):
        for data in responses[start:start + BATCH]:
            if message_id in association.cancelled:
                association.cancelled.discard(message_id)
                log.info("%s worklist C-FIND cancelled after %d matches",
                         association.describe(), start)
                respond(CANCEL)
                return
            respond(PENDING, data)
        await association.ul.drain()
        await asyncio.sleep(0)              # let a C-CANCEL-RQ in
    if message_id in association.cancelled:
        association.cancelled.discard(message_id)
        respond(CANCEL)
        return
    log.info("%s worklist C-FIND: %d matches", association.describe(), len(responses))
    respond(SUCCESS)


#: C-FIND-RSP statuses of a worklist (seed Table 40), for both worklists.
FIND_STATUSES = (
    Status(SUCCESS, "Matching is complete"),
    Status(PENDING, "Matches are continuing: current match supplied"),
    Status(CANCEL, "Matching terminated after C-CANCEL-RQ"),
    Status(IDENTIFIER_DOES_NOT_MATCH, "Identifier does not match SOP Class (cannot be read)"),
    Status(UNABLE_TO_PROCESS, "Unable to process (workflow store failure)"),
)

SERVICE = ServiceClass(
    name="Modality Worklist",
    reference="PS3.4 Annex K",
    sop_classes={MODALITY_WORKLIST_FIND: "Modality Worklist Information Model - FIND"},
    handlers={C_FIND_RQ: c_find_handler(worklist.MODALITY)},
    statuses={C_FIND_RQ: FIND_STATUSES},
    query_keys=(KeyGroup("Worklist item", worklist.MATCHING_KEYS,
                         "matched in the workflow store; any other key with a value is "
                         "matched on the candidate items; every key asked for is returned"),),
    initiates=(Initiation("SCU", "find", "query a Modality Worklist (find --model mwl)"),),
)
