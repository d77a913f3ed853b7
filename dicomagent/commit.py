"""Storage Commitment Push Model SCU: ``dicomagent commit`` (PS3.4 J.3, SCU side).

Sends N-ACTION-RQ "Request Storage Commitment" for some instances and waits
for the N-EVENT-REPORT, on the same association or, with ``listen_port``, on
an association the SCP opens to us (we accept it as the SCU of the Storage
Commitment Push Model, the SCP having proposed the SCP role).

References
----------
PS3.4 J.3.2 (N-ACTION), J.3.3 (N-EVENT-REPORT), J.4 (SCU behaviour).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import pydicom
from pydicom.uid import generate_uid

from dicomagent.association import AssociationError, associate
from dicomagent.listener import Listener
from dicomagent.dimse.commands import (DATA_SET_PRESENT, N_ACTION_RQ, N_EVENT_REPORT_RQ,
                                       N_EVENT_REPORT_RSP)
from dicomagent.dimse.status import PROCESSING_FAILURE
from dicomagent.services.commitment import (REQUEST_STORAGE_COMMITMENT,
                                            STORAGE_COMMITMENT_INSTANCE,
                                            STORAGE_COMMITMENT_PUSH_MODEL)
from dicomagent.transcode import decode, encode
from dicomagent.ul.negotiation import AbstractSyntaxSupport, ProposedContext
from dicomagent.uids import UNCOMPRESSED_TRANSFER_SYNTAXES
from dicomagent.ul.states import State

log = logging.getLogger("dicomagent.commit")


@dataclass
class CommitResult:
    transaction_uid: str
    status: int = 0
    committed: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str, int]] = field(default_factory=list)
    #: "same association" or "new association"
    delivered_on: str = ""


def request_data_set(transaction_uid: str, references: list[tuple[str, str]]) -> pydicom.Dataset:
    """PS3.4 Table J.3-1: Transaction UID and Referenced SOP Sequence."""
    ds = pydicom.Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in references:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def _read_report(ds: pydicom.Dataset, result: CommitResult) -> None:
    for item in ds.get("ReferencedSOPSequence", []) or []:
        result.committed.append((item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID))
    for item in ds.get("FailedSOPSequence", []) or []:
        result.failed.append((item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID,
                              int(item.get("FailureReason", 0x0110))))


async def commit(host: str, port: int, calling: str, called: str,
                 references: list[tuple[str, str]], timeout: float = 60.0,
                 listen_port: int | None = None, listen_host: str = "0.0.0.0") -> CommitResult:
    """Request storage commitment and wait (``timeout`` s) for the report."""
    result = CommitResult(generate_uid())
    loop = asyncio.get_running_loop()
    report: asyncio.Future = loop.create_future()

    def on_report(association, context, received) -> None:
        request: N_EVENT_REPORT_RQ = received.command
        if association.connection.state is not State.Sta6:
            # PS3.8 Table 9-10: no P-DATA after our A-RELEASE-RQ (Sta7); unanswered, the
            # SCP reports again on a new association.
            return
        status = 0x0000
        try:
            ds = decode(received.data_set or b"", context.transfer_syntax)
            if str(ds.get("TransactionUID", "")) != result.transaction_uid:
                status = PROCESSING_FAILURE
        except Exception:  # noqa: BLE001 - a report we cannot read
            status = PROCESSING_FAILURE
            ds = None
        association.send_message(context.context_id, N_EVENT_REPORT_RSP(
            AffectedSOPClassUID=STORAGE_COMMITMENT_PUSH_MODEL,
            MessageIDBeingRespondedTo=request.MessageID, Status=status,
            AffectedSOPInstanceUID=STORAGE_COMMITMENT_INSTANCE,
            EventTypeID=request.EventTypeID))
        if status == 0 and not report.done():
            report.set_result((ds, association))

    listener = None
    if listen_port is not None:
        # The report association: the SCP proposes the SCP role, we take the SCU role.
        listener = Listener(calling, {STORAGE_COMMITMENT_PUSH_MODEL: AbstractSyntaxSupport(
            scp=False, scu=True)}, {(N_EVENT_REPORT_RQ, STORAGE_COMMITMENT_PUSH_MODEL): on_report})
        await listener.start(listen_host, listen_port)
    try:
        association = await associate(host, port, calling, called,
                                      [ProposedContext(STORAGE_COMMITMENT_PUSH_MODEL,
                                                       UNCOMPRESSED_TRANSFER_SYNTAXES)],
                                      artim_timeout=timeout, dimse_timeout=timeout,
                                      network_timeout=timeout)
        association.handlers[(N_EVENT_REPORT_RQ, STORAGE_COMMITMENT_PUSH_MODEL)] = on_report
        try:
            context = association.context_for(STORAGE_COMMITMENT_PUSH_MODEL)
            response = await association.request(context.context_id, N_ACTION_RQ(
                RequestedSOPClassUID=STORAGE_COMMITMENT_PUSH_MODEL,
                MessageID=association.next_message_id(), CommandDataSetType=DATA_SET_PRESENT,
                RequestedSOPInstanceUID=STORAGE_COMMITMENT_INSTANCE,
                ActionTypeID=REQUEST_STORAGE_COMMITMENT),
                encode(request_data_set(result.transaction_uid, references),
                       context.transfer_syntax))
            result.status = response.command.Status
            if result.status != 0:
                return result
            if listen_port is not None:
                # Let the SCP report on a new association, as many do.
                await association.release()
            try:
                ds, carrier = await asyncio.wait_for(asyncio.shield(report), timeout)
            except asyncio.TimeoutError:
                raise AssociationError(f"no N-EVENT-REPORT within {timeout:g} s") from None
            result.delivered_on = ("same association" if carrier is association
                                   else "new association")
            if carrier is not association:
                # The SCP opened the report association: let it release it.
                try:
                    await asyncio.wait_for(asyncio.shield(carrier.ul.closed), timeout)
                except asyncio.TimeoutError:
                    carrier.abort()
            _read_report(ds, result)
        finally:
            await association.release()
    finally:
        if listener is not None:
            listener.close()
    return result
