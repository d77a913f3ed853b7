"""PS3.4 Annex J: Storage Commitment Push Model, SCP (the SCU is ``dicomagent.commit``).

N-ACTION-RQ (Action Type 1, "Request Storage Commitment") names a Transaction
UID and the instances to commit. The request is recorded in the index before
N-ACTION-RSP is sent, so a restart loses no pending commitment; the archive
then checks each instance (present, of that SOP class, and its file's CRC-32
still the one kept at store time) and the result goes back as N-EVENT-REPORT:
Event Type 1 when everything is committed, 2 when something failed (Failed
SOP Sequence, Failure Reason 0112, 0119 or 0110).

The report goes on the requester's association while it is open; otherwise
on a new association to the requester (its AE title looked up in
``[peers]``), proposing the Storage Commitment Push Model with SCP/SCU Role
Selection (the agent is SCP, seed Table 31). A requester that cannot be
reached is tried again with back-off from the durable queue.

References
----------
PS3.4 J.3 (N-ACTION, N-EVENT-REPORT), J.3.2.1.1 / J.3.3.1 (statuses and
Failure Reasons); seed 3.1.2.5, 3.1.3.5, Tables 5, 31, 68, 69.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pydicom

from dicomagent.association import AssociationError, associate
from dicomagent.background import QueueWorker
from dicomagent.dimse.commands import (DATA_SET_PRESENT, N_ACTION_RQ, N_ACTION_RSP,
                                       N_EVENT_REPORT_RQ)
from dicomagent.dimse.status import (INVALID_ATTRIBUTE_VALUE, INVALID_OBJECT_INSTANCE,
                                     MISSING_ATTRIBUTE, NO_SUCH_ACTION_TYPE,
                                     StatusCategory, category)
from dicomagent.services import Initiation, ServiceClass, Status
from dicomagent.transcode import decode, encode
from dicomagent.ul.negotiation import ProposedContext
from dicomagent.uids import UNCOMPRESSED_TRANSFER_SYNTAXES

log = logging.getLogger("dicomagent.commitment")

STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
#: PS3.4 J.3.1: the well-known SOP Instance of the Push Model.
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_STORAGE_COMMITMENT = 1
ALL_COMMITTED, FAILURES_EXIST = 1, 2

# N-ACTION-RSP statuses: seed Table 69 and PS3.7 C.5 (``dimse.status``) for malformed requests.
SUCCESS = 0x0000
FAILED = 0xA900

#: Back-off for a requester that cannot be reached: 10 s doubling up to an hour.
FIRST_RETRY, LAST_RETRY = 10.0, 3600.0


def parse_request(ds: pydicom.Dataset) -> tuple[str, list[tuple[str, str]]]:
    """Transaction UID and (SOP Class, SOP Instance) pairs; raises ``ValueError``."""
    transaction_uid = str(ds.get("TransactionUID", "") or "")
    if not transaction_uid:
        raise ValueError("Transaction UID (0008,1195) missing")
    sequence = ds.get("ReferencedSOPSequence")
    if not sequence:
        raise ValueError("Referenced SOP Sequence (0008,1199) missing or empty")
    references = []
    for item in sequence:
        sop_class = str(item.get("ReferencedSOPClassUID", "") or "")
        sop_instance = str(item.get("ReferencedSOPInstanceUID", "") or "")
        if not sop_class or not sop_instance:
            raise ValueError("an item of the Referenced SOP Sequence lacks a UID")
        references.append((sop_class, sop_instance))
    return transaction_uid, references


def report_data_set(transaction_uid: str, committed: list, failed: list) -> pydicom.Dataset:
    """PS3.4 Table J.3-2: the N-EVENT-REPORT data set (no Retrieve AE Title, no File-Set)."""
    ds = pydicom.Dataset()
    ds.TransactionUID = transaction_uid
    if committed:
        ds.ReferencedSOPSequence = [_item(c, i) for c, i in committed]
    if failed:
        items = []
        for sop_class, sop_instance, reason in failed:
            item = _item(sop_class, sop_instance)
            item.FailureReason = reason
            items.append(item)
        ds.FailedSOPSequence = items
    return ds


def _item(sop_class: str, sop_instance: str) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def _verify_all(archive, transaction_uid: str, references: list, now: float):
    """On the archive's worker: check each instance and keep the result."""
    committed, failed = [], []
    for sop_class, sop_instance in references:
        reason = archive.verify(sop_class, sop_instance)
        if reason:
            failed.append([sop_class, sop_instance, reason])
        else:
            committed.append([sop_class, sop_instance])
    archive.index.set_commitment_result(transaction_uid, committed, failed, now)
    return committed, failed


async def handle_n_action(association, context, received) -> None:
    """PS3.4 J.3.2: record the request, answer, verify, then report."""
    request: N_ACTION_RQ = received.command

    def respond(status: int, comment: str | None = None) -> None:
        association.send_message(context.context_id, N_ACTION_RSP(
            AffectedSOPClassUID=STORAGE_COMMITMENT_PUSH_MODEL,
            MessageIDBeingRespondedTo=request.MessageID, Status=status,
            AffectedSOPInstanceUID=STORAGE_COMMITMENT_INSTANCE,
            ActionTypeID=request.ActionTypeID if status == SUCCESS else None,
            ErrorComment=comment))

    if request.ActionTypeID != REQUEST_STORAGE_COMMITMENT:
        respond(NO_SUCH_ACTION_TYPE, f"Action Type ID {request.ActionTypeID}")
        return
    if request.RequestedSOPInstanceUID != STORAGE_COMMITMENT_INSTANCE:
        respond(INVALID_OBJECT_INSTANCE, "not the Storage Commitment SOP Instance")
        return
    try:
        transaction_uid, references = parse_request(
            decode(received.data_set or b"", context.transfer_syntax))
    except ValueError as error:
        log.warning("%s N-ACTION refused: %s", association.describe(), error)
        respond(MISSING_ATTRIBUTE if "missing" in str(error) else INVALID_ATTRIBUTE_VALUE,
                str(error)[:64])
        return
    except Exception as error:  # noqa: BLE001 - a data set pydicom cannot read
        log.warning("%s N-ACTION data set unreadable: %s", association.describe(), error)
        respond(FAILED, "data set cannot be parsed")
        return
    reporter: Reporter = association.agent.reporter
    reporter.claim(transaction_uid)
    try:
        await _record_verify_report(association, context, transaction_uid, references, respond)
    finally:
        reporter.release(transaction_uid)


async def _record_verify_report(association, context, transaction_uid: str, references: list,
                                respond) -> None:
    archive = association.agent.archive
    reporter: Reporter = association.agent.reporter
    try:
        await asyncio.wrap_future(archive.call(
            lambda a: a.index.add_commitment(transaction_uid, association.calling_ae_title,
                                             time.time(), references)))
    except Exception as error:  # noqa: BLE001 - the database refused
        log.error("%s N-ACTION not recorded: %s", association.describe(), error)
        respond(FAILED, "cannot record the request")
        return
    respond(SUCCESS)
    log.info("%s storage commitment %s: %d instances requested", association.describe(),
             transaction_uid, len(references))
    committed, failed = await asyncio.wrap_future(
        archive.call(_verify_all, transaction_uid, references, time.time()))
    if not association.ended.done():
        try:
            await send_report(association, context.context_id, transaction_uid, committed,
                              failed)
        except (AssociationError, ReportRefused) as error:
            log.info("%s storage commitment %s: report on this association failed (%s); "
                     "a new association will carry it", association.describe(),
                     transaction_uid, error)
        else:
            await asyncio.wrap_future(archive.call(
                lambda a: a.index.commitment_reported(transaction_uid)))
            return
    reporter.wake()


class ReportRefused(Exception):
    """The requester answered the N-EVENT-REPORT with a failure status."""


async def send_report(association, context_id: int, transaction_uid: str, committed: list,
                      failed: list) -> None:
    """PS3.4 J.3.3: N-EVENT-REPORT-RQ with the result; waits for the N-EVENT-REPORT-RSP."""
    context = association.contexts[context_id]
    message_id = association.next_message_id()
    event_type = FAILURES_EXIST if failed else ALL_COMMITTED
    association.send_message(context_id, N_EVENT_REPORT_RQ(
        AffectedSOPClassUID=STORAGE_COMMITMENT_PUSH_MODEL, MessageID=message_id,
        CommandDataSetType=DATA_SET_PRESENT, AffectedSOPInstanceUID=STORAGE_COMMITMENT_INSTANCE,
        EventTypeID=event_type),
        encode(report_data_set(transaction_uid, committed, failed), context.transfer_syntax))
    try:
        response = await association.wait_response(message_id)
    finally:
        association.done_with(message_id)
    status = response.command.Status
    if category(status) not in (StatusCategory.SUCCESS, StatusCategory.WARNING):
        raise ReportRefused(f"N-EVENT-REPORT-RSP status 0x{status:04X}")
    log.info("%s storage commitment %s reported: %d committed, %d failed",
             association.describe(), transaction_uid, len(committed), len(failed))


class Reporter(QueueWorker):
    """Delivers the reports that could not go on the requester's association.

    Reads the pending commitments from the index at start and whenever woken,
    and tries each due one on a new association to the requester, with
    back-off; what it cannot deliver stays in the index for the next try
    (and the next start of the daemon).
    """

    def __init__(self, agent):
        self.agent = agent
        super().__init__()
        #: Transactions a handler is still answering on the requester's association.
        self._claimed: set[str] = set()

    def claim(self, transaction_uid: str) -> None:
        self._claimed.add(transaction_uid)

    def release(self, transaction_uid: str) -> None:
        self._claimed.discard(transaction_uid)
        self.wake()

    async def _round(self) -> float:
        archive = self.agent.archive
        pending = await asyncio.wrap_future(archive.call(lambda a: a.index.commitments()))
        now = time.time()
        delay = LAST_RETRY
        for record in pending:
            if record["transaction_uid"] in self._claimed:
                continue
            if record["result"] is None:
                # Recorded, but the daemon stopped before verifying: verify now.
                committed, failed = await asyncio.wrap_future(archive.call(
                    _verify_all, record["transaction_uid"],
                    [tuple(r) for r in record["request"]], now))
                record["result"] = {"committed": committed, "failed": failed}
            if record["next_attempt"] > now:
                delay = min(delay, record["next_attempt"] - now)
                continue
            await self._deliver(record)
            delay = min(delay, FIRST_RETRY)
        return delay

    async def _deliver(self, record: dict) -> None:
        archive = self.agent.archive
        transaction_uid = record["transaction_uid"]
        config = self.agent.config
        peer = config.peer_by_ae_title(record["calling_ae_title"])
        try:
            if peer is None:
                raise AssociationError(f"{record['calling_ae_title']} is not in [peers]")
            timeouts = config.timeouts
            association = await associate(
                peer.host, peer.port, config.agent.ae_title, peer.ae_title,
                [ProposedContext(STORAGE_COMMITMENT_PUSH_MODEL, UNCOMPRESSED_TRANSFER_SYNTAXES,
                                 scu_role=False, scp_role=True)],
                artim_timeout=timeouts.artim, dimse_timeout=timeouts.dimse,
                network_timeout=timeouts.network)
            try:
                context = association.context_for(STORAGE_COMMITMENT_PUSH_MODEL)
                result = record["result"]
                await send_report(association, context.context_id, transaction_uid,
                                  result["committed"], result["failed"])
            finally:
                await association.release()
        except (AssociationError, ReportRefused) as error:
            wait = min(LAST_RETRY, FIRST_RETRY * 2 ** record["attempts"])
            log.warning("storage commitment %s: report to %s failed (%s); next try in %.0f s",
                        transaction_uid, record["calling_ae_title"], error, wait)
            reason = str(error)         # `error` is gone once this block ends
            await asyncio.wrap_future(archive.call(
                lambda a: a.index.commitment_retry(transaction_uid, time.time() + wait,
                                                   reason)))
            return
        await asyncio.wrap_future(archive.call(
            lambda a: a.index.commitment_reported(transaction_uid)))


SERVICE = ServiceClass(
    name="Storage Commitment Push Model",
    reference="PS3.4 Annex J",
    sop_classes={STORAGE_COMMITMENT_PUSH_MODEL: "Storage Commitment Push Model SOP Class"},
    scp=True,
    handlers={N_ACTION_RQ: handle_n_action},
    statuses={N_ACTION_RQ: (
        Status(SUCCESS, "Request recorded; the N-EVENT-REPORT follows"),
        Status(NO_SUCH_ACTION_TYPE, "Action Type ID is not 1 (Request Storage Commitment)"),
        Status(INVALID_OBJECT_INSTANCE, "Not the well-known Storage Commitment SOP Instance"),
        Status(MISSING_ATTRIBUTE, "Transaction UID or Referenced SOP Sequence missing"),
        Status(INVALID_ATTRIBUTE_VALUE, "A Referenced SOP Sequence item lacks a UID"),
        Status(FAILED, "Data set cannot be parsed, or the request cannot be recorded"),
    )},
    initiates=(
        Initiation("SCU", "commit", "ask a peer to commit to instances (N-ACTION-RQ) and take "
                   "its N-EVENT-REPORT on the same association, or with --listen-port on one "
                   "the peer opens (the agent accepts the SCU role there)"),
        Initiation("SCP", "", "report a commitment result (N-EVENT-REPORT-RQ, event type 1 or "
                   "2) to a requester whose association has closed, on a new association to "
                   "its [peers] entry, with SCP/SCU Role Selection; retried with back-off"),
    ),
)
