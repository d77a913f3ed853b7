"""The outbox's delivery: forwarded N-CREATE / N-SET reach their peers, in order.

Messages wait in the workflow store's ``outbox`` table (written in the same
transaction as the procedure step they come from), so a restart loses none.
The ``Forwarder`` takes them peer by peer in the order they were accepted:
it opens one association to the peer, sends each message and waits for its
response, and deletes the message once the peer has answered success (or a
warning). Order per peer is the queue order, so an N-SET never overtakes the
N-CREATE of its instance.

- The peer cannot be reached (refused, rejected, aborted, timed out): its
  messages wait, with back-off (``[outbox] first_retry`` doubling up to
  ``last_retry``), and keep their order.
- The peer answers a failure status: sending it again would get the same
  answer, so the message is marked failed (``dicomagent outbox ls`` shows it
  with the status) and the next one goes. (Except 0111 Duplicate SOP Instance
  for an N-CREATE tried before: the earlier try reached the peer and only
  its answer was lost, so the message counts as delivered.)

References
----------
PS3.4 F.7 (MPPS), seed 3.1.2.6.3 ("DICOM Agent will forward MPPS N-CREATE and
MPPS N-SET to configured AE").
"""

from __future__ import annotations

import logging
import time

import pydicom

from dicomagent.association import AssociationError, associate
from dicomagent.background import QueueWorker
from dicomagent.dimse.status import DUPLICATE_SOP_INSTANCE, StatusCategory, category
from dicomagent.normalized import n_create, n_set
from dicomagent.ul.negotiation import ProposedContext
from dicomagent.uids import UNCOMPRESSED_TRANSFER_SYNTAXES

log = logging.getLogger("dicomagent.forward")


class Forwarder(QueueWorker):
    """Delivers the outbox of an ``Agent`` (started and stopped with it)."""

    def __init__(self, agent):
        self.agent = agent
        super().__init__()

    async def _round(self) -> float:
        outbox = self.agent.config.outbox
        waiting = await self.agent.in_workflow(lambda store: store.outbox("waiting"))
        now = time.time()
        delay = outbox.last_retry
        by_peer: dict[str, list] = {}
        for message in waiting:
            by_peer.setdefault(message.peer, []).append(message)
        for peer, messages in by_peer.items():
            if messages[0].next_attempt > now:
                delay = min(delay, messages[0].next_attempt - now)
                continue
            if not await self._deliver(peer, messages):
                delay = min(delay, outbox.first_retry)
        return delay

    async def _deliver(self, name: str, messages: list) -> bool:
        """Send a peer's waiting messages; False if it could not be reached."""
        config = self.agent.config
        peer = config.peers.get(name)
        if peer is None:
            await self._retry(name, messages[0].attempts, f"[peers.{name}] is not configured")
            return False
        sop_classes = sorted({message.sop_class_uid for message in messages})
        timeouts = config.timeouts
        try:
            association = await associate(
                peer.host, peer.port, config.agent.ae_title, peer.ae_title,
                [ProposedContext(uid, UNCOMPRESSED_TRANSFER_SYNTAXES) for uid in sop_classes],
                artim_timeout=timeouts.artim, dimse_timeout=timeouts.dimse,
                network_timeout=timeouts.network)
        except AssociationError as error:
            await self._retry(name, messages[0].attempts, str(error))
            return False
        try:
            for message in messages:
                await self._send(association, name, message)
        except AssociationError as error:
            await self._retry(name, messages[0].attempts, str(error))
            return False
        finally:
            await association.release()
        return True

    async def _send(self, association, name: str, message) -> None:
        ds = pydicom.Dataset.from_json(message.data_set)
        if message.message == "N-CREATE":
            result = await n_create(association, message.sop_class_uid,
                                    message.sop_instance_uid, ds)
        else:
            result = await n_set(association, message.sop_class_uid,
                                 message.sop_instance_uid, ds)
        delivered = category(result.status) in (StatusCategory.SUCCESS, StatusCategory.WARNING)
        if message.message == "N-CREATE" and result.status == DUPLICATE_SOP_INSTANCE \
                and message.attempts:
            # Sent before, the answer lost with the association: the peer has it.
            delivered = True
        if delivered:
            await self.agent.in_workflow(lambda store: store.outbox_delivered(message.seq))
            log.info("forwarded %s %s to %s", message.message, message.sop_instance_uid, name)
            return
        error = f"status {result.status:04X}" + (f": {result.error_comment}"
                                                  if result.error_comment else "")
        await self.agent.in_workflow(lambda store: store.outbox_failed(message.seq, error))
        log.warning("%s %s refused by %s (%s); not sent again", message.message,
                    message.sop_instance_uid, name, error)

    async def _retry(self, name: str, attempts: int, error: str) -> None:
        outbox = self.agent.config.outbox
        wait = min(outbox.last_retry, outbox.first_retry * 2 ** attempts)
        await self.agent.in_workflow(
            lambda store: store.outbox_retry(name, time.time() + wait, error))
        log.warning("forwarding to %s failed (%s); next try in %.0f s", name, error, wait)
